"""Provenance of a result: code version, hardware and software, as MLflow tags.

Tag names (all values are strings):

=========================  ===================================================================
``sdetr.git_sha``          HEAD of the sdetr checkout, ``-dirty`` appended when tracked files
                           have uncommitted changes; ``unknown`` outside a git checkout
``sdetr.preset``           the preset the config derives from (``none`` for a bare YAML)
``sdetr.config_name``      ``cfg.name``
``sdetr.kernel_backend``   the ms_deform_attn backend that ran (``reference`` / ``compiled``)
``sdetr.world_size``       number of training/eval processes
``sdetr.device``           device type the model ran on (``cpu``, ``cuda``)
``sdetr.hardware``         :func:`device_description`
``sdetr.torch_version``    ``torch.__version__``
``sdetr.hostname``         ``socket.gethostname()``
=========================  ===================================================================
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from sdetr.config import ExperimentConfig

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 10


def _git(*args: str) -> subprocess.CompletedProcess | None:
    """Run git in the package directory; None when git is not installed."""
    try:
        return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except FileNotFoundError:
        logger.debug("git is not installed: the code version is unknown")
        return None


def git_sha() -> str:
    """HEAD commit of the checkout holding the sdetr package, ``+ "-dirty"`` if tracked files
    differ from it; ``"unknown"`` when the package is not in a git checkout (or git is
    missing, or the repository has no commit yet). Untracked files do not count as dirty."""
    head = _git("rev-parse", "--verify", "HEAD")
    if head is None or head.returncode != 0:
        return "unknown"
    sha = head.stdout.strip()
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None and status.returncode == 0 and status.stdout.strip():
        sha += "-dirty"
    return sha


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_description() -> str:
    """One line describing the accelerators, e.g. ``"1x NVIDIA H100 80GB HBM3 (CUDA 13.0)"``,
    or the CPU: ``"CPU AMD EPYC 9654 (2 cores)"``."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        return f"{count}x {' / '.join(names)} (CUDA {torch.version.cuda})"
    return f"CPU {_cpu_name()} ({os.cpu_count()} cores)"


def run_tags(cfg: ExperimentConfig, *, kernel_backend: str, world_size: int,
             device: str) -> dict[str, str]:
    """The provenance tags of a run (see the module docstring for the names)."""
    return {
        "sdetr.git_sha": git_sha(),
        "sdetr.preset": cfg.preset or "none",
        "sdetr.config_name": cfg.name,
        "sdetr.kernel_backend": kernel_backend,
        "sdetr.world_size": str(world_size),
        "sdetr.device": str(device),
        "sdetr.hardware": device_description(),
        "sdetr.torch_version": torch.__version__,
        "sdetr.hostname": socket.gethostname(),
    }
