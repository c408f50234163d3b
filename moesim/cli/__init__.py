"""Command line: ``moesim run | catalog | schema``; ``moesim --help`` for the list."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moesim._version import __version__
from moesim.config.scenario import Scenario, ScenarioError, load_scenario

EXIT_BAD_INPUT = 2


def _fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def _print_summary(summary: dict) -> None:
    s = summary
    step = s["step_time_s"]
    print(f"scenario          {s['scenario']}  ({s['devices']} devices, {s['links']} links)")
    print(f"step time         {_fmt_s(step)}")
    print(f"tokens/s          {s['tokens_per_s']:,.0f}  ({s['tokens']:,} tokens per step)")
    print(f"breakdown         (timeline of {s['critical_device']}, the last device to finish)")
    for phase, sec in s["breakdown_s"].items():
        if sec > 0:
            share = sec / step if step else 0
            bar = "#" * round(share * 40)
            print(f"  {phase:<15} {_fmt_s(sec):>12}  {share:6.1%}  {bar}".rstrip())
    if s.get("overlapped_comm_s") is not None:  # inference: what compute hides
        a2a = s["breakdown_s"]["dispatch"] + s["breakdown_s"]["combine"]
        print(
            f"communication     exposed {_fmt_s(s['exposed_comm_s'])} (all-to-all "
            f"{a2a / step if step else 0:.1%} of the step), overlapped "
            f"{_fmt_s(s['overlapped_comm_s'])}; {s['tokens_per_s'] / s['devices']:,.0f} "
            "tokens/s per device"
        )
    if "tpot_s" in s:
        mtp = s.get("mtp")
        extra = f" ({mtp['tokens_per_step']:.2f} tokens per sequence per step)" if mtp else ""
        print(f"tpot              {_fmt_s(s['tpot_s'])}{extra}")
    bd, bl, r = s["busiest_device"], s["busiest_link"], s["routing"]
    print(
        f"busiest device    {bd['device']}: compute {_fmt_s(bd['compute_busy_s'])}, "
        f"utilization {bd['utilization']:.1%}"
    )
    if bl:
        print(
            f"busiest link      {bl['link']}: {bl['bytes_carried'] / 1e6:,.1f} MB, "
            f"utilization {bl['utilization']:.1%}"
        )
    print(
        f"routing           expert max/mean load {r['max_over_mean_load']:.3f} (worst layer "
        f"{r['max_over_mean_load_worst_layer']:.3f}), device max/mean "
        f"{r['device_max_over_mean_load']:.3f}, drop rate {r['drop_rate']:.2%}, "
        f"cross-node {r['cross_node_fraction']:.1%}"
    )
    mem = s["memory"]
    print(
        f"memory            {mem['max_used_bytes'] / 1e9:.1f} of "
        f"{mem['capacity_bytes'] / 1e9:.1f} GB on the fullest device"
    )
    train = s.get("train")
    if train:
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in train["memory_bytes"].items())
        print(
            f"training          MFU {train['mfu']:.1%} (HFU {train['hfu']:.1%}), compute "
            f"{_fmt_s(train['compute_s'])}, exposed communication "
            f"{_fmt_s(train['exposed_comm_s'])}, "
            + (
                f"waiting for other stages {_fmt_s(train['pipeline_wait_s'])}, "
                if train["pipeline_wait_s"]
                else ""
            )
            + f"{train['micro_batches']} micro-batches"
        )
        print(f"  memory (GB)     {parts}")
    pim = s.get("pim")
    if pim:
        threshold = pim["token_threshold"]
        print(
            f"pim               {pim['units_per_gpu']} x {pim['device']} per GPU, policy "
            f"{pim['policy']}"
            + (f" (at most {threshold} tokens)" if threshold is not None else "")
            + f", busy {_fmt_s(pim['max_busy_s'])}, {pim['max_used_bytes'] / 1e9:.1f} of "
            f"{pim['capacity_bytes'] / 1e9:.1f} GB"
        )
    energy = s.get("energy_j")
    if energy:
        total = energy["total"]
        top = sorted(energy["breakdown"].items(), key=lambda kv: -kv[1])[:3]
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in top) if total > 0 else ""
        print(
            f"energy            {total:.3f} J per step, {energy['per_token']:.4f} J "
            f"per token ({shares})"
        )
    print(f"simulated in      {s['sim']['wall_s']:.2f} s wall, {s['sim']['events']:,} events")
    for warning in s.get("warnings", []):
        print(f"warning           {warning}")


def cmd_run(args: argparse.Namespace) -> int:
    from moesim.results.collect import write_outputs
    from moesim.studies.simulate import simulate

    overrides = dict(_parse_set(item) for item in args.set or [])
    if args.seed is not None:
        overrides["sim.seed"] = args.seed
    if args.no_trace:
        overrides["sim.trace"] = False
    scenario = load_scenario(args.scenario, overrides)
    try:
        result = simulate(scenario, progress=not args.quiet)
    except ScenarioError as err:
        err.file = str(args.scenario)
        raise
    if scenario.workload.phase == "serve":
        return _serve_outputs(result, args)
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in result.summary.items() if k != "scenario_resolved"}, indent=2
            )
        )
    elif not args.quiet:
        _print_summary(result.summary)
    if args.out:
        out = write_outputs(result, args.out)
        if not args.quiet:
            print(
                f"wrote             {out}/summary.json devices.csv links.csv routing.csv "
                "trace.json (open trace.json in https://ui.perfetto.dev)"
            )
    return 0


def _serve_outputs(result, args: argparse.Namespace) -> int:
    """Print and write a serving run (``workload.phase: serve``)."""
    from moesim.serving.simulation import print_serving_summary, write_serving_outputs

    summary = {k: v for k, v in result.summary.items() if k != "scenario_resolved"}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print_serving_summary(summary)
    if args.out:
        out = write_serving_outputs(result, args.out)
        if not args.quiet:
            print(f"wrote             {out}/summary.json requests.csv iterations.csv kv_cache.png")
    return 0


def _parse_set(item: str) -> tuple[str, object]:
    import yaml

    if "=" not in item:
        raise ScenarioError(item, "--set expects PATH=VALUE, e.g. workload.batch_size=64")
    path, value = item.split("=", 1)
    return path.strip(), yaml.safe_load(value)


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


def cmd_sweep(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from moesim.report import plot_metric_vs_axes
    from moesim.studies.sweep import JOURNAL, execute, load_sweep, make_executor, prepare

    spec, base = load_sweep(args.sweep)
    out = args.out
    if (out / JOURNAL).exists() and not args.resume:
        raise ScenarioError(
            "",
            f"{out} already holds a sweep: add --resume to continue it, or choose another --out",
            str(args.sweep),
        )
    run = prepare(spec, base, out, str(args.sweep), args.format)
    done_before = len({r["key"] for r in run.done_rows()} & {p.key for p in run.points})
    if not args.quiet:
        print(
            f"sweep             {spec.name}: {len(run.points)} points "
            f"({len(run.skipped)} skipped by constraints), {done_before} already done"
        )
    start = time.perf_counter()
    try:
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
    (out / "summary.md").write_text(
        f"# {spec.name}\n\n{len(table)} points, {failed} failed, {wall:.1f} s\n\n"
        + _markdown(summary)
        + "\n"
    )
    if not args.quiet:
        print(summary.head(args.top).to_string(index=False))
        print(
            f"ran               {len(table) - done_before} points in {wall:.1f} s "
            f"({failed} failed); results in {run.results_path}, plots in {plots}/"
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from moesim.studies.capacity import load_plan, run_plan
    from moesim.studies.capacity_report import write_plan_report
    from moesim.studies.sweep import make_executor

    spec, base = load_plan(args.plan)
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
    else:
        print("infeasible        no candidate meets every target")
        if focus is not None:
            print(f"closest           {row['label']}: misses " + "; ".join(result.misses(focus)))
    print(f"binding           {result.binding}: {result.binding_reason}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items()))
    print(f"candidates        {len(result.table)} ({counts}) in {result.wall_s:.1f} s")
    print(f"wrote             {args.out}/report.md report.html plan.json and the PNGs")
    return 0


def _markdown(df) -> str:
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    rows = [
        "| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in r) + " |"
        for r in df.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def cmd_routing(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from moesim.network import build_topology
    from moesim.plan.workload import build_plan
    from moesim.report import plot_device_load, plot_expert_heatmap
    from moesim.results.collect import device_load_table, expert_load_table, routing_table

    overrides = dict(_parse_set(item) for item in args.set or [])
    sc = load_scenario(args.scenario, overrides)
    try:
        plan = build_plan(sc)
    except ScenarioError as err:
        err.file = str(args.scenario)
        raise
    topo = build_topology(sc.cluster, sc.topology)
    names = [topo.device_name(g) for g in range(plan.n_devices)]
    table = routing_table(plan)
    experts, devices = expert_load_table(plan), device_load_table(plan, names)
    if table.empty:
        print("no MoE layers")
        return 0
    cols = [
        "layer",
        "max_over_mean_load",
        "cv_load",
        "device_max_over_mean_load",
        "routed_pairs",
        "dropped_pairs",
        "cross_node_pairs",
        "imbalance_s",
    ]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    per_expert = experts.groupby("expert")["tokens"].sum()
    per_device = devices.groupby("device", sort=False)["tokens"].sum()
    routed = table["routed_pairs"].sum()
    print(
        f"all layers        expert max/mean {per_expert.max() / per_expert.mean():.3f}, "
        f"device max/mean {per_device.max() / per_device.mean():.3f}, drop rate "
        f"{table['dropped_pairs'].sum() / routed:.2%}, cross-node "
        f"{table['cross_node_pairs'].sum() / routed:.1%}, slowest-device expert time over "
        f"the mean {table['imbalance_s'].sum() * 1e3:.3f} ms"
    )
    hottest = per_expert.sort_values(ascending=False).head(5)
    print("hottest experts   " + ", ".join(f"{e}: {t:,}" for e, t in hottest.items()))
    if args.out:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "routing.csv", index=False)
        experts.to_csv(out / "expert_load.csv", index=False)
        devices.to_csv(out / "device_load.csv", index=False)
        for name, fig in (
            ("expert_load_heatmap.png", plot_expert_heatmap(experts)),
            ("device_load.png", plot_device_load(devices)),
        ):
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
        print(
            f"wrote             {out}/routing.csv expert_load.csv device_load.csv "
            "expert_load_heatmap.png device_load.png"
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moesim.validation.calibrate import calibrate, write_calibration

    devices, links = calibrate(quick=args.quick)
    write_calibration(args.out, devices, links)
    dev = next(iter(devices.values()))
    link = next(iter(links.values()))
    print(
        f"peak              {dev['peak_flops_per_s']['fp32'] / 1e9:,.1f} GFLOP/s fp32 "
        f"(small-GEMM halves at m={dev['gemm_m_half']:.0f}, k={dev['gemm_k_half']:.0f})"
    )
    print(
        f"memory            {dev['memory_bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s; "
        f"{dev['kernel_launch_s'] * 1e6:.2f} us per call; gating "
        f"{dev['gating_s_per_score'] * 1e9:.1f} ns per score"
    )
    print(
        f"shared memory     {link['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s, "
        f"{link['latency_s'] * 1e6:.1f} us per hand-off between processes"
    )
    print(f"wrote             {args.out}/devices.yaml links.yaml")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from moesim.validation.validate import error_stats, run_validation

    df = run_validation(
        args.out, quick=args.quick, calibration=args.calibration, progress=not args.quiet
    )
    functional = df[df["kind"] == "functional"]
    exact = int(functional["exact"].sum())
    print(
        f"functional        {exact}/{len(functional)} layouts: per-expert tokens, drops and "
        "dispatch bytes equal the reference exactly"
        f"; output max rel error {functional['output_rel_error'].max():.1e}"
    )
    for kind, label in (("timing", "MoE layer time"), ("comm", "shm dispatch time")):
        med, p90, n = error_stats(df, kind)
        print(f"{kind:<17} {label}: median |error| {med:.1%}, p90 {p90:.1%} over {n} cases")
    print(f"wrote             {args.out}/validation.csv validation.png")
    return 0 if exact == len(functional) else 1


def cmd_model(args: argparse.Namespace) -> int:
    from moesim import catalog
    from moesim.catalog.specs import DTYPE_BYTES, ModelSpec
    from moesim.cost.ops import (
        Bytes,
        forward_flops_per_token,
        kv_cache_bytes_per_token,
        linear_state_bytes_per_seq,
        param_counts,
    )

    target = args.model
    if target.endswith(".json") or Path(target).exists():
        from moesim.config.hf import load_hf_config

        spec = ModelSpec.model_validate(load_hf_config(target))
    else:
        spec = catalog.model(target)
    p = param_counts(spec)
    kv = sum(kv_cache_bytes_per_token(spec, i, 1, Bytes()) for i in range(spec.n_layers))
    state = sum(linear_state_bytes_per_seq(spec, i, 1) for i in range(spec.n_layers))
    print(
        f"model             {spec.name}: {spec.n_layers} layers ({spec.n_dense_layers} dense), "
        f"d_model {spec.d_model}, {spec.n_experts} experts top-{spec.top_k}"
        f"{f' + {spec.n_shared_experts} shared' if spec.n_shared_experts else ''}"
    )
    published = ""
    if spec.total_params:
        published = (
            f" (published {spec.total_params / 1e9:.1f}B / {(spec.active_params or 0) / 1e9:.1f}B)"
        )
    print(
        f"parameters        {p['total'] / 1e9:.2f}B total, {p['active'] / 1e9:.2f}B active per "
        f"token{published}"
    )
    print(
        f"forward FLOPs     {forward_flops_per_token(spec, args.context) / 1e9:.2f} GFLOP per "
        f"token at {args.context:,} tokens of context"
    )
    print(
        "weights           "
        + ", ".join(
            f"{p['total'] * DTYPE_BYTES[d] / 1e9:,.1f} GB {d}" for d in ("bf16", "fp8", "int4")
        )
    )
    line = f"KV cache          {kv / 1e3:,.1f} kB per token (bf16)"
    if state:
        line += f", plus {state / 1e6:,.1f} MB of linear-attention state per sequence"
    print(line)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from moesim import catalog
    from moesim.cost.ops import param_counts

    kinds = [args.kind] if args.kind else ["models", "devices", "links"]
    for kind in kinds:
        print(f"{kind}:")
        for name in catalog.names(kind):
            spec = catalog.lookup(kind, name)
            if kind == "models":
                p = param_counts(spec)
                extra = (
                    f"{spec.n_layers} layers, d_model {spec.d_model}, {spec.n_experts} "
                    f"experts top-{spec.top_k}, {spec.n_shared_experts} shared; "
                    f"{p['total'] / 1e9:.1f}B total / {p['active'] / 1e9:.1f}B active"
                )
            elif kind == "devices" and spec.type in ("pim", "cim"):
                peaks = ", ".join(
                    f"{v / 1e12:,.2f} TFLOP/s {k}" for k, v in spec.peak_flops_per_s.items()
                )
                inside = spec.internal_bandwidth_bytes_per_s
                extra = (
                    f"{spec.type}: {peaks}, {spec.capacity_bytes / 1e9:.2f} GB"
                    + (f" at {inside / 1e12:.2f} TB/s inside" if inside else ", weight-stationary")
                    + f", {spec.host_link} to the GPU"
                )
            elif kind == "devices":
                extra = (
                    f"{spec.peak_flops_per_s.get('bf16', 0) / 1e12:,.0f} TFLOP/s bf16, "
                    f"{spec.memory_bytes / 1e9:.0f} GB at "
                    f"{spec.memory_bandwidth_bytes_per_s / 1e12:.2f} TB/s, "
                    f"{spec.intra_node_topology} over {spec.intra_node_link}"
                )
            else:
                extra = (
                    f"{spec.bandwidth_bytes_per_s / 1e9:,.1f} GB/s per direction, "
                    f"{spec.latency_s * 1e6:.2f} us"
                )
            print(f"  {name:<24} {extra}")
            if args.sources:
                for field, src in spec.sources.items():
                    print(f"      {field}: {src}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(Scenario.model_json_schema(), indent=2))
    return 0


RUN_HELP = """\
Simulate one step of a scenario with the discrete-event engine and print step time,
tokens/s, the time breakdown of the slowest device, the busiest device and link, routing
imbalance and memory. With --out DIR it also writes:
  summary.json  step_time_s, tokens_per_s, breakdown_s, routing, devices, links, resolved scenario
  devices.csv   one row per device: seconds per phase (compute and waits), utilization, memory
  links.csv     one row per link: bytes carried, busy seconds, utilization
  routing.csv   one row per MoE layer: load imbalance, drops, cross-node pairs
  expert_load.csv  tokens per (MoE layer, expert group, expert)
  trace.json    Chrome trace events, one track per device and per link (open in Perfetto)
