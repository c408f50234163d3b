"""Processing-in-memory placement: which work of a step runs on each GPU's PIM units.

Every GPU gets ``pim.units_per_gpu`` units of ``pim.device`` (a separate memory pool joined to
it by the unit's host link). Policies (``pim.policy``):

- ``gpu_only``: nothing runs on PIM (the baseline with the same hardware).
- ``all_experts``: every routed expert's weights live on PIM and its tokens run there.
- ``cold_experts``: an expert is cold when its expected tokens per step on its device
  (expected load share x routed pairs of its group x its placement share) are at most
  ``token_threshold``; cold experts live and run on PIM, hot ones on the GPU, concurrently.
- ``attention``: the attention core and the KV cache of softmax layers move to PIM; the
  projections and the experts stay on the GPU (AttAcc-style; linear / MLA layers stay).
- ``by_batch``: every expert's weights are kept on both; each (device, expert) runs on PIM
  when it has at most ``token_threshold`` tokens this step (GEMV), else on the GPU (GEMM).
- ``co_processing``: ``attention`` and ``by_batch`` together (Duplex's expert and attention
  co-processing); the layer's attention work is ``lp.pim_attention``, its experts' ``lp.pim``.

``token_threshold`` defaults to the crossover of one expert (moesim.cost.pim.crossover_tokens).
The plan gets, per layer, a :class:`PimWork` (per-device PIM seconds, activations in and out,
FLOPs and internal bytes); the GPU keeps the rest. The engine runs expert work on PIM
concurrently with the GPU's experts and attention work after the GPU's projections, and moves
the activations as flows over the GPU-PIM links.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim import catalog
from moesim.config.resolve import resolve
from moesim.config.scenario import Scenario, ScenarioError
from moesim.cost.ops import (
    Bytes,
    OpCost,
    expert_ops,
    kv_cache_bytes_per_token,
)
from moesim.cost.pim import crossover_tokens, internal_bytes, pim_op_time_s
from moesim.cost.weights import expert_params_per_shard
from moesim.plan.layout import dtype_bytes, layout
from moesim.plan.tiers import add_layer_totals, apply_tier_memory
from moesim.plan.types import PimWork

if TYPE_CHECKING:
    import pandas as pd

    from moesim.plan.types import LayerPlan, WorkloadPlan


def token_threshold(sc: Scenario, d_ff: float, b: Bytes) -> int:
    """``pim.token_threshold`` or, by default, the one-expert crossover on these devices."""
    pc = sc.pim
    assert pc is not None
    if pc.token_threshold is not None:
        return pc.token_threshold
    return crossover_tokens(
        sc.model.d_model,
        d_ff,
        b,
        sc.cluster.device,
        sc.workload.dtypes.compute,
        pc.device,
        resolve(sc).pim_compute_dtype,
        pc.units_per_gpu,
        catalog.link(pc.device.host_link),
        max_tokens=4096,
    )


def _work(sc: Scenario, phase: str, ops: list[OpCost], w_bytes: float) -> tuple[np.ndarray, ...]:
    """(seconds, FLOPs, internal bytes) of ops on the PIM units, summed over the last axis
    when the ops are per (device, expert)."""
    pc = sc.pim
    assert pc is not None
    cdt = resolve(sc).pim_compute_dtype
    seconds = sum(pim_op_time_s(pc.device, op, w_bytes, cdt, pc.units_per_gpu) for op in ops)
    flops = sum(np.asarray(op.flops, dtype=float) for op in ops)
    moved = sum(internal_bytes(pc.device, op, w_bytes) for op in ops)
    parts = [np.asarray(x, dtype=float) for x in (seconds, flops, moved)]
    if phase == "experts":
        parts = [x.sum(axis=1) for x in parts]
    return tuple(parts)


def _all_experts(sc, load, expected, share, d_ff, b) -> np.ndarray:
    return np.ones(load.shape, dtype=bool)


def _cold_experts(sc, load, expected, share, d_ff, b) -> np.ndarray:
    """Experts whose expected tokens on a device are at most the threshold."""
    par = sc.parallelism
    g = np.arange(load.shape[0])
    group, rank = g // (par.ep * par.etp), (g % (par.ep * par.etp)) // par.etp
    pairs = np.bincount(group, weights=load.sum(axis=1)) / par.etp  # routed pairs per group
    expected_tokens = expected[None, :] * pairs[group][:, None] * share[:, rank].T
    return expected_tokens <= token_threshold(sc, d_ff, b)


def _by_batch(sc, load, expected, share, d_ff, b) -> np.ndarray:
    """This step's (device, expert) token counts at most the threshold (GEMV on PIM)."""
    return load <= token_threshold(sc, d_ff, b)


