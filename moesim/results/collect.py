"""Results of a run: a summary mapping and tidy DataFrames, built after the engine stops."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.config.resolve import resolve
from moesim.engine.analytic import AnalyticEngine
from moesim.engine.des import Engine
from moesim.network.fluid import IntervalLog
from moesim.plan.graph import (
    COMM_PHASES,
    COMPUTE_PHASES,
    TRAIN_COMM_PHASES,
    TRAIN_COMPUTE_PHASES,
)
from moesim.plan.pim_placement import pim_summary
from moesim.plan.tiers import tiers_summary
from moesim.plan.types import WorkloadPlan
from moesim.results.energy import add_energy
from moesim.results.mfu import mfu

if TYPE_CHECKING:
    import pandas as pd

BREAKDOWN_KEYS = (
    "attention",
    "tp_comm",
    "router",
    "permute",
    "shared_experts",
    "dispatch",
    "experts",
    "pim",
    "combine",
    "unpermute",
    "dense_ffn",
    "lm_head",
    "pipeline",
)
NETWORK_PHASES = tuple(p for p in COMM_PHASES if p != "pipeline")  # pipeline: other stages
TRAIN_BREAKDOWN_KEYS = TRAIN_COMPUTE_PHASES + TRAIN_COMM_PHASES


class Result:
    """What ``simulate`` returns: ``summary`` (JSON-ready, built with the run), the ``devices``
    and ``links`` tables, ``routing`` (one row per MoE layer), ``expert_load`` and the
    timelines behind ``trace.json``.

    Each table is a pandas DataFrame built on first access from the arrays the run left (a
    table given as a DataFrame is kept as it is), so a caller that reads only ``summary`` (a
    sweep point, a capacity search) never builds one, nor imports pandas."""

    TABLES = ("devices", "links", "routing", "expert_load")

    def __init__(
        self,
        summary: dict[str, Any],
        devices: pd.DataFrame | Callable[[], pd.DataFrame],
        links: pd.DataFrame | Callable[[], pd.DataFrame],
        routing: pd.DataFrame | Callable[[], pd.DataFrame],
        expert_load: pd.DataFrame | Callable[[], pd.DataFrame] | None = None,
        slices: list[tuple[int, str, float, float, int]] | None = None,
        link_intervals: IntervalLog | list[tuple[int, float, float]] | None = None,
        pim_slices: list[tuple[int, str, float, float, int]] | None = None,
    ) -> None:
        self.summary = summary
        self._tables: dict[str, Any] = {
            "devices": devices,
            "links": links,
            "routing": routing,
            "expert_load": expert_load if expert_load is not None else _empty_table,
        }
        self.slices = slices if slices is not None else []
        if not isinstance(link_intervals, IntervalLog):
            link_intervals = IntervalLog.of(link_intervals or [])
        self.link_intervals = link_intervals  # (link, start_s, end_s), iterated as tuples
        self.pim_slices = pim_slices if pim_slices is not None else []

    def _table(self, name: str) -> pd.DataFrame:
        table = self._tables[name]
        if callable(table):
            table = self._tables[name] = table()
        return table

    @property
    def built(self) -> tuple[str, ...]:
        """The tables built so far (for tests and profiling)."""
        return tuple(k for k, v in self._tables.items() if not callable(v))

    devices = property(lambda self: self._table("devices"), doc="One row per device.")
    links = property(lambda self: self._table("links"), doc="One row per link.")
    routing = property(lambda self: self._table("routing"), doc="One row per MoE layer.")
    expert_load = property(
        lambda self: self._table("expert_load"),
        doc="Tokens per (MoE layer, expert-data-parallel group, expert).",
    )

    def write_csv(self, name: str, path: Path) -> None:
        """``self.<name>.to_csv(path, index=False)``: the same bytes, written from the run's
        columns without building the DataFrame (nor importing pandas) where they allow."""
        table = self._tables[name]
        if not (isinstance(table, _Frame) and table.write_csv(path)):
            self._table(name).to_csv(path, index=False)

    def column(self, name: str, column: str) -> list:
        """``list(self.<name>[column])``, from the run's columns where the table is not built."""
        table = self._tables[name]
        values = table.column(column) if isinstance(table, _Frame) else None
        return values if values is not None else list(self._table(name)[column])

    @property
    def step_time_s(self) -> float:
        return float(self.summary["step_time_s"])


