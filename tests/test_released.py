"""Released Florenz checkpoints as users hold them: the official config.json, the released key names, one-call
loading and export, and safetensors metadata written by other tools."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from florenz_fast.checkpoint import CheckpointError, open_checkpoint, save_state_dict
from florenz_fast.config import RELEASED, FlorenzConfig, get_config
from florenz_fast.convert import (
    PREPROCESSOR_NAME,
    export_state_dict,
    load_pretrained,
    released_image_size,
    released_state_dict,
    save_pretrained,
)
from florenz_fast.florenz import Florenz
from tests.test_config import _meta_model, _released_keys

HEAD, EMBED = "language_model.lm_head.weight", "language_model.model.decoder.embed_tokens.weight"


def _random_model(name: str, seed: int = 0) -> Florenz:
    """Every tensor random (gates and norms too, which initialise to constants), so no mix-up can hide."""
    model = Florenz(get_config(name)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def _assert_identical(a: Florenz, b: Florenz) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    bad = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert bad == []


# ---- the official config.json, written by hand from SPEC's numbers ---------------------------------------

def _vision(base: bool) -> dict:
    dims, heads = ([128, 256, 512, 1024], [4, 8, 16, 32]) if base else ([256, 512, 1024, 2048], [8, 16, 32, 64])
    return {  # SPEC §2, in Microsoft's Florence-2 key names
        "model_type": "davit", "drop_path_rate": 0.1, "patch_size": [7, 3, 3, 3], "patch_stride": [4, 2, 2, 2],
        "patch_padding": [3, 1, 1, 1], "patch_prenorm": [False, True, True, True], "enable_checkpoint": False,
        "dim_embed": dims, "num_heads": heads, "num_groups": heads, "depths": [1, 1, 9, 1], "window_size": 12,
        "projection_dim": 768 if base else 1024,
        "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    }


def _text(base: bool, vocab: int) -> dict:
    d, layers, heads, ffn, positions = (768, 6, 12, 3072, 1024) if base else (1024, 12, 16, 4096, 4096)
    return {  # SPEC §3 / §5
        "model_type": "florence2_language", "vocab_size": vocab, "d_model": d,
        "encoder_layers": layers, "encoder_attention_heads": heads, "encoder_ffn_dim": ffn,
        "decoder_layers": layers, "decoder_attention_heads": heads, "decoder_ffn_dim": ffn,
        "max_position_embeddings": positions, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1,
        "activation_function": "gelu", "scale_embedding": False, "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0,
        "init_std": 0.02, "use_cache": True, "num_hidden_layers": layers, "is_encoder_decoder": True,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
        "forced_eos_token_id": 2, "no_repeat_ngram_size": 3, "num_beams": 3,
    }


def _top(vision: dict, text: dict) -> dict:
    return {
        "_name_or_path": "florenz", "architectures": ["Florence2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"}, "model_type": "florence2",
        "projection_dim": vision["projection_dim"], "vocab_size": text["vocab_size"], "ignore_index": -100,
        "is_encoder_decoder": True, "torch_dtype": "float32", "transformers_version": "4.44.2",
        "vision_config": vision, "text_config": text,
    }


GEMMA_2B = {  # SPEC §4, as transformers 4.x writes a Gemma2Config
    "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 2304,
    "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "query_pre_attn_scalar": 256, "vocab_size": 256000, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
    "attention_dropout": 0.0, "max_position_embeddings": 8192, "cache_implementation": "hybrid",
    "initializer_range": 0.02, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
}


def official_config(name: str) -> dict:
    """The official config.json of a released preset, written from SPEC's numbers (not from our code)."""
    if name in ("florenz-0.4b", "florenz-1.0b"):
        text = _text(name == "florenz-0.4b", 51328)
        text["decoder_vocab_size"] = 257024  # the Gemma tokenizer's table (SPEC §5)
        return _top(_vision(name == "florenz-0.4b"), text)
    text = _text(False, 51289)
    gemma = dict(GEMMA_2B)
    if name == "florenz-11.2b":  # Gemma-2-9B, as transformers 5 writes it: rope_parameters and layer_types
        gemma.update(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                     num_key_value_heads=8, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                     layer_types=["sliding_attention", "full_attention"] * 21)
        del gemma["rope_theta"], gemma["hidden_act"]
    text["gemma_config"] = gemma
    return _top(_vision(False), text)


