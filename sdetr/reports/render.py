"""Table 1 as Markdown (renders on GitHub), LaTeX (booktabs) and CSV (every number, raw).

Input: the table of :func:`sdetr.reports.table1.build_table` with the published columns of
:func:`sdetr.reports.published.attach_published`, and its footnotes. Markdown and LaTeX show
one section per backbone (and dataset); each row of ours is followed, where a published row
matches, by a ``paper`` row and a ``Δ`` row (ours − paper). Numbers: one decimal, mean ± sample
std for n > 1, "–" where missing. LaTeX puts the best value of each metric column of a section
in bold (max for AP and FPS, min for Params and GFLOPs; only where two or more rows have it).
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import pandas as pd

from sdetr.reports.footnotes import SYNTHETIC_MARK, Footnote
from sdetr.reports.table1 import METRICS, ROW_COLUMNS, Metric

MISSING = "–"
CHECK = "✓"
DECIMALS = 1
LABEL_COLUMNS = ("Method", "Epochs", "ρ", "Top-k & BBR", "n", "Source")
LATEX_LABELS = ("Method", "Epochs", r"$\rho$", r"Top-k \& BBR", "$n$", "")
EXTRA_COLUMNS = ("gflops_published_protocol", "params_inference_M", "paper_match",
                 "paper_source", "no_comparison")
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}", "×": r"$\times$", "✓": r"\checkmark{}",
                 "–": "--", "−": "$-$", "±": r"$\pm$", "Δ": r"$\Delta$", "ρ": r"$\rho$",
                 "†": r"$^\dagger$", "<": r"\textless{}", ">": r"\textgreater{}"}


def _isnan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_number(value: Any) -> str:
    """One decimal, or "–" for a missing value."""
    return MISSING if _isnan(value) else f"{float(value):.{DECIMALS}f}"


def fmt_delta(value: Any) -> str:
    """A signed difference with one decimal (``+0.3``, ``-1.1``), or "–"."""
    return MISSING if _isnan(value) else f"{float(value):+.{DECIMALS}f}"


def fmt_rho(rho: Any) -> str:
    """A keeping ratio as the paper prints it (0.1 -> ``10%``); "" for none."""
    return "" if _isnan(rho) else f"{float(rho) * 100:g}%"


def latex_escape(text: str) -> str:
    """``text`` safe in LaTeX text mode (specials escaped, ×, ✓, ±, ρ, Δ, † as commands)."""
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def method_label(row: pd.Series) -> str:
    """The Method cell: the method, plus the params that tell same-label rows apart."""
    return row["method"] + (f" [{row['variant']}]" if row["variant"] else "")


def section_title(row: pd.Series) -> str:
    """The section heading: backbone (and dataset), the synthetic-data mark where it applies."""
    return row["section"] + (f" {SYNTHETIC_MARK}" if row["synthetic"] else "")


def sections(table: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(title, rows) per section, in table order."""
    for name in dict.fromkeys(table["section"]):
        rows = table[table["section"] == name]
        yield section_title(rows.iloc[0]), rows


def _label_cells(row: pd.Series) -> list[str]:
    return [method_label(row), str(row["epochs"]), fmt_rho(row["rho"]),
            CHECK if row["topk_bbr"] else "", str(row["n"]), "ours"]


def _ours_cell(row: pd.Series, metric: Metric) -> str:
    mean, std = row[metric.key], row[f"{metric.key}_std"]
    if _isnan(mean):
        return MISSING
    return fmt_number(mean) + ("" if _isnan(std) else f" ± {fmt_number(std)}")


def _sub_rows(row: pd.Series) -> list[tuple[str, list[str]]]:
    """The ``paper`` and ``Δ`` rows under a matched row of ours: (source, metric cells)."""
    if not row["paper_match"]:
        return []
    return [("paper", [fmt_number(row[f"{m.key}_paper"]) for m in METRICS]),
            ("Δ", [fmt_delta(row[f"{m.key}_delta"]) for m in METRICS])]


def _md_escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def markdown_section(rows: pd.DataFrame) -> str:
    """The Markdown table of one section (rows of ours, each followed by paper / Δ rows)."""
    records = []
    for _, row in rows.iterrows():
        records.append(_label_cells(row) + [_ours_cell(row, m) for m in METRICS])
        records += [["", "", "", "", "", source] + cells for source, cells in _sub_rows(row)]
    frame = pd.DataFrame([[_md_escape(c) for c in r] for r in records],
                         columns=list(LABEL_COLUMNS) + [m.label for m in METRICS])
    return frame.to_markdown(index=False, disable_numparse=True)


