"""The profiling stage of a run: params / GFLOPs / FPS / memory of the trained model, tracked.

:func:`run_profile_stage` is what the training engine calls on rank 0 after the final
evaluation (and what the coming sweep orchestration calls per trial): it turns the run's
:class:`~sdetr.config.ProfileConfig` into :class:`~sdetr.profiling.ProfileOptions`, measures a
copy of the trained model (the memory measurement runs backward passes; the run's weights are
never touched), writes ``<run_dir>/profile.json`` atomically and logs the figures to the run's
MLflow run (metrics ``profile/<name>`` at step = epochs, protocol tags ``sdetr.profile.*``, the
JSON as an artifact). Every figure in the JSON carries its protocol.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from sdetr.config import ExperimentConfig, ProfileConfig
from sdetr.models import BuiltModel
from sdetr.profiling import METRIC_PREFIX, ProfileOptions, log_profile, profile_model
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"


def profile_options(profile: ProfileConfig, device: torch.device) -> ProfileOptions:
    """The profiling options of a run's ``profile`` section, measured on ``device``."""
    return ProfileOptions(
        image_size=tuple(profile.image_size) if profile.image_size else None,  # type: ignore[arg-type]
        batch_sizes=tuple(profile.batch_sizes), iters=profile.iters, warmup=profile.warmup,
        modules=profile.modules, match_published=profile.match_published, device=str(device))


def run_profile_stage(cfg: ExperimentConfig, built: BuiltModel, run_dir: Path, tracker: Any, *,
                      device: torch.device, step: int) -> dict[str, float]:
    """Profile ``built`` (a trained model; measured on an fp32 copy) as ``cfg.profile`` says.

    The profile is written to ``run_dir/profile.json`` and logged through ``tracker`` (a started
    :class:`~sdetr.tracking.Tracker`). Returns the metrics logged (``profile/<name>``), or {}
    when ``cfg.profile.what`` is empty.
    """
    what = list(cfg.profile.what)
    if not what:
        return {}
    logger.info("profiling %s: %s on %s", cfg.name, ", ".join(what), device)
    measured = BuiltModel(model=copy.deepcopy(built.model).float(), criterion=built.criterion,
                          postprocess=built.postprocess, kernel_backend=built.kernel_backend)
    result = profile_model(cfg, what, options=profile_options(cfg.profile, device),
                           built=measured)
    path = run_dir / PROFILE_FILE
    atomic_write_text(path, json.dumps(result, indent=2))
    metrics = log_profile(result, tracker, step=step)
    tracker.log_artifact(path)
    tracker.flush()
    logger.info("profile of %s: %s", cfg.name, summary_line(metrics))
    return metrics


def summary_line(metrics: dict[str, float]) -> str:
    """``params 41.7M, 12.3 GFLOPs, 3.1 FPS`` from ``profile/...`` metrics (what is there)."""
    parts = []
    params = metrics.get(METRIC_PREFIX + "params_trainable")
    if params is not None:
        parts.append(f"params {params / 1e6:.2f}M")
    gflops = metrics.get(METRIC_PREFIX + "gflops")
    if gflops is not None:
        parts.append(f"{gflops:.2f} GFLOPs")
    for key in ("b1", "b4"):
        fps = metrics.get(f"{METRIC_PREFIX}fps_{key}")
        if fps is not None:
            parts.append(f"{fps:.2f} FPS ({key})")
    return ", ".join(parts) or "nothing measured"


__all__ = ["PROFILE_FILE", "profile_options", "run_profile_stage",
           "summary_line"]
