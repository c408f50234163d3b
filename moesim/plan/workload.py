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

from dataclasses import dataclass, field, fields, is_dataclass, replace

import numpy as np

from moesim.config.scenario import Scenario, ScenarioError
from moesim.cost.ops import (
    Bytes,
    OpCost,
    attention_ops,
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
from moesim.cost.weights import (
    dense_params_per_device,
    embedding_params_per_device,
    expert_params_per_shard,
)
from moesim.plan import pipeline
from moesim.plan.ahead import Ahead
from moesim.plan.batch import with_batch_resolved
from moesim.plan.collectives import ring_allgather, ring_allreduce, ring_reduce_scatter
from moesim.plan.dispatch import dispatch_mode, distinct_tokens
from moesim.plan.layout import Layout, dtype_bytes, layout
from moesim.plan.mtp import add_draft, mtp_scenario
from moesim.plan.pim_placement import (
    apply_memory,
    split_attention,
    split_experts,
    sub_batch_scenarios,
)
from moesim.plan.tiers import experts_phase_s, offload_experts
from moesim.plan.types import (
    GB,
    LayerPlan,
    PimWork,
    Traffic,
    WorkloadPlan,
    _time,
    embedding_copies,
)
from moesim.routing.distributions import (
    expected_applies,
    layer_probabilities,
    load_trace,
    route_layer,
)
from moesim.routing.placement import (
    base_placement,
    local_slots,
    rank_totals,
    replicate_hot,
    share_matrix,
    split_integer,
)
from moesim.routing.sampling import sampling_mode


def _child(seed: np.random.SeedSequence, i: int) -> np.random.SeedSequence:
    """The seed's child ``i`` (``spawn`` on a fresh seed), built without spawning."""
    return np.random.SeedSequence(
        seed.entropy, spawn_key=(*seed.spawn_key, i), pool_size=seed.pool_size
    )


def layer_generators(
    layer_seed: np.random.SeedSequence,
) -> tuple[np.random.Generator, np.random.Generator]:
    """The two random streams of a layer: expert preferences / placement, and routing. The
    reference layer uses the same streams to reproduce the simulator's routing exactly."""
    return np.random.default_rng(_child(layer_seed, 0)), np.random.default_rng(
        _child(layer_seed, 1)
    )


class _LazyGenerator:
    """A layer's placement stream made on first use: a score model that draws nothing
    (uniform preferences) never pays for one (~35 us a layer)."""

    def __init__(self, layer_seed: np.random.SeedSequence) -> None:
        self._seed, self._rng = layer_seed, None

    def __getattr__(self, name: str):
        if self._rng is None:
            self._rng = layer_generators(self._seed)[0]
        return getattr(self._rng, name)


@dataclass
class _Context:
    """What every layer of one plan shares: the scenario, its layout and bytes, the
    dispatch pairs, the routing trace and per-kind attention costs."""

    sc: Scenario
    lay: Layout
    b: Bytes
    dispatch: _DispatchLayout
    trace: list[np.ndarray] | None
    attention: dict[str, tuple[tuple[np.ndarray, ...], PimWork | None]]
    mode: str = "pairs"  # dispatch mode (moesim/plan/dispatch.py)
    node_layout: _NodeLayout | None = None  # per_node: the network stage's pairs
    forward_layout: _DispatchLayout | None = None  # per_node: the intra-node stage's pairs
    tp_traffic: dict = field(default_factory=dict)  # tensor-parallel collectives, by algorithm
    distinct_cache: dict = field(default_factory=dict)  # plan/dispatch.py distinct_tokens

    def tp(self, collective) -> Traffic:
        """The tensor-parallel ``collective`` (a ring algorithm) of every layer's replica
        activations: the same for every layer, so built once and shared (its arrays are
        read-only)."""
        if collective not in self.tp_traffic:
            self.tp_traffic[collective] = collective(_tp_groups(self), _tp_bytes(self))
        return self.tp_traffic[collective]

    def time(self, phase: str, ops: list[OpCost], lp: LayerPlan) -> None:
        """Record a phase's per-device seconds, FLOPs and measured seconds on ``lp``."""
        dev, cdt = self.sc.cluster.device, self.sc.workload.dtypes.compute
        lp.compute_s[phase], lp.flops[phase], lp.measured_s[phase] = _time(dev, ops, cdt)


def build_plan(sc: Scenario) -> WorkloadPlan:
    """Turn a scenario into per-layer, per-device work and traffic. With pipeline stages or
    inference micro-batches, one plan per stage of one micro-batch over the stage's layers,
    placed side by side (:mod:`moesim.plan.pipeline`). ``batch_size: max`` and
    ``batch_per_replica`` are resolved first (:mod:`moesim.plan.batch`)."""
    sc = with_batch_resolved(sc)
    par = sc.parallelism
    if par.pp == 1 and par.inference_micro_batches == 1:
        return _build(sc, range(sc.model.n_layers))
    piece = pipeline.piece_scenario(sc)
    chunks = pipeline.stage_chunks(sc)
    stages = [_build(piece, sorted(i for c in cs for i in c), check=False) for cs in chunks]
    act_bytes = sc.model.d_model * dtype_bytes(piece).activations
    plan = pipeline.assemble(sc, stages, layout(piece).tokens_dev * act_bytes)
    if sc.workload.phase == "train":
        from moesim.plan.training import check_fits_training

        check_fits_training(plan)
    else:
        _check_fits(sc, plan)
    return plan


def _build(sc: Scenario, stage: range | list[int], check: bool = True) -> WorkloadPlan:
    """The plan of the layers ``stage`` (all of them: the whole model) on ``sc``'s devices;
    the LM head when the last layer is among them. ``check``: raise if it does not fit."""
    m, wl = sc.model, sc.workload
    lay = layout(sc)
    b = dtype_bytes(sc)
    r = sc.routing
    trace = load_trace(r.trace) if r.distribution == "trace" else None
    ctx = _Context(sc, lay, b, _dispatch_layout(lay, r.global_routing), trace, {})
    ctx.mode, ctx.node_layout, ctx.forward_layout = _dispatch_stages(sc, lay)
    layer_seeds = np.random.SeedSequence(sc.sim.seed).spawn(m.n_layers)
    layers: list[LayerPlan] = []
    planned: dict[bytes, dict] = {}  # MoE blocks of expected routing, by preferences
    n_moe_before = np.cumsum([0] + [m.is_moe(j) for j in range(m.n_layers)])  # per layer
    routes = _routes_ahead(
        ctx, [(i, int(n_moe_before[i])) for i in stage if m.is_moe(i)], layer_seeds
    )
    try:
        for i in stage:
            lp = _attention_block(ctx, i)
            if m.is_moe(i):
                moe_index = int(n_moe_before[i])
                key = _moe_key(ctx, layer_seeds[i], moe_index) if REUSE_MOE_BLOCKS else None
                if key is not None and key in planned:
                    _apply_block(lp, planned[key])
                else:
                    before = _block_fields(lp)
                    _moe_block(ctx, lp, layer_seeds[i], moe_index, routes)
                    if key is not None:
                        planned[key] = _block_delta(before, lp)
            else:
                _dense_block(ctx, lp)
            layers.append(lp)
    finally:
        if routes is not None:
            routes.close()

    last_tokens = lay.seqs_dev if wl.phase == "prefill" else lay.tokens_att
    lm_s, _, lm_measured = _time(
        sc.cluster.device, [lm_head_ops(m, last_tokens, lay.tp, b)], wl.dtypes.compute
    )
    head = float(m.n_layers - 1 in stage)  # the LM head runs on the last layer's stage
    tokens = wl.tokens * (wl.mtp.tokens_per_step if wl.mtp else 1)  # accepted tokens
    plan = WorkloadPlan(
        sc, lay.n_devices, tokens, layers, lm_s * head, lm_head_measured_s=lm_measured * head
    )
    idle = int((lay.seqs_dp == 0).sum())
    if idle:
        plan.warnings.append(
            f"workload.batch_size {wl.pass_batch_size} (per pass) < {lay.dp} attention "
            f"replicas (devices / parallelism.tp): {idle} replicas ({idle * lay.tp} devices) "
            "hold no sequence and do no attention work"
        )
    plan.memory_bytes = _memory(sc, b, lay, layers, stage)
    if wl.mtp is not None and head:
        add_draft(plan, _build(mtp_scenario(sc), [m.n_layers - 1], check=False))
    if wl.phase == "train":
        from moesim.plan.training import add_training

        add_training(plan, b, check)  # backward, gradient reduction, optimizer, memory
    apply_memory(sc, plan, b)  # what lives on PIM units leaves the GPU (plan/pim_placement.py)
    if check:
        _check_fits(sc, plan)
        # pim.sub_batches: one plan per sub-batch, interleaved in the graph (pim_placement.py)
        plan.sub_plans = [build_plan(half) for half in sub_batch_scenarios(sc)]
    return plan


def _dispatch_stages(
    sc: Scenario, lay: Layout
) -> tuple[str, _NodeLayout | None, _DispatchLayout | None]:
    """The dispatch mode as it applies to ``lay`` and, for ``per_node``, the pairs of its
    network and intra-node stages."""
    mode = dispatch_mode(sc)
    dpn = sc.cluster.devices_per_node
    size = lay.ep * lay.etp
    if mode == "per_node" and (size <= dpn or size % dpn):
        mode = "per_rank"  # an expert group inside one node (or not whole nodes)
    if mode != "per_node":
        return mode, None, None
    return mode, _node_layout(lay, dpn), _dispatch_layout(lay, False, same_node=True)


def dispatch_pairs(sc: Scenario) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (source, destination) device pairs of every MoE dispatch stage of ``sc``'s step
    and of its combine (the same pairs reversed), fixed by the layout before any routing
    draw: what the engine maps onto network flows (``moesim.network.aggregate``), known
    while the plan is still being built. Empty where the model has no MoE layer, and with
    pipeline stages or inference micro-batches (whose pieces have layouts of their own)."""
    sc = with_batch_resolved(sc)
    par, m = sc.parallelism, sc.model
    if par.pp > 1 or par.inference_micro_batches > 1 or m.n_dense_layers >= m.n_layers:
        return []
    lay = layout(sc)
    mode, node_layout, forward_layout = _dispatch_stages(sc, lay)
    if mode != "per_node":
        pairs = _dispatch_layout(lay, sc.routing.global_routing)
        return [(pairs.src, pairs.dst), (pairs.dst, pairs.src)]
    stages = [(node_layout.src, node_layout.dst), (forward_layout.src, forward_layout.dst)]
    combine = [(dst, src) for src, dst in reversed(stages)]  # LayerPlan.combine_stages
    if sc.routing.per_node_stages != "streamed":
        return stages + combine
    # one collective of both legs (moesim.plan.types.streamed, as the step graph merges them)
    return [
        (np.concatenate([s for s, _ in legs]), np.concatenate([d for _, d in legs]))
        for legs in (stages, combine)
    ]


def _tp_bytes(ctx: _Context) -> np.ndarray:
    """Each device's replica activations (tokens x d_model): the buffer of its tensor-
    parallel collectives."""
    return ctx.lay.tokens_att * ctx.sc.model.d_model * ctx.b.activations


def _tp_groups(ctx: _Context) -> np.ndarray:
    return np.arange(ctx.lay.n_devices).reshape(ctx.lay.dp, ctx.lay.tp)


def _attention_block(ctx: _Context, i: int) -> LayerPlan:
    """Attention of layer ``i`` (its PIM part, if any) and the tensor-parallel collective
    after it: an all-reduce before a dense FFN; before an MoE block, whose devices each own
    a ``1/tp`` slice of the tokens (sequence parallel, Korthikanti et al. 2023), a
    reduce-scatter."""
    sc, lay, m = ctx.sc, ctx.lay, ctx.sc.model
    kind = m.attention_kind(i)
    if kind not in ctx.attention:
        ops = attention_ops(m, kind, lay.seqs_dev, lay.new_per_seq, lay.context, lay.tp, ctx.b)
        att_ops, pim = split_attention(sc, kind, ops, lay.n_devices)
        dev, cdt = sc.cluster.device, sc.workload.dtypes.compute
        ctx.attention[kind] = (_time(dev, att_ops, cdt), pim)
    (att_s, att_f, att_m), pim = ctx.attention[kind]
    lp = LayerPlan(
        i, kind, m.is_moe(i), {"attention": att_s}, {"attention": att_f},
        measured_s={"attention": att_m},
    )  # fmt: skip
    lp.pim = pim
    if lay.tp > 1:
        collective = ring_reduce_scatter if lp.moe else ring_allreduce
        lp.tp_comm = ctx.tp(collective)
    return lp


def _dense_block(ctx: _Context, lp: LayerPlan) -> None:
    """A dense FFN, tensor parallel over the replica's tokens, then its all-reduce."""
    m, lay = ctx.sc.model, ctx.lay
    ctx.time(
        "dense_ffn",
        ffn_ops("dense_ffn", lay.tokens_att, m.d_model, m.d_ff_dense / lay.tp, ctx.b),
        lp,
    )
    if lay.tp > 1:
        lp.tp_comm_after = ctx.tp(ring_allreduce)


def _moe_block(
    ctx: _Context, lp: LayerPlan, layer_seed, moe_index: int, routes: Ahead | None = None
) -> None:
    """Router, permutation, shared experts, the routed experts each device holds and the
    dispatch of its tokens to them; the all-gather of the block's output (tp > 1). The
    layer's routing comes from ``routes`` where it was drawn ahead (:func:`_routes_ahead`)."""
    sc, lay, m, b = ctx.sc, ctx.lay, ctx.sc.model, ctx.b
    if routes is not None:
        share, expected, routing = routes.take(moe_index)
    else:
        share, expected, routing = _route(ctx, layer_seed, moe_index)
    kept = routing.kept
    ctx.time("router", router_ops(m, lay.tokens_dev, b), lp)
    pairs_out = kept.sum(axis=1) * lay.etp
    ctx.time("permute", [permute_ops(pairs_out, m.d_model, b)], lp)
    ctx.time("unpermute", [unpermute_ops(pairs_out, lay.tokens_dev, m.d_model, b)], lp)
    if m.n_shared_experts:
        d_ff = m.n_shared_experts * m.d_ff_shared / lay.tp
        ctx.time("shared_experts", ffn_ops("shared", lay.tokens_att, m.d_model, d_ff, b), lp)
        if lay.tp > 1:  # its input gathered, its partial sums reduce-scattered
            lp.tp_shared_in = ctx.tp(ring_allgather)
            lp.tp_shared_out = ctx.tp(ring_reduce_scatter)
    load = _expert_load(ctx, lp, kept, share)
    _experts(ctx, lp, load, share, expected)
    lp.dispatch = _dispatch_traffic(ctx, kept, share, lp, routing)
    lp.combine_stages()  # built with the block, so layers that reuse it share the combine
    lp.device_tokens = load.sum(axis=1)
    lp.routed_pairs = routing.routed_pairs
    lp.dropped_pairs = int(routing.dropped.sum())
    lp.balance_history = routing.balance_history
    if sc.workload.phase == "train":
        lp.expert_tokens, lp.pairs_out = load, pairs_out
        lp.expert_share = share  # replicas synchronise their gradients (plan/training.py)
    if lay.tp > 1:
        lp.tp_comm_after = ctx.tp(ring_allgather)


ROUTES_AHEAD_MIN_SCORES = 1 << 18
"""Token-expert scores a layer (tokens x routed experts) from which :func:`_routes_ahead`
draws the MoE layers' routing on a worker thread."""


def _routes_ahead(ctx: _Context, moe_layers: list[tuple[int, int]], layer_seeds) -> Ahead | None:
    """The routing (:func:`_route`) of the MoE layers ``(layer, moe index)``, drawn on a
    worker thread two layers ahead of the layer being planned (:class:`Ahead`), where every
    block draws (:func:`_block_draws`), there are at least two and each routes at least
    :data:`ROUTES_AHEAD_MIN_SCORES` scores; None elsewhere. Each layer draws from its own
    streams (``layer_seeds``), so the draws are those of drawing layer by layer; numpy's
    multinomial and Gumbel draws release the GIL, so they run beside the main thread's
    planning: on 2 cores, with the network's kernels loading alongside (:mod:`moesim.cli.run`),
    the 256-GPU prefill's plan takes 0.88 s for 1.03 s (medians of 12 runs each)."""
    if len(moe_layers) < 2 or (REUSE_MOE_BLOCKS and not _block_draws(ctx)):
        return None
    if int(ctx.lay.tokens_dev.sum()) * ctx.sc.model.n_experts < ROUTES_AHEAD_MIN_SCORES:
        return None
    items = {moe: (ctx, layer_seeds[i], moe) for i, moe in moe_layers}
    return Ahead(_route, items, depth=2)


REUSE_MOE_BLOCKS = True
"""Plan an MoE block once per distinct router preferences when its routing is an expectation
(``routing.sampling: expected`` where :func:`expected_applies`; no trace, and no bias warm-up,
which draws from the layer's routing stream): its routing, placement, expert work and
dispatch then depend on the preferences alone, so every layer with the same preferences gets
copies of the first one's. ``tests/test_reuse.py`` checks the
plans equal those built layer by layer (this switch off)."""


def _block_draws(ctx: _Context) -> bool:
    """Whether an MoE block's routing is drawn, not an expectation: a trace, ``sampling:
    draw``, a policy the expectation does not cover, or a bias warm-up (which draws from the
    layer's routing stream)."""
    r = ctx.sc.routing
    if ctx.trace is not None or sampling_mode(ctx.sc) != "expected" or not expected_applies(r):
        return True
    return bool(r.bias_balancing.steps)


def _moe_key(ctx: _Context, layer_seed, moe_index: int) -> bytes | None:
    """What an MoE block of expected routing depends on beyond the plan's context: the
    layer's preferences (drawn from its own placement stream); None when the block draws."""
    if _block_draws(ctx):
        return None
    r = ctx.sc.routing
    place_rng = _LazyGenerator(layer_seed)
    return layer_probabilities(r, ctx.sc.model.n_experts, moe_index, place_rng).tobytes()


def _block_fields(lp: LayerPlan) -> dict:
    """The layer's fields before its MoE block, the per-phase tables as key sets."""
    return {k: (set(v) if k in _PHASE_TABLES else v) for k, v in vars(lp).items() if k != "index"}


_PHASE_TABLES = ("compute_s", "flops", "measured_s")


def _block_delta(before: dict, lp: LayerPlan) -> dict:
    """What the MoE block set on ``lp``: fields it replaced, and the phases it added, each as
    a function that returns a fresh copy (:func:`_copier`); a phase table of shared values
    is kept as the table itself (``update`` copies its entries)."""
    delta = {}
    for k, v in vars(lp).items():
        if k in _PHASE_TABLES:
            added = {p: v[p] for p in v if p not in before[k]}
            copy = _copier(added)
            delta[k] = added if copy is None else copy
        elif k != "index" and v is not before[k]:
            copy = _copier(v)
            delta[k] = (lambda v=v: v) if copy is None else copy
    return delta


def _apply_block(lp: LayerPlan, delta: dict) -> None:
    """Set on ``lp`` copies of what :func:`_block_delta` recorded."""
    for k, copy in delta.items():
        if k in _PHASE_TABLES:
            getattr(lp, k).update(copy if isinstance(copy, dict) else copy())
        else:
            setattr(lp, k, copy())


def _copier(value):
    """A function that returns a copy of ``value`` sharing no writable array with it, or
    None where ``value`` itself can be shared: containers and dataclass instances (a block's
    tables) copied; arrays made read-only and shared (a write to one layer's array raises
    instead of changing every layer's); a :class:`Traffic` (its arrays are read-only),
    numbers, strings and None shared. The structure is walked once, here, so each copy only
    copies."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
        return None
    if isinstance(value, dict):
        items = [(k, v, _copier(v)) for k, v in value.items()]
        if all(copy is None for _, _, copy in items):
            return value.copy
        return lambda: {k: v if copy is None else copy() for k, v, copy in items}
    if isinstance(value, list | tuple):
        kind, parts = type(value), [(v, _copier(v)) for v in value]
        if all(copy is None for _, copy in parts):
            return value.copy if kind is list else None  # a tuple of shared values: itself
        return lambda: kind(v if copy is None else copy() for v, copy in parts)
    if is_dataclass(value) and not isinstance(value, type | Traffic):
        parts = [(f.name, _copier(getattr(value, f.name))) for f in fields(value) if f.init]
        changed = [(name, copy) for name, copy in parts if copy is not None]
        return lambda: replace(value, **{name: copy() for name, copy in changed})
    return None  # Traffic, numbers, strings, None: shared


def _route(ctx: _Context, layer_seed, moe_index: int):
    """Placement (with hot-expert replicas) and the routing draws of one MoE layer:
    ``(share [expert, rank], expected load share [expert], LayerRouting)``."""
    sc, lay, m = ctx.sc, ctx.lay, ctx.sc.model
    r, par = sc.routing, sc.parallelism
    place_rng, route_rng = layer_generators(layer_seed)
    probs = layer_probabilities(r, m.n_experts, moe_index, place_rng)
    expected = _expected_load(r, probs, m.top_k, ctx.trace, moe_index)
    share = share_matrix(
        base_placement(m.n_experts, lay.ep, par.expert_placement, expected), lay.ep
    )
    if r.replicate_hot:
        share = replicate_hot(share, expected, r.replicate_hot, r.replicas_per_hot)
    primary = np.argmax(share, axis=1)  # rank serving each expert for limited routing
    limit_groups = None
    if r.node_limit or r.device_limit:
        dev_of = (np.arange(lay.edp)[:, None] * lay.ep + primary[None, :]) * lay.etp
        limit_groups = dev_of // sc.cluster.devices_per_node if r.node_limit else dev_of
    routing = route_layer(
        r, probs, m.top_k, m.d_model, lay.tokens_dev, lay.group, lay.edp, limit_groups,
        moe_index, route_rng, ctx.trace, sampling=sampling_mode(ctx.sc),
    )  # fmt: skip
    return share, expected, routing


def _expert_load(ctx: _Context, lp: LayerPlan, kept: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Tokens of each local expert slot on each device, ``[device, slot]``: every expert
    group's arriving tokens (its own sources', or an even share of all with global
    routing), split over an expert's replicas when it has several."""
    lay, r = ctx.lay, ctx.sc.routing
    if r.global_routing:
        arriving = np.tile(kept.sum(axis=0) / lay.edp, (lay.edp, 1)).round().astype(np.int64)
        arriving = _conserve(arriving, kept.sum(axis=0))
    else:
        arriving = kept.reshape(lay.edp, lay.n_devices // lay.edp, -1).sum(axis=1)
    slot_expert, slot_valid = local_slots(share)
    slot_e, slot_ok = slot_expert[lay.ep_rank], slot_valid[lay.ep_rank]
    if np.all(share.max(axis=1) == 1.0):  # one rank per expert: it takes all the tokens
        load = arriving[lay.group[:, None], slot_e] * slot_ok
        lp.expert_load = arriving
    else:  # replicas: split each expert's tokens over its ranks
        per_rank = split_integer(arriving, share[None, :, :])  # [group, expert, rank]
        load = per_rank[lay.group[:, None], slot_e, lay.ep_rank[:, None]] * slot_ok
        lp.expert_load = per_rank.sum(axis=2)
    lp.local_experts = slot_ok.sum(axis=1)
    return load


def _experts(
    ctx: _Context, lp: LayerPlan, load: np.ndarray, share: np.ndarray, expected: np.ndarray
) -> None:
    """The routed experts' kernels on the GPU (PIM takes its part first): one grouped
    launch per kernel, or (numpy-style loop) one per active expert; a kernel timed from a
    measured table already includes its launch."""
    sc, lay, m, b = ctx.sc, ctx.lay, ctx.sc.model, ctx.b
    dev, cdt = sc.cluster.device, sc.workload.dtypes.compute
    slot_expert, slot_valid = local_slots(share)
    slot_e, slot_ok = slot_expert[lay.ep_rank], slot_valid[lay.ep_rank]
    d_ff_local = m.d_ff_expert / lay.etp
    gpu_load = load
    if sc.pim is not None and sc.pim.policy not in ("gpu_only", "attention"):
        dense = np.zeros((lay.n_devices, m.n_experts + 1), dtype=np.int64)  # last: padding
        np.put_along_axis(dense, np.where(slot_ok, slot_e, m.n_experts), load, axis=1)
        gpu_dense = split_experts(sc, lp, dense[:, :-1], expected, share, d_ff_local, b)
        gpu_load = np.take_along_axis(gpu_dense, slot_e, axis=1) * slot_ok  # rest on PIM
    if sc.tiers is not None:  # experts in slower memory (moesim/plan/tiers.py)
        gpu_load = offload_experts(sc, lp, gpu_load, slot_e, slot_ok, expected, d_ff_local, b)
    ops = expert_ops(gpu_load, m.d_model, d_ff_local, b)
    split = [op_time_split(dev, op, cdt, launches=False) for op in ops]
    per_expert = sum(t for t, _ in split)
    lp.measured_s["experts"] = sum(mt for _, mt in split).sum(axis=1)
    launch_s = np.zeros(lay.n_devices)
    for op, (_, measured_part) in zip(ops, split, strict=True):
        roofline = (gpu_load > 0) & (measured_part == 0)
        count = roofline.any(axis=1) if dev.grouped_experts else roofline.sum(axis=1)
        launch_s += count * op_kernels(dev, op) * dev.kernel_launch_s
    lp.compute_s["experts"] = experts_phase_s(lp.tiers, per_expert.sum(axis=1) + launch_s)
    lp.flops["experts"] = sum(np.asarray(op.flops) for op in ops).sum(axis=1)
    lp.expert_weight_bytes = sum(weight_bytes(op, b.expert_weights) for op in ops).sum(axis=1)


def _dispatch_traffic(
    ctx: _Context, kept: np.ndarray, share: np.ndarray, lp: LayerPlan, routing
) -> Traffic:
    """Tokens from each source to each (group, EP rank), to every etp shard of the rank, as
    the dispatch mode sends them (:mod:`moesim.plan.dispatch`); ``per_node`` also sets the
    intra-node forwarding stage (``lp.dispatch_forward``) and returns the network stage."""
    lay, r = ctx.lay, ctx.sc.routing
    act_bytes_per_token = ctx.sc.model.d_model * ctx.b.dispatch
    lp.combine_scale = ctx.b.combine / ctx.b.dispatch
    to_rank = rank_totals(kept, share)  # [source, rank]
    totals = kept.sum(axis=1)
    if r.global_routing:
        to_groups = np.full((lay.n_devices, lay.edp), 1.0 / lay.edp)
        weights = (to_groups[:, :, None] * to_rank[:, None, :]).reshape(
            lay.n_devices, lay.edp * lay.ep
        )
        flows = split_integer(totals, weights / np.maximum(totals, 1)[:, None])
    else:  # every token stays in its own group: split over that group's ranks only
        flows = to_rank
        if to_rank.dtype.kind == "f":  # replicas share experts' tokens: round exactly
            flows = split_integer(totals, to_rank / np.maximum(totals, 1)[:, None])
    pairs = flows.ravel()  # tokens per (source, slot column), gathered by the layout
    layout_ = ctx.dispatch
    lp.cross_node_pairs = int(pairs[layout_.cross_node].sum() // lay.etp)
    mode = ctx.mode
    if mode == "pairs":
        return _traffic(layout_, pairs, act_bytes_per_token)
    m = ctx.sc.model
    primary = np.argmax(share, axis=1)  # the rank a token's copy for an expert goes to
    rank_of = np.broadcast_to(primary, (lay.edp, m.n_experts))
    distinct = distinct_tokens(  # [source, rank]
        routing, rank_of, lay.group, lay.ep, m.top_k, ctx.distinct_cache
    )
    if mode == "per_rank":
        if r.global_routing or to_rank.dtype.kind == "f":  # scale the split pairs per source
            ratio = distinct.sum(axis=1) / np.maximum(to_rank.sum(axis=1), 1)
            flows = split_integer(
                np.rint(totals * ratio).astype(np.int64),
                flows / np.maximum(flows.sum(axis=1), 1)[:, None],
            )
        else:
            flows = distinct
        return _traffic(layout_, flows.ravel(), act_bytes_per_token)
    # per_node: once per destination node to the sender's rail peer there, then forwarded
    dpn = ctx.sc.cluster.devices_per_node
    node_of = rank_of * lay.etp // dpn  # node of the group, per (group, expert)
    per_node = distinct_tokens(
        routing, node_of, lay.group, ctx.node_layout.nodes, m.top_k, ctx.distinct_cache
    )
    forward = np.zeros((lay.n_devices, lay.ep), dtype=np.int64)
    size = lay.ep * lay.etp
    for g in range(lay.edp):
        rows = slice(g * size, (g + 1) * size)
        rail = distinct[rows].reshape(-1, dpn, lay.ep).sum(axis=0)  # [local index, rank]
        forward[rows] = np.tile(rail, (size // dpn, 1))
    lp.dispatch_forward = _traffic(ctx.forward_layout, forward.ravel(), act_bytes_per_token)
    nl = ctx.node_layout
    return Traffic(nl.src, nl.dst, per_node.ravel()[nl.remote] * act_bytes_per_token, 0.0)


def _traffic(layout_: _DispatchLayout, pairs: np.ndarray, act_bytes_per_token: float) -> Traffic:
    return Traffic(
        layout_.src,
        layout_.dst,
        (pairs[layout_.remote] * act_bytes_per_token).astype(float),
        float(pairs[layout_.local].sum() * act_bytes_per_token),
    )


@dataclass(frozen=True)
class _NodeLayout:
    """The network stage of ``per_node``: every sender to its rail peer on every other node
    of its expert group (zero-byte pairs included); ``remote`` indexes the flattened
    ``[source, node of the group]`` token matrix."""

    src: np.ndarray
    dst: np.ndarray
    remote: np.ndarray
    nodes: int


def _node_layout(lay: Layout, dpn: int) -> _NodeLayout:
    size = lay.ep * lay.etp
    nodes = size // dpn
    senders = np.flatnonzero(lay.tokens_dev > 0)
    src = np.repeat(senders, nodes)
    col = np.tile(np.arange(nodes), len(senders))
    dst = lay.group[src] * size + col * dpn + src % dpn
    cross = lay.node[src] != lay.node[dst]
    return _NodeLayout(src[cross], dst[cross], (src * nodes + col)[cross], nodes)


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


def _dispatch_layout(lay: Layout, global_routing: bool, same_node: bool = False) -> _DispatchLayout:
    """Every (sender, EP rank) pair is a flow, to every etp shard of the rank, zero-byte ones
    included (a zero-size part of an all-to-all-v still costs its latency): the pairs, and so
    the flow pattern, are the same arrays in every layer whatever the routing draws. A sender
    reaches the ranks of its own group, or of every group with global routing. With
    ``same_node`` (``per_node``'s forwarding stage) every device sends to the ranks of its
    own node only, tokens or not (it forwards its rail peers' tokens)."""
    tokens_dev, group, node = lay.tokens_dev, lay.group, lay.node
    ep, etp, edp = lay.ep, lay.etp, lay.edp
    senders = np.arange(lay.n_devices) if same_node else np.flatnonzero(tokens_dev > 0)
    columns = edp * ep if global_routing else ep
    # [sender, column, shard]: column c of sender s is its slot's rank (group g's rank c,
    # or with global routing slot c itself), whose shards are devices slot * etp + shard
    first = np.arange(columns) * etp  # a slot's first device, beyond its group's offset
    if not global_routing:
        first = (group[senders] * ep * etp)[:, None] + first[None, :]
    dst = (np.broadcast_to(first, (len(senders), columns))[:, :, None] + np.arange(etp)).ravel()
    per_sender = columns * etp
    src = np.repeat(senders, per_sender)
    flat = (senders[:, None] * columns + np.arange(columns)[None, :]).ravel()
    flat = np.repeat(flat, etp) if etp > 1 else flat
    src_node = np.repeat(node[senders], per_sender)
    dst_node = node[dst]
    if same_node:
        keep = src_node == dst_node
        src, dst, flat, src_node, dst_node = (a[keep] for a in (src, dst, flat, src_node, dst_node))
    local = src == dst
    remote = ~local
    return _DispatchLayout(
        src=src[remote],
        dst=dst[remote],
        remote=flat[remote],
        local=flat[local],
        cross_node=flat[src_node != dst_node],
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
    sc: Scenario, b: Bytes, lay: Layout, layers: list[LayerPlan], stage: range | list[int]
) -> dict[str, np.ndarray]:
    """Bytes resident per device for the layers ``stage`` (a pipeline stage's, or all):
    weights, KV cache / linear state, peak activations."""
    m, par = sc.model, sc.parallelism
    n_dev, tp = sc.cluster.n_devices, par.tp
    local = [lp.local_experts for lp in layers if lp.moe]
    experts_held = np.sum(local, axis=0) if local else np.zeros(n_dev)
    weights = (
        sum(dense_params_per_device(m, i, tp) for i in stage)
        + embedding_params_per_device(m, tp, embedding_copies(m.tied_embeddings, stage, m.n_layers))
    ) * b.weights + experts_held * expert_params_per_shard(m, par.etp) * b.expert_weights
    context = sc.workload.seq_len + (1 if sc.workload.phase == "decode" else 0)
    kv_per_token = sum(kv_cache_bytes_per_token(m, i, tp, b) for i in stage)
    state_per_seq = sum(linear_state_bytes_per_seq(m, i, tp) for i in stage)
    kv = lay.seqs_dev * (context * kv_per_token + state_per_seq)
    # peak activations: the largest of one attention block and one expert block's working set
    moe_tokens = max((int(lp.device_tokens.max()) for lp in layers if lp.moe), default=0)
    act = (
        np.maximum(
            lay.tokens_att * (4 * m.d_model + 2 * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim / tp),
            lay.tokens_dev * 2 * m.d_model
            + moe_tokens * (2 * m.d_model + 3 * m.d_ff_expert / par.etp),
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