@pytest.mark.parametrize("name", RELEASED)
def test_hand_written_official_config_maps_to_its_preset(name, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(official_config(name), indent=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the file is read, checked or known to be irrelevant
        cfg = FlorenzConfig.from_released(path)
    assert cfg == get_config(name)
    assert FlorenzConfig.from_released(tmp_path) == cfg  # the directory names its config.json


@pytest.mark.parametrize("name", RELEASED)
def test_to_released_reads_back_to_the_preset(name):
    cfg = get_config(name)
    assert FlorenzConfig.from_released(json.loads(json.dumps(cfg.to_released()))) == cfg
    assert FlorenzConfig.from_released(cfg.to_released(), image_size=224).name == name  # size is not identity


def test_unknown_official_keys_warn_once_with_their_paths():
    data = official_config("florenz-3.5b")
    data["text_config"]["gemma_config"]["cross_attention_every"] = 1
    data["vision_config"]["mystery"] = True
    with pytest.warns(UserWarning, match=r"\['vision_config.mystery', 'text_config.gemma_config.cross_attention_"):
        assert FlorenzConfig.from_released(data) == get_config("florenz-3.5b")


def _broken(name: str, edit) -> dict:
    data = copy.deepcopy(official_config(name))
    edit(data)
    return data


@pytest.mark.parametrize("name,edit,message", [
    ("florenz-3.5b", lambda d: d["text_config"]["gemma_config"].update(num_hidden_layers="three"),
     r"text_config.gemma_config.num_hidden_layers: expected int, got str 'three'"),
    ("florenz-0.4b", lambda d: d["text_config"].update(activation_function="relu"),
     r"text_config.activation_function: str 'relu' is not supported .*'gelu'"),
    ("florenz-0.4b", lambda d: d["vision_config"].pop("dim_embed"), r"vision_config.dim_embed: missing"),
    ("florenz-1.0b", lambda d: d["vision_config"].update(num_groups=[1, 2, 3, 4]),
     r"vision_config.num_groups: .* differs from num_heads"),
    ("florenz-0.4b", lambda d: d["text_config"].update(attention_dropout=0.0),
     r"text_config.attention_dropout: 0.0 != text_config.dropout 0.1"),
    ("florenz-3.5b", lambda d: d["text_config"]["gemma_config"].update(tie_word_embeddings=False),
     r"text_config.gemma_config.tie_word_embeddings: bool False is not supported"),
    ("florenz-11.2b", lambda d: d["text_config"]["gemma_config"].update(layer_types=["full_attention"] * 42),
     r"text_config.gemma_config.layer_types: .* is not supported \(the window on even layer indices"),
    ("florenz-3.5b", lambda d: d["text_config"]["gemma_config"].update(rope_parameters={"rope_type": "yarn"}),
     r"text_config.gemma_config.rope_parameters.rope_type: str 'yarn' is not supported"),
    ("florenz-0.4b", lambda d: d.update(model_type="llava"), r"^[^:]*config.json: model_type: str 'llava'"),
    ("florenz-0.4b", lambda d: d.pop("text_config"), r"text_config: missing"),
    ("florenz-0.4b", lambda d: d.update(projection_dim=1024),
     r"projection_dim 1024 != vision_config.projection_dim 768"),
    ("florenz-0.4b", lambda d: d["text_config"].update(decoder_attention_heads=7),
     r"text_config.decoder_attention_heads: 7 does not divide d_model 768"),
])
def test_official_config_errors_name_the_file_and_key(tmp_path, name, edit, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_broken(name, edit)))
    with pytest.raises(ValueError, match=message) as err:
        FlorenzConfig.from_released(path)
    assert str(err.value).startswith(str(path))


def test_config_the_official_file_cannot_hold_is_refused_before_writing(tmp_path):
    model = _random_model("tiny-bart")
    model.cfg.decoder.layer_norm_eps = 1e-6  # the published BART code fixes 1e-5
    model.cfg.encoder.max_prompt_tokens = 64
    lost = r"encoder.max_prompt_tokens 64 -> 128, decoder.layer_norm_eps 1e-06 -> 1e-05"  # ours -> the file's
    with pytest.raises(ValueError, match=lost) as e:
        save_pretrained(model, tmp_path / "out", layout="released")
    assert "tiny-bart" in str(e.value) and not (tmp_path / "out").exists()
    gemma = get_config("tiny")
    gemma.decoder.dropout = 0.0  # a BART-only field: the Gemma decoder never reads it, so nothing is lost
    assert FlorenzConfig.from_released(gemma.to_released(), image_size=64) == get_config("tiny")
    gemma.decoder.sliding_window = gemma.decoder.attn_softcap = 0  # written as null, read back as off
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = FlorenzConfig.from_released(gemma.to_released(), image_size=64)
    assert back.decoder.sliding_window == 0 and back.decoder.attn_softcap == 0 and back.name == "custom"
    with pytest.raises(ValueError, match="layout must be 'ours' or 'released', got 'microsoft'"):
        save_pretrained(model, tmp_path / "out", layout="microsoft")


# ---- the released key names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", RELEASED)
def test_exported_keys_equal_the_released_key_list(name):
    released = _released_keys()[name]
    written = released_state_dict(_meta_model(name))  # exactly what save_pretrained(layout="released") writes
    want = {k: (tuple(shape), dtype) for k, shape, dtype in released["keys"]}
    got = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in written.items()}
    assert HEAD not in got  # tied (released["tied_parameters"]): stored once, under the embedding's name
    assert [list(p) for p in released["tied_parameters"]] == [[EMBED, HEAD]]
    got[HEAD] = got[EMBED]
    assert got == want


