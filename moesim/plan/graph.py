"""The step graph: one ordered list of nodes that both engines walk.

A node is a compute kernel on every device (per-device seconds), a collective over groups of
devices (a :class:`~moesim.plan.types.Traffic`), or a transfer of per-device bytes over one
link each (a GPU and its PIM units). Nodes are vectorised over devices: one node per
(layer, phase), never per device or per token.

Semantics, per device ``g`` (both engines implement exactly these):

- ``deps``: the node starts on ``g`` once every dependency has completed on ``g``: a compute
  node when its kernel ends, a collective or transfer when ``g``'s inbound bytes have arrived
  (and, for a collective, no earlier than the latest member of ``g``'s group joined plus the
  collective's own time).
- ``stream``: compute nodes run one at a time on their stream of ``g`` (``gpu``, ``pim``), in
  graph order. A collective or transfer with a ``stream`` is issued by that stream in graph
  order; with ``wait`` the stream then waits for it (a blocking collective); without, the
  stream goes on and later nodes wait through ``deps``. A node with ``stream=None`` is issued
  as soon as its dependencies complete (a communication stream).
- Waiting time on the ``gpu`` stream is recorded under the phase of the node waited for;
  a blocking collective's own wait under its phase. Graph order is a topological order.
- ``devices``: a node involves only these devices (a pipeline stage's layers, a send from
  one stage to the next); the others skip it. A collective's ``devices`` are its senders
  and receivers. A dependency that does not involve ``g`` is complete on ``g`` (a send's
  receivers do not wait for the sender's kernel, only for the bytes).

Adding a phase (a shared-expert reduce, a pipeline send, a second micro-batch) is one call to
:class:`StepGraph`'s builders in :func:`build_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.plan.pipeline import Item, route, schedule_order
from moesim.plan.types import LayerPlan, Traffic, WorkloadPlan, streamed

FORWARD_COMPUTE = (
    "attention",
    "router",
    "permute",
    "shared_experts",
    "experts",
    "unpermute",
    "dense_ffn",
    "lm_head",
)
# pim: waiting for PIM units; expert_fetch: for offloaded experts' weights
# (moesim/plan/tiers.py); pipeline: waiting for another stage (bubbles and activations)
FORWARD_COMM = ("tp_comm", "dispatch", "combine", "pim", "expert_fetch", "pipeline")
# training: the backward of each forward phase, recomputation, optimizer
TRAIN_COMPUTE_PHASES = (*(f"{p}_bwd" for p in FORWARD_COMPUTE), "recompute", "optimizer")
TRAIN_COMM_PHASES = ("combine_bwd", "dispatch_bwd", "grad_reduce", "param_gather")
COMPUTE_PHASES = (*FORWARD_COMPUTE, *TRAIN_COMPUTE_PHASES)
COMM_PHASES = (*FORWARD_COMM, *TRAIN_COMM_PHASES)

COMPUTE, COLLECTIVE, TRANSFER = "compute", "collective", "transfer"
GPU, PIM = "gpu", "pim"


@dataclass(eq=False, slots=True)
class Node:
    """One step of the graph on every device (see the module docstring for the semantics).
    Never changed once added to a graph (not frozen: a frozen dataclass takes 3-4x as long
    to build, and a step graph has hundreds to thousands of nodes per simulated point).

    ``seconds``: a compute node's kernel time per device (``None``: a join, it only waits for
    its ``deps``). ``traffic``: a collective's flows. ``links`` / ``nbytes``: a transfer's
    link and bytes per device (``links[g] < 0``: nothing to move for ``g``). ``label``: the
    PIM track's slice name of a ``pim``-stream kernel."""

    id: int
    kind: str
    phase: str
    layer: int
    deps: tuple[int, ...] = ()
    stream: str | None = GPU
    wait: bool = False
    seconds: np.ndarray | None = None
    traffic: Traffic | None = None
    links: np.ndarray | None = None
    nbytes: np.ndarray | None = None
    label: str = ""
    devices: np.ndarray | None = None  # bool per device: the devices it involves (None: all)

    def involves(self, g: int) -> bool:
        return self.devices is None or bool(self.devices[g])


def _per_device(seconds, n_devices: int) -> np.ndarray:
    """``seconds`` as a read-only float vector over the devices (a view: never copied)."""
    if isinstance(seconds, np.ndarray) and seconds.shape == (n_devices,) and seconds.dtype == float:
        if not seconds.flags.writeable:  # read-only already (a reused block's): itself
            return seconds
        view = seconds.view()  # the common case, ~30x cheaper than broadcast_to
        view.flags.writeable = False
        return view
    return np.broadcast_to(np.asarray(seconds, dtype=float), (n_devices,))