A bad scenario exits with code 2 and one line: error: FILE: field.path: reason.
"""


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
with its error and the sweep goes on. Ctrl-C (or a crash) keeps every finished point: rerun
with --resume to do only the rest. Per-point seeds come from the sweep seed and the point.
"""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesim",
        description="Simulate what a Mixture-of-Experts model costs on a GPU cluster.",
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="simulate one step of a scenario YAML",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("scenario", type=Path, help="scenario YAML file (see scenarios/)")
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write summary.json, devices.csv, links.csv, routing.csv, trace.json",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a scenario field by dotted path, e.g. --set "
        "routing.zipf_s=1.2 --set model.n_layers=4 (repeatable)",
    )
    run.add_argument("--seed", type=int, help="override sim.seed")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    run.add_argument(
        "--no-trace",
        action="store_true",
        help="skip recording timelines (faster, smaller output on big clusters)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing, no progress bar")
    run.set_defaults(func=cmd_run)

    routing = sub.add_parser(
        "routing",
        help="routing load table, heatmap and per-device bars (no simulation)",
        description="Route every MoE layer of a scenario (no timing simulation) and print "
        "per-layer imbalance (max/mean expert and device load, coefficient of variation), "
        "drops, node crossings and the expert time the slowest device adds. With --out DIR: "
        "routing.csv, expert_load.csv, device_load.csv, expert_load_heatmap.png (experts x "
        "layers) and device_load.png.",
    )
    routing.add_argument("scenario", type=Path)
    routing.add_argument("--out", type=Path, metavar="DIR")
    routing.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a scenario field (repeatable)",
    )
    routing.set_defaults(func=cmd_routing)

    cal = sub.add_parser(
        "calibrate",
        help="measure this host (numpy) as a moesim device",
        description="Measure this host's numpy float32 GEMM rate (with small-GEMM efficiency), "
        "memory bandwidth, per-call overhead, gating cost, and a shared-memory link between "
        "two processes; write DIR/devices.yaml and DIR/links.yaml in the catalog format.",
    )
    cal.add_argument("--out", type=Path, required=True, metavar="DIR")
    cal.add_argument("--quick", action="store_true", help="smaller measurements (seconds)")
    cal.set_defaults(func=cmd_calibrate)

    val = sub.add_parser(
        "validate",
        help="cross-validate the simulator against real numpy MoE layers on this host",
        description="Functional checks (exact routing counts, drops and dispatch bytes against "
        "the numpy reference layer), then timing: calibrate this host (or --calibration DIR), "
        "time the reference layer on held-out shapes and a two-process shared-memory dispatch, "
        "and compare with moesim's predictions. Writes DIR/validation.csv (case, kind, "
        "predicted_s, measured_s, rel_error, shape columns) and DIR/validation.png.",
    )
    val.add_argument("--out", type=Path, required=True, metavar="DIR")
    val.add_argument("--quick", action="store_true", help="8 layer shapes and 2 exchanges")
    val.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="use this calibration instead of measuring now",
    )
    val.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    val.set_defaults(func=cmd_validate)

    mdl = sub.add_parser(
        "model",
        help="parameters, FLOPs per token, weight and KV-cache bytes of a model",
        description="Describe a catalog model or a local Hugging Face config.json: total and "
        "active parameters, forward FLOPs per token, weight bytes per dtype, KV-cache bytes "
        "per token. Supported config.json architectures: mixtral, qwen2_moe, qwen3_moe, "
        "deepseek_v2, deepseek_v3, olmoe, dbrx, and dense llama / mistral / qwen2.",
    )
    mdl.add_argument("model", help="catalog name (moesim catalog models) or config.json path")
    mdl.add_argument(
        "--context",
        type=int,
        default=4096,
        help="context length for attention FLOPs (default 4096)",
    )
    mdl.set_defaults(func=cmd_model)

    sweep = sub.add_parser(
        "sweep",
        help="run many scenario variants (grid / zip / random / Latin hypercube)",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("sweep", type=Path, help="sweep YAML (see scenarios/sweeps/)")
    sweep.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep in DIR: finished points are kept",
    )
    sweep.add_argument(
        "--executor",
        choices=["local", "dask"],
        default="local",
        help="local process pool (default) or Dask distributed",
    )
    sweep.add_argument(
        "--address",
        metavar="ADDR",
        help="Dask scheduler, e.g. tcp://scheduler:8786 (default: a LocalCluster)",
    )
    sweep.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (default: one per core; 1 runs in-process)",
    )
    sweep.add_argument(
        "--format",
        choices=["parquet", "csv"],
        default="parquet",
        help="results table format (default parquet)",
    )
    sweep.add_argument("--top", type=int, default=15, help="rows of the summary to print")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    sweep.set_defaults(func=cmd_sweep)

    plan = sub.add_parser(
        "plan",
        help="find the cheapest cluster that meets targets, and write a report",
        description=PLAN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("plan", type=Path, help="plan YAML (see scenarios/plans/)")
    plan.add_argument("--out", type=Path, required=True, metavar="DIR", help="report folder")
    plan.add_argument(
        "--resume",
        action="store_true",
        help="keep simulations already journaled in DIR/work/ (default: start afresh)",
    )
    plan.add_argument("--executor", choices=["local", "dask"], default="local")
    plan.add_argument("--address", metavar="ADDR", help="Dask scheduler address")
    plan.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (default: one per core; 1 runs in-process)",
    )
    plan.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    plan.set_defaults(func=cmd_plan)

    cat = sub.add_parser(
        "catalog",
        help="list catalog models, devices and links",
        description="List the built-in models, devices and links.",
    )
    cat.add_argument("kind", nargs="?", choices=["models", "devices", "links"])
    cat.add_argument("--sources", action="store_true", help="print each number's source")
    cat.set_defaults(func=cmd_catalog)

    schema = sub.add_parser(
        "schema",
        help="print the scenario JSON Schema (for YAML editors)",
        description="Print the scenario JSON Schema. Point your editor's "
        "YAML language server at it for completion and validation.",
    )
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ScenarioError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
