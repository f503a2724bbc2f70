"""Ablation figures of a report: Table 1 rows and their runs -> PNG + PDF files.

:func:`render_figures` draws every figure of :data:`FIGURES` from tracked numbers only (the
rows of :func:`sdetr.reports.table1.build_table`, the placed runs of ``split_runs`` and, for
Corr, the metric's history). A figure whose runs are absent is skipped with one line saying
why (logged at INFO and listed in ``index.md``). Drawing uses :class:`matplotlib.figure.Figure`
directly (Agg for PNG, no pyplot state, no display).

Numbers are in Table 1's units: AP in percent (pycocotools' -1 counts as missing), GFLOPs,
keeping ratio ρ in percent. Runs identical except for the seed (and :data:`NOT_COMPARED`) are
one point: the mean, with the sample standard deviation as error bar where n > 1. A line joins
runs that differ only in the figure's x parameter.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sdetr.reports.table1 import identity_key, param

logger = logging.getLogger(__name__)

FIGURE_DIR = "figures"
FILE_TYPES = ("png", "pdf")
DPI = 150
AP_COLUMN = "metrics.eval/AP"
CORR_METRIC = "eval/corr_mask_attn_map_dec_all"
"""Sparse DETR's Corr as the engine logs it at each evaluation (``metrics_for_logging`` of the
model's ``corr_mask_attn_map_dec_all``)."""
RHO_AP = re.compile(r"^metrics\.eval_rho(?P<rho>\d+(?:\.\d+)?(?:e[+-]?\d+)?)/AP$")
"""Final-epoch AP of a ``eval.rho_sweep`` evaluation at keeping ratio ``rho``."""
NOT_COMPARED = ("eval.rho_sweep",)
"""Params that do not change a run's ``eval/AP``: runs differing only in them share a point."""
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
ERROR_NOTE = "error bars: sample std over seeds (n > 1)"


@dataclass(frozen=True)
class FigureInputs:
    """What figures are drawn from: Table 1 rows, the placed runs (``split_runs``, with
    ``placement``), and the history of :data:`CORR_METRIC` (run_id, step, value)."""

    table: pd.DataFrame
    placed: pd.DataFrame
    corr_history: pd.DataFrame


@dataclass(frozen=True)
class RenderedFigure:
    """One drawn figure: ``files`` maps ``figures/<name>.png`` / ``.pdf`` to their bytes."""

    name: str
    title: str
    files: dict[str, bytes]


@dataclass(frozen=True)
class FigureSet:
    """The figures drawn and one line per figure skipped."""

    rendered: tuple[RenderedFigure, ...]
    skipped: tuple[str, ...]

    def files(self) -> dict[str, bytes]:
        return {path: data for fig in self.rendered for path, data in fig.files.items()}

    def index_lines(self) -> list[str]:
        """``## Figures`` (image links to the PNGs, the PDFs as file links) and
        ``## Figures skipped`` for ``index.md``."""
        lines = ["## Figures", ""]
        for fig in self.rendered:
            png, pdf = (f"{FIGURE_DIR}/{fig.name}.{kind}" for kind in FILE_TYPES)
            lines += [f"### {fig.title}", "", f"![{fig.title}]({png})", "",
                      f"PDF: [{fig.name}.pdf]({pdf})", ""]
        if not self.rendered:
            lines += ["None: no figure has the runs it needs.", ""]
        lines += [f"## Figures skipped ({len(self.skipped)})", ""]
        lines += [f"- {line}" for line in self.skipped] or ["None."]
        return lines + [""]


Drawn = Union[Figure, str]
"""A figure, or the reason it was skipped."""


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    draw: Callable[[FigureInputs], Drawn]


# ------------------------------------------------------------------------- numbers
def _ap_percent(values: pd.Series) -> list[float]:
    """AP fractions -> percent, NaN and pycocotools' -1 left out."""
    return [float(v) * 100 for v in values if pd.notna(v) and float(v) >= 0]


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    if not values:
        return math.nan, math.nan, 0
    series = pd.Series(list(values), dtype=float)
    std = float(series.std(ddof=1)) if len(series) > 1 else math.nan
    return float(series.mean()), std, len(series)


def _compared_params(run: pd.Series) -> dict[str, str]:
    params = json.loads(identity_key(run))
    return {k: v for k, v in params.items() if k not in NOT_COMPARED}