@dataclass
class StepGraph:
    """The nodes of one step in graph (topological) order, and helpers that add them."""

    n_devices: int
    nodes: list[Node] = field(default_factory=list)
    chunks: dict[tuple[int, int], tuple[Traffic, Traffic]] = field(default_factory=dict)
    explicit_rings: bool = False  # sim.collective_steps: explicit
    steps: dict[int, tuple[Traffic, Traffic, Traffic]] = field(default_factory=dict)
    mask: np.ndarray | None = None  # devices of the nodes added next (a pipeline stage)
    streamed_stages: bool = False  # routing.per_node_stages: streamed
    merged: dict[tuple[int, ...], tuple[list[Traffic], Traffic]] = field(default_factory=dict)

    def _add(self, **kw) -> int:
        if kw.get("devices") is None:
            kw["devices"] = self.mask
        node = Node(id=len(self.nodes), **kw)
        self.nodes.append(node)
        return node.id

    def compute(
        self,
        phase: str,
        seconds: np.ndarray | None,
        layer: int,
        deps: tuple[int, ...] = (),
        stream: str = GPU,
        label: str = "",
        devices: np.ndarray | None = None,
    ) -> int:
        """A kernel of ``seconds[g]`` on every device's ``stream`` (``None``: a join)."""
        if seconds is not None:
            seconds = _per_device(seconds, self.n_devices)
        # what _add does, without its keyword dict (most nodes are kernels)
        nid, mask = len(self.nodes), self.mask if devices is None else devices
        node = Node(nid, COMPUTE, phase, layer, deps, stream, seconds=seconds, label=label)
        node.devices = mask
        self.nodes.append(node)
        return nid

    def collective(
        self,
        phase: str,
        traffic: Traffic,
        layer: int,
        deps: tuple[int, ...] = (),
        stream: str | None = GPU,
        wait: bool = True,
        devices: np.ndarray | None = None,
    ) -> int:
        """A collective's flows, issued by ``stream`` (or as soon as ``deps`` complete). With
        ``explicit_rings`` a ring collective becomes its steps, each issued when the
        previous one has arrived (its receive); the id returned is the last step's."""
        if self.explicit_rings and traffic.ring_steps > 1:
            return self._ring_steps(phase, traffic, layer, deps, stream, wait, devices)
        return self._add(
            kind=COLLECTIVE, phase=phase, layer=layer, deps=deps, stream=stream, wait=wait,
            traffic=traffic, devices=devices,
        )  # fmt: skip

    def _ring_steps(self, phase, traffic, layer, deps, stream, wait, devices) -> int:
        if id(traffic) not in self.steps:  # holds traffic: its id stays unique
            self.steps[id(traffic)] = (traffic, traffic.ring_step(), traffic.ring_step(False))
        _, first, step = self.steps[id(traffic)]
        last = self._add(
            kind=COLLECTIVE, phase=phase, layer=layer, deps=deps, stream=stream, wait=False,
            traffic=first, devices=devices,
        )  # fmt: skip
        for _ in range(1, traffic.ring_steps):
            last = self._add(
                kind=COLLECTIVE, phase=phase, layer=layer, deps=(last,), stream=None,
                traffic=step, devices=devices,
            )  # fmt: skip
        if stream is not None and wait:  # the stream waits for the last step
            self.compute(phase, None, layer, (last,), stream=stream, devices=devices)
        return last

    def transfer(
        self,
        phase: str,
        links: np.ndarray,
        nbytes: np.ndarray,
        layer: int,
        deps: tuple[int, ...] = (),
        stream: str | None = GPU,
    ) -> int:
        """``nbytes[g]`` over link ``links[g]`` for every device that has bytes to move."""
        links = np.where(np.asarray(nbytes) > 0, links, -1)
        return self._add(
            kind=TRANSFER, phase=phase, layer=layer, deps=deps, stream=stream, links=links,
            nbytes=np.asarray(nbytes, dtype=float),
        )  # fmt: skip

    def streams(self) -> dict[str, list[int]]:
        """Node ids per issuing stream, in graph order (``None``: issued by dependencies)."""
        out: dict[str, list[int]] = {}
        for node in self.nodes:
            out.setdefault(node.stream, []).append(node.id)
        return out

    def awaited(self) -> np.ndarray:
        """Whether some node on another stream (or issued by dependencies) depends on each
        node: an engine must then mark its completion at its own time."""
        flag = np.zeros(len(self.nodes), dtype=bool)
        for node in self.nodes:
            for d in node.deps:
                dep = self.nodes[d]
                if dep.kind != COMPUTE or dep.stream != node.stream or node.kind != COMPUTE:
                    flag[d] = True
        return flag

    def totals(self) -> dict[str, object]:
        """What the graph asks for, engine-independent: node count, bytes per collective
        node and compute seconds per device (a check that two engines walk one graph)."""
        n = self.n_devices
        seconds = np.zeros(n)
        flops_nodes = 0
        coll_bytes = []
        for node in self.nodes:
            if node.kind == COMPUTE and node.seconds is not None and node.stream == GPU:
                seconds += node.seconds
                flops_nodes += 1
            elif node.kind == COLLECTIVE:
                coll_bytes.append(node.traffic.total_bytes)
        return {
            "nodes": len(self.nodes),
            "compute_nodes": flops_nodes,
            "collective_bytes": np.asarray(coll_bytes),
            "gpu_seconds": seconds,
        }


