"""Runs -> the rows of the Sparse DETR paper's Table 1 (one row per configuration).

A run is placed by its model params (see :func:`method_of`); runs identical except for
``train.seed`` (and keys that do not change what a run computes, :data:`NOT_IDENTITY`) form one
row: mean and sample standard deviation over the runs, ``n`` runs. Numbers are in the paper's
units: AP in percent, Params in millions, GFLOPs, FPS at batch 1 (:data:`METRICS`). pycocotools
logs -1 for an AP with no ground truth in its area range; that counts as missing.

Rows are sectioned by backbone (and dataset: synthetic runs get sections of their own) and
ordered like the paper. Runs that cannot be placed (not FINISHED, a model param missing, no
``eval/AP``) are returned as :class:`NotPlaced` with the reason.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import yaml

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    """One number column: its CSV / published-table name, labels, MLflow metric and unit."""

    key: str
    label: str
    latex: str
    mlflow: str
    scale: float
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("AP", "AP", "AP", "eval/AP", 100.0, True),
    Metric("AP50", "AP50", "AP$_{50}$", "eval/AP50", 100.0, True),
    Metric("AP75", "AP75", "AP$_{75}$", "eval/AP75", 100.0, True),
    Metric("APs", "APs", "AP$_S$", "eval/APs", 100.0, True),
    Metric("APm", "APm", "AP$_M$", "eval/APm", 100.0, True),
    Metric("APl", "APl", "AP$_L$", "eval/APl", 100.0, True),
    Metric("params_M", "Params (M)", "Params (M)", "profile/params_trainable", 1e-6, False),
    Metric("gflops", "GFLOPs", "GFLOPs", "profile/gflops", 1.0, False),
    Metric("fps", "FPS", "FPS", "profile/fps_b1", 1.0, True),
)
EXTRA_METRICS = {"gflops_published_protocol": ("profile/gflops_published_protocol", 1.0),
                 "params_inference_M": ("profile/params_inference", 1e-6)}
"""Numbers carried to the CSV and the footnotes, not table columns: key -> (metric, scale)."""
AP_KEYS = frozenset(m.key for m in METRICS if m.mlflow.startswith("eval/"))

NOT_IDENTITY = ("train.seed", "name", "preset", "train.output_dir", "data.num_workers",
                "train.keep_checkpoints")
"""Params that do not make a different row (``preset`` only names a config; the sweep's
``config_hash`` leaves it out too)."""

BACKBONES = {"resnet50": "R50", "swin_t": "Swin-T", "resnet18": "R18", "resnet34": "R34",
             "resnet10": "R10"}
BACKBONE_ORDER = ("R50", "Swin-T", "R18", "R34", "R10")
REQUIRED = ("model.backbone.name", "model.encoder", "model.queries", "model.box_refine",
            "train.epochs")
LITE_PARAMS = ("model.lite_high_levels", "model.lite_high_updates", "model.lite_blocks",
               "model.lite_variant")
TOKEN_SELECTING = ("sparse", "sparse_interleaved")
ROW_COLUMNS = ("section", "backbone", "synthetic", "method", "variant", "epochs", "rho",
               "topk_bbr", "n", "seeds", "dataset", "val_split", "run_names", "run_ids")


@dataclass(frozen=True)
class NotPlaced:
    """A run left out of the table, and why."""

    run_id: str
    name: str
    status: str
    reason: str


@dataclass(frozen=True)
class Placement:
    """Where one run goes: its row label and sort key."""

    backbone: str
    method: str
    epochs: int
    rho: Optional[float]
    topk_bbr: bool
    synthetic: bool
    order: tuple[Any, ...]


def param(run: pd.Series, key: str) -> Any:
    """The YAML-decoded param ``key`` of a run row; None when it was not logged."""
    raw = run.get(f"params.{key}")
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def run_label(run: pd.Series) -> str:
    """The name a reader knows a run by: its sweep run name, MLflow run name, or id."""
    for key in ("tags.sdetr.sweep.run", "run_name"):
        value = run.get(key)
        if isinstance(value, str) and value:
            return value
    return str(run["run_id"])[:12]


def lite_name(run: pd.Series) -> str:
    """Lite-DETR's name of the interleaved encoder, e.g. ``H3L1-(6+1)×1`` (``(6)×1 (code)``
    for the released code's fused layout)."""
    levels = param(run, "model.num_feature_levels") or 4
    high, updates, blocks, variant = (param(run, k) for k in LITE_PARAMS)
    per_block = f"({updates}+1)" if variant != "code" else f"({updates})"
    suffix = " (code)" if variant == "code" else ""
    return f"H{high}L{levels - high}-{per_block}×{blocks}{suffix}"


