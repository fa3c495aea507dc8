"""The search step on device tensors (issue 16): no host read inside a step, the same tokens and scores as the
host-driven search it replaced (bit for bit), whatever the sync interval, eager or compiled.

`legacy_generate` below is that replaced search (the host loop up to issue 16, with `bool(done.all())` and
`bool(improvable.any())` every step), kept as the reference: the device search must reproduce its tokens exactly
and its scores bit for bit, in float32, on cases where hypotheses finish early (eos picked from what the search
really emits), with length penalties, forced bos / eos, min_new_tokens and a decoder prompt.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from florenz_fast.generate import (
    NEG,
    CachedDecoder,
    GenerationConfig,
    SearchState,
    StepRunner,
    _decoder_prompt,
    generate,
    run_search,
    search_step,
)
from tests.helpers.sync_guard import DeviceHostRead, no_device_host_reads
from tests.test_generate import _inputs, _pick_eos, live_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- the reference: the host-driven search before issue 16 ----------------------------------------------------


def _legacy_process(logp, seqs, prompt_len, max_len, cfg):
    cur = seqs.shape[1]
    n = cfg.no_repeat_ngram_size
    if n and cur >= n:
        windows = seqs.unfold(1, n, 1)
        match = (windows[..., :-1] == seqs[:, cur - n + 1:][:, None]).all(-1)
        inf = torch.full_like(match, float("inf"), dtype=logp.dtype)
        logp.scatter_reduce_(1, windows[..., -1], torch.where(match, -inf, inf), reduce="amin")
    if cur - prompt_len < cfg.min_new_tokens:
        logp[:, cfg.eos_id] = float("-inf")
    forced = (cfg.bos_id if cfg.forced_bos and cur == 1 else
              cfg.eos_id if cfg.forced_eos and cur == max_len - 1 else None)
    if forced is not None:
        logp.fill_(float("-inf"))
        logp[:, forced] = 0.0
    return logp


class _LegacyDecoder:
    def __init__(self, dec):
        self.dec = dec  # .step(ids_N, pos) -> logits, .reorder(index_N)
        self.length = 0

    def logp(self, seqs, P, T, cfg):
        while self.length < seqs.shape[1]:
            out = self.dec.step(seqs[:, self.length].contiguous(), torch.tensor(self.length))
            self.length += 1
        logp = F.log_softmax(out.to(torch.promote_types(out.dtype, torch.float32)), dim=-1)
        return _legacy_process(logp, seqs, P, T, cfg)


def _legacy_greedy(dec, prompt, cfg):
    B, P = prompt.shape
    T = P + cfg.max_new_tokens
    seqs = torch.full((B, T), cfg.pad_id, dtype=torch.long)
    seqs[:, :P] = prompt
    done = torch.zeros(B, dtype=torch.bool)
    lengths = torch.zeros(B, dtype=torch.long)
    score, steps = None, 0
    for cur in range(P, T):
        logp = dec.logp(seqs[:, :cur], P, T, cfg)
        steps += 1
        tok = logp.argmax(-1)
        gained = logp.gather(1, tok[:, None])[:, 0]
        score = torch.zeros_like(gained) if score is None else score
        score = score + torch.where(done, torch.zeros_like(gained), gained)
        seqs[:, cur] = torch.where(done, torch.full_like(tok, cfg.pad_id), tok)
        lengths += (~done).long()
        done |= tok == cfg.eos_id
        if bool(done.all()):
            break
    return [seqs[b, P:P + int(lengths[b])].tolist() for b in range(B)], score, steps


def _legacy_beam(dec, prompt, cfg):
    B, P = prompt.shape
    K = cfg.num_beams
    T = P + cfg.max_new_tokens
    seqs = torch.full((B, K, T), cfg.pad_id, dtype=torch.long)
    seqs[:, :, :P] = prompt[:, None]
    fin_seqs = seqs.clone()
    fin_len = torch.zeros(B, K, dtype=torch.long)
    fin_done = torch.zeros(B, K, dtype=torch.bool)
    run_scores = fin_scores = None
    improvable = torch.ones(B, 1, dtype=torch.bool)
    top_k_mask = torch.arange(2 * K) < K
    row_offset = torch.arange(B)[:, None] * K
    steps = 0
    for cur in range(P, T):
        logp = dec.logp(seqs.view(B * K, T)[:, :cur], P, T, cfg)
        steps += 1
        V = logp.shape[-1]
        if run_scores is None:
            run_scores = torch.zeros(B, K, dtype=logp.dtype)
            run_scores[:, 1:] = NEG
            fin_scores = torch.full((B, K), NEG, dtype=logp.dtype)
        cand = (logp.view(B, K, V) + run_scores[..., None]).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)
        src_beam, tok = top_idx // V, top_idx % V
        last = cur + 1 == T
        hits = (tok == cfg.eos_id) | last
        cand_seqs = seqs.gather(1, src_beam[..., None].expand(B, 2 * K, T)).clone()
        cand_seqs[:, :, cur] = tok
        finished = hits & top_k_mask
        full = fin_done.all(1, keepdim=True) & bool(cfg.early_stopping is True)
        fin_cand = top_scores / float(cur + 1 - P) ** cfg.length_penalty
        fin_cand = fin_cand + (full | ~improvable | ~finished).to(fin_cand.dtype) * NEG
        merged = torch.cat([fin_scores, fin_cand], dim=1)
        keep = merged.topk(K, dim=1).indices
        fin_scores = merged.gather(1, keep)
        fin_seqs = torch.cat([fin_seqs, cand_seqs], 1).gather(1, keep[..., None].expand(B, K, T))
        fin_len = torch.cat([fin_len, torch.full_like(tok, cur + 1 - P)], 1).gather(1, keep)
        fin_done = torch.cat([fin_done, finished], 1).gather(1, keep)
        running = top_scores + hits.to(top_scores.dtype) * NEG
        sel = running.topk(K, dim=1).indices
        run_scores = running.gather(1, sel)
        seqs = cand_seqs.gather(1, sel[..., None].expand(B, K, T))
        if last:
            break
        dec.dec.reorder((src_beam.gather(1, sel) + row_offset).view(-1))
        hyp_len = float(cur + 1 - P)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, NEG))
        improvable = improvable & (run_scores[:, :1] / hyp_len ** cfg.length_penalty > worst).any(1, keepdim=True)
        if not bool(improvable.any()) or (cfg.early_stopping is True and bool(fin_done.all())):
            break
    return [fin_seqs[b, 0, P:P + int(fin_len[b, 0])].tolist() for b in range(B)], fin_scores[:, 0], steps


@torch.no_grad()
def legacy_generate(model, pixels, ids, mask, cfg, prompt=None):
    enc, layout = model.encode(pixels, ids, mask)
    prompt_BP = _decoder_prompt(prompt, enc.shape[0], cfg, enc.device)
    dec = CachedDecoder(model, enc, layout, cfg.num_beams, prompt_BP.shape[1] + cfg.max_new_tokens)
    return legacy_search(dec, prompt_BP, cfg)


def legacy_search(dec, prompt_BP, cfg):
    return (_legacy_greedy if cfg.num_beams == 1 else _legacy_beam)(_LegacyDecoder(dec), prompt_BP, cfg)


class _TableDecoder:
    """A stand-in for CachedDecoder whose logits are a fixed random function of (last token, position), with eos
    favoured from position 4 on, so that every item of a beam search collects its K hypotheses early. Stateless
    (no caches to reorder); it also serves as its own `model` (decode_step) for StepRunner."""

    def __init__(self, V=12, T=40, eos=1, seed=0):
        self.table = torch.randn(V, T, V, generator=torch.Generator().manual_seed(seed))
        self.table[:, 4:, eos] += 2.5
        self.model, self.caches, self.cross, self.enc_layout = self, [], None, None

    def decode_step(self, ids_N, pos, caches, cross, enc_layout, beams):
        return self.table[ids_N, pos]

    def step(self, ids_N, pos):
        return self.table[ids_N, pos]

    def prefill(self, prompt_NP):
        pass

    def reorder(self, index_N):
        pass


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma32():
    return live_model("tiny", seed=7)


@pytest.fixture(scope="module")
def bart32():
    return live_model("tiny-bart", seed=8)


def _case(model, beams, max_new=17, eos_step=6, prompt=None, **kw):
    pixels, ids, mask = _inputs(model.cfg, B=3, seed=beams, dtype=torch.float32)
    eos = _pick_eos(model, pixels, ids, mask, step=eos_step, beams=beams, max_new=max_new, prompt=prompt)
    cfg = GenerationConfig.for_model(model.cfg, num_beams=beams, max_new_tokens=max_new, eos_id=eos, **kw)
    return (pixels, ids, mask), cfg


def _assert_identical(out, ref_tokens, ref_scores, ref_steps):
    assert out.tokens == ref_tokens
    assert torch.equal(out.scores, ref_scores), (out.scores, ref_scores)  # bit for bit
    assert out.steps == ref_steps


# ---- the same tokens and scores as the host-driven search -----------------------------------------------------


@pytest.mark.parametrize("beams, kw, prompt", [
    (1, {}, None),
    (1, dict(no_repeat_ngram_size=1), [1, 2, 17]),
    (4, {}, None),
    (4, dict(length_penalty=0.7, no_repeat_ngram_size=2), None),
    (3, dict(length_penalty=0.0, early_stopping=False), [1, 2, 17, 99]),
    (4, dict(min_new_tokens=9, no_repeat_ngram_size=0), None),
])
@pytest.mark.parametrize("sync_every", [1, 8])
def test_device_search_equals_host_search_gemma(gemma32, beams, kw, prompt, sync_every):
    inputs, cfg = _case(gemma32, beams, prompt=prompt, **kw)
    ref = legacy_generate(gemma32, *inputs, cfg, prompt)
    out = generate(gemma32, *inputs, config=dataclasses.replace(cfg, sync_every=sync_every), decoder_prompt=prompt)
    _assert_identical(out, *ref)
    if cfg.min_new_tokens:  # it holds eos back: without it a hypothesis finishes at step 6
        assert out.tokens != generate(gemma32, *inputs, config=dataclasses.replace(cfg, min_new_tokens=0)).tokens
        assert min(len(t) for t in out.tokens) >= cfg.min_new_tokens
    else:
        assert min(len(t) for t in out.tokens) < cfg.max_new_tokens  # a hypothesis finished early: ends matter


@pytest.mark.parametrize("beams", [1, 4])
def test_device_search_equals_host_search_bart_forced(bart32, beams):
    """The BART presets force bos at position 1 and eos at the last position."""
    inputs, cfg = _case(bart32, beams, max_new=12, eos_step=4)
    assert cfg.forced_bos and cfg.forced_eos
    ref = legacy_generate(bart32, *inputs, cfg)
    out = generate(bart32, *inputs, config=cfg)
    _assert_identical(out, *ref)
    assert all(t[0] == cfg.bos_id for t in out.tokens)


@pytest.mark.parametrize("beams", [1, 4])
def test_sync_every_does_not_change_the_result_and_the_end_is_final(beams):
    """A search that ends well before max_new_tokens: sync_every 1, 5 and 64 (past the end: the host never looks
    before the last step) give the host-driven search's result, though up to sync_every - 1 steps ran after it
    ended; those changed nothing."""
    cfg = GenerationConfig(num_beams=beams, max_new_tokens=30, no_repeat_ngram_size=2, eos_id=1)
    prompt = torch.tensor([[1, 5], [1, 7], [1, 3]])
    ref = legacy_search(_TableDecoder(), prompt, cfg)
    assert ref[2] < 12  # the search ended early
    for k in (1, 5, 64):
        out = run_search(_TableDecoder(), prompt, dataclasses.replace(cfg, sync_every=k), torch.float32)
        _assert_identical(out, *ref)


@pytest.mark.parametrize("beams", [1, 3])
def test_steps_after_the_end_change_nothing(beams):
    """Run the state past its end by hand: every tensor of the state but `cur` stays what it was."""
    cfg = GenerationConfig(num_beams=beams, max_new_tokens=30, eos_id=1)
    dec = _TableDecoder()
    st = SearchState.start(torch.tensor([[1], [4]]), cfg, torch.float32)
    run = StepRunner(dec, st, cfg)
    while not bool(st.stopped):
        run()
    before = {k: v.clone() for k, v in st.tensors().items()}
    assert int(st.cur) < 20
    for _ in range(3):
        run()
    assert int(st.cur) == int(before["cur"]) + 3  # it did run
    for k, v in st.tensors().items():
        if k != "cur":
            assert torch.equal(v, before[k]), k


# ---- no host read inside a step --------------------------------------------------------------------------------


@pytest.mark.parametrize("beams", [1, 4])
def test_search_step_reads_nothing_back(gemma32, beams):
    """decode_search_step (decoder + logits processing + search + cache reorder) under the refusing guard, every
    step of a whole search; and the guard does fire on the host's periodic check."""
    (pixels, ids, mask), cfg = _case(gemma32, beams, max_new=12, eos_step=3, min_new_tokens=2)
    with torch.no_grad():
        enc, layout = gemma32.encode(pixels, ids, mask)
        prompt = _decoder_prompt([1, 2, 17], 3, cfg, enc.device)
        dec = CachedDecoder(gemma32, enc, layout, beams, 3 + cfg.max_new_tokens)
        dec.prefill(prompt.repeat_interleave(beams, 0))
        st = SearchState.start(prompt, cfg, torch.float32)
        run = StepRunner(dec, st, cfg)
        with no_device_host_reads():
            for _ in range(cfg.max_new_tokens):
                run()
        with pytest.raises(DeviceHostRead), no_device_host_reads():
            bool(st.stopped)
    assert st.output().tokens == generate(gemma32, pixels, ids, mask, config=cfg, decoder_prompt=[1, 2, 17]).tokens


