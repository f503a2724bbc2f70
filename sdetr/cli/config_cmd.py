"""``sdetr config``: print the resolved config of a preset or file (with overrides)."""

from __future__ import annotations

import argparse

from sdetr.cli.common import add_config_args, load_from_args, print_json
from sdetr.config import flatten, to_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved config (YAML, or flat JSON)")
    add_config_args(p)
    p.add_argument("--flat", action="store_true", help="flat key → value JSON, as tracked")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_from_args(args)
    if args.flat:
        print_json(flatten(cfg))
    else:
        print(to_yaml(cfg), end="")
    return 0
