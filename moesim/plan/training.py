"""Training step (``workload.phase: train``): backward pass, recomputation, gradient
reduction, optimizer step and memory, added to the forward plan of one micro-batch.

Pure numpy; the engines walk it (see README "Training"). A step runs ``micro_batches``
passes of forward then backward (layers in reverse; in an MoE block the combine's gradient
travels like the dispatch and the dispatch's like the combine), then reduces gradients
(dense weights over the ``dp`` attention replicas, expert weights over the ``edp`` expert
groups), runs the optimizer and, with sharded optimizer states, all-gathers the weights.

Backward costs come from the forward ops of :mod:`moesim.cost.ops`: a GEMM ``Y = X W`` needs
``dX = dY W^T`` (dgrad) and ``dW = X^T dY`` (wgrad), each with the forward's FLOPs, so
GEMMs cost twice their forward (Narayanan et al., SC'21, FLOPs accounting); wgrad adds the gradient
accumulation (read and write of ``dW`` in ``grad_dtype``). The attention core's backward is
``ATTENTION_CORE_BACKWARD_FLOPS_RATIO`` times its forward, elementwise and data-movement
kernels ``ELEMENTWISE_BACKWARD_RATIO`` times.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moesim.catalog.specs import DTYPE_BYTES
from moesim.config.scenario import ScenarioError
from moesim.cost.ops import (
    Bytes,
    OpCost,
    attention_ops,
    expert_ops,
    ffn_ops,
    forward_flops_per_token,
    lm_head_ops,
    permute_ops,
    router_ops,
    unpermute_ops,
)
from moesim.cost.roofline import op_kernels, op_time_split
from moesim.cost.weights import (
    dense_params_per_device,
    embedding_params_per_device,
    expert_params_per_shard,
)
from moesim.plan.collectives import (
    ring_allgather,
    ring_allreduce,
    ring_reduce_scatter,
    tree_allreduce,
)
from moesim.plan.layout import layout
from moesim.plan.types import (
    GB,
    BackwardLayer,
    LayerPlan,
    Traffic,
    TrainingPlan,
    WorkloadPlan,
    _time,
    embedding_copies,
)

ATTENTION_CORE_BACKWARD_FLOPS_RATIO = 2.5
"""FlashAttention backward runs five matmuls per block where the forward runs two (Dao,
FlashAttention-2, 2023, Sec. 4.1 FLOPs accounting): 2.5x the forward FLOPs."""

ATTENTION_CORE_BACKWARD_BYTES_RATIO = 2.0
"""Backward reads Q, K, V, O and dO and writes dQ, dK, dV: about twice the forward traffic."""

ELEMENTWISE_BACKWARD_RATIO = 2.0
"""Backward of an elementwise or data-movement kernel (activation, gating softmax,
permutation, weighted combine) reads the saved input and the output gradient and writes the
input gradient: about twice the forward's FLOPs and traffic."""

ADAM_FLOPS_PER_PARAM = 12.0
"""Adam update per parameter: moments (4), bias corrections and square root (4), update and
weight decay (4). The step is memory-bound; this only matters on devices without bandwidth."""

LOGITS_BYTES_PER_ELEMENT = 4.0
"""Logits kept in fp32 for the cross-entropy loss and its gradient."""

ROUTER_PROBS_BYTES_PER_ELEMENT = 4.0
"""Router probabilities kept in fp32 for the gate's backward."""


