"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from typing import Any, Iterator

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


EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM exits with 128 + 15


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[list[int]]:
    """Inside the block SIGTERM raises KeyboardInterrupt, so it unwinds like Ctrl-C (MLflow runs
    closed KILLED, Ray shut down); yields the list of the SIGTERMs received. KeyboardInterrupt
    rather than SystemExit because Ray turns other exceptions raised inside its waits into
    SystemExit(1)."""
    received: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_exit_code(received: list[int]) -> int:
    """128 + the signal for a SIGTERM, else 130 (Ctrl-C)."""
    return 128 + received[-1] if received else EXIT_INTERRUPTED