def _families(runs: pd.DataFrame, vary: Sequence[str]) -> list[tuple[dict[str, str],
                                                                     pd.DataFrame]]:
    """Runs grouped by every compared param except ``vary`` (first-seen order)."""
    if runs.empty:
        return []
    keys = [json.dumps({k: v for k, v in _compared_params(r).items() if k not in vary},
                       sort_keys=True) for _, r in runs.iterrows()]
    grouper = pd.Series(keys, index=runs.index)  # a Series: one scalar key per group
    return [(json.loads(key), group) for key, group in runs.groupby(grouper, sort=False)]


def _rho_text(rho: object) -> str:
    return f"ρ {float(rho) * 100:g}%" if rho is not None and pd.notna(rho) else ""


def _base_label(run: pd.Series, rho: bool = True) -> str:
    where = run["placement"]
    text = where.backbone + (" (synthetic data)" if where.synthetic else "") + f" {where.method}"
    return text + (f" {_rho_text(where.rho)}" if rho and where.rho is not None else "")


def _labels(bases: Sequence[str], params: Sequence[dict[str, str]]) -> list[str]:
    """``bases``, with the params that differ between families of one base appended
    (``model.`` left out of their names)."""
    labels = list(bases)
    for base in set(bases):
        members = [i for i, b in enumerate(bases) if b == base]
        keys = sorted({k for i in members for k in params[i]
                       if len({params[j].get(k) for j in members}) > 1})
        for i in members if keys else ():
            labels[i] += " [" + ", ".join(f"{k.removeprefix('model.')}={params[i].get(k, '-')}"
                                          for k in keys) + "]"
    return labels


def _selects_tokens(placed: pd.DataFrame) -> pd.DataFrame:
    return placed[[p.rho is not None for p in placed["placement"]]]


# ------------------------------------------------------------------------- drawing helpers
def _new_figure(title: str, width: float = 7.5, height: float = 4.8) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _note(ax: Axes, text: str) -> None:
    ax.text(0.0, -0.13, text, transform=ax.transAxes, fontsize=7, color="0.35", va="top")


def _style(i: int) -> dict[str, str]:
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)]}


def _plot_series(ax: Axes, xs: Sequence[float], stats: Sequence[tuple[float, float, int]],
                 label: str, **style: object) -> None:
    """A line with markers; error bars (sample std) where n > 1."""
    means = [s[0] for s in stats]
    errs = [s[1] if s[2] > 1 else math.nan for s in stats]
    has_errs = any(pd.notna(e) for e in errs)
    ax.errorbar(xs, means, yerr=errs if has_errs else None, capsize=3, label=label,
                linewidth=1.5, markersize=6, **style)


