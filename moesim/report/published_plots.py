"""Plot of ``moesim validate --published``: predicted against published kernel times."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def plot_published(df: pd.DataFrame) -> Figure:
    """Left: predicted against measured seconds per row (log-log, one colour per kind, the
    diagonal and +-25% dashed). Right: |error| per kind as a box per kind with its median."""
    fig, (ax, box) = plt.subplots(1, 2, figsize=(10, 4.2))
    kinds = list(dict.fromkeys(df["kind"]))
    for kind in kinds:
        rows = df[df["kind"] == kind]
        ax.scatter(rows["measured_s"], rows["predicted_s"], s=14, label=kind)
    lo = float(min(df["measured_s"].min(), df["predicted_s"].min())) / 1.5
    hi = float(max(df["measured_s"].max(), df["predicted_s"].max())) * 1.5
    line = np.array([lo, hi])
    ax.plot(line, line, color="black", lw=0.8)
    for f in (0.75, 1.25):
        ax.plot(line, f * line, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("published (s)")
    ax.set_ylabel("moesim (s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    errs = [df.loc[df["kind"] == k, "rel_error"].abs().to_numpy() * 100 for k in kinds]
    box.boxplot(errs, showfliers=True)
    box.set_xticks(range(1, len(kinds) + 1), kinds, fontsize=8)
    box.axhline(10, color="grey", lw=0.6, ls="--")
    box.axhline(25, color="grey", lw=0.6, ls=":")
    box.set_ylabel("|error| (%)")
    box.grid(alpha=0.3, axis="y")
    fig.suptitle("moesim against published kernel measurements")
    fig.tight_layout()
    return fig
