"""The workload plan's data: what each layer asks of every device, and the traffic of its
collectives, as plain arrays (no time ordering)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from moesim.config.scenario import Scenario, TrainConfig
from moesim.cost.ops import OpCost
from moesim.cost.roofline import op_time_split

GB = 1e9


@dataclass(frozen=True)
class Traffic:
    """Aggregated flows of one collective: ``bytes[i]`` from ``src[i]`` to ``dst[i]``.

    ``local_bytes`` stayed on the sending device. ``latency_steps`` multiplies path latency
    (a ring all-reduce pays it once per step). An MoE dispatch lists every pair of its
    all-to-all, zero-byte ones included.

    ``members[g]`` is the group device ``g`` takes part in (-1: none; ``None``: one group of
    every device): no member finishes before the latest member of its group has joined plus
    the collective's own time. ``barrier``: the algorithm needs every member's contribution
    before any flow of the group moves (ring and tree all-reduce, reduce-scatter,
    all-gather: each step waits for its receive, so a late rank holds up the whole ring).
    An all-to-all needs no barrier: every receiver already waits for a flow from every
    sender of its group, zero-byte ones included. ``ring_steps``: the flows aggregate that
    many equal ring steps (each member sends ``nbytes / ring_steps`` to its successor per
    step, after receiving the previous step); :meth:`ring_step` is one of them.
    """

    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    local_bytes: float = 0.0
    latency_steps: float = 1.0
    members: np.ndarray | None = None
    barrier: bool = False
    ring_steps: int = 0  # a ring algorithm of this many equal steps (0: not a ring)
    launches: bool = True  # pays the collective kernel's launch (not a ring's later steps)

    def __post_init__(self) -> None:
        """The arrays are made read-only: a traffic is a value (the plan shares one between
        the layers that reuse a block, the analytic engine caches its link loads)."""
        for name in ("src", "dst", "nbytes", "members"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    def reversed(self) -> Traffic:
        return replace(self, src=self.dst, dst=self.src)

    def scaled(self, factor: float) -> Traffic:
        """The same flows carrying ``factor`` of their bytes (a chunk of a pipelined
        collective)."""
        return replace(self, nbytes=self.nbytes * factor, local_bytes=self.local_bytes * factor)

    def ring_step(self, first: bool = True) -> Traffic:
        """One step of a ring collective: every member's flow with ``1 / ring_steps`` of its
        bytes, one latency, no barrier (each step waits for its own receive instead); only the
        ``first`` pays the kernel launch (one kernel runs the whole ring)."""
        k = self.ring_steps
        return replace(
            self,
            nbytes=self.nbytes / k,
            local_bytes=self.local_bytes / k,
            latency_steps=1.0,
            barrier=False,
            ring_steps=0,
            launches=first,
        )

    @property
    def total_bytes(self) -> float:
        return float(self.nbytes.sum())


def streamed(stages: list[Traffic]) -> Traffic:
    """The stages of a staged all-to-all as one collective whose flows move together: a kernel
    that forwards each chunk as it arrives (DeepEP's normal kernels: RDMA to the rail peer,
    NVLink on from there, deepseek-ai/DeepEP ``csrc/kernels/internode.cu``), so the slower
    leg sets the time. A device completes when its own inbound bytes of every leg have
    arrived; the pipeline's fill (one chunk's trip through both legs) is not charged."""
    if any(t.members is not None or t.barrier or t.ring_steps for t in stages):
        raise ValueError("only plain all-to-all stages stream together")
    return Traffic(
        np.concatenate([t.src for t in stages]),
        np.concatenate([t.dst for t in stages]),
        np.concatenate([t.nbytes for t in stages]),
        sum(t.local_bytes for t in stages),
        max(t.latency_steps for t in stages),
    )


def _layer_sums(tables: list[dict[str, np.ndarray]]) -> list[float]:
    """Per table, the sum over its arrays of ``float(np.sum(a))``; one reduction where all
    arrays share a 1-D shape (a row's sum is the 1-D sum, bit for bit)."""
    arrays = [np.asarray(a, dtype=float) for t in tables for a in t.values()]
    if arrays and len({a.shape for a in arrays}) == 1 and arrays[0].ndim == 1:
        sums = np.stack(arrays).sum(axis=1).tolist()
    else:
        sums = [float(np.sum(a)) for a in arrays]
    ends = np.cumsum([len(t) for t in tables]).tolist()
    return [sum(sums[lo:hi]) for lo, hi in zip([0, *ends][:-1], ends, strict=True)]


@dataclass
class LayerPlan:
    """One transformer layer on every device."""

    index: int
    attention_kind: str
    moe: bool
    compute_s: dict[str, np.ndarray]
    flops: dict[str, np.ndarray]
    tp_comm: Traffic | None = None
    tp_comm_after: Traffic | None = None
    tp_shared_in: Traffic | None = None  # shared experts' input all-gather (tp > 1)
    tp_shared_out: Traffic | None = None  # and their output reduce-scatter
    dispatch: Traffic | None = None
    dispatch_forward: Traffic | None = None  # per_node: forwarding inside the node after it
    combine_scale: float = 1.0  # combine bytes over dispatch bytes (dtypes.combine / dispatch)
    measured_s: dict[str, np.ndarray] = field(default_factory=dict)
    expert_load: np.ndarray | None = None
    device_tokens: np.ndarray | None = None
    routed_pairs: int = 0
    dropped_pairs: int = 0
    cross_node_pairs: int = 0
    local_experts: np.ndarray | None = None
    balance_history: np.ndarray | None = None
    expert_tokens: np.ndarray | None = None  # [device, local expert slot] (training only)
    expert_share: np.ndarray | None = None  # [expert, ep rank] token shares (training only)
    pairs_out: np.ndarray | None = None  # token-expert pairs each device sends (training only)
    pim: PimWork | None = None  # work on the PIM units (plan/pim_placement.py)
    pim_attention: PimWork | None = None  # pim.policy co_processing: attention beside lp.pim
    expert_weight_bytes: np.ndarray | None = None  # expert weights the GPU reads (energy)
    tiers: object | None = None  # offloaded experts: a moesim.plan.tiers.TierWork
    combine_made: tuple | None = field(default=None, repr=False, compare=False)
    """``(dispatch, dispatch_forward, {combine_scale: stages})`` of :meth:`combine_stages`."""

    @property
    def combine(self) -> Traffic | None:
        """The dispatch's network stage reversed, in the combine's dtype."""
        return self.combine_stages()[-1] if self.dispatch is not None else None

    @property
    def dispatch_stages(self) -> list[Traffic]:
        """The dispatch's collectives in order (per_node: network, then inside the node)."""
        if self.dispatch is None:
            return []
        return [self.dispatch] + ([self.dispatch_forward] if self.dispatch_forward else [])

    @property
    def all_to_all_bytes(self) -> float:
        """Bytes the dispatch and the combine move between devices, every stage."""
        return sum(t.total_bytes for t in self.dispatch_stages) * (1.0 + self.combine_scale)

    def combine_stages(self) -> list[Traffic]:
        """The combine: the dispatch's stages reversed, in reverse order, in the combine's
        dtype; built once per dispatch (layers that share a dispatch share its combine)."""
        made = self.combine_made
        if made is None or made[0] is not self.dispatch or made[1] is not self.dispatch_forward:
            made = self.combine_made = (self.dispatch, self.dispatch_forward, {})
        scale = self.combine_scale
        if scale not in made[2]:
            stages = [t.reversed() for t in reversed(self.dispatch_stages)]
            made[2][scale] = stages if scale == 1.0 else [t.scaled(scale) for t in stages]
        return list(made[2][scale])


@dataclass
class WorkloadPlan:
    """The whole step: layers, final head, memory per device."""

    scenario: Scenario
    n_devices: int
    tokens: int
    layers: list[LayerPlan]
    lm_head_s: np.ndarray
    memory_bytes: dict[str, np.ndarray] = field(default_factory=dict)
    lm_head_measured_s: np.ndarray | None = None
    train: TrainingPlan | None = None  # phase: train (moesim/training.py)
    pim_memory_bytes: dict[str, np.ndarray] = field(default_factory=dict)  # on PIM units
    tier_memory_bytes: np.ndarray | None = None  # offloaded experts (moesim/plan/tiers.py)
    sub_plans: list[WorkloadPlan] = field(default_factory=list)  # pim.sub_batches halves
    warnings: list[str] = field(default_factory=list)  # likely scenario mistakes, in the summary
    pipeline: PipelinePlan | None = None  # stages and micro-batches (moesim/plan/pipeline.py)
    draft: list[LayerPlan] = field(default_factory=list)  # MTP module's layer (moesim/plan/mtp.py)
    draft_lm_head_s: np.ndarray | None = None

    def measured_fraction(self) -> float:
        """Share of all devices' compute seconds that came from measured kernel tables."""
        measured = (
            float(np.sum(self.lm_head_measured_s)) if self.lm_head_measured_s is not None else 0.0
        )
        # each layer's phases summed, then added in layer order: a plain loop's order
        measured = sum(_layer_sums([lp.measured_s for lp in self.layers]), measured)
        if measured == 0.0:  # no measured kernel: the total is not needed
            return 0.0
        total = float(self.lm_head_s.sum())
        total = sum(_layer_sums([lp.compute_s for lp in self.layers]), total)
        return measured / total if total > 0 else 0.0

    @property
    def memory_used_bytes(self) -> np.ndarray:
        return sum(self.memory_bytes.values())  # type: ignore[return-value]


@dataclass
class PipelinePlan:
    """Pipeline stages and micro-batches of a step (:mod:`moesim.plan.pipeline`).

    Stage ``s`` runs on the devices ``masks[s]``; ``chunks[s][c]`` are the layer indices of
    its chunk ``c`` (one chunk, or ``virtual_stages`` interleaved, or DualPipe's two
    directions); ``layers[s]`` / ``backward[s]`` / ``combine[s]`` its layers' work by layer
    index. ``send[(a, b)]`` carries one micro-batch's activations (or gradients) from each
    device of stage ``a`` to the device at the same position of stage ``b``.
    ``grad_reduce[s]`` / ``param_gather[s]`` / ``optimizer_s[s]``: stage ``s``'s step after
    its last backward."""

    pp: int
    micro_batches: int
    schedule: str
    masks: list[np.ndarray]
    chunks: list[list[tuple[int, ...]]]
    send: dict[tuple[int, int], Traffic]
    layers: list[dict[int, LayerPlan]] = field(default_factory=list)  # per stage, by index
    backward: list[dict[int, BackwardLayer]] = field(default_factory=list)
    combine: list[dict[int, list[Traffic]]] = field(default_factory=list)  # training, per stage
    overlap: bool = False  # two_batch: micro-batches interleaved, all-to-alls under compute
    grad_reduce: list[list[Traffic]] = field(default_factory=list)
    param_gather: list[list[Traffic]] = field(default_factory=list)
    optimizer_s: list[np.ndarray] = field(default_factory=list)


def embedding_copies(tied: bool, layers: tuple[int, ...] | range, n_layers: int) -> int:
    """Embedding matrices a stage holding ``layers`` keeps: the input embedding on the
    stage with layer 0, the output projection on the stage with the last layer; tied
    embeddings are one matrix, kept by both end stages when they differ (Megatron-LM)."""
    first, last = 0 in layers, (n_layers - 1) in layers
    return int(first or last) if tied else int(first) + int(last)


@dataclass
class PimWork:
    """One layer's PIM work, per device (arrays of length n_devices).

    ``phase``: ``experts`` (runs beside the GPU's experts) or ``attention`` (after the GPU's
    attention projections). ``resident_experts``: experts of this layer whose weights sit on
    the device's PIM units."""

    phase: str
    seconds: np.ndarray
    in_bytes: np.ndarray
    out_bytes: np.ndarray
    flops: np.ndarray
    internal_bytes: np.ndarray
    tokens: np.ndarray
    resident_experts: np.ndarray


@dataclass
class BackwardLayer:
    """Backward work of one layer on every device (keys: forward phase + ``_bwd``).
    ``weight_s``: the part of ``compute_s`` that computes weight gradients (the wgrad GEMMs),
    which a zero-bubble schedule runs apart from the input gradients (DualPipe's W)."""

    compute_s: dict[str, np.ndarray]
    flops: dict[str, np.ndarray]
    recompute_s: np.ndarray  # selective recomputation run just before this layer's backward
    recompute_flops: np.ndarray
    weight_s: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class TrainingPlan:
    """What a training step adds to the forward plan of one micro-batch."""

    config: TrainConfig
    backward: list[BackwardLayer]  # same order as ``plan.layers``
    lm_head_bwd_s: np.ndarray
    grad_reduce: list[Traffic]  # sequential collectives before the optimizer
    param_gather: list[Traffic]  # sequential collectives after it (sharded optimizer)
    optimizer_s: np.ndarray
    model_flops_per_token: float
    executed_flops: np.ndarray  # per device, whole step, recomputation included
    dense_params: np.ndarray  # per device
    expert_params: np.ndarray  # per device
    combine: list[
        list[Traffic]
    ]  # per layer, its stages, built once (``combine_stages()`` makes new ones)
    # overlap_grad_reduce: per layer, the collectives of its gradient bucket (``grad_reduce``
    # then holds only the embeddings' and LM head's, run after the last backward)
    layer_grad_reduce: list[list[Traffic]] | None = None

    @property
    def micro_batches(self) -> int:
        return self.config.micro_batches

    @property
    def chunks(self) -> int:
        """Pipelined chunks per MoE block (1: no overlap)."""
        return self.config.chunks if self.config.overlap == "chunked" else 1

    @property
    def full_recompute(self) -> bool:
        return self.config.recompute == "full"


def _time(device, ops: list[OpCost], dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-device seconds, FLOPs and measured-kernel seconds of a phase's ops."""
    parts = [op_time_split(device, op, dtype) for op in ops]
    t = np.asarray(sum(p[0] for p in parts), dtype=float)
    measured = np.asarray(sum(p[1] for p in parts), dtype=float)
    f = sum(np.asarray(op.flops, dtype=float) for op in ops)
    return t, np.asarray(f, dtype=float), measured
