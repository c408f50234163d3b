"""Tables and matplotlib figures built from result DataFrames (each plot returns a Figure)."""

from moesim.report.plots import (
    plot_device_load,
    plot_expert_heatmap,
    plot_metric_vs_axes,
    plot_validation,
)
from moesim.report.published_plots import plot_published

__all__ = [
    "plot_device_load",
    "plot_expert_heatmap",
    "plot_metric_vs_axes",
    "plot_published",
    "plot_validation",
]
