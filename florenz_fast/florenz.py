"""The Florenz model: DaViT -> image tokens -> BART encoder -> Gemma-2 (gated cross-attention) or BART decoder.

    model = Florenz(get_config("tiny"))
    out = model(pixel_values, input_ids, decoder_input_ids, attention_mask=..., labels=...)
    out.logits  # (B, L, V), softcapped: 30 * tanh(z / 30)

Padded batches pass masks (True = real token). Packed batches pass `prompt_cu_seqlens` / `decoder_cu_seqlens`
with input_ids (1, T) and decoder_input_ids (1, T'), one image per segment; each packed decoder segment then
cross-attends only to its own [image tokens ; prompt] encoder segment.

Shape legend: B batch, N image tokens, P prompt length, S = N + P encoder length, L decoder length, d width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .bart_decoder import BartDecoder
from .config import FlorenzConfig
from .encoder import Encoder
from .gemma_decoder import GemmaDecoder
from .modules import Layout
from .packing import host_layout
from .text import IGNORE_INDEX
from .vision import DaViT, ImageTokenProjector, check_pixels


@dataclass
class FlorenzOutput:
    logits: torch.Tensor | None  # None when forward(return_logits=False)
    loss: torch.Tensor | None = None
    encoder_states: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None  # with labels: (B, L) fp32 cross-entropy per token, 0 where ignored
    loss_sum: torch.Tensor | None = None  # with labels: the sum of token_losses (0-dim; see forward's sum_loss)


class Florenz(nn.Module):
    # The frozen, deterministic image path runs in chunks of exactly this many images (the last one padded with
    # zero images), so an image's tokens are the same bits whatever batch it arrives in: deduplicated, cached
    # (features.py) and recomputed image tokens are then identical (tests/test_image_features.py). Measured why:
    # oneDNN's conv picks its algorithm by batch size (tiny preset on 2 threads: 1 or 2 images differ from 8 by
    # up to 1.4e-6). 4: a multiple of the 2 CPU threads and little padding at small batches (docs/image-features.md).
    frozen_image_chunk: int = 4

    def __init__(self, cfg: FlorenzConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.vision_tower = DaViT(cfg.vision)
        self.projector = ImageTokenProjector(cfg)
        self.encoder = Encoder(cfg.encoder)
        self.decoder = GemmaDecoder(cfg.decoder) if cfg.decoder.kind == "gemma2" else BartDecoder(cfg.decoder)
        if not self.decoder.embed_tokens.weight.is_meta:
            self.apply(_init_weights)


    # ---- parts ----------------------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, N, d) encoder image tokens."""
        check_pixels(pixel_values, self.cfg)
        return self.projector(self.vision_tower(pixel_values))

    def image_path_frozen(self) -> bool:
        """No parameter of the vision tower or the image-token projector trains (policies spec, no_vision)."""
        return not any(p.requires_grad for m in (self.vision_tower, self.projector) for p in m.parameters())

    def image_path_stochastic(self) -> bool:
        """drop_path is active: the published recipe keeps it on in the frozen DaViT in train mode (SPEC §7), so
        two visits of one image get different tokens and no image may share a forward with another sample."""
        return self.vision_tower.training and self.cfg.vision.drop_path > 0

    def frozen_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(U, 3, H, W) -> (U, N, d) without autograd, in chunks of `frozen_image_chunk` images (zero-padded):
        batch-size independent bits (see frozen_image_chunk)."""
        K, U = self.frozen_image_chunk, pixel_values.shape[0]
        pad = (-U) % K
        if pad:
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros((pad, *pixel_values.shape[1:]))])
        with torch.no_grad():
            return torch.cat([self.image_tokens(chunk) for chunk in pixel_values.split(K)])[:U]

    def batch_image_tokens(self, pixel_values, image_index=None, num_images=None, image_features=None):
        """Image tokens per sample (padded) or image slot (packed, static): (B, N, d).

        Plain input: pixel_values (B, 3, H, W). Deduplicated (packing.image_inputs): the distinct images
        pixel_values[:num_images] (num_images a Python int, so the slice reads nothing back) and the cached
        tokens `image_features` (C, N, d) are stacked and gathered by image_index (B,): each distinct image runs
        through the tower once and gradients (policy `all`) accumulate through the gather. Exceptions, for exact
        numerics: with drop_path active every sample needs its own draw, so the pixels are gathered first (the
        same random draws as without dedup); under torch.compile the tower runs on every slot (a varying
        num_images would recompile) — image_features_first computes the tokens outside the graph instead."""
        frozen = self.image_path_frozen()
        if image_features is not None and not frozen:
            raise ValueError("image_features (precomputed image tokens) need a frozen image path: the vision tower "
                             "and projector train under this policy")
        stochastic = self.image_path_stochastic()
        if stochastic and image_index is not None and image_features is not None:  # cached per image, not sample
            raise ValueError("cached image_features with drop_path active: every sample needs its own draw "
                             "(model.vision.drop_path=0, or eval mode, to use cached tokens)")
        if pixel_values is not None:
            if num_images is not None and not torch.compiler.is_compiling() and (frozen and not stochastic):
                pixel_values = pixel_values[:num_images]
            if stochastic and image_index is not None:
                pixel_values, image_index = pixel_values.index_select(0, image_index), None
        parts = []
        if pixel_values is not None and pixel_values.shape[0]:
            parts.append(self.frozen_image_tokens(pixel_values) if frozen and not stochastic
                         else self.image_tokens(pixel_values))
        if image_features is not None:
            d = self.cfg.encoder.d_model
            if image_features.dim() != 3 or image_features.shape[-1] != d:
                raise ValueError(f"image_features must be (C, N_img, {d}), got {tuple(image_features.shape)}")
            dtype = parts[0].dtype if parts else self.projector.image_projection.weight.dtype
            parts.append(image_features.to(dtype))
        if not parts:
            raise ValueError("no images: pixel_values and image_features are both empty")
        img = parts[0] if len(parts) == 1 else torch.cat(parts)
        return img if image_index is None else img.index_select(0, image_index)

    def encode(self, pixel_values, input_ids, attention_mask=None, prompt_cu_seqlens=None, *, encoder_index=None,
               encoder_cu_seqlens=None, encoder_positions=None, max_seqlen_k=None, inputs_checked=False,
               image_index=None, num_images=None, image_features=None):
        """Encoder states and their layout. Padded: (B, S, d); packed: (1, sum S_i, d).

        Packed input comes either with the host layout of packing.host_layout (encoder_index, encoder_cu_seqlens,
        encoder_positions, max_seqlen_k: no device->host read) or with prompt_cu_seqlens alone, from which the
        same layout is built here after one read of prompt_cu_seqlens (a device sync for a CUDA tensor).
        image_index / num_images / image_features: distinct images once (batch_image_tokens)."""
        check_ids("input_ids", input_ids, self.cfg.encoder.vocab_size, values=not inputs_checked)
        img_BNd = self.batch_image_tokens(pixel_values, image_index, num_images, image_features)
        txt = self.encoder.embed_tokens(input_ids).to(img_BNd.dtype)
        if prompt_cu_seqlens is None and encoder_index is None:
            if img_BNd.shape[0] != input_ids.shape[0]:
                raise ValueError(f"{img_BNd.shape[0]} images but {input_ids.shape[0]} prompts")
            x = torch.cat([img_BNd, txt], dim=1)
            mask = None
            if attention_mask is not None:
                _check_mask("attention_mask", attention_mask, input_ids)
                img_mask = torch.ones(img_BNd.shape[:2], dtype=torch.bool, device=x.device)
                mask = torch.cat([img_mask, attention_mask.bool()], dim=1)  # image tokens are never masked
            return self.encoder(x, Layout(mask=mask)), Layout(mask=mask)
        max_position = None
        if encoder_index is None:  # only cu_seqlens: the host layout from one read of them
            bounds = prompt_cu_seqlens.tolist()
            if len(bounds) - 1 != img_BNd.shape[0]:
                raise ValueError(f"{img_BNd.shape[0]} images but {len(bounds) - 1} packed prompts")
            lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            host = host_layout(img_BNd.shape[1], lengths, [1] * len(lengths))
            dev = img_BNd.device
            encoder_index, encoder_cu_seqlens = host["encoder_index"].to(dev), host["encoder_cu_seqlens"].to(dev)
            encoder_positions, max_seqlen_k = host["encoder_positions"].to(dev), host["max_seqlen_k"]
            max_position = max_seqlen_k
        elif encoder_cu_seqlens is None or max_seqlen_k is None:
            raise ValueError("encoder_index needs encoder_cu_seqlens and max_seqlen_k (packing.host_layout)")
        # [img_1 ; prompt_1 ; img_2 ; ...] in one gather over [all image tokens ; all prompt embeddings]
        x = torch.cat([img_BNd.flatten(0, 1), txt[0]]).index_select(0, encoder_index)[None]
        layout = Layout(cu_seqlens=encoder_cu_seqlens.to(torch.int32), max_seqlen=max_seqlen_k,
                        pos_BL=encoder_positions, positions_checked=inputs_checked, max_position=max_position)
        return self.encoder(x, layout), layout

    def decode(self, decoder_input_ids, enc_states, enc_layout: Layout, decoder_attention_mask=None,
               decoder_cu_seqlens=None, *, decoder_positions=None, max_seqlen_q=None,
               inputs_checked=False) -> torch.Tensor:
        """Final decoder hidden states (B, L, d) (before the tied lm_head). Packed: `max_seqlen_q` (Python int,
        with `decoder_positions` from packing.host_layout) avoids the one read of decoder_cu_seqlens."""
        check_ids("decoder_input_ids", decoder_input_ids, self.cfg.decoder.vocab_size, values=not inputs_checked)
        if decoder_cu_seqlens is not None:
            max_position = None
            if max_seqlen_q is None:
                lengths = (decoder_cu_seqlens[1:] - decoder_cu_seqlens[:-1]).tolist()
                max_seqlen_q = max_position = max(lengths)
            layout = Layout(cu_seqlens=decoder_cu_seqlens.to(torch.int32), max_seqlen=max_seqlen_q,
                            pos_BL=decoder_positions, positions_checked=inputs_checked, max_position=max_position)
        else:
            if decoder_attention_mask is not None:
                _check_mask("decoder_attention_mask", decoder_attention_mask, decoder_input_ids)
            layout = Layout(mask=None if decoder_attention_mask is None else decoder_attention_mask.bool())
        return self.decoder(decoder_input_ids, layout, enc_states, enc_layout)

    def logits(self, hidden_BLd: torch.Tensor) -> torch.Tensor:
        """Tied lm_head + final logit softcap."""
        return ops.softcap(F.linear(hidden_BLd, self.decoder.embed_tokens.weight), self.cfg.decoder.final_softcap)

    def decode_step(self, ids_N, pos, caches, cross_kv, enc_layout: Layout, beams: int) -> torch.Tensor:
        """Softcapped next-token logits (N, V) for one new token per row at position `pos` (an int64 tensor: 0-dim
        for every row, or (N,) one per row), using and filling the self-attention `caches` (decoder.allocate_cache)
        and the per-image cross K/V (decoder.cross_kv); rows are batch-major beams (florenz_fast.generate drives
        this)."""
        hidden = self.decoder.step(ids_N, pos, caches, cross_kv, enc_layout, beams)[:, 0]
        cap = self.cfg.decoder.final_softcap
        if not (cap and hidden.device.type == "cpu" and hidden.dtype in (torch.float32, torch.float64)):
            return self.logits(hidden)
        # the softcap through its sigmoid form (ops.dense.scaled_tanh_): on (N, V) logits torch's tanh was 2 ms of
        # a ~20 ms 4-beam step (docs/generation-and-eval.md, "The step context")
        return ops.dense.scaled_tanh_(F.linear(hidden, self.decoder.embed_tokens.weight), 1.0 / cap, cap)

    def token_losses(self, hidden_BLd: torch.Tensor, labels_BL: torch.Tensor, *, labels_checked: bool = False,
                     reduction: str = "none"):
        """(B, L) fp32 cross-entropy of the softcapped logits per token (0 where labels == -100), through
        ops.linear_cross_entropy: on the triton backend the fused loss, which never builds the (B, L, V) logits.
        reduction="sum+none": (their sum, differentiable; the (B, L) losses without gradient)."""
        return ops.linear_cross_entropy(hidden_BLd, self.decoder.embed_tokens.weight, labels_BL,
                                        softcap=self.cfg.decoder.final_softcap, ignore_index=IGNORE_INDEX,
                                        reduction=reduction, check_labels=not labels_checked)

    # ---- the whole model ------------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, decoder_input_ids, *, attention_mask=None,
                decoder_attention_mask=None, prompt_cu_seqlens=None, decoder_cu_seqlens=None,
                labels=None, return_logits: bool = True, encoder_index=None, encoder_cu_seqlens=None,
                encoder_positions=None, decoder_positions=None, max_seqlen_q: int | None = None,
                max_seqlen_k: int | None = None, inputs_checked: bool = False, image_index=None,
                num_images: int | None = None, image_features=None, sum_loss: bool = False) -> FlorenzOutput:
        """With `labels`: `loss` (mean over target tokens), `loss_sum` and `token_losses` (B, L). return_logits=False
        skips the (B, L, V) logits (the loss then comes from `token_losses`, fused on the triton backend).
        sum_loss=True (with return_logits=False): the gradient flows through `loss_sum` / `loss` only and
        `token_losses` come without it, so the fused loss keeps the gradients its forward computed (3 logits
        matmuls instead of 4: the training loop backpropagates a sum and only logs the per-token losses).

        The host layout (encoder_index ... max_seqlen_k, packing.host_layout) and inputs_checked=True (ids and
        positions checked at collation, packing.check_limits) come from `Batch.model_inputs(host_layout=True)`:
        with them forward, loss and backward make no device->host read (DESIGN.md 13). Without them the model
        checks ids and positions itself (CPU: ValueError; a device: torch._assert_async) and reads cu_seqlens once."""
        packed_enc = prompt_cu_seqlens is not None or encoder_index is not None
        if packed_enc != (decoder_cu_seqlens is not None):
            raise ValueError("packed input needs both prompt_cu_seqlens and decoder_cu_seqlens")
        enc, enc_layout = self.encode(pixel_values, input_ids, attention_mask, prompt_cu_seqlens,
                                      encoder_index=encoder_index, encoder_cu_seqlens=encoder_cu_seqlens,
                                      encoder_positions=encoder_positions, max_seqlen_k=max_seqlen_k,
                                      inputs_checked=inputs_checked, image_index=image_index,
                                      num_images=num_images, image_features=image_features)
        hidden = self.decode(decoder_input_ids, enc, enc_layout, decoder_attention_mask, decoder_cu_seqlens,
                             decoder_positions=decoder_positions, max_seqlen_q=max_seqlen_q,
                             inputs_checked=inputs_checked)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and decoder_input_ids "
                             f"{tuple(decoder_input_ids.shape)} differ in shape")
        logits = self.logits(hidden) if return_logits else None
        loss = tok = total = None
        if labels is not None:
            if logits is not None:  # the logits exist anyway: no second lm_head matmul
                tok = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                      reduction="none").view(labels.shape)
            elif sum_loss:
                total, tok = self.token_losses(hidden, labels, labels_checked=inputs_checked, reduction="sum+none")
            else:
                tok = self.token_losses(hidden, labels, labels_checked=inputs_checked)
            total = tok.sum() if total is None else total
            loss = total / (labels != IGNORE_INDEX).sum()
        return FlorenzOutput(logits=logits, loss=loss, encoder_states=enc, token_losses=tok, loss_sum=total)


def image_features_first(model: Florenz, inputs: dict) -> dict:
    """`inputs` (Batch.model_inputs) with the frozen image path already run, eagerly and without autograd: the
    distinct images once, their tokens gathered to one row per sample / slot in `image_features`, no pixels.
    For torch.compile: the compiled forward then sees fixed shapes whatever the number of distinct images
    (static batches: (M, N_img, d) for every batch, one graph). A trainable image path is left to the
    forward (its gradients need the graph); num_images is dropped there, as the compiled forward ignores it."""
    if "image_index" not in inputs and "image_features" not in inputs:
        return inputs
    out = dict(inputs)
    if not model.image_path_frozen():
        out.pop("num_images", None)
        return out
    with torch.no_grad():
        tokens = model.batch_image_tokens(out.pop("pixel_values"), out.pop("image_index", None),
                                          out.pop("num_images", None), out.pop("image_features", None))
    out.update(pixel_values=None, image_features=tokens)
    return out


def _init_weights(module: nn.Module) -> None:
    """From-scratch initialisation: normal(0, 0.02) matrices and tables, zero biases, unit LayerNorms.

    Gemma RMSNorm weights and the cross-attention gates keep their zeros (from the module constructors);
    real runs start from `prepare`d pretrained weights, this is for tests and tiny experiments.
    """
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_ids(name: str, ids: torch.Tensor, vocab: int, values: bool = True) -> None:
    """Shape and dtype (host metadata, no read); with `values` the range too: on CPU a ValueError, on a device
    torch._assert_async (reading min / max would be a device->host sync on every forward). The training loop
    checks the ids at collation instead (packing.check_limits) and passes values=False (inputs_checked)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor (B, L), got {shape}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (length 0): every sequence needs at least one token")
    if not values or not ids.numel():
        return
    if ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < vocab)).all(), f"{name} has ids outside [0, {vocab})")
    elif int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"{name} has ids outside [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}")


