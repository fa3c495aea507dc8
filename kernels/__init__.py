"""florenz_kernels: Triton kernels for Florenz-style models, installed from the repo's kernels/ folder.

One op per file: the Triton kernel(s), the launcher, the ``torch.library`` op registration
(``florenz::<name>``) and the pure-torch reference it is tested against. The package is
model-agnostic: it imports torch and triton only, never ``florenz_fast``, so each kernel can be used
on its own in other models. ``florenz_fast.ops`` is the one place the engine picks these up.

It is installed as ``florenz_kernels`` (package_dir mapping in setup.py), never as a top-level
``kernels`` module, which would shadow the Hugging Face ``kernels`` package.

Kernels:
  softcap_attention  Gemma-2 softcapped attention, forward + backward: causal, sliding window, GQA, packed
                     (cu_seqlens) and padded layouts; ops `florenz::softcap_attention_fwd` / `_bwd`.
                     `from florenz_kernels.softcap_attention import softcap_attention`.
  softcap_attention_hopper  the same contract on sm_90 (opt-in, unmeasured): TMA loads, pipelined K/V loop, a
                     one-kernel backward; ops `florenz::softcap_attention_hopper_fwd` / `_bwd`.
  linear_cross_entropy  lm_head + final logit softcap + cross-entropy, chunked, never the (T, V) logits.
  rms_norm           Gemma RMSNorm, alone or fused with the residual add, a gate scale and the next norm.
  geglu              gelu_tanh(gate) * up, forward + backward.
  rope               rotate-half RoPE in place on q and k (padded and packed).
  image_tokens       the image-token projection (DaViT features -> encoder tokens): GEMMs + one fused LayerNorm.

Standalone: importing the package and running any op needs torch and triton only (numpy too for Triton's CPU
interpreter); nothing here imports florenz_fast, transformers or the CUDA extension (tests/test_kernels_standalone.py
runs every op in a virtual environment that holds nothing else).

Integrations (other libraries; each imports its library only when called):
  integrations.apply_to(model, attention=True, rms_norm=True, mlp=True, loss=True) / remove_from(model)
                     explicit, per-instance drop-in into transformers' Gemma2ForCausalLM, models holding Gemma-2
                     decoder layers, and Florence2ForConditionalGeneration; returns a record of every change and is
                     undone exactly (integrations.models).
  integrations.transformers  `register_transformers_attention(name)`: softcap_attention as a transformers
                     AttentionInterface function (`attn_implementation=name`; padded and packed batches).

Importing the package itself stays free of torch and triton: submodules load on first attribute access
(`florenz_kernels.softcap_attention` is the submodule). Triton decides interpreted vs compiled when a kernel
module is imported, so set TRITON_INTERPRET=1 before touching a kernel module on a CPU-only machine.
"""

import importlib

__all__: list[str] = ["softcap_attention", "softcap_attention_hopper", "linear_cross_entropy", "rms_norm", "geglu",
                       "rope", "image_tokens", "integrations", "reference"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
