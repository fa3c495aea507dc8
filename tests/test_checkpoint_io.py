"""Tests for florenz_fast.checkpoint: save/open/load round trips, sharding, ties, atomicity, errors, laziness."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import florenz_fast.checkpoint as ckpt_mod
from florenz_fast.checkpoint import CheckpointError, LoadResult, load_into, open_checkpoint, save_state_dict


class Tiny(nn.Module):
    """Embedding tied to the output head, a norm, and an integer buffer."""

    def __init__(self, vocab: int = 11, dim: int = 6, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.arange(7))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "w.fp16": torch.randn(4, generator=g).to(torch.float16),
        "w.fp32": torch.randn(2, 3, 4, generator=g),
        "ids.int64": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "mask.bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(3, 5, generator=g).t(),  # non-contiguous
    }


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_single_file(tmp_path: Path) -> None:
    sd = _mixed_state()
    written = save_state_dict(sd, tmp_path / "ck", metadata={"step": "12"})
    assert written == [tmp_path / "ck" / "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors"]
    ck = open_checkpoint(tmp_path / "ck")
    assert set(ck.keys()) == set(sd) and len(ck) == len(sd)
    assert ck.files == [tmp_path / "ck" / "model.safetensors"]
    assert ck.metadata == {"step": "12"}
    for k, v in sd.items():
        _assert_same(ck[k], v)
        assert ck.shape(k) == v.shape and ck.dtype(k) == v.dtype
    with safe_open(str(written[0]), framework="pt") as f:  # transformers requires format=pt in the header
        assert f.metadata()["format"] == "pt"
    # The explicit file path opens the same checkpoint.
    _assert_same(open_checkpoint(written[0])["w.bf16"], sd["w.bf16"])


def test_save_rejects_bad_metadata(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="metadata"):
        save_state_dict({"a": torch.ones(1)}, tmp_path / "x", metadata={"step": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="reserved"):
        save_state_dict({"a": torch.ones(1)}, tmp_path / "x", metadata={"tied": "{}"})
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ sharding


def test_sharding_writes_index_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars = []
    real_tqdm = ckpt_mod.tqdm
    monkeypatch.setattr(ckpt_mod, "tqdm", lambda *a, **kw: bars.append(kw) or real_tqdm(*a, **kw))
    sd = {f"layer{i}.w": torch.full((16,), float(i)) for i in range(5)}  # 64 bytes each
    sd["big"] = torch.arange(100, dtype=torch.float64)  # 800 bytes > limit: gets a shard of its own
    written = save_state_dict(sd, tmp_path / "ck", max_shard_bytes=130)
    names = [p.name for p in written]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["model.safetensors.index.json"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(names)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 + 800
    assert index["weight_map"]["big"] == "model-00004-of-00004.safetensors"
    assert index["weight_map"]["layer0.w"] == index["weight_map"]["layer1.w"] == "model-00001-of-00004.safetensors"
    assert bars and bars[-1]["disable"] is None  # a progress bar over shards, hidden when not a tty

    for opened in (open_checkpoint(tmp_path / "ck"), open_checkpoint(tmp_path / "ck" / "model.safetensors.index.json")):
        assert len(opened.files) == 4 and set(opened.keys()) == set(sd)
        for k, v in sd.items():
            _assert_same(opened[k], v)


def test_single_shard_has_no_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bars = []
    real_tqdm = ckpt_mod.tqdm
    monkeypatch.setattr(ckpt_mod, "tqdm", lambda *a, **kw: bars.append(kw) or real_tqdm(*a, **kw))
    save_state_dict({"a": torch.ones(3)}, tmp_path / "ck")
    assert [kw["disable"] for kw in bars] == [True]


def test_hf_style_shards_without_index(tmp_path: Path) -> None:
    sd = {f"k{i}": torch.randn(8) for i in range(4)}
    save_state_dict(sd, tmp_path / "ck", max_shard_bytes=64)
    (tmp_path / "ck" / "model.safetensors.index.json").unlink()
    ck = open_checkpoint(tmp_path / "ck")
    assert [f.name for f in ck.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for k, v in sd.items():
        _assert_same(ck[k], v)


def test_duplicate_key_across_unindexed_shards_is_an_error(tmp_path: Path) -> None:
    save_state_dict({"a": torch.ones(2)}, tmp_path / "ck", filename_prefix="one")
    save_state_dict({"a": torch.zeros(2)}, tmp_path / "ck", filename_prefix="two")
    with pytest.raises(CheckpointError, match=r"'a'.*one\.safetensors.*two\.safetensors"):
        open_checkpoint(tmp_path / "ck")


# ------------------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("max_shard_bytes", [2**30, 200])
def test_tied_tensors_saved_once_restored_under_both_names(tmp_path: Path, max_shard_bytes: int) -> None:
    model = Tiny()
    sd = model.state_dict()
    assert sd["embed.weight"].data_ptr() == sd["head.weight"].data_ptr()
    written = save_state_dict(sd, tmp_path / "ck", max_shard_bytes=max_shard_bytes)
    on_disk = []
    for f in written:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                on_disk += list(h.keys())
    assert sorted(on_disk) == sorted(k for k in sd if k != "head.weight")  # "embed" < "head": embed is kept
    if len(written) > 1:
        index = json.loads(written[-1].read_text())
        assert index["metadata"]["florenz_fast.tied"] == {"head.weight": "embed.weight"}
        assert "head.weight" not in index["weight_map"]

    ck = open_checkpoint(tmp_path / "ck")
    assert "head.weight" in ck and set(ck.keys()) == set(sd)
    _assert_same(ck["head.weight"], sd["embed.weight"])
    assert ck.shape("head.weight") == sd["head.weight"].shape

    fresh = Tiny(tie=False)  # untied target: both names are filled from the single stored tensor
    load_into(fresh, ck)
    _assert_same(fresh.head.weight.data, model.embed.weight.data)
    _assert_same(fresh.embed.weight.data, model.embed.weight.data)


def test_overlapping_views_that_are_not_ties_are_saved_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    sd = {"whole": base, "view": base.view(3, 4)[1:], "same": base}
    save_state_dict(sd, tmp_path / "ck")
    ck = open_checkpoint(tmp_path / "ck")
    with safe_open(str(ck.files[0]), framework="pt") as h:
        assert sorted(h.keys()) == ["same", "view"]
        assert json.loads(h.metadata()["florenz_fast.tied"]) == {"whole": "same"}
    for k, v in sd.items():
        _assert_same(ck[k], v)


# ------------------------------------------------------------------------------------------ atomicity


def test_non_tensor_value_raises_and_leaves_existing_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    save_state_dict({"a": torch.ones(3)}, out)
    before = _snapshot(out)
    with pytest.raises(TypeError, match=r"'b\.step'"):
        save_state_dict({"a": torch.zeros(3), "b.step": 7}, out)  # type: ignore[dict-item]
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dir left behind
    with pytest.raises(TypeError, match="'new'"):
        save_state_dict({"new": [1.0]}, tmp_path / "fresh")  # type: ignore[dict-item]
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("target_exists", [True, False])
def test_writer_failure_midway_leaves_no_partial_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target_exists: bool
) -> None:
    out = tmp_path / "ck"
    old = {f"k{i}": torch.full((8,), -1.0) for i in range(4)}
    if target_exists:
        save_state_dict(old, out, max_shard_bytes=64)
    before = _snapshot(out) if target_exists else None
    real_write = ckpt_mod._write_shard
    calls = []

    def failing_write(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(tensors, path, header)

    monkeypatch.setattr(ckpt_mod, "_write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({f"k{i}": torch.full((8,), float(i)) for i in range(4)}, out, max_shard_bytes=32)
    assert len(calls) == 2 and calls[0].name == "model-00001-of-00004.safetensors"  # one shard had been written
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ck"] if target_exists else [])
    if target_exists:
        assert _snapshot(out) == before
        ck = open_checkpoint(out)
        for k, v in old.items():
            _assert_same(ck[k], v)


def test_overwrite_replaces_layout_and_removes_stale_shards(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    save_state_dict({f"k{i}": torch.randn(8) for i in range(4)}, out, max_shard_bytes=64)
    (out / "config.json").write_text("{}")  # not ours: must survive
    new = {"only": torch.arange(3)}
    save_state_dict(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ck = open_checkpoint(out)
    assert list(ck.keys()) == ["only"]
    _assert_same(ck["only"], new["only"])


# ------------------------------------------------------------------------------------------ corrupt inputs


def test_random_bytes_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(os.urandom(4096))
    for p in (bad, tmp_path):
        with pytest.raises(CheckpointError, match=str(bad)):
            open_checkpoint(p)


def test_truncated_file(tmp_path: Path) -> None:
    (path,) = save_state_dict({"a": torch.randn(64, 64), "b": torch.randn(10)}, tmp_path / "ck")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(path)
    path.write_bytes(data[:5])  # shorter than the 8-byte header length
    with pytest.raises(CheckpointError, match=str(path)):
        open_checkpoint(tmp_path / "ck")


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        open_checkpoint(tmp_path / "empty")


def test_index_referencing_missing_shard(tmp_path: Path) -> None:
    save_state_dict({f"k{i}": torch.randn(8) for i in range(4)}, tmp_path / "ck", max_shard_bytes=64)
    (tmp_path / "ck" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00002"):
        open_checkpoint(tmp_path / "ck")


def test_index_mapping_key_to_wrong_shard(tmp_path: Path) -> None:
    save_state_dict({f"k{i}": torch.randn(8) for i in range(4)}, tmp_path / "ck", max_shard_bytes=64)
    index_path = tmp_path / "ck" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["k0"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'k0'.*model-00002-of-00002"):
        open_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": {"a": 3}}', '{"metadata": {}}'])
def test_malformed_index(tmp_path: Path, text: str) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(CheckpointError, match=r"malformed.*model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------ load_into


def _saved_tiny(tmp_path: Path, **kw: object) -> tuple[Tiny, Path]:
    torch.manual_seed(1)
    model = Tiny(**kw)  # type: ignore[arg-type]
    (path,) = save_state_dict(model.state_dict(), tmp_path / "ck")
    return model, path


def test_load_into_module_in_place(tmp_path: Path) -> None:
    src, path = _saved_tiny(tmp_path)
    torch.manual_seed(2)
    dst = Tiny()
    param = dst.embed.weight
    result = load_into(dst, open_checkpoint(path))
    assert result == LoadResult([], [])
    assert dst.embed.weight is param and dst.head.weight is param  # in place: identity and tie kept
    for k, v in src.state_dict().items():
        _assert_same(dst.state_dict()[k], v)


def test_missing_unexpected_misshaped_all_reported_at_once(tmp_path: Path) -> None:
    _, path = _saved_tiny(tmp_path)
    ck = open_checkpoint(path)
    dst = Tiny(vocab=13)  # embed/head shapes differ
    dst.extra = nn.Linear(2, 2)  # missing in the checkpoint
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_into(dst, ck, rename=lambda k: None if k == "positions" else k.replace("norm.", "ln."))
    msg = str(info.value)
    assert str(path) in msg
    missing, rest = msg.split("unexpected keys")
    unexpected, misshaped = rest.split("mis-shaped keys")
    assert "missing keys (5)" in missing and all(
        f"    {k}\n" in missing for k in ["extra.weight", "extra.bias", "norm.weight", "norm.bias", "positions"]
    )
    assert unexpected.startswith(" (2)")
    assert "norm.bias -> ln.bias\n" in unexpected and "norm.weight -> ln.weight\n" in unexpected
    assert misshaped.startswith(" (2)")
    assert "embed.weight: checkpoint (11, 6) vs Tiny (13, 6)" in msg
    assert "head.weight: checkpoint (11, 6) vs Tiny (13, 6)" in msg
    for k, v in dst.state_dict().items():  # validation happens before any copy
        _assert_same(v, before[k])


def test_long_key_lists_are_truncated(tmp_path: Path) -> None:
    (path,) = save_state_dict({f"p{i:02d}": torch.zeros(1) for i in range(25)}, tmp_path / "ck")
    with pytest.raises(CheckpointError) as info:
        load_into({}, open_checkpoint(path))
    msg = str(info.value)
    assert "unexpected keys (25)" in msg and "p19" in msg and "p20" not in msg and "... and 5 more" in msg


def test_non_strict_returns_missing_and_unexpected_but_shape_still_raises(tmp_path: Path) -> None:
    src, path = _saved_tiny(tmp_path)
    ck = open_checkpoint(path)
    dst = Tiny()
    dst.extra = nn.Linear(2, 2)
    result = load_into(dst, ck, strict=False, rename=lambda k: "pos" if k == "positions" else k)
    assert result.missing_keys == ["extra.bias", "extra.weight", "positions"]
    assert result.unexpected_keys == ["positions"]
    _assert_same(dst.norm.weight.data, src.norm.weight.data)
    with pytest.raises(CheckpointError, match=r"norm\.weight: checkpoint \(6,\) vs dict \(5,\)"):
        load_into({"norm.weight": torch.zeros(5)}, ck, strict=False)


def test_rename_collision(tmp_path: Path) -> None:
    ck = {"a": torch.zeros(1), "b": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="'a' and 'b' both map to 'x'"):
        load_into({"x": torch.zeros(1)}, ck, rename=lambda k: "x")


def test_dtype_cast_and_device_placement(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = Tiny().to(torch.bfloat16)
    (path,) = save_state_dict(src.state_dict(), tmp_path / "ck")
    ck = open_checkpoint(path)
    assert ck.dtype("embed.weight") == torch.bfloat16 and ck.dtype("positions") == torch.int64

    fp32 = Tiny()  # default: cast to the target's dtype, in place
    load_into(fp32, ck, device="cpu")
    assert fp32.embed.weight.dtype == torch.float32
    _assert_same(fp32.embed.weight.data, src.embed.weight.data.float())

    half = Tiny()  # explicit dtype: floating tensors become fp16, the int64 buffer stays int64
    load_into(half, ck, dtype=torch.float16, device=torch.device("cpu"))
    assert half.embed.weight.dtype == torch.float16 and half.embed.weight.device.type == "cpu"
    assert isinstance(half.embed.weight, nn.Parameter) and half.embed.weight.requires_grad
    assert half.head.weight is half.embed.weight  # tie survives replacement
    assert half.positions.dtype == torch.int64
    _assert_same(half.norm.bias.data, src.norm.bias.data.half())


def test_meta_device_materialisation(tmp_path: Path) -> None:
    src, path = _saved_tiny(tmp_path)
    with torch.device("meta"):
        dst = Tiny()
    dst.norm.weight.requires_grad_(False)
    ck = open_checkpoint(path)
    load_into(dst, ck)
    assert all(t.device.type == "cpu" for k, t in dst.state_dict().items())
    assert dst.scratch.device.type == "meta"  # non-persistent: not in any checkpoint, left to the model
    assert dst.head.weight is dst.embed.weight
    assert dst.embed.weight.requires_grad and not dst.norm.weight.requires_grad
    for k, v in src.state_dict().items():
        _assert_same(dst.state_dict()[k], v)
    # The loaded weights are private copies, not views of the mapping that later reads of `ck` share.
    dst.norm.bias.data.add_(1)
    _assert_same(ck["norm.bias"], src.norm.bias.data)


def test_load_into_state_dict_target(tmp_path: Path) -> None:
    target = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.empty(3, device="meta")}
    a_before = target["a"]
    load_into(target, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3, 4, 5], dtype=torch.int32)})
    assert target["a"] is a_before and target["a"].tolist() == [1.0, 2.0]
    assert target["b"].device.type == "cpu" and target["b"].dtype == torch.float32 and target["b"].tolist() == [3, 4, 5]


@pytest.mark.gpu
def test_cuda_save_and_load(tmp_path: Path) -> None:
    src, path = _saved_tiny(tmp_path)
    save_state_dict({k: v.cuda() for k, v in src.state_dict().items()}, tmp_path / "from_cuda")
    ck = open_checkpoint(tmp_path / "from_cuda")
    _assert_same(ck["embed.weight"], src.embed.weight.data)
    with torch.device("meta"):
        dst = Tiny()
    load_into(dst, ck, device="cuda", dtype=torch.bfloat16)
    assert dst.embed.weight.device.type == "cuda" and dst.embed.weight.dtype == torch.bfloat16
    assert dst.head.weight is dst.embed.weight and dst.positions.dtype == torch.int64
    _assert_same(dst.embed.weight.data.cpu(), src.embed.weight.data.bfloat16())


# ------------------------------------------------------------------------------------------ laziness


class _CountingHandle:
    """Wraps a safe_open handle and counts tensor reads."""

    def __init__(self, handle: object, reads: list[str]) -> None:
        self._handle, self._reads = handle, reads

    def get_tensor(self, key: str) -> torch.Tensor:
        self._reads.append(key)
        return self._handle.get_tensor(key)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._handle, name)


def test_metadata_queries_read_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = _saved_tiny(tmp_path)
    reads: list[str] = []
    real_open = ckpt_mod.safe_open
    monkeypatch.setattr(ckpt_mod, "safe_open", lambda *a, **kw: _CountingHandle(real_open(*a, **kw), reads))
    ck = open_checkpoint(path)
    assert ck.shape("embed.weight") == (11, 6) and ck.dtype("norm.bias") == torch.float32
    assert "head.weight" in ck and "nope" not in ck and len(ck) == 5 and "positions" in list(ck.keys())
    assert reads == []
    with pytest.raises(CheckpointError):  # a failed validation reads nothing either
        load_into(Tiny(dim=5), ck)
    assert reads == []
    ck["norm.bias"]
    assert reads == ["norm.bias"]
    load_into(Tiny(), ck)  # one read per stored tensor; the tied alias is copied once
    assert sorted(reads[1:]) == ["embed.weight", "norm.bias", "norm.weight", "positions"]