def external_deps(graph: StepGraph) -> list[tuple[int, ...]]:
    """Per node, the dependencies that graph order on its own stream does not already
    satisfy: all but earlier compute nodes and blocking collectives of the same stream."""
    nodes = graph.nodes
    out = []
    for node in nodes:
        out.append(
            tuple(
                d
                for d in node.deps
                if not (
                    node.stream is not None
                    and nodes[d].stream == node.stream
                    and (nodes[d].kind == COMPUTE or nodes[d].wait)
                )
            )
        )
    return out


# -- builders -----------------------------------------------------------------------------


def build_graph(plan: WorkloadPlan, topology_tables: dict[str, np.ndarray] | None = None):
    """The step graph of ``plan``: forward (prefill, decode) or a training step.
    ``topology_tables`` gives the GPU-PIM links (``pim_up`` / ``pim_down`` per device) when
    the plan has PIM work."""
    graph = StepGraph(
        plan.n_devices,
        explicit_rings=plan.scenario.sim.collective_steps == "explicit",
        streamed_stages=plan.scenario.routing.per_node_stages == "streamed",
    )
    if plan.sub_plans:  # pim.sub_batches (moesim/plan/pim_placement.py)
        _interleaved(graph, plan.sub_plans, topology_tables)
    elif plan.pipeline is not None:
        _pipeline_step(graph, plan)
    elif plan.train is None:
        last: tuple[int, ...] = ()
        for lp in plan.layers:
            last = _inference_layer(graph, plan, lp, last, topology_tables)
        graph.compute("lm_head", plan.lm_head_s, len(plan.layers), deps=last)
        k = plan.scenario.workload.mtp.draft_tokens if plan.draft else 0
        for _ in range(k):  # the MTP module drafts k tokens, one pass each
            for lp in plan.draft:
                _inference_layer(graph, plan, lp, (), topology_tables)
            graph.compute("lm_head", plan.draft_lm_head_s, len(plan.layers))
    else:
        _training_step(graph, plan)
    return graph


def _pim(graph: StepGraph, lp: LayerPlan, deps: tuple[int, ...], tables, work=None):
    """The layer's PIM work (``work``, default ``lp.pim``): activations up the GPU-PIM link,
    the PIM kernels on the PIM stream, results down; returns the node that completes it."""
    work, i = work or lp.pim, lp.index
    active = (work.seconds > 0) | (work.in_bytes > 0)
    up = graph.transfer("pim", tables["pim_up"], np.where(active, work.in_bytes, 0.0), i, deps)
    run = graph.compute(
        "pim", np.where(active, work.seconds, 0.0), i, (up,), stream=PIM, label=work.phase
    )
    down = graph.transfer(
        "pim", tables["pim_down"], np.where(active, work.out_bytes, 0.0), i, (run,), stream=None
    )
    return (down,)


def _expert_fetch(graph: StepGraph, lp: LayerPlan, router: int, tables) -> tuple[int, ...]:
    """Memory tiers, ``execute: fetch``: the weights of the offloaded experts this layer needs
    come over the device's tier link once its router has chosen them, while the tokens are
    permuted and dispatched; the expert kernels wait for them (moesim/plan/tiers.py)."""
    work = lp.tiers
    if work is None or not np.any(work.fetch_bytes > 0):
        return ()
    return (graph.transfer("expert_fetch", tables["tier_fetch"], work.fetch_bytes, lp.index,
                           (router,), stream=None),)  # fmt: skip


def _inference_layer(
    graph: StepGraph, plan: WorkloadPlan, lp: LayerPlan, deps: tuple[int, ...], tables
) -> tuple[int, ...]:
    """attention -> [PIM attention] -> [tp collective] -> router [-> expert fetch] -> permute ->
    dispatch (shared experts while it travels) -> experts [beside PIM experts] -> combine ->
    unpermute -> [tp collective]; returns what the next layer waits for."""
    after = _attention_block(graph, lp, deps, tables)
    return _layer_rest(graph, lp, after, tables)