EXPERTS_ON_PIM = {
    "all_experts": _all_experts,
    "cold_experts": _cold_experts,
    "by_batch": _by_batch,
    "co_processing": _by_batch,
}
"""``pim.policy`` -> which (device, expert) pairs of a layer run on PIM, ``[device, expert]``
bool (before masking to the experts the device holds)."""


def split_experts(
    sc: Scenario,
    lp: LayerPlan,
    load: np.ndarray,
    expected: np.ndarray,
    share: np.ndarray,
    d_ff: float,
    b: Bytes,
) -> np.ndarray:
    """Split one MoE layer's tokens per (device, expert) between GPU and PIM.

    ``load`` is ``[device, expert]`` tokens, ``expected`` the expected share of routed pairs
    per expert, ``share`` the ``[expert, ep_rank]`` placement shares. Returns the GPU's part
    of ``load`` and sets the layer's ``lp.pim`` when experts run on PIM."""
    pc = sc.pim
    if pc is None or not pc.experts_on_pim:
        return load
    par = sc.parallelism
    n_dev = load.shape[0]
    g = np.arange(n_dev)
    rank = (g % (par.ep * par.etp)) // par.etp
    local = (share[:, rank] > 0).T  # [device, expert]: expert (a shard of it) on this device
    on_pim = local & EXPERTS_ON_PIM[pc.policy](sc, load, expected, share, d_ff, b)
    resident = local if pc.per_step_experts else on_pim
    pim_load = np.where(on_pim, load, 0)
    seconds, flops, moved = _work(
        sc, "experts", expert_ops(pim_load, sc.model.d_model, d_ff, b), b.expert_weights
    )
    tokens = pim_load.sum(axis=1)
    io = tokens * sc.model.d_model * b.activations
    if lp.pim is not None:  # co_processing: the layer's attention is on PIM too
        lp.pim_attention = lp.pim
    lp.pim = PimWork("experts", seconds, io, io.copy(), flops, moved, tokens, resident.sum(axis=1))
    return load - pim_load


def pim_works(plan: WorkloadPlan) -> list[PimWork]:
    """Every layer's PIM work: attention (co_processing keeps it in ``pim_attention``) and
    experts."""
    return [w for lp in plan.layers for w in (lp.pim_attention, lp.pim) if w is not None]


def split_attention(
    sc: Scenario, kind: str, ops: list[OpCost], n_devices: int
) -> tuple[list[OpCost], PimWork | None]:
    """Policy ``attention``: the softmax attention core (scores, softmax, weighted values over
    the KV cache) runs on PIM; the projections stay on the GPU. New queries, keys and values
    (the ``qkv_proj`` output) go in, the attention output (``o_proj``'s input) comes back."""
    pc = sc.pim
    if pc is None or not pc.attention_on_pim or kind != "softmax":
        return ops, None
    ab = sc.workload.dtypes.bytes_of("activations")
    core = [op for op in ops if op.name == "attention_core"]
    rest = [op for op in ops if op.name != "attention_core"]
    qkv = next(op for op in ops if op.name == "qkv_proj")
    o = next(op for op in ops if op.name == "o_proj")
    ones = np.ones(n_devices)
    in_bytes = np.asarray(qkv.rows, dtype=float) * qkv.gemm[1] * ab * ones
    out_bytes = np.asarray(o.rows, dtype=float) * o.gemm[0] * ab * ones
    seconds, flops, moved = _work(sc, "attention", core, 0.0)
    tokens = np.asarray(qkv.rows, dtype=float) * ones
    work = PimWork(
        "attention",
        seconds * ones,
        in_bytes,
        out_bytes,
        flops * ones,
        moved * ones,
        tokens,
        np.zeros(n_devices),
    )
    return rest, work


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def apply_memory(sc: Scenario, plan: WorkloadPlan, b: Bytes) -> None:
    """Move what lives off the GPU out of its memory: offloaded experts into their tier
    (moesim/plan/tiers.py), what lives on PIM into ``plan.pim_memory_bytes``
    (``{"weights": ..., "kv_cache": ...}`` per device), and check it fits on the units.

    Expert weights on PIM leave the GPU (``by_batch`` keeps a copy on both); policy
    ``attention`` moves the KV cache of the softmax layers. Raises :class:`ScenarioError`
    naming the part, the GPU and the shortfall when the units cannot hold it."""
    apply_tier_memory(sc, plan)  # offloaded experts leave the GPU (moesim/plan/tiers.py)
    pc = sc.pim
    if pc is None:
        return
    m, par = sc.model, sc.parallelism
    n_dev = plan.n_devices
    expert_bytes = expert_params_per_shard(m, par.etp) * b.expert_weights
    held = sum(
        (lp.pim.resident_experts for lp in plan.layers if lp.pim is not None),
        np.zeros(n_dev),
    )
    weights = held * expert_bytes
    if not pc.per_step_experts:
        plan.memory_bytes["weights"] = plan.memory_bytes["weights"] - weights
    kv = np.zeros(n_dev)
    if pc.attention_on_pim:
        if pc.device.weight_stationary:
            raise ScenarioError(
                "pim.policy", f"{pc.device.name} is weight-stationary: it cannot hold a KV cache"
            )
        kv = layout(sc).seqs_dev * _context(sc) * pim_kv_bytes_per_token(sc)
        plan.memory_bytes["kv_cache"] = plan.memory_bytes["kv_cache"] - kv
    plan.pim_memory_bytes = {"weights": weights, "kv_cache": kv}
    used = weights + kv
    cap = pc.units_per_gpu * pc.device.capacity_bytes
    worst = int(np.argmax(used))
    if used[worst] > cap:
        n = sc.cluster.devices_per_node
        raise ScenarioError(
            "pim.device",
            f"does not fit: the {pc.units_per_gpu} x {pc.device.name} of GPU "
            f"n{worst // n}.d{worst % n} must hold {_size(used[worst])} (expert weights "
            f"{_size(weights[worst])}, kv_cache {_size(kv[worst])}) but they hold "
            f"{_size(cap)} (short by {_size(used[worst] - cap)}); add pim.units_per_gpu or "
            f"use smaller dtypes",
        )


