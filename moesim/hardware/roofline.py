"""Roofline time of a kernel (Williams, Waterman, Patterson, CACM 2009).

``t = max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency))
+ kernels * kernel_launch_s`` with the efficiencies and launch cost named per device.
"""

from __future__ import annotations

import numpy as np

from moesim.model import ArrayLike, OpCost
from moesim.specs import GpuSpec


def kernel_time_s(
    device: GpuSpec,
    flops: ArrayLike,
    memory_bytes: ArrayLike,
    compute_dtype: str,
    kernels: int = 1,
    rows: ArrayLike | None = None,
) -> np.ndarray:
    """Roofline seconds; elementwise over arrays of FLOPs and bytes. No work costs nothing.

    ``rows`` (the GEMM M dimension) lowers compute efficiency for small GEMMs by
    ``m / (m + gemm_m_half)`` when the device sets ``gemm_m_half``.
    """
    flops, memory_bytes = np.asarray(flops, dtype=float), np.asarray(memory_bytes, dtype=float)
    eff = device.compute_efficiency
    if rows is not None and device.gemm_m_half > 0:
        m = np.asarray(rows, dtype=float)
        eff = eff * np.where(m > 0, m / (m + device.gemm_m_half), 1.0)
    compute_s = flops / (device.flops_per_s(compute_dtype) * eff)
    memory_s = memory_bytes / (device.memory_bandwidth_bytes_per_s * device.memory_efficiency)
    busy = (flops > 0) | (memory_bytes > 0)
    return np.maximum(compute_s, memory_s) + np.where(busy, kernels * device.kernel_launch_s, 0.0)


def op_time_s(device: GpuSpec, op: OpCost, compute_dtype: str) -> np.ndarray:
    """Roofline seconds of one :class:`OpCost`."""
    return kernel_time_s(device, op.flops, op.memory_bytes, compute_dtype, op.kernels, op.rows)
