"""Scenarios side by side: one table of headline metrics and step-time breakdowns."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from moesim.config.scenario import Scenario
from moesim.studies.sweep import flatten

STEP_HEADLINE = (
    "devices",
    "step_time_s",
    "tokens",
    "tokens_per_s",
    "routing.max_over_mean_load",
    "routing.drop_rate",
    "routing.cross_node_fraction",
    "memory.max_used_bytes",
    "energy_j.per_token",
)
SERVE_HEADLINE = (
    "instances",
    "devices_per_instance",
    "offered_rate_per_s",
    "stable",
    "throughput_tokens_per_s",
    "throughput_tokens_per_s_ci",
    "whole_run_tokens_per_s",
    "throughput_requests_per_s",
    "goodput_requests_per_s",
    "slo_attainment",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "latency_p99_s",
    "kv_cache.utilization_mean",
    "iterations.mean_decode_batch",
)


def compare_table(named: list[tuple[str, dict[str, Any]]]) -> pd.DataFrame:
    """One row per metric (headline first, then ``breakdown_s.*``), one column per scenario;
    a metric a scenario lacks is empty (``None``)."""
    flat = [(name, flatten(summary)) for name, summary in named]
    keys: list[str] = []
    for _, f in flat:
        headline = SERVE_HEADLINE if f.get("phase") == "serve" else STEP_HEADLINE
        keys += [k for k in headline if k in f and k not in keys]
    for _, f in flat:  # breakdown phases some scenario spends time in
        keys += [
            k
            for k in f
            if k.startswith("breakdown_s.") and k not in keys and any(g.get(k) for _, g in flat)
        ]
    columns = {}
    for name, f in flat:
        col = name
        while col in columns:  # the same scenario twice (say with different --set)
            col += "'"
        columns[col] = [f.get(k) for k in keys]
    return pd.DataFrame(columns, index=pd.Index(keys, name="metric"))


def compare_scenarios(
    scenarios: list[tuple[str, Scenario]], progress: bool = False
) -> pd.DataFrame:
    """Simulate each scenario (``phase: serve`` runs its request stream) and tabulate."""
    from moesim.studies.simulate import simulate

    return compare_table(
        [(name, simulate(sc, progress=progress).summary) for name, sc in scenarios]
    )


def relative_to_first(table: pd.DataFrame) -> pd.DataFrame:
    """Each numeric cell over the first column's (1.0: the same); others empty."""
    first = table.columns[0]

    def ratio(a: Any, b: Any) -> float | None:
        if isinstance(a, bool) or isinstance(b, bool):
            return None
        try:
            a, b = float(a), float(b)
        except (TypeError, ValueError):
            return None
        return a / b if b and not math.isnan(b) else None

    return pd.DataFrame(
        {c: [ratio(v, table.at[k, first]) for k, v in table[c].items()] for c in table.columns},
        index=table.index,
    )
