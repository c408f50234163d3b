"""Analytic fidelity: the same workload plan in closed form, with no event loop.

Every phase of every layer takes as long as its slowest device (compute) or its bottleneck
link (collectives: ``max over links of bytes_on_link / bandwidth + max path latency``, the
alpha-beta bound a perfectly scheduled collective reaches); phases run back to back on all
devices at once. It differs from the discrete-event engine where devices drift apart: there,
a device that finishes early starts its next send early and flows share links max-min fairly,
so the discrete-event step is at most the analytic one when links are not shared by
different collectives at once. Use it to screen many configurations, then confirm with
``sim.fidelity: des``.
"""

from __future__ import annotations

import time

import numpy as np

from moesim.engine import Recorder
from moesim.network import Topology, build_topology
from moesim.network.fluid import LinkStats
from moesim.workload import Traffic, WorkloadPlan


class AnalyticEngine:
    """Closed-form counterpart of :class:`moesim.engine.Engine` (same attributes for results)."""

    fidelity = "analytic"

    def __init__(self, plan: WorkloadPlan, topology: Topology | None = None, **_: object) -> None:
        sc = plan.scenario
        self.plan = plan
        self.topology = topology or build_topology(sc.cluster, sc.topology, sc.pim)
        self.rec = Recorder(plan.n_devices, sc.sim.trace)
        n_links = self.topology.n_links
        self.link_stats = LinkStats(np.zeros(n_links), np.zeros(n_links))
        self.counters = {"events": 0, "network_solves": 0}
        self.breakdown_s: dict[str, float] = {}
        self.wall_s = 0.0
        self._now = 0.0
        self._idle = np.zeros(plan.n_devices)

    def run(self) -> AnalyticEngine:
        start = time.perf_counter()
        for lp in self.plan.layers:
            i = lp.index
            self._with_pim("attention", lp.compute_s["attention"], lp, i)
            if lp.tp_comm is not None:
                self._collective("tp_comm", lp.tp_comm, i)
            if lp.moe:
                self._compute("router", lp.compute_s["router"], i)
                self._compute("permute", lp.compute_s["permute"], i)
                shared = lp.compute_s.get("shared_experts")
                self._collective("dispatch", lp.dispatch, i, overlap=shared)
                self._with_pim("experts", lp.compute_s["experts"], lp, i)
                self._collective("combine", lp.combine, i)
                self._compute("unpermute", lp.compute_s["unpermute"], i)
            else:
                self._compute("dense_ffn", lp.compute_s["dense_ffn"], i)
            if lp.tp_comm_after is not None:
                self._collective("tp_comm", lp.tp_comm_after, i)
        self._compute("lm_head", self.plan.lm_head_s, len(self.plan.layers))
        self.rec.finish_s[:] = self._now
        self.wall_s = time.perf_counter() - start
        return self

    # -- processing in memory (moesim/pim.py) -----------------------------------------------
    def _with_pim(self, phase: str, gpu_s: np.ndarray, lp, layer: int) -> None:
        """A GPU phase and its PIM work, as the engine runs them: attention's PIM part after
        the GPU's, experts' PIM part beside the GPU's experts (the GPU waits, phase ``pim``)."""
        work = lp.pim
        if work is None or work.phase != phase:
            self._compute(phase, gpu_s, layer)
            return
        pim_s = self._pim_s(work)
        if phase == "attention":
            self._compute(phase, gpu_s, layer)
            self._compute("pim", pim_s, layer)
            return
        wait = np.maximum(pim_s - gpu_s, 0.0)
        total = gpu_s + wait
        span, gpu_span = float(total.max()), float(gpu_s.max())
        self._slices(phase, self._now, gpu_s, layer)
        self._slices("pim", self._now + gpu_s, wait, layer)
        self.rec.phase_s[phase] += gpu_s
        self.rec.phase_s["pim"] += wait
        self._idle += span - total
        self._advance(phase, gpu_span)
        self._advance("pim", span - gpu_span)

    def _pim_s(self, work) -> np.ndarray:
        """Per device: activations in over its PIM link, the PIM kernels, results back (no
        other traffic shares a PIM link); the link bytes and busy time are recorded."""
        topo = self.topology
        total = np.where((work.seconds > 0) | (work.in_bytes > 0), work.seconds, 0.0)
        for key, nbytes in (("pim_up", work.in_bytes), ("pim_down", work.out_bytes)):
            link = topo.tables[key]
            busy = nbytes / topo.bandwidth_bytes_per_s[link]
            total = total + np.where(nbytes > 0, busy + topo.latency_s[link], 0.0)
            self.link_stats.bytes_carried[link] += nbytes
            self.link_stats.busy_s[link] += busy
        return total

    def _compute(self, phase: str, seconds: np.ndarray, layer: int) -> None:
        """All devices start together and the phase lasts as long as the slowest one; a
        faster device's idle time becomes part of its next collective wait."""
        span = float(seconds.max())
        self._slices(phase, self._now, seconds, layer)
        self.rec.phase_s[phase] += seconds
        self._idle += span - seconds
        self._advance(phase, span)

    def _collective(
        self, phase: str, traffic: Traffic, layer: int, overlap: np.ndarray | None = None
    ) -> None:
        """Bottleneck link time plus the longest path latency (alpha-beta bound); devices
        run ``overlap`` (shared experts) while their tokens travel."""
        span = self._network_s(traffic)
        n = self.plan.n_devices
        own = np.zeros(n) if overlap is None else overlap
        total = max(span, float(own.max()))
        # idle carried from the previous phase, then (after any overlap) waiting for the network
        self._slices(phase, self._now - self._idle, self._idle, layer)
        if overlap is not None:
            self._slices("shared_experts", self._now, overlap, layer)
            self.rec.phase_s["shared_experts"] += overlap
            self._advance("shared_experts", float(own.max()), move=False)
        self._slices(phase, self._now + own, total - own, layer)
        self.rec.phase_s[phase] += self._idle + total - own
        self._idle = np.zeros(n)
        self._advance(phase, total - float(own.max()), move=False)
        self._now += total

    def _network_s(self, traffic: Traffic) -> float:
        if not len(traffic.src):
            return 0.0
        topo = self.topology
        paths = topo.routes(traffic.src, traffic.dst)
        valid = paths >= 0
        weights = np.broadcast_to(traffic.nbytes[:, None], paths.shape)[valid]
        link_bytes = np.bincount(paths[valid], weights=weights, minlength=topo.n_links)
        busy = link_bytes / topo.bandwidth_bytes_per_s
        self.link_stats.bytes_carried += link_bytes
        self.link_stats.busy_s += busy
        if self.rec.keep_slices:
            for lid in np.flatnonzero(busy):
                self.link_stats.intervals.append(
                    (int(lid), self._now, self._now + float(busy[lid]))
                )
        latency = topo.path_latency_s(paths) * traffic.latency_steps
        return float(busy.max() + latency.max())

    def _advance(self, phase: str, seconds: float, move: bool = True) -> None:
        self.breakdown_s[phase] = self.breakdown_s.get(phase, 0.0) + seconds
        if move:
            self._now += seconds

    def _slices(
        self, phase: str, start: np.ndarray | float, seconds: np.ndarray, layer: int
    ) -> None:
        if not self.rec.keep_slices:
            return
        starts = np.broadcast_to(np.asarray(start, dtype=float), seconds.shape)
        for g in np.flatnonzero(seconds > 0):
            s0 = float(starts[g])
            self.rec.slices.append((int(g), phase, s0, s0 + float(seconds[g]), layer))
