"""Command line: ``moesim COMMAND``; ``moesim --help`` lists the commands.

Each command is one module in this package exposing ``NAME``, ``add_parser(subparsers)`` and
``run(args) -> int``; adding a command is one module plus one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
from typing import NoReturn

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
from moesim.cli.common import EXIT_BROKEN_PIPE, PROCESS, handle_errors

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


def run_as_program() -> NoReturn:
    """``sys.exit(main())`` for the ``moesim`` process, ended without the interpreter's
    teardown: once the command is done, the exit handlers run (``atexit``) and the standard
    streams are flushed, then ``os._exit``. The teardown frees every module and object one by
    one; after a run that loaded the network's compiled kernels that alone takes ~0.4 s
    (numba's and LLVM's objects), a tenth of a 256-device run. An output pipe closed early
    exits 141, as :func:`moesim.cli.common.handle_errors` does. Exceptions other than
    ``SystemExit`` leave as usual (traceback, full teardown). The command learns that the
    process ends with it (``PROCESS["ends_after_command"]``: ``moesim run`` turns the cyclic
    garbage collector off)."""
    PROCESS["ends_after_command"] = True
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    if code is not None and not isinstance(code, int):  # sys.exit("message")
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run_as_program()
