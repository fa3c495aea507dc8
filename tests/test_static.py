"""Static packed batches and the step without the host in the loop (issue 15, DESIGN.md 13): static == packed
(losses and gradients, 1e-5 fp32), identical shapes across batches, zero-length segments, the checks at
collation, and a guard under which any device->host read inside forward, loss and backward raises. CPU, fp32.
"""

from __future__ import annotations

import pytest
import torch

from florenz_fast import ops
from florenz_fast.config import get_config
from florenz_fast.data import EncodedExample
from florenz_fast.florenz import Florenz
from florenz_fast.packing import (
    Batch,
    InputLimits,
    ListPipeline,
    Loader,
    collate,
    collate_packed,
    collate_static,
    static_pad_segments,
)
from tests.helpers.sync_guard import DeviceHostRead, no_device_host_reads

TOL = 1e-5


def example(prompt_len: int, label_len: int, seed: int, image_size: int = 64, vocab: int = 512) -> EncodedExample:
    g = torch.Generator().manual_seed(seed)
    prompt = [0, *torch.randint(3, vocab, (max(prompt_len - 2, 0),), generator=g).tolist(), 2][:prompt_len]
    labels = [2, *torch.randint(3, vocab, (label_len - 2,), generator=g).tolist(), 1]
    return EncodedExample(torch.randn(3, image_size, image_size, generator=g), prompt, labels,
                          ("caption-en", "caption-de", "translate-fr")[seed % 3])


def model_for(name: str) -> Florenz:
    torch.manual_seed(0)
    model = Florenz(get_config(name)).eval()  # no dropout: both layouts see the same math
    with torch.no_grad():  # non-zero gates and norms: cross-attention must matter, or leakage would not show
        for n, p in model.named_parameters():
            if n.endswith("encoder_attn_gate") or "layernorm" in n or n.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


# 13 labels pass the tiny Gemma preset's sliding window of 8; a 1-token prompt and a 2-token target
RAGGED = [(1, 2), (7, 13), (3, 5), (12, 9), (5, 2)]
BOUNDS = dict(max_samples=8, max_encoder_tokens=160, max_decoder_tokens=48)  # 3 zero-length slots for RAGGED


def segment_bounds(n_img: int) -> dict[str, int]:
    """The longest RAGGED sample on each side: max_seqlen_k/q become these, the pad splits into P chunks."""
    return dict(max_segment_encoder=n_img + max(p for p, _ in RAGGED), max_segment_decoder=max(l_ for _, l_ in RAGGED))


def _losses_and_grads(model: Florenz, batch: Batch, host_layout: bool):
    model.zero_grad(set_to_none=True)
    out = model(**batch.model_inputs(host_layout=host_layout), return_logits=False)
    sums, counts = batch.per_sample_sums(out.token_losses)
    (sums.sum() / counts.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), sums.detach(), counts, grads


@pytest.mark.parametrize("preset,bounded,backend", [("tiny", False, None), ("tiny-bart", False, None),
                                                    ("tiny", True, None), ("tiny-bart", True, None),
                                                    ("tiny", True, "dense"), ("tiny", False, "dense")])
