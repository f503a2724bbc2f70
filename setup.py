"""Build of the compiled kernels ``sdetr._C`` from ``kernels/``; package metadata is in pyproject.toml.

What is built (see kernels/README.md):

* ``SDETR_NO_EXTENSION=1``: nothing; the pure-PyTorch reference backend is the only one.
* otherwise, with a C++ compiler: a ``CppExtension`` from ``kernels/bindings.cpp`` + ``kernels/cpu/*.cpp``;
  without one, a warning and no extension (``sdetr doctor`` says so).
* additionally ``kernels/cuda/*.cu`` / ``*.cpp`` (a ``CUDAExtension``) when a CUDA toolkit is found
  (``CUDA_HOME``/``CUDA_PATH``, ``/usr/local/cuda``, or ``nvcc`` on PATH) and torch is a CUDA build,
  or when ``SDETR_FORCE_CUDA=1`` (then a missing toolkit is an error). ``SDETR_NO_CUDA=1`` skips CUDA.
  ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0" (torch's own detection fails without a GPU).

torch must be importable at build time: either an isolated build (pyproject's build requirements)
or, as the Makefile does, torch installed first and ``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "sdetr._C"
DEFAULT_ARCHS = "8.0;9.0"
# -g0 drops the debug info Python's CFLAGS ask for (faster build, 10x smaller library).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3", "-g0"]
LINK_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
NVCC_FLAGS = ["-O3"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _say(message: str) -> None:
    print(f"sdetr setup: {message}", file=sys.stderr)


def _sources(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern))


def _load_find_cuda_home():
    """``sdetr.utils.cuda_toolkit.find_cuda_home``, loaded by path (the package is not importable
    while it is being built)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_sdetr_cuda_toolkit", os.path.join(ROOT, "sdetr", "utils", "cuda_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home


_find_cuda_home = _load_find_cuda_home()


def _have_cxx_compiler() -> bool:
    """Both the compiler torch's build calls ($CXX or c++) and Python's C++ linker are on PATH."""
    compiler = os.environ.get("CXX") or "c++"
    linker = os.environ.get("LDCXXSHARED") or sysconfig.get_config_var("LDCXXSHARED") or "c++"
    return all(shutil.which(tool.split()[0]) is not None for tool in (compiler, linker))


def _remove_stale_build(reason: str) -> None:
    """No extension this time: delete an in-place sdetr/_C*.so from an earlier build, which would load."""
    package = os.path.join(ROOT, "sdetr")
    for stale in glob.glob(os.path.join(package, "_C.*.so")) + glob.glob(os.path.join(package, "_C.*.pyd")):
        _say(f"{reason}: removing the stale {stale}")
        os.remove(stale)


def _cuda_plan(cuda_sources: list[str]) -> str | None:
    """CUDA_HOME to build with, or None to build CPU only (reason printed)."""
    if _flag("SDETR_NO_CUDA"):
        _say("SDETR_NO_CUDA=1: CUDA kernels skipped")
        return None
    forced = _flag("SDETR_FORCE_CUDA")
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        if forced:
            raise RuntimeError("SDETR_FORCE_CUDA=1 but no CUDA toolkit found (set CUDA_HOME)")
        _say("no CUDA toolkit found: building the CPU kernels only")
        return None
    import torch

    if torch.version.cuda is None:
        if forced:
            raise RuntimeError(f"SDETR_FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        _say(f"CUDA toolkit at {cuda_home} but torch {torch.__version__} is CPU-only: CPU kernels only")
        return None
    if not cuda_sources:
        _say(f"CUDA toolkit at {cuda_home} but kernels/cuda/ has no sources yet: CPU kernels only")
        return None
    return cuda_home


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            "building sdetr._C needs torch at build time: install torch first and run "
            "`pip install --no-build-isolation -e .` (see the Makefile), or set SDETR_NO_EXTENSION=1"
        ) from exc


def _macro_value(text: str) -> str:
    """A -D value that survives both ninja (shell) and distutils argv: no spaces, quotes or ';'."""
    return "".join(c if c.isalnum() or c in "-_.=+,/" else "," for c in text)


def _extensions() -> tuple[list, dict]:
    if _flag("SDETR_NO_EXTENSION"):
        _say("SDETR_NO_EXTENSION=1: no compiled kernels, the reference backend will be used")
        _remove_stale_build("SDETR_NO_EXTENSION=1")
        return [], {}
    if not _have_cxx_compiler():
        _say("WARNING: no C++ compiler found: no compiled kernels, the reference backend will be used")
        _remove_stale_build("no C++ compiler")
        return [], {}
    _require_torch()
    cpu_sources = ["kernels/bindings.cpp", *_sources("kernels/cpu/*.cpp")]
    cuda_sources = _sources("kernels/cuda/*.cu") + _sources("kernels/cuda/*.cpp")
    cuda_home = _cuda_plan(cuda_sources)
    toolkit = cuda_home or _find_cuda_home()
    if toolkit is not None:
        os.environ["CUDA_HOME"] = toolkit  # before torch.utils.cpp_extension reads it
    if cuda_home is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = [*CXX_FLAGS, f"-DSDETR_BUILD_CXX_FLAGS={_macro_value(','.join(CXX_FLAGS))}"]
    if cuda_home is None:
        ext = CppExtension(EXT_NAME, cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=LINK_FLAGS)
    else:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        cuda_macros = ["-DSDETR_WITH_CUDA", f"-DSDETR_BUILD_CUDA_ARCHS={_macro_value(archs.replace(';', ','))}"]
        include_dirs = _nvidia_wheel_includes()
        ext = CUDAExtension(EXT_NAME, cpu_sources + cuda_sources, include_dirs=include_dirs,
                            # nvcc splits -D values at commas: only the host compiler (bindings.cpp,
                            # build_info) gets the arch list.
                            extra_compile_args={"cxx": cxx + cuda_macros, "nvcc": NVCC_FLAGS + cuda_macros[:1]},
                            extra_link_args=LINK_FLAGS)
        _say(f"building CPU + CUDA kernels (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs})")
    return [ext], {"build_ext": BuildExtension}


def _nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels (e.g. cusparse), which some toolkits lack (ENVIRONMENT.md)."""
    found = []
    for path in sys.path:
        found += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
    return sorted(set(found))[:1]


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
