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
) -> np.ndarray:
    """Roofline seconds; elementwise over arrays of FLOPs and bytes. No work costs nothing."""
    flops, memory_bytes = np.asarray(flops, dtype=float), np.asarray(memory_bytes, dtype=float)
    compute_s = flops / (device.flops_per_s(compute_dtype) * device.compute_efficiency)
    memory_s = memory_bytes / (device.memory_bandwidth_bytes_per_s * device.memory_efficiency)
    busy = (flops > 0) | (memory_bytes > 0)
    return np.maximum(compute_s, memory_s) + np.where(busy, kernels * device.kernel_launch_s, 0.0)


def op_time_s(device: GpuSpec, op: OpCost, compute_dtype: str) -> np.ndarray:
    """Roofline seconds of one :class:`OpCost`."""
    return kernel_time_s(device, op.flops, op.memory_bytes, compute_dtype, op.kernels)
