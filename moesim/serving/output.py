"""Writing and printing a serving run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moesim.serving.metrics import ServeResult


def write_serving_outputs(result: ServeResult, out_dir: str | Path) -> Path:
    """summary.json, requests.csv, iterations.csv, step_grid.csv and kv_cache.png."""
    import matplotlib.pyplot as plt

    from moesim.report.serving_plots import plot_kv_cache

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    result.requests.to_csv(out / "requests.csv", index=False)
    result.iterations.to_csv(out / "iterations.csv", index=False)
    result.grid.to_csv(out / "step_grid.csv", index=False)
    fig = plot_kv_cache(result.iterations)
    fig.savefig(out / "kv_cache.png", dpi=110)
    plt.close(fig)
    return out


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def print_serving_summary(s: dict[str, Any]) -> None:
    """The run's headline numbers, one line each."""
    kv, it = s["kv_cache"], s["iterations"]
    print(
        f"scenario          {s['scenario']}  ({s['instances']} instance(s) of "
        f"{s['devices_per_instance']} devices)"
    )
    rate = s["offered_rate_per_s"]
    print(
        f"requests          {s['requests']:,}"
        + (f" at {rate:.3g}/s" if rate else "")
        + f", served in {s['duration_s']:.1f} s"
    )
    win = s["steady_window"]
    print(
        f"throughput        {s['throughput_tokens_per_s']:,.0f} +- "
        f"{s['throughput_tokens_per_s_ci']:,.0f} output tokens/s (95%), "
        f"{s['throughput_requests_per_s']:.3g} requests/s, steady window "
        f"{win['start_s']:.1f}-{win['end_s']:.1f} s; whole run {s['whole_run_tokens_per_s']:,.0f}"
        " tokens/s"
    )
    if not s["stable"]:
        print(f"UNSTABLE          {s['unstable_reason']}: the load is more than it serves")
    print(
        f"goodput           {s['goodput_requests_per_s']:.3g} requests/s within the SLO "
        f"(ttft {_fmt_s(s['slo']['ttft_s'])}, tpot {_fmt_s(s['slo']['tpot_s'])}): "
        f"{s['slo_attainment']:.1%} of the steady window's requests"
    )
    for name in ("ttft", "tpot", "max_token_gap", "latency", "queue"):
        print(
            f"{name:<17} p50 {_fmt_s(s[f'{name}_p50_s'])}, p90 {_fmt_s(s[f'{name}_p90_s'])}, "
            f"p99 {_fmt_s(s[f'{name}_p99_s'])}"
        )
    print(
        f"kv cache          {kv['bytes_per_token'] / 1e3:,.1f} kB per token per device, "
        f"{kv['budget_bytes_per_device'] / 1e9:.1f} GB per device free for it; utilization "
        f"mean {kv['utilization_mean']:.1%}, max {kv['utilization_max']:.1%}"
    )
    print(
        f"iterations        {it['prefill']:,} prefill (mean {it['mean_prefill_tokens']:,.0f} "
        f"tokens), {it['decode']:,} decode (mean batch {it['mean_decode_batch']:.1f})"
        + (f", {it['mixed']:,} mixed" if it["mixed"] else "")
    )
    if s.get("mtp"):
        mtp = s["mtp"]
        print(
            f"multi-token pred. {mtp['draft_tokens']} draft tokens at {mtp['acceptance']:.0%} "
            f"acceptance: {mtp['accepted_tokens_per_step']:.2f} tokens per sequence per decode "
            f"step (expected {mtp['tokens_per_step']:.2f})"
        )
    print(
        f"simulated in      {s['sim']['wall_s']:.2f} s wall ({s['sim']['grid_points']} grid "
        f"steps timed in {s['sim']['grid_wall_s']:.2f} s), {s['sim']['events']:,} events"
    )
