"""One evaluation job (``sdetr eval``): build the model, load weights, evaluate, record.

Outputs in ``out_dir``: ``detections.json`` (or ``detections_rho{rho}.json`` per keeping ratio
of a sweep) as COCO results, and ``metrics.json``::

    {"config_name", "preset", "checkpoint", "checkpoint_format", "kernel_backend", "device",
     "mlflow_run_id" (null when not tracked),
     "results": [{"rho" (null for a dense encoder), "metrics" {AP, ..., AR100}, "extra" {...},
                  "num_images", "seconds", "detections" (file name)}]}

When tracked, the MLflow run gets exactly the flattened config as params (so that
``unflatten(params)`` rebuilds it), the provenance tags of :func:`sdetr.tracking.run_tags` plus
``sdetr.run_type=eval``, ``sdetr.checkpoint`` (absolute path) and ``sdetr.checkpoint_format``,
the metrics named by :func:`metrics_for_logging` at step 0 (prefix ``eval``, or
``eval_rho{rho}`` per keeping ratio of a sweep, as the training engine names them), and the
artifacts config.yaml, metrics.json and the detections JSON files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from sdetr.config import ExperimentConfig, flatten, to_yaml
from sdetr.engine.checkpoints import load_model_from_run_checkpoint
from sdetr.engine.data import build_dataset, build_loader, ensure_dataset
from sdetr.engine.evaluate import EvalResult, evaluate, evaluate_rho_sweep, metrics_for_logging
from sdetr.models import CheckpointError, build, fold_batch_norm, load_official_checkpoint
from sdetr.tracking import DEFAULT_EXPERIMENT, Tracker, make_tracker, run_tags
from sdetr.utils.io import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class EvalRunOutput:
    """results: keeping ratio (None without a sweep) -> EvalResult; files written; MLflow id."""

    results: dict[Optional[float], EvalResult]
    metrics_path: Path
    run_id: Optional[str]


def load_weights(model: nn.Module, cfg: ExperimentConfig, checkpoint: Path, *,
                 official: bool) -> str:
    """Load ``checkpoint`` into ``model``; return its format: "official" (``--official``),
    "sdetr-weights" (a file of :func:`sdetr.models.save_model_weights`) or "sdetr-run" (a
    training checkpoint or run folder of the engine, see
    :func:`sdetr.engine.checkpoints.resolve_weights_file`). Raises CheckpointError (one line
    naming the path) for a missing or unusable checkpoint."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint {checkpoint}: not found")
    if official:
        load_official_checkpoint(checkpoint, model)
        return "official"
    weights = load_model_from_run_checkpoint(checkpoint, model, cfg)
    if checkpoint.is_dir():
        logger.info("training checkpoint %s: evaluating %s", checkpoint, weights)
        return "sdetr-run"
    return "sdetr-weights"


def _check_rhos(cfg: ExperimentConfig, rhos: Sequence[float]) -> None:
    if rhos and not cfg.model.selects_tokens:
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
    if not Path(checkpoint).exists():  # before the (slow) model build
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
        if cfg.eval.fold_bn:  # this model is only evaluated: fold in place
            model = fold_batch_norm(model, inplace=True)[0]
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
    tracker.log_params(flatten(cfg))
    tags = run_tags(cfg, kernel_backend=kernel_backend, world_size=1,
                    device=torch.device(device).type)
    tracker.set_tags({**tags, "sdetr.run_type": "eval",
                      "sdetr.checkpoint": str(Path(checkpoint).resolve()),
                      "sdetr.checkpoint_format": fmt,
                      "sdetr.eval.fold_bn": str(cfg.eval.fold_bn).lower()})
    tracker.log_text(to_yaml(cfg), "config.yaml")


def _track_results(tracker: Tracker, results: dict[Optional[float], EvalResult],
                   metrics_path: Path) -> None:
    for rho, result in results.items():
        prefix = "eval" if rho is None else f"eval_rho{rho:g}"
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
    return cfg.model.rho if cfg.model.selects_tokens else None
