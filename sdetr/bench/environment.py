"""Facts about the machine and the kernel build, for ``sdetr doctor`` and benchmark metadata.

Every probe reports what it found or why it found nothing (``None`` plus a reason string); a tool
that fails to run is reported with its error, never hidden.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from typing import Any

import torch

from sdetr.ops import available_backends, compiled_build_info
from sdetr.utils.cuda_toolkit import find_cuda_home
from sdetr.ops.backends import BackendUnavailableError, registered_ops, resolve_backend

_PROBE_TIMEOUT_S = 20


def _first_line(command: list[str]) -> str:
    """First non-empty line of ``command``'s output, or ``"error: ..."``."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return lines[0] if lines else f"error: no output (exit status {done.returncode})"


def compiler_facts() -> dict[str, Any]:
    """The C++ compiler a build would use (``$CXX`` or ``c++``): path and version line."""
    name = os.environ.get("CXX", "c++").split()[0]
    path = shutil.which(name)
    if path is None:
        return {"cxx": None, "version": None, "reason": f"{name!r} not found on PATH"}
    return {"cxx": path, "version": _first_line([path, "--version"])}


def cuda_home() -> str | None:
    """CUDA toolkit root, found exactly as setup.py finds it."""
    return find_cuda_home()


def cuda_toolkit_facts() -> dict[str, Any]:
    """CUDA toolkit root and the ``nvcc --version`` release line (None when no toolkit)."""
    home = cuda_home()
    if home is None:
        return {"cuda_home": None, "nvcc_version": None, "reason": "no CUDA toolkit found"}
    release = [line for line in _all_lines([os.path.join(home, "bin", "nvcc"), "--version"]) if "release" in line]
    return {"cuda_home": home, "nvcc_version": release[0] if release else None,
            "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}


def _all_lines(command: list[str]) -> list[str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"error: {exc}"]
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def gpu_facts() -> list[dict[str, Any]]:
    """Name, compute capability and memory of each visible CUDA GPU (empty list when none)."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1)})
    return gpus


def torch_facts() -> dict[str, Any]:
    """torch version, its CUDA build, and the CPU threads it (and the compiled kernels) use."""
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "parallel_backend": _parallel_backend(),
    }


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_facts(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU model, torch's CPU kernel level, and the flags that give native bf16 math
    (``amx_bf16``, ``avx512_bf16``; without them bf16 is emulated and ``bf16-mixed`` training
    is slower than fp32). ``bf16_flags`` is None when ``cpuinfo`` cannot be read (not Linux)."""
    facts: dict[str, Any] = {"model": platform.processor() or None,
                             "torch_capability": torch.backends.cpu.get_cpu_capability(),
                             "bf16_flags": None}
    try:
        text = open(cpuinfo, encoding="utf-8", errors="replace").read()
    except OSError as exc:
        facts["reason"] = f"{cpuinfo}: {exc.strerror}"
        return facts
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            facts["model"] = value.strip()
        elif key.strip() == "flags":
            flags.update(value.split())
    facts["bf16_flags"] = [f for f in CPU_BF16_FLAGS if f in flags]
    return facts


def _parallel_backend() -> str:
    info = torch.__config__.parallel_info()
    lines = [line for line in info.splitlines() if line.startswith("ATen parallel backend")]
    return lines[0].split(":", 1)[1].strip() if lines else "unknown"


def backend_facts() -> dict[str, dict[str, Any]]:
    """For every op: the backends registered and the one the automatic/default choice resolves to."""
    facts = {}
    for op in registered_ops():
        try:
            resolved: str | None = resolve_backend(op)
            error = None
        except BackendUnavailableError as exc:
            resolved, error = None, str(exc)
        facts[op] = {"available": available_backends(op), "resolved": resolved, "error": error}
    return facts


def collect_environment() -> dict[str, Any]:
    """Everything ``sdetr doctor`` reports, as one JSON-serialisable dict."""
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch_facts(),
        "cpu": cpu_facts(),
        "gpus": gpu_facts(),
        "compiler": compiler_facts(),
        "cuda_toolkit": cuda_toolkit_facts(),
        "extension": compiled_build_info(),
        "backends": backend_facts(),
    }
