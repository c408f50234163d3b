"""Roofline time of a kernel (Williams, Waterman, Patterson, CACM 2009), shape-aware.

``r = max(flops / (peak * e_c), bytes / (bandwidth * memory_efficiency * occ))`` with
``e_c = efficiency(dtype) * occ * m / (m + gemm_m_half) * k / (k + gemm_k_half)`` for GEMMs
(``occ = T / (T + gemm_tiles_half[dtype])``, ``T`` output tiles of ``GEMM_TILE``), plus the
dequantisation of weight-only quantised weights on the vector units. A GEMM with fewer than
``gemm_split_k_below_tiles`` output tiles runs as split-K (partial products and a reduction
kernel in one library call), whose extra kernels add ``gemm_split_k_launch_s[dtype]`` to each
launch: the launch is ``kernel_launch_s + gemm_split_k_launch_s``. The launch cost then
adds (``r + kernels * kernel_launch_s``: synchronous calls, CUDA graph replays) or overlaps
(``max(r, kernels * kernel_launch_s)``: an eager GPU stream the host keeps ahead of). Every
constant is a named, documented device parameter (moesim/catalog/devices.yaml).
"""

from __future__ import annotations

import numpy as np

from moesim.catalog.specs import GEMM_TILE, GpuSpec
from moesim.cost.ops import ArrayLike, OpCost


def kernel_time_s(
    device: GpuSpec,
    flops: ArrayLike,
    memory_bytes: ArrayLike,
    compute_dtype: str,
    kernels: int = 1,
    rows: ArrayLike | None = None,
    inner: float | None = None,
    cols: float | None = None,
    dequant_weights: float | None = None,
    isolated: bool = False,
    attention: tuple[float, float] | None = None,
) -> np.ndarray:
    """Seconds; elementwise over arrays of FLOPs and bytes. No work costs nothing.

    ``rows``, ``inner`` and ``cols`` are a GEMM's M, K and N (shape factors, see the module
    docstring); ``dequant_weights`` the weight elements a weight-only quantised GEMM
    dequantises. ``isolated``: one call timed on its own (the launch always adds, as in a
    measured kernel table). ``attention``: (keys per query L, head dim) of an attention core,
    whose efficiency is ``attention_efficiency * L / (L + attention_keys_half) * hd / (hd +
    attention_head_dim_half)``, at most ``attention_efficiency_max`` (FlashAttention-3,
    arXiv:2407.08608, Fig. 5: shorter sequences and narrower heads reach less of the peak;
    FlashMLA's deep-dive: the tensor cores sustain about 0.7 of the dense peak)."""
    flops, memory_bytes = np.asarray(flops, dtype=float), np.asarray(memory_bytes, dtype=float)
    eff = device.efficiency(compute_dtype)
    if attention is not None and device.attention_efficiency is not None:
        keys, head_dim = attention
        eff = device.attention_efficiency
        eff *= keys / (keys + device.attention_keys_half) if keys > 0 else 1.0
        eff *= head_dim / (head_dim + device.attention_head_dim_half)
        eff = min(eff, device.attention_efficiency_max)
    occ = 1.0
    split_k_s = 0.0
    if rows is not None:
        m = np.asarray(rows, dtype=float)
        if device.gemm_m_half > 0:
            eff = eff * np.where(m > 0, m / (m + device.gemm_m_half), 1.0)
        half = device.gemm_tiles_half.get(compute_dtype, 0.0)
        if half > 0 and cols is not None:
            tiles = np.ceil(m / GEMM_TILE) * np.ceil(cols / GEMM_TILE)
            occ = np.where(tiles > 0, tiles / (tiles + half), 1.0)
            eff = eff * occ
        extra = device.gemm_split_k_launch_s.get(compute_dtype, 0.0)
        if extra > 0 and cols is not None:
            tiles = np.ceil(m / GEMM_TILE) * np.ceil(cols / GEMM_TILE)
            split_k_s = np.where(tiles < device.gemm_split_k_below_tiles, extra, 0.0)
    if inner is not None and device.gemm_k_half > 0:
        eff = eff * inner / (inner + device.gemm_k_half)
    compute_s = flops / (device.flops_per_s(compute_dtype) * eff)
    if dequant_weights is not None and device.dequant_ops_per_weight > 0:
        vector = device.flops_per_s("fp32")
        compute_s = compute_s + np.where(
            flops > 0, dequant_weights * device.dequant_ops_per_weight / vector, 0.0
        )
    bw = device.memory_bandwidth_bytes_per_s * device.memory_efficiency * occ
    memory_s = memory_bytes / bw
    busy = (flops > 0) | (memory_bytes > 0)
    launch = np.where(busy, kernels * (device.kernel_launch_s + split_k_s), 0.0)
    roof = np.maximum(compute_s, memory_s)
    if device.async_launch and not isolated:
        return np.maximum(roof, launch)
    return roof + launch


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
    cols = op.gemm[1] if op.gemm is not None else None
    t = kernel_time_s(
        device,
        op.flops,
        memory,
        compute_dtype,
        kernels,
        op.rows,
        op.inner,
        cols,
        op.dequant_weights,
        attention=op.attention,
    )
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