def _attention_block(
    graph: StepGraph, lp: LayerPlan, deps: tuple[int, ...], tables
) -> tuple[int, ...]:
    """The layer's attention on the GPU and, with attention on PIM, its core there; returns
    what the rest of the layer waits for."""
    graph.compute("attention", lp.compute_s["attention"], lp.index, deps)
    if lp.pim_attention is not None:  # pim.policy co_processing
        return _pim(graph, lp, (), tables, lp.pim_attention)
    if lp.pim is not None and lp.pim.phase == "attention":
        return _pim(graph, lp, (), tables)
    return ()


def _layer_rest(graph: StepGraph, lp: LayerPlan, after: tuple[int, ...], tables) -> tuple[int, ...]:
    """Everything of a layer after its attention (see :func:`_inference_layer`)."""
    i, cs = lp.index, lp.compute_s
    if lp.tp_comm is not None:
        graph.collective("tp_comm", lp.tp_comm, i, after)
        after = ()
    if lp.moe:
        router = graph.compute("router", cs["router"], i, after)
        fetched = _expert_fetch(graph, lp, router, tables)
        graph.compute("permute", cs["permute"], i)
        dispatch = _all_to_all(graph, "dispatch", lp.dispatch_stages, i, wait=False)
        if "shared_experts" in cs:
            _shared(graph, lp, "shared_experts", cs["shared_experts"])
        pim: tuple[int, ...] = ()
        if lp.pim is not None and lp.pim.phase == "experts":
            pim = _pim(graph, lp, (dispatch,), tables)  # PIM experts beside the GPU's
        graph.compute("experts", cs["experts"], i, (dispatch, *fetched))
        _all_to_all(graph, "combine", lp.combine_stages(), i, pim)
        graph.compute("unpermute", cs["unpermute"], i)
    else:
        graph.compute("dense_ffn", cs["dense_ffn"], i, after)
    if lp.tp_comm_after is not None:
        graph.collective("tp_comm", lp.tp_comm_after, i)
    return ()


def _interleaved(graph: StepGraph, plans: list[WorkloadPlan], tables) -> None:
    """Sub-batch interleaving (NeuPIMs, Heo et al., ASPLOS 2024): two sub-batches ``a`` and
    ``b``, each a chain ``attention(l) -> PIM attention(l) -> rest(l) -> attention(l + 1)``.
    The GPU stream takes them in turns, ``rest_a(l), attention_a(l + 1), rest_b(l),
    attention_b(l + 1)``, so while it runs one sub-batch's projections and FFN the PIM units
    run the other's attention. With GPU and PIM times equal the layer time halves against
    running the whole batch one phase after another."""
    n = len(plans[0].layers)
    after = [_attention_block(graph, p.layers[0], (), tables) for p in plans]
    for i in range(n):
        for s, p in enumerate(plans):
            _layer_rest(graph, p.layers[i], after[s], tables)
            if i + 1 < n:
                after[s] = _attention_block(graph, p.layers[i + 1], (), tables)
    for p in plans:
        graph.compute("lm_head", p.lm_head_s, n)


def _all_to_all(
    graph: StepGraph,
    phase: str,
    stages: list[Traffic],
    layer: int,
    deps: tuple[int, ...] = (),
    stream: str | None = GPU,
    wait: bool = True,
) -> int:
    """An all-to-all of one or more stages (``per_node``: over the network, then forwarded
    inside the node): the first issued by ``stream``, each next one by a device as soon as
    its part of the previous one has arrived; with ``wait`` the stream waits for the last.
    Returns the last stage's node. With ``streamed_stages`` the stages are one collective
    (:func:`~moesim.plan.types.streamed`)."""
    if len(stages) > 1 and graph.streamed_stages:
        key = tuple(id(t) for t in stages)
        if key not in graph.merged:  # holds the stages: their ids stay unique
            graph.merged[key] = (list(stages), streamed(stages))
        stages = [graph.merged[key][1]]
    if len(stages) == 1:
        return graph.collective(phase, stages[0], layer, deps, stream, wait)
    last = graph.collective(phase, stages[0], layer, deps, stream, wait=False)
    for traffic in stages[1:]:
        last = graph.collective(phase, traffic, layer, (last,), stream=None)
    if stream is not None and wait:
        graph.compute(phase, None, layer, (last,), stream=stream)
    return last


def _shared(graph: StepGraph, lp: LayerPlan, phase: str, seconds, backward: bool = False):
    """The shared experts, tensor parallel over the replica's tokens: their input gathered
    and their partial sums reduce-scattered over the tp group (the backward: the other way
    round), while the routed tokens travel."""
    i = lp.index
    first, last = (
        (lp.tp_shared_out, lp.tp_shared_in) if backward else (lp.tp_shared_in, lp.tp_shared_out)
    )
    if first is not None:
        graph.collective("tp_comm", first, i)
    graph.compute(phase, seconds, i)
    if last is not None:
        graph.collective("tp_comm", last, i)


