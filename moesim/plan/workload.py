"""Workload plan: what every device computes and sends in every layer of one step.

Pure numpy, no time ordering: per layer, per-device kernel times (roofline), the routing
counts, and the traffic of each collective as aggregated flows per (source, destination).

Layout (see README): device ``g`` is attention data-parallel replica ``g // tp`` and tensor
rank ``g % tp``; in the MoE block each device owns a ``1/tp`` slice of its replica's tokens
(sequence parallel) and dispatches them within its expert group ``g // (ep * etp)``, where
expert ``e`` lives on EP rank ``placement[e]``, split over ``etp`` consecutive devices. Shared
experts and dense FFNs are tensor-parallel over the replica's tokens, like attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario, ScenarioError
from moesim.cost.ops import (
    Bytes,
    attention_ops,
    attention_weight_params,
    expert_ops,
    ffn_ops,
    kv_cache_bytes_per_token,
    linear_state_bytes_per_seq,
    lm_head_ops,
    permute_ops,
    router_ops,
    unpermute_ops,
)
from moesim.cost.pim import weight_bytes
from moesim.cost.roofline import op_kernels, op_time_split
from moesim.plan import pipeline
from moesim.plan.mtp import add_draft, mtp_scenario
from moesim.plan.pim import apply_memory, split_attention, split_experts
from moesim.plan.types import (
    GB,
    LayerPlan,
    PimWork,
    Traffic,
    WorkloadPlan,
    _ring,
    _split,
    _time,
    embedding_copies,
)
from moesim.routing.distributions import layer_probabilities, load_trace, route_layer
from moesim.routing.placement import (
    base_placement,
    local_slots,
    rank_totals,
    replicate_hot,
    share_matrix,
    split_integer,
)


def layer_generators(
    layer_seed: np.random.SeedSequence,
) -> tuple[np.random.Generator, np.random.Generator]:
    """The two random streams of a layer: expert preferences / placement, and routing. The
    reference layer uses the same streams to reproduce the simulator's routing exactly."""
    place, route = layer_seed.spawn(2)
    return np.random.default_rng(place), np.random.default_rng(route)


def build_plan(sc: Scenario) -> WorkloadPlan:
    """Turn a scenario into per-layer, per-device work and traffic. With pipeline stages or
    inference micro-batches, one plan per stage of one micro-batch over the stage's layers,
    placed side by side (:mod:`moesim.plan.pipeline`)."""
    par = sc.parallelism
    if par.pp == 1 and par.inference_micro_batches == 1:
        return _build(sc, range(sc.model.n_layers))
    piece = pipeline.piece_scenario(sc)
    chunks = pipeline.stage_chunks(sc)
    stages = [_build(piece, sorted(i for c in cs for i in c), check=False) for cs in chunks]
    act_bytes = sc.model.d_model * piece.workload.dtypes.bytes_of("activations")
    plan = pipeline.assemble(sc, stages, _tokens(piece)[4] * act_bytes)
    if sc.workload.phase == "train":
        from moesim.plan.training import check_fits_training

        check_fits_training(plan)
    else:
        _check_fits(sc, plan)
    return plan