def encode(fig: Figure, kind: str) -> bytes:
    """``fig`` as PNG or PDF bytes (no creation date in the PDF: equal input, equal bytes)."""
    buffer = io.BytesIO()
    metadata = {"CreationDate": None} if kind == "pdf" else {"Software": None}
    fig.savefig(buffer, format=kind, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


# ------------------------------------------------------------------------- 1: AP vs GFLOPs
def _row_labels(rows: pd.DataFrame, placed: pd.DataFrame) -> list[str]:
    """``<section>: <method> [+ Top-k & BBR] [ρ]`` per Table 1 row, with the params that
    tell rows of one label apart (short names, :data:`NOT_COMPARED` left out)."""
    by_id = placed.set_index("run_id")
    bases, params = [], []
    for _, row in rows.iterrows():
        label = f"{row['section']}: {row['method']}"
        if row["topk_bbr"] and str(row["method"]).startswith("Deformable DETR"):
            label += " + Top-k & BBR"
        bases.append(label + (f" {_rho_text(row['rho'])}" if pd.notna(row["rho"]) else ""))
        first = by_id.loc[str(row["run_ids"]).split(",")[0]]
        params.append(_compared_params(first))
    return _labels(bases, params)


def _pareto(points: pd.DataFrame) -> pd.DataFrame:
    """The points no other point beats: more AP for at most their GFLOPs."""
    best, front = -math.inf, []
    for index, row in points.sort_values(["gflops", "AP"], ascending=[True, False]).iterrows():
        if row["AP"] > best:
            best = row["AP"]
            front.append(index)
    return points.loc[front]


def ap_vs_gflops(inputs: FigureInputs) -> Drawn:
    rows = inputs.table[inputs.table["AP"].notna() & inputs.table["gflops"].notna()]
    if len(rows) < 2:
        return f"needs >= 2 Table 1 rows with AP and GFLOPs (found {len(rows)})"
    fig = Figure(figsize=(11.5, 5.8), layout="constrained")
    ax, key = fig.subplots(1, 2, width_ratios=(2.4, 1))
    ax.set_title("AP vs GFLOPs per detector (one point per Table 1 row)")
    ax.grid(True, alpha=0.3)
    labels = dict(zip(rows.index, _row_labels(rows, inputs.placed)))
    entries = []
    for i, (section, group) in enumerate(rows.groupby("section", sort=False)):
        style = _style(i)
        ax.errorbar(group["gflops"], group["AP"], yerr=group["AP_std"], linestyle="none",
                    capsize=3, markersize=7, label=section, **style)
        for index, row in group.iterrows():
            number = len(entries) + 1
            ax.annotate(str(number), (row["gflops"], row["AP"]), xytext=(5, 3),
                        textcoords="offset points", fontsize=8, color=style["color"],
                        fontweight="bold")
            entries.append(textwrap.fill(f"{number}. {labels[index]} (n={row['n']})", 52,
                                         subsequent_indent="     "))
    key.axis("off")
    key.text(0.0, 1.0, "\n".join(entries), transform=key.transAxes, va="top", fontsize=7.5,
             linespacing=1.35)
    real = rows[~rows["synthetic"].astype(bool)]
    pool, which = (real, "COCO rows") if len(real) >= 1 else (rows, "synthetic-data rows")
    front = _pareto(pool)
    xs = list(front["gflops"]) + [float(pool["gflops"].max())]
    ys = list(front["AP"]) + [float(front["AP"].iloc[-1])]
    ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1,
            label=f"Pareto front ({which}):\nmax AP for min GFLOPs", zorder=1)
    ax.set_xlabel("Compute (GFLOPs per image)")
    ax.set_ylabel("COCO box AP (%)")
    ax.margins(x=0.12, y=0.12)
    key.legend(*ax.get_legend_handles_labels(), fontsize=8, loc="lower left")
    _note(ax, ERROR_NOTE)
    return fig


# ------------------------------------------------------------------------- 2: AP vs rho
def _by_x(group: pd.DataFrame, x_of: Callable[[pd.Series], float],
          column: str = AP_COLUMN) -> tuple[list[float], list[tuple[float, float, int]]]:
    xs = sorted({x_of(r) for _, r in group.iterrows()})
    stats = [_mean_std(_ap_percent(group[[x_of(r) == x for _, r in group.iterrows()]][column]))
             for x in xs]
    return xs, stats


def ap_vs_rho(inputs: FigureInputs) -> Drawn:
    runs = _selects_tokens(inputs.placed)
    families = [(p, g) for p, g in _families(runs, ["model.rho"])
                if len({r["placement"].rho for _, r in g.iterrows()}) >= 2]
    if not families:
        return (f"needs one configuration trained at >= 2 keeping ratios ρ "
                f"({len(runs)} token-selecting run(s) in Table 1)")
    fig, ax = _new_figure("AP vs keeping ratio ρ (token-selecting encoders)")
    labels = _labels([_base_label(g.iloc[0], rho=False) for _, g in families],
                     [p for p, _ in families])
    for i, ((_, group), label) in enumerate(zip(families, labels)):
        xs, stats = _by_x(group, lambda r: r["placement"].rho * 100)
        _plot_series(ax, xs, stats, label, **_style(i))
    ax.set_xlabel("Keeping ratio ρ (% of encoder tokens updated)")
    ax.set_ylabel("COCO box AP (%)")
    ax.legend(fontsize=8)
    _note(ax, ERROR_NOTE)
    return fig


# ------------------------------------------------------------------------- 3: dynamic rho
def _rho_columns(placed: pd.DataFrame) -> dict[str, float]:
    return {c: float(m["rho"]) for c in placed.columns if (m := RHO_AP.match(c))}