METHOD_ORDER = {"Deformable DETR": 0, "Deformable DETR (+ refine)": 1,
                "Deformable DETR (two-stage)": 2, "Deformable DETR ✓": 3, "Sparse DETR": 4,
                "Lite-DETR": 5, "Sparse Lite-DETR": 6}


def method_of(run: pd.Series) -> tuple[str, bool, int]:
    """(method label, Top-k & BBR, order) from the model params (REQUIRED present).

    dense+learned: Deformable DETR (``+ refine`` with box refinement); dense+two_stage:
    Deformable DETR (two-stage); dense+topk+refine: "Deformable DETR" with Top-k & BBR (the
    release's Efficient DETR config, as in the paper); sparse: Sparse DETR; interleaved:
    Lite-DETR H{h}L{l}-(A+1)×B; sparse_interleaved: Sparse Lite-DETR H{h}L{l}-(A+1)×B.
    Raises ValueError naming an unknown encoder or query source.
    """
    encoder, queries = param(run, "model.encoder"), param(run, "model.queries")
    refine = bool(param(run, "model.box_refine"))
    topk_bbr = queries == "topk" and refine
    if queries not in ("learned", "two_stage", "topk"):
        raise ValueError(f"unknown model.queries={queries!r}")
    if encoder == "dense":
        if topk_bbr:
            return "Deformable DETR", True, METHOD_ORDER["Deformable DETR ✓"]
        name = {"learned": "Deformable DETR (+ refine)" if refine else "Deformable DETR",
                "two_stage": "Deformable DETR (two-stage)"}[queries]
        return name, False, METHOD_ORDER[name]
    if encoder == "sparse":
        return "Sparse DETR", topk_bbr, METHOD_ORDER["Sparse DETR"]
    if encoder in ("interleaved", "sparse_interleaved"):
        base = "Lite-DETR" if encoder == "interleaved" else "Sparse Lite-DETR"
        return f"{base} {lite_name(run)}", topk_bbr, METHOD_ORDER[base]
    raise ValueError(f"unknown model.encoder={encoder!r}")


def _missing(run: pd.Series) -> list[str]:
    keys = list(REQUIRED)
    encoder = param(run, "model.encoder")
    if encoder in TOKEN_SELECTING:
        keys.append("model.rho")
    if encoder in ("interleaved", "sparse_interleaved"):
        keys += LITE_PARAMS
    return [k for k in keys if param(run, k) is None]


def place(run: pd.Series) -> Placement:
    """The row of a FINISHED run; ValueError (the reason) when it cannot be placed."""
    missing = _missing(run)
    if missing:
        raise ValueError(f"missing param(s) {', '.join(missing)}")
    if pd.isna(run.get("metrics.eval/AP")):
        raise ValueError("no eval/AP metric (evaluation never logged)")
    method, topk_bbr, method_order = method_of(run)
    name = str(param(run, "model.backbone.name"))
    backbone = BACKBONES.get(name, name)
    rank = BACKBONE_ORDER.index(backbone) if backbone in BACKBONE_ORDER else len(BACKBONE_ORDER)
    rho = float(param(run, "model.rho")) if param(run, "model.encoder") in TOKEN_SELECTING \
        else None
    epochs = int(param(run, "train.epochs"))
    synthetic = bool(param(run, "data.synthetic"))
    order = (rank, backbone, synthetic, method_order, method, epochs, rho or 0.0)
    return Placement(backbone, method, epochs, rho, topk_bbr, synthetic, order)


def _placement_or_reason(run: pd.Series) -> Placement | str:
    if run["status"] != "FINISHED":
        return f"status {run['status']} (only FINISHED runs count)"
    try:
        return place(run)
    except ValueError as exc:
        return str(exc)


