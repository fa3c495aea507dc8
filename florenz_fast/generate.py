"""Inference: cached greedy and beam search, sequence scoring, and the generation command line (SPEC §9).

    out = generate(model, pixels, input_ids, attention_mask)        # SPEC §9 defaults for the model's kind
    out.tokens[b]   # generated ids after the decoder prompt (eos last unless cut at max_new_tokens)
    out.scores[b]   # beam score: sum of log-probs / generated length ** length_penalty (greedy: sum of log-probs)
    score(model, pixels, input_ids, attention_mask, labels)          # log-likelihood and perplexity per row
    python -m florenz_fast.generate --ckpt=DIR --image=a.jpg --lang=de  # or --batch=rows.jsonl; --help: options

What is cached (cache=True):
  - the image: vision tower + encoder run once per image, never per beam or per step;
  - the cross-attention K/V of every layer: one GEMM per image (decoder.cross_kv), kept as that one tensor and
    shared by the image's beams, which sit on the query axis of the cross-attention (q (B, H, K, D) against
    k/v (B, Hk, S, D)), so it is never copied per beam;
  - the self-attention K/V: preallocated (N = B x beams rows), RoPE applied before storing; sliding-window
    layers hold only their window as a ring buffer (modules.KVCache). Beam reordering is an in-place index
    gather of those buffers, which keep their addresses (one op, florenz::reorder_rows_);
  - the search itself lives on the device (SearchState): a cached step, decode_search_step, is one function of
    device tensors (decoder step, log-softmax, n-gram ban, min length, forced bos / eos, top-2K over all beams,
    finished-hypothesis bookkeeping, cache reorder) that reads nothing back; the host reads "is it over?" once
    every `sync_every` steps (default 8), and steps after the end change nothing;
  - `compile=True` runs that step under torch.compile (static shapes: the static caches, a fixed batch; one
    graph, built once per shape and model): the CPU fast path. On CUDA `cuda_graph=True` captures the same step
    (decoder + search) in one CUDA graph and replays it every step.
Continuous batching (generate_continuous; batch mode's --continuous): the decode batch is a fixed set of slots
(B slots x K beams rows), each holding a request at its own step, with per-row positions (a (N,) position tensor
through the cached self-attention, RoPE and the BART position table) and per-slot cross K/V and encoder masks
(SlotDecoder); when a slot's request is over, the next request's image is encoded into that slot and its search
restarts (SearchState.for_slots / refill_), so the batch stays full while captions end at different steps.
cache=False is the path of the published code: the decoder recomputes every position of every beam at each
step (with the encoder states repeated per beam and the cross K/V projected again each step). Both paths share
the search step below, so they differ only in how the next-token logits are computed.

The search follows transformers' beam search (4.5x/5.x semantics): beam 0 starts at score 0 and the others at
-1e9; each step takes the top 2K continuations of all beams; an eos continuation among the top K finishes a
hypothesis with score / (generated length) ** length_penalty; the best K non-eos continuations run on;
at the last step every top-K continuation finishes. early_stopping=True ends an item when it holds K finished
hypotheses. Log-probs are log_softmax of the (softcapped) logits in float32 (float64 for a float64 model), then
no_repeat_ngram (banned tokens -inf), min_new_tokens (eos -inf), forced bos at length 1 and forced eos at the
last position (all other tokens -inf, the forced one 0).

Shape legend: B images, K beams, N = B * K rows, P decoder prompt length, T = P + max_new_tokens, V vocab.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import cli
from .modules import Layout, cross_heads
from .ops.decode import reorder_rows_
from .text import CAPTION_PREFIXES, IGNORE_INDEX, LANGUAGES, TASKS, encode_prompt, pad_batch, prompt_for, shift_right

NEG = -1.0e9  # transformers' "impossible" score for empty beams and finished candidates


@dataclass
class GenerationConfig:
    num_beams: int = 4
    max_new_tokens: int = 128
    no_repeat_ngram_size: int = 3
    early_stopping: bool = True
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    forced_bos: bool = False  # SPEC §9: True for the BART presets
    forced_eos: bool = False  # SPEC §9: True for the BART presets
    start_id: int = 1  # decoder start token = eos (SPEC §6)
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0
    # the host reads "is the search over?" once every sync_every steps (the steps in between read nothing from
    # the device, and the ones after the end change nothing): at most sync_every - 1 wasted steps per call
    sync_every: int = 8

    @staticmethod
    def for_model(cfg, **overrides) -> "GenerationConfig":
        """SPEC §9 defaults for a FlorenzConfig: the BART presets force bos and eos, the Gemma presets neither."""
        bart = cfg.decoder.kind == "bart"
        return replace(GenerationConfig(forced_bos=bart, forced_eos=bart), **overrides)

    def validate(self) -> "GenerationConfig":
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {self.sync_every}")
        if self.no_repeat_ngram_size < 0 or self.min_new_tokens < 0:
            raise ValueError(f"no_repeat_ngram_size {self.no_repeat_ngram_size} and min_new_tokens "
                             f"{self.min_new_tokens} must be >= 0")
        return self


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per image: generated ids after the decoder prompt
    scores: torch.Tensor  # (B,) float
    steps: int = 0  # decode steps run


# ---- next-token logits: cached or full recompute --------------------------------------------------------


class CachedDecoder:
    """Next-token logits from the static caches: one token per row at a device position, no host read."""

    def __init__(self, model, enc_BSd: torch.Tensor, enc_layout: Layout, beams: int, max_len: int):
        cfg = model.cfg.decoder
        if cfg.kind == "bart" and max_len > cfg.max_positions:
            raise ValueError(f"decoder prompt + max_new_tokens = {max_len} positions exceeds the BART decoder's "
                             f"{cfg.max_positions} learned positions")
        self.model, self.beams, self.enc_layout = model, beams, enc_layout
        self.n = enc_BSd.shape[0] * beams
        # once per generation: every layer's cross K/V (one GEMM) in heads layout, and the fused step weights
        self.cross = model.decoder.step_layers(model.decoder.cross_kv(enc_BSd))
        self.caches = model.decoder.allocate_cache(self.n, max_len, enc_BSd.dtype, enc_BSd.device)

    def step(self, ids_N: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of the token after `ids_N` at position `pos` (0-dim int64); fills that cache slot."""
        return self.model.decode_step(ids_N, pos, self.caches, self.cross, self.enc_layout, self.beams)

    def prefill(self, prompt_NP: torch.Tensor) -> None:
        """Positions 0 .. P-2 of the decoder prompt into the caches (the search step feeds position P-1)."""
        for p in range(prompt_NP.shape[1] - 1):
            self.step(prompt_NP[:, p].contiguous(), torch.tensor(p, device=prompt_NP.device))

    def reorder(self, index_N: torch.Tensor) -> None:
        for cache in self.caches:
            cache.reorder_(index_N)


class FullDecoder:
    """The published code's path: the whole decoder over every position of every beam at each step."""

    def __init__(self, model, enc_BSd: torch.Tensor, enc_layout: Layout, beams: int):
        self.model = model
        self.enc = enc_BSd.repeat_interleave(beams, dim=0)
        mask = enc_layout.mask
        self.layout = Layout(mask=None if mask is None else mask.repeat_interleave(beams, dim=0))

    def logits(self, seqs_Nt: torch.Tensor) -> torch.Tensor:
        hidden = self.model.decode(seqs_Nt, self.enc, self.layout)
        return self.model.logits(hidden[:, -1])


# ---- logits processing ----------------------------------------------------------------------------------


def log_probs(logits_NV: torch.Tensor) -> torch.Tensor:
    """log_softmax in float32 (float64 for a float64 model)."""
    return F.log_softmax(logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)), dim=-1)


