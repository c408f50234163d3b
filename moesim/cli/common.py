"""Helpers every command shares: duration formatting, ``--set`` parsing, markdown tables,
and the error handler that turns bad input into one line and exit code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from moesim.config.errors import ScenarioError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70
"""EX_SOFTWARE (sysexits.h): a bug in moesim, not in the input."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, what a shell reports for a writer whose reader closed the pipe."""

PROCESS: dict[str, bool] = {"ends_after_command": False}
"""``ends_after_command``: this process runs one command and ends (the ``moesim`` program,
:func:`moesim.cli.run_as_program`), so a command may leave the cyclic garbage collector off
(:func:`moesim.cli.run.run`); False where :func:`moesim.cli.main` is called in a process
that goes on (tests, scripts)."""


def fmt_s(seconds: float) -> str:
    """A duration in s, ms or us with a readable number of digits."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def parse_set(item: str) -> tuple[str, object]:
    """One ``--set PATH=VALUE``: the dotted path and the value parsed as YAML."""
    from moesim.config.loading import parse_yaml

    if "=" not in item:
        raise ScenarioError(item, "expects PATH=VALUE, e.g. workload.batch_size=64", "--set")
    path, value = item.split("=", 1)
    path = path.strip()
    if not path or any(not part or part.startswith("_") for part in path.split(".")):
        raise ScenarioError(path, "a dotted path of field names, e.g. model.n_layers", "--set")

    return path, parse_yaml(value, "--set", path)


def int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def out_dir(path: Path) -> Path:
    """Create the output folder ``path`` (``--out``) or raise :class:`ScenarioError` saying
    why it cannot be used: a file is there, or it cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise ScenarioError("--out", "is a file, not a folder", str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ScenarioError("--out", f"cannot create: {err.strerror or err}", str(path)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ScenarioError("--out", "not writable", str(path))
    return path


def parse_overrides(items: list[str] | None) -> dict[str, object]:
    """``--set PATH=VALUE`` items as a ``{dotted.path: value}`` mapping."""
    return dict(parse_set(item) for item in items or [])


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--set PATH=VALUE`` scenario override."""
    parser.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a scenario field by dotted path, e.g. --set "
        "routing.zipf_s=1.2 --set model.n_layers=4 (repeatable)",
    )


def add_study_arguments(
    parser: argparse.ArgumentParser, name: str, out_help: str, resume_help: str
) -> None:
    """The study file, ``--out DIR``, ``--resume`` and the executor options (sweep, plan)."""
    parser.add_argument(name, type=Path, help=f"{name} YAML (see scenarios/{name}s/)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help=out_help)
    parser.add_argument("--resume", action="store_true", help=resume_help)
    add_executor_arguments(parser)


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor``, ``--address`` and ``--workers``, shared by sweep and plan."""
    parser.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="local process pool (default) or Dask distributed",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="Dask scheduler, e.g. tcp://scheduler:8786 (default: a LocalCluster)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="worker processes (default: one per core; 1 runs in-process)",
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else ""
    return str(value)


def markdown(df) -> str:
    """A DataFrame as a markdown table (missing numbers, as in failed points, left blank)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(map(_cell, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


def handle_errors(func, args: argparse.Namespace) -> int:
    """Run one command and turn every failure into one line on stderr: a
    ``ScenarioError`` (bad input) prints ``error: FILE: field.path: reason`` and returns 2,
    as do sizes the host cannot hold (MemoryError, OverflowError); an output pipe closed early
    (``| head``) returns 141 quietly; Ctrl-C returns 130; anything else is a bug in moesim,
    printed as ``error: internal: ...`` with code 70 (``MOESIM_TRACEBACK=1`` shows the
    traceback)."""
    try:
        return func(args)
    except ScenarioError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MemoryError, OverflowError, RecursionError) as err:
        what = {MemoryError: "out of memory", OverflowError: "a number overflows"}.get(
            type(err), "nested too deeply"
        )
        print(f"error: {_input_name(args)}: too large: {what} ({_one_line(err)})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("MOESIM_TRACEBACK"):
            raise
        print(
            f"error: {_input_name(args)}: internal: {type(err).__name__}: {_one_line(err)} "
            "(a bug in moesim: please report it; MOESIM_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _input_name(args: argparse.Namespace) -> str:
    """The input file a command was given (its first positional argument), for messages."""
    for name in ("scenario", "sweep", "plan", "model"):
        value = getattr(args, name, None)
        if value is not None:
            return str(value)
    return f"moesim {getattr(args, 'command', '')}".strip()
