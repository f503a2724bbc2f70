"""Run one training or evaluation job inside whatever launched it (a Ray Train worker or a
plain process). Knows nothing of sweeps. MLflow is only imported by :mod:`sdetr.tracking`.
"""

from sdetr.engine.data import (build_dataset, build_loader, ensure_dataset, set_loader_epoch,
                               split_paths)
from sdetr.engine.evaluate import (METRIC_KEYS, EvalResult, coco_metrics, evaluate,
                                   evaluate_rho_sweep, metrics_for_logging, sparse_encoder_of,
                                   to_coco_detections)

__all__ = [
    "EvalResult", "METRIC_KEYS", "build_dataset", "build_loader", "coco_metrics",
    "ensure_dataset", "evaluate", "evaluate_rho_sweep", "metrics_for_logging", "set_loader_epoch",
    "sparse_encoder_of", "split_paths", "to_coco_detections",
]

# Training (DeepSpeed; Ray Train or one plain process).
from sdetr.engine.checkpoints import (TrainState, find_latest,  # noqa: E402
                                      load_model_from_run_checkpoint, resolve_weights_file)
from sdetr.engine.deepspeed_engine import (accumulation_steps, check_deepspeed_json,  # noqa: E402
                                           deepspeed_config, load_deepspeed_json)
from sdetr.engine.launch import TrainResult, run_training  # noqa: E402
from sdetr.engine.optim import build_optimizer, build_scheduler, param_groups  # noqa: E402
from sdetr.engine.steps import NonFiniteLossError, TrainingError  # noqa: E402
from sdetr.engine.train import WorkerArgs, train_worker  # noqa: E402

__all__ += [
    "NonFiniteLossError", "TrainResult", "TrainState", "TrainingError", "WorkerArgs",
    "accumulation_steps", "build_optimizer", "build_scheduler", "check_deepspeed_json",
    "deepspeed_config", "find_latest", "load_deepspeed_json", "load_model_from_run_checkpoint",
    "param_groups", "resolve_weights_file", "run_training", "train_worker",
]
