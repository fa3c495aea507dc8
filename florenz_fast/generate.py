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
    gather of those buffers, which keep their addresses;
  - on CUDA, `cuda_graph=True` captures the decode step (all layers, lm_head) in one CUDA graph and replays it:
    positions and token ids live in device tensors, so a step has no host sync.
cache=False is the path of the published code: the decoder recomputes every position of every beam at each
step (with the encoder states repeated per beam and the cross K/V projected again each step). Both paths share
the search code below, so they differ only in how the next-token logits are computed.

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
from .modules import Layout
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
    """Next-token logits from the static caches; feeds only the tokens it has not seen yet (the prompt first)."""

    def __init__(self, model, enc_BSd: torch.Tensor, enc_layout: Layout, beams: int, max_len: int,
                 cuda_graph: bool = False, compile: bool = False):
        cfg = model.cfg.decoder
        if cfg.kind == "bart" and max_len > cfg.max_positions:
            raise ValueError(f"decoder prompt + max_new_tokens = {max_len} positions exceeds the BART decoder's "
                             f"{cfg.max_positions} learned positions")
        self.model, self.beams, self.enc_layout = model, beams, enc_layout
        B = enc_BSd.shape[0]
        self.n = B * beams
        dtype, device = enc_BSd.dtype, enc_BSd.device
        self.cross = model.decoder.cross_kv(enc_BSd)  # once per image; views of one (B, S, layers*2*Hk*D) tensor
        self.caches = model.decoder.allocate_cache(self.n, max_len, dtype, device)
        self.ids_N = torch.zeros(self.n, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0  # positions already in the cache
        self.use_graph = cuda_graph and device.type == "cuda"
        self.graph = None
        self.step_fn = model.decode_step
        if compile:
            self.step_fn = torch.compile(model.decode_step, dynamic=False, fullgraph=True)

    def _step(self) -> torch.Tensor:
        return self.step_fn(self.ids_N, self.pos, self.caches, self.cross, self.enc_layout, self.beams)

    def _run(self) -> torch.Tensor:
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            # warm up on a side stream (cuBLAS workspaces, compiled kernels), then capture. A step only writes
            # this position's cache slot, so running it again at the same position is idempotent.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
        self.graph.replay()
        return self.out

    def logits(self, seqs_Nt: torch.Tensor) -> torch.Tensor:
        t = seqs_Nt.shape[1]
        if t <= self.length:
            raise RuntimeError(f"cached decoder asked for position {t - 1} after {self.length} positions")
        while self.length < t:
            self.ids_N.copy_(seqs_Nt[:, self.length])
            self.pos.fill_(self.length)
            out = self._run()
            self.length += 1
        return out

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

    def reorder(self, index_N: torch.Tensor) -> None:  # the sequences are the state
        pass


# ---- logits processing and the searches ---------------------------------------------------------------


def process_log_probs(logp_NV: torch.Tensor, seqs_Nt: torch.Tensor, prompt_len: int, max_len: int,
                      cfg: GenerationConfig) -> torch.Tensor:
    """no_repeat_ngram, min_new_tokens, forced bos / eos (in place on logp_NV, also returned)."""
    cur = seqs_Nt.shape[1]
    n = cfg.no_repeat_ngram_size
    if n and cur >= n:  # (transformers bans from cur + 1 >= n, but with cur = n - 1 there is no n-gram yet)
        windows = seqs_Nt.unfold(1, n, 1)  # (N, cur - n + 1, n): every n-gram so far
        match = (windows[..., :-1] == seqs_Nt[:, cur - n + 1:][:, None]).all(-1)  # same n-1 prefix as now
        inf = torch.full_like(match, float("inf"), dtype=logp_NV.dtype)
        # amin with self: -inf where any earlier n-gram with the same prefix continued with that token
        logp_NV.scatter_reduce_(1, windows[..., -1], torch.where(match, -inf, inf), reduce="amin")
    if cur - prompt_len < cfg.min_new_tokens:
        logp_NV[:, cfg.eos_id] = float("-inf")
    forced = (cfg.bos_id if cfg.forced_bos and cur == 1 else
              cfg.eos_id if cfg.forced_eos and cur == max_len - 1 else None)
    if forced is not None:
        logp_NV.fill_(float("-inf"))
        logp_NV[:, forced] = 0.0
    return logp_NV


def _log_probs(dec, seqs_Nt, prompt_len, max_len, cfg):
    logits = dec.logits(seqs_Nt)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return process_log_probs(logp, seqs_Nt, prompt_len, max_len, cfg)


def greedy_search(dec, prompt_BP: torch.Tensor, cfg: GenerationConfig) -> GenerationOutput:
    B, P = prompt_BP.shape
    T = P + cfg.max_new_tokens
    seqs = torch.full((B, T), cfg.pad_id, dtype=torch.long, device=prompt_BP.device)
    seqs[:, :P] = prompt_BP
    done = torch.zeros(B, dtype=torch.bool, device=seqs.device)
    lengths = torch.zeros(B, dtype=torch.long, device=seqs.device)
    score = None
    steps = 0
    for cur in range(P, T):
        logp = _log_probs(dec, seqs[:, :cur], P, T, cfg)
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
    tokens = [seqs[b, P:P + int(lengths[b])].tolist() for b in range(B)]
    return GenerationOutput(tokens=tokens, scores=score, steps=steps)


def beam_search(dec, prompt_BP: torch.Tensor, cfg: GenerationConfig) -> GenerationOutput:
    B, P = prompt_BP.shape
    K, dev = cfg.num_beams, prompt_BP.device
    T = P + cfg.max_new_tokens
    seqs = torch.full((B, K, T), cfg.pad_id, dtype=torch.long, device=dev)
    seqs[:, :, :P] = prompt_BP[:, None]
    fin_seqs = seqs.clone()
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    run_scores = fin_scores = None
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)  # transformers' early-stop heuristic
    top_k_mask = torch.arange(2 * K, device=dev) < K
    row_offset = torch.arange(B, device=dev)[:, None] * K
    steps = 0
    for cur in range(P, T):
        logp = _log_probs(dec, seqs.view(B * K, T)[:, :cur], P, T, cfg)
        steps += 1
        V = logp.shape[-1]
        if run_scores is None:
            run_scores = torch.zeros(B, K, dtype=logp.dtype, device=dev)
            run_scores[:, 1:] = NEG
            fin_scores = torch.full((B, K), NEG, dtype=logp.dtype, device=dev)
        cand = (logp.view(B, K, V) + run_scores[..., None]).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)
        src_beam, tok = top_idx // V, top_idx % V
        last = cur + 1 == T
        hits = (tok == cfg.eos_id) | last
        cand_seqs = seqs.gather(1, src_beam[..., None].expand(B, 2 * K, T)).clone()
        cand_seqs[:, :, cur] = tok
        # finished hypotheses: eos among the top K, while the item is open and can still improve
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
        # running beams: the best K continuations that did not finish
        running = top_scores + hits.to(top_scores.dtype) * NEG
        sel = running.topk(K, dim=1).indices
        run_scores = running.gather(1, sel)
        seqs = cand_seqs.gather(1, sel[..., None].expand(B, K, T))
        if last:
            break
        dec.reorder((src_beam.gather(1, sel) + row_offset).view(-1))
        hyp_len = float(cur + 1 - P)
        worst = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, NEG))
        improvable = improvable & (run_scores[:, :1] / hyp_len ** cfg.length_penalty > worst).any(1, keepdim=True)
        if not bool(improvable.any()) or (cfg.early_stopping is True and bool(fin_done.all())):
            break
    tokens = [fin_seqs[b, 0, P:P + int(fin_len[b, 0])].tolist() for b in range(B)]
    return GenerationOutput(tokens=tokens, scores=fin_scores[:, 0], steps=steps)


