"""Measured kernel tables: per-device CSVs of timed kernels that override the roofline.

Format (one row per measurement; ``moesim calibrate`` and ``tools/profile_gpu.py`` write it)::

    op,m,k,n,dtype,seconds
    gemm,128,4096,14336,bf16,0.000231

A GEMM ``(m x k) @ (k x n)`` in ``dtype`` uses the table when its ``(k, n, dtype)`` was measured
and ``m`` lies within the measured range: the time is interpolated linearly in
``(log m, log seconds)`` between the two nearest measured ``m``, so measured shapes come back
exactly and the curve between them is monotone when the measurements are. Anything else
falls back to the roofline.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from moesim.config.tables import KERNEL_COLUMNS as COLUMNS  # noqa: F401 (re-exported)
from moesim.config.tables import read_kernel_table


@cache
def load_table(path: str) -> dict[tuple[str, int, int, str], tuple[np.ndarray, np.ndarray]]:
    """``(op, k, n, dtype) -> (log m, log seconds)`` sorted by m, from a CSV file."""
    df = read_kernel_table(path)
    table = {}
    for (op, k, n, dtype), grp in df.groupby(["op", "k", "n", "dtype"]):
        grp = grp.groupby("m", as_index=False)["seconds"].median().sort_values("m")
        table[(str(op), int(k), int(n), str(dtype))] = (
            np.log(grp["m"].to_numpy(dtype=float)),
            np.log(grp["seconds"].to_numpy(dtype=float)),
        )
    return table


def measured_gemm_s(
    path: str, m: np.ndarray, k: float, n: float, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, covered mask) of GEMMs with rows ``m`` from the table; NaN where uncovered."""
    m = np.asarray(m, dtype=float)
    entry = load_table(path).get(("gemm", round(k), round(n), dtype))
    out = np.full(m.shape, np.nan)
    if entry is None:
        return out, np.zeros(m.shape, dtype=bool)
    log_m, log_s = entry
    with np.errstate(divide="ignore"):
        lm = np.log(np.where(m > 0, m, np.nan))
    covered = (lm >= log_m[0] - 1e-9) & (lm <= log_m[-1] + 1e-9)
    out[covered] = np.exp(np.interp(lm[covered], log_m, log_s))
    return out, covered