def backward_ops(op: OpCost, weight_bytes: float, grad_bytes: float) -> list[OpCost]:
    """The backward kernels of one forward op.

    GEMM ``[m, k] x [k, n]`` (``gemm_count`` of them): dgrad ``[m, n] x [n, k]`` with the
    forward's FLOPs and traffic (weights read, dY read, dX written), and wgrad ``[k, m] x [m,
    n]`` with the forward's FLOPs, the activations read and ``dW`` read and written in
    ``grad_bytes`` (gradient accumulation). Other ops: scaled by the ratios above."""
    if op.gemm is not None and op.rows is not None:
        k, n = op.gemm
        m = np.asarray(op.rows, dtype=float)
        has = m > 0
        weights = np.where(has, k * n * op.gemm_count * weight_bytes, 0.0)
        activations = np.asarray(op.memory_bytes, dtype=float) - weights
        dgrad = replace(op, name=f"{op.name}_dgrad", inner=float(n), gemm=(float(n), float(k)))
        wgrad = OpCost(
            f"{op.name}_wgrad",
            op.flops,
            activations + np.where(has, 2.0 * k * n * op.gemm_count * grad_bytes, 0.0),
            op.kernels,
            rows=np.where(has, k, 0.0),
            unfused_kernels=op.unfused_kernels,
        )
        return [dgrad, wgrad]
    core = op.name == "attention_core"
    f_ratio = ATTENTION_CORE_BACKWARD_FLOPS_RATIO if core else ELEMENTWISE_BACKWARD_RATIO
    b_ratio = ATTENTION_CORE_BACKWARD_BYTES_RATIO if core else ELEMENTWISE_BACKWARD_RATIO
    unfused = op.unfused_memory_bytes
    return [
        replace(
            op,
            name=f"{op.name}_bwd",
            flops=np.asarray(op.flops, dtype=float) * f_ratio,
            memory_bytes=np.asarray(op.memory_bytes, dtype=float) * b_ratio,
            unfused_memory_bytes=None if unfused is None else np.asarray(unfused) * b_ratio,
        )
    ]


