"""Checks of a sweep's runs that need the file system, done before Ray or MLflow start.

A COCO ``data.root`` must hold the splits' image folders and annotation files; a synthetic one
is generated here, once per distinct data section (trials running at once must not generate
the same folder together). A ``train.deepspeed_config`` file must fit its run.
"""

from __future__ import annotations

import logging
from typing import Sequence

from sdetr.config import ConfigError
from sdetr.engine.data import split_paths
from sdetr.orchestration.grid import RunPlan, unique_data

logger = logging.getLogger(__name__)


def missing_data(plan: RunPlan) -> str:
    """"" when the run's COCO folders exist (or it is synthetic), else the first missing path."""
    data = plan.cfg.data
    if data.synthetic:
        return ""
    for split in ("train", "val"):
        img_dir, ann_file = split_paths(data, split)
        for path in (img_dir, ann_file):
            if not path.exists():
                return str(path)
    return ""


def check_runs(plans: Sequence[RunPlan], *, generate: bool = True) -> None:
    """Raise ConfigError naming the run and the path of the first unusable dataset or
    DeepSpeed file; generate the synthetic datasets (``generate``)."""
    from sdetr.engine.deepspeed_engine import check_deepspeed_json
    for plan in plans:
        missing = missing_data(plan)
        if missing:
            raise ConfigError(f"run {plan.name}: data.root={plan.cfg.data.root}: {missing} not "
                              "found (point data.root at a COCO 2017 folder, e.g. --set "
                              "data.root=/path/to/coco)")
        try:
            check_deepspeed_json(plan.cfg)
        except ConfigError as exc:
            raise ConfigError(f"run {plan.name}: {exc}") from None
    if generate:
        from sdetr.engine.data import ensure_dataset
        for cfg in unique_data(plans):
            if cfg.data.synthetic:
                logger.info("synthetic dataset at %s", cfg.data.root)
                ensure_dataset(cfg.data)
