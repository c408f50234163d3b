"""Discrete-event engine: orders the workload plan in time with simpy.

One process per device walks the layers: attention -> [tp collective] -> router -> permute ->
dispatch (send, then shared experts, then wait for its inbound tokens) -> experts -> combine
(send, wait) -> unpermute -> [tp collective]. A single :class:`~moesim.network.FluidNetwork`
process carries every flow.
Events are per (layer, device kernel) and per flow batch, never per token. Metrics are
collected around the processes (:class:`Recorder`), not inside the network or device models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import simpy
from tqdm import tqdm

from moesim.network import FluidNetwork, Topology, build_topology
from moesim.network.aggregate import FlowPattern, PatternCache
from moesim.network.fluid import LinkStats
from moesim.plan.collectives import scaled
from moesim.plan.types import LayerPlan, Traffic, WorkloadPlan

COMPUTE_PHASES = (
    "attention",
    "router",
    "permute",
    "shared_experts",
    "experts",
    "unpermute",
    "dense_ffn",
    "lm_head",
)
COMM_PHASES = ("tp_comm", "dispatch", "combine", "pim")  # pim: waiting for PIM units
# training (moesim/training.py): the backward of each forward phase, recomputation, optimizer
TRAIN_COMPUTE_PHASES = (*(f"{p}_bwd" for p in COMPUTE_PHASES), "recompute", "optimizer")
TRAIN_COMM_PHASES = ("combine_bwd", "dispatch_bwd", "grad_reduce", "param_gather")
COMPUTE_PHASES = (*COMPUTE_PHASES, *TRAIN_COMPUTE_PHASES)
COMM_PHASES = (*COMM_PHASES, *TRAIN_COMM_PHASES)


class CountingEnvironment(simpy.Environment):
    """A simpy environment that counts processed events (monitoring by wrapping ``step``)."""

    def __init__(self) -> None:
        super().__init__()
        self.events_processed = 0

    def step(self) -> None:
        self.events_processed += 1
        super().step()


@dataclass
class Recorder:
    """Per-device time per phase (waits included) and the slices of the device timelines."""

    n_devices: int
    keep_slices: bool
    phase_s: dict[str, np.ndarray] = field(default_factory=dict)
    finish_s: np.ndarray | None = None
    slices: list[tuple[int, str, float, float, int]] = field(default_factory=list)
    pim_slices: list[tuple[int, str, float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phase_s = {p: np.zeros(self.n_devices) for p in COMPUTE_PHASES + COMM_PHASES}
        self.finish_s = np.zeros(self.n_devices)

    def add(self, g: int, phase: str, start: float, end: float, layer: int) -> None:
        self.phase_s[phase][g] += end - start
        if self.keep_slices and end > start:
            self.slices.append((g, phase, start, end, layer))


@dataclass
class _Prepared:
    """A collective mapped onto flows: its pattern, network block, bytes and max-min weight
    per contribution."""

    pattern: FlowPattern
    block: int
    nbytes: np.ndarray
    weight: np.ndarray  # max-min weight per contribution: its pairs that carry bytes
    events: list[simpy.Event]
    senders_left: int


class Engine:
    """Runs one step of a :class:`WorkloadPlan` on its topology."""

    def __init__(
        self, plan: WorkloadPlan, topology: Topology | None = None, progress: bool | None = None
    ) -> None:
        sc = plan.scenario
        self.plan = plan
        self.topology = topology or build_topology(sc.cluster, sc.topology, sc.pim)
        self.env = CountingEnvironment()
        self.net = FluidNetwork(
            self.env, self.topology, sc.sim.network_tolerance, record_intervals=sc.sim.trace
        )
        self.patterns = PatternCache(self.topology, sc.sim.aggregate)
        self.rec = Recorder(plan.n_devices, sc.sim.trace)
        self._prepared: dict[tuple[int, str], _Prepared] = {}
        show = sc.sim.progress if progress is None else progress
        self._bar = tqdm(
            total=plan.n_devices * len(plan.layers),
            delay=2.0,
            disable=not show,
            unit="device-layer",
            desc=sc.name,
            leave=False,
        )
        self.wall_s = 0.0

    fidelity = "des"

    @property
    def link_stats(self) -> LinkStats:
        return self.net.stats

    @property
    def counters(self) -> dict[str, int]:
        return {"events": self.env.events_processed, "network_solves": self.net.solves}

    def run(self) -> Engine:
        start = time.perf_counter()
        for g in range(self.plan.n_devices):
            self.env.process(self._device(g))
        self.env.run()
        self._bar.close()
        self.wall_s = time.perf_counter() - start
        self.net.close_intervals()
        return self

    # -- device process --------------------------------------------------------------------
    def _compute(self, g: int, phase: str, seconds: float, layer: int):
        start = self.env.now
        if seconds > 0:
            yield self.env.timeout(seconds)
        self.rec.add(g, phase, start, self.env.now, layer)

    def _computes(self, g: int, kernels: list[tuple[str, float, int]]):
        """Back-to-back kernels ``(phase, seconds, layer)`` as one timeout (one event), each
        recorded as its own slice; empties ``kernels``. Exact: nothing else touches a device
        between two of its kernels, so only sends and waits need the clock."""
        if not kernels:
            return
        t = self.env.now
        total = sum(k[1] for k in kernels)
        if total > 0:
            yield self.env.timeout(total)
        for phase, seconds, layer in kernels:
            self.rec.add(g, phase, t, min(t + seconds, self.env.now), layer)
            t += seconds
        kernels.clear()

    def _device(self, g: int):
        """One device's forward step. Its kernels queue in ``run`` until the device next
        sends or waits (a collective, PIM work), then take one timeout together."""
        env = self.env
        if self.plan.train is not None:
            yield from self._train_device(g)
            return
        run: list[tuple[str, float, int]] = []
        for lp in self.plan.layers:
            i, cs = lp.index, lp.compute_s
            run.append(("attention", cs["attention"][g], i))
            if lp.pim is not None and lp.pim.phase == "attention":
                yield from self._computes(g, run)
                yield from self._pim_wait(g, lp, self._pim_start(g, lp, "attention"))
            if lp.tp_comm is not None:
                yield from self._computes(g, run)
                yield from self._exchange(g, lp, "tp_comm", lp.tp_comm)
            if lp.moe:
                run += [("router", cs["router"][g], i), ("permute", cs["permute"][g], i)]
                yield from self._computes(g, run)
                arrived = self._send(g, lp, "dispatch", lp.dispatch)
                if "shared_experts" in cs:
                    yield from self._compute(g, "shared_experts", cs["shared_experts"][g], i)
                start = env.now
                yield arrived
                self.rec.add(g, "dispatch", start, env.now, i)
                pim = self._pim_start(g, lp, "experts")  # PIM experts beside the GPU's
                yield from self._compute(g, "experts", cs["experts"][g], i)
                yield from self._pim_wait(g, lp, pim)
                yield from self._exchange(g, lp, "combine", lp.combine)
                run.append(("unpermute", cs["unpermute"][g], i))
            else:
                run.append(("dense_ffn", cs["dense_ffn"][g], i))
            if lp.tp_comm_after is not None:
                yield from self._computes(g, run)
                yield from self._exchange(g, lp, "tp_comm_after", lp.tp_comm_after)
            self._bar.update()
        run.append(("lm_head", self.plan.lm_head_s[g], len(self.plan.layers)))
        yield from self._computes(g, run)
        self.rec.finish_s[g] = env.now

    # -- training step (workload.phase: train; moesim/training.py) ---------------------------
    def _train_device(self, g: int):
        """Micro-batches of forward then backward (layers reversed; full recomputation reruns
        a layer's forward first), then gradient reduction, optimizer, weight all-gather.
        Collective keys carry the pass, so passes of the same layer never share flows."""
        plan, tr = self.plan, self.plan.train
        n_layers = len(plan.layers)
        step = LayerPlan(n_layers, "none", False, {}, {})  # step-level collectives
        buckets = None  # overlap_grad_reduce: the gradient stream's last bucket
        for mb in range(tr.micro_batches):
            for lp in plan.layers:
                yield from self._forward_layer(g, lp, f"f{mb}", recompute=False)
            yield from self._compute(g, "lm_head", plan.lm_head_s[g], n_layers)
            yield from self._compute(g, "lm_head_bwd", tr.lm_head_bwd_s[g], n_layers)
            for lp, bl in zip(reversed(plan.layers), reversed(tr.backward), strict=True):
                if tr.full_recompute:
                    yield from self._forward_layer(g, lp, f"r{mb}", recompute=True)
                yield from self._compute(g, "recompute", bl.recompute_s[g], lp.index)
                yield from self._backward_layer(g, lp, bl.compute_s, f"b{mb}")
                if tr.layer_grad_reduce is not None and mb == tr.micro_batches - 1:
                    grads = tr.layer_grad_reduce[lp.index]
                    buckets = self.env.process(self._grad_bucket(g, step, lp.index, buckets, grads))
        if buckets is not None:
            start = self.env.now
            yield buckets
            self.rec.add(g, "grad_reduce", start, self.env.now, n_layers)
        for k, traffic in enumerate(tr.grad_reduce):
            yield from self._collective(g, step, f"grad{k}", "grad_reduce", traffic)
        yield from self._compute(g, "optimizer", tr.optimizer_s[g], n_layers)
        for k, traffic in enumerate(tr.param_gather):
            yield from self._collective(g, step, f"gather{k}", "param_gather", traffic)
        self.rec.finish_s[g] = self.env.now

    def _grad_bucket(self, g: int, step: LayerPlan, layer: int, previous, bucket: list[Traffic]):
        """One layer's gradient collectives on the gradient stream, after the previous bucket."""
        if previous is not None:
            yield previous
        for k, traffic in enumerate(bucket):
            yield self._send(g, step, f"grad/{layer}/{k}", traffic)

    def _collective(self, g: int, lp: LayerPlan, key: str, phase: str, traffic: Traffic):
        """Send, wait for this device's inbound bytes, record the wait as ``phase``."""
        arrived = self._send(g, lp, key, traffic)
        start = self.env.now
        yield arrived
        self.rec.add(g, phase, start, self.env.now, lp.index)

    def _forward_layer(self, g: int, lp: LayerPlan, tag: str, recompute: bool):
        """One layer's forward in a training pass (``recompute``: its compute recorded as
        ``recompute``, its collectives as usual)."""
        i, cs = lp.index, lp.compute_s

        def phase(name: str) -> str:
            return "recompute" if recompute else name

        yield from self._compute(g, phase("attention"), cs["attention"][g], i)
        if lp.tp_comm is not None:
            yield from self._collective(g, lp, f"tp/{tag}", "tp_comm", lp.tp_comm)
        if lp.moe:
            yield from self._compute(g, phase("router"), cs["router"][g], i)
            yield from self._compute(g, phase("permute"), cs["permute"][g], i)
            shared = cs["shared_experts"][g] if "shared_experts" in cs else 0.0
            yield from self._moe_exchange(
                g, lp, tag, ("dispatch", lp.dispatch), (phase("experts"), cs["experts"][g]),
                ("combine", self.plan.train.combine[i]), (phase("shared_experts"), shared),
            )  # fmt: skip
            yield from self._compute(g, phase("unpermute"), cs["unpermute"][g], i)
        else:
            yield from self._compute(g, phase("dense_ffn"), cs["dense_ffn"][g], i)
        if lp.tp_comm_after is not None:
            yield from self._collective(g, lp, f"tpa/{tag}", "tp_comm", lp.tp_comm_after)

    def _backward_layer(self, g: int, lp: LayerPlan, cs: dict, tag: str):
        """One layer's backward: the forward in reverse; the combine's gradient travels the
        dispatch's way (``combine_bwd``) and the dispatch's the combine's (``dispatch_bwd``)."""
        i = lp.index
        if lp.tp_comm_after is not None:
            yield from self._collective(g, lp, f"tpa/{tag}", "tp_comm", lp.tp_comm_after)
        if lp.moe:
            yield from self._compute(g, "unpermute_bwd", cs["unpermute_bwd"][g], i)
            shared = cs["shared_experts_bwd"][g] if "shared_experts_bwd" in cs else 0.0
            yield from self._moe_exchange(
                g, lp, tag, ("combine_bwd", lp.dispatch), ("experts_bwd", cs["experts_bwd"][g]),
                ("dispatch_bwd", self.plan.train.combine[i]), ("shared_experts_bwd", shared),
            )  # fmt: skip
            yield from self._compute(g, "permute_bwd", cs["permute_bwd"][g], i)
            yield from self._compute(g, "router_bwd", cs["router_bwd"][g], i)
        else:
            yield from self._compute(g, "dense_ffn_bwd", cs["dense_ffn_bwd"][g], i)
        if lp.tp_comm is not None:
            yield from self._collective(g, lp, f"tp/{tag}", "tp_comm", lp.tp_comm)
        yield from self._compute(g, "attention_bwd", cs["attention_bwd"][g], i)

    def _moe_exchange(self, g: int, lp: LayerPlan, tag: str, first, work, second, side):
        """All-to-all ``first``, expert ``work``, all-to-all ``second``; ``side`` (shared
        experts) runs while the first one's tokens travel. With ``chunks`` > 1 the tokens go
        in chunks on a communication stream (first of every chunk, then second of every
        chunk, each after its chunk's experts) while the compute stream runs each chunk's
        experts once its tokens are in: chunk c's experts overlap chunk c+1's transfer."""
        env, i = self.env, lp.index
        chunks = self.plan.train.chunks
        (p1, t1), (pw, sec), (p2, t2), (ps, side_s) = first, work, second, side
        if chunks > 1:
            t1, t2 = scaled(t1, 1.0 / chunks), scaled(t2, 1.0 / chunks)
        got = [env.event() for _ in range(chunks)]
        done = [env.event() for _ in range(chunks)]

        def comm():
            for c in range(chunks):
                yield self._send(g, lp, f"{p1}/{tag}/{c}", t1)
                got[c].succeed()
            for c in range(chunks):
                yield done[c]
                yield self._send(g, lp, f"{p2}/{tag}/{c}", t2)

        stream = env.process(comm())
        yield from self._compute(g, ps, side_s, i)
        for c in range(chunks):
            start = env.now
            yield got[c]
            self.rec.add(g, p1, start, env.now, i)
            yield from self._compute(g, pw, sec / chunks, i)
            done[c].succeed()
        start = env.now
        yield stream
        self.rec.add(g, p2, start, env.now, i)

    # -- processing in memory (moesim/pim.py) -----------------------------------------------
    def _pim_start(self, g: int, lp: LayerPlan, phase: str) -> simpy.Process | None:
        """Start device g's PIM work of ``phase`` in this layer, if any: activations in over
        its PIM link, the PIM kernels, results back (flows on the topology)."""
        work = lp.pim
        if work is None or work.phase != phase or not (work.seconds[g] or work.in_bytes[g]):
            return None
        return self.env.process(self._pim_run(g, work, lp.index))

    def _pim_run(self, g: int, work, layer: int):
        tables = self.topology.tables
        yield self._pim_flow(int(tables["pim_up"][g]), float(work.in_bytes[g]))
        if work.seconds[g] > 0:
            start = self.env.now
            yield self.env.timeout(float(work.seconds[g]))
            if self.rec.keep_slices:  # the PIM units' own track (trace.json)
                self.rec.pim_slices.append((g, work.phase, start, self.env.now, layer))
        yield self._pim_flow(int(tables["pim_down"][g]), float(work.out_bytes[g]))

    def _pim_flow(self, link: int, nbytes: float) -> simpy.Event:
        gid, event = self.net.group(1 if nbytes > 0 else 0)
        if nbytes > 0:  # one flow on one link (as FluidNetwork.send, with the path given)
            path = np.array([[link]], dtype=np.int64)
            one = np.ones(1, np.int64)
            block = self.net.add_block(
                path, self.topology.latency_s[[link]], np.arange(2), np.array([gid]), one
            )
            self.net.contribute(block, np.arange(1), np.array([nbytes]), np.ones(1))
        return event

    def _pim_wait(self, g: int, lp: LayerPlan, proc: simpy.Process | None):
        """The GPU waits (phase ``pim``) for its PIM work to finish."""
        if proc is None:
            return
        start = self.env.now
        yield proc
        self.rec.add(g, "pim", start, self.env.now, lp.index)

    def _exchange(self, g: int, lp: LayerPlan, key: str, traffic: Traffic):
        """Send this device's part of a collective, then wait for what it receives."""
        arrived = self._send(g, lp, key, traffic)
        start = self.env.now
        yield arrived
        phase = "tp_comm" if key.startswith("tp_comm") else key
        self.rec.add(g, phase, start, self.env.now, lp.index)

    def _send(self, g: int, lp: LayerPlan, key: str, traffic: Traffic) -> simpy.Event:
        prep = self._prepare(lp, key, traffic)
        pat = prep.pattern
        lo, hi = pat.contrib_offsets[g], pat.contrib_offsets[g + 1]
        if hi > lo:
            self.net.contribute(
                prep.block, pat.contrib_slot[lo:hi], prep.nbytes[lo:hi], prep.weight[lo:hi]
            )
        event = prep.events[g]
        prep.senders_left -= 1
        if prep.senders_left == 0:
            del self._prepared[(lp.index, key)]
        return event

    def _prepare(self, lp: LayerPlan, key: str, traffic: Traffic) -> _Prepared:
        """Map a collective onto flows once, on first use (routing cached across layers), and
        register one group per receiver, fed by every flow that carries bytes to it."""
        slot = (lp.index, key)
        if slot in self._prepared:
            return self._prepared[slot]
        n = self.plan.n_devices
        pat = self.patterns.get(traffic.src, traffic.dst)
        inbound = np.bincount(pat.receivers, minlength=n)
        gids, events = np.empty(n, dtype=np.int64), []
        for d in range(n):
            gids[d], ev = self.net.group(int(inbound[d]))
            events.append(ev)
        # the collective takes at least its busiest link's bytes over that link's bandwidth
        link_bytes = pat.link_bytes(traffic.nbytes, self.topology.n_links)
        floor_s = float(np.max(link_bytes / self.net.capacity))
        block = self.net.add_block(
            pat.paths,
            pat.latency_s * traffic.latency_steps,
            pat.receiver_ptr,
            gids[pat.receivers],
            pat.contributors,
            floor_s,
            link_bytes,
        )
        prep = _Prepared(
            pattern=pat,
            block=block,
            nbytes=pat.contribution_bytes(traffic.nbytes),
            weight=pat.contribution_weights(traffic.nbytes),
            events=events,
            senders_left=n,
        )
        self._prepared[slot] = prep
        return prep