def process_log_probs_at(logp_NV: torch.Tensor, seqs_NT: torch.Tensor, cur: torch.Tensor,
                         prompt_len: int | torch.Tensor, max_len: int | torch.Tensor,
                         cfg: GenerationConfig) -> torch.Tensor:
    """no_repeat_ngram, min_new_tokens, forced bos / eos for the token at position `cur` (0-dim int64 tensor) of
    sequences `seqs_NT` whose positions < cur are written (any length T >= cur: a static buffer; positions >= cur
    are ignored). Static shapes and no host read, so one graph serves every step. Returns the processed log-probs
    (logp_NV is modified in place by the n-gram ban). Per row (continuous batching): `cur`, `prompt_len` and
    `max_len` as (N,) int64 tensors, each row at its own position with its own prompt and limit."""
    N, T = seqs_NT.shape
    rows = cur.dim() == 1
    c = cur.view(N, 1) if rows else cur  # broadcasts against (N, ·) either way
    n = cfg.no_repeat_ngram_size
    if n and T >= n:
        # every n-gram of the buffer; window j (positions j .. j+n-1) counts once it is complete: j + n <= cur
        # (transformers bans from cur + 1 >= n, but with cur = n - 1 there is no n-gram yet)
        windows = seqs_NT.unfold(1, n, 1)  # (N, T - n + 1, n)
        valid = torch.arange(T - n + 1, device=seqs_NT.device) + n <= c
        at = (c - n + 1 + torch.arange(n - 1, device=seqs_NT.device)).clamp(min=0)
        prefix = seqs_NT.gather(1, at) if rows else seqs_NT.index_select(1, at)  # (N, n - 1)
        match = (windows[..., :-1] == prefix[:, None]).all(-1) & valid  # same n-1 prefix as now
        inf = torch.full_like(match, float("inf"), dtype=logp_NV.dtype)
        # amin with self: -inf where any earlier n-gram with the same prefix continued with that token
        logp_NV.scatter_reduce_(1, windows[..., -1], torch.where(match, -inf, inf), reduce="amin")
    if cfg.min_new_tokens:
        logp_NV[:, cfg.eos_id].masked_fill_(cur - prompt_len < cfg.min_new_tokens, float("-inf"))
    last = max_len.view(N, 1) - 1 if rows and isinstance(max_len, torch.Tensor) else max_len - 1
    for flag, tok, at in ((cfg.forced_eos, cfg.eos_id, last), (cfg.forced_bos, cfg.bos_id, 1)):
        if flag:  # bos last, so it wins where both apply (max_len 2), as it always has
            forced = torch.full_like(logp_NV[0], float("-inf"))
            forced[tok] = 0.0
            logp_NV = torch.where(c == at, forced, logp_NV)
    return logp_NV


def process_log_probs(logp_NV: torch.Tensor, seqs_Nt: torch.Tensor, prompt_len: int, max_len: int,
                      cfg: GenerationConfig) -> torch.Tensor:
    """process_log_probs_at for sequences of exactly the current length t (the token at position t next)."""
    cur = torch.tensor(seqs_Nt.shape[1], device=seqs_Nt.device)
    return process_log_probs_at(logp_NV, seqs_Nt, cur, prompt_len, max_len, cfg)


# ---- the search state and its step: device tensors only -------------------------------------------------


@dataclass
class SearchState:
    """Everything the search carries between steps, as device tensors updated in place (static addresses for a
    CUDA graph, static shapes for torch.compile). Greedy is K = 1 with `scores` the running sum of log-probs.

    seqs (B, K, T) long: the running beams (prompt, generated ids, pad after); cur () long: the position the next
    step writes; stopped () bool: the search is over (every later step changes nothing); steps () long: steps
    that did work. Greedy: done (B,) bool, lengths (B,) long. Beam: the finished hypotheses fin_seqs (B, K, T),
    fin_scores (B, K), fin_len (B, K), fin_done (B, K), and improvable (B, 1) (transformers' early-stop test).
    Constants: denoms (max_new + 1,) = float(i) ** length_penalty (computed on the host in double, as the host
    loop once did, so scores are bit-identical), top_k_mask (2K,), row_offset (B, 1)."""

    K: int
    prompt_len: int
    seqs: torch.Tensor
    cur: torch.Tensor
    stopped: torch.Tensor
    steps: torch.Tensor
    scores: torch.Tensor
    denoms: torch.Tensor
    done: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    fin_seqs: torch.Tensor | None = None
    fin_scores: torch.Tensor | None = None
    fin_len: torch.Tensor | None = None
    fin_done: torch.Tensor | None = None
    improvable: torch.Tensor | None = None
    top_k_mask: torch.Tensor | None = None
    row_offset: torch.Tensor | None = None
    # per slot (continuous batching, SearchState.for_slots): cur, stopped and steps are (B,), and each slot has its
    # own prompt length plen (B,) and its own end limit (B,) = its prompt length + its max_new_tokens
    plen: torch.Tensor | None = None
    limit: torch.Tensor | None = None

    @staticmethod
    def start(prompt_BP: torch.Tensor, cfg: GenerationConfig, dtype: torch.dtype) -> "SearchState":
        """The state before the first step; `dtype` is the log-probs' (float32, float64 for a float64 model)."""
        (B, P), K, dev = prompt_BP.shape, cfg.num_beams, prompt_BP.device
        T = P + cfg.max_new_tokens
        seqs = torch.full((B, K, T), cfg.pad_id, dtype=torch.long, device=dev)
        seqs[:, :, :P] = prompt_BP[:, None]
        denoms = torch.tensor([float(i) ** cfg.length_penalty for i in range(cfg.max_new_tokens + 1)],
                              dtype=torch.float64).to(dev, dtype)
        st = SearchState(K=K, prompt_len=P, seqs=seqs, cur=torch.tensor(P, device=dev),
                         stopped=torch.zeros((), dtype=torch.bool, device=dev),
                         steps=torch.zeros((), dtype=torch.long, device=dev),
                         scores=torch.zeros(B, K, dtype=dtype, device=dev), denoms=denoms)
        if K == 1:
            st.done = torch.zeros(B, dtype=torch.bool, device=dev)
            st.lengths = torch.zeros(B, dtype=torch.long, device=dev)
            return st
        st.scores[:, 1:] = NEG  # transformers: only beam 0 is live at the start
        st.fin_seqs = seqs.clone()
        st.fin_scores = torch.full((B, K), NEG, dtype=dtype, device=dev)
        st.fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
        st.fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        st.improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
        st.top_k_mask = torch.arange(2 * K, device=dev) < K
        st.row_offset = torch.arange(B, device=dev)[:, None] * K
        return st

    @staticmethod
    def for_slots(B: int, K: int, T: int, cfg: GenerationConfig, dtype: torch.dtype, device) -> "SearchState":
        """B idle slots of K beams over a (B, K, T) buffer, for continuous batching: every slot stopped until
        `refill_` gives it a request (T bounds each request's prompt length + max_new_tokens)."""
        prompt = torch.full((B, 1), cfg.start_id, dtype=torch.long, device=device)
        st = SearchState.start(prompt, replace(cfg, num_beams=K, max_new_tokens=T - 1), dtype)
        st.prompt_len = -1  # per slot: plen
        st.cur = torch.ones(B, dtype=torch.long, device=device)
        st.stopped = torch.ones(B, dtype=torch.bool, device=device)
        st.steps = torch.zeros(B, dtype=torch.long, device=device)
        st.plen = torch.ones(B, dtype=torch.long, device=device)
        st.limit = torch.full((B,), T, dtype=torch.long, device=device)
        return st

    def refill_(self, b: int, prompt: Sequence[int], max_new: int, pad_id: int) -> None:
        """Slot b starts a new request (in place, between steps): its decoder prompt, its limit, a fresh search.
        The next step reads position 0 (cur = 1); the steps while cur < its prompt length only read the prompt
        into the caches (the prefill, token by token through the same step), then its search starts at cur = P."""
        P = len(prompt)
        self.seqs[b] = pad_id
        self.seqs[b, :, :P] = self.seqs.new_tensor(list(prompt))
        self.cur[b], self.plen[b], self.limit[b] = 1, P, P + max_new
        self.stopped[b], self.steps[b] = False, 0
        self.scores[b] = 0.0
        if self.K == 1:
            self.done[b], self.lengths[b] = False, 0
            return
        self.scores[b, 1:] = NEG  # as at the start of a search: only beam 0 is live
        self.fin_seqs[b] = self.seqs[b]
        self.fin_scores[b], self.fin_len[b], self.fin_done[b], self.improvable[b] = NEG, 0, False, True

    def slot_results(self, slots: Sequence[int]) -> list[tuple[list[int], float, int]]:
        """(generated ids, score, steps) of these slots' requests (one host read, after they stopped)."""
        ix = torch.tensor(list(slots), device=self.seqs.device)
        if self.K == 1:
            seqs, lengths, scores = self.seqs[ix, 0], self.lengths[ix], self.scores[ix, 0]
        else:
            seqs, lengths, scores = self.fin_seqs[ix, 0], self.fin_len[ix, 0], self.fin_scores[ix, 0]
        rows, lengths, plen = seqs.tolist(), lengths.tolist(), self.plen[ix].tolist()
        return [(r[p:p + n], sc, st) for r, n, p, sc, st in
                zip(rows, lengths, plen, scores.tolist(), self.steps[ix].tolist())]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def clone(self) -> "SearchState":
        return replace(self, **{k: v.clone() for k, v in self.tensors().items()})

    def last_ids(self) -> torch.Tensor:
        """(N,) the ids at position cur - 1: what the decoder reads next."""
        B, K, T = self.seqs.shape
        return self.seqs.view(B * K, T).index_select(1, (self.cur - 1).view(1))[:, 0]

    def output(self) -> GenerationOutput:
        """The result (the one host read of a search, after its last step)."""
        P = self.prompt_len
        if self.K == 1:
            seqs, lengths, scores = self.seqs[:, 0], self.lengths, self.scores[:, 0]
        else:
            seqs, lengths, scores = self.fin_seqs[:, 0], self.fin_len[:, 0], self.fin_scores[:, 0]
        rows, lengths = seqs[:, P:].tolist(), lengths.tolist()
        return GenerationOutput(tokens=[r[:n] for r, n in zip(rows, lengths)], scores=scores,
                                steps=int(self.steps))


