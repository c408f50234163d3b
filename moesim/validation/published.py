"""Predict published kernel measurements (``moesim/catalog/measurements/*.csv``) with the
catalog's cost model, and report the error per kind (GEMM, grouped GEMM, attention, collective).

Each row is predicted from the device and link entries alone, the way a simulation would cost
it: GEMMs and attention cores through :func:`moesim.cost.roofline.kernel_time_s` with no launch
(the published figures time kernels, not calls), collectives as the traffic of
:mod:`moesim.plan.collectives` on a DGX H100 topology timed by the analytic bottleneck

    t = max over links (bytes on link / link bandwidth) + latency steps x longest path latency

(the bound the analytic engine uses). The error of a row is ``predicted_s / measured_s - 1``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from moesim import catalog
from moesim.catalog.specs import DTYPE_BYTES
from moesim.config.scenario import Scenario, scenario_from_dict
from moesim.cost.ops import OpCost, softmax_core_op
from moesim.cost.roofline import op_time_s
from moesim.network.fluid import link_loads
from moesim.network.topology import Topology, build_topology
from moesim.plan import collectives
from moesim.plan.types import Traffic

KINDS = ("gemm", "grouped_gemm", "attention", "collective")
TARGET_MEDIAN, TARGET_P90 = 0.10, 0.25
"""Issue 17's targets for |error| per kind."""

OUTPUT_BYTES = 2.0
"""DeepGEMM writes its FP8 GEMM results in BF16 (README: ``gemm_fp8_fp8_bf16_nt``)."""

COLUMNS = ["kind", "case", "source", "measured_s", "predicted_s", "rel_error"]


def measurement_files() -> list[Path]:
    """The shipped CSVs, sorted by name."""
    folder = Path(str(resources.files("moesim.catalog").joinpath("measurements")))
    return sorted(folder.glob("*.csv"))


def _gemm_s(device: str, m: float, n: float, k: float, dtype: str, groups: int) -> float:
    """``groups`` GEMMs of ``m x k`` by ``k x n`` launched as one kernel (a grouped GEMM
    runs its groups side by side, each with its own tiles)."""
    spec = catalog.device(device)
    a = DTYPE_BYTES[dtype]
    op = OpCost(
        "gemm",
        2.0 * m * k * n,
        k * n * a + m * k * a + m * n * OUTPUT_BYTES,
        kernels=0,
        rows=m,
        inner=float(k),
        gemm=(float(k), float(n)),
    )
    return groups * float(op_time_s(spec, op, dtype, launches=False))


def _attention_s(row: pd.Series) -> tuple[float, float]:
    """(predicted, measured) seconds of a FlashAttention forward row: ``4 b s L h hd`` FLOPs
    with ``L = s`` keys per query, ``(s + 1) / 2`` when causal."""
    s, b, h, hd = float(row.seqlen), float(row.batch), float(row.heads), float(row.head_dim)
    causal = str(row.causal).lower() == "true"
    keys = (s + 1) / 2 if causal else s
    a = DTYPE_BYTES[row["dtype"]]
    op = softmax_core_op(b, s, keys, s, h, h, hd, a, a)
    predicted = float(op_time_s(catalog.device(row.device), op, row["dtype"], launches=False))
    published_flops = 4.0 * b * s * s * h * hd / (2.0 if causal else 1.0)
    return predicted, published_flops / (float(row.tflops) * 1e12)


def _mla_decode_s(row: pd.Series) -> tuple[float, float]:
    """(predicted, measured) seconds of a FlashMLA decode row, absorbed MLA as the simulator
    costs it (:func:`moesim.cost.ops.attention_ops`, ``s == 1`` branch): ``2 b s_q h s_k (d_k +
    d_v)`` FLOPs reading ``2 b (s_k d_k + s_q h (d_k + d_v))`` bytes (FlashMLA deep-dive blog);
    the published figure is TFLOP/s (compute-bound rows) or GB/s (memory-bound rows)."""
    b, sq, h = float(row.batch), float(row.seqlen_q), float(row.heads)
    sk, dk, dv = float(row.seqlen_k), float(row.head_dim_k), float(row.head_dim_v)
    a = DTYPE_BYTES[row["dtype"]]
    flops = 2.0 * b * sq * h * sk * (dk + dv)
    nbytes = a * b * (sk * dk + sq * h * (dk + dv))
    op = OpCost("attention_core", flops, nbytes, attention=(sk, dk))
    predicted = float(op_time_s(catalog.device(row.device), op, row["dtype"], launches=False))
    if pd.notna(row.get("tflops")) and str(row.get("tflops")) != "":
        return predicted, flops / (float(row.tflops) * 1e12)
    return predicted, nbytes / (float(row.gbps) * 1e9)


