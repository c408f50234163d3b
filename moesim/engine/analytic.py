"""Analytic fidelity: the same step graph in closed form, with no event loop.

Every node of :mod:`moesim.plan.graph` is evaluated for all devices at once (numpy vectors of
per-device times), with the discrete-event engine's semantics: a node starts on a device
when its stream is free and its dependencies are done there; a compute node takes its
kernel time; a collective finishes on each member at the latest member's start in its group
plus the collective's bottleneck time (``max over links of bytes_on_link / bandwidth + max
path latency``, the alpha-beta bound a perfectly scheduled collective reaches); a transfer
takes its bytes over its one link plus latency. It differs from the discrete-event engine
where flows of different collectives share a link at the same time (there they share it
max-min fairly; here each collective has every link to itself) and inside a collective
whose flows finish at different times. Use it to screen many configurations, then confirm
with ``sim.fidelity: des``.
"""

from __future__ import annotations

import time

import numpy as np

from moesim.engine.inputs import step_inputs
from moesim.engine.recorder import Recorder
from moesim.network import Topology
from moesim.network.fluid import LinkStats, link_loads
from moesim.plan.graph import (
    COLLECTIVE,
    COMPUTE,
    GPU,
    Node,
    StepGraph,
    external_deps,
)
from moesim.plan.types import Traffic, WorkloadPlan


