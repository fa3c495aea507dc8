"""Explicit, per-instance drop-in of the florenz kernels into transformers models, and its exact undo.

    record = apply_to(model, attention=True, rms_norm=True, mlp=True, loss=True)
    ...                                   # train / evaluate as usual
    remove_from(model)                    # the model is exactly as before

Architectures (anything else is refused with a TypeError naming its class):
  Gemma2ForCausalLM                  attention, RMSNorm, MLP and the loss.
  any model holding Gemma-2 decoder layers (Gemma2Model inside a wrapper, Gemma2ForSequenceClassification,
                                     PaliGemma with a Gemma-2 text model, ...): attention, RMSNorm and MLP of those
                                     layers; the loss only for the heads below (the record says why not otherwise).
  Florence2ForConditionalGeneration  the BART language model's attention (encoder self-, decoder self- and
                                     cross-attention) and the loss. BART has LayerNorm and a gelu fc1/fc2 MLP, so
                                     rms_norm / mlp find nothing there (recorded in `skipped`); the DaViT vision
                                     tower is left alone (its channel attention's "head dim" is the patch count).

What each switch changes (only modules of this model instance; no class is patched):
  attention  the attention modules' config is replaced, for this instance only, by a shallow copy whose
             `_attn_implementation` names florenz softcap attention registered with transformers'
             AttentionInterface (register_transformers_attention): the softcap and the sliding window come from the
             config as the model passes them. A copy because transformers shares one config object between every
             model built from it: setting `config._attn_implementation` would also switch an eager twin.
  rms_norm   every Gemma2RMSNorm gets an instance `forward` running florenz_kernels.rms_norm (x * rsqrt(mean x^2 +
             eps) * (1 + w), fp32 math, the module's own weight and eps; parameters untouched).
  mlp        every Gemma2MLP whose activation is the tanh GELU gets an instance `forward`:
             down_proj(geglu(gate_proj(x), up_proj(x))), the fused GeGLU instead of gelu(gate) * up in two passes.
  loss       the head gets an instance `forward` that, in training (`model.training`) with `labels`, runs the
             decoder and then florenz_kernels.linear_cross_entropy on the last hidden states and the lm_head weight
             (the final logit softcap fused in, transformers' label shift, ignore_index -100 and
             `num_items_in_batch` kept): the (B, L, V) logits are never built and `logits` is None. Without labels
             or in eval mode it calls the original forward (logits as usual).

The record lists every change by module name; `remove_from(model)` undoes them in reverse order (instance forwards
deleted or restored, the original config objects put back), after which the model's outputs are bit-identical to
the eager model's. Importing this module imports neither transformers nor triton; apply_to imports transformers.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["IntegrationRecord", "apply_to", "remove_from", "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "florenz_softcap"  # the AttentionInterface name apply_to registers and points configs at
_KEY = "_florenz_integration"  # instance attribute holding the record (plain __dict__ entry, not a submodule)
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_python_tanh")  # the activations the fused GeGLU computes exactly


@dataclass
class IntegrationRecord:
    """What apply_to changed: qualified module names per feature ("" = the model itself), the features asked for
    that had nothing to act on (with why), and the undo steps remove_from runs."""

    architecture: str
    attention: list[str] = field(default_factory=list)
    rms_norm: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)
    loss: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    attn_implementation: str | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        parts = [f"{k}: {len(getattr(self, k))}" for k in ("attention", "rms_norm", "mlp", "loss")]
        return f"{self.architecture}: " + ", ".join(parts) + "".join(f"; {k} skipped ({v})"
                                                                    for k, v in self.skipped.items())


# ---- instance forwards ---------------------------------------------------------------------------------------


def _rms_norm_forward(self, x):
    from ..rms_norm import rms_norm

    return rms_norm(x, self.weight, self.eps)


def _geglu_mlp_forward(self, x):
    from ..geglu import geglu

    return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


def _fused_loss(hidden_BLD, weight_VD, shift_labels_BL, softcap, num_items_in_batch, ignore_index=-100):
    """transformers' fixed_cross_entropy on softcap(hidden @ W^T) without the logits: mean over the non-ignored
    labels, or sum / num_items_in_batch when the trainer passes it (gradient accumulation)."""
    from ..linear_cross_entropy import linear_cross_entropy

    # the label range check reads a value back from the device: free on the CPU, a sync per step on CUDA, where
    # labels outside [0, V) are the caller's to rule out (transformers' CUDA cross_entropy only asserts on device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(hidden_BLD, weight_VD, shift_labels_BL.to(hidden_BLD.device), softcap=softcap,
                                ignore_index=ignore_index, reduction=reduction,
                                check_labels=hidden_BLD.device.type != "cuda")
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss


def _gemma2_causal_lm_forward(original):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        if not self.training or (labels is None and shift_labels is None):
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return_dict = kwargs.pop("return_dict", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if shift_labels is None:  # tokens < n predict n (transformers' ForCausalLMLoss)
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = _fused_loss(out.last_hidden_state, self.lm_head.weight, shift_labels,
                           float(self.config.final_logit_softcapping or 0.0), num_items)
        res = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                     hidden_states=out.hidden_states, attentions=out.attentions)
        return res.to_tuple() if return_dict is False else res
    return forward


def _florence2_forward(original):
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_outputs=None, past_key_values=None, inputs_embeds=None,
                decoder_inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if not self.training or labels is None:
            return original(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                            decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                            encoder_outputs=encoder_outputs, past_key_values=past_key_values,
                            inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.models.florence2.modeling_florence2 import Florence2Seq2SeqLMOutput, shift_tokens_right

        return_dict = kwargs.pop("return_dict", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        text = self.config.text_config
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, text.pad_token_id, text.decoder_start_token_id)
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids, encoder_outputs=encoder_outputs,
                         decoder_attention_mask=decoder_attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, use_cache=False,
                         **kwargs)
        # seq2seq: the decoder inputs are already shifted, so labels are the targets as they are (shift_labels=labels)
        loss = _fused_loss(out[0], self.lm_head.weight, labels, 0.0, num_items)
        res = Florence2Seq2SeqLMOutput(
            loss=loss, logits=None, past_key_values=out.past_key_values,
            decoder_hidden_states=out.decoder_hidden_states,
            decoder_attentions=out.decoder_attentions, cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=out.encoder_last_hidden_state, encoder_hidden_states=out.encoder_hidden_states,
            encoder_attentions=out.encoder_attentions, image_hidden_states=out.image_hidden_states)
        return res.to_tuple() if return_dict is False else res
    return forward


# ---- patching helpers ----------------------------------------------------------------------------------------


def _set_forward(record: IntegrationRecord, module: torch.nn.Module, fn) -> None:
    """Give `module` the instance forward fn(self, ...), undone exactly: the previous instance forward restored if
    there was one, else the instance attribute deleted (the class's forward shows through again)."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = types.MethodType(fn, module)

    def undo():
        if had:
            module.__dict__["forward"] = previous
        else:
            del module.__dict__["forward"]
    record._undo.append(undo)


def _swap_configs(record: IntegrationRecord, model: torch.nn.Module, configs: list, name: str) -> None:
    """Point every module of `model` that holds one of `configs` (and any config holding them as a sub-config) at a
    shallow copy with `_attn_implementation = name`; the originals are left untouched for other models."""
    copies = {}
    for cfg in configs:
        new = copy.copy(cfg)
        new._attn_implementation_internal = name  # not the setter: it recurses into sub-configs we do not own
        copies[id(cfg)] = new
    parents = {}
    for m in model.modules():  # a config holding a swapped one as a sub-config (Florence2Config.text_config)
        cfg = m.__dict__.get("config")
        if cfg is None or id(cfg) in copies or id(cfg) in parents:
            continue
        subs = {k: copies[id(v)] for k, v in vars(cfg).items() if id(v) in copies}
        if subs:
            new = copy.copy(cfg)
            for k, v in subs.items():
                setattr(new, k, v)
            parents[id(cfg)] = new
    copies.update(parents)
    for m in model.modules():
        cfg = m.__dict__.get("config")
        if cfg is not None and id(cfg) in copies:
            m.__dict__["config"] = copies[id(cfg)]

            def undo(m=m, cfg=cfg):
                m.__dict__["config"] = cfg
            record._undo.append(undo)


def _named(model, cls):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


# ---- public API ----------------------------------------------------------------------------------------------


def apply_to(model: torch.nn.Module, attention: bool = True, rms_norm: bool = True, mlp: bool = True,
             loss: bool = True) -> IntegrationRecord:
    """Route this model instance's attention, Gemma RMSNorms, GeGLU MLPs and training loss through the florenz
    kernels (see the module docstring for what each switch changes and which architectures are supported).

    Args:
      model: a transformers Gemma2ForCausalLM, Florence2ForConditionalGeneration, or any nn.Module holding Gemma-2
        decoder layers. Its parameters must live where the kernels run: CUDA, or the CPU with TRITON_INTERPRET=1
        set before the kernel modules are first imported.
      attention, rms_norm, mlp, loss: which parts to switch over.

    Returns:
      The IntegrationRecord of every change (also kept on the model until remove_from).

    Raises:
      TypeError: an architecture apply_to does not know (the message names its class).
      ValueError: the model is already patched (remove_from first).
    """
    cls = type(model).__name__
    if _KEY in model.__dict__:
        raise ValueError(f"apply_to: this {cls} is already patched ({model.__dict__[_KEY].summary()}); call "
                         "remove_from(model) first")
    from transformers.models.bart.modeling_bart import BartAttention
    from transformers.models.florence2.modeling_florence2 import Florence2ForConditionalGeneration, Florence2Model
    from transformers.models.gemma2.modeling_gemma2 import (
        Gemma2Attention,
        Gemma2DecoderLayer,
        Gemma2ForCausalLM,
        Gemma2MLP,
        Gemma2RMSNorm,
    )

    from .transformers import register_transformers_attention

    gemma_layers = _named(model, Gemma2DecoderLayer)
    florence = _named(model, Florence2Model)
    heads = (Gemma2ForCausalLM, Florence2ForConditionalGeneration)
    if not gemma_layers and not florence and not isinstance(model, heads):
        raise TypeError(f"apply_to: {cls} is not a supported architecture: it holds no Gemma-2 decoder layer and is "
                        "no Florence-2 model (supported: Gemma2ForCausalLM, models holding Gemma2DecoderLayer "
                        "modules, Florence2ForConditionalGeneration)")
    record = IntegrationRecord(architecture=cls)
    try:
        if attention:
            targets = _named(model, Gemma2Attention)
            for fname, fm in florence:
                lm = fm.language_model
                prefix = f"{fname}.language_model." if fname else "language_model."
                targets += [(prefix + n, m) for n, m in _named(lm, BartAttention)]
                if not _named(lm, BartAttention):
                    record.skipped["attention"] = (f"the language model of {fname or cls} is a "
                                                   f"{type(lm).__name__}, not BART")
            if targets:
                record.attn_implementation = register_transformers_attention(ATTN_IMPLEMENTATION)
                configs = list({id(m.config): m.config for _, m in targets}.values())
                _swap_configs(record, model, configs, ATTN_IMPLEMENTATION)
                record.attention = [n for n, _ in targets]
        if rms_norm:
            for n, m in _named(model, Gemma2RMSNorm):
                _set_forward(record, m, _rms_norm_forward)
                record.rms_norm.append(n)
            if not record.rms_norm:
                record.skipped["rms_norm"] = f"{cls} has no Gemma RMSNorm (BART uses LayerNorm)"
        if mlp:
            for n, m in _named(model, Gemma2MLP):
                act = getattr(m.config, "hidden_activation", None)
                if act not in _TANH_GELUS:
                    record.skipped["mlp"] = f"{n}: activation {act!r} is not the tanh GELU the fused GeGLU computes"
                    continue
                _set_forward(record, m, _geglu_mlp_forward)
                record.mlp.append(n)
            if not _named(model, Gemma2MLP):
                record.skipped["mlp"] = f"{cls} has no Gemma-2 MLP (BART's is fc1 / gelu / fc2, no gate)"
        if loss:
            if isinstance(model, heads):
                if model.lm_head.bias is not None:
                    record.skipped["loss"] = f"{cls}.lm_head has a bias, which the fused loss does not add"
                else:
                    fused = (_gemma2_causal_lm_forward if isinstance(model, Gemma2ForCausalLM)
                             else _florence2_forward)(model.forward)
                    _set_forward(record, model, fused)
                    record.loss.append("")
            else:
                record.skipped["loss"] = (f"{cls} computes its own loss; the fused loss is wired for "
                                          "Gemma2ForCausalLM and Florence2ForConditionalGeneration only")
    except BaseException:
        for undo in reversed(record._undo):
            undo()
        raise
    model.__dict__[_KEY] = record
    return record


def remove_from(model: torch.nn.Module) -> IntegrationRecord:
    """Undo apply_to on this model exactly: instance forwards removed (or the earlier ones restored), the original
    config objects put back. Returns the record that was undone; ValueError if the model is not patched."""
    record = model.__dict__.pop(_KEY, None)
    if record is None:
        raise ValueError(f"remove_from: this {type(model).__name__} was not patched by apply_to")
    for undo in reversed(record._undo):
        undo()
    record._undo.clear()
    return record