# ---- the entry points ------------------------------------------------------------------------------------


def _decoder_prompt(prompt, B: int, cfg: GenerationConfig, device) -> torch.Tensor:
    ids = [cfg.start_id] if prompt is None else list(prompt)
    if not ids:
        raise ValueError("decoder prompt is empty: it needs at least the start token")
    return torch.tensor(ids, dtype=torch.long, device=device)[None].expand(B, -1).contiguous()


@torch.no_grad()
def generate(model, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask=None, *,
             decoder_prompt: Sequence[int] | None = None, config: GenerationConfig | None = None,
             cache: bool = True, cuda_graph: bool = False, compile: bool = False) -> GenerationOutput:
    """Beam search (num_beams > 1) or greedy search for a padded batch of images + encoder prompts.

    `decoder_prompt`: ids shared by the batch, default [start] = [1]; for a caption prefix
    [1, 2, *prefix ids] (what generated text then continues). `cache=False` runs the full-recompute path.
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
        dec = CachedDecoder(model, enc, enc_layout, K, max_len, cuda_graph=cuda_graph, compile=compile)
    else:
        dec = FullDecoder(model, enc, enc_layout, K)
    if K == 1:
        return greedy_search(dec, prompt, cfg)
    return beam_search(dec, prompt, cfg)


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
                 cuda_graph: bool = False):
        self.model, self.enc_tok, self.dec_tok = model, enc_tok, dec_tok
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
                           cuda_graph=self.cuda_graph)
            for j, i in enumerate(idx):
                r = requests[i]
                text = self.dec_tok.decode(list(dprompt[1:]) + out.tokens[j])
                if len(dprompt) > 1:
                    from .text import strip_prefix

                    text = strip_prefix(text, r.lang)
                results[i] = {"id": r.id, "image": str(r.image), "task": r.task, "lang": r.lang,
                              "text": capitalise(text.strip()), "score": float(out.scores[j]),
                              "tokens": len(out.tokens[j])}
        return results

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
                  config: GenerationConfig | None = None, cuda_graph: bool = False) -> Pipeline:
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
    return Pipeline(model, enc_tok, dec_tok, device=torch.device(device), config=config, cuda_graph=cuda_graph)


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


def run_batch(pipe: Pipeline, requests: Sequence[Request], *, out: Path | None, batch_size: int,
              prefix: bool = False, done: dict[int, dict] | None = None, log=None) -> int:
    """Batch mode (docs/generation-and-eval.md, "Batch mode"): every request gets a row, a result or an error;
    rows are kept as they are made; a re-run with the same `out` skips the requests already done (`done`:
    previous_results, read here when not given). Exit status 0, or PARTIAL_EXIT (3) when some rows are errors."""
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
            # chunks are cut from the whole batch, not from what is left, so that a resumed run batches the
            # requests it still has exactly as one clean run would (the same padding, so the same numbers)
            for s in range(0, len(requests), batch_size):
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
    batch_size: int = 8  # images per generate call
    num_beams: int = 4
    max_new_tokens: int = 128
    no_repeat_ngram_size: int = 3
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str | None = None  # float32 | bfloat16 | float16 (default: the checkpoint's)
    cuda_graph: bool = False  # capture the decode step in a CUDA graph

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
                             dtype=dtype, cuda_graph=cfg.cuda_graph)
        pipe.config = replace(pipe.config, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                              no_repeat_ngram_size=cfg.no_repeat_ngram_size).validate()
    except (ValueError, KeyError) as exc:
        raise cli.UsageError(cli.error_message(exc)) from exc
    if cfg.batch:
        return run_batch(pipe, requests, out=Path(cfg.out) if cfg.out else None, batch_size=cfg.batch_size,
                         prefix=cfg.prefix, done=done)
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
