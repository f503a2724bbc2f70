"""One grid point as a Ray Tune function trial: the engine's training run, then a report.

:func:`trial_config` packs what a trial needs into a plain dict (Tune ships it to the trial
actor); :func:`run_trial` is the trainable. It calls
:func:`sdetr.engine.launch.run_training`, which starts a Ray Train ``TorchTrainer`` with the
run's workers (DeepSpeed inside) in the running cluster and ends with its evaluation and
profiling stages. Interrupted runs resume from the newest checkpoint of their run directory,
into the same MLflow child run; a finished run is not trained again.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from sdetr.config import to_dict
from sdetr.orchestration.grid import RunPlan

TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}
"""A trial only waits for its Train workers: no CPU (Tune refuses an empty request)."""


@dataclass
class TrialSpec:
    """What one trial receives (see :func:`trial_config`)."""

    name: str
    config: dict[str, Any]
    run_dir: str
    mlflow_run_id: Optional[str]
    tracking_uri: str
    experiment: str
    resume: str
    max_failures: int
    resources_per_worker: dict[str, float]
    cwd: str


def trial_config(plan: RunPlan, *, mlflow_run_id: Optional[str], tracking_uri: str,
                 experiment: str, force: bool, retries: int, cpus_per_worker: float,
                 gpus_per_worker: float) -> dict[str, Any]:
    """The Tune ``param_space`` entry of ``plan``."""
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    spec = TrialSpec(name=plan.name, config=to_dict(plan.cfg), run_dir=str(plan.run_dir),
                     mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri,
                     experiment=experiment, resume="never" if force else "auto",
                     max_failures=retries, resources_per_worker=resources,
                     cwd=str(Path.cwd()))
    return asdict(spec)


def run_trial(config: dict[str, Any]) -> None:
    """Tune trainable: train (or resume) the run, report its final metrics to Tune."""
    from ray import tune

    from sdetr.config import config_from_dict
    from sdetr.engine.launch import run_training

    spec = TrialSpec(**config["run"])
    os.chdir(spec.cwd)  # relative MLflow artifact locations resolve as in the driver
    cfg = config_from_dict(spec.config)
    result = run_training(cfg, workers=cfg.train.workers, resume=spec.resume,
                          tracking_uri=spec.tracking_uri, use_ray=True, run_dir=spec.run_dir,
                          experiment=spec.experiment, max_failures=spec.max_failures,
                          mlflow_run_id=spec.mlflow_run_id,
                          resources_per_worker=spec.resources_per_worker)
    report = {f"eval/{k}": v for k, v in result.metrics.items()}
    report.update({"status": result.status, "seconds": result.seconds,
                   "mlflow_run_id": result.mlflow_run_id or ""})
    tune.report(report)