@cache
def dgx_h100(nodes: int, gpus_per_node: int) -> tuple[Scenario, Topology]:
    """A DGX H100 cluster as the catalog describes it: NVSwitch inside a node, one NDR NIC per
    GPU on rail-optimised leaf switches."""
    sc = scenario_from_dict(
        {
            "model": "mixtral-8x7b",
            "cluster": {"nodes": nodes, "devices_per_node": gpus_per_node, "device": "h100-sxm"},
            "topology": {"inter_node_link": "ib-ndr-400", "nic_host_link": "pcie5-x16"},
            "workload": {"phase": "prefill", "batch_size": nodes * gpus_per_node, "seq_len": 1},
            "sim": {"progress": False},
        }
    )
    return sc, build_topology(sc.cluster, sc.topology)


def collective_traffic(collective: str, n: int, size_bytes: float) -> Traffic:
    """The flows of one nccl-tests collective over ranks ``0..n-1`` (``size_bytes`` as
    nccl-tests counts it: the whole buffer; all-to-all: ``size / n`` to every other rank)."""
    groups = np.arange(n)[None, :]
    if collective == "all_reduce":
        return collectives.ring_allreduce(groups, size_bytes)
    if collective == "all_gather":
        return collectives.ring_allgather(groups, size_bytes)
    if collective == "reduce_scatter":
        return collectives.ring_reduce_scatter(groups, size_bytes)
    if collective == "all_to_all":
        src, dst = np.divmod(np.arange(n * n), n)
        keep = src != dst
        return Traffic(src[keep], dst[keep], np.full(int(keep.sum()), size_bytes / n))
    raise ValueError(f"unknown collective {collective!r}")


def bottleneck_s(topology: Topology, traffic: Traffic) -> float:
    """Analytic time of ``traffic``: its busiest link's bytes over that link's bandwidth, plus
    ``latency_steps`` times the longest path latency."""
    paths = topology.routes(traffic.src, traffic.dst)
    loads = link_loads(paths, traffic.nbytes, topology.n_links)
    busy = float((loads / topology.bandwidth_bytes_per_s).max())
    longest = float(topology.path_latency_s(paths).max())
    return busy + float(
        topology.collective_latency_s(np.array([longest]), traffic.latency_steps)[0]
    )


BUS_FACTOR = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "all_to_all": 1.0}
"""nccl-tests PERFORMANCE.md: busbw = algbw x factor x (n - 1) / n."""


def _collective_s(row: pd.Series) -> tuple[float, float]:
    nodes, per_node = int(row.nodes), int(row.gpus_per_node)
    n = nodes * per_node
    _, topo = dgx_h100(nodes, per_node)
    size = float(row.size_bytes)
    predicted = bottleneck_s(topo, collective_traffic(row.collective, n, size))
    if "time_us" in row.index and pd.notna(row.get("time_us")):
        return predicted, float(row.time_us) * 1e-6
    algbw = float(row.busbw_gbps) * 1e9 / (BUS_FACTOR[row.collective] * (n - 1) / n)
    return predicted, size / algbw


def _case(row: pd.Series) -> str:
    if row.kind == "collective":
        size = float(row.size_bytes)
        scaled = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**10:g} KiB"
        if 2**20 <= size < 2**30:
            scaled = f"{size / 2**20:g} MiB"
        return f"{row.collective} {row.nodes}x{row.gpus_per_node} {scaled}"
    if row.kind == "attention" and str(row.kernel).startswith("flashmla"):
        return f"{row.kernel} h_q={row.heads} s_q={row.seqlen_q} s_k={row.seqlen_k}"
    if row.kind == "attention":
        mask = "causal" if str(row.causal).lower() == "true" else "full"
        return f"{row.kernel} s={row.seqlen} hd={row.head_dim} {mask}"
    return f"{row.layout} {row.groups}x {row.m}x{row.n}x{row.k} {row['dtype']}"


