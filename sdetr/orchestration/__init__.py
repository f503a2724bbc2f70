"""Sweeps: YAML grids of runs (:mod:`~sdetr.orchestration.spec`), expanded into resolved run
configs (:mod:`~sdetr.orchestration.grid`) and run as Ray Tune trials of the engine
(:mod:`~sdetr.orchestration.runner`), tracked as MLflow parent/child runs
(:mod:`~sdetr.orchestration.sweep_tracking`). Importing this package imports neither Ray nor
MLflow."""

from sdetr.orchestration.grid import RunPlan, config_hash, expand
from sdetr.orchestration.spec import SweepSpec, load_sweep

__all__ = ["RunPlan", "SweepSpec", "config_hash", "expand", "load_sweep"]
