"""The published Table 1 numbers (``data/paper_table1.csv``) beside ours.

A row of ours matches a published row on (backbone, method, epochs, rho, Top-k & BBR). Only
COCO runs evaluated on val2017 are compared: a synthetic run keeps empty published columns
(its AP says nothing about COCO AP). The published columns are ``<key>_paper`` and the
differences ``<key>_delta`` = ours − published (same units: AP in percent, Params in M).
"""

from __future__ import annotations

import logging
import math
from importlib import resources
from typing import Any, Optional

import pandas as pd

from sdetr.reports.table1 import METRICS

logger = logging.getLogger(__name__)

PUBLISHED_FILE = "paper_table1.csv"
MATCH_KEYS = ("backbone", "method", "epochs", "rho", "topk_bbr")
PAPER_SPLIT = "val2017"


def load_published() -> pd.DataFrame:
    """The packaged published table: one row per (backbone, method, epochs, rho, topk_bbr),
    numbers in the paper's units (AP %, params_M, gflops, fps), ``source`` per row."""
    text = resources.files("sdetr.reports").joinpath("data").joinpath(PUBLISHED_FILE)
    with resources.as_file(text) as path:
        table = pd.read_csv(path, dtype={"backbone": str, "method": str, "source": str})
    table["topk_bbr"] = table["topk_bbr"].astype(str).str.lower() == "true"
    table["epochs"] = table["epochs"].astype(int)
    return table


def _rho_key(rho: Any) -> Optional[float]:
    if rho is None or (isinstance(rho, float) and math.isnan(rho)):
        return None
    return round(float(rho), 4)


def _key(row: pd.Series) -> tuple[Any, ...]:
    return (str(row["backbone"]), str(row["method"]), int(row["epochs"]), _rho_key(row["rho"]),
            bool(row["topk_bbr"]))


def no_comparison_reason(row: pd.Series) -> str:
    """Why a row of ours is not compared with the paper ("" when it is)."""
    if row["synthetic"]:
        return "synthetic data: AP not comparable to COCO AP"
    split = row.get("val_split")
    if isinstance(split, str) and split != PAPER_SPLIT:
        return f"evaluated on {split}, the paper on {PAPER_SPLIT}"
    return ""


def attach_published(table: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``paper_match`` (bool), ``paper_source``, ``no_comparison`` (the reason,
    or ""), and ``<key>_paper`` / ``<key>_delta`` per metric (NaN where not matched)."""
    index: dict[tuple[Any, ...], pd.Series] = {}
    for _, row in published.iterrows():
        key = _key(row)
        if key in index:
            logger.warning("published table: row %s appears twice; the first one counts", key)
            continue
        index[key] = row
    out = table.copy()
    records = []
    for _, row in out.iterrows():
        reason = no_comparison_reason(row)
        match = None if reason else index.get(_key(row))
        record: dict[str, Any] = {"paper_match": match is not None,
                                  "paper_source": match["source"] if match is not None else "",
                                  "no_comparison": reason}
        for metric in METRICS:
            paper = float(match[metric.key]) if match is not None else math.nan
            record[f"{metric.key}_paper"] = paper
            record[f"{metric.key}_delta"] = row[metric.key] - paper
        records.append(record)
    extra = pd.DataFrame(records, index=out.index,
                         columns=["paper_match", "paper_source", "no_comparison"]
                         + [f"{m.key}_{s}" for m in METRICS for s in ("paper", "delta")])
    return pd.concat([out, extra], axis=1)
