#!/usr/bin/env python3
"""Simulator speed: run a fixed set of scenarios and print a table (no assertions).

    python benchmarks/run.py --targets            # the speed targets, each with a same-run ratio
    python benchmarks/run.py --targets --quick    # the targets without the 2,048-GPU DES runs
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

``--targets`` times the screening and start-up targets instead (see TARGETS): analytic points
in-process, a serving point (2,000 requests, iteration grid already timed) in-process, whole
``moesim run`` processes as a user runs them (progress on; the 256-GPU prefill also with
``--out``, which records the timelines and writes trace.json), the discrete-event runs;
and, in the same run, a fixed reference workload (one million simpy timeouts; a fixed numpy
kernel), so that every row also reads as a ratio to the reference (``x_simpy``: seconds over
the simpy reference's seconds, timed again just before and after the row), which moves far
less than seconds from one machine to the next. The load average is printed with each row.
Written to benchmarks/targets.csv with --csv.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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
            "network_kernels": s["sim"].get("network_kernels", ""),
        }
    )


def reference_simpy_s(n: int = 1_000_000) -> float:
    """Seconds for ``n`` simpy timeouts in one process (pure-Python event loop work)."""
    import simpy

    env = simpy.Environment()

    def ticker(env):
        for _ in range(n):
            yield env.timeout(1.0)

    env.process(ticker(env))
    start = time.perf_counter()
    env.run()
    return time.perf_counter() - start


BRACKET_TIMEOUTS = 300_000
"""simpy timeouts timed just before and just after each target row: the mean of the two,
scaled to a million, is the reference the row's ``x_simpy`` divides by (the machine's speed
drifts over minutes, so a reference timed at the start of the run would not be the one the
row ran at)."""


def _bracket_simpy_s() -> float:
    """The simpy reference, one million timeouts' worth, from :data:`BRACKET_TIMEOUTS`."""
    return reference_simpy_s(BRACKET_TIMEOUTS) * (1_000_000 / BRACKET_TIMEOUTS)


