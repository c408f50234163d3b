"""Capacity-plan plots: functions that take a DataFrame and return a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from moesim.results.collect import BREAKDOWN_KEYS

_PALETTE = plt.get_cmap("tab20")(np.linspace(0, 1, 20))


def phase_color(phase: str):
    """A stable colour per step phase (forward and ``_bwd`` phases share a hue family)."""
    known = [*BREAKDOWN_KEYS, "recompute", "optimizer", "grad_reduce", "param_gather"]
    base = phase.removesuffix("_bwd")
    i = known.index(base) if base in known else sum(map(ord, base))
    color = _PALETTE[(2 * i) % 20 if not phase.endswith("_bwd") else (2 * i + 1) % 20]
    return color


WAIT_PHASES = ("dispatch", "combine", "tp_comm", "grad_reduce", "param_gather")


def plot_breakdown_bars(df: pd.DataFrame, label: str = "label") -> Figure:
    """Stacked horizontal bars, one per row: the step time split into ``breakdown_s.<phase>``
    columns (the timeline of the last device to finish, so the parts sum to the step)."""
    cols = [c for c in df.columns if c.startswith("breakdown_s.")]
    cols = [c for c in cols if df[c].fillna(0).abs().sum() > 0]
    fig, ax = plt.subplots(figsize=(9.0, 1.2 + 0.55 * max(len(df), 1)))
    left = np.zeros(len(df))
    ys = np.arange(len(df))
    scale, unit = (1e3, "ms") if df.get("step_time_s", pd.Series([1.0])).max() < 1 else (1, "s")
    for col in cols:
        phase = col.split(".", 1)[1]
        width = df[col].fillna(0).to_numpy(float) * scale
        ax.barh(ys, width, left=left, color=phase_color(phase), label=phase, height=0.6)
        left += width
    ax.set_yticks(ys, list(df[label]), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"step time ({unit})")
    ax.set_title("step-time breakdown (last device to finish)")
    ax.legend(fontsize=7, ncol=min(len(cols), 6), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_pareto(
    df: pd.DataFrame,
    throughput: str,
    chosen: int | None = None,
    throughput_min: float | None = None,
) -> Figure:
    """Two panels: cost per hour and energy per token against throughput for every simulated
    candidate (``status == ok``); feasible ones filled, the Pareto frontier (``pareto_cost``,
    ``pareto_energy``) joined, the chosen candidate starred, a throughput target dashed."""
    ok = df[df["status"] == "ok"]
    panels = [("cost_per_hour_usd", "pareto_cost", "cost (USD per hour)")]
    if "energy_per_token_j" in ok and ok["energy_per_token_j"].notna().any():
        panels.append(("energy_per_token_j", "pareto_energy", "energy per token (J)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (ycol, front, ylabel) in zip(axes[0], panels, strict=True):
        feas = ok["feasible"].astype(bool)
        ax.scatter(
            ok.loc[~feas, throughput],
            ok.loc[~feas, ycol],
            facecolors="none",
            edgecolors="tab:gray",
            label="misses a target",
        )
        ax.scatter(
            ok.loc[feas, throughput],
            ok.loc[feas, ycol],
            color="tab:blue",
            label="meets every target",
        )
        if front in ok:
            f = ok[ok[front].astype(bool)].sort_values(throughput)
            ax.plot(f[throughput], f[ycol], color="tab:orange", lw=1.2, label="Pareto frontier")
        if chosen is not None and (ok["candidate"] == chosen).any():
            c = ok[ok["candidate"] == chosen]
            ax.scatter(
                c[throughput], c[ycol], marker="*", s=260, color="tab:red", zorder=5, label="chosen"
            )
        if throughput_min is not None:
            ax.axvline(throughput_min, color="black", ls="--", lw=0.8, label="target")
        ax.set_xlabel(throughput)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("candidates: cost and energy against throughput")
    fig.tight_layout()
    return fig


def plot_link_utilization(links: pd.DataFrame, top: int = 16) -> Figure:
    """Left: utilization (bytes / (bandwidth x step)) of every link, one box per link kind
    (intra-node, host, network, spine); right: the ``top`` most used links."""
    kinds = sorted(links["kind"].unique()) if len(links) else []
    colors = dict(zip(kinds, plt.get_cmap("Set2")(np.arange(len(kinds))), strict=True))
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11.0, 1.6 + 0.25 * max(top, len(kinds))), width_ratios=[1, 1.3]
    )
    data = [links.loc[links["kind"] == k, "utilization"].to_numpy(float) * 100 for k in kinds]
    jitter = np.random.default_rng(0)  # fixed: the same picture every run
    for row, (kind, util) in enumerate(zip(kinds, data, strict=True)):
        ys = row + jitter.uniform(-0.25, 0.25, len(util))
        left.scatter(util, ys, s=6, color=colors[kind], alpha=0.6)
        left.plot([np.median(util)] * 2, [row - 0.35, row + 0.35], color="black", lw=1.5)
    left.set_yticks(
        range(len(kinds)), [f"{k} ({len(d)})" for k, d in zip(kinds, data, strict=True)]
    )
    left.set_xlim(0, 1.05 * max([d.max() for d in data if len(d)] + [1e-9]))
    left.set_xlabel("utilization over the step (%)")
    left.set_title("all links by kind (count); bar: median")
    left.grid(axis="x", alpha=0.3)
    used = links.sort_values("utilization", ascending=False).head(top)
    ys = np.arange(len(used))
    right.barh(
        ys, used["utilization"].to_numpy(float) * 100, color=[colors[k] for k in used["kind"]]
    )
    right.set_yticks(ys, list(used["link"]), fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("utilization over the step (%)")
    right.set_title(f"top {len(used)} of {len(links)} links")
    right.grid(axis="x", alpha=0.3)
    fig.suptitle("link utilization")
    fig.tight_layout()
    return fig


def plot_gantt(slices: pd.DataFrame, max_devices: int = 16) -> Figure:
    """Timeline of one step: one row per device (``device``), a bar per slice (``start_s``,
    ``end_s``) coloured by ``phase``; collective waits are hatched. At most ``max_devices``
    rows (the last to finish first)."""
    last = slices.groupby("device")["end_s"].max().sort_values(ascending=False)
    devices = sorted(last.index[:max_devices], key=lambda d: list(last.index).index(d))
    fig, ax = plt.subplots(figsize=(11.0, 1.2 + 0.38 * max(len(devices), 1)))
    step = float(slices["end_s"].max()) if len(slices) else 1.0
    scale, unit = (1e3, "ms") if step < 1 else (1.0, "s")
    seen: set[str] = set()
    for row, dev in enumerate(devices):
        mine = slices[slices["device"] == dev]
        for phase, grp in mine.groupby("phase"):
            spans = list(
                zip(grp["start_s"] * scale, (grp["end_s"] - grp["start_s"]) * scale, strict=True)
            )
            wait = phase.removesuffix("_bwd") in WAIT_PHASES
            ax.broken_barh(
                spans,
                (row - 0.4, 0.8),
                facecolors=phase_color(phase),
                hatch="//" if wait else None,
                edgecolor="none",
                label=None if phase in seen else phase,
            )
            seen.add(phase)
    ax.set_yticks(range(len(devices)), devices, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, step * scale)
    ax.set_xlabel(f"time in the step ({unit}); hatched: waiting for a collective")
    ax.set_title("one step on the chosen configuration")
    ax.legend(
        fontsize=7,
        ncol=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08 - 1.0 / (2 + len(devices))),
    )
    fig.tight_layout()
    return fig
