"""Per-request and per-iteration tables and the summary of a finished serving run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moesim.serving.scheduler import ServingSimulation
from moesim.serving.steady import steady_window

PERCENTILES = (50, 90, 99)


@dataclass
class ServeResult:
    """``summary`` (JSON-ready), ``requests`` (one row per request), ``iterations`` (one row
    per scheduler iteration, with the KV cache in use after it) and ``grid`` (timed steps)."""

    summary: dict[str, Any]
    requests: pd.DataFrame
    iterations: pd.DataFrame
    grid: pd.DataFrame


def _stats(values: np.ndarray, name: str) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return {f"{name}_{k}_s": None for k in ("mean", *(f"p{q}" for q in PERCENTILES))}
    out = {f"{name}_mean_s": float(values.mean())}
    for q in PERCENTILES:
        out[f"{name}_p{q}_s"] = float(np.percentile(values, q))
    return out


def collect_serving(sim: ServingSimulation, wall_s: float) -> ServeResult:
    """Per-request table, iteration table and the summary of a finished serving run."""
    sc, serve, costs = sim.sc, sim.serve, sim.costs
    ttft = sim.first_token_s - sim.arrival
    decode_tokens = sim.output - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(decode_tokens > 0, (sim.done_s - sim.first_token_s) / decode_tokens, np.nan)
    latency = sim.done_s - sim.arrival
    good = (ttft <= serve.slo.ttft_s) & ((decode_tokens == 0) | (tpot <= serve.slo.tpot_s))
    decode_inst = np.where(sim.decode_instance >= 0, sim.decode_instance, sim.instance)
    requests = pd.DataFrame(
        {
            "request": np.arange(len(sim.arrival)),
            "instance": sim.instance,
            "decode_instance": decode_inst,
            "arrival_s": sim.arrival,
            "prompt_tokens": sim.prompt,
            "cached_prompt_tokens": sim.cached,
            "output_tokens": sim.output,
            "admitted_s": sim.admitted_s,
            "first_token_s": sim.first_token_s,
            "done_s": sim.done_s,
            "queue_s": sim.admitted_s - sim.arrival,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "max_token_gap_s": sim.max_gap_s,
            "latency_s": latency,
            "preemptions": sim.preemptions,
            "slo_met": good,
        }
    )
    instances = sim.front + sim.back
    capacity = {i.index: i.capacity_bytes for i in instances}
    iterations = pd.DataFrame(
        sim.iterations,
        columns=[
            "instance",
            "role",
            "kind",
            "start_s",
            "end_s",
            "sequences",
            "tokens",
            "prefill_tokens",
            "decode_tokens",
            "waiting",
            "running",
            "kv_used_bytes",
            "decode_sequences",
            "replica_max_sequences",
            "replica_min_sequences",
        ],
    )
    iterations["kv_utilization"] = iterations["kv_used_bytes"] / iterations["instance"].map(
        capacity
    )
    end = float(sim.done_s.max())
    n = len(sim.arrival)
    out_tokens = float(sim.output.sum())
    decodes = iterations[iterations["decode_tokens"] > 0]  # decode and mixed iterations
    prefills = iterations[iterations["prefill_tokens"] > 0]
    span = float(sim.arrival[-1] - sim.arrival[0]) if n > 1 else 0.0
    win = steady_window(requests, iterations, serve.steady)
    in_win = win.requests
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "phase": "serve",
        "requests": n,
        "instances": serve.instances,
        "devices_per_instance": sc.cluster.n_devices,
        "duration_s": end,
        "offered_rate_per_s": serve.arrival_rate_per_s
        if serve.arrivals == "poisson"
        else ((n - 1) / span if span > 0 else None),
        "offered_tokens_per_s": serve.arrival_rate_per_s * serve.output_tokens.expected()
        if serve.arrivals == "poisson"
        else None,
        # steady window (steady.py): the headline figures
        "stable": win.stable,
        "unstable_reason": win.unstable_reason,
        "throughput_tokens_per_s": win.tokens_per_s,
        "throughput_tokens_per_s_ci": win.tokens_per_s_ci,
        "tokens_per_s": win.tokens_per_s,
        "throughput_requests_per_s": win.requests_per_s,
        "goodput_requests_per_s": win.requests_per_s * float(good[in_win].mean()),
        "slo_attainment": float(good[in_win].mean()),
        "steady_window": {
            "start_s": win.start_s,
            "end_s": win.end_s,
            "requests": int(in_win.sum()),
            "arrival_rate_per_s": win.arrival_rate_per_s,
            "mean_requests_in_system": win.mean_requests_in_system,
            "latency_mean_s": float(np.nanmean(latency[in_win])),
            "growth": win.growth,
            "rule": f"arrivals from request {serve.steady.warmup_fraction:.0%} to the last; "
            f"{serve.steady.batches} batch means",
        },
        # the whole run, warm-up and drain included
        "whole_run_tokens_per_s": out_tokens / end,
        "whole_run_requests_per_s": n / end,
        "whole_run_goodput_requests_per_s": float(good.sum()) / end,
        "whole_run_slo_attainment": float(good.mean()),
        "prompt_tokens_per_s": float(sim.prompt.sum()) / end,
        "prefix_cache": {
            "hit_rate": serve.prefix_cache_hit_rate,
            "cached_token_share": float(sim.cached.sum() / sim.prompt.sum()),
        },
        "slo": serve.slo.model_dump(),
        **_stats(ttft, "ttft"),
        **_stats(tpot, "tpot"),
        **_stats(sim.max_gap_s, "max_token_gap"),
        **_stats(latency, "latency"),
        **_stats(requests["queue_s"].to_numpy(), "queue"),
        "mean_requests_in_system": sim.in_system_area / end,
        "kv_cache": {
            "bytes_per_token": costs.kv_bytes_per_token,
            "state_bytes_per_seq": costs.state_bytes_per_seq,
            "budget_bytes_per_device": costs.kv_budget_bytes,
            "capacity_tokens": costs.capacity_bytes / costs.kv_bytes_per_token
            if costs.kv_bytes_per_token
            else None,
            "utilization_mean": float(
                sum(i.kv_area for i in instances) / (sum(capacity.values()) * end)
            ),
            "utilization_max": float(iterations["kv_utilization"].max()),
            "weights_bytes_per_device": costs.weights_bytes,
            "activations_bytes_per_device": costs.activations_bytes,
        },
        "iterations": {
            "prefill": int((iterations["kind"] == "prefill").sum()),
            "decode": int((iterations["kind"] == "decode").sum()),
            "mixed": int((iterations["kind"] == "mixed").sum()),
            "mean_decode_batch": float(decodes["decode_sequences"].mean()) if len(decodes) else 0.0,
            "mean_prefill_tokens": float(prefills["prefill_tokens"].mean())
            if len(prefills)
            else 0.0,
            "preemptions": int(sim.preemptions.sum()),
        },
        "sim": {
            "wall_s": wall_s,
            "grid_wall_s": costs.grid_wall_s,
            "grid_points": len(costs.grid.table()),
            "step_fidelity": serve.step_fidelity,
            "events": sim.env.events_processed,
        },
        "scenario_resolved": sc.model_dump(mode="json"),
    }
    if sc.workload.mtp is not None:  # multi-token prediction: accepted tokens per step
        mtp = sc.workload.mtp
        summary["mtp"] = {
            "draft_tokens": mtp.draft_tokens,
            "acceptance": mtp.acceptance,
            "tokens_per_step": mtp.tokens_per_step,
            # what the run achieved: a request's last step yields only the tokens it lacks
            "accepted_tokens_per_step": float(decodes["decode_tokens"].sum())
            / max(float(decodes["decode_sequences"].sum()), 1.0),
        }
    return ServeResult(summary, requests, iterations, costs.grid.table())