def _expert_time(dev, ops: list[OpCost], cdt: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-device seconds and FLOPs of expert kernels over ``[device, expert]`` token
    counts, launched as in the forward (one grouped launch per kernel, or one per expert)."""
    split = [op_time_split(dev, op, cdt, launches=False) for op in ops]
    seconds = sum(t for t, _ in split).sum(axis=1)
    for op, (_, measured) in zip(ops, split, strict=True):
        busy = (np.asarray(op.flops) > 0) | (np.asarray(op.memory_bytes) > 0)
        roofline = busy & (measured == 0)
        count = roofline.any(axis=1) if dev.grouped_experts else roofline.sum(axis=1)
        seconds = seconds + count * op_kernels(dev, op) * dev.kernel_launch_s
    flops = sum(np.asarray(op.flops, dtype=float) for op in ops).sum(axis=1)
    return seconds, flops


def _phase_ops(
    plan: WorkloadPlan, lp: LayerPlan, b: Bytes, ctx: dict[str, np.ndarray]
) -> dict[str, list[OpCost]]:
    """The forward ops of each phase of ``lp`` (the same calls as :func:`build_plan`)."""
    sc = plan.scenario
    m, par = sc.model, sc.parallelism
    tp, etp = par.tp, par.etp
    ops = {
        "attention": attention_ops(
            m, lp.attention_kind, ctx["seqs_dev"], sc.workload.seq_len, 0, tp, b
        )
    }
    tokens_att = ctx["tokens_att"]
    if not lp.moe:
        ops["dense_ffn"] = ffn_ops("dense_ffn", tokens_att, m.d_model, m.d_ff_dense / tp, b)
        return ops
    tokens_dev = ctx["tokens_dev"]
    ops["router"] = router_ops(m, tokens_dev, b)
    ops["permute"] = [permute_ops(lp.pairs_out, m.d_model, b)]
    ops["unpermute"] = [unpermute_ops(lp.pairs_out, tokens_dev, m.d_model, b)]
    if m.n_shared_experts:
        d_ff = m.n_shared_experts * m.d_ff_shared / tp
        ops["shared_experts"] = ffn_ops("shared", tokens_att, m.d_model, d_ff, b)
    ops["experts"] = expert_ops(lp.expert_tokens, m.d_model, m.d_ff_expert / etp, b)
    return ops


def _layer_backward(
    plan: WorkloadPlan, lp: LayerPlan, b: Bytes, ctx: dict[str, np.ndarray], grad_bytes: float
) -> BackwardLayer:
    sc = plan.scenario
    dev, cdt = sc.cluster.device, sc.workload.dtypes.compute
    selective = sc.workload.train.recompute == "selective"
    compute_s, flops, weight_s = {}, {}, {}
    recompute_s = np.zeros(plan.n_devices)
    recompute_f = np.zeros(plan.n_devices)
    for phase, ops in _phase_ops(plan, lp, b, ctx).items():
        w_bytes = b.expert_weights if phase == "experts" else b.weights
        bwd = [k for op in ops for k in backward_ops(op, w_bytes, grad_bytes)]
        redo = [op for op in ops if op.name == "attention_core" or op.name.endswith("_act")]
        wgrad = [k for k in bwd if k.name.endswith("_wgrad")]
        if phase == "experts":
            compute_s[f"{phase}_bwd"], flops[f"{phase}_bwd"] = _expert_time(dev, bwd, cdt)
            weight_s[f"{phase}_bwd"] = _expert_time(dev, wgrad, cdt)[0]
            if selective:
                t, f = _expert_time(dev, redo, cdt)
                recompute_s, recompute_f = recompute_s + t, recompute_f + f
        else:
            t, f, _ = _time(dev, bwd, cdt)
            compute_s[f"{phase}_bwd"], flops[f"{phase}_bwd"] = t * np.ones(plan.n_devices), f
            weight_s[f"{phase}_bwd"] = _time(dev, wgrad, cdt)[0] * np.ones(plan.n_devices)
            if selective and redo:
                t, f, _ = _time(dev, redo, cdt)
                recompute_s, recompute_f = recompute_s + t, recompute_f + f
    return BackwardLayer(compute_s, flops, recompute_s, recompute_f, weight_s)


def _layer_params(plan: WorkloadPlan) -> tuple[np.ndarray, np.ndarray, float]:
    """Parameters each device holds, as the forward memory counts them: per layer the dense
    ones (attention, dense FFN or shared experts split over tp, router replicated) ``[L]``
    and the local experts' (split over etp) ``[L, devices]``; and the embeddings and LM head
    (split over tp)."""
    sc = plan.scenario
    m, par = sc.model, sc.parallelism
    dense = np.array([dense_params_per_device(m, lp.index, par.tp) for lp in plan.layers])
    expert = np.zeros((len(plan.layers), plan.n_devices))
    for k, lp in enumerate(plan.layers):
        if lp.moe:
            expert[k] = lp.local_experts * expert_params_per_shard(m, par.etp)
    copies = embedding_copies(m.tied_embeddings, [lp.index for lp in plan.layers], m.n_layers)
    return dense, expert, float(embedding_params_per_device(m, par.tp, copies))


def _params_per_device(plan: WorkloadPlan) -> tuple[np.ndarray, np.ndarray]:
    """(dense, expert) parameters held by each device: :func:`_layer_params` summed."""
    dense, expert, embeddings = _layer_params(plan)
    return np.full(plan.n_devices, dense.sum() + embeddings), expert.sum(axis=0)


def _layer_activation_elems(
    plan: WorkloadPlan, lp: LayerPlan, ctx: dict[str, np.ndarray], keep_act: bool
) -> np.ndarray:
    """Activation elements one layer keeps for its backward, per device (Korthikanti et al.,
    MLSys 2023, Sec. 4, with FlashAttention: no attention scores). Attention: the residual
    and normalised input (sequence parallel, ``2d / tp``), Q, K, V and the core output;
    MoE: block input and normalised input, router probabilities, each received pair's
    expert input, gate and up outputs and (unless recomputed) activation output, and each
    sent pair's returned output; shared experts and dense FFNs: input, gate, up, activation."""
    sc = plan.scenario
    m, par = sc.model, sc.parallelism
    tp, d = par.tp, m.d_model
    h_loc = m.n_heads / tp
    ab = sc.workload.dtypes.bytes_of("activations")
    if lp.attention_kind == "mla":
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        per_tok = (a.q_lora_rank or 0) + a.kv_lora_rank + h_loc * (2 * qk + 2 * a.v_head_dim)
    else:
        kv = m.n_heads if lp.attention_kind == "linear" else m.n_kv_heads
        per_tok = (h_loc + 2 * max(1.0, kv / tp)) * m.head_dim + h_loc * m.head_dim
    elems = ctx["tokens_att"] * (2 * d / tp + per_tok)
    ffn = 3 if keep_act else 2  # gate and up outputs, plus the activation output if kept
    if not lp.moe:
        return elems + ctx["tokens_att"] * (d + ffn * m.d_ff_dense / tp)
    f_loc = m.d_ff_expert / par.etp
    elems = elems + ctx["tokens_dev"] * (2 * d + m.n_experts * ROUTER_PROBS_BYTES_PER_ELEMENT / ab)
    elems = elems + lp.device_tokens * (d + ffn * f_loc) + lp.pairs_out * d
    if m.n_shared_experts:
        d_ff = m.n_shared_experts * m.d_ff_shared / tp
        elems = elems + ctx["tokens_att"] * (d + ffn * d_ff)
    return elems


def _activations_bytes(
    plan: WorkloadPlan, ctx: dict[str, np.ndarray], has_head: float = 1.0
) -> np.ndarray:
    """Peak activation bytes of one micro-batch (micro-batches run one after another):
    every layer's saved tensors (``recompute: full``: only each layer's input, plus the
    largest layer's tensors while it is recomputed), and the fp32 logits."""
    sc = plan.scenario
    tr, m = sc.workload.train, sc.model
    ab = sc.workload.dtypes.bytes_of("activations")
    keep_act = tr.recompute == "none"
    per_layer = np.array(
        [_layer_activation_elems(plan, lp, ctx, keep_act) for lp in plan.layers]
    )  # [layer, device]
    if tr.recompute == "full":
        saved = len(plan.layers) * ctx["tokens_dev"] * m.d_model + per_layer.max(axis=0)
    else:
        saved = per_layer.sum(axis=0)
    logits = ctx["tokens_att"] * m.vocab_size / sc.parallelism.tp * LOGITS_BYTES_PER_ELEMENT
    return saved * ab + logits * has_head


def _grad_collectives(
    plan: WorkloadPlan, dense: np.ndarray, expert: np.ndarray, b: Bytes
) -> tuple[list[Traffic], list[Traffic]]:
    """Gradient reduction over the dense weights' data-parallel groups (devices with the same
    tensor rank) and the expert weights' expert-data-parallel groups (devices at the same
    position of every expert group); then, with sharded optimizer states, the all-gather of
    the updated weights."""
    sc = plan.scenario
    tr, par = sc.workload.train, sc.parallelism
    n, tp = plan.n_devices, par.tp
    dp, group = n // tp, par.ep * par.etp
    g = np.arange(n)
    dp_groups = g.reshape(dp, tp).T  # [tp, dp]
    edp_groups = g.reshape(n // group, group).T  # [ep x etp, edp]
    gb = DTYPE_BYTES[tr.grad_dtype]
    parts = [(dp_groups, dense, b.weights), (edp_groups, expert, b.expert_weights)]
    reduce, gather = [], []
    for groups, params, w_bytes in parts:
        if groups.shape[1] < 2 or not params.any():
            continue
        if tr.zero_stage == 0:
            allreduce = tree_allreduce if tr.grad_allreduce == "tree" else ring_allreduce
            reduce.append(allreduce(groups, params * gb))
        else:  # NCCL has no tree reduce-scatter / all-gather: rings
            reduce.append(ring_reduce_scatter(groups, params * gb))
            gather.append(ring_allgather(groups, params * w_bytes))
    return reduce, gather


def replica_grad_collectives(plan: WorkloadPlan, lp: LayerPlan) -> list[Traffic]:
    """The gradient all-reduce of one layer's replicated experts (``routing.replicate_hot``):
    the ``r`` EP ranks of an expert group holding copies of expert ``e`` sum its weight
    gradient, one ring (or tree, ``grad_allreduce``) per expert, expert group and etp shard,
    of the expert's gradient bytes per shard ``3 d d_ff / etp x grad_dtype`` (each of the
    ``r`` members sends ``2 (r - 1) / r`` of it in a ring). It runs before the
    expert-data-parallel reduction, which then sums each rank's copy over the expert groups
    as for any expert (a two-level all-reduce)."""
    share = lp.expert_share
    if not lp.moe or share is None or not (share > 0).sum(axis=1).max() > 1:
        return []
    sc = plan.scenario
    tr, par = sc.workload.train, sc.parallelism
    ep, etp = share.shape[1], par.etp
    edp = plan.n_devices // (ep * etp)
    nbytes = expert_params_per_shard(sc.model, etp) * DTYPE_BYTES[tr.grad_dtype]
    allreduce = tree_allreduce if tr.grad_allreduce == "tree" else ring_allreduce
    out = []
    for e in np.flatnonzero((share > 0).sum(axis=1) > 1):
        ranks = np.flatnonzero(share[e] > 0)
        base = (np.arange(edp)[:, None] * ep * etp + np.arange(etp)[None, :]).ravel()
        groups = base[:, None] + ranks[None, :] * etp  # [edp x etp, r] devices
        out.append(allreduce(groups, nbytes))
    return out


def _optimizer_s(plan: WorkloadPlan, dense: np.ndarray, expert: np.ndarray, b: Bytes):
    """Adam on this device's parameters (its shard with ZeRO >= 1): read the gradient, read
    and write the optimizer state, write the weight; memory-bound."""
    sc = plan.scenario
    tr, par = sc.workload.train, sc.parallelism
    n = plan.n_devices
    dp, edp = n // par.tp, n // (par.ep * par.etp)
    if tr.zero_stage >= 1:
        dense, expert = dense / dp, expert / edp
    gb = DTYPE_BYTES[tr.grad_dtype]
    per_param = gb + 2.0 * tr.optimizer_bytes_per_param
    memory = (dense + expert) * per_param + dense * b.weights + expert * b.expert_weights
    op = OpCost("optimizer", ADAM_FLOPS_PER_PARAM * (dense + expert), memory)
    return _time(sc.cluster.device, [op], "fp32")[0]


def _context(plan: WorkloadPlan) -> dict[str, np.ndarray]:
    """Per-device sequence and token counts of one pass (the plan's layout)."""
    lay = layout(plan.scenario)
    return {
        "seqs_dev": lay.seqs_dev.astype(float),
        "tokens_att": lay.tokens_att.astype(float),
        "tokens_dev": lay.tokens_dev.astype(float),
    }


def add_training(plan: WorkloadPlan, b: Bytes, check: bool = True) -> None:
    """Attach the backward pass, gradient reduction, optimizer and training memory to a
    forward plan of one micro-batch (of a pipeline stage's layers: the LM head only on the
    last stage); raise :class:`ScenarioError` if it does not fit (``check``)."""
    sc = plan.scenario
    tr, m = sc.workload.train, sc.model
    dev, cdt = sc.cluster.device, sc.workload.dtypes.compute
    ctx = _context(plan)
    gb = DTYPE_BYTES[tr.grad_dtype]
    backward = [_layer_backward(plan, lp, b, ctx, gb) for lp in plan.layers]
    head = lm_head_ops(m, ctx["tokens_att"], sc.parallelism.tp, b)
    head_bwd = backward_ops(head, b.weights, gb)
    lm_bwd_s, lm_bwd_f, _ = _time(dev, head_bwd, cdt)
    has_head = float(plan.layers[-1].index == m.n_layers - 1)  # a pipeline's last stage
    lm_bwd_s, lm_bwd_f = lm_bwd_s * has_head, lm_bwd_f * has_head
    dense, expert = _params_per_device(plan)
    replicas = [replica_grad_collectives(plan, lp) for lp in plan.layers]
    reduce, gather = _grad_collectives(plan, dense, expert, b)
    reduce = [t for layer in replicas for t in layer] + reduce
    layer_reduce = None
    if tr.overlap_grad_reduce:  # one bucket per layer, then embeddings and LM head
        dense_l, expert_l, embeddings = _layer_params(plan)
        ones = np.ones(plan.n_devices)
        layer_reduce = [
            rep + _grad_collectives(plan, d * ones, e, b)[0]
            for rep, d, e in zip(replicas, dense_l, expert_l, strict=True)
        ]
        reduce = _grad_collectives(plan, embeddings * ones, 0.0 * ones, b)[0]
    head_f = np.asarray(head.flops) * has_head
    fwd_f = sum(sum(lp.flops.values()) for lp in plan.layers) + head_f
    bwd_f = sum(sum(bl.flops.values()) + bl.recompute_flops for bl in backward) + lm_bwd_f
    redo_f = fwd_f - head_f if tr.recompute == "full" else 0.0
    plan.train = TrainingPlan(
        config=tr,
        backward=backward,
        lm_head_bwd_s=lm_bwd_s * np.ones(plan.n_devices),
        grad_reduce=reduce,
        param_gather=gather,
        optimizer_s=_optimizer_s(plan, dense, expert, b) * np.ones(plan.n_devices),
        model_flops_per_token=3.0 * forward_flops_per_token(m, sc.workload.seq_len),
        executed_flops=tr.micro_batches * (fwd_f + bwd_f + redo_f) * np.ones(plan.n_devices),
        dense_params=dense,
        expert_params=expert,
        combine=[lp.combine_stages() for lp in plan.layers],
        layer_grad_reduce=layer_reduce,
    )
    n = plan.n_devices
    dp, edp = n // sc.parallelism.tp, n // (sc.parallelism.ep * sc.parallelism.etp)
    grad_div = (dp, edp) if tr.zero_stage >= 2 else (1, 1)
    opt_div = (dp, edp) if tr.zero_stage >= 1 else (1, 1)
    plan.memory_bytes = {
        "weights": plan.memory_bytes["weights"],
        "gradients": (dense / grad_div[0] + expert / grad_div[1]) * gb,
        "optimizer_states": (dense / opt_div[0] + expert / opt_div[1])
        * tr.optimizer_bytes_per_param,
        "activations": _activations_bytes(plan, ctx, has_head),
    }
    if check:
        check_fits_training(plan)


def check_fits_training(plan: WorkloadPlan) -> None:
    """The fullest device's memory against its capacity; the error names the device, its
    parts and the shortfall."""
    sc = plan.scenario
    used = plan.memory_used_bytes
    cap = sc.cluster.device.memory_bytes
    worst = int(np.argmax(used))
    if used[worst] <= cap:
        return
    parts = ", ".join(f"{k} {v[worst] / GB:.1f} GB" for k, v in plan.memory_bytes.items())
    n = sc.cluster.devices_per_node
    raise ScenarioError(
        "cluster.device",
        f"training step does not fit: device n{worst // n}.d{worst % n} needs "
        f"{used[worst] / GB:.1f} GB ({parts}) but {sc.cluster.device.name} has "
        f"{cap / GB:.1f} GB (short by {(used[worst] - cap) / GB:.1f} GB); add devices, raise "
        "parallelism.ep/tp, workload.train.zero_stage or micro_batches, or recompute",
    )


def training_summary(
    plan: WorkloadPlan, breakdown_s: dict[str, float], comm_phases: tuple[str, ...], step_s: float
) -> dict:
    """Training metrics for ``summary.json``.

    ``mfu``: model FLOPs utilization (PaLM, Chowdhery et al. 2022, App. B): tokens/s x
    model FLOPs per token / (devices x dense peak), model FLOPs per token = 3 x the forward
    (forward + 2 x backward), forward = 2 x active matmul parameters + the attention core at
    the full sequence length (``moesim.cost.ops.forward_flops_per_token(model, seq_len)``, i.e.
    ``6 N + 12 L h hd S``), recomputation not counted. ``hfu``: the FLOPs actually executed
    (recomputation, causal attention) over the same peak. ``exposed_comm_s``: the critical
    device's time waiting on collectives (breakdown), which includes waiting for slower peers."""
    sc = plan.scenario
    tr = plan.train
    n = plan.n_devices
    peak = sc.cluster.device.flops_per_s(sc.workload.dtypes.compute)
    tokens_per_s = plan.tokens / step_s if step_s > 0 else 0.0
    comm = sum(v for k, v in breakdown_s.items() if k in comm_phases)
    used = plan.memory_used_bytes
    worst = int(np.argmax(used))
    a2a = sum(lp.all_to_all_bytes for lp in plan.layers if lp.moe)
    passes = 3 if tr.full_recompute else 2  # forward, backward (and the recomputed forward)
    return {
        "mfu": tokens_per_s * tr.model_flops_per_token / (n * peak),
        "hfu": float(tr.executed_flops.sum()) / (step_s * n * peak) if step_s > 0 else 0.0,
        "exposed_comm_s": comm,
        "compute_s": step_s - comm - breakdown_s.get("pipeline", 0.0),
        "pipeline_wait_s": breakdown_s.get("pipeline", 0.0),  # bubbles, other stages
        "model_flops_per_token": tr.model_flops_per_token,
        "micro_batches": tr.micro_batches,
        "tokens_per_micro_batch": plan.tokens // tr.micro_batches,
        "recompute": tr.config.recompute,
        "overlap_chunks": tr.chunks,
        "zero_stage": tr.config.zero_stage,
        "grad_reduce_bytes": float(
            sum(t.total_bytes for t in tr.grad_reduce)
            + sum(t.total_bytes for bucket in tr.layer_grad_reduce or [] for t in bucket)
        ),
        "replica_grad_reduce_bytes": float(
            sum(t.total_bytes for lp in plan.layers for t in replica_grad_collectives(plan, lp))
        ),
        "overlap_grad_reduce": tr.config.overlap_grad_reduce,
        "param_gather_bytes": float(sum(t.total_bytes for t in tr.param_gather)),
        "all_to_all_bytes": float(a2a * passes * tr.micro_batches),
        "memory_device": worst,
        "memory_bytes": {k: float(v[worst]) for k, v in plan.memory_bytes.items()},
    }
