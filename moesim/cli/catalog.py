"""``moesim catalog``: list the built-in models, devices and links."""

from __future__ import annotations

import argparse

NAME = "catalog"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim catalog``."""
    p = subparsers.add_parser(
        NAME,
        help="list catalog models, devices and links",
        description="List the built-in models, devices and links with their key numbers.",
    )
    p.add_argument(
        "kind",
        nargs="?",
        choices=["models", "devices", "links"],
        help="list only this kind (default: all three)",
    )
    p.add_argument("--sources", action="store_true", help="print each number's source")
    return p


def run(args: argparse.Namespace) -> int:
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
