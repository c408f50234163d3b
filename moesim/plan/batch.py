"""The whole cluster's batch of a step from per-replica settings: ``workload.batch_per_replica``
(sequences per attention data-parallel replica) or ``workload.batch_size: max`` (as many
sequences as the KV cache of every replica holds).

``max`` for a decode step at context ``L`` (``seq_len``, plus the token being decoded):

    seqs per replica = floor((u x memory - W) / ((L + 1) x kv + s))

with ``u`` = ``workload.kv_memory_utilization`` (the share of device memory for weights and KV
cache; the rest is left to activations and the runtime, as vLLM's ``gpu_memory_utilization``),
``W`` the weights on the fullest device (:func:`weights_bytes_per_device`), ``kv`` the KV bytes
one token adds on one device (:func:`moesim.cost.ops.kv_cache_bytes_per_token`, GQA heads over
tp, MLA latent, cross-layer sharing) and ``s`` the fixed linear-attention state per sequence.
Every replica holds its own sequences, so the cluster's batch is that times ``dp = devices /
tp``. With PIM units the weights they hold leave ``W`` and the KV cache they hold counts on
them (:func:`moesim.plan.pim_placement.kv_budget_bytes`: the fewer tokens of GPU and PIM).
"""

from __future__ import annotations

import math

from moesim.config.resolve import resolve
from moesim.config.scenario import Scenario, ScenarioError
from moesim.cost.ops import kv_cache_bytes_per_token, linear_state_bytes_per_seq
from moesim.cost.weights import (
    dense_params_per_device,
    embedding_params_per_device,
    expert_params_per_shard,
)
from moesim.plan.layout import dtype_bytes
from moesim.plan.pim_placement import expert_bytes_off_gpu, kv_budget_bytes


def weights_bytes_per_device(sc: Scenario) -> float:
    """Weights on the fullest device (:mod:`moesim.cost.weights`): every layer's attention,
    dense FFN or shared experts and router, the embeddings, and the ``E / ep`` local experts
    (one ``etp`` shard each) an EP rank holds in every MoE layer (hot-expert replicas only
    add)."""
    m, par, b = sc.model, sc.parallelism, dtype_bytes(sc)
    dense = sum(dense_params_per_device(m, i, par.tp) for i in range(m.n_layers))
    dense += embedding_params_per_device(m, par.tp)
    n_moe = m.n_layers - m.n_dense_layers
    experts = n_moe * (m.n_experts // par.ep) * expert_params_per_shard(m, par.etp)
    return float(dense * b.weights + experts * b.expert_weights)


def kv_bytes_per_seq(sc: Scenario, context: int) -> float:
    """KV cache (and linear-attention state) one sequence of ``context`` tokens holds on one
    device, summed over layers."""
    m, tp, b = sc.model, sc.parallelism.tp, dtype_bytes(sc)
    kv = sum(kv_cache_bytes_per_token(m, i, tp, b) for i in range(m.n_layers))
    state = sum(linear_state_bytes_per_seq(m, i, tp) for i in range(m.n_layers))
    return float(context * kv + state)


def max_batch_per_replica(sc: Scenario) -> int:
    """Sequences one attention replica holds at ``seq_len + 1`` tokens (module docstring)."""
    wl, dev = sc.workload, sc.cluster.device
    free = wl.kv_memory_utilization * dev.memory_bytes - weights_bytes_per_device(sc)
    free += expert_bytes_off_gpu(sc)  # PIM units hold them (moesim/plan/pim_placement.py)
    per_seq = kv_bytes_per_seq(sc, wl.seq_len + 1)
    cache = kv_budget_bytes(sc, free, kv_bytes_per_seq(sc, 1) - kv_bytes_per_seq(sc, 0))
    seqs = math.floor(cache / per_seq) if per_seq > 0 else 0
    if seqs < 1:
        raise ScenarioError(
            "workload.batch_size",
            f"max: no sequence of {wl.seq_len} tokens fits: "
            f"{wl.kv_memory_utilization:.0%} of {dev.memory_bytes / 1e9:.1f} GB minus "
            f"{weights_bytes_per_device(sc) / 1e9:.1f} GB of weights leaves "
            f"{max(free, 0) / 1e9:.2f} GB, one sequence needs {per_seq / 1e9:.3f} GB",
        )
    return int(seqs)


def batch_size_for(sc: Scenario) -> int:
    """Sequences in the whole cluster's step: ``batch_per_replica x dp``, the ``max`` that
    fits (:func:`max_batch_per_replica` x dp), or ``batch_size`` as given."""
    wl = sc.workload
    dp = resolve(sc).dp
    if wl.batch_per_replica is not None:
        return int(wl.batch_per_replica * dp)
    if wl.batch_size == "max":
        return max_batch_per_replica(sc) * dp
    return int(wl.batch_size)


def with_batch_resolved(sc: Scenario) -> Scenario:
    """The scenario with ``workload.batch_size`` a number (itself when it already is)."""
    if sc.workload.batch_size != "max" and sc.workload.batch_per_replica is None:
        return sc
    wl = sc.workload.model_copy(
        update={"batch_size": batch_size_for(sc), "batch_per_replica": None}
    )
    return sc.model_copy(update={"workload": wl})