def _masked_copy_(live: torch.Tensor, dst: torch.Tensor, new: torch.Tensor) -> None:
    if live.dim():  # one flag per slot (B,), against a (B, ...) tensor
        live = live.view(live.shape + (1,) * (dst.dim() - 1))
    dst.copy_(torch.where(live, new, dst))


def _greedy_update(logp_NV: torch.Tensor, st: SearchState, cfg: GenerationConfig, live: torch.Tensor,
                   cur: torch.Tensor) -> torch.Tensor:
    """The argmax token per row written at `cur` where `live` (pad once a row has emitted eos); scores, lengths,
    done and steps updated in place. live / cur: 0-dim (one search) or (B,) (per slot). Returns the tokens."""
    B, _, T = st.seqs.shape
    tok = logp_NV.argmax(-1)
    gained = logp_NV.gather(1, tok[:, None])[:, 0]
    done = st.done
    score = st.scores.view(B)
    _masked_copy_(live, score, score + torch.where(done, torch.zeros_like(gained), gained))
    seqs, at = st.seqs.view(B, T), cur.view(-1, 1).expand(B, 1)
    col = torch.where(done, torch.full_like(tok, cfg.pad_id), tok)
    seqs.scatter_(1, at, torch.where(live, col, seqs.gather(1, at)[:, 0])[:, None])
    st.lengths.add_((~done & live).long())
    done.logical_or_((tok == cfg.eos_id) & live)
    st.steps.add_(live.long())
    return tok


def greedy_step(logp_NV: torch.Tensor, st: SearchState, cfg: GenerationConfig) -> None:
    """One greedy step on the state, in place: the argmax token per row (pad once a row has emitted eos)."""
    _greedy_update(logp_NV, st, cfg, ~st.stopped, st.cur)
    st.stopped.logical_or_(st.done.all() | (st.cur + 1 == st.seqs.shape[-1]))
    st.cur.add_(1)


def _beam_update(logp_NV: torch.Tensor, st: SearchState, cfg: GenerationConfig, live: torch.Tensor,
                 cur: torch.Tensor, prompt_len, last: torch.Tensor):
    """The beam step's update of the state where `live` (the semantics are the module doc's). live, cur,
    prompt_len: 0-dim / int (one search) or (B,) (per slot); last: whether this is the last position, 0-dim or
    (B, 1). Returns (the (N,) row each running beam continues, the identity where not live; the new improvable
    (B, 1) and fin_done (B, K), for the caller's stop test)."""
    B, K, T = st.seqs.shape
    V = logp_NV.shape[-1]
    rows = cur.dim() == 1
    cand = (logp_NV.view(B, K, V) + st.scores[..., None]).view(B, K * V)
    top_scores, top_idx = cand.topk(2 * K, dim=1)
    src_beam, tok = top_idx // V, top_idx % V
    hits = (tok == cfg.eos_id) | last
    cand_seqs = st.seqs.gather(1, src_beam[..., None].expand(B, 2 * K, T))
    cand_seqs.scatter_(2, cur.view(-1, 1, 1).expand(B, 2 * K, 1), tok[..., None])
    # finished hypotheses: eos among the top K, while the item is open and can still improve
    finished = hits & st.top_k_mask
    full = st.fin_done.all(1, keepdim=True) & bool(cfg.early_stopping is True)
    gen = cur + 1 - prompt_len  # generated length with this token
    denom = st.denoms.index_select(0, gen.view(-1))  # (1,) or (B,) = (generated length) ** length_penalty
    if rows:
        denom = denom.view(B, 1)
    fin_cand = top_scores / denom
    fin_cand = fin_cand + (full | ~st.improvable | ~finished).to(fin_cand.dtype) * NEG
    merged = torch.cat([st.fin_scores, fin_cand], dim=1)
    keep = merged.topk(K, dim=1).indices
    fin_scores = merged.gather(1, keep)
    fin_seqs = torch.cat([st.fin_seqs, cand_seqs], 1).gather(1, keep[..., None].expand(B, K, T))
    fin_len = torch.cat([st.fin_len, gen.view(-1, 1).expand(B, 2 * K)], 1).gather(1, keep)
    fin_done = torch.cat([st.fin_done, finished], 1).gather(1, keep)
    # running beams: the best K continuations that did not finish
    running = top_scores + hits.to(top_scores.dtype) * NEG
    sel = running.topk(K, dim=1).indices
    run_scores = running.gather(1, sel)
    seqs = cand_seqs.gather(1, sel[..., None].expand(B, K, T))
    worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, NEG))
    improvable = st.improvable & (run_scores[:, :1] / denom > worst).any(1, keepdim=True)
    for dst, new in ((st.fin_scores, fin_scores), (st.fin_seqs, fin_seqs), (st.fin_len, fin_len),
                     (st.fin_done, fin_done), (st.scores, run_scores), (st.seqs, seqs), (st.improvable, improvable)):
        _masked_copy_(live, dst, new)
    index_N = (src_beam.gather(1, sel) + st.row_offset).view(-1)
    live_N = live[:, None].expand(B, K).reshape(B * K) if rows else live
    index_N = torch.where(live_N, index_N, torch.arange(B * K, device=cur.device))
    st.steps.add_(live.long())
    return index_N, improvable, fin_done


def beam_step(logp_NV: torch.Tensor, st: SearchState, cfg: GenerationConfig) -> torch.Tensor:
    """One beam step on the state, in place (the semantics are the module doc's). Returns the (N,) row each
    running beam continues, to reorder the decoder's caches by (the identity once the search has stopped)."""
    last = st.cur + 1 == st.seqs.shape[-1]
    index_N, improvable, fin_done = _beam_update(logp_NV, st, cfg, ~st.stopped, st.cur, st.prompt_len, last)
    stop = last | ~improvable.any()
    if cfg.early_stopping is True:
        stop = stop | fin_done.all()
    st.stopped.logical_or_(stop)
    st.cur.add_(1)
    return index_N


def search_step(logp_NV: torch.Tensor, st: SearchState, cfg: GenerationConfig) -> torch.Tensor | None:
    """Logits processing and one greedy / beam step (in place); the beam reorder index, None for greedy."""
    T = st.seqs.shape[-1]
    logp_NV = process_log_probs_at(logp_NV, st.seqs.view(-1, T), st.cur, st.prompt_len, T, cfg)
    if st.K == 1:
        greedy_step(logp_NV, st, cfg)
        return None
    return beam_step(logp_NV, st, cfg)


def decode_search_step(model, caches, cross, enc_layout: Layout, st: SearchState, cfg: GenerationConfig) -> None:
    """The whole cached step as one function of device tensors: the decoder on the token at cur - 1 (filling its
    cache slot), log-softmax and the logits processing, the search step, and the beam reorder of the caches by
    in-place gathers. No host read: torch.compile builds one graph of it, a CUDA graph replays it."""
    logits = model.decode_step(st.last_ids(), st.cur - 1, caches, cross, enc_layout, st.K)
    index_N = search_step(log_probs(logits), st, cfg)
    if index_N is not None:
        reorder_rows_([t for cache in caches for t in (cache.k, cache.v)], index_N)


_COMPILED: dict[tuple, object] = {}


def compiled_step(backend: str = "inductor", fn=None):
    """decode_search_step (or `fn`, e.g. continuous_step) under torch.compile (static shapes, one graph), built
    once per backend and shared by every generate call (torch.compile recompiles only for new shapes or a new
    model)."""
    fn = fn or decode_search_step
    key = (fn.__name__, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)
    return _COMPILED[key]