def _moe_exchange(
    graph: StepGraph,
    plan: WorkloadPlan,
    lp: LayerPlan,
    first,
    work,
    second,
    side,
    backward: bool = False,
):
    """All-to-all ``first``, expert ``work``, all-to-all ``second``; ``side`` (shared experts)
    runs while the first one's tokens travel. With ``chunks`` > 1 the tokens go in chunks
    on a communication stream (first of every chunk, then second of every chunk, each after
    its chunk's experts) while the GPU runs each chunk's experts once its tokens are in:
    chunk c's experts overlap chunk c+1's transfer."""
    i = lp.index
    chunks = plan.train.chunks
    (p1, t1), (pw, sec), (p2, t2), (ps, side_s) = first, work, second, side
    if chunks == 1:
        arrived = _all_to_all(graph, p1, t1, i, wait=False)
        _shared(graph, lp, ps, side_s, backward)
        graph.compute(pw, sec, i, (arrived,))
        _all_to_all(graph, p2, t2, i)
        return
    t1 = [_chunk(graph, t, chunks) for t in t1]
    t2 = [_chunk(graph, t, chunks) for t in t2]
    got = [_all_to_all(graph, p1, t1, i, wait=False)]
    for _ in range(1, chunks):
        got.append(_all_to_all(graph, p1, t1, i, (got[-1],), stream=None))
    _shared(graph, lp, ps, side_s, backward)
    sent = got[-1]
    for c in range(chunks):
        done = graph.compute(pw, sec / chunks, i, (got[c],))
        sent = _all_to_all(graph, p2, t2, i, (done, sent), stream=None)
    graph.compute(p2, None, i, (sent,))  # the GPU waits for the last chunk's return


def _chunk(graph: StepGraph, traffic: Traffic, chunks: int) -> Traffic:
    """One chunk of ``traffic``, made once per traffic (every pass shares it, so engines
    route and load it once)."""
    key = (id(traffic), chunks)
    if key not in graph.chunks:
        graph.chunks[key] = (traffic, traffic.scaled(1.0 / chunks))  # holds traffic: id unique
    return graph.chunks[key][1]


def _training_forward(graph: StepGraph, plan: WorkloadPlan, lp: LayerPlan, recompute: bool):
    """One layer's forward in a training pass (``recompute``: its compute recorded as
    ``recompute``, its collectives as usual)."""
    i, cs = lp.index, lp.compute_s

    def phase(name: str) -> str:
        return "recompute" if recompute else name

    graph.compute(phase("attention"), cs["attention"], i)
    if lp.tp_comm is not None:
        graph.collective("tp_comm", lp.tp_comm, i)
    if lp.moe:
        graph.compute(phase("router"), cs["router"], i)
        graph.compute(phase("permute"), cs["permute"], i)
        shared = cs.get("shared_experts", 0.0)
        _moe_exchange(
            graph, plan, lp, ("dispatch", lp.dispatch_stages), (phase("experts"), cs["experts"]),
            ("combine", plan.train.combine[i]), (phase("shared_experts"), shared),
        )  # fmt: skip
        graph.compute(phase("unpermute"), cs["unpermute"], i)
    else:
        graph.compute(phase("dense_ffn"), cs["dense_ffn"], i)
    if lp.tp_comm_after is not None:
        graph.collective("tp_comm", lp.tp_comm_after, i)


def _training_backward(graph: StepGraph, plan: WorkloadPlan, lp: LayerPlan, cs: dict) -> int:
    """One layer's backward: the forward in reverse; the combine's gradient travels the
    dispatch's way (``combine_bwd``) and the dispatch's the combine's (``dispatch_bwd``).
    Returns its last node."""
    i = lp.index
    if lp.tp_comm_after is not None:
        graph.collective("tp_comm", lp.tp_comm_after, i)
    if lp.moe:
        graph.compute("unpermute_bwd", cs["unpermute_bwd"], i)
        shared = cs.get("shared_experts_bwd", 0.0)
        _moe_exchange(
            graph, plan, lp, ("combine_bwd", lp.dispatch_stages),
            ("experts_bwd", cs["experts_bwd"]),
            ("dispatch_bwd", plan.train.combine[i]), ("shared_experts_bwd", shared), True,
        )  # fmt: skip
        graph.compute("permute_bwd", cs["permute_bwd"], i)
        graph.compute("router_bwd", cs["router_bwd"], i)
    else:
        graph.compute("dense_ffn_bwd", cs["dense_ffn_bwd"], i)
    if lp.tp_comm is not None:
        graph.collective("tp_comm", lp.tp_comm, i)
    return graph.compute("attention_bwd", cs["attention_bwd"], i)


