"""Comparison plots: a table of metrics by scenario in, a matplotlib Figure out."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_compare(table: pd.DataFrame, metrics: list[str] | None = None) -> Figure:
    """Bars of ``metrics`` (default: the numeric headline rows, not the breakdown) for each
    scenario column, each metric on its own axis; and, where the table has ``breakdown_s.*``
    rows, a stacked bar of the step-time breakdown per scenario."""
    numeric = table.apply(pd.to_numeric, errors="coerce")
    if metrics is None:
        metrics = [
            m
            for m in table.index
            if not m.startswith("breakdown_s.")
            and numeric.loc[m].notna().all()
            and not isinstance(table.loc[m].iloc[0], bool | np.bool_)
        ]
    parts = [m for m in table.index if m.startswith("breakdown_s.")]
    parts = [m for m in parts if numeric.loc[m].fillna(0).abs().sum() > 0]
    n = len(metrics) + (1 if parts else 0)
    cols = min(n, 4) or 1
    rows = int(np.ceil(n / cols)) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    names = list(table.columns)
    x = np.arange(len(names))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, metrics, strict=False):
        ax.bar(x, numeric.loc[m].to_numpy(), color=[colors[i % len(colors)] for i in x])
        ax.set_title(m, fontsize=8)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    if parts:
        ax = axes.flat[len(metrics)]
        bottom = np.zeros(len(names))
        for i, m in enumerate(parts):
            v = numeric.loc[m].fillna(0).to_numpy() * 1e3
            ax.bar(x, v, bottom=bottom, label=m.removeprefix("breakdown_s."), color=colors[i % 10])
            bottom += v
        ax.set_title("step-time breakdown (ms)", fontsize=8)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig
