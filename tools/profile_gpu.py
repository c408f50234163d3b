#!/usr/bin/env python3
"""Time GEMMs on a GPU with PyTorch and write a moesim kernel table (not run in CI).

    python tools/profile_gpu.py --out h100-bf16.csv                    # Mixtral-8x7B shapes
    python tools/profile_gpu.py --out t.csv --gemm 7168,2048 --gemm 2048,7168 --dtype bf16

Each row is ``op,m,k,n,dtype,seconds``: the median of CUDA-event timings of ``(m x k) @ (k x n)``
with the weight operand cycled through enough copies to defeat the L2 cache (as an MoE layer's
experts are). Point a device at the file with ``kernel_table:`` (see the README). Needs only
PyTorch and a CUDA device; moesim itself is not imported.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys

MIXTRAL = ["4096,14336", "14336,4096", "4096,6144", "4096,4096", "4096,8"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument(
        "--gemm",
        action="append",
        metavar="K,N",
        help="weight shape K,N (repeatable; default: Mixtral-8x7B's)",
    )
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument(
        "--m",
        default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096,8192",
        help="comma-separated row counts",
    )
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, DTYPES[args.dtype])
    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
    rows = []
    for shape in args.gemm or MIXTRAL:
        k, n = (int(v) for v in shape.split(","))
        copies = max(2, min(64, (4 * l2) // (k * n * 2) + 1))
        weights = [torch.randn(k, n, device=dev, dtype=dtype) for _ in range(copies)]
        for m in (int(v) for v in args.m.split(",")):
            a = torch.randn(m, k, device=dev, dtype=dtype)
            for w in weights[:3]:
                a @ w  # warm up
            times = []
            for i in range(args.repeats):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                w = weights[i % copies]
                start.record()
                a @ w
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            times.sort()
            rows.append(("gemm", m, k, n, args.dtype, times[len(times) // 2]))
        del weights
    with open(args.out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["op", "m", "k", "n", "dtype", "seconds"])
        writer.writerows(rows)
    name = torch.cuda.get_device_name(dev)
    print(
        f"{len(rows)} GEMMs timed on {name} at {datetime.datetime.now(datetime.UTC):%Y-%m-%d} "
        f"(torch {torch.__version__}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
