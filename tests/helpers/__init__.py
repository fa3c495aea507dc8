"""Shared test helpers, imported as `tests.helpers.<module>` (pyproject's pythonpath puts the repo root first).

One module per helper; test modules import helpers from here, never from each other. This file imports nothing:
tests.helpers.triton_interpreter must run before any florenz_kernels kernel module loads (it switches
TRITON_INTERPRET on), so importing the package must not pull in a module that imports a kernel.
  ci                  skip_or_fail: a skip that fails instead under CI=true
  error_rule          the 2x rule (DESIGN.md 3), every kernel test's one definition
  triton_interpreter  import first in a module that runs Triton kernels (CPU: the interpreter)
  softcap_cases       the attention kernel's case builder and check (imports the kernel: after the interpreter)
  naive_attention     the loop-by-loop float64 attention written from the documented conventions
  builders            tiny Florenz models and samples with every gate and norm open
  hf_models           tiny random transformers reference models (Gemma-2, Florence-2)
  static_reports      sm_80 / sm_90 compiles without a GPU, in a subprocess
  tokenizer_fixtures  tiny offline Gemma-like and BART-like tokenizers
"""
