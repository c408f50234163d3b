"""Plots: functions that take a DataFrame and return a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def plot_metric_vs_axes(df: pd.DataFrame, metric: str, axes: list[str]) -> Figure:
    """One panel per sweep axis: ``metric`` (mean over repetitions and the other axes) against
    that axis, one line per value of the next axis when there are two or more. Axes that
    take a single value are left out."""
    ok = df[df["status"] == "ok"] if "status" in df else df
    axes = [a for a in axes if ok[a].nunique() > 1] or axes[:1]
    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.4), squeeze=False)
    for ax, axis in zip(panels[0], axes, strict=True):
        others = [a for a in axes if a != axis]
        hue = others[0] if others and ok[others[0]].nunique() <= 8 else None
        groups = ok.groupby(hue) if hue else [(None, ok)]
        for value, grp in groups:
            line = grp.groupby(axis)[metric].mean().sort_index()
            label = f"{hue}={value}" if hue else None
            ax.plot(line.index, line.to_numpy(), marker="o", label=label)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if hue:
            ax.legend(fontsize=7)
    fig.suptitle(metric)
    fig.tight_layout()
    return fig


def plot_expert_heatmap(expert_load: pd.DataFrame) -> Figure:
    """Experts x MoE layers, colour = tokens / mean tokens of that layer (1 = even)."""
    table = expert_load.groupby(["layer", "expert"])["tokens"].sum().unstack("layer")
    rel = table / table.mean(axis=0)
    fig, ax = plt.subplots(
        figsize=(min(14, 2 + 0.25 * rel.shape[1]), min(10, 1.5 + 0.18 * rel.shape[0]))
    )
    im = ax.imshow(rel.to_numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("expert")
    ax.set_xticks(range(rel.shape[1]), [str(c) for c in rel.columns], fontsize=6)
    fig.colorbar(im, ax=ax, label="tokens / layer mean")
    ax.set_title("expert load")
    fig.tight_layout()
    return fig


def plot_device_load(device_load: pd.DataFrame) -> Figure:
    """Expert tokens per device over all MoE layers, against the mean."""
    per_device = device_load.groupby("device", sort=False)["tokens"].sum()
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.3 * len(per_device)), 3.4))
    ax.bar(range(len(per_device)), per_device.to_numpy(), color="tab:blue")
    ax.axhline(per_device.mean(), color="black", linestyle="--", label="mean")
    step = max(1, len(per_device) // 32)
    ax.set_xticks(
        range(0, len(per_device), step), list(per_device.index[::step]), rotation=90, fontsize=6
    )
    ax.set_ylabel("expert tokens (all MoE layers)")
    ax.set_title(f"device load, max/mean {per_device.max() / per_device.mean():.3f}")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_validation(df: pd.DataFrame) -> Figure:
    """Predicted vs measured seconds (log-log), the y = x line and +-15% / +-30% bands."""
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    timed = df.dropna(subset=["predicted_s", "measured_s"])
    for kind, grp in timed.groupby("kind"):
        ax.scatter(grp["measured_s"], grp["predicted_s"], label=f"{kind} ({len(grp)})", s=18)
    if len(timed):
        lo = min(timed["measured_s"].min(), timed["predicted_s"].min()) / 1.5
        hi = max(timed["measured_s"].max(), timed["predicted_s"].max()) * 1.5
        xs = [lo, hi]
        ax.plot(xs, xs, color="black", lw=1)
        for band, style in ((0.15, "--"), (0.30, ":")):
            ax.plot(xs, [x * (1 + band) for x in xs], color="gray", ls=style, lw=0.8)
            ax.plot(
                xs,
                [x * (1 - band) for x in xs],
                color="gray",
                ls=style,
                lw=0.8,
                label=f"+-{band:.0%}",
            )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (s)")
    ax.set_ylabel("predicted by moesim (s)")
    ax.set_title("moesim vs the numpy reference on this host")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
