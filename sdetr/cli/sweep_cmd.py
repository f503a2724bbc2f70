"""``sdetr sweep``: a YAML grid of runs, trained on Ray, tracked as MLflow parent/child runs.

    sdetr sweep experiments/smoke.yaml                 # local Ray, stopped at the end
    sdetr sweep experiments/table1.yaml --dry-run      # the expanded grid; nothing starts
    sdetr sweep experiments/table1.yaml --address auto --set data.root=/shared/coco

Running the same command again after an interruption finishes only what is unfinished;
``--force`` trains every run again (new MLflow parent run). At the end the report of the
sweep's experiment is written (``sdetr report``; ``--no-report`` skips it). The file format:
:mod:`sdetr.orchestration.spec`. Exit status: 0 all runs finished, 1 a run failed, 2 bad input
(nothing started), 130 interrupted (Ctrl-C; SIGTERM exits with 143).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from sdetr.cli.common import add_set_arg, interrupted_exit_code, overrides_of, sigterm_interrupts
from sdetr.config import parse_override

EXIT_RUN_FAILED = 1
SUMMARY_METRICS = ("AP", "AP50", "APs")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train a YAML grid of runs on Ray (MLflow parent/child "
                                     "runs, resumable)")
    p.add_argument("file", metavar="FILE", help="sweep file, e.g. experiments/smoke.yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="print the expanded grid (params, GFLOPs where cheap); start nothing")
    p.add_argument("--flops", action="store_true",
                   help="with --dry-run: count GFLOPs of full-size models too (slow)")
    p.add_argument("--address", metavar="ADDR",
                   help="an existing Ray cluster (e.g. auto, 127.0.0.1:6379; default "
                        "$RAY_ADDRESS, else a local Ray started for the sweep)")
    p.add_argument("--force", action="store_true",
                   help="train every run again, finished ones included (new MLflow parent)")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="runs at once (default: limits.max_concurrent, else what fits)")
    add_set_arg(p, "override a config key of every run, e.g. --set data.root=/data/coco")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of bars")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the report (sdetr report) at the end")
    p.add_argument("--report-out", metavar="DIR", type=Path,
                   help="report folder (default reports/<experiment>)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sdetr.config import ConfigError
    from sdetr.orchestration import expand, load_sweep

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    overrides = dict(parse_override(item) for item in overrides_of(args))
    spec = load_sweep(args.file, overrides)
    plans = expand(spec)
    if args.dry_run:
        from sdetr.orchestration.dryrun import dry_run_rows, format_dry_run
        print(format_dry_run(spec, plans, dry_run_rows(spec, plans, flops=args.flops)))
        return 0
    from sdetr.orchestration.runner import run_sweep
    with sigterm_interrupts() as received:
        try:
            result = run_sweep(spec, plans, address=args.address, force=args.force,
                               max_concurrent=args.max_concurrent, progress=not args.no_progress)
        except KeyboardInterrupt:
            print(f"\nsdetr: sweep {spec.name} interrupted; its unfinished runs are marked "
                  f"KILLED in MLflow. Run the same command again to resume them.", file=sys.stderr)
            return interrupted_exit_code(received)
    print(format_summary(spec, result))
    if not args.no_report:
        write_sweep_report(spec.experiment, result, args.report_out)
    return 0 if result.ok else EXIT_RUN_FAILED


def write_sweep_report(experiment: str, result: Any, out: Optional[Path]) -> None:
    """``sdetr report`` of the sweep's experiment, also stored as the parent run's artifacts
    (``report/``). A sweep whose runs all failed has no report: one line says why."""
    from mlflow import MlflowClient

    from sdetr.reports import ReportError, build_report
    try:
        report = build_report(experiment, result.tracking_uri, out=out)
    except ReportError as exc:
        print(f"no report: {' '.join(str(exc).split())}", file=sys.stderr)
        return
    client = MlflowClient(tracking_uri=result.tracking_uri)
    client.log_artifacts(result.parent_run_id, str(report.out), "report")
    print(f"report: {report.out / 'table1.md'} (and .tex, .csv, index.md; also the parent "
          f"run's artifacts report/)")


def format_summary(spec: Any, result: Any) -> str:
    """The end-of-sweep table: one row per run with its state, AP figures and time."""
    import pandas as pd

    rows = []
    for run in result.runs:
        row = {"run": run.name, "state": run.state}
        row.update({k: _fmt(run.metrics.get(k, run.metrics.get(f"eval/{k}")))
                    for k in SUMMARY_METRICS})
        row["minutes"] = f"{run.seconds / 60:.1f}" if run.seconds else ""
        row["error"] = run.error[:80]
        rows.append(row)
    table = pd.DataFrame(rows).to_markdown(index=False)
    overhead = ""
    trained = [r for r in result.runs if r.state in ("done", "failed")]
    if trained:
        per_run = max(result.seconds - result.run_seconds, 0.0) / len(trained)
        overhead = (f"; runs' own training+eval+profile {result.run_seconds:.0f} s, sweep "
                    f"overhead {per_run:.1f} s per trained run")
    return "\n".join([
        "", table, "",
        f"sweep {spec.name}: {len(result.runs)} run(s) in {result.seconds:.0f} s{overhead}",
        f"MLflow parent run {result.parent_run_id} in experiment {spec.experiment!r} at "
        f"{result.tracking_uri}",
        f"compare the runs in the UI: mlflow ui --backend-store-uri {result.tracking_uri}"])


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.3f}"