class StepRunner:
    """Runs decode_search_step (or `step`, with its signature: continuous_step): eager, compiled, or (CUDA)
    captured once in a CUDA graph and replayed. `dec` has .model, .caches, .cross and .enc_layout."""

    def __init__(self, dec, st: SearchState, cfg: GenerationConfig, *, compile: bool | str = False,
                 cuda_graph: bool = False, step=None):
        self.dec, self.st, self.cfg = dec, st, cfg
        self.fn = step or decode_search_step
        if compile:
            self.fn = compiled_step("inductor" if compile is True else compile, self.fn)
        self.graph = None
        if cuda_graph and st.seqs.device.type == "cuda":
            self.graph = self._capture()

    def _call(self, st: SearchState, caches) -> None:
        self.fn(self.dec.model, caches, self.dec.cross, self.dec.enc_layout, st, self.cfg)

    def _capture(self):
        # warm up (cuBLAS workspaces, compiled kernels) on copies of the state and caches, so the real search is
        # untouched; then capture on the real tensors (capture records the kernels without running them)
        from .modules import KVCache

        spare_st = self.st.clone()
        spare = [KVCache(c.k.clone(), c.v.clone()) for c in self.dec.caches]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._call(spare_st, spare)
        torch.cuda.current_stream().wait_stream(stream)
        del spare_st, spare
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._call(self.st, self.dec.caches)
        return graph

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._call(self.st, self.dec.caches)


def run_search(dec, prompt_BP: torch.Tensor, cfg: GenerationConfig, dtype: torch.dtype, *,
               compile: bool | str = False, cuda_graph: bool = False) -> GenerationOutput:
    """Greedy (num_beams 1) or beam search. The host learns whether the search is over every cfg.sync_every
    steps (one read of `stopped`); the steps in between read nothing, and those after the end change nothing."""
    st = SearchState.start(prompt_BP, cfg, dtype)
    B, K, T = st.seqs.shape
    P = st.prompt_len
    if isinstance(dec, FullDecoder):  # the published path: host-driven shapes, so it looks after every step
        for cur in range(P, T):
            search_step(log_probs(dec.logits(st.seqs.view(B * K, T)[:, :cur])), st, cfg)
            if bool(st.stopped):
                break
        return st.output()
    dec.prefill(st.seqs.view(B * K, T)[:, :P])
    step = StepRunner(dec, st, cfg, compile=compile, cuda_graph=cuda_graph)
    for i in range(1, cfg.max_new_tokens + 1):
        step()
        if i % cfg.sync_every == 0 and i < cfg.max_new_tokens and bool(st.stopped):
            break
    return st.output()


# ---- continuous batching: a decode batch of slots kept full ----------------------------------------------


def slot_search_step(logp_NV: torch.Tensor, st: SearchState, cfg: GenerationConfig,
                     live: torch.Tensor) -> torch.Tensor | None:
    """search_step per slot (st from SearchState.for_slots): slot b at its own position cur[b], with its own
    prompt length and limit, searched where live[b]; a slot whose request is over is marked stopped. The same
    arithmetic as search_step, row by row, so a request's tokens and scores are those of a static batch."""
    B, K, T = st.seqs.shape
    rows = lambda x: x[:, None].expand(B, K).reshape(B * K)  # per slot (B,) -> per row (N,)
    # slots that do not search now (not live) are kept in range for the gathers, scatters and the denominator
    # table, which write nothing for them: a slot that is over sits at cur = its limit (one past its last
    # position), a slot reading its prompt below plen
    cur = torch.minimum(torch.maximum(st.cur, st.plen), st.limit - 1)
    logp_NV = process_log_probs_at(logp_NV, st.seqs.view(-1, T), rows(cur), rows(st.plen), rows(st.limit), cfg)
    last = cur + 1 == st.limit
    if K == 1:
        _greedy_update(logp_NV, st, cfg, live, cur)
        st.stopped.logical_or_((st.done | last) & live)
        return None
    index_N, improvable, fin_done = _beam_update(logp_NV, st, cfg, live, cur, st.plen, last[:, None])
    over = last | ~improvable[:, 0]
    if cfg.early_stopping is True:
        over = over | fin_done.all(1)
    st.stopped.logical_or_(over & live)
    return index_N


def continuous_step(model, caches, cross, enc_layout: Layout, st: SearchState, cfg: GenerationConfig) -> None:
    """decode_search_step per slot, one function of device tensors (no host read; compiled / captured alike):
    every row feeds the token at its own cur - 1 at that position (a (N,) position tensor through the decoder);
    a slot still reading its prompt (cur < plen) only advances, the others search; stopped slots change nothing
    (they re-read a position they already hold) and stay where they are."""
    B, K, T = st.seqs.shape
    N = B * K
    moving = ~st.stopped
    pos_N = (st.cur - 1)[:, None].expand(B, K).reshape(N)
    ids_N = st.seqs.view(N, T).gather(1, pos_N[:, None])[:, 0]
    logits = model.decode_step(ids_N, pos_N, caches, cross, enc_layout, K)
    index_N = slot_search_step(log_probs(logits), st, cfg, moving & (st.cur >= st.plen))
    if index_N is not None:
        reorder_rows_([t for cache in caches for t in (cache.k, cache.v)], index_N)
    st.cur.add_(moving.long())