def dynamic_rho(inputs: FigureInputs) -> Drawn:
    columns = _rho_columns(inputs.placed)
    runs = inputs.placed
    counts = [sum(pd.notna(r[c]) and r[c] >= 0 for c in columns) for _, r in runs.iterrows()]
    runs = runs[[n >= 2 for n in counts]]
    if runs.empty:
        return (f"needs a run evaluated at >= 2 other keeping ratios (eval_rho<r>/AP metrics "
                f"from eval.rho_sweep; most found in one run: {max(counts, default=0)})")
    fig, ax = _new_figure("Dynamic ρ: AP at inference-time keeping ratios")
    families = _families(runs, [])
    labels = _labels([f"{_base_label(g.iloc[0], rho=False)}, trained at "
                      f"{_rho_text(g.iloc[0]['placement'].rho)}" for _, g in families],
                     [p for p, _ in families])
    for i, ((_, group), label) in enumerate(zip(families, labels)):
        train_rho = group.iloc[0]["placement"].rho
        points = {rho * 100: _mean_std([v for c, r in columns.items() if r == rho
                                        for v in _ap_percent(group[c])])
                  for rho in sorted(set(columns.values()))}
        trained = _mean_std(_ap_percent(group[AP_COLUMN]))
        points.setdefault(train_rho * 100, trained)
        xs = sorted(x for x, s in points.items() if s[2])
        style = _style(i)
        _plot_series(ax, xs, [points[x] for x in xs], label, **style)
        ax.plot([train_rho * 100], [trained[0]], marker="*", markersize=16, color=style["color"],
                markeredgecolor="black", linestyle="none", zorder=3)
    handles, names = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="*", markersize=12, color="white",
                          markeredgecolor="black", linestyle="none"))
    names.append("train ρ (the run's own eval/AP)")
    ax.legend(handles, names, fontsize=8)
    ax.set_xlabel("Inference keeping ratio ρ (% of encoder tokens updated)")
    ax.set_ylabel("COCO box AP (%)")
    _note(ax, ERROR_NOTE)
    return fig


# ------------------------------------------------------------------------- 4: Corr
def corr_over_training(inputs: FigureInputs) -> Drawn:
    history = inputs.corr_history
    runs = inputs.placed[inputs.placed["run_id"].isin(set(history["run_id"]))]
    if runs.empty:
        return f"no run logs a Corr metric ({CORR_METRIC})"
    steps = history.groupby("run_id")["step"].nunique()
    runs = runs[[steps.get(r, 0) >= 2 for r in runs["run_id"]]]
    if runs.empty:
        return f"needs a run that logs {CORR_METRIC} at >= 2 evaluations (found at most 1)"
    fig, ax = _new_figure("Corr over training: DAM vs objectness token selection")
    families = _families(runs, [])
    selections = [str(param(g.iloc[0], "model.token_selection")) for _, g in families]
    kinds = sorted(set(selections))
    sections = sorted({_base_label(g.iloc[0]) for _, g in families})
    labels = _labels([f"{_base_label(g.iloc[0])}, {s} selection"
                      for (_, g), s in zip(families, selections)], [p for p, _ in families])
    for (_, group), selection, label in zip(families, selections, labels):
        own = history[history["run_id"].isin(set(group["run_id"]))]
        xs = sorted(own["step"].unique())
        stats = [_mean_std([v * 100 for v in own[own["step"] == x]["value"]]) for x in xs]
        i = kinds.index(selection)
        _plot_series(ax, xs, stats, label, color=COLOURS[i % len(COLOURS)],
                     marker=MARKERS[i % len(MARKERS)],
                     linestyle=LINESTYLES[sections.index(_base_label(group.iloc[0]))
                                          % len(LINESTYLES)])
    ax.set_xlabel("Epoch (complete epochs at evaluation)")
    ax.set_ylabel("Corr (% of decoder attention on selected tokens)")
    ax.legend(fontsize=8)
    _note(ax, ERROR_NOTE)
    return fig


# ------------------------------------------------------------------------- 5: encoder depth
DEPTH_KEYS = ("model.enc_layers", "model.enc_aux_loss")


