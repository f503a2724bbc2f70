"""``sdetr models``: list the bundled presets."""

from __future__ import annotations

import argparse

from sdetr.cli.common import print_json
from sdetr.config import load_config, preset_names, preset_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model zoo presets")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(name: str) -> dict[str, str]:
    """One row of the zoo listing: name, variant seams, backbone, first comment line."""
    cfg = load_config(name).model
    first = preset_path(name).read_text().splitlines()[0]
    return {
        "name": name,
        "backbone": cfg.backbone.name,
        "encoder": cfg.encoder,
        "queries": cfg.queries,
        "box_refine": str(cfg.box_refine).lower(),
        "description": first.lstrip("# ").strip(),
    }


def run(args: argparse.Namespace) -> int:
    rows = [describe(name) for name in preset_names()]
    if args.json:
        print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    enc = max(len(r["encoder"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['backbone']:<8} {r['encoder']:<{enc}} "
              f"{r['queries']:<9} refine={r['box_refine']:<5}  {r['description']}")
    return 0