def _training_step(graph: StepGraph, plan: WorkloadPlan) -> None:
    """Micro-batches of forward then backward (layers reversed; full recomputation reruns a
    layer's forward first), then gradient reduction, optimizer, weight all-gather. With
    ``overlap_grad_reduce`` each layer's gradient bucket goes on a stream of its own after
    the last micro-batch's backward of that layer, one bucket after another."""
    tr = plan.train
    n_layers = len(plan.layers)
    bucket: int | None = None  # the gradient stream's last collective
    for mb in range(tr.micro_batches):
        for lp in plan.layers:
            _training_forward(graph, plan, lp, recompute=False)
        graph.compute("lm_head", plan.lm_head_s, n_layers)
        graph.compute("lm_head_bwd", tr.lm_head_bwd_s, n_layers)
        for lp, bl in zip(reversed(plan.layers), reversed(tr.backward), strict=True):
            if tr.full_recompute:
                _training_forward(graph, plan, lp, recompute=True)
            graph.compute("recompute", bl.recompute_s, lp.index)
            done = _training_backward(graph, plan, lp, bl.compute_s)
            if tr.layer_grad_reduce is not None and mb == tr.micro_batches - 1:
                for traffic in tr.layer_grad_reduce[lp.index]:
                    deps = (done,) if bucket is None else (done, bucket)
                    bucket = graph.collective("grad_reduce", traffic, n_layers, deps, None)
    if bucket is not None:
        graph.compute("grad_reduce", None, n_layers, (bucket,))
    for traffic in tr.grad_reduce:
        graph.collective("grad_reduce", traffic, n_layers)
    graph.compute("optimizer", tr.optimizer_s, n_layers)
    for traffic in tr.param_gather:
        graph.collective("param_gather", traffic, n_layers)


# -- pipelines and overlapped micro-batches ------------------------------------------------


@dataclass
class _Seg:
    """Part of a piece of work: kernels ``(phase, seconds, layer)``, then a collective
    ``(phase, stages, layer)`` the next part waits for (an all-to-all of one or more
    stages), and what runs while it travels (``after``: the shared experts beside the
    dispatch, ``(phase, seconds or a blocking tp collective, layer)``)."""

    computes: list[tuple[str, np.ndarray, int]]
    comm: tuple[str, list[Traffic], int] | None = None
    after: list[tuple[str, np.ndarray | Traffic, int]] = field(default_factory=list)


def _segments(parts: list[_Seg]) -> list[_Seg]:
    """Merge parts that end without a collective into the next one."""
    out: list[_Seg] = []
    for part in parts:
        if out and out[-1].comm is None and not out[-1].after:
            out[-1] = _Seg(out[-1].computes + part.computes, part.comm, part.after)
        else:
            out.append(part)
    return out


def _one(phase: str, traffic: Traffic | None, i: int) -> tuple[str, list[Traffic], int] | None:
    return (phase, [traffic], i) if traffic is not None else None


def _shared_parts(lp: LayerPlan, phase: str, seconds, backward: bool) -> list:
    """The shared experts beside the dispatch, with their tp collectives (see :func:`_shared`)."""
    first, last = (
        (lp.tp_shared_out, lp.tp_shared_in) if backward else (lp.tp_shared_in, lp.tp_shared_out)
    )
    out = [("tp_comm", first, lp.index)] if first is not None else []
    out.append((phase, seconds, lp.index))
    return out + ([("tp_comm", last, lp.index)] if last is not None else [])


def _forward_parts(lp: LayerPlan, combine: list[Traffic], recompute: bool = False) -> list[_Seg]:
    """One layer's forward as parts: attention [tp] | router, permute, dispatch (shared
    experts beside it) | experts, combine | unpermute [tp]; a dense FFN in place of the MoE."""
    i, cs = lp.index, lp.compute_s

    def k(name: str) -> tuple[str, np.ndarray, int]:
        return ("recompute" if recompute else name, cs[name], i)

    tp, tp_after = _one("tp_comm", lp.tp_comm, i), _one("tp_comm", lp.tp_comm_after, i)
    parts = [_Seg([k("attention")], tp)]
    if not lp.moe:
        return [*parts, _Seg([k("dense_ffn")], tp_after)]
    shared = []
    if "shared_experts" in cs:
        shared = _shared_parts(lp, *k("shared_experts")[:2], backward=False)
    return [
        *parts,
        _Seg([k("router"), k("permute")], ("dispatch", lp.dispatch_stages, i), shared),
        _Seg([k("experts")], ("combine", combine, i)),
        _Seg([k("unpermute")], tp_after),
    ]