def ap_vs_encoder_depth(inputs: FigureInputs) -> Drawn:
    runs = inputs.placed[[param(r, "model.encoder") == "sparse"
                          for _, r in inputs.placed.iterrows()]]
    depth = {i: (int(param(r, DEPTH_KEYS[0])), bool(param(r, DEPTH_KEYS[1])))
             for i, r in runs.iterrows()}
    families = [(p, g) for p, g in _families(runs, DEPTH_KEYS)
                if len({depth[i][0] for i in g.index}) >= 2
                or len({depth[i][1] for i in g.index}) == 2]
    if not families:
        return ("needs one Sparse DETR configuration at >= 2 encoder depths or with and "
                f"without the encoder auxiliary loss ({len(runs)} Sparse DETR run(s))")
    fig, ax = _new_figure("AP vs encoder depth, with / without the encoder auxiliary loss")
    bases = _labels([_base_label(g.iloc[0]) for _, g in families], [p for p, _ in families])
    count = 0
    for (_, group), base in zip(families, bases):
        settings = sorted({depth[i][1] for i in group.index})
        for aux in settings:
            part = group[[depth[i][1] == aux for i in group.index]]
            shift = (0.06 if aux else -0.06) if len(settings) == 2 else 0.0
            xs, stats = _by_x(part, lambda r: float(param(r, DEPTH_KEYS[0])))
            style = _style(count)
            style["linestyle"] = "-" if aux else "--"
            _plot_series(ax, [x + shift for x in xs], stats,
                         f"{base}, enc. aux loss {'on' if aux else 'off'}", **style)
            count += 1
    ax.set_xlabel("Encoder layers (count)")
    ax.set_ylabel("COCO box AP (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    _note(ax, ERROR_NOTE)
    return fig


# ------------------------------------------------------------------------- 6: Lite
LITE_BARS = (("AP", "AP"), ("APs", "AP$_S$"), ("APm", "AP$_M$"), ("APl", "AP$_L$"))


def lite_configurations(inputs: FigureInputs) -> Drawn:
    table = inputs.table
    rows = table[table["method"].str.contains("Lite-DETR") & table["AP"].notna()]
    if len(rows) < 2:
        return ("needs >= 2 Lite-DETR rows (interleaved / sparse_interleaved encoder) with AP "
                f"in Table 1 (found {len(rows)})")
    fig, ax = _new_figure("Lite configurations: AP and GFLOPs", max(7.5, 1.6 * len(rows)), 5.0)
    width = 0.8 / len(LITE_BARS)
    xs = list(range(len(rows)))
    for j, (key, name) in enumerate(LITE_BARS):
        offsets = [x + (j - (len(LITE_BARS) - 1) / 2) * width for x in xs]
        errors = rows[f"{key}_std"]
        ax.bar(offsets, rows[key].fillna(0.0), width, label=name, color=COLOURS[j],
               yerr=errors if errors.notna().any() else None, capsize=2)
    ax.set_ylabel("COCO box AP (%)")
    names = [textwrap.fill(label, 22, break_on_hyphens=False)
             for label in _row_labels(rows, inputs.placed)]
    ax.set_xticks(xs, names, fontsize=7)
    ax.grid(False, axis="x")
    compute = ax.twinx()
    compute.plot(xs, rows["gflops"], linestyle="none", marker="D", color="black", markersize=7,
                 label="GFLOPs (right axis)")
    for x, value in zip(xs, rows["gflops"]):
        if pd.notna(value):
            compute.annotate(f"{value:.1f}", (x, value), xytext=(0, 7),
                             textcoords="offset points", ha="center", fontsize=7)
    compute.set_ylabel("Compute (GFLOPs per image)")
    if pd.notna(rows["gflops"].max()):
        compute.set_ylim(0, rows["gflops"].max() * 1.25)
    ax.set_ylim(0, max(float(rows[[k for k, _ in LITE_BARS]].max().max()), 1.0) * 1.3)
    handles = ax.get_legend_handles_labels()
    extra = compute.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, ncol=5,
              loc="upper center")
    _note(ax, "bars: AP by object size; " + ERROR_NOTE)
    return fig


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("ap_vs_gflops", "AP vs GFLOPs", ap_vs_gflops),
    FigureSpec("ap_vs_rho", "AP vs rho", ap_vs_rho),
    FigureSpec("dynamic_rho", "Dynamic rho", dynamic_rho),
    FigureSpec("corr_over_training", "Corr over training", corr_over_training),
    FigureSpec("ap_vs_encoder_depth", "AP vs encoder depth", ap_vs_encoder_depth),
    FigureSpec("lite_configurations", "Lite configurations", lite_configurations),
)


def render_figures(inputs: FigureInputs,
                   figures: Sequence[FigureSpec] = FIGURES) -> FigureSet:
    """Draw each figure into PNG and PDF bytes, or one line why it was skipped. An error while
    drawing propagates (the report is not written)."""
    rendered, skipped = [], []
    for spec in figures:
        drawn = spec.draw(inputs)
        if isinstance(drawn, str):
            line = f"{spec.title}: {drawn}"
            logger.info("%s", line)
            skipped.append(line)
            continue
        files = {f"{FIGURE_DIR}/{spec.name}.{kind}": encode(drawn, kind) for kind in FILE_TYPES}
        rendered.append(RenderedFigure(spec.name, spec.title, files))
    return FigureSet(tuple(rendered), tuple(skipped))
