"""Tables and matplotlib figures built from result DataFrames (each plot returns a Figure)."""

from moesim.report.plots import plot_metric_vs_axes

__all__ = ["plot_metric_vs_axes"]
