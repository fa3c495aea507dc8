"""Integrations of florenz_kernels with other libraries, one module per library.

  transformers  `register_transformers_attention(name)`: the softcapped attention kernel as a transformers
                AttentionInterface function (Gemma-2 and other models that call `ALL_ATTENTION_FUNCTIONS`).

Each module imports its library only when one of its functions is called, so `import florenz_kernels` (and
importing these modules) never imports transformers; the kernels themselves never import an integration.
"""