def sub_batch_scenarios(sc: Scenario) -> list[Scenario]:
    """``pim.sub_batches: 2`` on a decode step: the two halves of the batch (``B - B // 2``
    and ``B // 2`` sequences), each a step of its own whose plan times that sub-batch; the
    step graph interleaves them (moesim/plan/graph.py). Nothing to split otherwise."""
    pc, wl = sc.pim, sc.workload
    if pc is None or pc.sub_batches == 1 or wl.phase != "decode" or wl.batch_size < 2:
        return []
    one = pc.model_copy(update={"sub_batches": 1})
    return [
        sc.model_copy(update={"workload": wl.model_copy(update={"batch_size": size}), "pim": one})
        for size in (wl.batch_size - wl.batch_size // 2, wl.batch_size // 2)
    ]


# -- capacity: what PIM memory holds, for the largest batch a cluster can run ----------------
def _context(sc: Scenario) -> int:
    """Tokens each sequence keeps in the KV cache during the step (decode: the new one too)."""
    wl = sc.workload
    return wl.seq_len + (1 if wl.phase == "decode" else 0)


def pim_capacity_bytes(sc: Scenario) -> float:
    """PIM memory per GPU: ``units_per_gpu x capacity_bytes`` (0 without PIM units or with
    policy ``gpu_only``, which uses none of it)."""
    pc = sc.pim
    if pc is None or pc.policy == "gpu_only":
        return 0.0
    return pc.units_per_gpu * pc.device.capacity_bytes


def pim_kv_bytes_per_token(sc: Scenario) -> float:
    """KV-cache bytes one token of context puts on a GPU's PIM units instead of its HBM:
    policy ``attention`` moves the softmax layers' cache (``2 x kv_heads / tp x head_dim x
    kv bytes`` per layer, moesim/cost/ops.py), nothing otherwise."""
    pc = sc.pim
    if pc is None or not pc.attention_on_pim:
        return 0.0
    m, tp = sc.model, sc.parallelism.tp
    b = dtype_bytes(sc)
    return float(
        sum(
            kv_cache_bytes_per_token(m, i, tp, b)
            for i in range(m.n_layers)
            if m.attention_kind(i) == "softmax"
        )
    )


def pim_expert_bytes(sc: Scenario) -> float:
    """Expert weight bytes a GPU's PIM units hold whatever the routing: every local routed
    expert of every MoE layer for ``all_experts`` and ``by_batch`` (``by_batch`` keeps a copy
    on the GPU too), none for ``attention`` and ``gpu_only``. ``cold_experts`` depends on the
    step's routing; it counts as ``all_experts`` here, the most it can hold."""
    pc = sc.pim
    if pc is None or not pc.experts_on_pim:
        return 0.0
    m, par = sc.model, sc.parallelism
    local = m.n_experts / par.ep
    moe_layers = sum(m.is_moe(i) for i in range(m.n_layers))
    return moe_layers * local * expert_params_per_shard(m, par.etp) * dtype_bytes(sc).expert_weights


def expert_bytes_off_gpu(sc: Scenario) -> float:
    """Expert weight bytes PIM takes off each GPU whatever the routing: ``pim_expert_bytes``
    for ``all_experts``; none for ``by_batch`` and ``co_processing`` (a copy stays on the GPU),
    ``attention`` and ``gpu_only``; none for ``cold_experts`` either, which moves only the
    experts a step's routing finds cold (the GPU must hold the rest)."""
    pc = sc.pim
    if pc is None or pc.policy != "all_experts":
        return 0.0
    return pim_expert_bytes(sc)


def pim_max_batch(sc: Scenario) -> int | None:
    """The largest ``workload.batch_size`` whose KV cache the PIM units hold at the scenario's
    context (policy ``attention``; None when PIM holds no KV cache):

    ``dp x floor((pim_capacity_bytes - pim_expert_bytes) / (context x pim_kv_bytes_per_token))``

    with ``dp = devices / tp`` attention replicas, each GPU of a replica holding its replica's
    sequences (its ``1 / tp`` of the heads). The GPU's own memory (weights, activations, the
    KV cache of other attention kinds) bounds the batch separately."""
    per_token = pim_kv_bytes_per_token(sc)
    if per_token == 0:
        return None
    free = pim_capacity_bytes(sc) - pim_expert_bytes(sc)
    dp = sc.cluster.n_devices // sc.parallelism.tp
    return dp * max(0, int(free // (_context(sc) * per_token)))


def without_memory_limits(sc: Scenario) -> dict[str, Any]:
    """Scenario updates that lift the PIM units' and memory tiers' capacity, for timing a step
    whose memory a scheduler checks itself (serving's iteration grid)."""
    updates: dict[str, Any] = {}
    if sc.pim is not None:
        device = sc.pim.device.model_copy(update={"capacity_bytes": math.inf})
        updates["pim"] = sc.pim.model_copy(update={"device": device})
    if sc.tiers is not None:
        updates["tiers"] = sc.tiers.model_copy(update={"capacity_bytes": math.inf})
    return updates


def kv_budget_bytes(sc: Scenario, gpu_free_bytes: float, kv_bytes_per_token: float) -> float:
    """The KV budget per device, in bytes of ``kv_bytes_per_token`` (the whole cache of one
    token, all layers), when PIM holds part of it (policy ``attention``): the tokens that fit
    are the fewer of the GPU's (``gpu_free / (kv - pim part)``) and the PIM units'
    (``(pim_capacity - pim_expert_bytes) / pim part``). Without a PIM KV cache:
    ``gpu_free_bytes``."""
    on_pim = pim_kv_bytes_per_token(sc)
    if on_pim == 0:
        return gpu_free_bytes
    pim_free = pim_capacity_bytes(sc) - pim_expert_bytes(sc)
    tokens = pim_free / on_pim
    on_gpu = kv_bytes_per_token - on_pim
    if on_gpu > 0:
        tokens = min(tokens, gpu_free_bytes / on_gpu)
    return tokens * kv_bytes_per_token


def pim_summary(plan: WorkloadPlan, devices: pd.DataFrame) -> dict | None:
    """Add ``pim_busy_s``, ``pim_flops``, ``pim_tokens`` and ``pim_memory_bytes`` to the
    devices table; return the summary's ``pim`` entry (None without PIM units)."""
    sc = plan.scenario
    pc = sc.pim
    if pc is None:
        return None
    n = plan.n_devices
    work = pim_works(plan)
    add_layer_totals(devices, work, n, pim_busy_s="seconds", pim_flops="flops", pim_tokens="tokens")
    used = sum(plan.pim_memory_bytes.values(), np.zeros(n))
    devices["pim_memory_bytes"] = used
    expert_work = next((w for w in work if w.phase == "experts"), None)
    threshold = None
    if pc.policy in ("cold_experts", "by_batch", "co_processing") and expert_work is not None:
        b = dtype_bytes(sc)
        threshold = token_threshold(sc, sc.model.d_ff_expert / sc.parallelism.etp, b)
    return {
        "device": pc.device.name,
        "units_per_gpu": pc.units_per_gpu,
        "policy": pc.policy,
        "token_threshold": threshold,
        "max_busy_s": float(devices["pim_busy_s"].max()),
        "max_used_bytes": float(used.max()),
        "capacity_bytes": float(pc.units_per_gpu * pc.device.capacity_bytes),
    }
