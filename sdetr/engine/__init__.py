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