def test_static_equals_packed_losses_and_gradients(preset, bounded, backend):
    """`bounded`: segment bounds, so max_seqlen is the longest sample and the pad is several segments; `dense`
    (ops' backend that pads every segment to max_seqlen) is the kernel for which that matters."""
    model = model_for(preset)
    n_img = model.cfg.num_image_tokens()
    examples = [example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    packed = collate_packed(examples, n_img)
    static = collate_static(examples, n_img, **BOUNDS, **(segment_bounds(n_img) if bounded else {}))
    P = static.num_slots - BOUNDS["max_samples"]
    if bounded:
        assert (static.max_seqlen_k, static.max_seqlen_q) == tuple(segment_bounds(n_img).values())
        assert P > 1
    else:
        assert P == 1
    assert static.num_slots > len(examples) + P  # zero-length segments exist
    if backend is not None:
        ops.set_backend(backend)
    try:
        _static_equals_packed(model, packed, static)
    finally:
        ops.set_backend(None)


def _static_equals_packed(model, packed, static):
    loss_pk, sums_pk, counts_pk, grads_pk = _losses_and_grads(model, packed, host_layout=False)
    for host in (False, True):  # packed with the host layout computes the same
        loss, sums, counts, grads = _losses_and_grads(model, packed, host_layout=host)
        assert torch.equal(sums, sums_pk) or (sums - sums_pk).abs().max() <= TOL
    loss_st, sums_st, counts_st, grads_st = _losses_and_grads(model, static, host_layout=True)

    assert counts_st.tolist() == counts_pk.tolist() == [l_ for _, l_ in RAGGED]
    assert ((sums_st - sums_pk).abs() / sums_pk.abs()).max() <= TOL
    assert abs(loss_st.item() - loss_pk.item()) <= TOL  # the pad segment's labels are -100: not in the mean
    assert grads_st.keys() == grads_pk.keys() and len(grads_pk) == len(list(model.parameters()))
    worst = max((grads_st[n] - grads_pk[n]).abs().max().item() for n in grads_pk)
    assert worst <= TOL, f"largest gradient difference {worst:.3g}"
    assert max(g.abs().max().item() for g in grads_pk.values()) > 1e-3


def test_static_mistakes_would_be_caught():
    """The equality above can fail: an encoder gather that takes the next sample's image moves the losses."""
    model = model_for("tiny")
    n_img = model.cfg.num_image_tokens()
    examples = [example(p, l_, seed=i) for i, (p, l_) in enumerate(RAGGED)]
    good = collate_static(examples, n_img, **BOUNDS)

    def losses(batch):
        with torch.no_grad():
            return batch.per_sample_sums(model(**batch.model_inputs(), return_logits=False).token_losses)[0]

    ref = losses(good)
    index = good.encoder_index.clone()
    index[:n_img] += n_img  # sample 0 sees sample 1's image
    assert (losses(Batch(**{**good.__dict__, "encoder_index": index})) - ref).abs().max() > 1e-3
    cu = good.decoder_cu_seqlens.clone()
    cu[1] += 1  # off by one: sample 1's first decoder token joins sample 0
    assert (losses(Batch(**{**good.__dict__, "decoder_cu_seqlens": cu})) - ref).abs().max() > 1e-3


def test_static_layout_by_hand():
    # 2 samples, 3 image tokens, prompts 2 and 1, labels 3 and 2; bounds: 4 slots, 12 / 8 tokens
    examples = [example(2, 3, 0, image_size=8), example(1, 2, 1, image_size=8)]
    b = collate_static(examples, 3, max_samples=4, max_encoder_tokens=12, max_decoder_tokens=8)
    assert b.pixel_values.shape == (4, 3, 8, 8) and not b.pixel_values[2:].any()  # unused image slots: zeros
    assert b.input_ids.shape == (1, 13) and b.labels.shape == b.decoder_input_ids.shape == (1, 9)
    # encoder segments 3+2, 3+1, then the pad segment 13 - 9 = 4 tokens, then 2 zero-length segments
    assert b.encoder_cu_seqlens.tolist() == [0, 5, 9, 13, 13, 13]
    assert b.decoder_cu_seqlens.tolist() == [0, 3, 5, 9, 9, 9]
    # gather source: 4 slots x 3 image tokens (0..11), then input_ids (12..): [img0 ; p0 ; img1 ; p1 ; pad ids]
    assert b.encoder_index.tolist() == [0, 1, 2, 12, 13, 3, 4, 5, 14, 15, 16, 17, 18]
    assert b.input_ids[0, :3].tolist() == examples[0].prompt_ids + examples[1].prompt_ids
    assert (b.input_ids[0, 3:] == 1).all()  # encoder pad id
    assert b.encoder_positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0, 0]  # pad positions 0
    assert b.decoder_positions[0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0, 0]
    assert b.labels[0, :5].tolist() == examples[0].labels + examples[1].labels and (b.labels[0, 5:] == -100).all()
    assert b.decoder_input_ids[0, :5].tolist() == [1, 2, examples[0].labels[1], 1, 2]  # per-sample shift
    assert (b.max_seqlen_q, b.max_seqlen_k) == (9, 13)  # the bounds, the same for every batch
    assert b.num_samples == 2 and b.num_target_tokens == b.num_decoder_tokens == 5
    assert b.num_encoder_tokens == 9 and b.allocated_encoder_tokens == 13 and b.allocated_decoder_tokens == 9
    with pytest.raises(ValueError, match="do not fit the static bounds"):
        collate_static(examples, 3, max_samples=1, max_encoder_tokens=12, max_decoder_tokens=8)