def _backward_parts(
    plan: WorkloadPlan, lp: LayerPlan, bl, combine: list[Traffic], inputs_only: bool = False
) -> list[_Seg]:
    """One layer's backward as parts, the forward's in reverse (see
    :func:`_training_backward`); full recomputation reruns the forward first.
    ``inputs_only``: without the weight gradients (``bl.weight_s``, a later ``W`` item)."""
    i, cs, tr = lp.index, bl.compute_s, plan.train
    if inputs_only:
        cs = {k: v - bl.weight_s.get(k, 0.0) for k, v in cs.items()}
    parts = _forward_parts(lp, combine, recompute=True) if tr.full_recompute else []
    tp, tp_after = _one("tp_comm", lp.tp_comm, i), _one("tp_comm", lp.tp_comm_after, i)
    parts.append(_Seg([("recompute", bl.recompute_s, i)], tp_after))
    if lp.moe:
        shared = []
        if "shared_experts_bwd" in cs:
            shared = _shared_parts(lp, "shared_experts_bwd", cs["shared_experts_bwd"], True)
        parts += [
            _Seg(
                [("unpermute_bwd", cs["unpermute_bwd"], i)],
                ("combine_bwd", lp.dispatch_stages, i),
                shared,
            ),
            _Seg([("experts_bwd", cs["experts_bwd"], i)], ("dispatch_bwd", combine, i)),
            _Seg([("permute_bwd", cs["permute_bwd"], i), ("router_bwd", cs["router_bwd"], i)], tp),
        ]
    else:
        parts.append(_Seg([("dense_ffn_bwd", cs["dense_ffn_bwd"], i)], tp))
    return [*parts, _Seg([("attention_bwd", cs["attention_bwd"], i)])]


class _Work:
    """One item (forward or backward of a chunk for a micro-batch) being added to the graph:
    its parts in order, what its next part waits for."""

    def __init__(self, segs: list[_Seg], deps: tuple[int, ...]) -> None:
        self.segs, self.deps, self.next = segs, deps, 0
        self.last: int | None = None

    def emit(self, graph: StepGraph, slow: float, chain: list[int] | None) -> None:
        """Add the next part. ``chain`` (overlapped items): the collective goes on the
        communication stream after the chain's previous one, so that the stream runs other
        items' kernels meanwhile; ``None``: issued by the GPU stream, waited for next."""
        seg = self.segs[self.next]
        self.next += 1
        deps = self.deps
        for phase, seconds, layer in seg.computes:
            self.last = graph.compute(phase, seconds * slow, layer, deps)
            deps = ()
        if seg.comm is not None:
            phase, stages, layer = seg.comm
            if chain is None:
                comm = _all_to_all(graph, phase, stages, layer, wait=False)
            else:
                for traffic in stages:  # every stage on the communication stream, in turn
                    prev = (chain[-1],) if chain else ()
                    chain.append(graph.collective(phase, traffic, layer, (self.last, *prev), None))
                comm = chain[-1]
            deps = (comm,)
        for phase, work, layer in seg.after:
            if isinstance(work, Traffic):  # a blocking tp collective of the shared experts
                graph.collective(phase, work, layer)
            else:
                graph.compute(phase, work * slow, layer)
        self.deps = deps

    def finish(self, graph: StepGraph, layer: int) -> int:
        """The node that completes the item (a join when its last part ends in a
        collective)."""
        if self.deps:
            self.last = graph.compute(self.segs[-1].computes[0][0], None, layer, self.deps)
        return self.last


def _item_segments(plan: WorkloadPlan, item: Item, stage: int, end: bool) -> list[_Seg]:
    """The parts of ``item`` on ``stage``; ``end``: the micro-batch's last chunk, where the
    forward ends with the LM head (and the drafts) and the backward starts after it."""
    kind, _, chunk = item
    pipe = plan.pipeline
    layers, n = pipe.layers[stage], plan.scenario.model.n_layers
    combine = pipe.combine[stage] if pipe.combine else {}
    parts: list[_Seg] = []
    if kind in ("B", "I"):
        for i in reversed(pipe.chunks[stage][chunk]):
            bl = pipe.backward[stage][i]
            parts += _backward_parts(plan, layers[i], bl, combine[i], inputs_only=kind == "I")
        return _segments(parts)
    if kind == "W":  # the weight gradients an earlier I left, layer by layer (no collective)
        computes = [
            (phase, seconds, i)
            for i in reversed(pipe.chunks[stage][chunk])
            for phase, seconds in pipe.backward[stage][i].weight_s.items()
        ]
        return [_Seg(computes)]
    for i in pipe.chunks[stage][chunk]:
        lp = layers[i]
        parts += _forward_parts(lp, combine.get(i) or lp.combine_stages())
    if end:
        parts.append(_Seg([("lm_head", plan.lm_head_s, n)]))
        if plan.train is not None:
            parts.append(_Seg([("lm_head_bwd", plan.train.lm_head_bwd_s, n)]))
        mtp = plan.scenario.workload.mtp
        for _ in range(mtp.draft_tokens if mtp is not None and plan.draft else 0):
            for lp in plan.draft:
                parts += _forward_parts(lp, lp.combine_stages())
            parts.append(_Seg([("lm_head", plan.draft_lm_head_s, n)]))
    return _segments(parts)


