"""``moesim routing``: route every MoE layer of a scenario (no timing) and tabulate the load."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.cli.common import add_set_argument, out_dir, parse_overrides
from moesim.config.errors import ScenarioError

NAME = "routing"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim routing``."""
    p = subparsers.add_parser(
        NAME,
        help="routing load table, heatmap and per-device bars (no simulation)",
        description="Route every MoE layer of a scenario (no timing simulation) and print "
        "per-layer imbalance (max/mean expert and device load, coefficient of variation), "
        "drops, node crossings and the expert time the slowest device adds. With --out DIR: "
        "routing.csv, expert_load.csv, device_load.csv, expert_load_heatmap.png (experts x "
        "layers) and device_load.png.",
    )
    p.add_argument("scenario", type=Path, help="scenario YAML file (see scenarios/)")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write routing.csv, expert_load.csv, device_load.csv and the two PNGs",
    )
    add_set_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt

    from moesim.config.scenario import load_scenario
    from moesim.network import build_topology
    from moesim.plan.limits import check_size
    from moesim.plan.workload import build_plan
    from moesim.report import plot_device_load, plot_expert_heatmap
    from moesim.results.collect import device_load_table, expert_load_table, routing_table

    overrides = parse_overrides(args.set)
    sc = load_scenario(args.scenario, overrides)
    try:
        check_size(sc)
        if args.out:
            out_dir(args.out)
        plan = build_plan(sc)
    except ScenarioError as err:
        err.file = err.file or str(args.scenario)
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
