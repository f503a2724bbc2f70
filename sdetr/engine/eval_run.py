"""One evaluation job (``sdetr eval``): build the model, load weights, evaluate, record.

Outputs in ``out_dir``: ``detections.json`` (or ``detections_rho{rho}.json`` per keeping ratio
of a sweep) as COCO results, and ``metrics.json``::

    {"config_name", "preset", "checkpoint", "checkpoint_format", "kernel_backend", "device",
     "mlflow_run_id" (null when not tracked),
     "results": [{"rho" (null for a dense encoder), "metrics" {AP, ..., AR100}, "extra" {...},
                  "num_images", "seconds", "detections" (file name)}]}

When tracked, the MLflow run gets the flattened config as params (plus ``eval.checkpoint``,
``eval.checkpoint_format``), the provenance tags of :func:`sdetr.tracking.run_tags` plus
``sdetr.run_type=eval``, the metrics named by :func:`metrics_for_logging` (prefix ``val``, or
``val_rho{rho}`` in a sweep) and the artifacts config.yaml, metrics.json and the detections.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sdetr.config import ExperimentConfig, flatten, to_yaml
from sdetr.engine.data import build_dataset, build_loader, ensure_dataset
from sdetr.engine.evaluate import EvalResult, evaluate, evaluate_rho_sweep, metrics_for_logging
from sdetr.models import (CheckpointError, build, load_model_weights,
                          load_official_checkpoint)
from sdetr.tracking import DEFAULT_EXPERIMENT, Tracker, make_tracker, run_tags
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

RUN_CHECKPOINT_LOADER = ("sdetr.engine.checkpoints", "load_model_from_run_checkpoint")


@dataclass
class EvalRunOutput:
    """results: keeping ratio (None without a sweep) -> EvalResult; files written; MLflow id."""

    results: dict[Optional[float], EvalResult]
    metrics_path: Path
    run_id: Optional[str]


def load_weights(model: nn.Module, cfg: ExperimentConfig, checkpoint: Path, *,
                 official: bool) -> str:
    """Load ``checkpoint`` into ``model``; return its format ("official", "sdetr-weights" or
    "sdetr-run"). A directory is a training checkpoint of the engine. Raises CheckpointError
    (one line naming the path) for a missing or unusable checkpoint."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint}: not found")
    if official:
        load_official_checkpoint(checkpoint, model)
        return "official"
    if checkpoint.is_dir():
        loader = _run_checkpoint_loader()
        if loader is None:
            raise CheckpointError(f"checkpoint {checkpoint} is a directory, but this sdetr "
                                  "cannot read training checkpoints yet; pass a weights file")
        loader(checkpoint, model, cfg)
        return "sdetr-run"
    load_model_weights(checkpoint, model, cfg.model)
    return "sdetr-weights"


def _run_checkpoint_loader() -> Any:
    """``sdetr.engine.checkpoints.load_model_from_run_checkpoint`` when that module has it."""
    module_name, attr = RUN_CHECKPOINT_LOADER
    if importlib.util.find_spec(module_name) is None:
        return None
    return getattr(importlib.import_module(module_name), attr, None)


def _check_rhos(cfg: ExperimentConfig, rhos: Sequence[float]) -> None:
    if rhos and cfg.model.encoder != "sparse":
        raise ValueError(f"--rho: only a sparse encoder has a keeping ratio "
                         f"(model.encoder={cfg.model.encoder!r})")
    bad = [r for r in rhos if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(f"--rho: {bad[0]} is outside (0, 1]")


def run_evaluation(cfg: ExperimentConfig, checkpoint: Path, *, out_dir: Path,
                   official: bool = False, rhos: Sequence[float] = (), device: str = "cpu",
                   kernel_backend: Optional[str] = None, track: bool = True,
                   tracking_uri: Optional[str] = None, experiment: str = DEFAULT_EXPERIMENT,
                   progress: bool = True) -> EvalRunOutput:
    """Evaluate ``checkpoint`` on the config's val split (generated first if synthetic).

    ``rhos`` (sparse models only) evaluates at each keeping ratio instead of the config's.
    The MLflow run is started before the (long) evaluation so that a bad store fails fast,
    and is marked FAILED if the evaluation raises.
    """
    _check_rhos(cfg, rhos)
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint}: not found")
    built = build(cfg.model, kernel_backend=kernel_backend, num_select=cfg.eval.num_select)
    fmt = load_weights(built.model, cfg, checkpoint, official=official)
    ensure_dataset(cfg.data, splits=("val",))
    dataset = build_dataset(cfg.data, "val")
    loader = build_loader(dataset, cfg.eval.batch_size, shuffle=False, seed=0,
                          num_workers=cfg.data.num_workers)
    tracker = make_tracker(0, tracking_uri, experiment, f"eval-{cfg.name}", enabled=track)
    with tracker:
        _track_start(tracker, cfg, checkpoint, fmt, built.kernel_backend, device)
        model = built.model.to(device)
        postprocess = built.postprocess.to(device)
        out_dir = Path(out_dir)
        if rhos:
            sweep = evaluate_rho_sweep(model, postprocess, loader, dataset.coco, rhos=rhos,
                                       device=device, detections_dir=out_dir,
                                       progress=progress)
            results: dict[Optional[float], EvalResult] = dict(sweep)
        else:
            results = {None: evaluate(model, postprocess, loader, dataset.coco, device=device,
                                      detections_path=out_dir / "detections.json",
                                      progress=progress)}
        summary = _summary(cfg, checkpoint, fmt, built.kernel_backend, device, results,
                           tracker.run_id)
        metrics_path = atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
        _track_results(tracker, results, metrics_path)
    return EvalRunOutput(results, metrics_path, tracker.run_id)


def _track_start(tracker: Tracker, cfg: ExperimentConfig, checkpoint: Path, fmt: str,
                 kernel_backend: str, device: str) -> None:
    params = flatten(cfg)
    params.update({"eval.checkpoint": str(Path(checkpoint).resolve()),
                   "eval.checkpoint_format": fmt})
    tracker.log_params(params)
    tags = run_tags(cfg, kernel_backend=kernel_backend, world_size=1,
                    device=torch.device(device).type)
    tracker.set_tags({**tags, "sdetr.run_type": "eval"})
    tracker.log_text(to_yaml(cfg), "config.yaml")


def _track_results(tracker: Tracker, results: dict[Optional[float], EvalResult],
                   metrics_path: Path) -> None:
    for rho, result in results.items():
        prefix = "val" if rho is None else f"val_rho{rho:g}"
        tracker.log_metrics(metrics_for_logging(result, prefix), step=0)
        if result.detections_path is not None:
            tracker.log_artifact(result.detections_path)
    tracker.log_artifact(metrics_path)


def _summary(cfg: ExperimentConfig, checkpoint: Path, fmt: str, kernel_backend: str,
             device: str, results: dict[Optional[float], EvalResult],
             run_id: Optional[str]) -> dict[str, Any]:
    return {
        "config_name": cfg.name, "preset": cfg.preset, "checkpoint": str(checkpoint),
        "checkpoint_format": fmt, "kernel_backend": kernel_backend, "device": str(device),
        "mlflow_run_id": run_id,
        "results": [{"rho": rho if rho is not None else _config_rho(cfg),
                     "metrics": r.metrics, "extra": r.extra, "num_images": r.num_images,
                     "seconds": round(r.seconds, 3),
                     "detections": r.detections_path.name if r.detections_path else None}
                    for rho, r in results.items()],
    }


def _config_rho(cfg: ExperimentConfig) -> Optional[float]:
    return cfg.model.rho if cfg.model.encoder == "sparse" else None
