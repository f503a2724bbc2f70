"""``sdetr bench kernels [--json] [--iters N] [--warmup W] [--threads T] [--problem P]``: time the
attention ops of every registered backend against the reference (see :mod:`sdetr.bench.kernels`)."""

from __future__ import annotations

import argparse

from sdetr.cli.bench_train_cmd import add_train_parser
from sdetr.cli.common import print_json

PROBLEMS = {"encoder": ("encoder",), "decoder": ("decoder",), "all": ("encoder", "decoder")}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (kernels, models, training steps)")
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    k = targets.add_parser("kernels", help="forward / forward+backward of each ops backend vs the reference")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.add_argument("--iters", type=_positive, default=5, metavar="N", help="timed runs, median reported (5)")
    k.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed runs first (1)")
    k.add_argument("--threads", type=_positive, metavar="T", help="torch intra-op threads (default: torch's)")
    k.add_argument("--problem", choices=sorted(PROBLEMS), default="all",
                   help="encoder-sized (Q = N = 18,549), decoder-sized (Q = 300) or all (default)")
    k.add_argument("--no-dam", action="store_true", help="skip the DAM splat rows")
    k.add_argument("--no-kda", action="store_true", help="skip the key-aware attention (Lite-DETR) rows")
    k.add_argument("--no-stem-pool", action="store_true", help="skip the ResNet stem max pool rows")
    k.set_defaults(func=run)
    add_models_parser(targets)
    add_train_parser(targets)


def add_models_parser(targets: argparse._SubParsersAction) -> None:
    """``sdetr bench models A B [--json] [--no-fold-bn]``: end-to-end eval latency of models measured
    round-robin in one run, next to their GFLOPs ratio and their floor (GFLOPs / the fp32 GEMM rate
    measured in the same run); the last model is the baseline (see :mod:`sdetr.profiling.compare`)."""
    m = targets.add_parser("models", help="eval latency of models in one run vs their GFLOPs ratio")
    m.add_argument("models", nargs="+", metavar="PRESET", help="presets or YAML files; the last is the baseline")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.add_argument("--iters", type=_positive, default=5, metavar="N", help="timed rounds, median reported (5)")
    m.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed forwards per model first (1)")
    m.add_argument("--threads", type=_positive, metavar="T", help="torch intra-op threads (default: torch's)")
    m.add_argument("--image-size", default="850,1040", metavar="H,W", help="random input image (850,1040)")
    m.add_argument("--kernel-backend", default="auto", metavar="NAME[,NAME]",
                   help="ops backend(s), each measured in turn, e.g. compiled,reference (auto)")
    m.add_argument("--inference-only", action="store_true",
                   help="training-only modules off (default: as the released code, with Sparse DETR's "
                        "encoder auxiliary heads)")
    m.add_argument("--device", default="cpu", help="cpu | cuda[:N] | auto (cpu)")
    m.add_argument("--no-fold-bn", action="store_true",
                   help="time the models as built (default: BatchNorm folded into the convolutions "
                        "after the GFLOPs count, an inference-only transform; recorded as fold_bn)")
    m.add_argument("--gemm-repeats", type=_positive, default=5, metavar="N",
                   help="timed runs of each fp32 GEMM-rate problem (the floors' denominator), median (5)")
    m.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    import torch

    from sdetr.profiling.compare import compare_presets, format_comparison
    from sdetr.profiling.protocol import resolve_device

    if len(args.models) < 2:
        raise ValueError("sdetr bench models: give at least two models (the last is the baseline)")
    size = tuple(int(v) for v in args.image_size.replace("x", ",").split(","))
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"--image-size: expected H,W, got {args.image_size!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare_presets(args.models, backends=[b.strip() for b in args.kernel_backend.split(",")],
                             image_size=size, iters=args.iters, warmup=args.warmup,
                             device=resolve_device(args.device),
                             modules="inference_only" if args.inference_only else "full",
                             fold_bn=not args.no_fold_bn, gemm_repeats=args.gemm_repeats)
    if args.json:
        print_json(result)
    else:
        print(format_comparison(result))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from sdetr.bench import format_table, run_kernel_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_kernel_bench(iters=args.iters, warmup=args.warmup, problems=PROBLEMS[args.problem],
                              include_dam=not args.no_dam, include_kda=not args.no_kda,
                              include_stem_pool=not args.no_stem_pool)
    if args.json:
        print_json(result)
    else:
        print(format_table(result))
    return 0