def test_static_layout_with_segment_bounds_by_hand():
    # the same 2 samples (segments 5 + 4 encoder, 3 + 2 decoder) with segment bounds 5 / 3: P = 3 pad segments,
    # since ceil((12 + 3) / 3) = 5 <= 5 and ceil((8 + 1) / 3) = 3 <= 3, while P = 2 gives ceil(14 / 2) = 7 > 5
    examples = [example(2, 3, 0, image_size=8), example(1, 2, 1, image_size=8)]
    assert static_pad_segments(12, 8, 5, 3) == 3
    b = collate_static(examples, 3, max_samples=4, max_encoder_tokens=12, max_decoder_tokens=8,
                       max_segment_encoder=5, max_segment_decoder=3)
    assert b.input_ids.shape == (1, 15) and b.labels.shape == (1, 9)  # E = 12 + P, D = 8 + 1
    assert b.encoder_index.numel() == 15
    # pad 15 - 9 = 6 encoder tokens in 3 chunks of 2; 9 - 5 = 4 decoder tokens as 2, 1, 1; then 2 empty slots
    assert b.encoder_cu_seqlens.tolist() == [0, 5, 9, 11, 13, 15, 15, 15]
    assert b.decoder_cu_seqlens.tolist() == [0, 3, 5, 7, 8, 9, 9, 9]
    assert b.prompt_cu_seqlens.tolist() == [0, 2, 3, 5, 7, 9, 9, 9]
    assert (b.max_seqlen_q, b.max_seqlen_k) == (3, 5) and b.num_slots == 4 + 3
    seg = b.encoder_cu_seqlens.diff().tolist()
    assert max(seg) <= 5 and max(b.decoder_cu_seqlens.diff().tolist()) <= 3
    # every decoder pad segment with queries has keys: encoder pad chunks are never empty
    assert all(e > 0 for e, d in zip(seg, b.decoder_cu_seqlens.diff().tolist()) if d > 0)
    assert b.encoder_positions[0, 9:].tolist() == [0] * 6
    with pytest.raises(ValueError, match="over the static segment bounds max_segment_encoder=4"):
        collate_static(examples, 3, max_samples=4, max_encoder_tokens=12, max_decoder_tokens=8,
                       max_segment_encoder=4, max_segment_decoder=3)
    with pytest.raises(ValueError, match="max_segment_encoder=1"):
        static_pad_segments(12, 8, 1, 3)
    with pytest.raises(ValueError, match="max_segment_encoder=1"):  # at construction, not the first batch
        Loader(ListPipeline(examples), mode="static", n_image_tokens=3, max_encoder_tokens=12, max_decoder_tokens=8,
               max_samples=4, max_segment_encoder=1)


def test_static_loader_with_segment_bounds_keeps_shapes_and_batches():
    examples = [example(1 + (7 * i) % 13, 2 + (5 * i) % 17, i, image_size=8) for i in range(40)]
    kw = dict(mode="static", n_image_tokens=4, max_encoder_tokens=64, max_decoder_tokens=40, max_samples=5)
    plain = list(Loader(ListPipeline(examples), **kw))
    bounded = list(Loader(ListPipeline(examples), **kw, max_segment_encoder=4 + 13, max_segment_decoder=18))
    assert [b.keys for b in bounded] == [b.keys for b in plain]  # the same samples per batch
    shapes = {(b.input_ids.shape, b.labels.shape, b.encoder_cu_seqlens.shape, b.max_seqlen_q, b.max_seqlen_k)
              for b in bounded}
    assert len(shapes) == 1 and next(iter(shapes))[3:] == (18, 17)
    for b in bounded:
        assert b.encoder_cu_seqlens.diff().max() <= 17 and b.decoder_cu_seqlens.diff().max() <= 18


