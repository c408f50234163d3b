"""Energy of one step: every device, its PIM units and every link, from the plan's counts.

Per GPU (constants in moesim/catalog/devices.yaml, 0 where a device does not give them):

- compute: ``flops x energy_pj_per_flop`` (the plan's FLOPs, as ``devices.csv`` ``flops``);
- memory: ``bytes read x 8 x memory_energy_pj_per_bit`` (:func:`gpu_bytes_read`): resident
  non-expert weights and KV cache once per step, each expert's weights once per layer where it
  has tokens on the GPU (activation traffic, second order next to weights in decode and to
  FLOPs in prefill, is left out);
- static: ``idle_power_w x step time``.

Per device's PIM units: compute ``pim FLOPs x (energy_pj_per_flop + adc_energy_pj_per_flop)``,
memory ``internal bytes x 8 x energy_pj_per_bit_internal`` (the bytes the PIM kernels move inside
the memory), static ``units x idle_power_w x step time``. Memory tiers (moesim/plan/tiers.py):
fetched weights on the ``tier`` links, the host's activations, FLOPs and weight reads. Per
link: ``bytes carried x 8 x energy_pj_per_bit`` of its link spec (intra: the intra-node link;
host: the NIC link; network and spine: the inter-node link; pim: the PIM unit's host link;
tier: the memory tier's link). Everything is a sum of
count x constant, so the total is the sum of its parts and, for a fixed per-token workload and
step time, linear in tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim import catalog
from moesim.config.resolve import resolve
from moesim.cost.weights import expert_params_per_shard
from moesim.network import Topology
from moesim.plan.layout import dtype_bytes
from moesim.plan.pim_placement import pim_works
from moesim.plan.tiers import fetch_buffer_bytes
from moesim.plan.types import WorkloadPlan

if TYPE_CHECKING:
    import pandas as pd

PJ = 1e-12
BITS_PER_BYTE = 8.0


def _link_pj_per_bit(plan: WorkloadPlan, topo: Topology) -> np.ndarray:
    """Energy per bit of each link, from the spec behind its kind."""
    sc = plan.scenario
    t = resolve(sc).topology
    by_kind = {
        "intra": t.intra_node_link.energy_pj_per_bit,
        "host": t.nic_host_link.energy_pj_per_bit,
        "network": t.inter_node_link.energy_pj_per_bit,
        "spine": t.inter_node_link.energy_pj_per_bit,
    }
    if sc.pim is not None:
        by_kind["pim"] = catalog.link(sc.pim.device.host_link).energy_pj_per_bit
    if sc.tiers is not None:  # fetched experts (moesim/plan/tiers.py)
        by_kind["tier"] = sc.tiers.link.energy_pj_per_bit
    return np.array([by_kind.get(k, 0.0) for k in topo.link_kinds], dtype=float)


def gpu_bytes_read(plan: WorkloadPlan) -> np.ndarray:
    """HBM bytes each GPU reads in the step: its non-expert weights and KV cache once, and the
    weights of each expert that has tokens on it, once per layer (resident or fetched); with PIM
    sub-batches, once per sub-batch (each runs its own kernels)."""
    if plan.sub_plans:
        return sum(gpu_bytes_read(half) for half in plan.sub_plans)
    sc = plan.scenario
    m, par = sc.model, sc.parallelism
    n = plan.n_devices
    zeros = np.zeros(n)
    b = dtype_bytes(sc)
    expert_bytes = expert_params_per_shard(m, par.etp) * b.expert_weights
    moe = [lp for lp in plan.layers if lp.moe]
    held = sum((lp.local_experts for lp in moe), zeros) * expert_bytes
    if sc.pim is not None and not sc.pim.per_step_experts:  # moved off the GPU
        held = held - plan.pim_memory_bytes.get("weights", zeros)
    if plan.tier_memory_bytes is not None:  # offloaded; the fetch buffer is expert memory
        held = held - plan.tier_memory_bytes + fetch_buffer_bytes(plan)
    read = sum((lp.expert_weight_bytes for lp in moe if lp.expert_weight_bytes is not None), zeros)
    weights = plan.memory_bytes.get("weights", zeros)
    return weights - held + read + plan.memory_bytes.get("kv_cache", zeros)


def _tier_parts(plan: WorkloadPlan, step_s: float) -> dict[str, np.ndarray]:
    """Per device: ``tier_link_j``, the host's activations over the tier's link (``bytes x 8 x
    energy_pj_per_bit``; fetched weights cross the topology's ``tier`` links and count there);
    ``host_compute_j`` and ``host_memory_j``, the host's FLOPs and the expert weights it reads,
    at its catalog constants (its static power is the host's, outside the accelerators, and
    left out)."""
    t = plan.scenario.tiers
    n = plan.n_devices
    work = [lp.tiers for lp in plan.layers if lp.tiers is not None]
    moved = sum((w.io_bytes for w in work), np.zeros(n))
    parts = {"tier_link_j": moved * BITS_PER_BYTE * t.link.energy_pj_per_bit * PJ}
    if t.host is not None and t.execute == "host":
        flops = sum((w.host_flops for w in work), np.zeros(n))
        read = sum((w.host_weight_bytes for w in work), np.zeros(n))
        parts["host_compute_j"] = flops * t.host.energy_pj_per_flop * PJ
        parts["host_memory_j"] = read * BITS_PER_BYTE * t.host.memory_energy_pj_per_bit * PJ
    return parts


def add_energy(
    plan: WorkloadPlan,
    topo: Topology,
    devices: pd.DataFrame | dict[str, Any],
    links: pd.DataFrame | dict[str, Any],
    step_s: float,
) -> dict[str, Any]:
    """Add energy columns to ``devices`` (``gpu_*_j``, ``pim_*_j``, ``energy_j``: the GPU and
    its PIM units) and ``links`` (``energy_j``), DataFrames or columns by name; return the
    ``energy_j`` summary: ``total``, ``per_token`` and the breakdown by kind, which sums to the
    total."""
    sc = plan.scenario
    gpu = sc.cluster.device
    n = plan.n_devices
    zeros = np.zeros(n)
    flops = np.asarray(devices["flops"], dtype=float)
    parts = {"gpu_compute_j": flops * gpu.energy_pj_per_flop * PJ}
    parts["gpu_memory_j"] = gpu_bytes_read(plan) * BITS_PER_BYTE * gpu.memory_energy_pj_per_bit * PJ
    parts["gpu_static_j"] = np.full(n, gpu.idle_power_w * step_s)
    parts["pim_compute_j"] = parts["pim_memory_j"] = parts["pim_static_j"] = zeros
    pc = sc.pim
    if pc is not None:
        work = pim_works(plan)
        pim_flops = sum((w.flops for w in work), zeros)
        pim_bytes = sum((w.internal_bytes for w in work), zeros)
        spec = pc.device
        parts["pim_compute_j"] = (
            pim_flops * (spec.energy_pj_per_flop + spec.adc_energy_pj_per_flop) * PJ
        )
        parts["pim_memory_j"] = pim_bytes * BITS_PER_BYTE * spec.energy_pj_per_bit_internal * PJ
        parts["pim_static_j"] = np.full(n, pc.units_per_gpu * spec.idle_power_w * step_s)
    if sc.tiers is not None:  # offloaded experts (moesim/plan/tiers.py)
        parts.update(_tier_parts(plan, step_s))
    for key, value in parts.items():
        devices[key] = value
    devices["energy_j"] = sum(parts.values())
    pj_per_bit = _link_pj_per_bit(plan, topo)
    links["energy_j"] = np.asarray(links["bytes_carried"], float) * BITS_PER_BYTE * pj_per_bit * PJ
    breakdown = {key.removesuffix("_j"): float(np.sum(v)) for key, v in parts.items()}
    kinds, link_j = np.asarray(links["kind"]), np.asarray(links["energy_j"])
    for kind in sorted(set(kinds.tolist())):
        breakdown[f"links_{kind}"] = math.fsum(link_j[kinds == kind])  # correctly rounded
    total = float(np.sum(devices["energy_j"]) + link_j.sum())
    return {
        "total": total,
        "per_token": total / plan.tokens if plan.tokens else 0.0,
        "breakdown": breakdown,
    }
