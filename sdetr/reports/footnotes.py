"""Footnotes of a Table 1 report, read from the runs' tags and params (never assumed).

Protocol fields come from the tags the profiling stage logs (``sdetr.profile.*``, see
``sdetr.profiling.run.profile_tags``) and the provenance tags (``sdetr.kernel_backend``,
``sdetr.hardware``, ``sdetr.git_sha``). When runs disagree on a field, every distinct value is
listed with its number of runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from sdetr.reports.table1 import param

SYNTHETIC_MARK = "†"
NOT_LOGGED = "not logged"
SPARSE_GFLOPS_NOTE = (
    "Sparse DETR GFLOPs: the published figures are the inference-only count (no encoder "
    "auxiliary heads) of one 800×1066 input, not the released code's full count on the "
    "850×1040 input of the dense rows, so the GFLOPs column (our protocol above) differs from "
    "them by design; profile/gflops_published_protocol is the count under the published "
    "protocol where it was logged.")


@dataclass(frozen=True)
class Footnote:
    """One note under the tables; ``mark`` is the symbol used in the table ("" for none)."""

    mark: str
    text: str


def distinct(values: pd.Series) -> str:
    """One value, or every distinct value with its number of runs ("a (2 runs); b (1 run)")."""
    text = values.map(lambda v: NOT_LOGGED if v is None or (isinstance(v, float)
                                                          and math.isnan(v)) else str(v))
    counts = text.value_counts(sort=False)
    if len(counts) == 1:
        return str(counts.index[0])
    return "; ".join(f"{value} ({n} run{'s' if n != 1 else ''})"
                     for value, n in sorted(counts.items()))


def _tag(runs: pd.DataFrame, name: str) -> str:
    column = f"tags.{name}"
    if column not in runs.columns:
        return NOT_LOGGED
    return distinct(runs[column])


def _measured(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    column = f"metrics.{metric}"
    if column not in runs.columns:
        return runs.iloc[0:0]
    return runs[runs[column].notna()]


def _flops_note(runs: pd.DataFrame) -> str:
    measured = _measured(runs, "profile/gflops")
    if measured.empty:
        return "GFLOPs: not measured in these runs."
    return (f"GFLOPs: {_tag(measured, 'sdetr.profile.flops.convention')}; input "
            f"{_tag(measured, 'sdetr.profile.flops.input')}, image size (H×W) "
            f"{_tag(measured, 'sdetr.profile.flops.image_size')}; modules "
            f"{_tag(measured, 'sdetr.profile.flops.modules')}.")


def _fps_note(runs: pd.DataFrame) -> str:
    measured = _measured(runs, "profile/fps_b1")
    if measured.empty:
        return "FPS: not measured in these runs."
    return (f"FPS: batch 1, input {_tag(measured, 'sdetr.profile.fps.b1.input')}, image size "
            f"(H×W) {_tag(measured, 'sdetr.profile.fps.b1.image_size')}, "
            f"{_tag(measured, 'sdetr.profile.fps.b1.iterations')} timed forwards after "
            f"{_tag(measured, 'sdetr.profile.fps.b1.warmup')} warm-up; device "
            f"{_tag(measured, 'sdetr.profile.device')} "
            f"({_tag(measured, 'sdetr.profile.hardware')}), precision "
            f"{_tag(measured, 'sdetr.profile.precision')}, "
            f"{_tag(measured, 'sdetr.profile.threads')} thread(s), kernels "
            f"{_tag(measured, 'sdetr.profile.kernel_backend')}.")


def _dataset_note(runs: pd.DataFrame) -> str:
    described = pd.Series([
        f"{'synthetic' if param(r, 'data.synthetic') else 'COCO'} "
        f"(data.root={param(r, 'data.root')}, evaluated on {param(r, 'data.val_split')})"
        for _, r in runs.iterrows()], dtype=object)
    return f"Data: {distinct(described)}."


def _published_protocol_note(table: pd.DataFrame) -> str:
    rows = table[(table["method"] == "Sparse DETR") & table["gflops_published_protocol"].notna()]
    counts = [f"{r['section']} ρ {r['rho'] * 100:g}%: {r['gflops_published_protocol']:.1f}"
              + (f" (paper {r['gflops_paper']:.1f})" if not math.isnan(r["gflops_paper"])
                 else "")
              for _, r in rows.iterrows()]
    return ("Published-protocol GFLOPs: " + "; ".join(counts) + ".") if counts else ""


def footnotes(runs: pd.DataFrame, table: pd.DataFrame) -> list[Footnote]:
    """The notes for ``table`` (with published columns), built from its placed ``runs``."""
    notes = [Footnote("", _dataset_note(runs))]
    if table["synthetic"].any():
        notes.append(Footnote(SYNTHETIC_MARK, "trained and evaluated on synthetic data: shown "
                              "without published numbers (synthetic AP is not comparable to "
                              "COCO AP)."))
    notes.append(Footnote("", "AP: COCO box AP in percent (eval/* × 100) of the final "
                          "evaluation; mean ± sample std over the n runs that differ only in "
                          "train.seed; – = not logged (or −1 from pycocotools: no ground truth "
                          "in that area range)."))
    if table["paper_match"].any():
        sources = "; ".join(sorted(set(table.loc[table["paper_match"], "paper_source"])))
        notes.append(Footnote("", f"paper: the published numbers ({sources}); "
                              "Δ = ours − paper, in the same units."))
    notes.append(Footnote("", "Params: profile/params_trainable in millions (training-only "
                          "modules included, e.g. Sparse DETR's encoder auxiliary heads, which "
                          "the paper's Sparse DETR count leaves out)."))
    notes += [Footnote("", _flops_note(runs)), Footnote("", _fps_note(runs))]
    if (table["method"] == "Sparse DETR").any():
        notes.append(Footnote("", SPARSE_GFLOPS_NOTE))
        protocol = _published_protocol_note(table)
        if protocol:
            notes.append(Footnote("", protocol))
    notes += [
        Footnote("", f"Kernel backend (training and evaluation): "
                     f"{_tag(runs, 'sdetr.kernel_backend')}."),
        Footnote("", f"Training hardware: {_tag(runs, 'sdetr.hardware')}; processes: "
                     f"{_tag(runs, 'sdetr.world_size')}."),
        Footnote("", f"Code: sdetr {_tag(runs, 'sdetr.git_sha')}."),
    ]
    return notes
