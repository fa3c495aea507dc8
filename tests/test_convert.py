"""Model-level checkpoint I/O: our format, the released and Microsoft layouts, prepare, and the error paths."""

from __future__ import annotations

import json

import pytest
import torch

from florenz_fast.checkpoint import CheckpointError, open_checkpoint, save_state_dict
from florenz_fast.config import get_config
from florenz_fast.convert import (
    export_state_dict,
    import_florence2,
    import_florenz_released,
    load_pretrained,
    save_pretrained,
)
from florenz_fast.florenz import Florenz
from florenz_fast.prepare import CROSS_INIT_STD, prepare, remap_embedding
from florenz_fast.prepare import main as prepare_main
from florenz_fast.text import load_decoder_tokenizer, load_encoder_tokenizer
from tests.helpers.hf_models import florence2_reference, gemma2_reference
from tests.helpers.tokenizer_fixtures import make_bart_like_tokenizer, make_gemma_like_tokenizer


def _model(name="tiny", seed=0) -> Florenz:
    torch.manual_seed(seed)
    model = Florenz(get_config(name)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("encoder_attn_gate") or n.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g),
            torch.randint(3, cfg.encoder.vocab_size, (2, 6), generator=g),
            torch.randint(3, cfg.decoder.vocab_size, (2, 5), generator=g))


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-bart"])
@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 200_000])  # one file, and several shards + index
def test_save_load_round_trip(tmp_path, name, shard_bytes):
    model = _model(name)
    save_pretrained(model, tmp_path / "ck", max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert ("model.safetensors.index.json" in files) == (shard_bytes < 1e6)
    loaded = load_pretrained(tmp_path / "ck")
    assert loaded.cfg == model.cfg
    inputs = _inputs(model.cfg)
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))


