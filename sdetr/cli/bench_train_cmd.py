"""``sdetr bench train PRESET [--steps N] [--warmup W] [--epoch E] [--workers N] [--cpus-per-worker C]
[--no-ray] [--set K=V ...] [--json]``: where a training step's time goes (see
:mod:`sdetr.engine.bench_train`)."""

from __future__ import annotations

import argparse

from sdetr.cli.common import add_config_args, load_from_args, print_json


def add_train_parser(targets: argparse._SubParsersAction) -> None:
    t = targets.add_parser("train", help="a training step's time, broken down by phase")
    add_config_args(t)
    t.add_argument("--steps", type=int, default=30, metavar="N", help="timed steps (30)")
    t.add_argument("--warmup", type=int, default=5, metavar="W",
                   help="steps run first, not counted (5)")
    t.add_argument("--epoch", type=int, default=1, metavar="E",
                   help="time steps of this epoch (1-based: its sample order and, with "
                        "data.early_epochs, its scales; 1)")
    t.add_argument("--workers", type=int, metavar="N", help="Ray Train workers (train.workers)")
    t.add_argument("--cpus-per-worker", type=float, metavar="C",
                   help="Ray CPUs per worker, = its torch threads (Ray Train's default: 1)")
    t.add_argument("--no-ray", action="store_true",
                   help="one process, torch's own thread count (world size 1)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from sdetr.bench.train_steps import format_train_bench
    from sdetr.engine.bench_train import run_train_bench

    if args.workers is not None or args.no_ray:
        args.overrides.append([f"train.workers={1 if args.no_ray else args.workers}"])
    cfg = load_from_args(args)
    result = run_train_bench(cfg, steps=args.steps, warmup=args.warmup, epoch=args.epoch,
                             workers=cfg.train.workers, use_ray=not args.no_ray,
                             cpus_per_worker=args.cpus_per_worker,
                             progress=not args.no_progress)
    if args.json:
        print_json(result)
    else:
        print(format_train_bench(result))
    return 0
