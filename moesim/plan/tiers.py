"""Memory tiers for routed experts: which experts of each layer are resident in HBM, which are
fetched (or run on the host) this step, and what the GPU waits for.

With a ``tiers:`` block every GPU keeps ``tiers.hbm_experts`` of its local experts per MoE layer
in HBM, chosen by ``tiers.cache``:

- ``expected_load``: the ones with the highest expected load (ties: lower expert id);
- ``lru``: the ones the preceding steps used last; those steps' routing is drawn from the same
  expected load with the same routed pairs per device (a seed of its own per layer, derived
  from ``sim.seed``), going back until the cache is full or 64 steps.

The other local experts live in the tier (``tiers.memory``). An offloaded expert with tokens
this step is ``needed``:

- ``execute: fetch``: its ``3 d f w`` weight bytes cross the device's tier link (a ``tier``
  link on the topology, moesim/network/topology.py) as a transfer node of the step graph,
  issued once the layer's router has chosen the experts and overlapping the permute and the
  dispatch; the expert kernels wait for it (phase ``expert_fetch``). No prefetch into the
  previous layer: the router decides only then. HBM holds one layer's fetched experts at a
  time (a buffer counted in the GPU's ``weights``).
- ``execute: host``: its tokens run on the host CPU (``tiers.host``, one per node, shared by
  the node's GPUs: their host work runs one after another) beside the GPU's resident experts;
  the experts phase is ``max(GPU experts, host experts + activations over the link)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moesim.config.scenario import Scenario, ScenarioError
from moesim.cost.ops import Bytes, expert_ops
from moesim.cost.tiers import expert_bytes, fetch_time_s, host_expert_time_s

if TYPE_CHECKING:
    from moesim.plan.types import LayerPlan, WorkloadPlan

LRU_HISTORY_STEPS = 64
"""Preceding steps the ``lru`` cache looks back over at most."""


@dataclass
class TierWork:
    """One MoE layer's tiered experts, per device (arrays of length n_devices)."""

    resident: np.ndarray  # local experts kept in HBM
    offloaded: np.ndarray  # local experts living in the tier
    needed: np.ndarray  # offloaded experts with tokens this step
    expert_bytes: float  # weight bytes of one expert (shard)
    fetch_bytes: np.ndarray  # execute: fetch
    fetch_s: np.ndarray
    host_s: np.ndarray  # execute: host (the node's host time, on each of its devices)
    host_tokens: np.ndarray
    host_flops: np.ndarray
    host_weight_bytes: np.ndarray  # weights the host reads from its memory
    io_bytes: np.ndarray  # activations to the host and back


def _lru_resident(
    local: np.ndarray, load: np.ndarray, expected: np.ndarray, keep: int, seed
) -> np.ndarray:
    """``[device, expert]`` mask of the ``keep`` local experts used last over preceding steps
    whose per-device routed pairs equal this step's, drawn from ``expected``."""
    rng = np.random.default_rng(seed)
    n_dev, n_exp = local.shape
    last = np.full((n_dev, n_exp), -np.inf)
    p = np.where(local, expected[None, :], 0.0)
    total = p.sum(axis=1, keepdims=True)
    p = np.divide(p, total, out=np.full_like(p, 1.0 / n_exp), where=total > 0)
    pairs = load.sum(axis=1).astype(np.int64)
    for back in range(1, LRU_HISTORY_STEPS + 1):
        used = rng.multinomial(pairs, p) > 0
        last = np.where(used & np.isinf(last), -back, last)
        if ((~np.isinf(last)).sum(axis=1) >= np.minimum(keep, local.sum(axis=1))).all():
            break
    score = np.where(local, last * (n_exp + 1) + expected[None, :], -np.inf)  # ties: load
    return _top(score, local, keep)


def _top(score: np.ndarray, local: np.ndarray, keep: int) -> np.ndarray:
    """Mask of the ``keep`` highest-scoring local entries per row (stable: lower index first)."""
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(score.shape[1])[None, :], axis=1)
    return local & (rank < keep)


