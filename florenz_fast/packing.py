"""Batches for training: padded, packed or static collation, a greedy token-budget packer, and a resumable loader.

    loader = Loader(pipeline, mode="packed", n_image_tokens=cfg.num_image_tokens(),
                    max_encoder_tokens=4096, max_decoder_tokens=2048)
    for batch in loader:
        out = model(**batch.model_inputs())          # labels included: out.loss = mean over target tokens
        loss_sum_N, count_N = batch.per_sample_token_losses(out.logits)

Two layouts of the same samples (i = 1..N, P_i prompt ids, L_i labels, I image tokens per sample):
    padded  input_ids (N, max P_i) padded with the encoder pad 1, attention_mask (N, max P_i) bool;
            labels (N, max L_i) padded with -100, decoder_input_ids = shift_right(labels) (pad 0),
            decoder_attention_mask (N, max L_i) bool.
    packed  input_ids (1, sum P_i), labels and decoder_input_ids (1, sum L_i), each sample's decoder input
            shifted on its own (its segment starts with the start token 1, never with the previous sample's
            eos), prompt_cu_seqlens / decoder_cu_seqlens (N+1,) int32 cumulative P_i / L_i. The model puts
            each sample's I image tokens in front of its prompt segment, so the encoder row is
            [img_1 ; prompt_1 ; img_2 ; prompt_2 ; ...]: self-attention is block-diagonal per sample on
            both sides (causal in the decoder) and decoder segment i cross-attends only to encoder segment i.
    static  packed, with every tensor shape fixed by the loader's bounds (M = max samples, E / D = encoder /
            decoder token budgets), so torch.compile builds one graph and CUDA graphs replay it (DESIGN.md 13):
            pixel_values (M, 3, S, S), unused image slots zero and never gathered into the encoder row;
            input_ids (1, E + P), decoder_input_ids / labels (1, D + 1); cu_seqlens (M + P + 1,): the n real
            segments, P pad segments holding the rest of the row (each >= 1 encoder token, labels -100,
            position ids 0), then M - n zero-length segments (cu_seqlens padded with its final offset).
            P = 1 and max_seqlen = the row, or, with segment bounds (max_segment_encoder / _decoder: the
            longest sample), P = static_pad_segments(...) chunks no longer than the bounds, and max_seqlen_q/k
            = the bounds: kernels that pad each segment to max_seqlen then do M + P small blocks, not M rows.
All three give the same per-sample losses and gradients (tests/test_packing.py, tests/test_static.py, 1e-5 fp32).

Host layout (packed and static, `Batch.model_inputs(host_layout=True)`; static always): what the model would
otherwise read back from the device, computed here from Python lists before the transfer: the encoder gather
index (the [img_i ; prompt_i] row in one index_select over [all image tokens ; all prompt embeddings]), the
encoder cu_seqlens, both sides' position ids, and max_seqlen_q / max_seqlen_k as Python ints. With it (and
`inputs_checked=True`: ids and positions were checked here, `check_limits`) forward, loss and backward read
nothing back from the device.

Token accounting (Batch properties, Loader.efficiency()):
    real        encoder: sum (I + P_i); decoder: sum L_i (= target tokens, labels != -100)
    allocated   tokens in the tensors the model computes on: padded N * (I + max P_i) and N * max L_i;
                packed = real (no padding inside the row)
    efficiency  real / allocated: the share of encoder/decoder compute spent on real tokens
    fill        packed only: real / (batches * token budget), how full the greedy packer gets the budget;
                this is what a static-shape kernel padding each row up to the budget would see.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .ops import cu_seqlens_from_lengths
from .text import ENCODER_SPECIALS, IGNORE_INDEX, shift_right

ENCODER_PAD_ID = ENCODER_SPECIALS["pad"][1]  # 1
DECODER_PAD_ID = 0
DECODER_START_ID = 1  # eos; SPEC §6


class Example(Protocol):
    """What collation reads from an example (florenz_fast.data.EncodedExample has these fields)."""

    pixels: torch.Tensor  # (3, S, S) float32, normalised
    prompt_ids: list[int]  # [<s>, ..., </s>]
    labels: list[int]  # [bos, ..., eos]
    key: str  # task-language, e.g. "caption-de"


# ------------------------------------------------------------------------------------------------ Batch

@dataclass
class Batch:
    pixel_values: torch.Tensor | None  # (N, 3, S, S); with image_index (U, 3, S, S) distinct images (static: M slots)
    input_ids: torch.Tensor  # padded (N, P) | packed (1, sum P_i)
    decoder_input_ids: torch.Tensor  # padded (N, L) | packed (1, sum L_i) = shift_right(labels) per sample
    labels: torch.Tensor  # same shape as decoder_input_ids, -100 where ignored (padding)
    keys: list[str]  # per sample
    attention_mask: torch.Tensor | None = None  # padded mode, (N, P) bool
    decoder_attention_mask: torch.Tensor | None = None  # padded mode, (N, L) bool
    prompt_cu_seqlens: torch.Tensor | None = None  # packed mode, int32 (N+1,)
    decoder_cu_seqlens: torch.Tensor | None = None  # packed mode, int32 (N+1,)
    n_image_tokens: int = 0  # image tokens per sample, for the encoder token counts
    # host layout (packed and static; see the module doc), computed by the collation from Python lists
    encoder_index: torch.Tensor | None = None  # (T_enc,) int64 into [image tokens (M*I) ; prompt embeddings]
    encoder_cu_seqlens: torch.Tensor | None = None  # int32 (segments+1,): [img_i ; prompt_i] bounds
    encoder_positions: torch.Tensor | None = None  # (1, T_enc) int64, restarting per segment
    decoder_positions: torch.Tensor | None = None  # (1, T_dec) int64
    max_seqlen_q: int | None = None  # decoder segments, Python int (static: the bound, constant across batches)
    max_seqlen_k: int | None = None  # encoder segments
    static: bool = False  # static mode: the shapes above are fixed by the loader's bounds
    host_prompt_lengths: list[int] | None = None  # real samples only (Python ints: no tensor read for accounting)
    host_label_lengths: list[int] | None = None
    inputs_checked: bool = False  # check_limits ran at collation (ids in range, positions within the tables)
    # distinct images (image_inputs; examples with an image_id): each runs through the frozen image path once
    image_index: torch.Tensor | None = None  # (N,) int64 (static: (M,)) sample -> row of [tower(pixels) ; features]
    num_images: int | None = None  # U, the distinct images in pixel_values (host int; static: the first U slots)
    image_features: torch.Tensor | None = None  # (C, N_img, d) cached image tokens of the other distinct images

    @property
    def packed(self) -> bool:
        return self.prompt_cu_seqlens is not None

    def model_inputs(self, host_layout: bool = False) -> dict[str, Any]:
        """Keyword arguments for `Florenz.forward(**batch.model_inputs())`, labels included.

        host_layout=True (the training loop; static batches always) adds the host layout and, when check_limits
        ran at collation, inputs_checked=True: the model then makes no device->host read (DESIGN.md 13)."""
        out: dict[str, Any] = dict(pixel_values=self.pixel_values, input_ids=self.input_ids,
                                   decoder_input_ids=self.decoder_input_ids, labels=self.labels)
        if self.packed:
            if self.static or host_layout:
                out.update(encoder_index=self.encoder_index, encoder_cu_seqlens=self.encoder_cu_seqlens,
                           encoder_positions=self.encoder_positions, decoder_positions=self.decoder_positions,
                           max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k)
            else:
                out.update(prompt_cu_seqlens=self.prompt_cu_seqlens)
            out.update(decoder_cu_seqlens=self.decoder_cu_seqlens)
        else:
            out.update(attention_mask=self.attention_mask, decoder_attention_mask=self.decoder_attention_mask)
        if (self.static or host_layout) and self.inputs_checked:
            out.update(inputs_checked=True)
        if self.image_index is not None:
            out.update(image_index=self.image_index, num_images=self.num_images, image_features=self.image_features)
        return out

    def _map(self, fn) -> "Batch":
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        # cu_seqlens move too: varlen GPU kernels want them on the device (the model reads them back with
        # .tolist() where it needs Python ints).
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `.to("cuda", non_blocking=True)` overlaps with compute."""
        return self._map(lambda t: t.pin_memory())

    # ---- token accounting ----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Real samples (a static batch has more image slots: pixel_values.shape[0] = the loader's bound)."""
        return len(self.keys)

    @property
    def num_slots(self) -> int:
        """Segments in the tensors: samples, plus (static) the pad segments and the zero-length ones."""
        return self.decoder_cu_seqlens.numel() - 1 if self.packed else self.num_samples

    @property
    def prompt_lengths(self) -> list[int]:
        if self.host_prompt_lengths is not None:
            return list(self.host_prompt_lengths)
        if self.packed:
            return (self.prompt_cu_seqlens[1:] - self.prompt_cu_seqlens[:-1]).tolist()
        return self.attention_mask.sum(1).tolist()

    @property
    def label_lengths(self) -> list[int]:
        if self.host_label_lengths is not None:
            return list(self.host_label_lengths)
        if self.packed:
            return (self.decoder_cu_seqlens[1:] - self.decoder_cu_seqlens[:-1]).tolist()
        return self.decoder_attention_mask.sum(1).tolist()

    @property
    def num_target_tokens(self) -> int:
        """Tokens the loss is taken over (labels != -100). Read it before the transfer: on a device batch it is
        a device->host read."""
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)

    @property
    def num_encoder_tokens(self) -> int:
        """Real encoder tokens: image tokens plus prompt ids of every sample."""
        return self.num_samples * self.n_image_tokens + self.num_prompt_tokens

    @property
    def num_decoder_tokens(self) -> int:
        """Real decoder positions (sum of label lengths)."""
        return sum(self.label_lengths)

    @property
    def allocated_encoder_tokens(self) -> int:
        """Encoder positions the model computes on, padding included."""
        if self.static:
            return self.encoder_index.numel()
        return self.num_samples * self.n_image_tokens + self.input_ids.numel()

    @property
    def allocated_decoder_tokens(self) -> int:
        return self.decoder_input_ids.numel()

    # ---- losses per sample ---------------------------------------------------------------------------
    def sample_index(self) -> torch.Tensor:
        """(N_tokens,) int64: the sample each decoder position belongs to, in `labels.flatten()` order."""
        if self.packed:  # static: the pad and zero-length segments get indices >= num_samples (sliced off below)
            lengths = (self.decoder_cu_seqlens[1:] - self.decoder_cu_seqlens[:-1]).long()
            return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths,
                                           output_size=self.labels.numel())
        N, L = self.labels.shape
        return torch.arange(N, device=self.labels.device).repeat_interleave(L)

    def per_sample_token_losses(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (sum of token cross-entropies (N,) float32, target token count (N,) int64).

        `logits` is the model's (N, L, V) or (1, T, V) output for this batch; the sums keep the autograd
        graph (sum / count is the per-sample mean loss). Identical in both layouts.
        """
        if logits.shape[:2] != self.labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(self.labels.shape)}")
        labels = self.labels.to(logits.device).flatten()
        tok = F.cross_entropy(logits.float().flatten(0, 1), labels, ignore_index=IGNORE_INDEX, reduction="none")
        return self.per_sample_sums(tok.view(self.labels.shape))

    def per_sample_sums(self, token_losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: (sum of the given per-token losses (N,), target token count (N,) int64).

        `token_losses` (N, L) / (1, T), e.g. the model's `token_losses` (forward(labels=..., return_logits=False):
        the fused loss on the triton backend, no logits); keeps the autograd graph."""
        if token_losses.shape != self.labels.shape:
            raise ValueError(f"token losses {tuple(token_losses.shape)} do not match labels "
                             f"{tuple(self.labels.shape)}")
        tok = token_losses.flatten()
        labels = self.labels.to(tok.device).flatten()
        idx = self.sample_index().to(tok.device)
        sums = torch.zeros(self.num_slots, dtype=tok.dtype, device=tok.device).index_add(0, idx, tok)
        counts = torch.zeros(self.num_slots, dtype=torch.long, device=tok.device).index_add(
            0, idx, (labels != IGNORE_INDEX).long())
        return sums[:self.num_samples], counts[:self.num_samples]

    def loss_by_key(self, logits: torch.Tensor) -> dict[str, tuple[float, int]]:
        """{task-language key: (sum of token losses, token count)} for logging; detached."""
        return self.group_by_key(*self.per_sample_token_losses(logits.detach()))

    def group_by_key(self, sums, counts) -> dict[str, tuple[float, int]]:
        """Per-sample (loss sum, token count), as from per_sample_token_losses (tensors, or lists already read
        back), added up per key."""
        out: dict[str, tuple[float, int]] = {}
        sums, counts = (t.tolist() if isinstance(t, torch.Tensor) else list(t) for t in (sums, counts))
        for key, s, c in zip(self.keys, sums, counts):
            s0, c0 = out.get(key, (0.0, 0))
            out[key] = (s0 + s, c0 + c)
        return out


# -------------------------------------------------------------------------------------------- collation

def _check_examples(examples: Sequence[Example], n_image_tokens: int) -> None:
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    if n_image_tokens < 0:
        raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
    shape = next((tuple(ex.pixels.shape) for ex in examples if ex.pixels is not None), None)  # None: all cached
    for i, ex in enumerate(examples):
        if ex.pixels is not None and tuple(ex.pixels.shape) != shape:
            raise ValueError(f"example {i} ({ex.key}) has pixels {tuple(ex.pixels.shape)}, example 0 {shape}")
        if len(ex.prompt_ids) == 0 or len(ex.labels) == 0:
            raise ValueError(f"example {i} ({ex.key}) has {len(ex.prompt_ids)} prompt ids and "
                             f"{len(ex.labels)} labels; both need at least one")


def collate_padded(examples: Sequence[Example], n_image_tokens: int) -> Batch:
    """Right-padded batch (N, max P_i) / (N, max L_i) with masks; see the module doc."""
    _check_examples(examples, n_image_tokens)
    N = len(examples)
    P = max(len(ex.prompt_ids) for ex in examples)
    L = max(len(ex.labels) for ex in examples)
    input_ids = torch.full((N, P), ENCODER_PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((N, P), dtype=torch.bool)
    labels = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    decoder_attention_mask = torch.zeros((N, L), dtype=torch.bool)
    for i, ex in enumerate(examples):
        input_ids[i, :len(ex.prompt_ids)] = torch.as_tensor(ex.prompt_ids, dtype=torch.long)
        attention_mask[i, :len(ex.prompt_ids)] = True
        labels[i, :len(ex.labels)] = torch.as_tensor(ex.labels, dtype=torch.long)
        decoder_attention_mask[i, :len(ex.labels)] = True
    return Batch(
        **image_inputs(examples),
        input_ids=input_ids,
        decoder_input_ids=shift_right(labels, DECODER_START_ID, DECODER_PAD_ID),
        labels=labels,
        keys=[ex.key for ex in examples],
        attention_mask=attention_mask,
        decoder_attention_mask=decoder_attention_mask,
        n_image_tokens=n_image_tokens,
        host_prompt_lengths=[len(ex.prompt_ids) for ex in examples],
        host_label_lengths=[len(ex.labels) for ex in examples],
    )


def collate_packed(examples: Sequence[Example], n_image_tokens: int) -> Batch:
    """One packed row (1, sum P_i) / (1, sum L_i) with cu_seqlens; see the module doc."""
    _check_examples(examples, n_image_tokens)
    prompt = [torch.as_tensor(ex.prompt_ids, dtype=torch.long) for ex in examples]
    labels = [torch.as_tensor(ex.labels, dtype=torch.long) for ex in examples]
    # shift each sample on its own: segment i starts with the start token, not with sample i-1's last label
    dec_in = [shift_right(t, DECODER_START_ID, DECODER_PAD_ID) for t in labels]
    return Batch(
        **image_inputs(examples),
        input_ids=torch.cat(prompt)[None],
        decoder_input_ids=torch.cat(dec_in)[None],
        labels=torch.cat(labels)[None],
        keys=[ex.key for ex in examples],
        prompt_cu_seqlens=cu_seqlens_from_lengths([len(t) for t in prompt]),
        decoder_cu_seqlens=cu_seqlens_from_lengths([len(t) for t in labels]),
        n_image_tokens=n_image_tokens,
        **host_layout(n_image_tokens, [len(t) for t in prompt], [len(t) for t in labels]),
    )


def static_pad_segments(max_encoder_tokens: int, max_decoder_tokens: int, max_segment_encoder: int,
                        max_segment_decoder: int) -> int:
    """P, the fixed number of pad segments of a static batch: the smallest P >= 1 with which the pad of any batch
    (at most E = max_encoder_tokens + P encoder and D = max_decoder_tokens + 1 decoder tokens) splits into P
    chunks of at most max_segment_encoder / max_segment_decoder tokens, every encoder chunk non-empty.

    Why: max_seqlen_k/q are the segment bounds, not the row (a kernel that pads each segment to max_seqlen, like
    ops' `dense` backend, then computes (M + P) x S_q x S_k instead of M x E x D: at the bench's `small` shapes
    E = 643, S_k = 92 that is 7x less attention per segment), so no segment may exceed them, the pad included.
    An encoder pad chunk is never empty, so no decoder pad query meets an empty key segment (a softmax over
    nothing)."""
    if max_segment_encoder < 2 or max_segment_decoder < 1:
        raise ValueError(f"segment bounds must be >= 2 (encoder) and >= 1 (decoder), got max_segment_encoder="
                         f"{max_segment_encoder}, max_segment_decoder={max_segment_decoder}")
    P = 1
    while -(-(max_encoder_tokens + P) // P) > max_segment_encoder or -(-(max_decoder_tokens + 1) // P) > \
            max_segment_decoder:
        P += 1
    return P


def static_segments(max_encoder_tokens: int, max_decoder_tokens: int, max_segment_encoder: int | None,
                    max_segment_decoder: int | None) -> tuple[int, int, int]:
    """(S_k, S_q, P): the segment bounds of a static batch (None: the whole row, budget + 1) and its number of
    pad segments (static_pad_segments; 1 when neither bound is given, one pad segment filling the row)."""
    S_k = max_encoder_tokens + 1 if max_segment_encoder is None else max_segment_encoder
    S_q = max_decoder_tokens + 1 if max_segment_decoder is None else max_segment_decoder
    return S_k, S_q, static_pad_segments(max_encoder_tokens, max_decoder_tokens, S_k, S_q)


def _split(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal non-negative ints, larger first."""
    q, r = divmod(total, parts)
    return [q + 1] * r + [q] * (parts - r)


def collate_static(examples: Sequence[Example], n_image_tokens: int, *, max_samples: int,
                   max_encoder_tokens: int, max_decoder_tokens: int, max_segment_encoder: int | None = None,
                   max_segment_decoder: int | None = None) -> Batch:
    """Packed, with shapes fixed by the bounds whatever the examples (see the module doc): M = max_samples
    image slots, P pad segments (static_pad_segments; 1 without segment bounds), input_ids (1, E),
    labels / decoder_input_ids (1, D), cu_seqlens (M + P + 1,), with E = max_encoder_tokens + P and
    D = max_decoder_tokens + 1. `max_segment_encoder` (image tokens + prompt) / `max_segment_decoder` (labels)
    bound one sample's segment and become max_seqlen_k / max_seqlen_q; None: the whole row (E / D)."""
    _check_examples(examples, n_image_tokens)
    n, M = len(examples), max_samples
    plen = [len(ex.prompt_ids) for ex in examples]
    llen = [len(ex.labels) for ex in examples]
    enc_real, dec_real = n * n_image_tokens + sum(plen), sum(llen)
    if n > M or enc_real > max_encoder_tokens or dec_real > max_decoder_tokens:
        raise ValueError(f"{n} examples with {enc_real} encoder / {dec_real} decoder tokens do not fit the static "
                         f"bounds max_samples={M}, max_encoder_tokens={max_encoder_tokens}, "
                         f"max_decoder_tokens={max_decoder_tokens}")
    S_k, S_q, P = static_segments(max_encoder_tokens, max_decoder_tokens, max_segment_encoder, max_segment_decoder)
    for ex, p, l_ in zip(examples, plen, llen):
        if n_image_tokens + p > S_k or l_ > S_q:
            raise ValueError(f"example {ex.key!r} has {n_image_tokens} + {p} encoder / {l_} decoder tokens, over "
                             f"the static segment bounds max_segment_encoder={S_k}, max_segment_decoder={S_q}")
    # P tokens more than the budget on the encoder side, one on the decoder side: every encoder pad segment
    # is non-empty, and every token belongs to a segment
    E, D = max_encoder_tokens + P, max_decoder_tokens + 1
    input_ids = torch.full((1, E), ENCODER_PAD_ID, dtype=torch.long)
    input_ids[0, :sum(plen)] = torch.as_tensor(sum((list(ex.prompt_ids) for ex in examples), []), dtype=torch.long)
    labels = torch.full((1, D), IGNORE_INDEX, dtype=torch.long)
    dec_in = torch.full((1, D), DECODER_PAD_ID, dtype=torch.long)
    at = 0
    for ex in examples:
        t = torch.as_tensor(ex.labels, dtype=torch.long)
        labels[0, at:at + len(t)] = t
        dec_in[0, at:at + len(t)] = shift_right(t, DECODER_START_ID, DECODER_PAD_ID)
        at += len(t)
    pad_enc, pad_dec = _split(E - enc_real, P), _split(D - dec_real, P)
    zeros = [0] * (M - n)
    return Batch(
        **image_inputs(examples, slots=M), input_ids=input_ids, decoder_input_ids=dec_in, labels=labels,
        keys=[ex.key for ex in examples],
        prompt_cu_seqlens=cu_seqlens_from_lengths(plen + pad_enc + zeros),
        decoder_cu_seqlens=cu_seqlens_from_lengths(llen + pad_dec + zeros),
        n_image_tokens=n_image_tokens, static=True,
        **host_layout(n_image_tokens, plen, llen, slots=M, encoder_tokens=E, decoder_tokens=D,
                      pad_segments=P, max_seqlen=(S_q, S_k)),
    )


def image_inputs(examples: Sequence[Example], slots: int | None = None) -> dict[str, Any]:
    """The Batch's image fields: each distinct image of the batch once (issue 15 item 4).

    Examples without an `image_id` (and without cached `features`) keep the plain layout: pixel_values (N, ...)
    (static: `slots` rows, unused ones zero) and no image_index. Otherwise distinct images (same image_id = same
    image; an example without one is its own) are numbered pixels first, then cached ones: pixel_values (U, ...)
    holds the U distinct images that need the tower (static: `slots` rows, the U first, the rest zero: fixed
    shapes), image_features (C, N_img, d) the cached image tokens of the others (None if there are none),
    image_index (N,) (static: (slots,), the pad slots pointing at row 0) maps each sample to its row of
    [tower(pixel_values[:U]) ; image_features], and num_images = U as a Python int: the model slices and
    gathers without reading anything back from the device. Host-side Python, at collation."""
    ids = [getattr(ex, "image_id", None) for ex in examples]
    feats = [getattr(ex, "features", None) for ex in examples]
    if all(i is None for i in ids) and all(f is None for f in feats):
        pixels = torch.stack([ex.pixels for ex in examples])
        if slots is not None:
            pixels = torch.cat([pixels, pixels.new_zeros((slots - len(examples), *pixels.shape[1:]))])
        return dict(pixel_values=pixels)
    rows: dict[Any, tuple[str, int]] = {}  # image key -> ("px" | "feat", position)
    px, ft = [], []
    for i, ex in enumerate(examples):
        key = ids[i] if ids[i] is not None else ("sample", i)
        if key in rows:
            continue
        if feats[i] is not None:
            if ft and tuple(feats[i].shape) != tuple(ft[0].shape):
                raise ValueError(f"example {i} ({ex.key}, image {ids[i]}) has cached image tokens "
                                 f"{tuple(feats[i].shape)}, another image of the batch {tuple(ft[0].shape)}")
            rows[key] = ("feat", len(ft))
            ft.append(feats[i])
        elif ex.pixels is None:
            raise ValueError(f"example {i} ({ex.key}, image {ids[i]}) has neither pixels nor cached image tokens")
        else:
            rows[key] = ("px", len(px))
            px.append(ex.pixels)
    U = len(px)
    index = [rows[ids[i] if ids[i] is not None else ("sample", i)] for i in range(len(examples))]
    index = [pos if kind == "px" else U + pos for kind, pos in index]
    pixels = torch.stack(px) if px else None
    if slots is not None:
        index += [0] * (slots - len(examples))
        if pixels is not None:
            pixels = torch.cat([pixels, pixels.new_zeros((slots - U, *pixels.shape[1:]))])
    return dict(pixel_values=pixels, image_index=torch.tensor(index, dtype=torch.long), num_images=U,
                image_features=torch.stack(ft) if ft else None)


def host_layout(n_image_tokens: int, prompt_lengths: list[int], label_lengths: list[int], *,
                slots: int | None = None, encoder_tokens: int | None = None, decoder_tokens: int | None = None,
                pad_segments: int = 1, max_seqlen: tuple[int, int] | None = None) -> dict[str, Any]:
    """The packed model layout from Python lists (Batch fields; also what Florenz.forward computes for a caller
    that passes only cu_seqlens). Packed: `slots` etc. None. Static: `slots` image slots (M), rows of
    `encoder_tokens` / `decoder_tokens`; `pad_segments` near-equal pad segments (positions 0) fill each row,
    zero-length ones follow; `max_seqlen` = (q, k) bounds (default: the rows).

    The encoder gather source is [image tokens of slot 0..M-1 (M*I rows) ; prompt embeddings of input_ids[0]]."""
    n, I = len(prompt_lengths), n_image_tokens
    M = n if slots is None else slots
    index, enc_pos, dec_pos = [], [], []
    at = 0  # next prompt id
    for i, p in enumerate(prompt_lengths):
        index += list(range(i * I, (i + 1) * I)) + list(range(M * I + at, M * I + at + p))
        enc_pos += list(range(I + p))
        at += p
    for l_ in label_lengths:
        dec_pos += list(range(l_))
    enc_len = [I + p for p in prompt_lengths]
    dec_len = list(label_lengths)
    max_q, max_k = max(dec_len), max(enc_len)
    if slots is not None:
        pad_enc, pad_dec = encoder_tokens - len(index), decoder_tokens - len(dec_pos)
        index += list(range(M * I + at, M * I + at + pad_enc))  # pad ids of input_ids, after the prompts
        enc_pos += [0] * pad_enc  # positions 0: any value would do (pad outputs are never read), 0 is in every table
        dec_pos += [0] * pad_dec
        enc_len += _split(pad_enc, pad_segments) + [0] * (M - n)
        # the bounds: constant, so one graph for every batch
        max_q, max_k = max_seqlen if max_seqlen is not None else (decoder_tokens, encoder_tokens)
    return dict(encoder_index=torch.tensor(index, dtype=torch.long),
                encoder_cu_seqlens=cu_seqlens_from_lengths(enc_len),
                encoder_positions=torch.tensor(enc_pos, dtype=torch.long)[None],
                decoder_positions=torch.tensor(dec_pos, dtype=torch.long)[None],
                max_seqlen_q=max_q, max_seqlen_k=max_k, host_prompt_lengths=list(prompt_lengths),
                host_label_lengths=list(label_lengths))


@dataclass(frozen=True)
class InputLimits:
    """What the model accepts, for the checks at collation (the model itself then reads nothing back)."""

    encoder_vocab: int
    decoder_vocab: int
    encoder_positions: int | None = None  # learned encoder positions per segment (image tokens + prompt)
    decoder_positions: int | None = None  # learned decoder positions (BART decoder); None: RoPE, no table

    @staticmethod
    def from_config(cfg) -> "InputLimits":
        """From a FlorenzConfig."""
        return InputLimits(cfg.encoder.vocab_size, cfg.decoder.vocab_size, cfg.encoder.max_positions,
                           cfg.decoder.max_positions if cfg.decoder.kind == "bart" else None)


def check_limits(examples: Sequence[Example], n_image_tokens: int, limits: InputLimits) -> None:
    """Ids in range and sequences within the position tables, on Python lists, with the model's own messages
    (florenz.check_ids, encoder.LearnedPositions): the checks the model would otherwise make on the device."""
    for name, vocab, seqs in (("input_ids", limits.encoder_vocab, [ex.prompt_ids for ex in examples]),
                              ("labels", limits.decoder_vocab, [ex.labels for ex in examples])):
        ids = [t for s in seqs for t in s if not (name == "labels" and t == IGNORE_INDEX)]
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"{name} has ids outside [0, {vocab}): min {min(ids)}, max {max(ids)}")
    for table, lengths in ((limits.encoder_positions, [n_image_tokens + len(ex.prompt_ids) for ex in examples]),
                           (limits.decoder_positions, [len(ex.labels) for ex in examples])):
        if table is not None and max(lengths) > table:
            raise ValueError(f"sequence of {max(lengths)} positions exceeds the {table} learned positions")


MODES = ("packed", "padded", "static")


def collate(examples: Sequence[Example], n_image_tokens: int, mode: str, *, limits: InputLimits | None = None,
            max_samples: int | None = None, max_encoder_tokens: int | None = None,
            max_decoder_tokens: int | None = None, max_segment_encoder: int | None = None,
            max_segment_decoder: int | None = None) -> Batch:
    """`limits`: check ids and positions here, on the host (the batch is then marked inputs_checked)."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'packed', 'padded' or 'static', got {mode!r}")
    if mode == "packed":
        batch = collate_packed(examples, n_image_tokens)
    elif mode == "padded":
        batch = collate_padded(examples, n_image_tokens)
    else:
        batch = collate_static(examples, n_image_tokens, max_samples=max_samples,
                               max_encoder_tokens=max_encoder_tokens, max_decoder_tokens=max_decoder_tokens,
                               max_segment_encoder=max_segment_encoder, max_segment_decoder=max_segment_decoder)
    if limits is None:
        return batch
    check_limits(examples, n_image_tokens, limits)  # after the collation, whose checks (_check_examples) come first
    return dataclasses.replace(batch, inputs_checked=True)


# ----------------------------------------------------------------------------------------------- Packer

class Packer:
    """Greedy, order-preserving packing under token budgets.

    A batch takes examples in arrival order until the next one would push the encoder tokens
    (sum of n_image_tokens + len(prompt_ids)) above `max_encoder_tokens`, the decoder tokens (sum of
    len(labels)) above `max_decoder_tokens`, or the sample count above `max_samples` (None: no cap); that
    example then starts the next batch. No reordering, so the sample order (and the task-language balance
    of the pipeline) is kept exactly. An example larger than a budget on its own is a ValueError naming the
    sizes (raise the budget or truncate harder; silently dropping it would skew the data).
    """

    def __init__(self, n_image_tokens: int, max_encoder_tokens: int, max_decoder_tokens: int,
                 max_samples: int | None = None):
        if n_image_tokens < 0:
            raise ValueError(f"n_image_tokens must be >= 0, got {n_image_tokens}")
        for name, v in (("max_encoder_tokens", max_encoder_tokens), ("max_decoder_tokens", max_decoder_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
        if max_encoder_tokens <= n_image_tokens:
            raise ValueError(f"max_encoder_tokens {max_encoder_tokens} leaves no room for a prompt after "
                             f"{n_image_tokens} image tokens")
        self.n_image_tokens = n_image_tokens
        self.max_encoder_tokens = max_encoder_tokens
        self.max_decoder_tokens = max_decoder_tokens
        self.max_samples = max_samples

    def sizes(self, ex: Example) -> tuple[int, int]:
        """(encoder tokens, decoder tokens) of one example."""
        return self.n_image_tokens + len(ex.prompt_ids), len(ex.labels)

    def check(self, ex: Example) -> tuple[int, int]:
        enc, dec = self.sizes(ex)
        if enc > self.max_encoder_tokens or dec > self.max_decoder_tokens:
            raise ValueError(
                f"example {ex.key!r} needs {enc} encoder tokens ({self.n_image_tokens} image + "
                f"{len(ex.prompt_ids)} prompt) and {dec} decoder tokens, over the budget of "
                f"max_encoder_tokens={self.max_encoder_tokens}, max_decoder_tokens={self.max_decoder_tokens}")
        return enc, dec

    def fits(self, used: tuple[int, int, int], ex: Example) -> bool:
        """Whether `ex` joins a batch already holding `used` = (encoder tokens, decoder tokens, samples)."""
        enc, dec = self.check(ex)
        e, d, n = used
        if self.max_samples is not None and n + 1 > self.max_samples:
            return False
        return e + enc <= self.max_encoder_tokens and d + dec <= self.max_decoder_tokens

    def full(self, used: tuple[int, int, int]) -> bool:
        """No example can join any more (the sample cap is reached): close without reading ahead."""
        return self.max_samples is not None and used[2] >= self.max_samples

    def pack(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        """Greedy batches of a (finite or infinite) stream; the last, partial batch is yielded too."""
        batch: list[Example] = []
        used = (0, 0, 0)
        for ex in examples:
            if batch and not self.fits(used, ex):
                yield batch
                batch, used = [], (0, 0, 0)
            enc, dec = self.check(ex)
            batch.append(ex)
            used = (used[0] + enc, used[1] + dec, used[2] + 1)
        if batch:
            yield batch


# ----------------------------------------------------------------------------------------------- Loader

_STATE_FORMAT = "florenz-fast/loader-v1"


class _Counters:
    FIELDS = ("batches", "samples", "encoder_real", "encoder_allocated", "decoder_real", "decoder_allocated")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)

    def add(self, batch: Batch) -> None:
        self.batches += 1
        self.samples += batch.num_samples
        self.encoder_real += batch.num_encoder_tokens
        self.encoder_allocated += batch.allocated_encoder_tokens
        self.decoder_real += batch.num_decoder_tokens
        self.decoder_allocated += batch.allocated_decoder_tokens

    def state(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load(self, state: dict[str, int]) -> None:
        for f in self.FIELDS:
            setattr(self, f, int(state[f]))


class Loader:
    """DataPipeline -> Batches, packed, static or padded, sharded over ranks, exactly resumable.

    mode="packed": greedy `Packer` under max_encoder_tokens / max_decoder_tokens (and max_samples, None =
    no cap); mode="static": the same packer and batches (max_samples required), collated with fixed shapes
    (collate_static); mode="padded": `batch_size` examples per batch (the token budgets, if given, are ignored).
    `limits` (InputLimits): ids and positions are checked at collation, on the host, and the batches are
    marked inputs_checked (the model then skips its own, device-reading checks).

    Sharding: every rank draws the same global batch sequence from an identically seeded pipeline and rank
    r takes global batches r, r + world, r + 2*world, ... Each call to `next` builds one round of `world`
    global batches and collates only this rank's, so all ranks stay at the same round boundary and their
    states are identical. Simple and exact, at the price of every rank reading (decoding) every example:
    world x the data-loading work, which is small next to a training step on these models. With a finite
    pipeline the last partial batch is kept, but a round with fewer than `world` batches is dropped so all
    ranks stop after the same number of steps.

    Resume: `state_dict()` holds the pipeline's state before the first example of the next round (for an
    example that overflowed the previous batch, the state from before it was read), the global batch index
    and the efficiency counters; `load_state_dict()` on a fresh Loader over the same pipeline continues the
    identical batch sequence. The state is JSON-serialisable if the pipeline's is. Resuming with a
    different `world` continues the same global sequence (global batch g + r + k * world for rank r).
    The pipeline must continue from its loaded state when iterated (an iterator that is its own `__iter__`,
    or whose `__iter__` starts from its current state, like florenz_fast.data.DataPipeline), and its
    `state_dict()` must return a snapshot (a fresh copy): in packed mode the loader takes one before each
    example it reads into a non-empty batch, since that example may overflow and open the next round.
    """

    def __init__(self, pipeline, *, mode: str, n_image_tokens: int, max_encoder_tokens: int | None = None,
                 max_decoder_tokens: int | None = None, batch_size: int | None = None,
                 max_samples: int | None = None, rank: int = 0, world: int = 1, limits: InputLimits | None = None,
                 max_segment_encoder: int | None = None, max_segment_decoder: int | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be 'packed', 'padded' or 'static', got {mode!r}")
        if mode == "static" and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(f"static mode needs max_samples >= 1 (the fixed number of image slots), "
                             f"got {max_samples!r}")
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if mode == "padded":
            if not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"padded mode needs batch_size >= 1, got {batch_size!r}")
            self.packer = None
        else:
            if max_encoder_tokens is None or max_decoder_tokens is None:
                raise ValueError(f"{mode} mode needs max_encoder_tokens and max_decoder_tokens")
            self.packer = Packer(n_image_tokens, max_encoder_tokens, max_decoder_tokens, max_samples)
        if mode == "static":  # fail at construction, not at the first batch: the bounds must admit a pad layout
            static_segments(max_encoder_tokens, max_decoder_tokens, max_segment_encoder, max_segment_decoder)
        self.max_segment_encoder, self.max_segment_decoder = max_segment_encoder, max_segment_decoder
        self.pipeline = pipeline
        self.mode, self.n_image_tokens = mode, n_image_tokens
        self.max_encoder_tokens, self.max_decoder_tokens = max_encoder_tokens, max_decoder_tokens
        self.batch_size, self.max_samples = batch_size, max_samples
        self.rank, self.world = rank, world
        self.limits = limits
        self.next_global_batch = 0  # index of the first global batch of the next round
        self.stats = _Counters()  # over the batches this rank yielded
        self._it: Iterator | None = None
        self._pending: tuple[Any, Example] | None = None  # (pipeline state before it, example) overflow
        self._exhausted = False

    # ---- reading ------------------------------------------------------------------------------------
    def _read(self, snapshot: bool) -> tuple[Any, Example] | None:
        """Next example, with the pipeline state from before it was read if `snapshot` (else None)."""
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._exhausted:
            return None
        if self._it is None:
            self._it = iter(self.pipeline)
        state = self.pipeline.state_dict() if snapshot else None
        try:
            return state, next(self._it)
        except StopIteration:
            self._exhausted = True
            return None

    def _global_batch(self) -> list[Example] | None:
        first = self._read(snapshot=False)
        if first is None:
            return None
        examples = [first[1]]
        if self.packer is None:
            while len(examples) < self.batch_size:
                item = self._read(snapshot=False)
                if item is None:
                    break
                examples.append(item[1])
            return examples
        enc, dec = self.packer.check(first[1])
        used = (enc, dec, 1)
        while not self.packer.full(used):
            # the example read now may overflow and open the next round: keep the state from before it
            item = self._read(snapshot=True)
            if item is None:
                break
            if not self.packer.fits(used, item[1]):
                self._pending = item
                break
            enc, dec = self.packer.sizes(item[1])
            used = (used[0] + enc, used[1] + dec, used[2] + 1)
            examples.append(item[1])
        return examples

    # ---- iteration ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        mine = None
        for r in range(self.world):
            examples = self._global_batch()
            if examples is None:  # finite pipeline ran out inside this round: drop the round on every rank
                raise StopIteration
            if r == self.rank:
                mine = examples
        self.next_global_batch += self.world
        batch = collate(mine, self.n_image_tokens, self.mode, limits=self.limits, max_samples=self.max_samples,
                        max_encoder_tokens=self.max_encoder_tokens, max_decoder_tokens=self.max_decoder_tokens,
                        max_segment_encoder=self.max_segment_encoder, max_segment_decoder=self.max_segment_decoder)
        self.stats.add(batch)
        return batch

    # ---- resume -------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        """What fixes the global batch sequence (besides the pipeline): must match on resume."""
        if self.mode in ("packed", "static"):  # (segment bounds change shapes, not which samples a batch holds)
            return dict(mode=self.mode, n_image_tokens=self.n_image_tokens, max_encoder_tokens=self.max_encoder_tokens,
                        max_decoder_tokens=self.max_decoder_tokens, max_samples=self.max_samples)
        return dict(mode=self.mode, n_image_tokens=self.n_image_tokens, batch_size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        pipeline_state = self._pending[0] if self._pending is not None else self.pipeline.state_dict()
        return {"format": _STATE_FORMAT, "config": self._identity(), "next_global_batch": self.next_global_batch,
                "world": self.world, "pipeline": pipeline_state, "stats": self.stats.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a loader state (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        if state["config"] != self._identity():
            raise ValueError(f"loader state was saved with {state['config']}, this loader is {self._identity()}: "
                             "the batch sequence would differ")
        self.pipeline.load_state_dict(state["pipeline"])
        self._it, self._pending, self._exhausted = None, None, False
        self.next_global_batch = int(state["next_global_batch"])
        self.stats.load(state["stats"])

    # ---- efficiency ---------------------------------------------------------------------------------
    def efficiency(self) -> dict[str, Any]:
        """Cumulative token accounting over the batches this rank yielded (definitions in the module doc)."""
        s = self.stats
        out: dict[str, Any] = {"mode": self.mode, "batches": s.batches, "samples": s.samples}
        for side, budget in (("encoder", self.max_encoder_tokens), ("decoder", self.max_decoder_tokens)):
            real, alloc = getattr(s, f"{side}_real"), getattr(s, f"{side}_allocated")
            d = {"real": real, "allocated": alloc, "efficiency": real / alloc if alloc else None}
            if self.mode in ("packed", "static"):
                d["budget"] = s.batches * budget
                d["fill"] = real / d["budget"] if s.batches else None
            out[side] = d
        return out


class ListPipeline:
    """A finite list of examples as a resumable pipeline (what the Loader reads): evaluation sets, benchmarks, tests."""

    def __init__(self, examples):
        self.examples, self.index = examples, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= len(self.examples):
            raise StopIteration
        self.index += 1
        return self.examples[self.index - 1]

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