def _pipeline_step(graph: StepGraph, plan: WorkloadPlan) -> None:
    """Pipeline stages and micro-batches: each stage runs its schedule's order of items
    (:mod:`moesim.plan.pipeline`) on its devices; a forward waits for the activations sent
    by the previous chunk of its micro-batch's route, a backward for the gradients of the
    next; overlapped items (two-batch overlap, DualPipe pairs) take turns on the GPU part by
    part while their collectives go one after another on a communication stream, the
    kernels slowed by the SMs the communication holds. Then each stage reduces its
    gradients, steps its optimizer and gathers its weights. Graph order interleaves the
    stages so that every item comes after the items it waits for."""
    pipe, sc = plan.pipeline, plan.scenario
    pp, m = pipe.pp, pipe.micro_batches
    n_chunks = len(pipe.chunks[0])
    orders = schedule_order(pipe.schedule, pp, m, n_chunks)
    if pipe.overlap:  # every micro-batch of a stage in one overlapped step
        orders = [[tuple(item for step in order for item in step)] for order in orders]
    routes = [route(pipe.schedule, pp, n_chunks, mb, m) for mb in range(m)]
    sms, comm_sms = sc.cluster.device.sm_count, sc.parallelism.comm_sms
    slow = sms / (sms - comm_sms) if sms else 1.0
    sent: dict[tuple[str, int, int], int] = {}  # (kind, micro-batch, hop) -> send node
    n_layers = sc.model.n_layers
    pos = [0] * pp
    while any(pos[s] < len(orders[s]) for s in range(pp)):
        progressed = False
        for s in range(pp):
            while pos[s] < len(orders[s]):
                step = orders[s][pos[s]]
                needs = [_needs(item, routes[item[1]], s) for item in step]
                if any(k is not None and k not in sent for k in needs):
                    break
                graph.mask = pipe.masks[s]
                works = []
                for item, k in zip(step, needs, strict=True):
                    hop = routes[item[1]].index((s, item[2]))
                    end = hop == len(routes[item[1]]) - 1
                    segs = _item_segments(plan, item, s, end)
                    works.append(_Work(segs, (sent[k],) if k is not None else ()))
                chain: list[int] | None = [] if len(works) > 1 else None
                while any(w.next < len(w.segs) for w in works):
                    for w in works:
                        if w.next < len(w.segs):
                            w.emit(graph, slow if chain is not None else 1.0, chain)
                for item, w in zip(step, works, strict=True):
                    done = w.finish(graph, n_layers)
                    _send(graph, pipe, routes[item[1]], item, s, done, sent)
                pos[s] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"pipeline schedule {pipe.schedule} deadlocks")
    for s in range(pp):
        graph.mask = pipe.masks[s]
        for traffic in pipe.grad_reduce[s] if pipe.grad_reduce else ():
            graph.collective("grad_reduce", traffic, n_layers)
        if pipe.optimizer_s:
            graph.compute("optimizer", pipe.optimizer_s[s], n_layers)
        for traffic in pipe.param_gather[s] if pipe.param_gather else ():
            graph.collective("param_gather", traffic, n_layers)
    graph.mask = None


def _needs(item: Item, hops: list[tuple[int, int]], stage: int) -> tuple[str, int, int] | None:
    """The send an item waits for: a forward the previous hop's, a backward the next's
    (a weight-gradient item only its own input-gradient item, earlier on the stage)."""
    kind, mb, chunk = item
    hop = hops.index((stage, chunk))
    if kind == "W":
        return None
    if kind == "F":
        return ("F", mb, hop - 1) if hop > 0 else None
    return ("B", mb, hop + 1) if hop < len(hops) - 1 else None


def _send(graph, pipe, hops, item: Item, stage: int, done: int, sent: dict) -> None:
    """After an item, its micro-batch's activations (forward) or gradients (backward) go
    to the stage of the next (previous) hop, when that is another stage."""
    kind, mb, chunk = item
    if kind == "W":  # weight gradients stay on the stage
        return
    kind = "B" if kind == "I" else kind  # the input gradients are what a backward sends
    hop = hops.index((stage, chunk))
    to = hop + 1 if kind == "F" else hop - 1
    if not 0 <= to < len(hops):
        return
    dest = hops[to][0]
    key = (kind, mb, hop)
    if dest == stage:  # the next chunk is on this stage: nothing to send
        sent[key] = done
        return
    graph.mask = pipe.masks[stage] | pipe.masks[dest]
    sent[key] = graph.collective("pipeline", pipe.send[(stage, dest)], 0, (done,), None)
    graph.mask = pipe.masks[stage]
