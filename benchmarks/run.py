#!/usr/bin/env python3
"""Simulator speed: run a fixed set of scenarios and print a table (no assertions).

    python benchmarks/run.py                      # every scenario, analytic and discrete-event
    python benchmarks/run.py --des-layers 4       # discrete-event runs over 64 GPUs: 4 MoE layers
    python benchmarks/run.py --only mixtral --fidelity des
    python benchmarks/run.py --only deepseek-v3-256 --fidelity des --repeat 5   # median of 5

Columns: scenario, devices, layers, fidelity, simulated step time, wall seconds (plan +
simulation + results; imports and loading the compiled network kernels excluded), CPU seconds
of that work (steadier than wall time on a shared machine), engine seconds (the simulation
alone, without building the plan that both fidelities share), simpy events, events per wall
second, peak resident memory of the process that ran it (each run is its own process, so the
number is that run's). Also written to benchmarks/results.csv.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKEW = {"routing.distribution": "zipf", "routing.zipf_s": 1.2}
BENCH = [
    ("mixtral-8x7b-8xh100-decode", "mixtral-8x7b-8xh100-decode.yaml", {}),
    ("mixtral-8x7b-8xh100-decode-zipf", "mixtral-8x7b-8xh100-decode.yaml", SKEW),
    ("minimax-text-01-64xh100-prefill", "minimax-text-01-64xh100-prefill.yaml", {}),
    ("minimax-text-01-64xh100-prefill-zipf", "minimax-text-01-64xh100-prefill.yaml", SKEW),
    ("deepseek-v3-256xh800-prefill", "deepseek-v3-256xh800-prefill.yaml", {}),
    ("deepseek-v3-256xh800-prefill-zipf", "deepseek-v3-256xh800-prefill.yaml", SKEW),
    ("deepseek-v3-2048xh800-prefill", "deepseek-v3-2048xh800-prefill.yaml", {}),
    ("deepseek-v3-2048xh800-prefill-zipf", "deepseek-v3-2048xh800-prefill.yaml", SKEW),
]


def _run(path: str, overrides: dict, queue) -> None:
    import moesim
    import moesim.engine.analytic
    import moesim.engine.des
    import moesim.results.collect
    from moesim.network.fluid import warm_up

    warm_up()  # load the compiled network kernels
    sc = moesim.load_scenario(path, {**overrides, "sim.progress": False, "sim.trace": False})
    start, cpu = time.perf_counter(), time.process_time()
    result = moesim.simulate(sc)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = result.summary
    queue.put(
        {
            "devices": s["devices"],
            "layers": sc.model.n_layers,
            "step_time_s": s["step_time_s"],
            "wall_s": wall,
            "cpu_s": cpu,
            "engine_s": s["sim"]["wall_s"],
            "events": s["sim"]["events"],
            "peak_memory_bytes": peak,
        }
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="run scenarios whose name contains this")
    p.add_argument("--fidelity", choices=["des", "analytic", "both"], default="both")
    p.add_argument(
        "--des-layers",
        type=int,
        default=0,
        help="discrete-event runs of scenarios over 64 devices keep this many MoE "
        "layers (0: all, the default); analytic runs are always full depth",
    )
    p.add_argument(
        "--des-max-devices",
        type=int,
        default=4096,
        help="skip discrete-event runs above this many devices",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario this many times (each in a fresh process) and report the "
        "run with the median wall time (this VM's timings move 5-20%% between runs)",
    )
    p.add_argument(
        "--csv",
        help="where to write the table (default benchmarks/results.csv for a full run; a run "
        "narrowed with --only or --fidelity writes a CSV only when this is given)",
    )
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    fidelities = ["analytic", "des"] if args.fidelity == "both" else [args.fidelity]
    header = (
        f"{'scenario':<38} {'dev':>5} {'layers':>6} {'fidelity':>8} {'step_s':>10} "
        f"{'wall_s':>8} {'cpu_s':>8} {'engine_s':>8} {'events':>9} {'ev/s':>9} {'peak_GiB':>8}"
    )
    print(header)
    for name, file, overrides in BENCH:
        if args.only and args.only not in name:
            continue
        for fid in fidelities:
            over = {**overrides, "sim.fidelity": fid}
            path = str(ROOT / "scenarios" / file)
            if fid == "des":
                import moesim

                sc = moesim.load_scenario(path, overrides)
                if sc.cluster.n_devices > args.des_max_devices:
                    continue
                if args.des_layers and sc.cluster.n_devices > 64:
                    over["model.n_layers"] = sc.model.n_dense_layers + args.des_layers
            runs = []
            for _ in range(max(args.repeat, 1)):
                queue = ctx.Queue()
                proc = ctx.Process(target=_run, args=(path, over, queue))
                proc.start()
                runs.append(queue.get())
                proc.join()
            out = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
            label = name if "model.n_layers" not in over else f"{name} (cut)"
            rate = out["events"] / out["wall_s"] if out["wall_s"] > 0 else 0.0
            row = {"scenario": label, "fidelity": fid, **out, "events_per_s": rate}
            rows.append(row)
            print(
                f"{label:<38} {out['devices']:>5} {out['layers']:>6} {fid:>8} "
                f"{out['step_time_s']:>10.4f} {out['wall_s']:>8.2f} {out['cpu_s']:>8.2f} "
                f"{out['engine_s']:>8.3f} "
                f"{out['events']:>9,} "
                f"{rate:>9,.0f} {out['peak_memory_bytes'] / 2**30:>8.2f}",
                flush=True,
            )
            if len(runs) > 1:
                walls = sorted(r["wall_s"] for r in runs)
                print(f"{'':<38} median of {len(runs)} runs; wall {walls[0]:.2f}-{walls[-1]:.2f} s")
    full = not args.only and args.fidelity == "both"
    csv_path = args.csv or (str(ROOT / "benchmarks" / "results.csv") if full else None)
    if csv_path is None or not rows:
        return 0
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