def test_static_shapes_are_identical_across_batches():
    """Every batch of a static loader has the same tensor shapes, dtypes and max_seqlen ints (one graph)."""
    examples = [example(1 + (7 * i) % 13, 2 + (5 * i) % 17, i, image_size=8) for i in range(40)]
    loader = Loader(ListPipeline(examples), mode="static", n_image_tokens=4, max_encoder_tokens=64,
                    max_decoder_tokens=40, max_samples=5)
    batches = list(loader)
    assert len(batches) > 5 and len({b.num_samples for b in batches}) > 1 and sum(b.num_samples for b in batches) == 40

    def signature(b):
        return ({k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
                 for k, v in b.model_inputs().items()})

    assert all(signature(b) == signature(batches[0]) for b in batches)
    # the same examples as packed batches: the same grouping, so the same samples per batch
    packed = list(Loader(ListPipeline(examples), mode="packed", n_image_tokens=4, max_encoder_tokens=64,
                         max_decoder_tokens=40, max_samples=5))
    assert [b.keys for b in packed] == [b.keys for b in batches]


def test_static_loader_resumes_exactly():
    """state_dict / load_state_dict (JSON round trip) continue the identical static batch sequence, 2 ranks."""
    import json

    examples = [example(1 + (7 * i) % 13, 2 + (5 * i) % 17, i, image_size=8) for i in range(60)]
    kw = dict(mode="static", n_image_tokens=4, max_encoder_tokens=64, max_decoder_tokens=40, max_samples=5, world=2)
    for rank in range(2):
        ref = Loader(ListPipeline(examples), rank=rank, **kw)
        [next(ref) for _ in range(2)]
        state = json.loads(json.dumps(ref.state_dict()))
        following = [next(ref) for _ in range(3)]
        resumed = Loader(ListPipeline(examples), rank=rank, **kw)
        resumed.load_state_dict(state)
        for a, b in zip(following, [next(resumed) for _ in range(3)]):
            assert a.keys == b.keys
            for name, x in a.model_inputs().items():
                y = b.model_inputs()[name]
                assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name
    with pytest.raises(ValueError, match="static mode needs max_samples"):
        Loader(ListPipeline(examples), **{**kw, "max_samples": None})
    with pytest.raises(ValueError, match="batch sequence would differ"):  # a packed state does not resume static
        Loader(ListPipeline(examples), **kw).load_state_dict(
            Loader(ListPipeline(examples), **{**kw, "mode": "packed"}).state_dict())


def test_collation_checks_ids_and_positions_with_the_models_messages():
    cfg = get_config("tiny")
    limits = InputLimits.from_config(cfg)
    n_img = cfg.num_image_tokens()
    good = example(3, 4, 0)
    for mode in ("padded", "packed", "static"):
        kw = dict(limits=limits, **BOUNDS)
        assert collate([good], n_img, mode, **kw).inputs_checked
        bad = EncodedExample(good.pixels, [0, 512, 2], good.labels, "x")
        with pytest.raises(ValueError, match=r"input_ids has ids outside \[0, 512\): min 0, max 512"):
            collate([good, bad], n_img, mode, **kw)
        bad = EncodedExample(good.pixels, good.prompt_ids, [2, -3, 1], "x")
        with pytest.raises(ValueError, match=r"labels has ids outside \[0, 512\)"):
            collate([bad], n_img, mode, **kw)
        bad = EncodedExample(good.pixels, [0] * cfg.encoder.max_positions, good.labels, "x")
        with pytest.raises(ValueError, match="exceeds the 256 learned positions"):
            collate([bad], n_img, mode, limits=limits, max_samples=2, max_encoder_tokens=4096, max_decoder_tokens=48)
    # the BART decoder has a learned-position table too; Gemma's RoPE has none
    assert InputLimits.from_config(get_config("tiny-bart")).decoder_positions == 256
    assert limits.decoder_positions is None
    # and without host checks the model still raises its own clear error (CPU caller)
    model = model_for("tiny")
    b = collate_static([good], n_img, **BOUNDS)
    ids = b.input_ids.clone()
    ids[0, 0] = 600
    with pytest.raises(ValueError, match=r"input_ids has ids outside \[0, 512\)"):
        model(**{**b.model_inputs(), "input_ids": ids})


# ---- the sync guard --------------------------------------------------------------------------------------