def _empty_table() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame()


class _Frame:
    """A builder of the DataFrame of ``data`` (columns by name, or rows), for :class:`Result`,
    that can also write the table's CSV without building it (:meth:`write_csv`)."""

    def __init__(self, data: dict[str, Any] | list[dict[str, Any]] | Callable[[], Any]) -> None:
        self._make = data if callable(data) else None
        self._data = None if callable(data) else data

    @property
    def data(self) -> Any:
        """The columns or rows (``data()`` on first use where a function was given: it may
        return a DataFrame builder instead)."""
        if self._make is not None:
            self._data, self._make = self._make(), None
        return self._data

    def __call__(self) -> pd.DataFrame:
        import pandas as pd

        data = self.data
        return data() if callable(data) else pd.DataFrame(data)

    def column(self, name: str) -> list | None:
        """Column ``name`` as a list, without pandas (None: not a plain column)."""
        data = self.data
        if isinstance(data, dict) and isinstance(data.get(name), list | np.ndarray):
            return list(data[name])
        return None

    def write_csv(self, path: Path) -> bool:
        """Write ``DataFrame(data).to_csv(path, index=False)``'s bytes without pandas; False
        (nothing written) where a column is not one this writer knows to format as pandas
        does."""
        data = self.data
        if isinstance(data, list):
            keys = list(data[0]) if data else []
            if not keys or any(list(row) != keys for row in data):
                return False
            data = {k: [row[k] for row in data] for k in keys}
        if not isinstance(data, dict):
            return False
        columns = [_csv_column(v) for v in data.values()]
        if not columns or any(c is None for c in columns):
            return False
        n = {len(c) for c in columns}
        if len(n) != 1:
            return False
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow([str(k) for k in data])
            writer.writerows(zip(*columns, strict=True))
        return True


def _csv_column(values: Any) -> list | None:
    """The cells ``DataFrame.to_csv`` writes for one column (``na_rep=""``, no float format):
    floats as numpy's ``astype(str)``, NaN empty, other numbers and strings as they are;
    None where the column is not a 1-D array or a list of plain numbers, bools or strings."""
    if isinstance(values, list):
        kinds = {type(v) for v in values}
        if not values:
            return None
        if kinds == {type(None)}:  # an object column of None: empty cells
            return [""] * len(values)
        if kinds <= {str}:
            return values
        if kinds <= {bool, np.bool_}:
            values = np.array(values, dtype=bool)
        elif kinds <= {int, np.int64}:
            if any(abs(v) >= 2**63 for v in values):
                return None
            values = np.array(values, dtype=np.int64)
        elif kinds <= {int, float, np.int64, np.float64, type(None)}:  # pandas: float64, NaN
            if any(type(v) in (int, np.int64) and abs(v) >= 2**53 for v in values):
                return None
            values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            return None
    if not isinstance(values, np.ndarray) or values.ndim != 1:
        return None
    if values.dtype.kind == "f":
        cells = values.astype(str).astype(object)
        cells[np.isnan(values)] = ""
        return cells.tolist()
    if values.dtype.kind in "biu":
        return values.tolist()
    return None


