"""Build script for florenz-fast.

Metadata (name, version, dependencies) lives in pyproject.toml; this file declares what goes into
the distribution:

* ``florenz_fast`` (and its subpackages) with its JSON package data;
* the Triton kernels from the top-level ``kernels/`` folder, installed under the import name
  ``florenz_kernels`` via ``package_dir``. They are never installed as a top-level ``kernels``
  module, which would shadow the Hugging Face ``kernels`` package;
* the CUDA extension ``florenz_fast._C`` from ``csrc/`` when torch has CUDA and a toolkit is found
  (see ``_cuda_extensions``); otherwise the pure-Python package, with a one-line notice.

Install for development with ``pip install --no-build-isolation -e .`` into an environment that
already has torch (the Makefile does this in .venv, after requirements.txt).
"""

import glob
import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    engine = find_packages(include=["florenz_fast", "florenz_fast.*"])
    kernels = ["florenz_kernels"] + [
        "florenz_kernels." + name for name in find_packages(where="kernels")
    ]
    return engine + kernels


def _find_cuda_home():
    """A CUDA toolkit with nvcc and the runtime headers: $CUDA_HOME / $CUDA_PATH if set, else the pip
    `cuda-toolkit[nvcc,cccl]` package (site-packages/nvidia/cu<major>), else nvcc on PATH / /usr/local/cuda."""
    import shutil
    import sysconfig

    def usable(root):
        return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var] if usable(os.environ[var]) else None
    import torch

    major = (torch.version.cuda or "").split(".")[0]
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        root = os.path.join(site, "nvidia", f"cu{major}")
        if usable(root):
            return root
    nvcc = shutil.which("nvcc")
    for root in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"):
        if usable(root):
            return root
    return None


def _cudart_link_dir(cuda_home):
    """The pip toolkit ships only libcudart.so.<major>; the link step wants libcudart.so. Put a link in build/
    (never into site-packages) and return that folder, or None when the toolkit has libcudart.so itself."""
    lib = os.path.join(cuda_home, "lib")
    if any(os.path.exists(os.path.join(cuda_home, d, "libcudart.so")) for d in ("lib", "lib64")):
        return None
    versioned = sorted(f for f in (os.listdir(lib) if os.path.isdir(lib) else []) if f.startswith("libcudart.so."))
    if not versioned:
        return None
    link_dir = os.path.join(_HERE, "build", "cudart-link")
    os.makedirs(link_dir, exist_ok=True)
    link = os.path.join(link_dir, "libcudart.so")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join(lib, versioned[0]), link)
    return link_dir


def _cuda_extensions():
    """The CUDA extension florenz_fast._C (csrc/: decode attention, cross decode attention, RoPE + KV append, with
    their CPU implementations), built when torch has CUDA and a CUDA toolkit with its headers is found;
    otherwise [] and one line saying why, so the pure-Python package still installs. FLORENZ_REQUIRE_CUDA_EXT=1
    (the Makefile sets it) turns that line into an error, so CI cannot silently skip the build."""

    def skip(reason):
        if os.environ.get("FLORENZ_REQUIRE_CUDA_EXT") == "1":
            raise RuntimeError(f"florenz-fast: FLORENZ_REQUIRE_CUDA_EXT=1 but {reason}")
        print(f"florenz-fast: installing without the CUDA extension florenz_fast._C ({reason})")
        return []

    try:
        import torch
    except ImportError:
        return skip("torch is not importable at build time; use pip install --no-build-isolation")
    if not torch.version.cuda:
        return skip(f"torch {torch.__version__} has no CUDA")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return skip("no CUDA toolkit with nvcc and cuda_runtime.h found; pip install 'cuda-toolkit[nvcc,cccl]' "
                    "or set CUDA_HOME")
    # torch.utils.cpp_extension reads these when it is imported
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils.cpp_extension import CUDAExtension

    link_dir = _cudart_link_dir(cuda_home)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    print(f"florenz-fast: building florenz_fast._C with {cuda_home} for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    return [CUDAExtension(
        name="florenz_fast._C",
        sources=sources,
        include_dirs=[os.path.join(_HERE, "csrc")],
        library_dirs=[link_dir] if link_dir else [],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )]


def _cmdclass(ext_modules):
    if not ext_modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    # ninja when present (parallel, MAX_JOBS); distutils otherwise
    return {"build_ext": BuildExtension.with_options(use_ninja=_has_ninja())}


def _has_ninja():
    import shutil

    return shutil.which("ninja") is not None


_ext_modules = _cuda_extensions()

setup(
    packages=_packages(),
    package_dir={"florenz_kernels": "kernels"},
    package_data={"florenz_fast": ["resources/*.json"]},
    include_package_data=False,
    ext_modules=_ext_modules,
    cmdclass=_cmdclass(_ext_modules),
    zip_safe=False,
)