# ---- one-call load and export --------------------------------------------------------------------------

@pytest.mark.parametrize("name,shard_bytes", [("tiny", 5 * 2**30), ("tiny", 150_000), ("tiny-bart", 5 * 2**30)])
def test_round_trip_ours_released_ours_is_bit_identical(tmp_path, name, shard_bytes):
    model = _random_model(name)
    save_pretrained(model, tmp_path / "rel", layout="released", max_shard_bytes=shard_bytes)
    names = sorted(p.name for p in (tmp_path / "rel").iterdir())
    assert ("model.safetensors.index.json" in names) == (shard_bytes < 1e6)
    assert "config.json" in names and PREPROCESSOR_NAME in names
    official = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert "vision_config" in official and ("gemma_config" in official["text_config"]) == (name == "tiny")
    stored = open_checkpoint(tmp_path / "rel")
    assert set(stored.keys()) == set(export_state_dict(model, "released")) - {HEAD}  # released names, head tied
    assert released_image_size(tmp_path / "rel") == 64

    loaded = load_pretrained(tmp_path / "rel")
    assert loaded.cfg == model.cfg and loaded.cfg.name == name
    _assert_identical(loaded, model)
    save_pretrained(loaded, tmp_path / "ours")  # and back into our layout
    _assert_identical(load_pretrained(tmp_path / "ours"), model)


def test_released_directory_variants(tmp_path):
    """What a user may hold: a separate lm_head (beside or instead of the embedding), no preprocessor config,
    a BART config.json that does not give the decoder table's size."""
    model = _random_model("tiny-bart", seed=3)
    save_pretrained(model, tmp_path / "rel", layout="released")
    full = export_state_dict(model, "released")
    directory = tmp_path / "rel"

    save_state_dict({k: v.clone() for k, v in full.items()}, directory)  # head and embedding as two copies
    assert HEAD in open_checkpoint(directory) and EMBED in open_checkpoint(directory)
    _assert_identical(load_pretrained(directory), model)
    save_state_dict({k: v for k, v in full.items() if k != EMBED}, directory)  # the head only
    _assert_identical(load_pretrained(directory), model)
    untied = {k: v.clone() for k, v in full.items()}
    untied[HEAD] += 1
    save_state_dict(untied, directory)
    with pytest.raises(CheckpointError, match=f"{HEAD} differs from {EMBED}"):
        load_pretrained(directory)
    save_state_dict(released_state_dict(model), directory)

    official = json.loads((directory / "config.json").read_text())
    del official["text_config"]["decoder_vocab_size"]  # rows then come from the checkpoint's table
    (directory / "config.json").write_text(json.dumps(official))
    (directory / PREPROCESSOR_NAME).unlink()
    loaded = load_pretrained(directory)
    assert loaded.cfg.image_size == 768 and loaded.cfg.decoder.vocab_size == 512  # the default size, SPEC §2
    _assert_identical(loaded, model)
    assert load_pretrained(directory, image_size=96).cfg.image_size == 96  # the argument wins