def split_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[NotPlaced]]:
    """FINISHED, placeable runs (with their :class:`Placement` in column ``placement``) and
    the others as :class:`NotPlaced`."""
    outcome = [_placement_or_reason(run) for _, run in runs.iterrows()]
    rejected = [NotPlaced(run["run_id"], run_label(run), run["status"], why)
                for (_, run), why in zip(runs.iterrows(), outcome) if isinstance(why, str)]
    for item in rejected:
        logger.info("not placed: %s (%s): %s", item.name, item.run_id, item.reason)
    keep = runs.assign(placement=outcome)
    keep = keep[[isinstance(p, Placement) for p in outcome]]
    return keep.reset_index(drop=True), rejected


def identity_key(run: pd.Series) -> str:
    """Every param except :data:`NOT_IDENTITY`, as one string: equal for seed repeats."""
    params = {c[len("params."):]: run[c] for c in run.index
              if c.startswith("params.") and isinstance(run[c], str)}
    for key in NOT_IDENTITY:
        params.pop(key, None)
    return json.dumps(params, sort_keys=True)


def _values(group: pd.DataFrame, mlflow_name: str, ap: bool) -> list[float]:
    column = f"metrics.{mlflow_name}"
    if column not in group.columns:
        return []
    values = [float(v) for v in group[column] if pd.notna(v)]
    return [v for v in values if not (ap and v < 0)]


def _stats(values: list[float], scale: float) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    series = pd.Series(values, dtype=float) * scale
    std = float(series.std(ddof=1)) if len(series) > 1 else math.nan
    return float(series.mean()), std


def _dataset(run: pd.Series) -> str:
    root = param(run, "data.root")
    kind = "synthetic" if param(run, "data.synthetic") else "COCO"
    return f"{kind} (data.root={root})" if root is not None else kind


def _group_row(group: pd.DataFrame) -> dict[str, Any]:
    first = group.iloc[0]
    where: Placement = first["placement"]
    seeds = sorted({str(param(r, "train.seed")) for _, r in group.iterrows()})
    row: dict[str, Any] = {
        "section": where.backbone + (" (synthetic data)" if where.synthetic else ""),
        "backbone": where.backbone, "synthetic": where.synthetic, "method": where.method,
        "variant": "", "epochs": where.epochs, "rho": where.rho, "topk_bbr": where.topk_bbr,
        "n": len(group), "seeds": ",".join(seeds), "dataset": _dataset(first),
        "val_split": param(first, "data.val_split"),
        "run_names": ",".join(run_label(r) for _, r in group.iterrows()),
        "run_ids": ",".join(group["run_id"]), "_order": where.order}
    for metric in METRICS:
        values = _values(group, metric.mlflow, metric.key in AP_KEYS)
        row[metric.key], row[f"{metric.key}_std"] = _stats(values, metric.scale)
    for key, (name, scale) in EXTRA_METRICS.items():
        row[key] = _stats(_values(group, name, False), scale)[0]
    row["_params"] = json.loads(first["_identity"])
    return row


def _disambiguate(table: pd.DataFrame) -> None:
    """Rows with one label but different params get the differing params as ``variant``."""
    label = ["section", "method", "epochs", "rho", "topk_bbr"]
    for _, same in table.groupby(label, dropna=False, sort=False):
        if len(same) < 2:
            continue
        params = list(same["_params"])
        keys = sorted({k for p in params for k in p if len({q.get(k) for q in params}) > 1})
        for index, own in zip(same.index, params):
            table.at[index, "variant"] = ", ".join(f"{k}={own.get(k, '-')}" for k in keys)


def build_table(placed: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: :data:`ROW_COLUMNS`, then per metric ``<key>`` (mean) and
    ``<key>_std`` (sample std, NaN for one run), then :data:`EXTRA_METRICS`; paper order."""
    if placed.empty:
        return pd.DataFrame(columns=list(ROW_COLUMNS) + [m.key for m in METRICS])
    placed = placed.copy()
    placed["_identity"] = [identity_key(r) for _, r in placed.iterrows()]
    rows = [_group_row(g.sort_values("run_id"))
            for _, g in placed.groupby("_identity", sort=False)]
    table = pd.DataFrame(rows)
    table["_first_name"] = table["run_names"]
    table = table.sort_values(["_order", "_first_name"], kind="stable").reset_index(drop=True)
    _disambiguate(table)
    return table.drop(columns=["_order", "_first_name", "_params"])