def test_logits_processing_reads_nothing_back():
    """process_log_probs_at on a static buffer: the n-gram ban, min length and forced tokens with the position as a
    device tensor."""
    cfg = GenerationConfig(no_repeat_ngram_size=3, min_new_tokens=4, forced_bos=True, forced_eos=True)
    seqs = torch.randint(0, 6, (5, 12), generator=torch.Generator().manual_seed(1))
    cfg = dataclasses.replace(cfg, num_beams=1, max_new_tokens=11)
    st = SearchState.start(seqs[:, :1], cfg, torch.float32)
    st.seqs.copy_(seqs[:, None])
    st.cur.fill_(7)
    with no_device_host_reads():
        search_step(torch.randn(5, 6).log_softmax(-1), st, cfg)
    assert int(st.cur) == 8 and int(st.steps) == 1


# ---- compiled: the same result ------------------------------------------------------------------------------


@pytest.mark.parametrize("beams", [1, 4])
def test_compiled_step_equals_eager(gemma32, beams):
    """torch.compile of the whole step (aot_eager: the traced graph itself, run by eager kernels) gives the eager
    tokens and scores bit for bit, and a second call of the same shapes does not recompile."""
    inputs, cfg = _case(gemma32, beams, max_new=14, eos_step=5)
    eager = generate(gemma32, *inputs, config=cfg)
    torch._dynamo.reset()
    first = generate(gemma32, *inputs, config=cfg, compile="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(gemma32, *inputs, config=cfg, compile="aot_eager")
    for out in (first, again):
        _assert_identical(out, eager.tokens, eager.scores, eager.steps)


@pytest.mark.slow
def test_inductor_step_equals_eager():
    """inductor (the CPU fast path), float64: the same tokens, scores within 1e-6. Not 1e-12: RoPE's cos / sin are
    float32 by design (Rotary.cos_sin), and inductor's vectorised float32 cos differs from eager's by one ulp (6e-8,
    measured), which moves float64 logits by ~3e-7. Before florenz::reorder_rows_ this test chose other tokens
    (inductor miscompiled the cache append + in-place gather of the same buffer, see ops/decode.py)."""
    model = live_model("tiny", seed=7).double()
    inputs, cfg = _case(model, 3, max_new=10, eos_step=4)
    inputs = (inputs[0].double(), *inputs[1:])
    eager = generate(model, *inputs, config=cfg)
    comp = generate(model, *inputs, config=cfg, compile=True)
    assert comp.tokens == eager.tokens and comp.steps == eager.steps
    assert (comp.scores - eager.scores).abs().max().item() <= 1e-6


# ---- CUDA: the step captured in one CUDA graph --------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("beams", [1, 4])
def test_cuda_graph_step_equals_eager(beams):
    """cuda_graph=True replays decoder + search as one graph: the same tokens and scores as the eager CUDA step
    (the same kernels), the decoder prompt prefilled before the capture, and sync_every steps between reads."""
    model = live_model("tiny", seed=7).cuda()
    inputs, cfg = _case(live_model("tiny", seed=7), beams, max_new=20, eos_step=5)
    inputs = tuple(t.cuda() for t in inputs)
    for prompt in (None, [1, 2, 17]):
        eager = generate(model, *inputs, config=cfg, decoder_prompt=prompt)
        graph = generate(model, *inputs, config=cfg, decoder_prompt=prompt, cuda_graph=True)
        assert graph.tokens == eager.tokens and graph.steps == eager.steps
        assert torch.equal(graph.scores, eager.scores)


def test_reorder_rows_is_an_in_place_gather_that_inductor_keeps():
    """florenz::reorder_rows_ after a cache append to the same buffer, compiled with inductor, equals eager.
    (`k.copy_(k.index_select(0, idx))` in its place came out wrong by up to 5 under torch 2.14's inductor.)"""
    from florenz_fast.ops.decode import reorder_rows_

    def step(k, v, slot, new, idx):
        k.index_copy_(2, slot, new)
        v.index_copy_(2, slot, new)
        out = (k * 2).sum((1, 2, 3))
        reorder_rows_([k, v], idx)
        return out

    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 9, 2, 11, 16, dtype=torch.float64, generator=g)
    new = torch.randn(9, 2, 1, 16, dtype=torch.float64, generator=g)
    idx, slot = torch.tensor([1, 0, 0, 5, 3, 3, 8, 6, 6]), torch.tensor([2])
    ek, ev = k0.clone(), v0.clone()
    ptr = ek.data_ptr()
    e = step(ek, ev, slot, new, idx)
    assert ek.data_ptr() == ptr and torch.equal(ek[2], k0[0].index_copy(1, slot, new[0]))  # row 2 <- row 0
    ck, cv = k0.clone(), v0.clone()
    c = torch.compile(step, fullgraph=True, dynamic=False)(ck, cv, slot, new, idx)
    assert torch.equal(ek, ck) and torch.equal(ev, cv)
    assert (e - c).abs().max().item() <= 1e-12  # a float64 sum of 352 terms, summed in another order
