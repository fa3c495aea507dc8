"""florenz_kernels: Triton kernels for Florenz-style models, installed from the repo's kernels/ folder.

One op per file: the Triton kernel(s), the launcher, the ``torch.library`` op registration
(``florenz::<name>``) and the pure-torch reference it is tested against. The package is
model-agnostic: it imports torch and triton only, never ``florenz_fast``, so each kernel can be used
on its own in other models. ``florenz_fast.ops`` is the one place the engine picks these up.

It is installed as ``florenz_kernels`` (package_dir mapping in setup.py), never as a top-level
``kernels`` module, which would shadow the Hugging Face ``kernels`` package.

No kernels yet; this module deliberately imports nothing so the package imports everywhere.
"""

__all__: list[str] = []
