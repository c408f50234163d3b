"""``moesim calibrate``: measure this host (numpy) as a moesim device and link."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.cli.common import out_dir

NAME = "calibrate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim calibrate``."""
    p = subparsers.add_parser(
        NAME,
        help="measure this host (numpy) as a moesim device",
        description="Measure this host's numpy float32 GEMM rate (with small-GEMM efficiency), "
        "memory bandwidth, per-call overhead, gating cost, and a shared-memory link between "
        "two processes; write DIR/devices.yaml and DIR/links.yaml in the catalog format.",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for devices.yaml and links.yaml",
    )
    p.add_argument("--quick", action="store_true", help="smaller measurements (seconds)")
    return p


def run(args: argparse.Namespace) -> int:
    from moesim.validation.calibrate import calibrate, write_calibration

    out_dir(args.out)
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