def _md_notes(notes: Sequence[Footnote]) -> list[str]:
    return [f"- {note.mark + ' ' if note.mark else ''}{note.text}" for note in notes]


def render_markdown(table: pd.DataFrame, notes: Sequence[Footnote], experiment: str) -> str:
    """Table 1 as GitHub Markdown: a heading and a table per section, then the notes."""
    parts = [f"# Table 1: experiment `{experiment}`", ""]
    for title, rows in sections(table):
        parts += [f"## {title}", "", markdown_section(rows), ""]
    parts += ["## Notes", "", *_md_notes(notes), ""]
    return "\n".join(parts)


def best_values(rows: pd.DataFrame) -> dict[str, float]:
    """Per metric key, the best shown (rounded) mean of a section with two or more values."""
    best = {}
    for metric in METRICS:
        shown = [round(float(v), DECIMALS) for v in rows[metric.key] if not _isnan(v)]
        if len(shown) >= 2:
            best[metric.key] = max(shown) if metric.higher_is_better else min(shown)
    return best


def _latex_ours(row: pd.Series, metric: Metric, best: dict[str, float]) -> str:
    mean, std = row[metric.key], row[f"{metric.key}_std"]
    if _isnan(mean):
        return "--"
    text = fmt_number(mean)
    if metric.key in best and round(float(mean), DECIMALS) == best[metric.key]:
        text = rf"\textbf{{{text}}}"
    return text + ("" if _isnan(std) else rf" $\pm$ {fmt_number(std)}")


def _latex_delta(cell: str) -> str:
    return "--" if cell == MISSING else f"${cell}$"


def latex_section(title: str, rows: pd.DataFrame, width: int) -> list[str]:
    """The LaTeX lines of one section: a heading row across ``width`` columns, then rows."""
    lines = [r"\midrule", rf"\multicolumn{{{width}}}{{l}}{{\textit{{{latex_escape(title)}}}}} \\",
             r"\midrule"]
    best = best_values(rows)
    for _, row in rows.iterrows():
        labels = [latex_escape(c) for c in _label_cells(row)]
        cells = [_latex_ours(row, m, best) for m in METRICS]
        lines.append(" & ".join(labels + cells) + r" \\")
        for source, sub in _sub_rows(row):
            shown = [_latex_delta(c) if source == "Δ" else c.replace(MISSING, "--") for c in sub]
            lines.append(" & ".join([""] * 5 + [rf"\textit{{{latex_escape(source)}}}"] + shown)
                         + r" \\")
    return lines


def render_latex(table: pd.DataFrame, notes: Sequence[Footnote], experiment: str) -> str:
    """Table 1 as a LaTeX ``table*`` (spans both columns of a paper; the tabular is scaled to
    the text width); needs ``\\usepackage{booktabs,amssymb,graphicx}``."""
    width = len(LABEL_COLUMNS) + len(METRICS)
    header = " & ".join(list(LATEX_LABELS) + [m.latex for m in METRICS]) + r" \\"
    lines = [r"% Generated by `sdetr report`; needs \usepackage{booktabs}, \usepackage{amssymb}"
             r" and \usepackage{graphicx}",
             r"\begin{table*}[t]", r"\centering", r"\scriptsize",
             rf"\caption{{Table 1 reproduced: experiment \texttt{{{latex_escape(experiment)}}}, "
             r"beside the published numbers.}", r"\label{tab:table1}",
             r"\resizebox{\textwidth}{!}{%",
             r"\begin{tabular}{lrrcrl" + "r" * len(METRICS) + "}", r"\toprule", header]
    for title, rows in sections(table):
        lines += latex_section(title, rows, width)
    lines += [r"\bottomrule", r"\end{tabular}}", r"\begin{flushleft}\footnotesize"]
    lines += [latex_escape(f"{n.mark} {n.text}" if n.mark else n.text) + r"\par" for n in notes]
    lines += [r"\end{flushleft}", r"\end{table*}", ""]
    return "\n".join(lines)


def csv_columns() -> list[str]:
    """CSV column order: the row labels, per metric ours / std / paper / Δ, the extras."""
    metric_cols = [f"{m.key}{suffix}" for m in METRICS
                   for suffix in ("", "_std", "_paper", "_delta")]
    return list(ROW_COLUMNS) + metric_cols + list(EXTRA_COLUMNS)


def render_csv(table: pd.DataFrame) -> str:
    """One row per run group, raw numbers (AP in percent, params in M), ours and published."""
    return table.reindex(columns=csv_columns()).to_csv(index=False)