def reference_numpy_s() -> float:
    """Seconds for a fixed numpy kernel: 20 sorts of 2^20 float64 (seeded) and 20 float64
    matrix-vector products of 2,048 x 2,048 (memory-bound, one thread's worth of work)."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.random(1 << 20)
    mat, vec = rng.random((2048, 2048)), rng.random(2048)
    start = time.perf_counter()
    for _ in range(20):
        np.sort(data)
        mat @ vec
    return time.perf_counter() - start


def _load() -> float:
    return os.getloadavg()[0]


def _analytic_points(path: str, overrides: dict, points: int, min_s: float = 1.0) -> float:
    """Median seconds of ``simulate`` on an analytic scenario loaded once, as a screening loop
    calls it (no trace; plan, routing with expected counts, engine, summary; the tables are
    never built): at least ``points`` calls, and more until ``min_s`` seconds have gone (at
    most 50 x ``points``), so that a short slow spell of the machine moves the median of a
    few-millisecond point no more than that of a long one."""
    import moesim
    from moesim.network.fluid import warm_up

    warm_up()
    sc = moesim.load_scenario(
        path, {**overrides, "sim.fidelity": "analytic", "sim.progress": False, "sim.trace": False}
    )
    moesim.simulate(sc)  # first call: kernels, caches
    times: list[float] = []
    while len(times) < points or (sum(times) < min_s and len(times) < 50 * points):
        start = time.perf_counter()
        moesim.simulate(sc)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _serving_point_s(path: str, repeat: int = 3) -> float:
    """Median wall seconds of one serving point (its request stream through the scheduler)
    once the iteration grid is timed, as every point of a sweep after the first finds it."""
    import moesim

    sc = moesim.load_scenario(path, {"sim.progress": False, "sim.trace": False})
    moesim.simulate(sc)  # times (or loads) the iteration grid
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        moesim.simulate(sc)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _user_env() -> dict[str, str]:
    """The environment with Python's bytecode cache on, as on a user's machine (a development
    shell that sets PYTHONDONTWRITEBYTECODE recompiles every moesim module in each process)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _process_s(args: list[str], repeat: int) -> float:
    """Median wall seconds of a whole ``python -m moesim ...`` process, bytecode cached
    (``compileall`` first writes what is missing, as a user's first import would)."""
    env = _user_env()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "moesim"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "moesim", *args],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _des_in_process(path: str, overrides: dict) -> tuple[float, str]:
    """Wall seconds of one discrete-event ``simulate`` (kernels warmed, no trace, no
    progress), in a fresh process, and the network kernels it ran."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(path, overrides, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out["wall_s"], out["network_kernels"]


S = str(ROOT / "scenarios")
TARGET_SIMPY_S = 1.3
"""Seconds of the simpy reference (one million timeouts) on the quiet machine the targets were
set on (issue 18). ``target_x = target_s / TARGET_SIMPY_S`` is a target as a ratio to the
reference, which holds on a machine that runs Python faster or slower: a row meets it when
its ``x_simpy`` is at most ``target_x``."""

TARGETS = [
    # row, how it is timed, scenario, target seconds (None: none)
    ("analytic point: mixtral-8x7b decode", "point", f"{S}/mixtral-8x7b-8xh100-decode.yaml", 0.010),
    (
        "analytic point: deepseek-v3 256 prefill",
        "point",
        f"{S}/deepseek-v3-256xh800-prefill.yaml",
        0.050,
    ),
    (
        "analytic point: deepseek-v3 2048 prefill",
        "point",
        f"{S}/deepseek-v3-2048xh800-prefill.yaml",
        0.5,
    ),
    ("process: moesim --version", "version", "", 0.3),
    ("serving sweep point", "serving", f"{S}/mixtral-8x7b-8xh100-serve.yaml", 1.0),
    (
        "process: moesim run mixtral-8x7b decode",
        "process",
        f"{S}/mixtral-8x7b-8xh100-decode.yaml",
        1.0,
    ),
    (
        "des: deepseek-v3 64 decode (node-limited)",
        "des",
        f"{S}/deepseek-v3-64xh800-decode.yaml",
        10.0,
    ),
    (
        "process: moesim run deepseek-v3 256 prefill",
        "process",
        f"{S}/deepseek-v3-256xh800-prefill.yaml",
        5.0,
    ),
    (
        "process: moesim run deepseek-v3 256 prefill --out",
        "process-out",
        f"{S}/deepseek-v3-256xh800-prefill.yaml",
        5.0,
    ),
    ("des: deepseek-v3 256 prefill", "des", f"{S}/deepseek-v3-256xh800-prefill.yaml", None),
    ("des: deepseek-v3 2048 decode", "des", f"{S}/deepseek-v3-2048xh800-decode.yaml", 30.0),
    (
        "process: moesim run deepseek-v3 2048 prefill",
        "process",
        f"{S}/deepseek-v3-2048xh800-prefill.yaml",
        60.0,
    ),
    (
        "process: moesim sweep 1,000 deepseek-v3 layouts",
        "sweep",
        f"{S}/sweeps/deepseek-v3-layouts.yaml",
        60.0,
    ),
]


def targets(quick: bool, points: int, csv_path: str | None, runs: int = 1) -> int:
    """Time TARGETS and the reference workload ``runs`` times, printing each run as it goes
    (:func:`_target_run`); after several, each row's median seconds and median ``x_simpy``
    with every run's seconds beside them. The CSV holds the single run, or the medians."""
    every = []
    for k in range(runs):
        if runs > 1:
            print(f"run {k + 1} of {runs}", flush=True)
        every.append(_target_run(quick, points))
    rows = every[0] if runs == 1 else _median_rows(every)
    if runs > 1:
        print(f"median of {runs} runs")
        print(
            f"{'row':<48} {'seconds':>9} {'x_simpy':>8} {'target_s':>8} {'target_x':>8} "
            f"{'met':>4}  runs (seconds)"
        )
        for row in rows:
            _verdict(row)
            print(
                f"{row['row']:<48} {row['seconds']:>9.4f} {row['x_simpy']:>8.3f} "
                f"{_target_cells(row)}  {row['runs']}  {row.get('kernels', '')}".rstrip()
            )
    if csv_path:
        fields = [
            "row", "seconds", "x_simpy", "ref_s", "target_s", "target_x", "met", "load", "kernels"
        ]  # fmt: skip
        with open(csv_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields + (["runs"] if runs > 1 else []))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {csv_path}")
    return 0


def _verdict(row: dict) -> None:
    """``target_x`` and ``met`` of a row: ``s`` where its seconds meet ``target_s``, ``x``
    where its ratio meets ``target_x``, ``sx`` for both, ``-`` for neither (blank: no
    target)."""
    if row["target_s"] is None:
        row["target_x"], row["met"] = None, ""
        return
    row["target_x"] = row["target_s"] / TARGET_SIMPY_S
    met = ("s" if row["seconds"] <= row["target_s"] else "") + (
        "x" if row["x_simpy"] <= row["target_x"] else ""
    )
    row["met"] = met or "-"


