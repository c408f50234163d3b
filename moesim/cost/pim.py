"""Processing-in-memory roofline: compute units beside the DRAM banks (or inside the arrays).

A kernel placed on ``units`` PIM units of one GPU takes

``t = max(flops / (units * peak * compute_efficiency),
          internal_bytes / (units * internal_bandwidth * memory_efficiency))
      + kernels * command_overhead_s``

where ``internal_bytes`` are the weights it streams from the banks plus its intermediate
activations (a weight-stationary ``cim`` part reads neither: its weights sit in the compute
arrays, so only the compute term is left). Activations entering and leaving the units cross
the host link, ``units * min(external_bandwidth, host_link bandwidth)`` per direction; the
engine carries them as flows on the topology (moesim/network/topology.py, ``attach_pim``).

A GEMM of ``m`` tokens against a ``k x n`` weight has ``2 m k n`` FLOPs on ``k n`` weight
elements, an arithmetic intensity of ``2 m / bytes_per_weight`` FLOP per weight byte: a GPU
reads those weights over its HBM at ``memory_bandwidth`` while the PIM units read them at the
several times higher internal bandwidth, but have far fewer FLOP/s. So PIM wins while ``m`` is
small (GEMV, decode) and loses beyond a crossover ``m*`` (GEMM, prefill):
:func:`crossover_tokens` finds it for one expert.
"""

from __future__ import annotations

import numpy as np

from moesim.catalog.specs import GpuSpec, LinkSpec, PimSpec
from moesim.cost.ops import Bytes, OpCost, expert_ops
from moesim.cost.roofline import op_time_s


def weight_bytes(op: OpCost, w_bytes: float) -> np.ndarray:
    """Weight bytes an op streams: ``k * n * gemm_count`` elements when it has rows (GEMMs),
    else none (elementwise ops read only activations)."""
    if op.gemm is None or op.rows is None:
        return np.zeros_like(np.asarray(op.memory_bytes, dtype=float))
    k, n = op.gemm
    rows = np.asarray(op.rows, dtype=float)
    return np.where(rows > 0, k * n * op.gemm_count * w_bytes, 0.0)


def internal_bytes(pim: PimSpec, op: OpCost, w_bytes: float) -> np.ndarray:
    """Bytes the units move inside the memory for ``op``: everything but the weights on a
    weight-stationary part, everything on a bank-level PIM part."""
    total = np.asarray(op.memory_bytes, dtype=float)
    return total - weight_bytes(op, w_bytes) if pim.weight_stationary else total


def pim_op_time_s(
    pim: PimSpec, op: OpCost, w_bytes: float, dtype: str, units: int = 1
) -> np.ndarray:
    """Seconds of one op on ``units`` PIM units (module docstring), with one command
    overhead per kernel of the op wherever it has work."""
    flops = np.asarray(op.flops, dtype=float)
    moved = internal_bytes(pim, op, w_bytes)
    compute_s = flops / (units * pim.flops_per_s(dtype) * pim.compute_efficiency)
    if pim.internal_bandwidth_bytes_per_s is None:  # weight-stationary: operands on chip
        memory_s = np.zeros_like(compute_s)
    else:
        memory_s = moved / (units * pim.internal_bandwidth_bytes_per_s * pim.memory_efficiency)
    busy = (flops > 0) | (moved > 0)
    return np.maximum(compute_s, memory_s) + np.where(
        busy, op.kernels * pim.command_overhead_s, 0.0
    )


def link_bandwidth_bytes_per_s(pim: PimSpec, link: LinkSpec, units: int) -> float:
    """Per-direction bandwidth between a GPU and its ``units`` PIM units: each unit's pins or
    its host link, whichever is slower, times the units."""
    return units * min(pim.external_bandwidth_bytes_per_s, link.bandwidth_bytes_per_s)


def expert_time_s(
    tokens: np.ndarray,
    d_model: int,
    d_ff: float,
    b: Bytes,
    gpu: GpuSpec,
    gpu_dtype: str,
    pim: PimSpec,
    pim_dtype: str,
    units: int,
    link: LinkSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """(GPU seconds, PIM seconds) of one SwiGLU expert for each token count in ``tokens``.

    GPU: its roofline with one launch per kernel. PIM: its roofline plus the activations in
    and out over the host link (``tokens * d_model`` activations each way, bandwidth plus
    latency, one after the other as the engine runs them)."""
    tokens = np.asarray(tokens, dtype=float)
    ops = expert_ops(tokens, d_model, d_ff, b)
    gpu_s = sum(op_time_s(gpu, op, gpu_dtype) for op in ops)
    pim_s = sum(pim_op_time_s(pim, op, b.expert_weights, pim_dtype, units) for op in ops)
    bw = link_bandwidth_bytes_per_s(pim, link, units)
    io = tokens * d_model * b.activations
    transfer = np.where(tokens > 0, 2 * (io / bw + link.latency_s), 0.0)
    return np.asarray(gpu_s, dtype=float), np.asarray(pim_s, dtype=float) + transfer


def crossover_tokens(
    d_model: int,
    d_ff: float,
    b: Bytes,
    gpu: GpuSpec,
    gpu_dtype: str,
    pim: PimSpec,
    pim_dtype: str,
    units: int,
    link: LinkSpec,
    max_tokens: int = 1 << 16,
) -> int:
    """Largest token count ``m`` such that one expert is faster on PIM than on the GPU for
    every ``1 <= m' <= m`` (0: PIM never wins), evaluated on both cost models."""
    m = np.arange(1, max_tokens + 1)
    gpu_s, pim_s = expert_time_s(m, d_model, d_ff, b, gpu, gpu_dtype, pim, pim_dtype, units, link)
    slower = np.flatnonzero(pim_s >= gpu_s)
    return int(slower[0]) if len(slower) else max_tokens
