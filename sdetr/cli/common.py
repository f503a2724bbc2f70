"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sdetr.config import ExperimentConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """CONFIG_OR_PRESET positional + repeated ``--set key=value``."""
    parser.add_argument("config", metavar="CONFIG_OR_PRESET",
                        help="a preset name (see `sdetr models`) or a YAML file")
    add_set_arg(parser, "override a config key, e.g. --set model.rho=0.2 train.epochs=1")


def add_set_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """Repeated ``--set key=value ...`` into ``args.overrides`` (a list of lists)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", nargs="+", help=help)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The ``--set`` items, flattened."""
    return [item for group in args.overrides for item in group]


def load_from_args(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, overrides_of(args))


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