def _check_mask(name: str, mask: torch.Tensor, ids: torch.Tensor) -> None:
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}")


# ---- what trains (SPEC §7) -------------------------------------------------------------------------

_GEMMA_TRAINABLE = ("encoder_attn", "encoder_attn_gate", "post_encoder_attention_layernorm", "embed_tokens")
IMAGE_PATH = ("vision_tower.", "projector.")  # parameter-name prefixes of the vision tower and image-token pipeline
TRAINABLE_POLICIES = ("spec", "all", "no_vision")


def is_trainable(name: str, decoder_kind: str) -> bool:
    """SPEC §7, for continued pre-training and fine-tuning alike (the rule is the same).

    Frozen everywhere: the vision tower and the image-token pipeline. Trained: the encoder. Decoder: everything
    for the BART presets; for the Gemma presets only the cross-attention, its gate and norm, and embed_tokens
    (with the tied lm_head).
    """
    if name.startswith(IMAGE_PATH):
        return False
    if name.startswith("encoder."):
        return True
    if decoder_kind == "bart":
        return True
    return any(part in _GEMMA_TRAINABLE for part in name.split("."))


def apply_trainable_policy(model: Florenz, policy: str = "spec") -> dict[str, int]:
    """Set requires_grad: `spec` (SPEC §7), `all` (from-scratch runs) or `no_vision` (everything but the vision
    tower and image-token pipeline, which stay at their init); returns {'trainable': n, 'frozen': n} counts."""
    if policy not in TRAINABLE_POLICIES:
        raise ValueError(f"trainable must be spec, all or no_vision, got {policy!r}")
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        if policy == "spec":
            p.requires_grad_(is_trainable(name, model.cfg.decoder.kind))
        else:
            p.requires_grad_(policy == "all" or not name.startswith(IMAGE_PATH))
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (a tensor shared by two names counts once: .parameters() de-duplicates)."""
    return sum(p.numel() for p in model.parameters())
