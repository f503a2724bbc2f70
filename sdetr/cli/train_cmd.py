"""``sdetr train``: train (or resume) one run with DeepSpeed, on Ray Train workers or in-process.

``sdetr train sparse_detr_tiny --workers 2``
``sdetr train my.yaml --set train.epochs=1 --no-ray``   (one process, for debugging)

Run directory: ``<train.output_dir>/<name>`` (or ``--run-dir``). Running the same command
again resumes from the newest complete checkpoint, or says the run is finished. Ctrl-C or
SIGTERM stop it (exit 130 / 143; in-process, its MLflow run is ended KILLED).
"""

from __future__ import annotations

import argparse
import sys

from sdetr.cli.common import (add_config_args, interrupted_exit_code, load_from_args,
                              sigterm_interrupts)

EXIT_TRAINING_FAILED = 1
TABLE_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model (DeepSpeed; Ray Train workers)")
    add_config_args(p)
    p.add_argument("--workers", type=int, metavar="N",
                   help="Ray Train workers (default train.workers); the total batch "
                        "train.batch_size is kept by gradient accumulation")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto (default): continue from the newest complete checkpoint of the "
                        "run directory; never: start over; or a checkpoint folder")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process (one worker), e.g. for debugging")
    p.add_argument("--run-dir", metavar="DIR",
                   help="run directory (default <train.output_dir>/<name>)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="sdetr", help="MLflow experiment (default sdetr)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="with Ray: restart a failed worker group up to N times (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def format_metrics(metrics: dict[str, float]) -> str:
    """Two-line table of the final COCO metrics."""
    keys = [k for k in TABLE_KEYS if k in metrics]
    return (" ".join(f"{k:>7}" for k in keys) + "\n"
            + " ".join(f"{metrics[k]:>7.4f}" for k in keys))


def run(args: argparse.Namespace) -> int:
    from sdetr.engine.launch import run_training
    from sdetr.engine.steps import TrainingError

    if args.workers is not None or args.no_ray:
        args.overrides.append([f"train.workers={1 if args.no_ray else args.workers}"])
    cfg = load_from_args(args)
    with sigterm_interrupts() as received:
        try:
            result = run_training(cfg, workers=args.workers, resume=args.resume,
                                  tracking_uri=args.tracking_uri, use_ray=not args.no_ray,
                                  run_dir=args.run_dir, experiment=args.experiment,
                                  track=not args.no_track, max_failures=args.max_failures,
                                  progress=not args.no_progress)
        except TrainingError as exc:
            print(f"sdetr: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return EXIT_TRAINING_FAILED
        except KeyboardInterrupt:
            print(f"\nsdetr: training of {cfg.name} interrupted; its checkpoints stay in its run "
                  f"directory. Run the same command again to resume it.", file=sys.stderr)
            return interrupted_exit_code(received)
    if result.status == "already_finished":
        print(f"run {cfg.name} already finished ({result.epochs} epochs) in {result.run_dir}; "
              "nothing to do (--resume never starts over)")
    else:
        print(f"run {cfg.name} finished: {result.epochs} epochs in {result.seconds:.0f} s, "
              f"run directory {result.run_dir}")
    print(format_metrics(result.metrics))
    print(f"weights: {result.model_path}")
    if result.mlflow_run_id:
        print(f"MLflow run: {result.mlflow_run_id}")
    return 0