def offload_experts(
    sc: Scenario,
    lp: LayerPlan,
    load: np.ndarray,
    slot_e: np.ndarray,
    slot_ok: np.ndarray,
    expected: np.ndarray,
    d_ff: float,
    b: Bytes,
) -> np.ndarray:
    """Set ``lp.tiers`` for one MoE layer and return the GPU's part of ``load``.

    ``load`` is ``[device, slot]`` tokens of each device's local expert slots (``slot_e``
    their expert ids, ``slot_ok`` the valid ones), ``expected`` the expected share of routed
    pairs per expert. With ``execute: host`` the offloaded experts' tokens leave the GPU."""
    t = sc.tiers
    assert t is not None
    m = sc.model
    n_dev = load.shape[0]
    dense = np.zeros((n_dev, m.n_experts + 1), dtype=np.int64)  # last column: padding
    np.put_along_axis(dense, np.where(slot_ok, slot_e, m.n_experts), load, axis=1)
    dense = dense[:, :-1]
    local = np.zeros((n_dev, m.n_experts), dtype=bool)
    np.put_along_axis(local, np.where(slot_ok, slot_e, 0), slot_ok, axis=1)
    if t.cache == "lru":
        seed = np.random.SeedSequence(sc.sim.seed, spawn_key=(lp.index, 1))  # its own stream
        resident = _lru_resident(local, dense, expected, t.hbm_experts, seed)
    else:
        score = np.where(local, expected[None, :], -np.inf)
        resident = _top(score, local, t.hbm_experts)
    offloaded = local & ~resident
    needed = offloaded & (dense > 0)
    nbytes = expert_bytes(m, sc.parallelism.etp, b.expert_weights)
    zeros = np.zeros(n_dev)
    count = needed.sum(axis=1).astype(float)
    work = TierWork(
        resident.sum(axis=1),
        offloaded.sum(axis=1),
        count,
        nbytes,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
        zeros,
    )
    gpu = dense
    if t.execute == "fetch":
        work.fetch_bytes = count * nbytes
        work.fetch_s = fetch_time_s(count, nbytes, t.link, t.bandwidth_bytes_per_s)
    else:
        assert t.host is not None
        on_host = np.where(needed, dense, 0)
        gpu = dense - on_host
        per_dev = host_expert_time_s(
            on_host, m.d_model, d_ff, b, t.host, sc.workload.dtypes.compute, t.link
        )
        node = np.arange(n_dev) // sc.cluster.devices_per_node
        work.host_s = np.bincount(node, weights=per_dev)[node]  # one host per node
        work.host_tokens = on_host.sum(axis=1).astype(float)
        ops = expert_ops(on_host, m.d_model, d_ff, b)
        work.host_flops = sum(np.asarray(op.flops, dtype=float) for op in ops).sum(axis=1)
        work.host_weight_bytes = count * nbytes
        work.io_bytes = 2.0 * work.host_tokens * m.d_model * b.activations
    lp.tiers = work
    return np.take_along_axis(gpu, np.where(slot_ok, slot_e, 0), axis=1) * slot_ok


def experts_phase_s(work: TierWork | None, gpu_s: np.ndarray) -> np.ndarray:
    """The experts phase with tiers, ``execute: host``: the GPU runs its resident experts
    while the host runs the offloaded ones, ``max(GPU, host)``. Fetches are nodes of the step
    graph (moesim/plan/graph.py), not part of this phase."""
    if work is None:
        return gpu_s
    return np.maximum(gpu_s, work.host_s)


def fetch_buffer_bytes(plan: WorkloadPlan) -> np.ndarray:
    """HBM per device for one layer's fetched experts at a time (``execute: fetch``): the most
    any layer fetches, in expert weight bytes; zeros otherwise."""
    t = plan.scenario.tiers
    work = [lp.tiers for lp in plan.layers if lp.tiers is not None]
    if t is None or t.execute != "fetch" or not work:
        return np.zeros(plan.n_devices)
    return np.max([w.needed for w in work], axis=0) * work[0].expert_bytes


def apply_tier_memory(sc: Scenario, plan: WorkloadPlan) -> None:
    """Offloaded experts leave the GPU's ``weights`` for ``plan.tier_memory_bytes``; a fetch
    buffer of the most experts one layer fetches joins the GPU's ``weights`` (the memory its
    fetched weights take). Raises :class:`ScenarioError` when the tier cannot hold them."""
    t = sc.tiers
    if t is None:
        return
    n = plan.n_devices
    work = [lp.tiers for lp in plan.layers if lp.tiers is not None]
    if not work:
        return
    per_expert = work[0].expert_bytes
    offloaded = sum((w.offloaded for w in work), np.zeros(n)) * per_expert
    plan.memory_bytes["weights"] = (
        plan.memory_bytes["weights"] - offloaded + fetch_buffer_bytes(plan)
    )
    plan.tier_memory_bytes = offloaded
    worst = int(np.argmax(offloaded))
    if offloaded[worst] > t.capacity_bytes:
        raise ScenarioError(
            "tiers.capacity_bytes",
            f"{t.memory} must hold {offloaded[worst] / 1e9:.1f} GB of offloaded experts for "
            f"device {worst} but holds {t.capacity_bytes / 1e9:.1f} GB; raise "
            "tiers.hbm_experts or tiers.capacity_bytes",
        )


def add_layer_totals(devices, works: list, n: int, **columns: str) -> None:
    """``devices[column] = `` the sum over layers of each work's ``attr`` (per device)."""
    for column, attr in columns.items():
        devices[column] = sum((getattr(w, attr) for w in works), np.zeros(n))


def tiers_summary(plan: WorkloadPlan, devices) -> dict | None:
    """Add ``tier_fetch_bytes``, ``tier_fetch_s``, ``host_busy_s`` and ``tier_memory_bytes``
    to the devices table; return the summary's ``tiers`` entry (None without tiers)."""
    t = plan.scenario.tiers
    if t is None:
        return None
    n = plan.n_devices
    work = [lp.tiers for lp in plan.layers if lp.tiers is not None]
    add_layer_totals(
        devices,
        work,
        n,
        tier_fetch_bytes="fetch_bytes",
        tier_fetch_s="fetch_s",
        host_busy_s="host_s",
    )
    stored = plan.tier_memory_bytes if plan.tier_memory_bytes is not None else np.zeros(n)
    devices["tier_memory_bytes"] = stored
    return {
        "memory": t.memory,
        "link": t.link.name,
        "execute": t.execute,
        "cache": t.cache,
        "hbm_experts": t.hbm_experts,
        "needed_experts": float(sum(w.needed.sum() for w in work)),
        "max_fetch_s": float(devices["tier_fetch_s"].max()),
        "max_host_s": float(devices["host_busy_s"].max()),
        "max_tier_bytes": float(np.max(stored)),
    }