def _rows(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """The arrays as the rows of one 2-D array where they have one shape, else as given."""
    return np.stack(arrays) if len({a.shape for a in arrays}) == 1 else arrays


def _per_row(arrays: np.ndarray | list[np.ndarray], stat) -> np.ndarray:
    """``stat`` (a function of a 2-D array along its rows) of each row: all at once where
    they are (or stack into) one 2-D array, one by one otherwise."""
    rows = _rows(arrays) if isinstance(arrays, list) else arrays
    if isinstance(rows, np.ndarray):
        return stat(rows)
    return np.concatenate([stat(a[None, :]) for a in rows])


def _max_over_mean_rows(x: np.ndarray) -> np.ndarray:
    """:func:`moesim.routing.distributions.max_over_mean` of each row."""
    mean = x.mean(axis=1)
    return np.where(mean > 0, x.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def _cv_rows(x: np.ndarray) -> np.ndarray:
    """Coefficient of variation of each row (0 where its mean is 0)."""
    mean = x.mean(axis=1)
    return np.where(mean > 0, x.std(axis=1) / np.where(mean > 0, mean, 1.0), 0.0)


def _spread_rows(x: np.ndarray) -> np.ndarray:
    """Max minus mean of each row."""
    return x.max(axis=1) - x.mean(axis=1)


def routing_rows(plan: WorkloadPlan) -> list[dict[str, Any]]:
    """One row per MoE layer: load imbalance, drops and node crossings from the routing counts
    (each statistic over all the layers at once)."""
    moe = [lp for lp in plan.layers if lp.moe]
    if not moe:
        return []
    per_expert = _rows([lp.expert_load.sum(axis=0) for lp in moe])  # stacked once, for both
    mom = _per_row(per_expert, _max_over_mean_rows).tolist()
    cv = _per_row(per_expert, _cv_rows).tolist()
    # over the devices holding the layer's experts (its pipeline stage)
    held = [lp.device_tokens[lp.local_experts > 0] for lp in moe]
    device_mom = _per_row(held, _max_over_mean_rows).tolist()
    # seconds the slowest device's experts add over the average device's
    imbalance_s = _per_row([lp.compute_s["experts"] for lp in moe], _spread_rows).tolist()
    rows = []
    for k, lp in enumerate(moe):
        history = lp.balance_history
        rows.append(
            {
                "layer": lp.index,
                "max_over_mean_load": mom[k],
                "cv_load": cv[k],
                "device_max_over_mean_load": device_mom[k],
                "routed_pairs": lp.routed_pairs,
                "dropped_pairs": lp.dropped_pairs,
                "cross_node_pairs": lp.cross_node_pairs,
                "dispatch_bytes": lp.dispatch.total_bytes,
                "imbalance_s": imbalance_s[k],
                "balance_steps": len(history),
                "balance_first": float(history[0]) if len(history) else None,
                "balance_last": float(history[-1]) if len(history) else None,
            }
        )
    return rows


def routing_table(plan: WorkloadPlan) -> pd.DataFrame:
    """:func:`routing_rows` as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(routing_rows(plan))


def _routing_column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([row[key] for row in rows], dtype=float)


def collect(engine: Engine | AnalyticEngine) -> Result:
    """Summarise a finished engine run: the summary from numpy arrays, the tables deferred
    (:class:`Result`)."""
    plan, topo, rec, stats = engine.plan, engine.topology, engine.rec, engine.link_stats
    sc = plan.scenario
    step = float(rec.finish_s.max())
    n = topo.devices_per_node
    g = np.arange(plan.n_devices)
    names = [topo.device_name(i) for i in g]
    dev: dict[str, Any] = {"device": names, "node": g // n, "local_index": g % n}
    train_phases = TRAIN_COMPUTE_PHASES + TRAIN_COMM_PHASES
    for phase, seconds in rec.phase_s.items():
        if plan.train is None and phase in train_phases:
            continue  # training-only columns
        if phase == "expert_fetch" and sc.tiers is None:
            continue  # memory tiers only (moesim/plan/tiers.py)
        col = f"{phase}_s" if phase in COMPUTE_PHASES else f"{phase}_wait_s"
        dev[col] = np.asarray(seconds)
    compute_cols = [f"{p}_s" for p in COMPUTE_PHASES if f"{p}_s" in dev]
    dev["compute_busy_s"] = sum(
        (np.asarray(dev[c], dtype=float) for c in compute_cols), np.zeros(plan.n_devices)
    )
    dev["utilization"] = dev["compute_busy_s"] / step if step > 0 else np.zeros(plan.n_devices)
    passes = plan.pipeline.micro_batches if plan.pipeline and plan.train is None else 1
    flops = passes * sum(sum(lp.flops.values()) for lp in plan.layers)
    if plan.train is not None:  # every pass, backward and recomputation included
        flops = plan.train.executed_flops
    dev["flops"] = np.asarray(flops, dtype=float) * np.ones(plan.n_devices)
    dev["expert_tokens"] = passes * sum(
        (lp.device_tokens for lp in plan.layers if lp.moe), np.zeros(plan.n_devices, dtype=np.int64)
    )
    for kind, used in plan.memory_bytes.items():
        dev[f"{kind}_bytes"] = used
    dev["memory_used_bytes"] = plan.memory_used_bytes
    dev["finish_s"] = rec.finish_s

    bandwidth = np.asarray(topo.bandwidth_bytes_per_s, dtype=float)
    carried = np.asarray(stats.bytes_carried, dtype=float)
    links: dict[str, Any] = {
        "link": topo.link_names,
        "kind": topo.link_kinds,
        "bandwidth_bytes_per_s": topo.bandwidth_bytes_per_s,
        "latency_s": topo.latency_s,
        "bytes_carried": stats.bytes_carried,
        "busy_s": stats.busy_s,
    }
    links["utilization"] = carried / (bandwidth * step) if step > 0 else np.zeros(len(carried))
    routing = routing_rows(plan)
    energy = add_energy(plan, topo, dev, links, step)  # energy columns (moesim/energy.py)
    pim = pim_summary(plan, dev)  # PIM columns, None without PIM units (moesim/pim.py)
    tiers = tiers_summary(plan, dev)  # memory tiers, None without (moesim/plan/tiers.py)

    crit = int(np.argmax(rec.finish_s))
    keys = BREAKDOWN_KEYS + (TRAIN_BREAKDOWN_KEYS if plan.train is not None else ())
    keys += ("expert_fetch",) if sc.tiers is not None else ()
    breakdown = {k: float(rec.phase_s[k][crit]) for k in keys}  # the critical device's
    exposed = float(sum(rec.phase_s[k][crit] for k in NETWORK_PHASES))
    busiest_dev = int(np.argmax(dev["compute_busy_s"]))
    busiest_link = int(np.argmax(carried)) if len(carried) else None
    routed = int(sum(row["routed_pairs"] for row in routing))
    imbalance = _routing_column(routing, "max_over_mean_load")
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "warnings": list(plan.warnings),
        "step_time_s": step,
        "tokens": plan.tokens,
        "tokens_per_s": plan.tokens / step if step > 0 else 0.0,
        "breakdown_s": breakdown,
        "critical_device": topo.device_name(crit),
        "routing": {
            "max_over_mean_load": float(imbalance.mean()) if routed else 1.0,
            "max_over_mean_load_worst_layer": float(imbalance.max()) if routed else 1.0,
            "device_max_over_mean_load": float(
                _routing_column(routing, "device_max_over_mean_load").mean()
            )
            if routed
            else 1.0,
            "cv_load": float(_routing_column(routing, "cv_load").mean()) if routed else 0.0,
            "drop_rate": float(_routing_column(routing, "dropped_pairs").sum() / routed)
            if routed
            else 0.0,
            "cross_node_fraction": float(
                _routing_column(routing, "cross_node_pairs").sum() / routed
            )
            if routed
            else 0.0,
            # seconds the slowest device's experts add over the mean device's, all MoE layers
            "imbalance_s": float(_routing_column(routing, "imbalance_s").sum()) if routed else 0.0,
        },
        "devices": plan.n_devices,
        "links": topo.n_links,
        "busiest_device": {
            "device": names[busiest_dev],
            "compute_busy_s": float(dev["compute_busy_s"][busiest_dev]),
            "utilization": float(dev["utilization"][busiest_dev]),
        },
        "busiest_link": None
        if busiest_link is None
        else {
            "link": topo.link_names[busiest_link],
            "bytes_carried": float(carried[busiest_link]),
            "utilization": float(links["utilization"][busiest_link]),
        },
        "memory": {
            "max_used_bytes": float(np.max(dev["memory_used_bytes"])),
            "capacity_bytes": float(sc.cluster.device.memory_bytes),
        },
        "measured_kernel_fraction": plan.measured_fraction(),
        "energy_j": energy,
        "pim": pim,
        **({"tiers": tiers} if tiers is not None else {}),
        "all_to_all_bytes": passes
        * float(sum(lp.all_to_all_bytes if lp.moe else 0.0 for lp in plan.layers)),
        # the critical device: waiting on collectives; and their time in flight beyond that
        "exposed_comm_s": exposed,
        "overlapped_comm_s": max(0.0, float(rec.comm_busy_s()[crit]) - exposed)
        if plan.train is None
        else None,
        "sim": {
            "wall_s": engine.wall_s,
            "fidelity": engine.fidelity,
            **engine.counters,
            # the discrete-event network's solver: a run without numba is several times slower
            **({"network_kernels": engine.net.kernels} if hasattr(engine, "net") else {}),
        },
        "scenario_resolved": {**sc.model_dump(mode="json"), "resolved": resolve(sc).as_dict()},
    }
    if summary["sim"].get("network_kernels") == "numpy (numba missing)":
        summary["warnings"].append(
            "numba is not installed: the network solver runs its numpy kernels, 2.5-3.5x "
            "slower on large all-to-alls (pip install numba)"
        )
    if sc.workload.phase == "decode":  # time per output token of a sequence
        mtp = sc.workload.mtp
        per_step = mtp.tokens_per_step if mtp is not None else 1.0
        summary["tpot_s"] = step / per_step
        if mtp is not None:
            summary["mtp"] = {
                "draft_tokens": mtp.draft_tokens,
                "acceptance": mtp.acceptance,
                "tokens_per_step": per_step,
            }
    if plan.train is not None:
        from moesim.plan.training import training_summary

        train = training_summary(plan, breakdown, NETWORK_PHASES, step)
        summary["mfu"], summary["exposed_comm_s"] = train["mfu"], train["exposed_comm_s"]
        summary["all_to_all_bytes"] = train["all_to_all_bytes"]
        summary["train"] = train
    summary.update(mfu(plan, step))  # against the named dense peak (results/mfu.py)
    return Result(
        summary,
        _Frame(dev),
        _Frame(links),
        _Frame(routing),
        _Frame(lambda: _expert_load_columns(plan)),
        rec.slices,
        stats.intervals,
        pim_slices=rec.pim_slices,
    )


def _trace_head(
    result: Result, link_names: list[str], device_names: list[str]
) -> list[dict[str, Any]]:
    """The trace's metadata events ahead of the slices: process and thread names."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "devices"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "links"}},
    ]
    for g, name in enumerate(device_names):
        events.append(
            {"ph": "M", "pid": 1, "tid": g, "name": "thread_name", "args": {"name": name}}
        )
    used_links = np.unique(result.link_intervals.columns()[0]).tolist()
    for lid in used_links:
        events.append(
            {
                "ph": "M",
                "pid": 2,
                "tid": lid,
                "name": "thread_name",
                "args": {"name": link_names[lid]},
            }
        )
    return events


def trace_us(start_s: float, end_s: float) -> tuple[float, float]:
    """A slice's ``ts`` and ``dur`` in microseconds at nanosecond resolution: its start and
    end each rounded to the nearest nanosecond (half to even), ``ts = start_ns / 1e3`` and
    ``dur = (end_ns - start_ns) / 1e3``. Perfetto keeps trace times as integer nanoseconds,
    so finer digits only lengthen the file; rounding the ends (not the duration) keeps
    back-to-back slices back to back."""
    start_ns = float(np.rint(start_s * 1e9)) + 0.0  # + 0.0: no -0.0
    end_ns = float(np.rint(end_s * 1e9)) + 0.0
    return start_ns / 1e3, (end_ns - start_ns) / 1e3


def chrome_trace(result: Result, link_names: list[str], device_names: list[str]) -> dict:
    """Chrome trace-event JSON (opens in Perfetto / chrome://tracing): one track per device
    (pid 1) and per link that carried traffic (pid 2); timestamps in microseconds, to the
    nanosecond (:func:`trace_us`)."""
    events = _trace_head(result, link_names, device_names)
    for g, phase, start, end, layer in result.slices:
        cat = "compute" if phase in COMPUTE_PHASES else "wait"
        ts, dur = trace_us(start, end)
        events.append(
            {
                "ph": "X",
                "pid": 1,
                "tid": g,
                "name": phase,
                "cat": cat,
                "ts": ts,
                "dur": dur,
                "args": {"layer": layer},
            }
        )
    n = len(device_names)  # PIM units: one track each after the devices (moesim/pim.py)
    for g in sorted({g for g, *_ in result.pim_slices}):
        name = {"name": f"{device_names[g]}.pim"}
        events.append({"ph": "M", "pid": 1, "tid": n + g, "name": "thread_name", "args": name})
    for g, phase, start, end, layer in result.pim_slices:
        ts, dur = trace_us(start, end)
        events.append(
            {
                "ph": "X",
                "pid": 1,
                "tid": n + g,
                "name": f"pim_{phase}",
                "cat": "pim",
                "ts": ts,
                "dur": dur,
                "args": {"layer": layer},
            }
        )
    for lid, start, end in result.link_intervals:
        if end > start:
            ts, dur = trace_us(start, end)
            events.append(
                {
                    "ph": "X",
                    "pid": 2,
                    "tid": lid,
                    "name": "busy",
                    "cat": "link",
                    "ts": ts,
                    "dur": dur,
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ns"}


def write_outputs(result: Result, out_dir: str | Path) -> Path:
    """Write summary.json, devices.csv, links.csv, routing.csv, expert_load.csv and trace.json
    into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    for name in Result.TABLES:
        result.write_csv(name, out / f"{name}.csv")
    write_trace(
        out / "trace.json",
        result,
        result.column("links", "link"),
        result.column("devices", "device"),
    )
    return out


_JSON_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _reprs(values: np.ndarray) -> list[str]:
    """``[repr(v) for v in values.tolist()]``, converting each distinct value once (the
    trace repeats its timestamps: many links start and end at the same instants), all of
    them in one ``repr`` of their list (C speed, the same strings), NaN and infinities as
    ``json.dumps`` names them. Values are told apart by their bits, so -0.0 and 0.0 keep
    their own strings."""
    if len(values) == 0:
        return []
    bits = values.view(np.int64) if values.dtype == np.float64 else values
    _, first, inverse = np.unique(bits, return_index=True, return_inverse=True)
    texts = repr(values[first].tolist())[1:-1].split(", ")
    if not np.isfinite(values[first]).all():  # json.dumps's names for them
        texts = [_JSON_NONFINITE.get(t, t) for t in texts]
    strings = np.array([*texts, ""], dtype=object)
    return strings[:-1][inverse.reshape(-1)].tolist()


TRACE_COMPILED_MIN_ROWS = 4096
"""Rows from which trace.json's slices are written by the compiled formatter
(:mod:`moesim.results._trace_jit`), where numba is loaded already (the network's kernels
loaded it): the same bytes, several times faster than ``repr`` and ``join``."""


def _trace_kernel() -> Callable | None:
    """The compiled row formatter where numba is imported already; None elsewhere (a trace
    is not worth numba's import)."""
    if "numba" not in sys.modules:
        return None
    try:
        from moesim.results._trace_jit import interval_rows
    except ImportError:  # pragma: no cover - numba half installed
        return None
    return interval_rows


def _whole_ns(start: np.ndarray, end: np.ndarray) -> bool:
    """Whether every ``start <= end`` are whole nanoseconds (no -0.0 left) the compiled
    formatter writes as ``repr`` does: from 0 up to 2^53 (NaN fails the comparisons)."""
    return bool(np.all((start >= 0) & (end >= start) & (end < 2.0**53)))


def _encoded(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` encoded back to back (uint8) and the offset of each (``ptr[k]:ptr[k + 1]``)."""
    raw = [t.encode() for t in texts]
    ptr = np.zeros(len(raw) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(b) for b in raw])
    return np.frombuffer(b"".join(raw), dtype=np.uint8), ptr


_DUR = ', "dur": '


def _interval_lines(
    start_end_s: tuple[np.ndarray, np.ndarray],
    heads: list[str],
    head_of: list[int],
    tails: list[str],
    tail_of: list[int] | None,
) -> bytes | np.ndarray:
    """The trace events of rows starting and ending at ``start_end_s`` (seconds) joined by
    ``", "``, encoded: each ``head + ts + ', "dur": ' + dur +
    tail``, with ``ts`` and ``dur`` :func:`trace_us`'s (``np.rint`` rounds half to even as
    ``round`` does) as ``float.__repr__`` writes them; row ``i``'s head is
    ``heads[head_of[i]]`` and its tail ``tails[tail_of[i]]`` (``tails[0]`` for every row
    where ``tail_of`` is None), each tail ending with the ``", "`` to the next row, cut from
    the last. Compiled where numba is loaded and the rows are many
    (:data:`TRACE_COMPILED_MIN_ROWS`); else put together by slicing and joined once."""
    n = len(start_end_s[0])
    if n == 0:
        return b""
    start = np.rint(np.asarray(start_end_s[0], dtype=np.float64) * 1e9)
    end = np.rint(np.asarray(start_end_s[1], dtype=np.float64) * 1e9)
    start += 0.0  # -0.0 -> 0.0, as in trace_us
    end += 0.0
    kernel = _trace_kernel() if n >= TRACE_COMPILED_MIN_ROWS else None
    if kernel is not None and _whole_ns(start, end):
        pool, ptr = _encoded(heads + tails)
        head = np.asarray(head_of, dtype=np.int64)
        tail = len(heads) + (
            np.zeros(n, dtype=np.int64) if tail_of is None else np.asarray(tail_of, np.int64)
        )
        mid = np.frombuffer(_DUR.encode(), dtype=np.uint8)
        return kernel(pool, ptr, head, tail, start, end, mid)[:-2]
    pieces: list[str] = [""] * (5 * n)
    pieces[0::5] = _lookup(heads, np.asarray(head_of).tolist())
    pieces[1::5] = _reprs(start / 1e3)
    pieces[2::5] = [_DUR] * n
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as trace_us gives
        pieces[3::5] = _reprs((end - start) / 1e3)
    pieces[4::5] = [tails[0]] * n if tail_of is None else _lookup(tails, tail_of)
    pieces[-1] = pieces[-1][:-2]
    return "".join(pieces).encode()


def _lookup(table, keys: list) -> list:
    """``[table[k] for k in keys]``, at C speed."""
    return list(map(table.__getitem__, keys))


def _ids(keys: list) -> tuple[list, list[int]]:
    """The distinct ``keys`` and, per key, its place among them."""
    distinct = list(set(keys))
    place = {k: i for i, k in enumerate(distinct)}
    return distinct, _lookup(place, keys)


def _slice_lines(
    slices: list[tuple], tid_offset: int, name_cat: Callable[[str], str]
) -> bytes | np.ndarray:
    """The ``X`` events of device (or PIM unit) slices ``(device, phase, start, end, layer)``
    on tracks ``tid_offset + device``; ``name_cat(phase)`` is the event's ``"name": ...,
    "cat": ...``. A row's text before its start depends on (device, phase) alone and after
    its duration on the layer alone: each is formatted once per distinct value."""
    if not slices:
        return b""
    pairs, head_of = _ids(list(map(itemgetter(0, 1), slices)))
    layers, tail_of = _ids(list(map(itemgetter(4), slices)))
    heads = [
        f'{{"ph": "X", "pid": 1, "tid": {int(g) + tid_offset}, {name_cat(p)}, "ts": '
        for g, p in pairs
    ]
    tails = [f', "args": {{"layer": {int(k)}}}}}, ' for k in layers]
    times = tuple(np.array(list(map(itemgetter(k), slices)), dtype=np.float64) for k in (2, 3))
    return _interval_lines(times, heads, head_of, tails, tail_of)


def _phase_name_cat(phase: str) -> str:
    cat = "compute" if phase in COMPUTE_PHASES else "wait"
    return f'"name": {json.dumps(phase)}, "cat": "{cat}"'


def _pim_name_cat(phase: str) -> str:
    return f'"name": {json.dumps(f"pim_{phase}")}, "cat": "pim"'


def write_trace(
    path: str | Path, result: Result, link_names: list[str], device_names: list[str]
) -> None:
    """Write ``json.dumps(chrome_trace(...))`` to ``path``, the same bytes, with the slices
    formatted column by column rather than built as dicts first (the text around each
    number formatted once per distinct value, the rows written by a compiled formatter or
    put together by slicing: several times faster on hundreds of thousands of slices)."""
    n = len(device_names)
    head = ", ".join(json.dumps(e) for e in _trace_head(result, link_names, device_names))
    parts: list[bytes | np.ndarray] = [head.encode()]
    parts.append(_slice_lines(result.slices, 0, _phase_name_cat))
    for g in sorted({g for g, *_ in result.pim_slices}):
        name = {"name": f"{device_names[g]}.pim"}
        meta = {"ph": "M", "pid": 1, "tid": n + g, "name": "thread_name", "args": name}
        parts.append(json.dumps(meta).encode())
    parts.append(_slice_lines(result.pim_slices, n, _pim_name_cat))
    lid, start, end = result.link_intervals.columns()
    busy = end > start
    links, head_of = np.unique(lid[busy], return_inverse=True)
    heads = [
        f'{{"ph": "X", "pid": 2, "tid": {int(k)}, "name": "busy", "cat": "link", "ts": '
        for k in links.tolist()
    ]
    parts.append(_interval_lines((start[busy], end[busy]), heads, head_of, ["}, "], None))
    with open(path, "wb") as fh:
        fh.write(b'{"traceEvents": [')
        for k, part in enumerate(p for p in parts if len(p)):
            if k:
                fh.write(b", ")
            fh.write(part)
        fh.write(b'], "displayTimeUnit": "ns"}')


def _expert_load_columns(plan: WorkloadPlan) -> dict[str, np.ndarray] | Callable[[], Any]:
    """:func:`expert_load_table`'s columns (its builder where there is no MoE layer)."""
    loads = [(lp.index, lp.expert_load) for lp in plan.layers if lp.moe]
    if not loads:
        return lambda: expert_load_table(plan)
    layer, group, expert, tokens = [], [], [], []
    for index, load in loads:
        groups, experts = np.nonzero(np.ones_like(load, dtype=bool))
        layer.append(np.full(len(groups), index, dtype=np.int64))
        group.append(groups)
        expert.append(experts)
        tokens.append(load[groups, experts])
    return {
        "layer": np.concatenate(layer),
        "group": np.concatenate(group),
        "expert": np.concatenate(expert),
        "tokens": np.concatenate(tokens),
    }


def expert_load_table(plan: WorkloadPlan) -> pd.DataFrame:
    """Tokens per (MoE layer, expert-data-parallel group, expert): the expert-load heatmap data."""
    import pandas as pd

    frames = []
    for lp in plan.layers:
        if lp.moe:
            groups, experts = np.nonzero(np.ones_like(lp.expert_load, dtype=bool))
            frames.append(
                pd.DataFrame(
                    {
                        "layer": lp.index,
                        "group": groups,
                        "expert": experts,
                        "tokens": lp.expert_load[groups, experts],
                    }
                )
            )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["layer", "group", "expert", "tokens"])
    )


def device_load_table(plan: WorkloadPlan, topology_names: list[str]) -> pd.DataFrame:
    """Expert tokens processed per (MoE layer, device)."""
    import pandas as pd

    frames = [
        pd.DataFrame(
            {
                "layer": lp.index,
                "device": topology_names,
                "tokens": lp.device_tokens,
                "experts_s": lp.compute_s["experts"],
            }
        )
        for lp in plan.layers
        if lp.moe
    ]
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["layer", "device", "tokens", "experts_s"])
    )
