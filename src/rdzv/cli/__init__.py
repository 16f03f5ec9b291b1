"""The ``rdzv`` command line: one sub-command per module listed in :data:`COMMANDS`.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (``(args) -> int``, the exit code) as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

#: Modules providing sub-commands, in the order ``rdzv --help`` lists them.
COMMANDS: list[str] = [
    "rdzv.cli.serve",
    "rdzv.cli.store",
    "rdzv.cli.demo",
    "rdzv.cli.run",
    "rdzv.cli.status",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="rdzv",
        description="Distributed key-value stores, rendezvous and an elastic launcher.",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level of the rdzv loggers (default: WARNING)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code
