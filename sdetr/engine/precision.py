"""``train.precision: auto``: bf16-mixed where bf16 math is native, else fp32.

Resolved once by the launcher (:func:`sdetr.engine.launch.run_training`,
``sdetr bench train``) on the machine that starts the run; the run's ``config.yaml`` and MLflow
params then hold the concrete value, and the tag ``sdetr.precision_requested`` says it was
``auto``. On a CPU without AMX-BF16 / AVX512-BF16, bf16 matrix products are emulated: measured
0.9 GFLOP/s against 64 in fp32 on one AMD EPYC core (AVX2), a 10x slower training step.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sdetr.config import ExperimentConfig

logger = logging.getLogger(__name__)


def native_bf16(use_gpu: bool) -> tuple[bool, str]:
    """(whether bf16 math is native on the device a run will use, why)."""
    if use_gpu:
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, f"CUDA bf16 {'supported' if ok else 'not supported'}"
    from sdetr.bench.environment import cpu_facts

    facts = cpu_facts()
    flags = facts["bf16_flags"]
    if flags is None:
        return False, f"CPU flags unknown ({facts.get('reason', 'no /proc/cpuinfo')})"
    if flags:
        return True, f"CPU {facts['model']} has {', '.join(flags)}"
    return False, f"CPU {facts['model']} has neither AMX-BF16 nor AVX512-BF16"


def resolve_precision(cfg: ExperimentConfig, use_gpu: bool) -> ExperimentConfig:
    """``cfg`` itself unless ``train.precision`` is ``auto``; then a copy with ``bf16-mixed``
    or ``fp32`` for this machine (logged with the reason)."""
    if cfg.train.precision != "auto":
        return cfg
    native, why = native_bf16(use_gpu)
    precision = "bf16-mixed" if native else "fp32"
    logger.info("train.precision auto -> %s (%s)", precision, why)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


__all__ = ["native_bf16", "resolve_precision"]
