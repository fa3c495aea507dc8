"""Presets hold SPEC's numbers: exact parameter counts and the released checkpoint layout, on the meta device."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from florenz_fast.config import PRESETS, RELEASED, FlorenzConfig, apply_overrides, get_config
from florenz_fast.convert import export_state_dict
from florenz_fast.florenz import Florenz, apply_trainable_policy, count_parameters

SHARED_KEYS = Path(__file__).resolve().parents[2] / "shared" / "florenz_checkpoint_keys.json"
SPEC_PARAMS = {  # SPEC §1
    "florenz-0.4b": 428_838_400,
    "florenz-1.0b": 1_039_697_920,
    "florenz-3.5b": 3_485_001_498,
    "florenz-11.2b": 11_221_849_642,
}


def _released_keys() -> dict:
    packaged = json.loads(
        resources.files("florenz_fast").joinpath("resources/florenz_checkpoint_keys.json").read_text())
    if SHARED_KEYS.is_file():  # the contract lives in ../shared; our packaged copy must not drift from it
        assert json.loads(SHARED_KEYS.read_text()) == packaged
    return packaged["models"]


def _meta_model(name: str) -> Florenz:
    with torch.device("meta"):
        return Florenz(get_config(name))


@pytest.mark.parametrize("name", RELEASED)
def test_released_parameter_count_is_exact(name):
    model = _meta_model(name)
    assert count_parameters(model) == SPEC_PARAMS[name] == _released_keys()[name]["num_unique_params"]


@pytest.mark.parametrize("name", RELEASED)
def test_released_state_dict_layout(name):
    released = _released_keys()[name]
    exported = export_state_dict(_meta_model(name), "released")
    want = {k: (tuple(shape), dtype) for k, shape, dtype in released["keys"]}
    got = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in exported.items()}
    assert sorted(set(want) - set(got)) == []  # missing
    assert sorted(set(got) - set(want)) == []  # unexpected
    assert {k: got[k] for k in want if got[k] != want[k]} == {}  # mis-shaped
    assert len(got) == released["num_state_dict_keys"]
    for a, b in released["tied_parameters"]:
        assert exported[a] is exported[b]


@pytest.mark.parametrize("name,trainable", [("florenz-3.5b", 1.10e9), ("florenz-11.2b", 2.53e9)])
def test_trainable_policy_matches_spec(name, trainable):
    counts = apply_trainable_policy(_meta_model(name))
    assert abs(counts["trainable"] - trainable) / trainable < 0.005  # SPEC §7 gives them to 3 digits


def test_trainable_policy_names():
    model = _meta_model("tiny")
    apply_trainable_policy(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "decoder.embed_tokens.weight" in trainable
    assert "decoder.layers.0.encoder_attn_gate" in trainable
    assert "decoder.layers.1.encoder_attn.k_proj.weight" in trainable
    assert "decoder.layers.2.post_encoder_attention_layernorm.weight" in trainable
    assert "encoder.layers.0.fc1.weight" in trainable
    assert "decoder.layers.0.self_attn.q_proj.weight" not in trainable
    assert "decoder.layers.0.mlp.up_proj.weight" not in trainable
    assert "decoder.norm.weight" not in trainable
    assert not any(n.startswith(("vision_tower.", "projector.")) for n in trainable)
    bart = _meta_model("tiny-bart")
    apply_trainable_policy(bart)
    bart_frozen = {n for n, p in bart.named_parameters() if not p.requires_grad}
    assert bart_frozen and all(n.startswith(("vision_tower.", "projector.")) for n in bart_frozen)


def test_small_preset_size():
    assert 11.0e6 < count_parameters(_meta_model("small")) < 12.5e6  # SPEC §1: "≈12.0M"


@pytest.mark.parametrize("name", PRESETS)
def test_config_json_round_trip(name, tmp_path):
    cfg = get_config(name)
    cfg.save(tmp_path / "config.json")
    assert FlorenzConfig.load(tmp_path / "config.json") == cfg


def test_image_tokens_per_spec():
    cfg = get_config("florenz-3.5b")
    assert cfg.num_image_tokens(768) == 577 and cfg.num_image_tokens(224) == 50


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(get_config("tiny"), ["--decoder.layers=5", "vision.depths=2,1,1,1", "image_size=96"])
    assert cfg.decoder.layers == 5 and cfg.vision.depths == (2, 1, 1, 1) and cfg.image_size == 96
    with pytest.raises(ValueError, match="unknown key 'layer'"):
        apply_overrides(get_config("tiny"), ["decoder.layer=5"])
    with pytest.raises(ValueError, match="'five' is not a valid int"):
        apply_overrides(get_config("tiny"), ["decoder.layers=five"])
    with pytest.raises(ValueError, match="not one of"):
        apply_overrides(get_config("tiny"), ["decoder.kind=llama"])
    with pytest.raises(ValueError, match="image_size 100"):
        apply_overrides(get_config("tiny"), ["image_size=100"])


def test_bad_config_files(tmp_path):
    with pytest.raises(KeyError, match="unknown preset 'florenz-2b'"):
        get_config("florenz-2b")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        FlorenzConfig.load(bad)
    data = get_config("tiny").to_dict()
    data["decoder"]["n_layers"] = 3
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: decoder: unknown key\(s\) for DecoderConfig: \['n_layers'\]"):
        FlorenzConfig.load(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        FlorenzConfig.load(tmp_path / "nope.json")


def test_type_errors_come_first_and_name_the_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"decoder": {"layers": "three"}}))  # partial: the defaults alone fail a cross check
    with pytest.raises(ValueError) as err:
        FlorenzConfig.load(path)
    assert str(err.value) == f"{path}: decoder.layers: expected int, got str 'three'"
    data = get_config("tiny").to_dict()
    data["decoder"].update(heads=True, kind="llama", query_pre_attn_scalar="16")
    data["vision"]["dims"] = [16, 32.0, 64, 128]
    data["image_size"] = None
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        FlorenzConfig.load(path)
    assert str(err.value).splitlines() == [  # every problem at once, in the file's order
        f"{path}: 5 problems:",
        "  image_size: expected int, got NoneType None",
        "  vision.dims[1]: expected int, got float 32.0",
        "  decoder.kind: expected one of ('gemma2', 'bart'), got str 'llama'",
        "  decoder.heads: expected int, got bool True",
        "  decoder.query_pre_attn_scalar: expected float, got str '16'",
    ]
    path.write_text(json.dumps({"vision": [1, 2]}))
    with pytest.raises(ValueError, match=r"config.json: vision: expected an object for VisionConfig, got list"):
        FlorenzConfig.load(path)


def test_json_numbers_and_lists_parse_to_the_field_types():
    data = get_config("tiny").to_dict()
    data["decoder"]["query_pre_attn_scalar"] = 16  # JSON writes 16.0 as 16 too
    cfg = FlorenzConfig.from_dict(json.loads(json.dumps(data)))
    assert cfg == get_config("tiny") and isinstance(cfg.decoder.query_pre_attn_scalar, float)
    assert isinstance(cfg.vision.dims, tuple) and cfg.vision.patch_prenorm == (False, True, True, True)
