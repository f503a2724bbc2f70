"""Reports of tracked results: MLflow runs -> the papers' tables, beside the published numbers.

Reports read MLflow only (``sdetr.reports.runs``); they never rebuild a model. The first report
is the Sparse DETR paper's Table 1 (``sdetr report``, :func:`build_report`): Markdown, LaTeX and
CSV files, the ablation figures (``sdetr.reports.figures``) and an ``index.md``. The published numbers ship as ``data/paper_table1.csv``.
"""

from sdetr.reports.build import DEFAULT_FORMATS, FORMATS, ReportResult, build_report, parse_formats
from sdetr.reports.published import load_published
from sdetr.reports.runs import ReportError, load_runs

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ReportError", "ReportResult", "build_report", "load_published",
           "load_runs", "parse_formats"]