# DeviceHostRead / no_device_host_reads: tests/helpers/sync_guard.py (the kernels' tests use it too)


def _training_batch(preset: str, mode: str) -> tuple[Florenz, Batch]:
    cfg = get_config(preset)
    size = cfg.image_size
    examples = [example(p, l_, seed=i, image_size=size, vocab=cfg.encoder.vocab_size) for i, (p, l_) in
                enumerate(RAGGED)]
    bounds = segment_bounds(cfg.num_image_tokens()) if mode == "static-bounded" else {}
    batch = collate(examples, cfg.num_image_tokens(), mode.removesuffix("-bounded"),
                    limits=InputLimits.from_config(cfg), max_samples=8,
                    max_encoder_tokens=8 * cfg.num_image_tokens() + 64, max_decoder_tokens=48, **bounds)
    torch.manual_seed(0)
    return Florenz(cfg).train(), batch


def _one_step(model: Florenz, batch: Batch) -> torch.Tensor:
    """The engine's forward + loss (train.make_forward_loss) and backward, as the training loop runs them."""
    from florenz_fast.train import TrainConfig, make_forward_loss

    forward_loss = make_forward_loss(model, TrainConfig(), torch.device("cpu"))
    scale = 1.0 / torch.tensor(float(batch.num_target_tokens))
    inputs = batch.model_inputs(host_layout=True)
    with no_device_host_reads():
        total, token_losses = forward_loss(inputs)
        batch.per_sample_sums(token_losses)  # what the loop logs
        loss = total * scale
        loss.backward()
    return loss.detach()


def test_the_guard_catches_a_read():
    """The guard can fail: the model's own id check (no inputs_checked) reads min / max; so does .tolist()."""
    model, batch = _training_batch("tiny", "padded")
    with pytest.raises(DeviceHostRead, match=r"Tensor.__int__"):  # florenz.check_ids: int(ids.min())
        with no_device_host_reads():
            model(**batch.model_inputs())
    with pytest.raises(DeviceHostRead, match="_local_scalar_dense"):  # what int() dispatches, seen by the mode
        with no_device_host_reads():
            torch.ops.aten._local_scalar_dense(torch.tensor(1))
    model, batch = _training_batch("tiny", "packed")
    with pytest.raises(DeviceHostRead, match="tolist"):  # only prompt_cu_seqlens: the model reads them once
        with no_device_host_reads():
            model(**batch.model_inputs(), inputs_checked=True)
    with pytest.raises(DeviceHostRead, match="nonzero"):
        with no_device_host_reads():
            torch.arange(3).nonzero()
    with pytest.raises(DeviceHostRead, match="repeat_interleave"):
        with no_device_host_reads():
            torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]))
    with no_device_host_reads():  # ... but not with output_size
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]), output_size=3)


