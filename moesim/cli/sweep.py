"""``moesim sweep``: run every point of a sweep file, journaled, and tabulate the results."""

from __future__ import annotations

import argparse
import sys
import time

from moesim.cli.common import add_study_arguments, markdown, out_dir, positive_int
from moesim.config.errors import ScenarioError

NAME = "sweep"

SWEEP_HELP = """\
Run every point of a sweep file and collect one row per point (axis values and every summary
metric) into DIR/results.parquet (or .csv), with DIR/points.jsonl as the durable journal,
DIR/summary.md and DIR/plots/*.png (each metric against each axis).

A sweep file:
  name: ep-vs-skew
  base: ../mixtral-8x7b-8xh100-prefill.yaml   # or an inline scenario mapping
  overrides: {sim.fidelity: analytic}         # applied to every point
  axes:                                       # dotted paths into the scenario
    parallelism.ep: [2, 4, 8]
    routing.zipf_s: [0.0, 0.5, 1.0, 1.5]
  mode: grid                                  # grid | zip | random | lhs (with samples: N)
  constraints: ["parallelism.ep <= cluster.devices_per_node * cluster.nodes"]
  repetitions: 1                              # seeds per point
  seed: 0

Every point is validated before anything runs. A point that fails while running is recorded
with its error and the sweep goes on; failed points are printed with their errors and
listed in DIR/summary.md, and the exit code is 1 when any point failed (with
--allow-failures: only when every point failed). Ctrl-C (or a crash) keeps every finished
point: rerun with --resume to do only the rest. Per-point seeds come from the sweep seed and
the point.
"""


PLOT_METRICS = (
    "step_time_s",
    "tokens_per_s",
    "routing.max_over_mean_load",
    "breakdown_s.experts",
    "breakdown_s.dispatch",
    "breakdown_s.combine",
    "ttft_p99_s",
    "tpot_p99_s",
    "goodput_requests_per_s",
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim sweep``."""
    p = subparsers.add_parser(
        NAME,
        help="run many scenario variants (grid / zip / random / Latin hypercube)",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_arguments(
        p, NAME, "results folder", "continue an interrupted sweep in DIR: finished points are kept"
    )
    p.add_argument(
        "--format",
        choices=["parquet", "csv"],
        default="parquet",
        help="results table format (default parquet)",
    )
    p.add_argument(
        "--top", type=positive_int, default=15, help="rows of the summary to print (default 15)"
    )
    p.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 when some points failed (default: exit 1 when any point failed; always "
        "1 when every point failed)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    return p


def _compile_once(quiet: bool) -> None:
    """Compile the network kernels here, once, where numba's cache does not hold them yet
    (saying so unless ``quiet``): the workers then load them from the cache instead of each
    compiling them at once."""
    from moesim.network import fluid

    if fluid.kernels_cold(quiet):
        fluid.warm_up()


def run(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from moesim.report import plot_metric_vs_axes
    from moesim.studies.sweep import JOURNAL, execute, load_sweep, make_executor, prepare

    spec, base = load_sweep(args.sweep)
    out = args.out
    if out.exists() and not out.is_dir():
        raise ScenarioError("--out", "is a file, not a folder", str(out))
    if (out / JOURNAL).exists() and not args.resume:
        raise ScenarioError(
            "--out",
            "already holds a sweep: add --resume to continue it, or choose another --out",
            str(out),
        )
    run = prepare(spec, base, out, str(args.sweep), args.format)
    done_before = len({r["key"] for r in run.done_rows()} & {p.key for p in run.points})
    if not args.quiet:
        print(
            f"sweep             {spec.name}: {len(run.points)} points "
            f"({len(run.skipped)} skipped by constraints), {done_before} already done"
        )
    out_dir(out)
    start = time.perf_counter()
    try:
        if run.compiled_kernels:
            _compile_once(args.quiet)
        with make_executor(args.executor, args.workers, args.address) as executor:
            table = execute(run, executor, progress=not args.quiet)
    except KeyboardInterrupt:
        n = len({r["key"] for r in run.done_rows()})
        print(
            f"interrupted: {n} of {len(run.points)} points kept in {out}; rerun with --resume",
            file=sys.stderr,
        )
        return 130
    wall = time.perf_counter() - start
    axes = list(spec.axes)
    failed = int((table["status"] != "ok").sum()) if len(table) else 0
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for metric in PLOT_METRICS:
        if metric in table and table[metric].notna().any():
            fig = plot_metric_vs_axes(table, metric, axes)
            fig.savefig(plots / f"{metric.replace('.', '_')}.png", dpi=110)
            plt.close(fig)
    shown = [
        c for c in [*axes, "repetition", "step_time_s", "tokens_per_s", "status"] if c in table
    ]
    summary = (
        table[shown].sort_values("tokens_per_s", ascending=False)
        if ("tokens_per_s" in table)
        else table[shown]
    )
    failures = failure_lines(table, axes)
    (out / "summary.md").write_text(
        f"# {spec.name}\n\n{len(table)} points, {failed} failed, {wall:.1f} s\n\n"
        + markdown(summary)
        + "\n"
        + (
            "\n## Failed points\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
            if failures
            else ""
        )
    )
    if not args.quiet:
        print(summary.head(args.top).to_string(index=False, na_rep="-"))
        print(
            f"ran               {len(table) - done_before} points in {wall:.1f} s "
            f"({failed} failed); results in {run.results_path}, plots in {plots}/"
        )
    for line in failures[: args.top]:
        print(f"failed            {line}", file=sys.stderr)
    if len(failures) > args.top:
        print(
            f"failed            ... {len(failures) - args.top} more in {out}/summary.md",
            file=sys.stderr,
        )
    if failed and (failed == len(table) or not args.allow_failures):
        return 1
    return 0


def failure_lines(table, axes: list[str]) -> list[str]:
    """One line per failed point: its axis values, repetition and the error it raised."""
    if not len(table) or "status" not in table:
        return []
    bad = table[table["status"] != "ok"]
    return [
        ", ".join(f"{a}={row[a]}" for a in [*axes, "repetition"] if a in row)
        + f": {row.get('error', '')}"
        for row in bad.to_dict("records")
    ]
