"""``moesim calibrate``: measure this host as a moesim device (numpy on the CPU).

GEMM FLOP/s over a few shapes (peak and the small-GEMM half-efficiency rows
``gemm_m_half``), memory bandwidth of streaming numpy kernels, the fixed cost of one numpy
call, and a shared-memory "link" between two OS processes. Writes ``devices.yaml`` and
``links.yaml`` in the catalog format, every number's source saying how it was measured.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import yaml

F32 = np.float32
GEMM_SHAPES = [
    (m, k, n) for m in (8, 32, 128, 512) for k, n in ((128, 512), (512, 1024), (2048, 512))
] + [(1024, 1024, 2048)]


def median_time_s(fn: Callable[[], object], repeats: int = 7, min_sample_s: float = 2e-3) -> float:
    """Median seconds per call: each sample loops until it lasts ``min_sample_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    loops = max(1, int(min_sample_s / once))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t0) / loops)
    return float(np.median(samples))


def measure_gemms(
    shapes=GEMM_SHAPES, seed: int = 0, pool_bytes: int = 192_000_000
) -> list[tuple[int, int, int, float]]:
    """Seconds per float32 GEMM, with the weight operand cold: each call multiplies by the next
    of enough distinct ``k x n`` matrices to overflow the caches (as MoE experts' weights are,
    one expert after another)."""
    rng = np.random.default_rng(seed)
    out = []
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=F32)
        copies = int(min(64, max(2, pool_bytes // (4 * k * n))))
        bs = [rng.standard_normal((k, n), dtype=F32) for _ in range(copies)]
        state = {"i": 0}

        def call(a=a, bs=bs, state=state):
            state["i"] = (state["i"] + 1) % len(bs)
            return a @ bs[state["i"]]

        out.append((m, k, n, median_time_s(call)))
        del bs
    return out


def measure_bandwidth_bytes_per_s(n: int = 8_000_000) -> float:
    """Streaming bandwidth of numpy kernels: the median of copy and multiply (bytes moved)."""
    x = np.ones(n, dtype=F32)
    y = np.ones(n, dtype=F32)
    z = np.empty(n, dtype=F32)
    copy = 2 * x.nbytes / median_time_s(lambda: np.copyto(z, x), repeats=5)
    mul = 3 * x.nbytes / median_time_s(lambda: np.multiply(x, y, out=z), repeats=5)
    return float(np.median([copy, mul]))


def measure_call_overhead_s() -> float:
    """Fixed cost of one small numpy kernel call (the median over a few kinds of call)."""
    a = np.ones((2, 2), dtype=F32)
    idx = np.array([1, 0])
    calls = [lambda: a @ a, lambda: np.exp(a), lambda: a[idx], lambda: a * a]
    return float(np.median([median_time_s(c, repeats=5) for c in calls]))


def fit_gemm(
    gemms: list[tuple[int, int, int, float]], bandwidth: float, launch_s: float
) -> tuple[float, float, float]:
    """Peak FLOP/s, ``gemm_m_half`` and ``gemm_k_half`` minimising the squared log error of
    ``max(flops / (peak m/(m+hm) k/(k+hk)), bytes / bandwidth) + launch`` over the shapes."""
    peak = max(2 * m * k * n / max(t - launch_s, 1e-9) for m, k, n, t in gemms)
    grid = np.concatenate([[0.0], np.geomspace(1, 2048, 48)])
    m_, k_, n_, t_ = (np.array(v, dtype=float) for v in zip(*gemms, strict=True))
    flops, nbytes = 2 * m_ * k_ * n_, 4 * (m_ * k_ + k_ * n_ + m_ * n_)
    best = (np.inf, 0.0, 0.0)
    for hm in grid:
        for hk in grid:
            eff = m_ / (m_ + hm) * k_ / (k_ + hk)
            pred = np.maximum(flops / (peak * eff), nbytes / bandwidth) + launch_s
            err = float(np.sum(np.log(pred / t_) ** 2))
            best = min(best, (err, float(hm), float(hk)))
    return float(peak), best[1], best[2]


def measure_gating_s_per_score(tokens: int = 2048, n_experts: int = 32, top_k: int = 2) -> float:
    """Seconds per (token, expert) score of numpy softmax + top-k + capacity drops."""
    from moesim.routing import gating

    logits = np.random.default_rng(0).standard_normal((tokens, n_experts), dtype=F32)
    cap = int(tokens * top_k / n_experts)

    def gate():
        experts, _ = gating.topk_gate(logits, top_k)
        gating.drop_over_capacity(experts, cap, n_experts)

    return median_time_s(gate) / (tokens * n_experts)


# -- shared-memory link between processes ----------------------------------------------------
def _shm_peer(name: str, nbytes: int, barrier, rounds: int) -> None:
    shm = shared_memory.SharedMemory(name=name)
    buf = np.ndarray((nbytes // 4,), dtype=F32, buffer=shm.buf)
    local = np.empty_like(buf[: nbytes // 8])
    for _ in range(rounds):
        barrier.wait()
        np.copyto(local, buf[: nbytes // 8])  # read what the other process wrote
        barrier.wait()
    del buf
    shm.close()


def measure_shm_link(nbytes: int = 64_000_000, rounds: int = 5) -> tuple[float, float]:
    """Bandwidth (bytes/s, one direction) and latency (s) of handing data between two OS
    processes through shared memory: one writes a block, a barrier, the other copies it out."""
    ctx = mp.get_context("spawn")
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        barrier = ctx.Barrier(2)
        peer = ctx.Process(target=_shm_peer, args=(shm.name, nbytes, barrier, rounds + 1))
        peer.start()
        buf = np.ndarray((nbytes // 4,), dtype=F32, buffer=shm.buf)
        src = np.ones(nbytes // 8, dtype=F32)
        times = []
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            np.copyto(buf[: nbytes // 8], src)
            barrier.wait()
            barrier.wait()
            times.append(time.perf_counter() - t0)
        peer.join()
        del buf
        small = []
        peer = ctx.Process(target=_shm_peer, args=(shm.name, 64, barrier, 21))
        peer.start()
        for _ in range(21):
            t0 = time.perf_counter()
            barrier.wait()
            barrier.wait()
            small.append(time.perf_counter() - t0)
        peer.join()
    finally:
        shm.close()
        shm.unlink()
    # one hand-off = write, barrier, read, barrier: the fixed part is two barriers
    latency = float(np.median(small[1:]))
    moved = nbytes // 2  # written once and read once
    bandwidth = moved / max(float(np.median(times[1:])) - latency, 1e-9)
    return float(bandwidth), latency


def calibrate(quick: bool = False) -> tuple[dict, dict]:
    """Measure the host; returns (devices.yaml mapping, links.yaml mapping). The device's
    ``measured_gemms`` (not a spec field) holds the GEMM timings for ``kernels.csv``."""
    when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    host = (
        f"{platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, numpy {np.__version__})"
    )
    launch = measure_call_overhead_s()
    bandwidth = measure_bandwidth_bytes_per_s()
    gemms = measure_gemms(GEMM_SHAPES, pool_bytes=64_000_000 if quick else 192_000_000)
    peak, m_half, k_half = fit_gemm(gemms, bandwidth, launch)
    gating_s = measure_gating_s_per_score()
    shm_bw, shm_lat = measure_shm_link(16_000_000 if quick else 64_000_000)
    src = f"measured by moesim calibrate on {host} at {when}"
    try:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        mem = 16e9
    device = {
        "type": "cpu",
        "description": f"this host, numpy float32 ({host})",
        "memory_bytes": mem,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "peak_flops_per_s": {"fp32": peak},
        "compute_efficiency": 1.0,
        "memory_efficiency": 1.0,
        "kernel_launch_s": launch,
        "gemm_m_half": m_half,
        "gemm_k_half": k_half,
        "fused_elementwise": False,
        "gating_s_per_score": gating_s,
        "grouped_experts": False,
        "intra_node_link": "host-shm",
        "intra_node_topology": "bus",
        "sources": {
            "memory_bytes": f"{src}: physical memory (sysconf)",
            "memory_bandwidth_bytes_per_s": f"{src}: median of np.copyto and np.multiply "
            "bytes moved per second",
            "peak_flops_per_s": f"{src}: best float32 matmul FLOP/s over {len(gemms)} shapes",
            "compute_efficiency": "1.0: the peak is already the measured achieved rate",
            "memory_efficiency": "1.0: the bandwidth is already the measured achieved rate",
            "kernel_launch_s": f"{src}: median cost of a tiny numpy call",
            "gemm_m_half": f"{src}: least-squares fit of GEMM efficiency m/(m+hm) k/(k+hk)",
            "gemm_k_half": f"{src}: the same fit",
            "gating_s_per_score": f"{src}: numpy top-2 gate and capacity drop on 2048 x 32 scores",
            "intra_node_link": "measured shared-memory hand-off between processes",
            "intra_node_topology": "processes share one memory system: every transfer crosses "
            "one shared bus link",
        },
    }
    link = {
        "description": "shared memory between two OS processes on this host",
        "bandwidth_bytes_per_s": shm_bw,
        "latency_s": shm_lat,
        "sources": {
            "bandwidth_bytes_per_s": f"{src}: write then read of a shared-memory block",
            "latency_s": f"{src}: a two-barrier hand-off between processes (no data)",
        },
    }
    device["measured_gemms"] = [
        {"op": "gemm", "m": m, "k": k, "n": n, "dtype": "fp32", "seconds": t}
        for m, k, n, t in gemms
    ]
    return {"host-cpu": device}, {"host-shm": link}


def write_calibration(out: Path, devices: dict, links: dict) -> None:
    """Write ``devices.yaml``, ``links.yaml`` and the measured GEMMs as ``kernels.csv`` (the
    kernel-table format); the device points at the table by absolute path."""
    import pandas as pd

    from moesim.cost.kernels import COLUMNS

    out.mkdir(parents=True, exist_ok=True)
    devices = {name: dict(entry) for name, entry in devices.items()}
    for entry in devices.values():
        rows = entry.pop("measured_gemms", None)
        if rows:
            table = out / "kernels.csv"
            pd.DataFrame(rows, columns=COLUMNS).to_csv(table, index=False)
            entry["kernel_table"] = str(table.resolve())
            entry["sources"]["kernel_table"] = "GEMMs timed by moesim calibrate (cold weights)"
    header = "# written by `moesim calibrate`; catalog format (see moesim/catalog/)\n"
    (out / "devices.yaml").write_text(header + yaml.safe_dump(devices, sort_keys=False))
    (out / "links.yaml").write_text(header + yaml.safe_dump(links, sort_keys=False))
