"""Integrations of florenz_kernels with other libraries.

  apply_to(model, attention=True, rms_norm=True, mlp=True, loss=True) -> IntegrationRecord
  remove_from(model)
                explicit, per-instance drop-in of the kernels into transformers' Gemma2ForCausalLM, models holding
                Gemma-2 decoder layers, and Florence2ForConditionalGeneration, and its exact undo (integrations.models).
  transformers  `register_transformers_attention(name)`: the softcapped attention kernel as a transformers
                AttentionInterface function (Gemma-2 and other models that call `ALL_ATTENTION_FUNCTIONS`).

Each module imports its library only when one of its functions is called, so `import florenz_kernels` (and
importing this package) never imports transformers or triton; the kernels themselves never import an integration.
"""

import importlib

__all__ = ["apply_to", "remove_from", "IntegrationRecord", "models", "transformers"]
_FROM_MODELS = ("apply_to", "remove_from", "IntegrationRecord")


def __getattr__(name: str):
    if name in _FROM_MODELS:
        return getattr(importlib.import_module(f"{__name__}.models"), name)
    if name in ("models", "transformers"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