def _target_cells(row: dict) -> str:
    """The ``target_s``, ``target_x`` and ``met`` cells of a printed row."""
    if row["target_s"] is None:
        return f"{'':>8} {'':>8} {'':>4}"
    return f"{row['target_s']:>8g} {row['target_x']:>8.3f} {row['met']:>4}"


def _median_rows(every: list[list[dict]]) -> list[dict]:
    """Per row of several runs: the median seconds, the median ``x_simpy`` (each run's own
    ratio), the highest load, and every run's seconds (``runs``)."""
    out = []
    for same in zip(*every, strict=True):
        seconds = [r["seconds"] for r in same]
        digits = 4 if max(seconds) < 1 else 2
        out.append(
            {
                **same[0],
                "seconds": statistics.median(seconds),
                "x_simpy": statistics.median(r["x_simpy"] for r in same),
                "ref_s": statistics.median(r["ref_s"] for r in same),
                "load": max(r["load"] for r in same),
                "runs": ", ".join(f"{s:.{digits}f}" for s in seconds),
            }
        )
    return out


def _target_run(quick: bool, points: int) -> list[dict]:
    """One run of TARGETS after the reference workload; prints seconds, the ratio to the
    simpy reference and the load average next to each row as it finishes."""
    ref = reference_simpy_s()
    ref_np = reference_numpy_s()
    rows = [
        {"row": "reference: 1e6 simpy timeouts", "seconds": ref, "target_s": None},
        {"row": "reference: numpy kernel", "seconds": ref_np, "target_s": None},
    ]
    print(
        f"{'row':<48} {'seconds':>9} {'x_simpy':>8} {'target_s':>8} {'target_x':>8} {'met':>4} "
        f"{'load':>5}  kernels"
    )

    def show(row: dict, ref_s: float) -> None:
        row["ref_s"] = ref_s
        row["x_simpy"] = row["seconds"] / ref_s
        row["load"] = _load()
        _verdict(row)
        print(
            f"{row['row']:<48} {row['seconds']:>9.4f} {row['x_simpy']:>8.3f} "
            f"{_target_cells(row)} {row['load']:>5.1f}  {row.get('kernels', '')}".rstrip(),
            flush=True,
        )

    for row in rows:
        show(row, ref)
    for name, how, path, target in TARGETS:
        if quick and (("2048" in name and how != "point") or how == "sweep"):
            continue
        before_s = _bracket_simpy_s()
        if how == "point":
            seconds = _analytic_points(path, {}, points)
        elif how == "serving":
            seconds = _serving_point_s(path)
        elif how == "version":
            seconds = _process_s(["--version"], 5)
        elif how == "process":
            seconds = _process_s(["run", path], 3 if "mixtral" in path else 1)
        elif how == "process-out":  # every output written, trace.json with its timelines
            with tempfile.TemporaryDirectory() as out:
                seconds = _process_s(["run", path, "--out", f"{out}/run"], 1)
        elif how == "sweep":  # a fresh folder (nothing to resume); two layouts do not fit
            with tempfile.TemporaryDirectory() as out:
                seconds = _process_s(["sweep", path, "--out", out, "--allow-failures"], 1)
        kernels = ""
        if how == "des":
            seconds, kernels = _des_in_process(path, {"sim.fidelity": "des"})
        row = {"row": name, "seconds": seconds, "target_s": target, "kernels": kernels}
        show(row, (before_s + _bracket_simpy_s()) / 2)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", action="store_true", help="time the speed targets (see TARGETS)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="--targets without the 2,048-GPU runs and the 1,000-point sweep",
    )
    p.add_argument(
        "--points",
        type=int,
        default=20,
        help="--targets: analytic points timed each, at least (more until 1 s has gone)",
    )
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
        "run with the median wall time (this VM's timings move 5-20%% between runs); with "
        "--targets, run the whole set this many times and print each row's median",
    )
    p.add_argument(
        "--csv",
        help="where to write the table (default benchmarks/results.csv for a full run; a run "
        "narrowed with --only or --fidelity writes a CSV only when this is given)",
    )
    args = p.parse_args()
    if args.targets:
        return targets(args.quick, args.points, args.csv, args.repeat)
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
