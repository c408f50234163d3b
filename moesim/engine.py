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
from moesim.network.fluid import LinkStats
from moesim.workload import LayerPlan, Traffic, WorkloadPlan

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

    def __post_init__(self) -> None:
        self.phase_s = {p: np.zeros(self.n_devices) for p in COMPUTE_PHASES + COMM_PHASES}
        self.finish_s = np.zeros(self.n_devices)

    def add(self, g: int, phase: str, start: float, end: float, layer: int) -> None:
        self.phase_s[phase][g] += end - start
        if self.keep_slices and end > start:
            self.slices.append((g, phase, start, end, layer))


@dataclass
class _Prepared:
    """A collective's flows routed once, sorted by source, with the group of each flow."""

    paths: np.ndarray
    latency_s: np.ndarray
    nbytes: np.ndarray
    gid: np.ndarray
    offsets: np.ndarray
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

    def _device(self, g: int):
        env = self.env
        for lp in self.plan.layers:
            i = lp.index
            yield from self._compute(g, "attention", lp.compute_s["attention"][g], i)
            yield from self._pim_wait(g, lp, self._pim_start(g, lp, "attention"))
            if lp.tp_comm is not None:
                yield from self._exchange(g, lp, "tp_comm", lp.tp_comm)
            if lp.moe:
                yield from self._compute(g, "router", lp.compute_s["router"][g], i)
                yield from self._compute(g, "permute", lp.compute_s["permute"][g], i)
                arrived = self._send(g, lp, "dispatch", lp.dispatch)
                if "shared_experts" in lp.compute_s:
                    yield from self._compute(
                        g, "shared_experts", lp.compute_s["shared_experts"][g], i
                    )
                start = env.now
                yield arrived
                self.rec.add(g, "dispatch", start, env.now, i)
                pim = self._pim_start(g, lp, "experts")  # PIM experts beside the GPU's
                yield from self._compute(g, "experts", lp.compute_s["experts"][g], i)
                yield from self._pim_wait(g, lp, pim)
                yield from self._exchange(g, lp, "combine", lp.combine)
                yield from self._compute(g, "unpermute", lp.compute_s["unpermute"][g], i)
            else:
                yield from self._compute(g, "dense_ffn", lp.compute_s["dense_ffn"][g], i)
            if lp.tp_comm_after is not None:
                yield from self._exchange(g, lp, "tp_comm_after", lp.tp_comm_after)
            self._bar.update()
        yield from self._compute(g, "lm_head", self.plan.lm_head_s[g], len(self.plan.layers))
        self.rec.finish_s[g] = env.now

    # -- processing in memory (moesim/pim.py) -----------------------------------------------
    def _pim_start(self, g: int, lp: LayerPlan, phase: str) -> simpy.Process | None:
        """Start device g's PIM work of ``phase`` in this layer, if any: activations in over
        its PIM link, the PIM kernels, results back (flows on the topology)."""
        work = lp.pim
        if work is None or work.phase != phase or not (work.seconds[g] or work.in_bytes[g]):
            return None
        return self.env.process(self._pim_run(g, work))

    def _pim_run(self, g: int, work):
        tables = self.topology.tables
        yield self._pim_flow(int(tables["pim_up"][g]), float(work.in_bytes[g]))
        if work.seconds[g] > 0:
            yield self.env.timeout(float(work.seconds[g]))
        yield self._pim_flow(int(tables["pim_down"][g]), float(work.out_bytes[g]))

    def _pim_flow(self, link: int, nbytes: float) -> simpy.Event:
        gid, event = self.net.group(1 if nbytes > 0 else 0)
        if nbytes > 0:  # one flow on one link
            path = np.array([[link]], dtype=np.int64)
            self.net.send_routed(
                path, np.array([nbytes]), self.topology.latency_s[[link]], np.array([gid])
            )
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
        lo, hi = prep.offsets[g], prep.offsets[g + 1]
        if hi > lo:
            self.net.send_routed(
                prep.paths[lo:hi], prep.nbytes[lo:hi], prep.latency_s[lo:hi], prep.gid[lo:hi]
            )
        event = prep.events[g]
        prep.senders_left -= 1
        if prep.senders_left == 0:
            del self._prepared[(lp.index, key)]
        return event

    def _prepare(self, lp: LayerPlan, key: str, traffic: Traffic) -> _Prepared:
        """Route a collective's flows once, on first use, and register one group per receiver."""
        slot = (lp.index, key)
        if slot in self._prepared:
            return self._prepared[slot]
        n = self.plan.n_devices
        order = np.argsort(traffic.src, kind="stable")
        src, dst = traffic.src[order], traffic.dst[order]
        paths = self.topology.routes(src, dst)
        latency = self.topology.path_latency_s(paths) * traffic.latency_steps
        inbound = np.bincount(dst, minlength=n)
        gids, events = np.empty(n, dtype=np.int64), []
        for d in range(n):
            gids[d], ev = self.net.group(int(inbound[d]))
            events.append(ev)
        prep = _Prepared(
            paths=paths,
            latency_s=latency,
            nbytes=traffic.nbytes[order],
            gid=gids[dst],
            offsets=np.searchsorted(src, np.arange(n + 1)),
            events=events,
            senders_left=n,
        )
        self._prepared[slot] = prep
        return prep
