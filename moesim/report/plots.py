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