def predict_row(row: pd.Series) -> tuple[float, float]:
    """(predicted, measured) seconds of one published row."""
    if row.kind in ("gemm", "grouped_gemm"):
        g = int(row.groups)
        predicted = _gemm_s(row.device, row.m, row.n, row.k, row["dtype"], g)
        return predicted, 2.0 * row.m * row.n * row.k * g / (float(row.tflops) * 1e12)
    if row.kind == "attention" and str(row.kernel).startswith("flashmla"):
        return _mla_decode_s(row)
    if row.kind == "attention":
        return _attention_s(row)
    if row.kind == "collective":
        return _collective_s(row)
    raise ValueError(f"unknown kind {row.kind!r}")


def run_published(files: list[Path] | None = None) -> pd.DataFrame:
    """One row per published measurement: kind, case, source, measured and predicted
    seconds and the relative error."""
    out = []
    for path in files or measurement_files():
        for _, row in pd.read_csv(path).iterrows():
            predicted, measured = predict_row(row)
            out.append(
                {
                    "kind": row.kind,
                    "case": _case(row),
                    "source": row.source,
                    "measured_s": measured,
                    "predicted_s": predicted,
                    "rel_error": predicted / measured - 1.0,
                }
            )
    return pd.DataFrame(out, columns=COLUMNS)


SHIPPED_TABLE = "h100-sxm-bf16.csv"
"""The measured H100 table shipped in moesim/catalog/kernels/ (one eager PyTorch call a row)."""


def shipped_table_errors(device: str = "h100-sxm") -> pd.DataFrame:
    """Median and max |error| over m of every (k, n) GEMM shape of the shipped H100 table,
    predicted as one isolated eager call (``kernel_time_s(..., isolated=True)``: the host
    dispatch adds, as it does between the table's two CUDA events)."""
    from moesim.config.tables import resolve_kernel_table as resolve_table
    from moesim.cost.roofline import kernel_time_s

    spec = catalog.device(device)
    table = pd.read_csv(resolve_table(SHIPPED_TABLE))
    err = []
    for r in table.itertuples():
        flops = 2.0 * r.m * r.k * r.n
        nbytes = 2.0 * (r.k * r.n + r.m * (r.k + r.n))
        t = kernel_time_s(spec, flops, nbytes, "bf16", 1, float(r.m), r.k, r.n, isolated=True)
        err.append(abs(float(t) / r.seconds - 1.0))
    table["abs_error"] = err
    grouped = table.groupby(["k", "n"])["abs_error"]
    return pd.DataFrame({"median": grouped.median(), "max": grouped.max()}).reset_index()


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median and p90 of |error| per kind, the row count, and whether both meet the targets."""
    rows = []
    for kind in KINDS:
        err = df.loc[df["kind"] == kind, "rel_error"].abs()
        if err.empty:
            continue
        med, p90 = float(err.median()), float(err.quantile(0.9))
        ok = med <= TARGET_MEDIAN and p90 <= TARGET_P90
        rows.append({"kind": kind, "rows": len(err), "median": med, "p90": p90, "meets": ok})
    return pd.DataFrame(rows, columns=["kind", "rows", "median", "p90", "meets"])


def print_published(out: Path) -> int:
    """Run :func:`run_published`, write ``out/published.csv`` and ``out/published.png``, print
    the per-kind table; 0 when every kind meets the targets, else 1."""
    from moesim.report.published_plots import plot_published

    df = run_published()
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "published.csv", index=False)
    fig = plot_published(df)
    fig.savefig(out / "published.png", dpi=120)
    table = error_table(df)
    print(f"{'kind':<14} {'rows':>4} {'median':>8} {'p90':>8}  target median <= 10%, p90 <= 25%")
    for r in table.itertuples():
        verdict = "meets" if r.meets else "MISSES"
        print(f"{r.kind:<14} {r.rows:>4} {r.median:>8.1%} {r.p90:>8.1%}  {verdict}")
    print(f"shipped H100 bf16 table ({SHIPPED_TABLE}), per GEMM shape over m = 1..8192:")
    for r in shipped_table_errors().itertuples():
        print(f"  {r.k:>6} x {r.n:<6} median |error| {r.median:6.1%}, max {r.max:6.1%}")
    print(f"wrote             {out}/published.csv published.png")
    return 0 if bool(table["meets"].all()) else 1
