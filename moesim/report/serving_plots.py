"""Serving plots: functions that take a serving DataFrame and return a matplotlib Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure


def plot_kv_cache(iterations: pd.DataFrame) -> Figure:
    """KV-cache utilization (top) and running / waiting requests (bottom) after every
    scheduler iteration, one line per instance."""
    fig, (kv, queue) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for inst, grp in iterations.groupby("instance"):
        label = f"instance {inst} ({grp['role'].iloc[0]})"
        kv.step(grp["end_s"], grp["kv_utilization"], where="post", label=label)
        (line,) = queue.step(grp["end_s"], grp["running"], where="post", label=f"{label} running")
        queue.step(
            grp["end_s"],
            grp["waiting"],
            where="post",
            color=line.get_color(),
            linestyle=":",
            label=f"{label} waiting",
        )
    kv.set_ylabel("KV cache in use")
    kv.set_ylim(0, 1.05)
    kv.grid(alpha=0.3)
    queue.set_ylabel("requests")
    queue.set_xlabel("time (s)")
    queue.grid(alpha=0.3)
    if iterations["instance"].nunique() <= 8:
        kv.legend(fontsize=7)
        queue.legend(fontsize=7)
    fig.tight_layout()
    return fig