class SlotDecoder:
    """The decoder side of continuous batching, for StepRunner: B slots x K beams rows of self-attention caches,
    and per slot the cross K/V of every layer (in the step context of decoder.step_layers: (B, Hk, S, D) per layer)
    and the encoder key mask (B, S), S = the longest encoder sequence of the run. `load` puts a new
    request's encoder states into a slot, in place (the addresses a CUDA graph captured stay valid)."""

    def __init__(self, model, slots: int, beams: int, enc_len: int, max_len: int, dtype, device):
        cfg = model.cfg.decoder
        if cfg.kind == "bart" and max_len > cfg.max_positions:
            raise ValueError(f"decoder prompt + max_new_tokens = {max_len} positions exceeds the BART decoder's "
                             f"{cfg.max_positions} learned positions")
        self.model, self.beams = model, beams
        attns = [layer.encoder_attn for layer in model.decoder.layers]
        widths = [w.shape[0] for a in attns for w in (a.k_proj.weight, a.v_proj.weight)]
        kv = torch.zeros(slots, enc_len, sum(widths), dtype=dtype, device=device).split(widths, dim=-1)
        # the step context (decoder.step_layers): per layer the cross K/V (slots, Hk, S, D), which `load` fills
        self.cross = model.decoder.step_layers([(kv[2 * i], kv[2 * i + 1]) for i in range(len(attns))])
        self.mask = torch.zeros(slots, enc_len, dtype=torch.bool, device=device)
        self.mask[:, 0] = True  # an idle slot sees one (zero) key: finite numbers in rows nobody reads
        self.enc_layout = Layout(mask=self.mask)
        self.caches = model.decoder.allocate_cache(slots * beams, max_len, dtype, device)

    def load(self, slots: Sequence[int], enc: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> None:
        """Encoder states enc[j] (S_j, d) with key mask masks[j] (S_j,) bool (None: all real) into slot slots[j]
        (their cross K/V from one GEMM); those slots' self-attention cache rows are cleared."""
        S, S_max = max(e.shape[0] for e in enc), self.mask.shape[1]
        if S > S_max:
            raise ValueError(f"encoder sequence of {S} tokens exceeds the {S_max} slots allocated")
        enc_BSd = enc[0].new_zeros(len(enc), S, enc[0].shape[-1])
        for j, e in enumerate(enc):
            enc_BSd[j, :e.shape[0]] = e
        pairs = self.model.decoder.cross_kv(enc_BSd)  # one GEMM for every layer
        K = self.beams
        for ctx, (k, v) in zip(self.cross, pairs):
            for dst, src in ((ctx.cross_k, k), (ctx.cross_v, v)):
                src = cross_heads(src, dst.shape[1])  # (len(enc), Hk, S, D)
                for j, b in enumerate(slots):
                    n = enc[j].shape[0]
                    dst[b, :, :n] = src[j, :, :n]
                    dst[b, :, n:] = 0
        for j, b in enumerate(slots):
            n = enc[j].shape[0]
            self.mask[b, :n] = True if masks[j] is None else masks[j]
            self.mask[b, n:] = False
            for cache in self.caches:
                cache.reset_rows_(b * K, (b + 1) * K)


@dataclass
class Job:
    """One request of continuous batching. `pixels` (3, H, W), or a function returning them, called when the job
    gets a slot (what it raises becomes the job's result: batch mode's error row); `input_ids` (L,) the encoder
    prompt; `decoder_prompt` default [start]; `max_new_tokens` default the config's."""

    input_ids: torch.Tensor | Sequence[int]
    pixels: object
    decoder_prompt: Sequence[int] | None = None
    max_new_tokens: int | None = None


@dataclass
class JobResult:
    tokens: list[int]  # generated ids after the decoder prompt (as GenerationOutput.tokens[b])
    score: float  # as GenerationOutput.scores[b]
    steps: int  # search steps of this request
    slot: int  # the slot it ran in


@dataclass
class ContinuousOutput:
    results: list  # per job, in job order: a JobResult, or the exception the job raised
    steps: int = 0  # decode steps run (all slots together)
    refills: int = 0  # jobs that took a slot another job had used before


@torch.no_grad()
def generate_continuous(model, jobs: Sequence[Job], *, slots: int, config: GenerationConfig | None = None,
                        enc_pad_id: int = 1, compile: bool | str = False, cuda_graph: bool = False,
                        on_result=None) -> ContinuousOutput:
    """Continuous batching: `slots` requests decode together (N = slots x beams rows), each at its own position;
    when a slot's request is over (greedy: eos or its limit; beam: its item done, as in a static batch), the host
    (every cfg.sync_every steps, and at the step where a request reaches its limit) takes its result, runs the
    next jobs' images through the vision tower + encoder (encoded ahead, `slots` jobs at a time in job order, as
    static batches would encode them), writes their cross K/V and encoder mask into the freed slots and clears
    those slots' self-attention rows; decoder prompts are read token by token through the same step (the other
    slots decode meanwhile). Each job's
    tokens and scores are those of a static batch (generate) of that job, up to float rounding
    (tests/test_continuous.py). `on_result(i, result)` is called as each job finishes (a JobResult, or the
    exception its pixels / encoder raised). `enc_pad_id` pads encoder prompts (masked)."""
    from collections import deque

    cfg = (config or GenerationConfig.for_model(model.cfg)).validate()
    if not jobs:
        raise ValueError("generate_continuous: no jobs")
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if model.training:
        raise ValueError("generate needs the model in eval mode (model.eval()): dropout would make it random")
    prompts, limits = [], []
    for i, job in enumerate(jobs):
        prompt = [cfg.start_id] if job.decoder_prompt is None else list(job.decoder_prompt)
        if not prompt:
            raise ValueError(f"job {i}: decoder prompt is empty: it needs at least the start token")
        m = cfg.max_new_tokens if job.max_new_tokens is None else job.max_new_tokens
        if m < 1:
            raise ValueError(f"job {i}: max_new_tokens must be >= 1, got {m}")
        prompts.append(prompt)
        limits.append(m)
    param = next(model.parameters())
    dev, K = param.device, cfg.num_beams
    ids = [torch.as_tensor(job.input_ids, dtype=torch.long) for job in jobs]
    T = max(len(p) + m for p, m in zip(prompts, limits))
    B = min(slots, len(jobs))
    st = SearchState.for_slots(B, K, T, cfg, torch.promote_types(model.decoder.embed_tokens.weight.dtype,
                                                                 torch.float32), dev)
    out = ContinuousOutput(results=[None] * len(jobs))
    dec: SlotDecoder | None = None
    runner: StepRunner | None = None
    slot_job: list[int | None] = [None] * B
    used = [False] * B
    # the decode step (out.steps) by which slot b's request is over at the latest: its limit, P + max_new - 1
    # steps after it took the slot. The host checks then at the latest (a request that reaches its limit is
    # replaced at once), else every cfg.sync_every steps (a request that ends on eos waits < sync_every steps)
    ends = [0] * B
    pending = deque(range(len(jobs)))

    def finish(i: int, result) -> None:
        out.results[i] = result
        if on_result is not None:
            on_result(i, result)

    def encode(idx: list[int], pixels: list[torch.Tensor]):
        L = max(ids[i].shape[0] for i in idx)
        ids_BL = torch.full((len(idx), L), enc_pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(idx), L), dtype=torch.bool)
        for j, i in enumerate(idx):
            ids_BL[j, :ids[i].shape[0]], mask_BL[j, :ids[i].shape[0]] = ids[i], True
        px = torch.stack(pixels).to(dev, param.dtype)
        return model.encode(px, ids_BL.to(dev), mask_BL.to(dev))

    ready: deque = deque()  # (job, encoder states (S, d), key mask (S,) or None): encoded ahead of their slot
    n_img = 0  # image tokens per image (the encoder sequence is image tokens + prompt)

    def encode_ahead() -> None:
        """The next B pending jobs through the vision tower + encoder as one batch, as a static batch of them would
        run (one small batch per freed slot cost 1.3x per image, measured on `small`); a job whose pixels or
        encoder fail is finished with that exception."""
        nonlocal n_img
        take = []
        while pending and len(take) < B:
            i = pending.popleft()
            try:
                job = jobs[i]
                take.append((i, torch.as_tensor(job.pixels() if callable(job.pixels) else job.pixels)))
            except Exception as exc:  # noqa: BLE001 - the job's own failure is its result
                finish(i, exc)
        if not take:
            return
        try:
            groups = [(take, *encode([i for i, _ in take], [p for _, p in take]))]
        except Exception:  # noqa: BLE001 - find the failing job(s): one at a time
            groups = []
            for i, px in take:
                try:
                    groups.append(([(i, px)], *encode([i], [px])))
                except Exception as exc:  # noqa: BLE001
                    finish(i, exc)
        for group, enc, layout in groups:
            n_img = enc.shape[1] - max(ids[i].shape[0] for i, _ in group)
            for j, (i, _) in enumerate(group):
                ready.append((i, enc[j], None if layout.mask is None else layout.mask[j]))

    def fill() -> None:
        nonlocal dec, runner
        free = [b for b in range(B) if slot_job[b] is None]
        take = []
        while len(take) < len(free) and (ready or pending):
            if not ready:
                encode_ahead()
                continue
            take.append(ready.popleft())
        if not take:
            return
        if dec is None:
            dec = SlotDecoder(model, B, K, n_img + max(t.shape[0] for t in ids), T, take[0][1].dtype, dev)
        bs = free[:len(take)]
        dec.load(bs, [e for _, e, _ in take], [m for _, _, m in take])
        for b, (i, _, _) in zip(bs, take):
            st.refill_(b, prompts[i], limits[i], cfg.pad_id)
            ends[b] = out.steps + len(prompts[i]) + limits[i] - 1
            out.refills += used[b]
            used[b], slot_job[b] = True, i
        if runner is None:
            runner = StepRunner(dec, st, cfg, compile=compile, cuda_graph=cuda_graph, step=continuous_step)

    fill()
    while any(j is not None for j in slot_job):
        n = min(cfg.sync_every, min(ends[b] for b in range(B) if slot_job[b] is not None) - out.steps)
        for _ in range(max(1, n)):
            runner()
        out.steps += max(1, n)
        stopped = st.stopped.tolist()  # the one host read per cfg.sync_every steps
        over = [b for b in range(B) if slot_job[b] is not None and stopped[b]]
        if over:
            for b, (toks, sc, n) in zip(over, st.slot_results(over)):
                i, slot_job[b] = slot_job[b], None
                finish(i, JobResult(tokens=toks, score=sc, steps=n, slot=b))
            fill()
    return out


# ---- the entry points ------------------------------------------------------------------------------------


def _decoder_prompt(prompt, B: int, cfg: GenerationConfig, device) -> torch.Tensor:
    ids = [cfg.start_id] if prompt is None else list(prompt)
    if not ids:
        raise ValueError("decoder prompt is empty: it needs at least the start token")
    return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(B, -1).contiguous()


@torch.no_grad()
def generate(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None, *,
             decoder_prompt: Sequence[int] | None = None, config: GenerationConfig | None = None,
             cache: bool = True, cuda_graph: bool = False, compile: bool | str = False) -> GenerationOutput:
    """Beam search (num_beams > 1) or greedy search for a padded batch of images + encoder prompts.

    `decoder_prompt`: ids shared by the batch, default [start] = [1]; for a caption prefix
    [1, 2, *prefix ids] (what generated text then continues). `cache=False` runs the full-recompute path.
    `compile`: torch.compile the whole cached step (decoder + search, decode_search_step) with inductor, or with
    the torch.compile backend named (e.g. "aot_eager"); `cuda_graph` (CUDA): capture that step in one CUDA graph
    and replay it. Both only apply with cache=True; the tokens are the eager step's.
    """
    cfg = (config or GenerationConfig.for_model(model.cfg)).validate()
    if pixel_values.shape[0] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"empty batch: {pixel_values.shape[0]} images and {input_ids.shape[0]} prompts")
    if model.training:
        raise ValueError("generate needs the model in eval mode (model.eval()): dropout would make it random")
    enc, enc_layout = model.encode(pixel_values, input_ids, attention_mask)
    B = enc.shape[0]
    prompt = _decoder_prompt(decoder_prompt, B, cfg, enc.device)
    max_len = prompt.shape[1] + cfg.max_new_tokens
    K = cfg.num_beams
    if cache:
        dec = CachedDecoder(model, enc, enc_layout, K, max_len)
    else:
        dec = FullDecoder(model, enc, enc_layout, K)
    dtype = torch.promote_types(model.decoder.embed_tokens.weight.dtype, torch.float32)  # the log-probs' dtype
    return run_search(dec, prompt, cfg, dtype, compile=compile if cache else False, cuda_graph=cuda_graph and cache)


@dataclass
class ScoreOutput:
    logprob: torch.Tensor  # (B,) sum of log p(label token) over the real label tokens (float32 or wider)
    tokens: torch.Tensor  # (B,) number of real label tokens
    token_logprobs: torch.Tensor = field(repr=False, default=None)  # (B, L), 0 on padding

    @property
    def nll(self) -> torch.Tensor:
        """Mean token cross-entropy (nats / token)."""
        return -self.logprob / self.tokens

    @property
    def perplexity(self) -> torch.Tensor:
        return torch.exp(self.nll)


@torch.no_grad()
def score(model, pixel_values, input_ids, attention_mask, labels_BL: torch.Tensor) -> ScoreOutput:
    """Log-likelihood of each row's labels ([bos, t1..tn, eos], -100 padded) given its image and prompt, by
    teacher forcing (decoder input = labels shifted right). One forward for the whole batch."""
    if labels_BL.shape[0] == 0:
        raise ValueError("score: empty batch")
    dec_in = shift_right(labels_BL)
    logits = model(pixel_values, input_ids, dec_in, attention_mask=attention_mask).logits
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    real = labels_BL != IGNORE_INDEX
    tok_lp = logp.gather(-1, labels_BL.clamp(min=0)[..., None])[..., 0] * real
    return ScoreOutput(logprob=tok_lp.sum(1), tokens=real.sum(1), token_logprobs=tok_lp)


# ---- text level: tokenizers, prompts, images ------------------------------------------------------------


@dataclass
class Request:
    image: str | Path
    task: str = "caption"
    lang: str = "en"
    src: str | None = None  # source text for task "translate"
    id: str | None = None
    line: int | None = None  # line in the batch file (read_requests), the request's key when it has no id


def check_request(r: Request, where: str = "request", *, image: bool = True) -> None:
    if r.task not in TASKS:
        raise ValueError(f"{where}: unknown task {r.task!r}, expected one of {TASKS}")
    if r.lang not in LANGUAGES:
        raise ValueError(f"{where}: unknown language {r.lang!r}, expected one of {tuple(LANGUAGES)}")
    if r.task == "translate" and not (r.src or "").strip():
        raise ValueError(f"{where}: task 'translate' needs a non-empty 'src'")
    if image and not Path(r.image).is_file():
        raise FileNotFoundError(f"{where}: image file not found: {r.image}")


def capitalise(text: str) -> str:
    """First letter upper-case (SPEC §9: as the reports show captions)."""
    return text[:1].upper() + text[1:]


class Pipeline:
    """A loaded model with its tokenizers: text in, text out."""

    def __init__(self, model, enc_tok, dec_tok, *, device=None, config: GenerationConfig | None = None,
                 cuda_graph: bool = False, compile: bool = False):
        self.model, self.enc_tok, self.dec_tok = model, enc_tok, dec_tok
        self.compile = compile
        self.device = device or next(model.parameters()).device
        self.config = config or GenerationConfig.for_model(model.cfg)
        self.cuda_graph = cuda_graph
        for side, tok, vocab in (("encoder", enc_tok, model.cfg.encoder.vocab_size),
                                 ("decoder", dec_tok, model.cfg.decoder.vocab_size)):
            if tok.vocab_size > vocab:
                raise ValueError(f"{side} tokenizer {tok.path} has {tok.vocab_size} tokens but the model's "
                                 f"{side} vocabulary has {vocab} rows")

    def _inputs(self, images, prompts: list[str]):
        from .images import preprocess

        pixels = preprocess(list(images), self.model.cfg.image_size)
        ids, mask = pad_batch([encode_prompt(self.enc_tok, p) for p in prompts], self.enc_tok.pad_id)
        dtype = next(self.model.parameters()).dtype
        return pixels.to(self.device, dtype), ids.to(self.device), mask.to(self.device)

    def generate(self, requests: Sequence[Request], prefix: bool = False) -> list[dict]:
        """One batch of requests. With `prefix`, captions start from the language's SPEC §6 prefix (forcing
        the language), which is stripped from the text; requests are grouped by prefix (one decoder prompt
        per generate call)."""
        if not requests:
            raise ValueError("generate: empty batch (no requests)")
        results: list[dict | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(self._decoder_prompt(r, prefix)), []).append(i)
        for dprompt, idx in groups.items():
            rs = [requests[i] for i in idx]
            pixels, ids, mask = self._inputs([r.image for r in rs], [prompt_for(r.task, r.lang, r.src) for r in rs])
            out = generate(self.model, pixels, ids, mask, decoder_prompt=dprompt, config=self.config,
                           cuda_graph=self.cuda_graph, compile=self.compile)
            for j, i in enumerate(idx):
                results[i] = self._row(requests[i], dprompt, out.tokens[j], float(out.scores[j]))
        return results

    def _row(self, r: Request, dprompt: Sequence[int], tokens: list[int], score: float) -> dict:
        text = self.dec_tok.decode(list(dprompt[1:]) + tokens)
        if len(dprompt) > 1:
            from .text import strip_prefix

            text = strip_prefix(text, r.lang)
        return {"id": r.id, "image": str(r.image), "task": r.task, "lang": r.lang, "text": capitalise(text.strip()),
                "score": score, "tokens": len(tokens)}

    def generate_continuous(self, requests: Sequence[Request], *, slots: int, prefix: bool = False,
                            on_row=None) -> list[dict]:
        """The requests through continuous batching (generate_continuous: `slots` images decoding at once, a
        finished one's slot refilled with the next request). Rows as `generate` makes them, in request order; a
        request that fails (its image does not load or decode, its prompt or encoder raises) is an exception
        in its place, not a row. `on_row(i, row_or_exception)` is called as each request finishes."""
        from .images import preprocess

        if not requests:
            raise ValueError("generate: empty batch (no requests)")
        size = self.model.cfg.image_size
        jobs, prompts, out = [], [], [None] * len(requests)
        index = []  # job -> request
        for i, r in enumerate(requests):
            try:
                ids = encode_prompt(self.enc_tok, prompt_for(r.task, r.lang, r.src))
                dprompt = self._decoder_prompt(r, prefix)
            except Exception as exc:  # noqa: BLE001 - the request's own failure is its result
                out[i] = exc
                if on_row is not None:
                    on_row(i, exc)
                continue
            jobs.append(Job(input_ids=ids, pixels=lambda r=r: preprocess([r.image], size)[0], decoder_prompt=dprompt))
            prompts.append(dprompt)
            index.append(i)

        def done(j: int, res) -> None:
            i = index[j]
            out[i] = res if isinstance(res, BaseException) else self._row(requests[i], prompts[j], res.tokens,
                                                                         res.score)
            if on_row is not None:
                on_row(i, out[i])

        if jobs:
            generate_continuous(self.model, jobs, slots=slots, config=self.config, enc_pad_id=self.enc_tok.pad_id,
                                compile=self.compile, cuda_graph=self.cuda_graph, on_result=done)
        return out

    def _decoder_prompt(self, r: Request, prefix: bool) -> list[int]:
        c = self.config
        if prefix and r.task != "translate":
            return [c.start_id, c.bos_id] + self.dec_tok.encode(CAPTION_PREFIXES[r.lang])
        return [c.start_id]

    def score(self, triples: Sequence[tuple], batch_size: int = 16) -> list[dict]:
        """(image, encoder prompt text, candidate text) triples -> log-likelihood, tokens, perplexity each."""
        from .text import make_labels, pad_labels

        out = []
        for s in range(0, len(triples), batch_size):
            chunk = triples[s:s + batch_size]
            pixels, ids, mask = self._inputs([t[0] for t in chunk], [t[1] for t in chunk])
            labels = pad_labels([make_labels(self.dec_tok, t[2]) for t in chunk]).to(self.device)
            res = score(self.model, pixels, ids, mask, labels)
            for j in range(len(chunk)):
                out.append({"logprob": float(res.logprob[j]), "tokens": int(res.tokens[j]),
                            "nll": float(res.nll[j]), "perplexity": float(res.perplexity[j])})
        return out


