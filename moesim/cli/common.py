"""Helpers every command shares: duration formatting, ``--set`` parsing, markdown tables,
and the error handler that turns bad input into one line and exit code 2."""

from __future__ import annotations

import argparse
import sys

from moesim.config.scenario import ScenarioError

EXIT_BAD_INPUT = 2


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def parse_set(item: str) -> tuple[str, object]:
    import yaml

    if "=" not in item:
        raise ScenarioError(item, "--set expects PATH=VALUE, e.g. workload.batch_size=64")
    path, value = item.split("=", 1)
    return path.strip(), yaml.safe_load(value)


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
        type=int,
        metavar="N",
        help="worker processes (default: one per core; 1 runs in-process)",
    )


def markdown(df) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = [
        "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def handle_errors(func, args: argparse.Namespace) -> int:
    """Run one command; a ``ScenarioError`` prints ``error: FILE: field.path: reason`` and
    returns 2, Ctrl-C returns 130."""
    try:
        return func(args)
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
