"""``sdetr profile``: parameters, GFLOPs, FPS and peak memory of one model.

    sdetr profile sparse_detr_r50 --what params,flops,fps,memory --json
    sdetr profile sparse_detr_r50 --set model.rho=0.2 --what flops --inference-only
    sdetr profile deformable_detr_r50 --what fps --coco-root data/coco --batch-sizes 1,4
    sdetr profile sparse_detr_r50 --what flops --coco-root data/coco --num-images 100
    sdetr profile efficient_detr_r50 --what flops --tracking-uri sqlite:///mlflow.db

Protocols and conventions: :mod:`sdetr.profiling` (every figure carries its protocol). The
latency of several models measured in one run is ``sdetr bench models A B``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from sdetr.cli.common import add_config_args, load_from_args, print_json
from sdetr.config import ConfigError

WHAT_AVAILABLE = ("params", "flops", "fps", "memory")


def _ints(text: str, name: str, count: Optional[int] = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or (count is not None and len(values) != count) or min(values) < 1:
        raise ConfigError(f"{name}: expected {count or 'some'} positive integers, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure a model: params, GFLOPs, FPS, peak memory")
    add_config_args(p)
    p.add_argument("--what", default="params",
                   help=f"comma-separated measurements ({', '.join(WHAT_AVAILABLE)})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--image-size", metavar="H,W",
                   help="random input size of every measurement (default: 850,1040 for FLOPs, "
                        "800,1201 = val2017[0] resized for FPS/memory/--coco-root's first image)")
    p.add_argument("--coco-root", metavar="DIR", help="COCO folder: FPS/memory on val2017[0]")
    p.add_argument("--split", default="val2017", help="COCO split folder (default val2017)")
    p.add_argument("--num-images", type=int, default=0, metavar="N",
                   help="FLOPs averaged over the first N images of --coco-root (official: 100)")
    p.add_argument("--inference-only", action="store_true",
                   help="training-only modules off (default: the full count, with Sparse DETR's "
                        "encoder auxiliary heads run at inference as the released code)")
    p.add_argument("--no-published-check", action="store_true",
                   help="Sparse DETR presets: skip the extra count at the published figures' "
                        "protocol (inference-only, 800x1066)")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="time FPS on the model as built (default: on an eval-time copy with BatchNorm "
                        "folded into the convolutions; recorded as fold_bn)")
    p.add_argument("--batch-sizes", default="1,4", metavar="B,B", help="FPS/memory batch sizes")
    p.add_argument("--iters", type=int, metavar="N", help="timed iterations (300 GPU / 10 CPU)")
    p.add_argument("--warmup", type=int, metavar="W", help="warm-up iterations (5 GPU / 2 CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--kernel-backend", metavar="NAME", help="ops backend: reference | compiled | auto")
    p.add_argument("--tracking-uri", metavar="URI", help="log the results to this MLflow store")
    p.add_argument("--experiment", default="sdetr-profile", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (default: profile-<config name>)")
    p.set_defaults(func=run)


def _options(args: argparse.Namespace, backend: Optional[str]) -> Any:
    from sdetr.profiling import ProfileOptions
    return ProfileOptions(
        image_size=_ints(args.image_size, "--image-size", 2) if args.image_size else None,
        coco_root=args.coco_root, split=args.split, num_images=args.num_images,
        modules="inference_only" if args.inference_only else "full",
        batch_sizes=_ints(args.batch_sizes, "--batch-sizes"), iters=args.iters,
        warmup=args.warmup, device=args.device, kernel_backend=backend,
        match_published=not args.no_published_check, fold_bn=not args.no_fold_bn)


def _parse_what(text: str) -> list[str]:
    what = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in what if w not in WHAT_AVAILABLE]
    if unknown or not what:
        raise ConfigError(f"--what: {', '.join(unknown) or '(empty)'} not available "
                          f"(available: {', '.join(WHAT_AVAILABLE)})")
    return what


def run(args: argparse.Namespace) -> int:
    what = _parse_what(args.what)
    cfg = load_from_args(args)
    from sdetr.profiling import profile_model
    result = profile_model(cfg, what, options=_options(args, args.kernel_backend))
    if args.tracking_uri:
        result["mlflow_run_id"] = _track(args, cfg, result)
    if args.json:
        print_json(result)
    else:
        _print_text(result)
    return 0


def _track(args: argparse.Namespace, cfg: Any, result: dict[str, Any]) -> str:
    from sdetr.config import flatten
    from sdetr.profiling import log_profile
    from sdetr.tracking import make_tracker, run_tags
    tracker = make_tracker(0, args.tracking_uri, args.experiment,
                           args.run_name or f"profile-{cfg.name}")
    with tracker:
        tracker.log_params(flatten(cfg))
        env = result.get("environment") or {}
        backend = ",".join(f"{k}={v}" for k, v in (env.get("kernel_backend") or {}).items())
        tracker.set_tags(run_tags(cfg, kernel_backend=backend or "n/a", world_size=1,
                                  device=env.get("device", args.device)))
        log_profile(result, tracker)
        tracker.log_text(json.dumps(result, indent=2), "profile.json")
        return tracker.run_id or ""


def _print_text(result: dict[str, Any]) -> None:
    for key, value in result.items():
        if isinstance(value, int) and key.startswith("params_"):
            print(f"{key:<26} {value / 1e6:.2f}M ({value})")
        elif not isinstance(value, (dict, list)):
            print(f"{key:<26} {value}")
    flops = result.get("flops")
    if flops:
        print(f"{'gflops':<26} {flops['gflops']:.2f}  ({flops['protocol']['convention']}, "
              f"{flops['protocol']['input']} {flops['protocol']['image_size']})")
        for group, value in flops["groups"].items():
            print(f"  {group:<24} {value:.3f}")
        if flops.get("gflops_inference_only") is not None:
            print(f"{'gflops_inference_only':<26} {flops['gflops_inference_only']:.2f}")
        check = flops.get("published_protocol")
        if check:
            print(f"{'gflops_published_protocol':<26} {check['gflops']:.2f} (published "
                  f"{check['published']}; inference-only at {check['image_size']})")
        print(f"{'uncounted ops':<26} {flops['uncounted'] or 'none'}")
    for key, stats in (result.get("fps") or {}).items():
        print(f"fps_{key:<22} {stats['fps']:.2f}  (median {stats['median_ms']:.1f} ms, "
              f"{stats['protocol']['device']}, {stats['iterations']} iters, "
              f"fold_bn {stats['protocol']['fold_bn']})")
    for key, stats in (result.get("memory") or {}).items():
        print(f"mem_{key:<22} {stats['peak_mb']:.1f} MiB peak (+{stats['increment_mb']:.1f})")
