"""Find the CUDA toolkit root. Standard library only: ``setup.py`` loads this file by path at
build time (before the package is importable), and ``sdetr doctor`` imports it normally."""

from __future__ import annotations

import os
import shutil


def find_cuda_home() -> str | None:
    """CUDA toolkit root: CUDA_HOME/CUDA_PATH, /usr/local/cuda, or the root of the nvcc on PATH.

    torch guesses the parent of the parent of ``which nvcc`` instead (``/usr/local`` when nvcc is
    a wrapper in /usr/local/bin), so the build sets CUDA_HOME from this before importing
    torch.utils.cpp_extension.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None
