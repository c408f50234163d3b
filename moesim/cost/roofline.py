"""Roofline time of a kernel (Williams, Waterman, Patterson, CACM 2009).

``t = max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency))
+ kernels * kernel_launch_s`` with the efficiencies and launch cost named per device.
"""

from __future__ import annotations

import numpy as np

from moesim.catalog.specs import GpuSpec
from moesim.cost.ops import ArrayLike, OpCost


def kernel_time_s(
    device: GpuSpec,
    flops: ArrayLike,
    memory_bytes: ArrayLike,
    compute_dtype: str,
    kernels: int = 1,
    rows: ArrayLike | None = None,
    inner: float | None = None,
) -> np.ndarray:
    """Roofline seconds; elementwise over arrays of FLOPs and bytes. No work costs nothing.

    ``rows`` and ``inner`` (a GEMM's M and K) lower compute efficiency for small GEMMs by
    ``m / (m + gemm_m_half)`` and ``k / (k + gemm_k_half)`` when the device sets them.
    """
    flops, memory_bytes = np.asarray(flops, dtype=float), np.asarray(memory_bytes, dtype=float)
    eff = device.compute_efficiency
    if rows is not None and device.gemm_m_half > 0:
        m = np.asarray(rows, dtype=float)
        eff = eff * np.where(m > 0, m / (m + device.gemm_m_half), 1.0)
    if inner is not None and device.gemm_k_half > 0:
        eff = eff * inner / (inner + device.gemm_k_half)
    compute_s = flops / (device.flops_per_s(compute_dtype) * eff)
    memory_s = memory_bytes / (device.memory_bandwidth_bytes_per_s * device.memory_efficiency)
    busy = (flops > 0) | (memory_bytes > 0)
    return np.maximum(compute_s, memory_s) + np.where(busy, kernels * device.kernel_launch_s, 0.0)


def op_kernels(device: GpuSpec, op: OpCost) -> int:
    """Kernel launches of an op on ``device`` (unfused elementwise chains launch more)."""
    if not device.fused_elementwise and op.unfused_kernels is not None:
        return op.unfused_kernels
    return op.kernels


def op_time_split(
    device: GpuSpec, op: OpCost, compute_dtype: str, launches: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, of which measured) of one :class:`OpCost` on ``device``.

    The roofline with the op's fused or unfused traffic, at least the measured per-score cost
    for gating, and, for GEMMs a device's kernel table covers, the measured time instead
    (which includes its own call overhead)."""
    compute_dtype = op.compute_dtype or compute_dtype
    memory = op.memory_bytes
    if not device.fused_elementwise and op.unfused_memory_bytes is not None:
        memory = op.unfused_memory_bytes
    kernels = op_kernels(device, op) if launches else 0
    t = kernel_time_s(device, op.flops, memory, compute_dtype, kernels, op.rows, op.inner)
    if op.scores is not None and device.gating_s_per_score > 0:
        floor = np.asarray(op.scores, dtype=float) * device.gating_s_per_score
        t = np.maximum(t, floor + kernels * device.kernel_launch_s)
    measured = np.zeros_like(t)
    if device.kernel_table and op.gemm is not None and op.rows is not None:
        from moesim.cost.kernels import measured_gemm_s

        seconds, covered = measured_gemm_s(device.kernel_table, op.rows, *op.gemm, compute_dtype)
        if covered.any():
            seconds = np.where(covered, seconds * op.gemm_count, 0.0)
            t = np.where(covered, seconds, t)
            measured = seconds
    return t, measured


def op_time_s(device: GpuSpec, op: OpCost, compute_dtype: str, launches: bool = True) -> np.ndarray:
    """Seconds of one :class:`OpCost` on ``device`` (see :func:`op_time_split`)."""
    return op_time_split(device, op, compute_dtype, launches)[0]
