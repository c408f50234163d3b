"""``moesim plan``: search candidates for the cheapest cluster that meets the targets."""

from __future__ import annotations

import argparse

from moesim.cli.common import add_study_arguments, out_dir

NAME = "plan"

PLAN_HELP = """\
Search a candidate space for the cheapest configuration that meets every target, and write
DIR/report.md, a self-contained DIR/report.html, the PNGs and DIR/plan.json (answer first:
chosen configuration, cost and margin to each target; then why: step-time breakdown of the top
candidates, Pareto frontier, expert load, link utilization, a one-step timeline, every
candidate, and the binding constraint).

A plan file:
  name: mixtral-decode
  base: ../mixtral-8x7b-8xh100-decode.yaml    # or an inline scenario mapping
  overrides: {model.n_layers: 8}              # applied to every candidate
  candidates:                                 # dotted paths, combined as a grid
    cluster.device: [h100-sxm, a100-sxm-80gb]
    cluster.devices_per_node: [4, 8]
    parallelism.ep: [4, 8]
  targets:                                    # any summary metric: {min: X} and/or {max: Y}
    tokens_per_s: {min: 100000}               # serving: ttft_p99_s, tpot_p99_s, slo_attainment
    step_time_s: {max: 0.05}
  objective: cost_per_hour_usd                # or cost_per_million_tokens_usd, energy_per_token_j
  budget: {max_cost_per_hour_usd: 200}        # also max_devices, max_cost_per_million_tokens_usd
  prices: {h100-sxm: 3.50}                    # USD per device-hour; default catalog prices.yaml
  screen_fidelity: analytic                   # every candidate
  confirm: {fidelity: des, top: 2}            # the best feasible ones, until the best is confirmed

Candidates that cannot fit in memory, or whose step-time lower bound already misses a target,
are pruned before simulating (prefill and decode). Simulations run like a sweep and are
journaled in DIR/work/. An infeasible plan names the closest candidate and what it misses.
A bad plan exits with code 2 and one line: error: FILE: field.path: reason.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim plan``."""
    p = subparsers.add_parser(
        NAME,
        help="find the cheapest cluster that meets targets, and write a report",
        description=PLAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_study_arguments(
        p,
        NAME,
        "report folder",
        "keep simulations already journaled in DIR/work/ (default: start afresh)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from moesim.studies.capacity import load_plan, run_plan
    from moesim.studies.capacity_report import write_plan_report
    from moesim.studies.sweep import make_executor

    spec, base = load_plan(args.plan)
    out_dir(args.out)
    with make_executor(args.executor, args.workers, args.address) as executor:
        result = run_plan(
            spec, base, args.out, str(args.plan), executor, not args.quiet, args.resume
        )
    write_plan_report(result, args.out)
    focus = result.chosen if result.feasible else result.closest
    row = result.row(focus)
    if result.feasible:
        print(
            f"chosen            {row['label']}: {int(row['devices'])} x {row['device']}, "
            f"{row['cost_per_hour_usd']:,.2f} USD/h, {row[spec.throughput_metric]:,.0f} "
            f"{spec.throughput_metric} ({row['fidelity']})"
        )
        if spec.search == "max_rate":
            print(
                f"max rate          {row['max_rate_per_s']:,.4g} requests/s "
                f"({row['max_rate_tokens_per_s']:,.0f} output tokens/s) within the targets; "
                f"{row['max_rate_upper_per_s']:,.4g} requests/s fails"
            )
    else:
        print("infeasible        no candidate meets every target")
        if focus is not None:
            print(f"closest           {row['label']}: misses " + "; ".join(result.misses(focus)))
    print(f"binding           {result.binding}: {result.binding_reason}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items()))
    print(f"candidates        {len(result.table)} ({counts}) in {result.wall_s:.1f} s")
    print(f"wrote             {args.out}/report.md report.html plan.json and the PNGs")
    return 0
