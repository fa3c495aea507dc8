"""Build script for florenz-fast.

Metadata (name, version, dependencies) lives in pyproject.toml; this file declares what goes into
the distribution:

* ``florenz_fast`` (and its subpackages) with its JSON package data;
* the Triton kernels from the top-level ``kernels/`` folder, installed under the import name
  ``florenz_kernels`` via ``package_dir``. They are never installed as a top-level ``kernels``
  module, which would shadow the Hugging Face ``kernels`` package;
* optionally, CUDA C++ extensions from ``csrc/`` (see ``_cuda_extensions``).

Install for development with ``pip install --no-build-isolation -e .`` into an environment that
already has torch (the Makefile does this in .venv, after requirements.txt).
"""

from setuptools import find_packages, setup


def _packages():
    engine = find_packages(include=["florenz_fast", "florenz_fast.*"])
    kernels = ["florenz_kernels"] + [
        "florenz_kernels." + name for name in find_packages(where="kernels")
    ]
    return engine + kernels


def _cuda_extensions():
    """Return the CUDA extensions to build (a list of setuptools Extension objects).

    None yet: csrc/ holds no kernels. When it does, this function is the one place to change: build
    a ``torch.utils.cpp_extension.CUDAExtension`` from csrc/*.cu plus the binding file only when
    torch has CUDA (``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``); otherwise
    print one line saying why and return [] so the pure-Python package still installs.
    """
    print("florenz-fast: no CUDA extension in this build (csrc/ has no kernels yet)")
    return []


def _cmdclass(ext_modules):
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension}


_ext_modules = _cuda_extensions()

setup(
    packages=_packages(),
    package_dir={"florenz_kernels": "kernels"},
    package_data={"florenz_fast": ["data/*.json"]},
    include_package_data=False,
    ext_modules=_ext_modules,
    cmdclass=_cmdclass(_ext_modules),
    zip_safe=False,
)
