"""Command line: ``moesim COMMAND``; ``moesim --help`` lists the commands.

Each command is one module in this package exposing ``NAME``, ``add_parser(subparsers)`` and
``run(args) -> int``; adding a command is one module plus one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys

from moesim._version import __version__
from moesim.cli import (
    calibrate,
    catalog,
    compare,
    model,
    plan,
    routing,
    run,
    schema,
    sweep,
    validate,
)
from moesim.cli.common import handle_errors

COMMANDS = [run, compare, routing, calibrate, validate, model, sweep, plan, catalog, schema]


def build_parser() -> argparse.ArgumentParser:
    """The ``moesim`` parser with one sub-command per module in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Simulate what a Mixture-of-Experts model costs on a GPU cluster.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; bad input exits 2 with one ``error:`` line."""
    args = build_parser().parse_args(argv)
    return handle_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
