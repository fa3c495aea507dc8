"""Sequence packing: packed == padded (losses and gradients), collation layout, the greedy packer, the loader's
exact resume and rank sharding, and the efficiency accounting. CPU, fp32.

The examples come from a stand-in with the fields of florenz_fast.data.EncodedExample and a tiny deterministic
pipeline with state_dict/load_state_dict, so these tests do not depend on the data module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz
from florenz_fast.packing import Batch, ListPipeline, Loader, Packer, collate_packed, collate_padded
from florenz_fast.text import IGNORE_INDEX, shift_right

TOL = 1e-5


@dataclass(eq=False)  # identity: examples are compared by who they are
class Ex:  # the fields of florenz_fast.data.EncodedExample
    pixels: torch.Tensor
    prompt_ids: list[int]
    labels: list[int]
    key: str


def make_example(prompt_len: int, label_len: int, seed: int, image_size: int = 64, vocab: int = 512,
                 key: str | None = None) -> Ex:
    """[<s>=0, ..., </s>=2] prompt (a 1-token prompt is just [0]) and [bos=2, ..., eos=1] labels."""
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(3, vocab, (max(prompt_len - 2, 0),), generator=g).tolist()
    prompt = [0] if prompt_len == 1 else [0, *body, 2]
    text = torch.randint(3, vocab, (label_len - 2,), generator=g).tolist()
    return Ex(pixels=torch.randn(3, image_size, image_size, generator=g), prompt_ids=prompt,
              labels=[2, *text, 1], key=key or ("caption-en", "caption-de", "translation-fr")[seed % 3])


class ToyPipeline:
    """Infinite (or `n`-long) deterministic stream: example i depends only on (seed, i); state = {"index": i}."""

    def __init__(self, seed: int = 0, n: int | None = None, image_size: int = 8):
        self.seed, self.n, self.image_size, self.index = seed, n, image_size, 0

    def __iter__(self):
        return self

    def __next__(self) -> Ex:
        if self.n is not None and self.index >= self.n:
            raise StopIteration
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        # skewed lengths: mostly short, sometimes long (as captions vs detailed captions)
        long = torch.rand((), generator=g).item() < 0.2
        p = int(torch.randint(1, 40 if long else 12, (), generator=g))
        l_ = int(torch.randint(2, 60 if long else 16, (), generator=g))
        ex = make_example(p, l_, seed=self.seed * 1_000_003 + self.index, image_size=self.image_size)
        self.index += 1
        return ex

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["index"])


def _model(name: str) -> Florenz:
    torch.manual_seed(0)
    model = Florenz(get_config(name)).eval()  # eval: no dropout / drop-path, so both layouts see the same math
    with torch.no_grad():  # non-zero gates and norms: cross-attention must matter, or leakage would not show
        for n, p in model.named_parameters():
            if n.endswith("encoder_attn_gate") or "layernorm" in n or n.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def _assert_same_batch(a: Batch, b: Batch) -> None:
    assert a.keys == b.keys
    assert a.n_image_tokens == b.n_image_tokens
    for name in ("pixel_values", "input_ids", "decoder_input_ids", "labels", "attention_mask",
                 "decoder_attention_mask", "prompt_cu_seqlens", "decoder_cu_seqlens"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


# ---------------------------------------------------------------------------------- packed == padded

# prompt lengths include a 1-token prompt, label lengths a 2-token target; 13 labels pass the tiny Gemma
# preset's sliding window of 8
RAGGED = [(1, 2), (7, 13), (3, 5), (12, 9), (5, 2)]


def _losses_and_grads(model: Florenz, batch: Batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs())
    sums, counts = batch.per_sample_token_losses(out.logits)
    (sums.sum() / counts.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), sums.detach(), counts, grads


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-bart"])
def test_packed_and_padded_give_same_per_sample_losses_and_gradients(preset):
    model = _model(preset)
    n_img = model.cfg.num_image_tokens()
    examples = [make_example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    loss_pad, sums_pad, counts_pad, grads_pad = _losses_and_grads(model, collate_padded(examples, n_img))
    loss_pk, sums_pk, counts_pk, grads_pk = _losses_and_grads(model, collate_packed(examples, n_img))

    assert counts_pad.tolist() == counts_pk.tolist() == [l_ for _, l_ in RAGGED]
    # per-sample mean token loss, and the sums relative to their size (a 13-token sum is ~80 in fp32)
    assert ((sums_pad / counts_pad) - (sums_pk / counts_pk)).abs().max() <= TOL
    assert ((sums_pad - sums_pk).abs() / sums_pad.abs()).max() <= TOL
    assert abs(loss_pad.item() - loss_pk.item()) <= TOL
    assert abs(loss_pad.item() - (sums_pad.sum() / counts_pad.sum()).item()) <= TOL  # model loss = token mean

    assert grads_pad.keys() == grads_pk.keys()
    assert len(grads_pad) == len(list(model.parameters()))  # every parameter (vision tower included) got one
    worst = max((grads_pad[n] - grads_pk[n]).abs().max().item() for n in grads_pad)
    assert worst <= TOL, f"largest gradient difference {worst:.3g}"
    assert max(g.abs().max().item() for g in grads_pad.values()) > 1e-3  # gradients are not trivially zero


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny-bart"])
def test_packing_mistakes_would_be_caught(preset):
    """The equality above can fail: letting samples see each other moves the losses far beyond the tolerance.

    (Shifting the whole packed row instead of each sample would go unnoticed here: every label list ends with
    eos = 1, which is also the decoder start token, so the ids coincide. The per-sample shift is checked on
    the ids in test_collate_packed_layout.)
    """
    model = _model(preset)
    n_img = model.cfg.num_image_tokens()
    examples = [make_example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    good = collate_packed(examples, n_img)
    assert torch.equal(shift_right(good.labels), good.decoder_input_ids)  # the coincidence described above

    def losses(batch):
        with torch.no_grad():
            return batch.per_sample_token_losses(model(**batch.model_inputs()).logits)[0]

    ref = losses(good)
    # 1. off by one in the decoder bounds: sample 2's first token joins sample 1's segment
    cu = good.decoder_cu_seqlens.clone()
    cu[2] += 1
    assert (losses(Batch(**{**good.__dict__, "decoder_cu_seqlens": cu})) - ref).abs().max() > 1e-3
    # 2. one encoder segment holding every prompt: cross-attention reads other samples' prompts
    cu = torch.zeros_like(good.prompt_cu_seqlens)
    cu[-1] = good.prompt_cu_seqlens[-1]
    assert (losses(Batch(**{**good.__dict__, "prompt_cu_seqlens": cu})) - ref).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "tiny-bart"])
def test_packed_and_padded_agree_on_cuda_after_pinned_transfer(preset):
    """Batch.pin_memory().to("cuda", non_blocking=True): cu_seqlens on the device, same losses and gradients."""
    model = _model(preset).cuda()
    n_img = model.cfg.num_image_tokens()
    examples = [make_example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    got = {}
    for name, collate in (("padded", collate_padded), ("packed", collate_packed)):
        batch = collate(examples, n_img).pin_memory().to("cuda", non_blocking=True)
        assert batch.input_ids.is_cuda and (batch.prompt_cu_seqlens is None or batch.prompt_cu_seqlens.is_cuda)
        got[name] = _losses_and_grads(model, batch)
    (_, s_pad, c_pad, g_pad), (_, s_pk, c_pk, g_pk) = got["padded"], got["packed"]
    assert ((s_pad / c_pad) - (s_pk / c_pk)).abs().max() <= TOL
    assert max((g_pad[n] - g_pk[n]).abs().max().item() for n in g_pad) <= TOL


# ---------------------------------------------------------------------------------------- collation

def test_collate_packed_layout():
    examples = [make_example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    b = collate_packed(examples, n_image_tokens=5)
    plen = [len(e.prompt_ids) for e in examples]
    llen = [len(e.labels) for e in examples]
    assert plen[0] == 1 and min(llen) == 2
    assert b.prompt_cu_seqlens.dtype == b.decoder_cu_seqlens.dtype == torch.int32
    assert b.prompt_cu_seqlens.tolist() == [0, 1, 8, 11, 23, 28]
    assert b.decoder_cu_seqlens.tolist() == [0, 2, 15, 20, 29, 31]
    assert b.input_ids.shape == (1, sum(plen)) and b.labels.shape == b.decoder_input_ids.shape == (1, sum(llen))
    assert b.input_ids[0].tolist() == sum((e.prompt_ids for e in examples), [])
    assert b.labels[0].tolist() == sum((e.labels for e in examples), [])
    cu = b.decoder_cu_seqlens.tolist()
    for i, e in enumerate(examples):
        seg = b.decoder_input_ids[0, cu[i]:cu[i + 1]].tolist()
        assert seg == shift_right(e.labels)
        assert seg[0] == 1  # the start token, never the previous sample's last label
    assert b.pixel_values.shape == (5, 3, 64, 64) and torch.equal(b.pixel_values[3], examples[3].pixels)
    assert b.keys == [e.key for e in examples]
    assert b.attention_mask is None and b.decoder_attention_mask is None
    assert set(b.model_inputs()) == {"pixel_values", "input_ids", "decoder_input_ids", "labels",
                                     "prompt_cu_seqlens", "decoder_cu_seqlens"}


def test_collate_padded_layout():
    examples = [make_example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    b = collate_padded(examples, n_image_tokens=5)
    assert b.input_ids.shape == (5, 12) and b.labels.shape == b.decoder_input_ids.shape == (5, 13)
    for i, e in enumerate(examples):
        p, l_ = len(e.prompt_ids), len(e.labels)
        assert b.input_ids[i].tolist() == e.prompt_ids + [1] * (12 - p)  # encoder pad 1
        assert b.attention_mask[i].tolist() == [True] * p + [False] * (12 - p)
        assert b.labels[i].tolist() == e.labels + [IGNORE_INDEX] * (13 - l_)
        assert b.decoder_attention_mask[i].tolist() == [True] * l_ + [False] * (13 - l_)
        assert b.decoder_input_ids[i, :l_].tolist() == shift_right(e.labels)
        assert (b.decoder_input_ids[i, l_ + 1:] == 0).all()  # decoder pad 0 after the (masked) eos input
    assert b.prompt_cu_seqlens is None and b.decoder_cu_seqlens is None
    assert set(b.model_inputs()) == {"pixel_values", "input_ids", "decoder_input_ids", "labels",
                                     "attention_mask", "decoder_attention_mask"}


def test_collate_rejects_bad_examples():
    good = make_example(3, 4, 0)
    with pytest.raises(ValueError, match="empty"):
        collate_packed([], 5)
    with pytest.raises(ValueError, match="prompt ids"):
        collate_padded([good, Ex(good.pixels, [], [2, 1], "caption-en")], 5)
    with pytest.raises(ValueError, match="pixels"):
        collate_packed([good, make_example(3, 4, 1, image_size=32)], 5)


def test_batch_token_counts_and_loss_by_key():
    examples = [make_example(3, 4, 0, key="a"), make_example(1, 2, 1, key="b"), make_example(6, 9, 2, key="a")]
    for b in (collate_padded(examples, 5), collate_packed(examples, 5)):
        assert b.num_samples == 3 and b.num_target_tokens == b.num_decoder_tokens == 15
        assert b.num_prompt_tokens == 10 and b.num_encoder_tokens == 25
        logits = torch.randn(*b.labels.shape, 512)
        sums, counts = b.per_sample_token_losses(logits)
        by_key = b.loss_by_key(logits)
        assert counts.tolist() == [4, 2, 9]
        assert by_key.keys() == {"a", "b"} and by_key["a"][1] == 13 and by_key["b"][1] == 2
        assert by_key["a"][0] == pytest.approx(sums[0].item() + sums[2].item(), rel=1e-6)
    padded, packed = collate_padded(examples, 5), collate_packed(examples, 5)
    assert (padded.allocated_encoder_tokens, padded.allocated_decoder_tokens) == (3 * (5 + 6), 3 * 9)
    assert (packed.allocated_encoder_tokens, packed.allocated_decoder_tokens) == (25, 15)
    moved = packed.to("cpu")
    _assert_same_batch(moved, packed)


# --------------------------------------------------------------------------------------------- Packer

def _sized(sizes):
    """Examples with (prompt length, label length); n_image_tokens is added by the packer."""
    return [make_example(p, l_, seed=i, image_size=4) for i, (p, l_) in enumerate(sizes)]


def test_packer_greedy_budgets_and_overflow():
    # with 4 image tokens: encoder sizes 9 7 13 5 10 14 8, decoder sizes 6 10 3 8 2 9 4
    sizes = [(5, 6), (3, 10), (9, 3), (1, 8), (6, 2), (10, 9), (4, 4)]
    examples = _sized(sizes)
    packer = Packer(n_image_tokens=4, max_encoder_tokens=30, max_decoder_tokens=20)
    batches = list(packer.pack(examples))
    # [9+7+13=29 | 6+10+3=19], then 5: 29+5 > 30 on the encoder side opens batch 2;
    # [5+10+14=29 | 8+2+9=19], then 8: 29+8 > 30 opens batch 3
    assert [[examples.index(e) for e in b] for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    # the decoder side alone can close a batch too
    batches = list(Packer(4, 1000, 16).pack(examples))
    assert [[examples.index(e) for e in b] for b in batches] == [[0, 1], [2, 3, 4], [5, 6]]
    # and the sample cap
    batches = list(Packer(4, 1000, 1000, max_samples=3).pack(examples))
    assert [len(b) for b in batches] == [3, 3, 1]


def test_packer_invariants_on_a_stream():
    packer = Packer(n_image_tokens=5, max_encoder_tokens=80, max_decoder_tokens=64, max_samples=6)
    stream = ToyPipeline(seed=3, n=300)
    examples = list(stream)
    batches = list(packer.pack(examples))
    assert [e for b in batches for e in b] == examples  # order kept, nothing dropped or repeated
    for b, nxt in zip(batches, batches[1:] + [None]):
        enc = sum(packer.sizes(e)[0] for e in b)
        dec = sum(packer.sizes(e)[1] for e in b)
        assert enc <= 80 and dec <= 64 and len(b) <= 6
        if nxt is not None:  # greedy: the example that opens the next batch did not fit into this one
            e0, d0 = packer.sizes(nxt[0])
            assert enc + e0 > 80 or dec + d0 > 64 or len(b) == 6


def test_packer_rejects_an_example_over_budget():
    packer = Packer(n_image_tokens=4, max_encoder_tokens=20, max_decoder_tokens=10)
    with pytest.raises(ValueError, match=r"22 encoder tokens \(4 image \+ 18 prompt\) and 3 decoder"):
        list(packer.pack(_sized([(2, 2), (18, 3)])))
    with pytest.raises(ValueError, match="11 decoder tokens"):
        list(packer.pack(_sized([(2, 11)])))
    with pytest.raises(ValueError, match="no room"):
        Packer(n_image_tokens=50, max_encoder_tokens=50, max_decoder_tokens=10)


# --------------------------------------------------------------------------------------------- Loader

LOADERS = {
    "packed": dict(mode="packed", n_image_tokens=5, max_encoder_tokens=90, max_decoder_tokens=70),
    "packed-capped": dict(mode="packed", n_image_tokens=5, max_encoder_tokens=200, max_decoder_tokens=200,
                          max_samples=4),
    "padded": dict(mode="padded", n_image_tokens=5, batch_size=3),
}


def _take(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("kind", list(LOADERS))
@pytest.mark.parametrize("world", [1, 2])
def test_loader_resume_reproduces_the_following_batches(kind, world):
    for rank in range(world):
        ref = Loader(ToyPipeline(seed=1), **LOADERS[kind], rank=rank, world=world)
        _take(ref, 5)
        state = json.loads(json.dumps(ref.state_dict()))  # JSON round trip, as a checkpoint would store it
        following = _take(ref, 6)
        resumed = Loader(ToyPipeline(seed=1), **LOADERS[kind], rank=rank, world=world)
        resumed.load_state_dict(state)
        for a, b in zip(following, _take(resumed, 6)):
            _assert_same_batch(a, b)
        assert resumed.efficiency() == ref.efficiency()  # counters resume too


def test_loader_resume_carries_the_overflow_example():
    """The state is taken before the example that overflowed the last batch, so that example is not lost."""
    ref = Loader(ToyPipeline(seed=2), **LOADERS["packed"])
    _take(ref, 3)
    assert ref._pending is not None  # an example was read and held over for the next batch
    read_so_far = ref.pipeline.index
    state = ref.state_dict()
    assert state["pipeline"]["index"] == read_so_far - 1
    nxt = next(ref)
    resumed = Loader(ToyPipeline(seed=2), **LOADERS["packed"])
    resumed.load_state_dict(state)
    _assert_same_batch(nxt, next(resumed))


def test_loader_rejects_a_state_from_another_configuration():
    state = Loader(ToyPipeline(), **LOADERS["packed"]).state_dict()
    other = Loader(ToyPipeline(), **{**LOADERS["packed"], "max_decoder_tokens": 71})
    with pytest.raises(ValueError, match="batch sequence would differ"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a loader state"):
        other.load_state_dict({"index": 3})


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_rank_sharding_partitions_the_global_sequence(kind):
    world, rounds = 3, 4
    glob = _take(Loader(ToyPipeline(seed=5), **LOADERS[kind]), world * rounds)
    ranks = [Loader(ToyPipeline(seed=5), **LOADERS[kind], rank=r, world=world) for r in range(world)]
    per_rank = [_take(loader, rounds) for loader in ranks]
    for r in range(world):
        for a, b in zip(per_rank[r], glob[r::world]):
            _assert_same_batch(a, b)
    # all ranks stop at the same round boundary with the same state, so one checkpoint fits all
    states = [loader.state_dict() for loader in ranks]
    assert all(s["pipeline"] == states[0]["pipeline"] for s in states)
    assert states[0]["next_global_batch"] == world * rounds
    # resuming the global sequence with a different world size continues it exactly
    single = Loader(ToyPipeline(seed=5), **LOADERS[kind])
    single.load_state_dict(states[0])
    cont = Loader(ToyPipeline(seed=5), **LOADERS[kind])
    _take(cont, world * rounds)
    _assert_same_batch(next(single), next(cont))


def test_finite_pipeline_keeps_the_last_batch_but_drops_an_incomplete_round():
    # 10 examples, 3 per padded batch: global batches of 3, 3, 3, 1
    assert [b.num_samples for b in Loader(ToyPipeline(n=10), **LOADERS["padded"])] == [3, 3, 3, 1]
    # world 3: one full round (3 batches), then a round with only 1 batch is dropped on every rank
    for r in range(3):
        assert len(list(Loader(ToyPipeline(n=10), **LOADERS["padded"], rank=r, world=3))) == 1


# ----------------------------------------------------------------------------------------- efficiency

def test_efficiency_on_a_hand_example():
    # 5 image tokens; prompts 3, 1, 6, 2 and labels 4, 2, 9, 5
    # encoder sizes 8, 6, 11, 7 (real 32); decoder sizes 4, 2, 9, 5 (real 20)
    examples = _sized([(3, 4), (1, 2), (6, 9), (2, 5)])
    padded = Loader(ListPipeline(examples), mode="padded", n_image_tokens=5, batch_size=3)
    assert [b.num_samples for b in padded] == [3, 1]
    eff = padded.efficiency()
    # batch 1: encoder 3 * (5 + 6) = 33 allocated for 25 real, decoder 3 * 9 = 27 for 15;
    # batch 2: 7 for 7 and 5 for 5
    assert eff["batches"] == 2 and eff["samples"] == 4
    assert eff["encoder"] == {"real": 32, "allocated": 40, "efficiency": 32 / 40}
    assert eff["decoder"] == {"real": 20, "allocated": 32, "efficiency": 20 / 32}

    packed = Loader(ListPipeline(examples), mode="packed", n_image_tokens=5, max_encoder_tokens=20,
                    max_decoder_tokens=16)
    # 8 + 6 = 14, + 11 > 20 -> [0, 1]; 11 + 7 = 18 <= 20 and 9 + 5 = 14 <= 16 -> [2, 3]
    assert [b.num_samples for b in packed] == [2, 2]
    eff = packed.efficiency()
    assert eff["encoder"] == {"real": 32, "allocated": 32, "efficiency": 1.0, "budget": 40, "fill": 32 / 40}
    assert eff["decoder"] == {"real": 20, "allocated": 20, "efficiency": 1.0, "budget": 32, "fill": 20 / 32}


# ------------------------------------------------------------------------- with the real data pipeline

def test_loader_over_the_data_pipeline_resumes_exactly(tmp_path):
    """The same resume guarantee over florenz_fast.data.DataPipeline (an iterable whose iterator continues
    from its current state), packed and padded, across epochs of a 12-record set."""
    from florenz_fast.data import DataPipeline, build_synthetic_tokenizers, synthetic_records

    records = synthetic_records(12, seed=0, image_size=16)
    enc_tok, dec_tok = build_synthetic_tokenizers(tmp_path, records, vocab_size=512)

    def pipeline():
        return DataPipeline(records, enc_tok, dec_tok, image_size=16, seed=0)

    for kw in (dict(mode="packed", max_encoder_tokens=160, max_decoder_tokens=120),
               dict(mode="padded", batch_size=5)):
        ref = Loader(pipeline(), n_image_tokens=5, **kw, rank=1, world=2)
        _take(ref, 3)
        state = json.loads(json.dumps(ref.state_dict()))
        following = _take(ref, 4)
        resumed = Loader(pipeline(), n_image_tokens=5, **kw, rank=1, world=2)
        resumed.load_state_dict(state)
        for a, b in zip(following, _take(resumed, 4)):
            _assert_same_batch(a, b)
        assert ref.pipeline.epoch > state["pipeline"]["epoch"]  # the resumed stretch crossed an epoch boundary
