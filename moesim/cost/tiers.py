"""Memory tiers for expert weights: what an offloaded expert costs when a token needs it.

An expert whose weights live in a slower tier (host DRAM, CXL-attached memory) is either

- **fetched** to the GPU over the tier's link (PCIe, CXL): one expert takes
  ``t = bytes / min(link bandwidth, tier bandwidth) + link latency``, a layer's experts stream
  back to back (:func:`fetch_time_s`), then run on the GPU as if resident; or
- **run where it lives**, on the host CPU (Fiddler, MoE-Lightning's CPU attention): the host's
  roofline over its own memory for the expert's GEMMs, plus the token activations over the link
  both ways, ``2 (tokens d a / link + latency)`` (:func:`host_expert_time_s`).

A SwiGLU expert holds ``3 d f`` weights (gate, up: ``d x f``; down: ``f x d``), so fetching one
moves ``3 d f w`` bytes (:func:`expert_bytes`). Fetching pays off against running on the host when
the expert has many tokens: the fetch is fixed, the host's time grows with the tokens.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from moesim.catalog.specs import GpuSpec, LinkSpec, ModelSpec
from moesim.cost.ops import Bytes, expert_ops
from moesim.cost.roofline import op_kernels, op_time_s
from moesim.cost.weights import expert_params_per_shard


def expert_bytes(m: ModelSpec, etp: int, w_bytes: float) -> float:
    """Weight bytes of one routed expert's shard: ``3 d f / etp x w`` (moesim/cost/weights.py)."""
    return expert_params_per_shard(m, etp) * w_bytes


def fetch_bandwidth_bytes_per_s(link: LinkSpec, tier_bandwidth_bytes_per_s: float | None) -> float:
    """A fetch streams at the slower of the link and the tier's own memory."""
    if tier_bandwidth_bytes_per_s is None:
        return link.bandwidth_bytes_per_s
    return min(link.bandwidth_bytes_per_s, tier_bandwidth_bytes_per_s)


def fetch_time_s(
    fetches: ArrayLike,
    nbytes: float,
    link: LinkSpec,
    tier_bandwidth_bytes_per_s: float | None = None,
) -> np.ndarray:
    """Seconds to fetch ``fetches`` experts of ``nbytes`` each over one link as one stream of
    DMA copies: ``fetches x nbytes / bandwidth + latency`` (0 for no fetch)."""
    n = np.asarray(fetches, dtype=float)
    bw = fetch_bandwidth_bytes_per_s(link, tier_bandwidth_bytes_per_s)
    return np.where(n > 0, n * nbytes / bw + link.latency_s, 0.0)


def host_expert_time_s(
    tokens: ArrayLike,
    d_model: int,
    d_ff: float,
    b: Bytes,
    host: GpuSpec,
    dtype: str,
    link: LinkSpec,
) -> np.ndarray:
    """Seconds of experts run on the host CPU, per row of ``tokens`` (``[..., expert]`` token
    counts, summed over the last axis): each expert's roofline on the host (weights read from
    its memory), one launch per kernel where it has tokens, and the activations of all its
    tokens to the host and back over ``link`` (two transfers, each with the link latency)."""
    tokens = np.asarray(tokens, dtype=float)
    ops = expert_ops(tokens, d_model, d_ff, b)
    busy = tokens > 0
    kernels = sum(np.where(busy, op_kernels(host, op) * host.kernel_launch_s, 0.0) for op in ops)
    compute = sum(np.where(busy, op_time_s(host, op, dtype, launches=False), 0.0) for op in ops)
    total = tokens.sum(axis=-1)
    io = total * d_model * b.activations / link.bandwidth_bytes_per_s + link.latency_s
    return np.asarray((compute + kernels).sum(axis=-1) + np.where(total > 0, 2 * io, 0.0))
