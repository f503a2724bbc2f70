"""``sdetr demo``: the whole pipeline in a few minutes on a laptop CPU.

Generates a small synthetic COCO set, trains the tiny Sparse DETR (Deformable DETR if Sparse
DETR is not available) with 2 DeepSpeed workers on a local Ray cluster, evaluates it with
COCO AP, tracks everything in MLflow (``sqlite:///mlflow.db``) and prints the metrics.
``--quick`` is a ~1 minute smoke version (CI). Every setting can be changed with ``--set``.
The Ray cluster it starts is shut down on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from sdetr.cli.common import add_set_arg, overrides_of
from sdetr.cli.train_cmd import format_metrics

PREFERRED = ("sparse_detr_tiny", "deformable_detr_tiny")
# A few minutes on 2 CPU cores: 240 train / 40 val images, short side 192, 2 epochs.
DEMO = ["name=demo", "data.root=data/demo", "data.synth_train=240", "data.synth_val=40",
        "data.train_scales=[192]", "data.train_max_size=320", "data.eval_size=192",
        "data.eval_max_size=320", "train.epochs=2", "train.lr_drop=2", "train.workers=2",
        "train.micro_batch_size=2"]
# About a minute: 16 / 8 images at ~128 px, one epoch.
QUICK = ["name=demo_quick", "data.root=data/demo_quick", "data.synth_train=16",
         "data.synth_val=8", "data.train_scales=[128]", "data.train_max_size=192",
         "data.crop_scales=[]", "data.eval_size=128", "data.eval_max_size=192",
         "data.num_workers=0", "train.epochs=1", "train.workers=2", "train.micro_batch_size=2"]
MLFLOW_UI = ".venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data -> 2-worker DeepSpeed training on Ray -> "
                                    "COCO AP -> MLflow, in a few minutes")
    p.add_argument("--quick", action="store_true", help="~1 minute smoke version (CI)")
    add_set_arg(p, "override a config key, e.g. --set train.epochs=3")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="Ray Train workers (default 2)")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlflow.db)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def demo_preset() -> str:
    """The first of :data:`PREFERRED` that ``sdetr models`` lists."""
    from sdetr.config import ConfigError, preset_names
    names = set(preset_names())
    for name in PREFERRED:
        if name in names:
            return name
    raise ConfigError(f"none of the demo presets {', '.join(PREFERRED)} is available")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    sys.exit(128 + signum)  # unwinds through `finally`, which shuts Ray down


def run(args: argparse.Namespace) -> int:
    from sdetr.config import load_config
    from sdetr.engine.launch import run_training
    from sdetr.engine.steps import TrainingError

    preset = demo_preset()
    user = overrides_of(args)
    cfg = load_config(preset, [*(QUICK if args.quick else DEMO),
                               f"train.workers={args.workers}", *user])
    print(f"sdetr demo: {preset} on {cfg.data.synth_train} synthetic images, "
          f"{cfg.train.epochs} epoch(s), {args.workers} DeepSpeed workers on a local Ray "
          f"cluster", flush=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        result = run_training(cfg, workers=args.workers, resume="never",
                              tracking_uri=args.tracking_uri, use_ray=True,
                              progress=not args.no_progress)
    except TrainingError as exc:
        print(f"sdetr: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\nCOCO box metrics of {preset} after {result.epochs} epoch(s) "
          f"({result.seconds:.0f} s):")
    print(format_metrics(result.metrics))
    print(f"(a from-scratch model after {result.epochs} epoch(s) on a CPU scores near 0 AP; "
          f"`sdetr train {preset}` trains it for real)")
    print(f"\nrun directory: {result.run_dir}")
    print(f"MLflow run {result.mlflow_run_id}; open the UI with:\n  {MLFLOW_UI}")
    return 0