def _tokens(sc: Scenario):
    """Sequences per attention replica, new tokens and context per sequence, tokens per
    replica and the MoE-block tokens each device owns (one pass)."""
    wl, tp = sc.workload, sc.parallelism.tp
    seqs_dp = _split(wl.pass_batch_size, sc.cluster.n_devices // tp)
    whole = wl.phase in ("prefill", "train")  # whole sequences, no KV cache before them
    new_per_seq = wl.seq_len if whole else 1 + (wl.mtp.draft_tokens if wl.mtp else 0)
    context = 0 if whole else wl.seq_len
    tokens_dp = seqs_dp * new_per_seq
    return seqs_dp, new_per_seq, context, tokens_dp, _split(tokens_dp, tp).ravel()


def _build(sc: Scenario, stage: range | list[int], check: bool = True) -> WorkloadPlan:
    """The plan of the layers ``stage`` (all of them: the whole model) on ``sc``'s devices;
    the LM head when the last layer is among them. ``check``: raise if it does not fit."""
    m, par, wl, dev = sc.model, sc.parallelism, sc.workload, sc.cluster.device
    n_dev, tp, ep, etp = sc.cluster.n_devices, par.tp, par.ep, par.etp
    dp, edp = n_dev // tp, n_dev // (ep * etp)
    dt = wl.dtypes
    b = Bytes(
        dt.bytes_of("weights"),
        dt.bytes_of("expert_weights"),
        dt.bytes_of("activations"),
        dt.bytes_of("kv_cache"),
    )
    cdt = dt.compute
    g = np.arange(n_dev)
    replica = g // tp
    seqs_dp, new_per_seq, context, tokens_dp, tokens_dev = _tokens(sc)
    seqs_dev = seqs_dp[replica]
    act_bytes_per_token = m.d_model * b.activations

    # expert layout
    group = g // (ep * etp)
    ep_rank = (g % (ep * etp)) // etp
    d_ff_local = m.d_ff_expert / etp
    node = g // sc.cluster.devices_per_node
    r = sc.routing
    trace = load_trace(r.trace) if r.distribution == "trace" else None

    layout = _dispatch_layout(tokens_dev, group, node, ep, etp, edp, r.global_routing)
    root = np.random.SeedSequence(sc.sim.seed)
    layer_seeds = root.spawn(m.n_layers)
    layers: list[LayerPlan] = []
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pim_attention: dict[str, PimWork | None] = {}
    for i in stage:
        moe_index = sum(m.is_moe(j) for j in range(i))  # MoE layers before this one
        kind = m.attention_kind(i)
        if kind not in cache:
            att_ops, pim_attention[kind] = split_attention(
                sc, kind, attention_ops(m, kind, seqs_dev, new_per_seq, context, tp, b), n_dev
            )
            cache[kind] = _time(dev, att_ops, cdt)
        att_s, att_f, att_m = cache[kind]
        compute_s = {"attention": att_s}
        flops = {"attention": att_f}
        measured = {"attention": att_m}
        tp_comm = None
        if tp > 1:
            rows = g.reshape(dp, tp)
            full = tokens_dp[replica] * act_bytes_per_token
            tp_comm = _ring(rows, 2.0 * (tp - 1) / tp * full, 2 * (tp - 1))
        lp = LayerPlan(i, kind, m.is_moe(i), compute_s, flops, tp_comm, measured_s=measured)
        lp.pim = pim_attention[kind]
        if not m.is_moe(i):
            compute_s["dense_ffn"], flops["dense_ffn"], measured["dense_ffn"] = _time(
                dev,
                ffn_ops("dense_ffn", tokens_dp[replica], m.d_model, m.d_ff_dense / tp, b),
                cdt,
            )
            if tp > 1:
                lp.tp_comm_after = _ring(rows, 2.0 * (tp - 1) / tp * full, 2 * (tp - 1))
            layers.append(lp)
            continue
        place_rng, route_rng = layer_generators(layer_seeds[i])
        probs = layer_probabilities(r, m.n_experts, moe_index, place_rng)
        expected = _expected_load(r, probs, m.top_k, trace, moe_index)
        share = share_matrix(base_placement(m.n_experts, ep, par.expert_placement, expected), ep)
        if r.replicate_hot:
            share = replicate_hot(share, expected, r.replicate_hot)
        primary = np.argmax(share, axis=1)  # rank serving each expert for limited routing
        limit_groups = None
        if r.node_limit or r.device_limit:
            dev_of = (np.arange(edp)[:, None] * ep + primary[None, :]) * etp  # [group, expert]
            limit_groups = dev_of // sc.cluster.devices_per_node if r.node_limit else dev_of
        routing = route_layer(
            r,
            probs,
            m.top_k,
            m.d_model,
            tokens_dev,
            group,
            edp,
            limit_groups,
            moe_index,
            route_rng,
            trace,
        )
        kept = routing.kept
        compute_s["router"], flops["router"], measured["router"] = _time(
            dev, router_ops(m, tokens_dev, b), cdt
        )
        pairs_out = kept.sum(axis=1) * etp
        compute_s["permute"], flops["permute"], measured["permute"] = _time(
            dev, [permute_ops(pairs_out, m.d_model, b)], cdt
        )
        compute_s["unpermute"], flops["unpermute"], measured["unpermute"] = _time(
            dev, [unpermute_ops(pairs_out, tokens_dev, m.d_model, b)], cdt
        )
        if m.n_shared_experts:
            compute_s["shared_experts"], flops["shared_experts"], measured["shared_experts"] = (
                _time(
                    dev,
                    ffn_ops(
                        "shared",
                        tokens_dp[replica],
                        m.d_model,
                        m.n_shared_experts * m.d_ff_shared / tp,
                        b,
                    ),
                    cdt,
                )
            )
        # tokens each expert-data-parallel group processes per expert: its own sources' (groups
        # are contiguous device ranges), or an even share of all (global routing)
        if r.global_routing:
            arriving = np.tile(kept.sum(axis=0) / edp, (edp, 1)).round().astype(np.int64)
            arriving = _conserve(arriving, kept.sum(axis=0))
        else:
            arriving = kept.reshape(edp, n_dev // edp, -1).sum(axis=1)  # [group, e]
        # per-expert work over each device's local experts only ([device, slot])
        slot_expert, slot_valid = local_slots(share)
        slot_e, slot_ok = slot_expert[ep_rank], slot_valid[ep_rank]
        if np.all(share.max(axis=1) == 1.0):  # one rank per expert: it takes all the tokens
            load = arriving[group[:, None], slot_e] * slot_ok
            lp.expert_load = arriving
        else:  # replicas: split each expert's tokens over its ranks
            per_rank = split_integer(arriving, share[None, :, :])  # [group, expert, rank]
            load = per_rank[group[:, None], slot_e, ep_rank[:, None]] * slot_ok
            lp.expert_load = per_rank.sum(axis=2)
        gpu_load = load
        if sc.pim is not None and sc.pim.policy not in ("gpu_only", "attention"):
            dense = np.zeros((n_dev, m.n_experts + 1), dtype=np.int64)  # last: padding
            np.put_along_axis(dense, np.where(slot_ok, slot_e, m.n_experts), load, axis=1)
            gpu_dense = split_experts(sc, lp, dense[:, :-1], expected, share, d_ff_local, b)
            gpu_load = np.take_along_axis(gpu_dense, slot_e, axis=1) * slot_ok  # rest on PIM
        ops = expert_ops(gpu_load, m.d_model, d_ff_local, b)
        split = [op_time_split(dev, op, cdt, launches=False) for op in ops]
        per_expert = sum(t for t, _ in split)
        measured["experts"] = sum(mt for _, mt in split).sum(axis=1)
        # one grouped launch per kernel, or (numpy-style loop) one per active expert; a
        # kernel timed from a measured table already includes its launch
        launch_s = np.zeros(n_dev)
        for op, (_, measured_part) in zip(ops, split, strict=True):
            roofline = (gpu_load > 0) & (measured_part == 0)
            count = roofline.any(axis=1) if dev.grouped_experts else roofline.sum(axis=1)
            launch_s += count * op_kernels(dev, op) * dev.kernel_launch_s
        compute_s["experts"] = per_expert.sum(axis=1) + launch_s
        flops["experts"] = sum(np.asarray(op.flops) for op in ops).sum(axis=1)
        lp.expert_weight_bytes = sum(weight_bytes(op, b.expert_weights) for op in ops).sum(axis=1)
        # dispatch: tokens from each source to each (group, EP rank), to every etp shard
        to_rank = rank_totals(kept, share)  # [source, rank]
        totals = kept.sum(axis=1)
        if r.global_routing:
            to_groups = np.full((n_dev, edp), 1.0 / edp)
            weights = (to_groups[:, :, None] * to_rank[:, None, :]).reshape(n_dev, edp * ep)
            flows = split_integer(totals, weights / np.maximum(totals, 1)[:, None])
        else:  # every token stays in its own group: split over that group's ranks only
            flows = to_rank
            if to_rank.dtype.kind == "f":  # replicas share experts' tokens: round exactly
                flows = split_integer(totals, to_rank / np.maximum(totals, 1)[:, None])
        pairs = flows.ravel()  # tokens per (source, slot column), gathered by the layout
        nbytes = pairs[layout.remote] * act_bytes_per_token
        lp.dispatch = Traffic(
            layout.src,
            layout.dst,
            nbytes.astype(float),
            float(pairs[layout.local].sum() * act_bytes_per_token),
        )
        lp.device_tokens = load.sum(axis=1)
        lp.local_experts = slot_ok.sum(axis=1)
        lp.routed_pairs = routing.routed_pairs
        lp.dropped_pairs = int(routing.dropped.sum())
        lp.cross_node_pairs = int(pairs[layout.cross_node].sum() // etp)
        lp.balance_history = routing.balance_history
        if wl.phase == "train":
            lp.expert_tokens, lp.pairs_out = load, pairs_out
        if tp > 1:
            lp.tp_comm_after = _ring(rows, (tp - 1) / tp * full, tp - 1)
        layers.append(lp)

    last_tokens = seqs_dev if wl.phase == "prefill" else tokens_dp[replica]
    lm_s, _, lm_measured = _time(dev, [lm_head_ops(m, last_tokens, tp, b)], cdt)
    head = float(m.n_layers - 1 in stage)  # the LM head runs on the last layer's stage
    tokens = wl.tokens * (wl.mtp.tokens_per_step if wl.mtp else 1)  # accepted tokens
    plan = WorkloadPlan(
        sc, n_dev, tokens, layers, lm_s * head, lm_head_measured_s=lm_measured * head
    )
    idle = int((seqs_dp == 0).sum())
    if idle:
        plan.warnings.append(
            f"workload.batch_size {wl.pass_batch_size} (per pass) < {dp} attention replicas "
            f"(devices / parallelism.tp): {idle} replicas ({idle * tp} devices) hold no "
            "sequence and do no attention work"
        )
    plan.memory_bytes = _memory(sc, b, seqs_dev, tokens_dp[replica], tokens_dev, layers, stage)
    if wl.mtp is not None and head:
        add_draft(plan, _build(mtp_scenario(sc), [m.n_layers - 1], check=False))
    if wl.phase == "train":
        from moesim.plan.training import add_training

        add_training(plan, b, check)  # backward, gradient reduction, optimizer, memory
    apply_memory(sc, plan, b)  # what lives on PIM units leaves the GPU (moesim/pim.py)
    if check:
        _check_fits(sc, plan)
    return plan


@dataclass(frozen=True)
class _DispatchLayout:
    """The pairs of every MoE layer's dispatch, fixed by the layout: ``src``/``dst`` of the
    inter-device pairs and, for each, its index into the layer's flattened ``[source, slot
    column]`` token matrix (``remote``); the indices of pairs that stay on their device
    (``local``) and of pairs that cross nodes (``cross_node``, each etp shard counted)."""

    src: np.ndarray
    dst: np.ndarray
    remote: np.ndarray
    local: np.ndarray
    cross_node: np.ndarray


def _dispatch_layout(
    tokens_dev: np.ndarray,
    group: np.ndarray,
    node: np.ndarray,
    ep: int,
    etp: int,
    edp: int,
    global_routing: bool,
) -> _DispatchLayout:
    """Every (sender, EP rank) pair is a flow, to every etp shard of the rank, zero-byte ones
    included (a zero-size part of an all-to-all-v still costs its latency): the pairs, and so
    the flow pattern, are the same arrays in every layer whatever the routing draws. A sender
    reaches the ranks of its own group, or of every group with global routing."""
    senders = np.flatnonzero(tokens_dev > 0)
    columns = edp * ep if global_routing else ep
    src = np.repeat(senders, columns)
    col = np.tile(np.arange(columns), len(senders))
    slot = col if global_routing else group[src] * ep + col
    base = (slot // ep) * ep * etp + (slot % ep) * etp
    flat = np.repeat(src * columns + col, etp)
    src = np.repeat(src, etp)
    dst = (base[:, None] + np.arange(etp)[None, :]).ravel()
    local = src == dst
    return _DispatchLayout(
        src=src[~local],
        dst=dst[~local],
        remote=flat[~local],
        local=flat[local],
        cross_node=flat[node[src] != node[dst]],
    )


def _expected_load(
    r, probs: np.ndarray, top_k: int, trace: list[np.ndarray] | None, moe_index: int
) -> np.ndarray:
    """Expected share of routed pairs per expert, for placement decisions (LPT, replicas)."""
    if trace is not None:
        ids = trace[moe_index % len(trace)]
        counts = np.bincount(ids[ids >= 0], minlength=len(probs)).astype(float)
        return counts / max(counts.sum(), 1.0)
    if r.distribution == "router":
        return np.full(len(probs), 1.0 / len(probs))
    return probs


def _conserve(arriving: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Fix rounding so that each expert's tokens over groups sum to ``totals`` exactly."""
    diff = totals - arriving.sum(axis=0)
    arriving = arriving.copy()
    arriving[0] += diff
    return arriving


def _memory(
    sc: Scenario,
    b: Bytes,
    seqs_dev: np.ndarray,
    tokens_att: np.ndarray,
    tokens_dev: np.ndarray,
    layers: list[LayerPlan],
    stage: range | list[int],
) -> dict[str, np.ndarray]:
    """Bytes resident per device for the layers ``stage``: weights, KV cache / linear state,
    peak activations."""
    m, par = sc.model, sc.parallelism
    n_dev, tp = sc.cluster.n_devices, par.tp
    attn = sum(attention_weight_params(m, m.attention_kind(i)) for i in stage)
    n_moe = sum(m.is_moe(i) for i in stage)
    n_dense = len(stage) - n_moe
    expert = 3 * m.d_model * m.d_ff_expert / par.etp
    emb = embedding_copies(m.tied_embeddings, stage, m.n_layers)
    weights = (
        attn / tp * b.weights
        + m.vocab_size * m.d_model * emb / tp * b.weights
        + n_dense * 3 * m.d_model * m.d_ff_dense / tp * b.weights
        + n_moe * m.n_shared_experts * 3 * m.d_model * m.d_ff_shared / tp * b.weights
        + n_moe * m.d_model * m.n_experts * b.weights
    )
    local = [lp.local_experts for lp in layers if lp.moe]
    experts_held = np.sum(local, axis=0) if local else np.zeros(n_dev)
    weights = weights + experts_held * expert * b.expert_weights
    context = sc.workload.seq_len + (1 if sc.workload.phase == "decode" else 0)
    kv_per_token = sum(kv_cache_bytes_per_token(m, i, tp, b) for i in stage)
    state_per_seq = sum(linear_state_bytes_per_seq(m, i, tp) for i in stage)
    kv = seqs_dev * (context * kv_per_token + state_per_seq)
    # peak activations: the largest of one attention block and one expert block's working set
    moe_tokens = max((int(lp.device_tokens.max()) for lp in layers if lp.moe), default=0)
    act = (
        np.maximum(
            tokens_att * (4 * m.d_model + 2 * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim / tp),
            tokens_dev * 2 * m.d_model + moe_tokens * (2 * m.d_model + 3 * m.d_ff_expert / par.etp),
        )
        * b.activations
    )
    return {
        "weights": np.asarray(weights, dtype=float) * np.ones(n_dev),
        "kv_cache": kv.astype(float),
        "activations": act.astype(float),
    }


def _check_fits(sc: Scenario, plan: WorkloadPlan) -> None:
    used = plan.memory_used_bytes
    cap = sc.cluster.device.memory_bytes
    worst = int(np.argmax(used))
    if used[worst] > cap:
        parts = ", ".join(f"{k} {v[worst] / GB:.1f} GB" for k, v in plan.memory_bytes.items())
        n = sc.cluster.devices_per_node
        raise ScenarioError(
            "cluster.device",
            f"model does not fit: device n{worst // n}.d{worst % n} needs "
            f"{used[worst] / GB:.1f} GB ({parts}) but {sc.cluster.device.name} has "
            f"{cap / GB:.1f} GB (short by {(used[worst] - cap) / GB:.1f} GB); add devices, raise "
            f"parallelism.ep/tp, or use smaller dtypes",
        )
