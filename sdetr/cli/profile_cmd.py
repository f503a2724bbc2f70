"""``sdetr profile``: parameter counts now (FLOPs, FPS and memory join in the profiling issue)."""

from __future__ import annotations

import argparse

from sdetr.cli.common import add_config_args, load_from_args, print_json
from sdetr.config import ConfigError

WHAT_AVAILABLE = ("params",)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure a model: --what params")
    add_config_args(p)
    p.add_argument("--what", default="params",
                   help=f"comma-separated measurements ({', '.join(WHAT_AVAILABLE)})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    unknown = [w for w in what if w not in WHAT_AVAILABLE]
    if unknown:
        raise ConfigError(f"--what: {', '.join(unknown)} not available "
                          f"(available: {', '.join(WHAT_AVAILABLE)})")
    cfg = load_from_args(args)
    from sdetr.models import build_model
    from sdetr.profiling import count_parameters
    model = build_model(cfg.model)
    result = {"preset": cfg.preset, "name": cfg.name, "backbone": cfg.model.backbone.name}
    result.update(count_parameters(model).as_dict())
    if args.json:
        print_json(result)
    else:
        for key, value in result.items():
            shown = f"{value / 1e6:.2f}M ({value})" if isinstance(value, int) else value
            print(f"{key:<22} {shown}")
    return 0