@pytest.mark.parametrize("backend", ["torch", "dense", "sdpa", "flex"])
@pytest.mark.parametrize("mode", ["padded", "static", "static-bounded"])
@pytest.mark.parametrize("preset", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
def test_training_step_reads_nothing_back(preset, mode, backend):
    """Forward, loss and backward of one training step with no device->host read (DESIGN.md 13). `flex` has no
    CPU backward: its calls fall through the chain to the torch reference, which must be read-free as well."""
    _step_reads_nothing_back(preset, mode, backend)


@pytest.mark.slow
def test_triton_training_step_reads_nothing_back():
    """The same with the Triton kernels (in the interpreter: ~1 min a mode, so one mode): the fused loss skips
    its labels check (checked at collation) and its backward never compares values
    (kernels/linear_cross_entropy.py); attention takes max_seqlen from the host layout."""
    _step_reads_nothing_back("tiny", "static-bounded", "triton")


def _step_reads_nothing_back(preset, mode, backend):
    model, batch = _training_batch(preset, mode)
    ops.set_backend(backend)
    try:
        loss = _one_step(model, batch)
    finally:
        ops.set_backend(None)
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- one compiled step ------------------------------------------------------------------------------------

_RUN = ["--data.synthetic_images=32", "--data.mode=static", "--data.max_encoder_tokens=160",
        "--data.max_decoder_tokens=128", "--data.batch_size=4", "--save_every=1000", "--log_every=1000",
        "--model.encoder.dropout=0", "--model.vision.drop_path=0"]


@pytest.mark.slow
def test_compiled_static_training_is_one_graph(tmp_path):
    """--compile: forward + loss (and AOTAutograd's backward) traced with fullgraph=True (a graph break fails);
    20 static batches of different contents give exactly one graph, and a recompile would raise. The losses
    are the eager step's."""
    from torch._dynamo.utils import counters

    from florenz_fast.train import parse_args, train

    eager = train(parse_args([f"--out={tmp_path / 'eager'}", "--steps=20", *_RUN]))["losses"]
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train(parse_args([f"--out={tmp_path / 'compiled'}", "--steps=20", "--compile=true",
                                     "--compile_backend=aot_eager", *_RUN]))["losses"]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(compiled) == len(eager) == 20
    assert max(abs(a - b) for a, b in zip(compiled, eager)) <= 1e-4, (eager, compiled)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graphs_step_matches_eager(tmp_path):
    """--cuda_graphs on CUDA: the compiled forward + backward replayed as CUDA graphs; 10 steps give the eager
    step's losses (fp32; inductor's fused reductions reorder sums, hence 1e-3 and not exact)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from florenz_fast.train import parse_args, train

    run = [*_RUN, "--device=cuda", "--steps=10"]
    eager = train(parse_args([f"--out={tmp_path / 'eager'}", *run]))["losses"]
    torch._dynamo.reset()
    graphs = train(parse_args([f"--out={tmp_path / 'graphs'}", "--cuda_graphs=true", *run]))["losses"]
    assert len(graphs) == len(eager) == 10
    assert max(abs(a - b) for a, b in zip(graphs, eager)) <= 1e-3, (eager, graphs)
    torch._dynamo.reset()


# ---- zero-length segments in the Triton kernel (interpreter) ------------------------------------------------

_TRITON_ZERO_LENGTH = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from florenz_fast import ops
from florenz_kernels.softcap_attention import softcap_attention

torch.manual_seed(0)
# static cu_seqlens: real segments, a query segment without keys, then zero-length ones padded with the last offset
for lq, lk, causal in (([3, 0, 5, 2, 0, 0], [4, 0, 6, 1, 0, 0], False), ([3, 1, 4, 0, 0], [3, 1, 4, 0, 0], True),
                       ([2, 3, 0], [0, 3, 0], False)):
    cq, ck = ops.cu_seqlens_from_lengths(lq), ops.cu_seqlens_from_lengths(lk)
    q = torch.randn(sum(lq), 2, 16, requires_grad=True)
    k = torch.randn(sum(lk), 1, 16, requires_grad=True)
    v = torch.randn(sum(lk), 1, 16, requires_grad=True)
    kw = dict(scale=0.25, softcap=3.0, causal=causal, cu_seqlens_q=cq, cu_seqlens_k=ck)
    out, _ = softcap_attention(q, k, v, max_seqlen_q=max(lq), max_seqlen_k=max(lk), **kw)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
    errs = []
    for dt in (torch.float64, torch.float32):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        ref = ops.attention(qq, kk, vv, backend="torch", **kw)
        (ref * torch.arange(ref.numel()).view_as(ref).sin()).sum().backward()
        errs.append([ref.detach()] + [t.grad for t in (qq, kk, vv)])
    for name, g, r64, r32 in zip(("out", "dq", "dk", "dv"), got, *errs):
        e, e32 = (g.double() - r64).abs().max().item(), (r32.double() - r64).abs().max().item()
        assert e <= max(2 * e32, 1e-6), (lq, lk, name, e, e32)
        assert torch.isfinite(g).all()
    if lk[0] == 0:  # queries of a segment without keys see nothing: zeros, as in every backend
        assert lq[0] > 0 and (out.detach()[:lq[0]] == 0).all()
print("ok")
"""


@pytest.mark.slow
def test_triton_kernel_handles_zero_length_segments(tmp_path):
    """The fused kernel (Triton interpreter, fp32) with static cu_seqlens: zero-length segments at the end and
    inside, and a query segment without keys (zeros): forward and backward within 2x the fp32 reference's error."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "zero_length.py"
    script.write_text(_TRITON_ZERO_LENGTH)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(script)], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-2000:] + run.stderr[-3000:]