def load_pipeline(ckpt, *, tokenizers=None, preset: str | None = None, device="cpu", dtype=None,
                  config: GenerationConfig | None = None, cuda_graph: bool = False, compile: bool = False) -> Pipeline:
    """A checkpoint directory (config.json + safetensors: this engine's layout or a released checkpoint's, see
    convert.load_pretrained) and its tokenizers (DIR with encoder/ and decoder/; default: CKPT/tokenizers, then
    CKPT/../tokenizers). `preset`, if given, must be the checkpoint's (a guard against pointing at the wrong
    model)."""
    from .config import FlorenzConfig
    from .convert import CONFIG_NAME, _read_json, is_released_config, load_pretrained
    from .text import load_decoder_tokenizer, load_encoder_tokenizer

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt}")
    if not (ckpt / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{ckpt}: no {CONFIG_NAME} (not a florenz-fast checkpoint directory)")
    raw = _read_json(ckpt / CONFIG_NAME)
    cfg = None if is_released_config(raw) else FlorenzConfig.load(ckpt / CONFIG_NAME)
    if cfg is None:  # released layout: load_pretrained maps its config (and reads the image size beside it)
        model = load_pretrained(ckpt, dtype=dtype, device=device)
        cfg = model.cfg
    else:
        model = None
    if preset is not None and cfg.name != preset:
        raise ValueError(f"{ckpt / CONFIG_NAME}: checkpoint is preset {cfg.name!r}, but --preset {preset!r} "
                         f"was asked for")
    if tokenizers is None:
        found = [d for d in (ckpt / "tokenizers", ckpt.parent / "tokenizers") if d.is_dir()]
        if not found:
            raise FileNotFoundError(f"no tokenizers for {ckpt}: looked for {ckpt / 'tokenizers'} and "
                                    f"{ckpt.parent / 'tokenizers'}; pass --tokenizers DIR (with encoder/ and decoder/)")
        tokenizers = found[0]
    tokenizers = Path(tokenizers)
    enc_tok = load_encoder_tokenizer(tokenizers / "encoder")
    dec_tok = load_decoder_tokenizer(tokenizers / "decoder")
    if model is None:
        model = load_pretrained(ckpt, dtype=dtype, device=device, config=cfg)
    return Pipeline(model, enc_tok, dec_tok, device=torch.device(device), config=config, cuda_graph=cuda_graph,
                    compile=compile)


# ---- command line: requests in, result rows out -----------------------------------------------------------


def read_requests(path: str | Path, *, check_images: bool = True) -> list[Request]:
    """JSONL rows {"image": path, "task": "caption", "lang": "de", "src": ..., "id": ...}; relative image
    paths are read from the file's directory. Errors name the file, the line and the key. Each Request keeps its
    line number; ids must be unique (a re-run matches results to requests by id). With `check_images=False` a
    missing image file is left for the run to report (batch mode turns it into an error row)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch file not found: {path}")
    out, seen = [], {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or "image" not in row:
            raise ValueError(f"{where}: each row must be an object with key 'image'")
        unknown = sorted(set(row) - {"image", "task", "lang", "src", "id"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: image, task, lang, src, id")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        r = Request(image=image, task=row.get("task", "caption"), lang=row.get("lang", "en"),
                    src=row.get("src"), id=None if row.get("id") is None else str(row["id"]), line=n)
        if r.id is not None:
            if r.id in seen:
                raise ValueError(f"{where}: id {r.id!r} repeats line {seen[r.id]} (ids must be unique)")
            seen[r.id] = n
        check_request(r, where, image=check_images)
        out.append(r)
    if not out:
        raise ValueError(f"{path}: empty batch (no rows)")
    return out


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


PARTIAL_EXIT = 3  # batch mode: the run finished, every request has a row, and some rows are errors


def _key(id_: str | None, line: int | None) -> tuple:
    """How a result row finds its request again on a re-run: its id, else its line in the batch file."""
    return ("id", id_) if id_ is not None else ("line", line)


def error_row(r: Request, exc: BaseException) -> dict:
    """The row of a request that failed: what the request was and one line saying why."""
    if cli.debugging():
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    return {"id": r.id, "line": r.line, "image": str(r.image), "task": r.task, "lang": r.lang,
            "error": cli.error_message(exc)}


def generate_rows(pipe: Pipeline, requests: Sequence[Request], prefix: bool = False) -> list[dict]:
    """One chunk of a batch, never raising for a request's own failure: rows in request order, a failed request
    (unreadable image, decompression bomb, a generate error) as an `error_row`. The chunk first runs as one
    batch; if that fails, the requests whose image does not decode become error rows and the rest runs again as
    one batch, then one by one if it still fails. KeyboardInterrupt (and SystemExit) stop the run."""
    from .images import load_image

    def ok(rs: Sequence[Request]) -> list[dict]:
        return [{"id": row["id"], "line": r.line, **{k: v for k, v in row.items() if k != "id"}}
                for r, row in zip(rs, pipe.generate(rs, prefix=prefix))]

    try:
        return ok(requests)
    except Exception as exc:  # noqa: BLE001 - any failure of a request becomes its error row
        if len(requests) == 1:
            return [error_row(requests[0], exc)]
    rows: list[dict | None] = [None] * len(requests)
    good = []
    for j, r in enumerate(requests):
        try:
            load_image(r.image)
            good.append(j)
        except Exception as exc:  # noqa: BLE001 - FileNotFoundError or ValueError naming the file, as a row
            rows[j] = error_row(r, exc)
    if good:
        try:
            again = ok([requests[j] for j in good])
        except Exception:  # noqa: BLE001 - the batch still fails: find the request(s) one at a time
            again = [generate_rows(pipe, [requests[j]], prefix)[0] for j in good]
        for j, row in zip(good, again):
            rows[j] = row
    return rows


def _read_rows(path: Path, truncated_tail_ok: bool) -> list[tuple[int, dict]]:
    """(line number, row) of a results file; a cut last line is dropped where `truncated_tail_ok` (a partial file
    of a killed run); any other malformed line is a UsageError naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if truncated_tail_ok and n == len(lines):
                break
            raise cli.UsageError(f"{path}:{n}: not a JSON row; --out names a file that is not generate's results "
                                 "(choose another --out or remove it)") from None
        if not isinstance(row, dict) or "id" not in row or not ({"text", "error"} & set(row)):
            raise cli.UsageError(f"{path}:{n}: not a generate result row (needs 'id' and 'text' or 'error'); "
                                 "choose another --out or remove it")
        out.append((n, row))
    return out


def previous_results(out: Path, requests: Sequence[Request]) -> dict[int, dict]:
    """Rows a previous run with this --out already produced, by request index: from OUT (a finished run) and
    OUT.partial (a killed or failed one; newer, so it wins). Only successful rows count as done (error rows are
    retried). A row that matches no request, or whose image has another file name, is a UsageError: the file
    belongs to another batch, and it is not ours to drop."""
    index = {_key(r.id, r.line): i for i, r in enumerate(requests)}
    found: dict[int, dict] = {}
    for path, partial in ((out, False), (partial_path(out), True)):
        if not path.is_file():
            continue
        for n, row in _read_rows(path, partial):
            i = index.get(_key(row.get("id"), row.get("line")))
            if i is None or Path(str(row.get("image", ""))).name != Path(requests[i].image).name:
                what = f"id {row.get('id')!r}" if row.get("id") is not None else f"line {row.get('line')}"
                raise cli.UsageError(f"{path}:{n}: the row for {what} ({row.get('image')}) matches no request of "
                                     "this batch; --out holds another batch's results (choose another --out)")
            if "error" in row:
                found.pop(i, None)
            else:
                found[i] = row
    return found


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


class _RowSink:
    """Where batch rows go as they are made: appended and flushed per chunk to OUT.partial (fsync'd, so a killed
    run keeps every finished chunk), or printed to stdout without --out."""

    def __init__(self, out: Path | None, done: list[dict]):
        self.out, self.file = out, None
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        part = partial_path(out)
        write_jsonl_atomic(part, done)  # the rows kept from before, then this run's rows appended
        self.file = part.open("a", encoding="utf-8")

    def add(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self.file is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        self.file.write(text)
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self, rows: list[dict]) -> None:
        """All rows in request order into OUT (atomic rename); the partial file goes."""
        if self.file is None:
            return
        self.file.close()
        write_jsonl_atomic(self.out, rows)
        partial_path(self.out).unlink(missing_ok=True)

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


def _continuous_rows(pipe: Pipeline, requests: Sequence[Request], idx: list[int], *, slots: int, prefix: bool,
                     add, log) -> None:
    """Batch mode's continuous path: requests[idx] through Pipeline.generate_continuous, each row handed to
    `add(i, row)` as it is made (a failed request as its error_row). If the run itself fails (not a request's
    own failure: e.g. the decode step raising), the requests without a row go through the static chunks of
    generate_rows, which find the failing request(s)."""
    got: set[int] = set()

    def on_row(j: int, res) -> None:
        i = idx[j]
        got.add(i)
        r = requests[i]
        if isinstance(res, BaseException):
            add(i, error_row(r, res))
        else:
            add(i, {"id": res["id"], "line": r.line, **{k: v for k, v in res.items() if k != "id"}})

    try:
        pipe.generate_continuous([requests[i] for i in idx], slots=slots, prefix=prefix, on_row=on_row)
    except Exception as exc:  # noqa: BLE001 - the rest runs in static chunks, where failures become rows
        left = [i for i in idx if i not in got]
        log(f"generate: continuous batching failed ({cli.error_message(exc)}); the {len(left)} requests left run "
            "in static batches")
        for s in range(0, len(left), slots):
            part = left[s:s + slots]
            for i, row in zip(part, generate_rows(pipe, [requests[i] for i in part], prefix)):
                add(i, row)


def run_batch(pipe: Pipeline, requests: Sequence[Request], *, out: Path | None, batch_size: int,
              prefix: bool = False, done: dict[int, dict] | None = None, log=None, continuous: bool = False) -> int:
    """Batch mode (docs/generation-and-eval.md, "Batch mode"): every request gets a row, a result or an error;
    rows are kept as they are made; a re-run with the same `out` skips the requests already done (`done`:
    previous_results, read here when not given). Exit status 0, or PARTIAL_EXIT (3) when some rows are errors.
    `continuous`: batch_size slots kept full by continuous batching (rows are made, and kept, in the order the
    requests finish: flushed every batch_size rows)."""
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if done is None:
        done = previous_results(out, requests) if out is not None else {}
    if done:
        log(f"generate: resuming {out}: {len(done)} of {len(requests)} requests already done, skipped")
    rows = dict(done)
    sink = _RowSink(out, [done[i] for i in sorted(done)])
    todo = len(requests) - len(done)
    try:
        with tqdm(total=todo, desc="generate", unit="img", disable=todo <= 1) as bar:
            if continuous and todo:
                held: list[dict] = []

                def add(i: int, row: dict) -> None:
                    rows[i] = row
                    held.append(row)
                    bar.update(1)
                    if len(held) >= batch_size:
                        sink.add(held)
                        held.clear()

                try:
                    _continuous_rows(pipe, requests, [i for i in range(len(requests)) if i not in done],
                                     slots=batch_size, prefix=prefix, add=add, log=log)
                finally:  # an interrupted run keeps the rows it has
                    if held:
                        sink.add(held)
                requests_left: Sequence[Request] = ()
            else:
                requests_left = requests
            # chunks are cut from the whole batch, not from what is left, so that a resumed run batches the
            # requests it still has exactly as one clean run would (the same padding, so the same numbers)
            for s in range(0, len(requests_left), batch_size):
                idx = [i for i in range(s, min(s + batch_size, len(requests))) if i not in done]
                if not idx:
                    continue
                made = generate_rows(pipe, [requests[i] for i in idx], prefix)
                sink.add(made)
                rows.update(zip(idx, made))
                bar.update(len(idx))
        sink.finish([rows[i] for i in range(len(requests))])
    except BaseException:
        sink.close()
        if out is not None:
            log(f"generate: stopped after {len(rows)} of {len(requests)} requests; the finished ones are in "
                f"{partial_path(out)} (the same command resumes)")
        raise
    errors = sum("error" in row for row in rows.values())
    where = f" -> {out}" if out is not None else ""
    log(f"generate: {len(requests) - errors} done, {errors} error{'s' * (errors != 1)}, {len(done)} skipped{where}"
        + (f" (error rows have an 'error' key; exit status {PARTIAL_EXIT})" if errors else ""))
    return PARTIAL_EXIT if errors else 0


# ---- the command line -------------------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """`python -m florenz_fast.generate` (its search settings go into the pipeline's GenerationConfig)."""

    ckpt: str  # florenz-fast checkpoint directory (config.json + safetensors)
    tokenizers: str | None = None  # dir with encoder/ and decoder/ tokenizer.json (default: beside the checkpoint)
    preset: str | None = None  # fail unless the checkpoint is this preset
    image: str | None = None  # one image file (give exactly one of image, batch)
    batch: str | None = None  # JSONL file of {image, task, lang, src?, id?} rows; failures become error rows (exit 3)
    task: str = "caption"  # for --image: one of TASKS (text.py)
    lang: str = "en"  # for --image: target language, one of LANGUAGES (text.py)
    src: str | None = None  # source text for --task=translate
    prefix: bool = False  # start captions with the language's prefix (stripped)
    out: str | None = None  # JSONL results (default: stdout); kept per chunk in OUT.partial, a re-run resumes
    batch_size: int = 8  # images per generate call (with --continuous: images decoding at once)
    # batch mode: continuous batching: when an image's caption is done, the next request takes its place in the
    # decode batch (the batch stays full; the same tokens as static batches, scores equal up to float rounding)
    continuous: bool = False
    num_beams: int = 4
    max_new_tokens: int = 128
    no_repeat_ngram_size: int = 3
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str | None = None  # float32 | bfloat16 | float16 (default: the checkpoint's)
    cuda_graph: bool = False  # capture the decode step in a CUDA graph (decoder and search: one graph)
    compile: bool = False  # torch.compile the decode step (decoder + search): the CPU fast path (~1 min to build)

    def validate(self) -> "GenerateConfig":
        if (self.image is None) == (self.batch is None):
            raise ValueError(f"image, batch: give exactly one (got {'both' if self.image is not None else 'neither'})")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dtype not in (None, *DTYPES):
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        return self


DTYPES = ("float32", "bfloat16", "float16")


def run_cli(cfg: GenerateConfig) -> int:
    """Set-up errors (the batch file, the checkpoint, the options) are usage errors (exit 2); in batch mode a
    request's failure is its error row (`run_batch`); with --image it is one `error:` line and exit 1."""
    done = None
    try:
        if cfg.batch:
            requests = read_requests(cfg.batch, check_images=False)
            if cfg.out:
                done = previous_results(Path(cfg.out), requests)  # a foreign --out fails now, before loading
        else:
            r = Request(image=Path(cfg.image), task=cfg.task, lang=cfg.lang, src=cfg.src)
            check_request(r, "--image/--task/--lang")
            requests = [r]
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(cfg.ckpt, tokenizers=cfg.tokenizers, preset=cfg.preset, device=device,
                             dtype=dtype, cuda_graph=cfg.cuda_graph, compile=cfg.compile)
        pipe.config = replace(pipe.config, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                              no_repeat_ngram_size=cfg.no_repeat_ngram_size).validate()
    except (ValueError, KeyError) as exc:
        raise cli.UsageError(cli.error_message(exc)) from exc
    if cfg.batch:
        return run_batch(pipe, requests, out=Path(cfg.out) if cfg.out else None, batch_size=cfg.batch_size,
                         prefix=cfg.prefix, done=done, continuous=cfg.continuous)
    row = pipe.generate(requests, prefix=cfg.prefix)[0]  # a failure: one `error:` line, exit 1 (cli.guarded)
    if cfg.out:
        write_jsonl_atomic(Path(cfg.out), [row])
    else:
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


def main(argv=None) -> int:
    return cli.main(GenerateConfig, run_cli, argv, prog="python -m florenz_fast.generate", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
