"""``sdetr`` command line: parse arguments, load the config, call one function.

Every subcommand lives in a small module that adds its parser with ``add_parser(subparsers)``
and sets ``func``. Known bad input (config, data, checkpoint, backend errors) ends with a
one-line ``sdetr: error: ...`` and exit status 2; ``SDETR_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from sdetr.cli import (checkpoint_cmd, config_cmd, data_cmd, demo_cmd, eval_cmd, models_cmd,
                       profile_cmd, report_cmd, sweep_cmd, train_cmd)
from sdetr.cli import bench_cmd, doctor_cmd

EXIT_BAD_INPUT = 2
COMMANDS = (models_cmd, config_cmd, profile_cmd, checkpoint_cmd, data_cmd, eval_cmd, train_cmd,
            sweep_cmd, report_cmd, demo_cmd, doctor_cmd, bench_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdetr",
        description="Reproduce and benchmark Deformable / Efficient / Sparse / Lite DETR.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except bad_input_errors() as exc:
        if os.environ.get("SDETR_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"sdetr: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input", reported in one line without a traceback."""
    from sdetr.config import ConfigError
    from sdetr.ops import BackendUnavailableError
    # CheckpointError and DatasetError are ValueError subclasses.
    return (ConfigError, BackendUnavailableError, ValueError, FileNotFoundError,
            PermissionError, IsADirectoryError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