def test_load_with_dtype_cast(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "ck")
    loaded = load_pretrained(tmp_path / "ck", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.decoder.rotary.inv_freq.dtype == torch.float32 and not loaded.decoder.rotary.inv_freq.is_meta


@pytest.mark.parametrize("name", ["tiny", "tiny-bart"])
def test_released_layout_round_trip(tmp_path, name):
    model = _model(name)
    exported = export_state_dict(model, "released")
    assert "image_projection" in exported and "language_model.lm_head.weight" in exported
    assert exported["image_projection"].shape == model.projector.image_projection.weight.shape[::-1]
    save_state_dict(exported, tmp_path / "released")
    fresh = Florenz(get_config(name)).eval()
    import_florenz_released(fresh, tmp_path / "released")
    inputs = _inputs(model.cfg)
    assert torch.equal(_logits(fresh, inputs), _logits(model, inputs))


@pytest.mark.slow
def test_microsoft_florence2_layout(tmp_path):
    """Microsoft's layout (vision `.fn.` wrappers, bare image_projection, shared embedding) loads like native."""
    ref = florence2_reference(get_config("tiny-bart"), seed=5)
    native = Florenz(get_config("tiny-bart")).eval()
    ref.save_pretrained(tmp_path / "native")
    assert import_florence2(native, tmp_path / "native") == "native"
    microsoft = export_state_dict(native, "microsoft")
    microsoft["language_model.model.shared.weight"] = microsoft.pop("language_model.model.encoder.embed_tokens.weight")
    microsoft["language_model.final_logits_bias"] = torch.zeros(1, native.cfg.decoder.vocab_size)
    save_state_dict(microsoft, tmp_path / "ms")
    assert "vision_tower.blocks.0.0.spatial_block.conv1.fn.dw.weight" in open_checkpoint(tmp_path / "ms")
    ours = Florenz(get_config("tiny-bart")).eval()
    assert import_florence2(ours, tmp_path / "ms") == "microsoft"
    inputs = _inputs(ours.cfg)
    assert torch.equal(_logits(ours, inputs), _logits(native, inputs))


def test_import_errors_name_file_and_keys(tmp_path):
    model = _model()
    exported = export_state_dict(model, "released")
    broken = dict(exported)
    broken.pop("image_proj_norm.bias")
    broken["language_model.model.encoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    broken["mystery.weight"] = torch.zeros(1)
    save_state_dict(broken, tmp_path / "bad")
    with pytest.raises(CheckpointError) as err:
        import_florenz_released(Florenz(get_config("tiny")), tmp_path / "bad")
    msg = str(err.value)
    assert str(tmp_path / "bad") in msg and "image_proj_norm.bias" in msg and "mystery.weight" in msg
    save_state_dict({k: v for k, v in exported.items() if k != "mystery.weight"} |
                    {"language_model.model.encoder.layers.0.fc1.weight": torch.zeros(3, 3)}, tmp_path / "shape")
    with pytest.raises(CheckpointError, match=r"fc1.weight.*\(3, 3\).*\(128, 64\)"):
        import_florenz_released(Florenz(get_config("tiny")), tmp_path / "shape")


def test_load_pretrained_bad_inputs_leave_no_partial_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)
    model = _model()
    save_pretrained(model, tmp_path / "ck")
    target = tmp_path / "ck" / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path / "ck")
    target.write_bytes(b"\x00garbage" * 100)  # corrupt
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path / "ck")
    # a failing save (a non-tensor in the state dict) writes nothing
    bad = dict(model.state_dict()) | {"oops": 3}
    with pytest.raises(TypeError, match="oops"):
        save_state_dict(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary directory left either


def test_wrong_config_for_checkpoint(tmp_path):
    save_pretrained(_model(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["decoder"]["ffn"] = 96
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"decoder.layers.0.mlp.up_proj.weight.*\(128, 64\).*\(96, 64\)"):
        load_pretrained(tmp_path / "ck")


@pytest.mark.slow
def test_prepare_gemma_preset(tmp_path):
    cfg = get_config("tiny")
    florence = florence2_reference(cfg, seed=6)
    gemma = gemma2_reference(cfg, seed=7)
    florence.save_pretrained(tmp_path / "florence2")
    gemma.save_pretrained(tmp_path / "gemma2")
    assert prepare_main(["--preset", "tiny", "--florence2", str(tmp_path / "florence2"),
                         "--gemma2", str(tmp_path / "gemma2"), "--out", str(tmp_path / "init")]) == 0
    model = load_pretrained(tmp_path / "init")
    for layer in model.decoder.layers:
        assert layer.encoder_attn_gate.item() == 0.0
        assert torch.equal(layer.post_encoder_attention_layernorm.weight, layer.post_attention_layernorm.weight)
    cross = torch.cat([layer.encoder_attn.q_proj.weight.flatten() for layer in model.decoder.layers])
    assert abs(cross.std().item() - CROSS_INIT_STD) < 0.1 * CROSS_INIT_STD and abs(cross.mean().item()) < 2e-3
    # with the gates at 0 the prepared model is Gemma-2 exactly, whatever the image and prompt
    ids = torch.randint(3, cfg.decoder.vocab_size, (2, 19))
    pixels, prompt, _ = _inputs(cfg)
    with torch.no_grad():
        got = model(pixels, prompt, ids).logits
        want = gemma(input_ids=ids).logits
        img_want = florence.model.get_image_features(pixels).pooler_output
        img_got = model.image_tokens(pixels)
    assert (got - want).abs().max() <= 1e-5
    assert (img_got - img_want).abs().max() <= 1e-5


def test_prepare_bart_preset_remaps_vocabulary(tmp_path):
    cfg = get_config("tiny-bart")
    florence = florence2_reference(cfg, seed=8)
    florence.save_pretrained(tmp_path / "florence2")
    gemma_tok = load_decoder_tokenizer(make_gemma_like_tokenizer(tmp_path / "gemma_tok"))
    bart_tok = load_encoder_tokenizer(make_bart_like_tokenizer(tmp_path / "bart_tok"))
    assert prepare_main(["--preset", "tiny-bart", "--florence2", str(tmp_path / "florence2"), "--out",
                         str(tmp_path / "init"), "--encoder-tokenizer", str(tmp_path / "bart_tok"),
                         "--decoder-tokenizer", str(tmp_path / "gemma_tok")]) == 0
    model = load_pretrained(tmp_path / "init")
    rows = florence.model.language_model.shared.weight.detach()
    table = model.decoder.embed_tokens.weight
    checked = 0
    for t in range(3, min(gemma_tok.vocab_size, cfg.decoder.vocab_size)):
        pieces = bart_tok.encode(gemma_tok.backend.id_to_token(t).replace("\u2581", " "))
        if pieces:
            assert torch.allclose(table[t], rows[pieces].mean(0), atol=1e-6), t
            checked += 1
    assert checked > 100
    assert torch.equal(table[gemma_tok.eos_id], rows[bart_tok.eos_id])
    # everything but the decoder table is Florence-2's own
    assert torch.equal(model.decoder.layers[0].fc1.weight, florence.model.language_model.decoder.layers[0].fc1.weight)
    # rows past the tokenizer's vocabulary take the mean of all Florence-2 rows
    wide = remap_embedding(rows, gemma_tok, bart_tok, gemma_tok.vocab_size + 10)
    assert torch.allclose(wide[gemma_tok.vocab_size:], rows.mean(0).expand(10, -1))
    assert torch.equal(wide[: cfg.decoder.vocab_size], table.detach())


def test_prepare_needs_its_inputs(tmp_path, capsys):
    florence2_reference(get_config("tiny"), seed=9).save_pretrained(tmp_path / "f2")
    # a usage error (florenz_fast.cli): one `error:` line and exit 2
    assert prepare_main(["--preset", "tiny", "--florence2", str(tmp_path / "f2"), "--out", str(tmp_path / "o")]) == 2
    assert "pass --gemma2 DIR" in capsys.readouterr().err
    assert prepare_main(["--preset", "tiny-bart", "--florence2", str(tmp_path / "f2"), "--out",
                         str(tmp_path / "o")]) == 2
    assert "--encoder-tokenizer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass --gemma2 DIR"):  # the library function itself raises
        prepare(get_config("tiny"), tmp_path / "f2")
    assert not (tmp_path / "o").exists()