def test_preprocessor_config_sets_the_image_size_and_errors_name_it(tmp_path):
    model = _random_model("tiny")
    save_pretrained(model, tmp_path / "rel", layout="released")
    pre = tmp_path / "rel" / PREPROCESSOR_NAME
    data = json.loads(pre.read_text())
    data["size"] = {"height": 128, "width": 128}
    pre.write_text(json.dumps(data))
    assert load_pretrained(tmp_path / "rel").cfg.image_size == 128
    assert load_pretrained(tmp_path / "rel", image_size=224).cfg.image_size == 224
    for size, message in [({"height": 128, "width": 96}, "128x96 is not square"),
                          ({"shortest_edge": 224}, r"size: expected \{\"height\": H"),
                          ({"height": "128", "width": 128}, "size.height: expected a positive int, got str")]:
        pre.write_text(json.dumps(data | {"size": size}))
        with pytest.raises(ValueError, match=message) as err:
            load_pretrained(tmp_path / "rel")
        assert str(pre) in str(err.value)


def test_image_size_override_for_our_layout(tmp_path):
    save_pretrained(_random_model("tiny"), tmp_path / "ours")
    assert load_pretrained(tmp_path / "ours", image_size=96).cfg.image_size == 96
    with pytest.raises(ValueError, match="image_size 100"):
        load_pretrained(tmp_path / "ours", image_size=100)


# ---- safetensors metadata of other writers -------------------------------------------------------------

def test_foreign_tied_metadata_is_passed_through(tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2)}
    for value in ("true", '["a", "b"]', json.dumps({"a": "b"}), json.dumps({"ghost": "a"}), "{not json"):
        save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "tied": value})
        ck = open_checkpoint(tmp_path / "x.safetensors")
        assert sorted(ck) == ["a", "b"] and ck.metadata == {"tied": value}
        assert torch.equal(ck["a"], tensors["a"])


def test_legacy_tied_key_of_this_engine_still_loads(tmp_path):
    """Files this engine wrote before the namespace: a bare "tied" beside writer "florenz-fast..."."""
    kept = {"embed": torch.arange(6.0)}
    legacy = {"format": "pt", "writer": "florenz-fast", "tied": json.dumps({"head": "embed"})}
    save_file(kept, str(tmp_path / "old.safetensors"), metadata=legacy)
    ck = open_checkpoint(tmp_path / "old.safetensors")
    assert sorted(ck) == ["embed", "head"] and torch.equal(ck["head"], kept["embed"])
    assert ck.metadata == {"writer": "florenz-fast"}
    save_file(kept, str(tmp_path / "bad.safetensors"), metadata=legacy | {"tied": "{not json"})
    with pytest.raises(CheckpointError, match=r"malformed 'tied' metadata in .*bad.safetensors"):
        open_checkpoint(tmp_path / "bad.safetensors")

    shard = tmp_path / "sharded"  # the old index form: metadata.tied an object
    shard.mkdir()
    save_file(kept, str(shard / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 24, "writer": "florenz-fast scaling init", "tied": {"head": "embed"}},
             "weight_map": {"embed": "model-00001-of-00001.safetensors"}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(open_checkpoint(shard)["head"], kept["embed"])
    index["metadata"]["writer"] = "another tool"  # the same key from another writer is that writer's own
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    ck = open_checkpoint(shard)
    assert sorted(ck) == ["embed"] and ck.metadata["tied"] == {"head": "embed"}


def test_new_files_use_the_namespaced_key(tmp_path):
    sd = {"embed": torch.arange(6.0)}
    sd["head"] = sd["embed"]
    (path,) = save_state_dict(sd, tmp_path / "ck", metadata={"writer": "florenz-fast"})
    header = open_checkpoint(path)._handles[path].metadata()
    assert json.loads(header["florenz_fast.tied"]) == {"head": "embed"} and "tied" not in header
    with pytest.raises(ValueError, match="reserved"):
        save_state_dict(sd, tmp_path / "ck2", metadata={"florenz_fast.tied": "{}"})
