"""``sdetr report``: the tracked runs of one MLflow experiment as the paper's Table 1.

    sdetr report --experiment table1                       # -> reports/table1/
    sdetr report --experiment table1 --tracking-uri http://mlflow:5000 --out site/table1
    sdetr report --experiment smoke --format md            # Markdown only (+ index.md)

Writes ``table1.md`` / ``table1.tex`` / ``table1.csv`` and ``index.md`` into ``--out``
(default ``reports/<experiment>``), atomically; see :mod:`sdetr.reports.build`. Exit status: 0
written, 2 bad input (unknown experiment, store not answering, no finished runs; nothing
written).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="MLflow runs of an experiment -> Table 1 (Markdown, "
                                      "LaTeX, CSV) beside the published numbers")
    p.add_argument("--experiment", required=True, metavar="NAME",
                   help="MLflow experiment (a sweep's tracking.experiment)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                        "in the working directory)")
    p.add_argument("--out", metavar="DIR", type=Path,
                   help="output folder (default reports/<experiment>)")
    p.add_argument("--format", default="md,tex,csv,figures", metavar="LIST",
                   help="comma-separated subset of md,tex,csv,figures (default: all; figures = "
                        "the ablation figures as PNG and PDF); index.md always")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdetr.reports import build_report, parse_formats
    from sdetr.tracking import resolve_tracking_uri

    formats = parse_formats(args.format)
    result = build_report(args.experiment, resolve_tracking_uri(args.tracking_uri),
                          out=args.out, formats=formats)
    print(f"report of experiment {args.experiment!r}: {result.rows} table row(s), "
          f"{len(result.not_placed)} run(s) not placed; written to {result.out}/")
    for path in result.files:
        print(f"  {path}")
    return 0
