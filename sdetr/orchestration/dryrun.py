"""``sdetr sweep FILE --dry-run``: the expanded grid as a table; nothing starts.

One row per run: its name, the axes' values, workers, epochs, trainable parameters (the
papers' count, from the built model: one build per distinct model) and GFLOPs (fvcore, the
profiling stage's protocol) where counting is cheap: models whose eval images are at most
:data:`CHEAP_EVAL_SIZE` px, or all with ``flops=True``. A run whose dataset is missing is marked.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Sequence

from sdetr.config import ExperimentConfig, to_dict
from sdetr.orchestration.checks import missing_data
from sdetr.orchestration.grid import RunPlan
from sdetr.orchestration.spec import SweepSpec

logger = logging.getLogger(__name__)

CHEAP_EVAL_SIZE = 512


def _model_key(cfg: ExperimentConfig, with_rho: bool) -> str:
    model = to_dict(cfg.model)
    model.pop("kernel_backend", None)
    if not with_rho:
        model.pop("rho", None)
    extra = cfg.profile.image_size if with_rho else None
    return json.dumps([model, extra], sort_keys=True)


class _Counter:
    """Parameter and GFLOPs counts, cached per distinct model."""

    def __init__(self, flops: bool) -> None:
        self.flops = flops
        self._params: dict[str, float] = {}
        self._gflops: dict[str, float] = {}

    def params_m(self, cfg: ExperimentConfig) -> float:
        key = _model_key(cfg, with_rho=False)
        if key not in self._params:
            from sdetr.models import build
            from sdetr.profiling.params import count_parameters
            model = build(cfg.model, num_select=cfg.eval.num_select).model
            self._params[key] = count_parameters(model).params_trainable / 1e6
        return self._params[key]

    def gflops(self, cfg: ExperimentConfig) -> Optional[float]:
        if not (self.flops or cfg.data.eval_size <= CHEAP_EVAL_SIZE):
            return None
        key = _model_key(cfg, with_rho=True)
        if key not in self._gflops:
            from sdetr.profiling import ProfileOptions, profile_model
            size = tuple(cfg.profile.image_size) or None
            result = profile_model(cfg, ["flops"], options=ProfileOptions(
                image_size=size, match_published=False, device="cpu"))
            self._gflops[key] = float(result["flops"]["gflops"])
        return self._gflops[key]


def dry_run_rows(spec: SweepSpec, plans: Sequence[RunPlan], *, flops: bool = False
                 ) -> list[dict[str, Any]]:
    """One dict per run: run, every axis ("" where a run has none), workers, epochs,
    params_M, GFLOPs, data. Model-building log lines are kept quiet."""
    models_log = logging.getLogger("sdetr.models")
    level = models_log.level
    models_log.setLevel(logging.WARNING)
    try:
        return _rows(plans, flops)
    finally:
        models_log.setLevel(level)


def _rows(plans: Sequence[RunPlan], flops: bool) -> list[dict[str, Any]]:
    counter = _Counter(flops)
    axes = list(dict.fromkeys(k for plan in plans for k in plan.axes))
    rows = []
    for plan in plans:
        row: dict[str, Any] = {"run": plan.name}
        row.update({k: _short(plan.axes[k]) if k in plan.axes else "" for k in axes})
        gflops = counter.gflops(plan.cfg)
        row.update({"workers": plan.workers, "epochs": plan.cfg.train.epochs,
                    "params_M": round(counter.params_m(plan.cfg), 2),
                    "GFLOPs": "–" if gflops is None else round(gflops, 2),
                    "data": "missing" if missing_data(plan) else
                    ("synthetic" if plan.cfg.data.synthetic else "ok")})
        rows.append(row)
    return rows


def _short(value: Any) -> Any:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return value


def format_dry_run(spec: SweepSpec, plans: Sequence[RunPlan], rows: list[dict[str, Any]]
                   ) -> str:
    """The table plus a header and notes (missing data, the run directory root)."""
    import pandas as pd

    table = pd.DataFrame(rows, dtype=object).to_markdown(index=False)
    res = spec.resources
    lines = [f"sweep {spec.name} ({spec.path}): {len(plans)} run(s), experiment "
             f"{spec.experiment!r}" + (f" — {spec.description}" if spec.description else ""),
             f"per run: {res.cpus_per_worker:g} CPU / {res.gpus_per_worker:g} GPU per worker, "
             f"{spec.limits.retries} retr{'y' if spec.limits.retries == 1 else 'ies'}; "
             f"run directories under {plans[0].run_dir.parent}", "", table]
    if any(r["data"] == "missing" for r in rows):
        lines += ["", "data 'missing': data.root does not hold the COCO folders; set it in the "
                      "sweep file or with --set data.root=/path/to/coco before running"]
    if any(r["GFLOPs"] == "–" for r in rows):
        lines += ["GFLOPs '–': not counted for full-size models (add --flops to count them)"]
    return "\n".join(lines)