def _full(values: np.ndarray, idx: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` of the devices ``idx`` spread over all devices (0 elsewhere)."""
    out = np.zeros(len(mask))
    out[idx] = values
    return out


class AnalyticEngine:
    """Closed-form counterpart of :class:`moesim.engine.des.Engine` (same attributes for
    results)."""

    fidelity = "analytic"

    def __init__(
        self,
        plan: WorkloadPlan,
        topology: Topology | None = None,
        graph: StepGraph | None = None,
        **_: object,
    ) -> None:
        sc = plan.scenario
        self.plan = plan
        self.topology, self.graph = step_inputs(plan, topology, graph)
        self._recent_hops: list[tuple[np.ndarray, np.ndarray, tuple]] = []
        self.rec = Recorder(plan.n_devices, sc.sim.trace)
        self._comm = plan.train is None  # collectives in flight (inference summaries)
        n_links = self.topology.n_links
        self.link_stats = LinkStats(np.zeros(n_links), np.zeros(n_links))
        self.counters = {"events": 0, "network_solves": 0, "network_parts": 0}  # no network
        self.wall_s = 0.0
        self._link_loads: dict[int, tuple[Traffic, np.ndarray, np.ndarray, float]] = {}

    def run(self) -> AnalyticEngine:
        start = time.perf_counter()
        n = self.plan.n_devices
        nodes = self.graph.nodes
        ext = external_deps(self.graph)
        finish: list[np.ndarray | None] = [None] * len(nodes)
        free: dict[str, np.ndarray] = {}
        zero = np.zeros(n)
        phase_s = self.rec.phase_s
        for node, deps in zip(nodes, ext, strict=True):
            stream = node.stream
            gpu = stream == GPU
            if node.devices is not None:
                finish[node.id] = self._masked(node, deps, finish, free)
                continue
            if stream is None:
                ready = zero
                for d in deps:
                    ready = np.maximum(ready, finish[d])
            else:
                ready = free.get(stream, zero)
                for d in deps:  # waits in order, as the discrete-event stream takes them
                    later = np.maximum(ready, finish[d])
                    if gpu:
                        wait = later - ready
                        phase_s[nodes[d].phase] += wait
                        self._slices(nodes[d].phase, ready, wait, node.layer)
                    ready = later
            if node.kind == COMPUTE:
                if node.seconds is None:
                    done = ready
                else:
                    done = ready + node.seconds
                    if gpu:
                        phase_s[node.phase] += node.seconds
                        self._slices(node.phase, ready, node.seconds, node.layer)
                    else:
                        self._pim_slices(node, ready)
                free[stream] = done
            else:
                done = self._collective(node, ready) if node.kind == COLLECTIVE else None
                if done is None:
                    done = self._transfer(node, ready)
                elif self._comm and node.phase != "pipeline":
                    self.rec.in_flight_all(ready, done)
                if stream is not None:
                    if node.wait:
                        if gpu:
                            phase_s[node.phase] += done - ready
                            self._slices(node.phase, ready, done - ready, node.layer)
                        free[stream] = done
                    else:
                        free[stream] = ready
            finish[node.id] = done
        self.rec.finish_s[:] = free.get(GPU, zero)
        self.wall_s = time.perf_counter() - start
        return self

    def _masked(self, node: Node, deps, finish, free) -> np.ndarray:
        """A node that involves some devices only: evaluated on those, the others keep
        their streams' times (their entries of its finish are never read)."""
        mask = node.devices
        idx = np.flatnonzero(mask)
        stream = node.stream
        prev = free.get(stream, np.zeros(len(mask))) if stream is not None else None
        ready = np.zeros(len(idx)) if stream is None else prev[idx].copy()
        phase_s = self.rec.phase_s
        for d in deps:
            later = np.maximum(ready, finish[d][idx])
            if stream == GPU:
                phase_s[self.graph.nodes[d].phase][idx] += later - ready
                self._slices(
                    self.graph.nodes[d].phase,
                    _full(ready, idx, mask),
                    _full(later - ready, idx, mask),
                    node.layer,
                )
            ready = later
        full_ready = _full(ready, idx, mask)
        if node.kind == COMPUTE:
            sec = node.seconds[idx] if node.seconds is not None else 0.0
            done = ready + sec
            if node.seconds is not None and stream == GPU:
                phase_s[node.phase][idx] += sec
                self._slices(
                    node.phase, full_ready, _full(sec * np.ones(len(idx)), idx, mask), node.layer
                )
            busy_until = done
        else:
            if node.kind == COLLECTIVE:
                issue = np.full(len(mask), -np.inf)
                issue[idx] = ready
                done_all = self._collective(node, np.where(mask, issue, -np.inf))
                if self._comm and node.phase != "pipeline":
                    self.rec.in_flight(idx, ready, done_all[idx])
            else:
                done_all = self._transfer(node, full_ready)
            done = done_all[idx]
            if stream == GPU and node.wait:
                phase_s[node.phase][idx] += done - ready
                self._slices(node.phase, full_ready, _full(done - ready, idx, mask), node.layer)
            busy_until = done if node.wait else ready
        if stream is not None:
            updated = prev.copy()
            updated[idx] = busy_until
            free[stream] = updated
        return _full(done, idx, mask)

    # -- nodes --------------------------------------------------------------------------
    def _collective(self, node: Node, issue: np.ndarray) -> np.ndarray:
        """Each member finishes at its group's latest issue plus the collective's time;
        a device outside every group (or a collective without flows) does not wait."""
        traffic = node.traffic
        if not len(traffic.src):
            return issue
        members = traffic.members
        if members is None:  # one group of every device
            begin = float(issue.max())
            return np.full(len(issue), begin + self._network_s(traffic, begin))
        m = np.full(len(issue), -1, dtype=np.int64)
        m[: len(members)] = members[: len(issue)]
        inside = m >= 0
        latest = np.full(int(m.max()) + 1, -np.inf)
        np.maximum.at(latest, m[inside], issue[inside])
        begin = float(latest.max())
        span = self._network_s(traffic, begin)
        return np.where(inside, latest[np.maximum(m, 0)] + span, issue)

    def _transfer(self, node: Node, issue: np.ndarray) -> np.ndarray:
        """Per device: its bytes over its own link plus that link's latency (no other
        traffic shares a GPU-PIM link)."""
        topo = self.topology
        links = node.links
        has = links >= 0
        link = np.where(has, links, 0)
        busy = np.where(has, node.nbytes / topo.bandwidth_bytes_per_s[link], 0.0)
        np.add.at(self.link_stats.bytes_carried, link[has], node.nbytes[has])
        np.add.at(self.link_stats.busy_s, link[has], busy[has])
        return issue + np.where(has, busy + topo.latency_s[link], 0.0)

    def _hops(self, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float]:
        """The pairs' paths (-1 padded link ids) and the longest path latency; the last few
        pair sets are kept (layers repeat them, usually as the same arrays)."""
        for s, d, hit in self._recent_hops:  # the same arrays (layers share one layout) first
            if s is src and d is dst:
                return hit
        for s, d, hit in self._recent_hops:
            if np.array_equal(s, src) and np.array_equal(d, dst):
                return hit
        paths = self.topology.routes(src, dst)
        hit = (paths, float(self.topology.pair_latency_s(src, dst).max()))
        self._recent_hops = [(src, dst, hit), *self._recent_hops[:3]]  # never modified
        return hit

    def _network_s(self, traffic: Traffic, begin_s: float) -> float:
        """Bottleneck time of ``traffic``. Link loads are computed once per traffic object
        (training repeats each collective every pass); the cache holds the object, so its
        id stays unique."""
        topo = self.topology
        hit = self._link_loads.get(id(traffic))
        if hit is None:
            paths, path_latency_s = self._hops(traffic.src, traffic.dst)
            loads = link_loads(paths, traffic.nbytes, topo.n_links)
            steps, launches = traffic.latency_steps, traffic.launches
            latency_s = float(
                topo.collective_latency_s(np.array([path_latency_s]), steps, launches)[0]
            )
            busy = loads / topo.bandwidth_bytes_per_s
            span_s = float(busy.max()) + latency_s
            hit = self._link_loads[id(traffic)] = (traffic, loads, busy, span_s)
        _, loads, busy, span_s = hit
        self.link_stats.bytes_carried += loads
        self.link_stats.busy_s += busy
        if self.rec.keep_slices:
            lids = np.flatnonzero(busy)
            self.link_stats.intervals.add(
                lids, np.full(len(lids), float(begin_s)), begin_s + busy[lids]
            )
        return span_s

    # -- timeline slices ----------------------------------------------------------------
    def _slices(self, phase: str, start: np.ndarray, seconds: np.ndarray, layer: int) -> None:
        if not self.rec.keep_slices:
            return
        for g in np.flatnonzero(seconds > 0):
            s0 = float(start[g])
            self.rec.slices.append((int(g), phase, s0, s0 + float(seconds[g]), layer))

    def _pim_slices(self, node: Node, start: np.ndarray) -> None:
        """The PIM units' busy slices (their own tracks in trace.json)."""
        if self.rec.keep_slices:
            for g in np.flatnonzero(node.seconds > 0):
                s0 = float(start[g])
                end = s0 + float(node.seconds[g])
                self.rec.pim_slices.append((int(g), node.label, s0, end, node.layer))
