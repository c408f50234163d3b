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

from moesim.engine.des import Recorder
from moesim.network import Topology, build_topology
from moesim.network.fluid import LinkStats, link_loads
from moesim.plan.types import Traffic, WorkloadPlan


class AnalyticEngine:
    """Closed-form counterpart of :class:`moesim.engine.Engine` (same attributes for results)."""

    fidelity = "analytic"

    def __init__(self, plan: WorkloadPlan, topology: Topology | None = None, **_: object) -> None:
        sc = plan.scenario
        self.plan = plan
        self.topology = topology or build_topology(sc.cluster, sc.topology, sc.pim)
        self._recent_hops: list[tuple[np.ndarray, np.ndarray, tuple]] = []
        self.rec = Recorder(plan.n_devices, sc.sim.trace)
        n_links = self.topology.n_links
        self.link_stats = LinkStats(np.zeros(n_links), np.zeros(n_links))
        self.counters = {"events": 0, "network_solves": 0}
        self.breakdown_s: dict[str, float] = {}
        self.wall_s = 0.0
        self._now = 0.0
        self._idle = np.zeros(plan.n_devices)
        self._link_loads: dict[int, tuple[Traffic, np.ndarray, float]] = {}

    def run(self) -> AnalyticEngine:
        start = time.perf_counter()
        if self.plan.train is not None:
            return self._run_train(start)
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

    # -- training step (workload.phase: train; the same walk as Engine._train_device) ------
    def _run_train(self, start: float) -> AnalyticEngine:
        plan, tr = self.plan, self.plan.train
        n_layers = len(plan.layers)
        stream_end = None  # overlap_grad_reduce: when the gradient stream is done
        for mb in range(tr.micro_batches):
            for lp in plan.layers:
                self._train_forward(lp, recompute=False)
            self._compute("lm_head", plan.lm_head_s, n_layers)
            self._compute("lm_head_bwd", tr.lm_head_bwd_s, n_layers)
            for lp, bl in zip(reversed(plan.layers), reversed(tr.backward), strict=True):
                if tr.full_recompute:
                    self._train_forward(lp, recompute=True)
                if bl.recompute_s.any():
                    self._compute("recompute", bl.recompute_s, lp.index)
                self._train_backward(lp, bl.compute_s)
                if tr.layer_grad_reduce is not None and mb == tr.micro_batches - 1:
                    # the bucket starts when its layer is done and the stream is free; its
                    # links are not shared with the all-to-alls here (the DES shares them)
                    bucket = sum(self._network_s(t) for t in tr.layer_grad_reduce[lp.index])
                    stream_end = max(stream_end or 0.0, self._now) + bucket
        if stream_end is not None and stream_end > self._now:
            wait = stream_end - self._now
            self._slices("grad_reduce", self._now, np.full(plan.n_devices, wait), n_layers)
            self.rec.phase_s["grad_reduce"] += self._idle + wait
            self._idle = np.zeros(plan.n_devices)
            self._advance("grad_reduce", wait)
        for traffic in tr.grad_reduce:
            self._collective("grad_reduce", traffic, n_layers)
        self._compute("optimizer", tr.optimizer_s, n_layers)
        for traffic in tr.param_gather:
            self._collective("param_gather", traffic, n_layers)
        self.rec.finish_s[:] = self._now
        self.wall_s = time.perf_counter() - start
        return self

    def _train_forward(self, lp, recompute: bool) -> None:
        i, cs = lp.index, lp.compute_s

        def phase(name: str) -> str:
            return "recompute" if recompute else name

        self._compute(phase("attention"), cs["attention"], i)
        if lp.tp_comm is not None:
            self._collective("tp_comm", lp.tp_comm, i)
        if lp.moe:
            self._compute(phase("router"), cs["router"], i)
            self._compute(phase("permute"), cs["permute"], i)
            self._moe_block(
                ("dispatch", lp.dispatch), (phase("experts"), cs["experts"]),
                ("combine", self.plan.train.combine[i]),
                (phase("shared_experts"), cs.get("shared_experts")), i,
            )  # fmt: skip
            self._compute(phase("unpermute"), cs["unpermute"], i)
        else:
            self._compute(phase("dense_ffn"), cs["dense_ffn"], i)
        if lp.tp_comm_after is not None:
            self._collective("tp_comm", lp.tp_comm_after, i)

    def _train_backward(self, lp, cs: dict[str, np.ndarray]) -> None:
        i = lp.index
        if lp.tp_comm_after is not None:
            self._collective("tp_comm", lp.tp_comm_after, i)
        if lp.moe:
            self._compute("unpermute_bwd", cs["unpermute_bwd"], i)
            self._moe_block(
                ("combine_bwd", lp.dispatch), ("experts_bwd", cs["experts_bwd"]),
                ("dispatch_bwd", self.plan.train.combine[i]),
                ("shared_experts_bwd", cs.get("shared_experts_bwd")),
                i,
            )  # fmt: skip
            self._compute("permute_bwd", cs["permute_bwd"], i)
            self._compute("router_bwd", cs["router_bwd"], i)
        else:
            self._compute("dense_ffn_bwd", cs["dense_ffn_bwd"], i)
        if lp.tp_comm is not None:
            self._collective("tp_comm", lp.tp_comm, i)
        self._compute("attention_bwd", cs["attention_bwd"], i)

    def _moe_block(self, first, work, second, side, layer: int) -> None:
        """All-to-all, experts, all-to-all; with ``chunks`` > 1 the chunked pipeline of
        ``Engine._moe_exchange`` in lock step: a communication stream runs the first
        all-to-all of every chunk, then the second of each chunk once its experts are done;
        the compute stream runs chunk c's experts (slowest device) once chunk c arrived."""
        (p1, t1), (pw, sec), (p2, t2), (ps, side_s) = first, work, second, side
        chunks = self.plan.train.chunks
        if chunks == 1:
            self._collective(p1, t1, layer, overlap=side_s, overlap_phase=ps)
            self._compute(pw, sec, layer)
            self._collective(p2, t2, layer)
            return
        n = self.plan.n_devices
        side_s = np.zeros(n) if side_s is None else side_s
        d1 = [self._network_s(t1, 1.0 / chunks) for _ in range(chunks)]
        d2 = [self._network_s(t2, 1.0 / chunks) for _ in range(chunks)]
        e, s, t0 = float(sec.max()) / chunks, float(side_s.max()), self._now
        comm, arrived = t0, []
        for c in range(chunks):
            comm += d1[c]
            arrived.append(comm)
        comp, wait1 = t0 + s, 0.0
        ends = []
        for c in range(chunks):
            wait1 += max(0.0, arrived[c] - comp)
            comp = max(comp, arrived[c]) + e
            ends.append(comp)
        for c in range(chunks):
            comm = max(comm, ends[c]) + d2[c]
        wait2 = comm - ends[-1]
        self._slices(ps, t0, side_s, layer)
        for end in ends:  # each chunk's experts, from when the slowest device starts it
            self._slices(pw, end - e, sec / chunks, layer)
        for name, span in ((ps, s), (p1, wait1), (pw, chunks * e), (p2, wait2)):
            self._advance(name, span, move=False)
        self.rec.phase_s[ps] += side_s
        self.rec.phase_s[pw] += sec
        self.rec.phase_s[p1] += self._idle + wait1 + (s - side_s) + (chunks * e - sec)
        self.rec.phase_s[p2] += wait2
        self._idle = np.zeros(n)
        self._now = comm

    # -- processing in memory (moesim/pim.py) -----------------------------------------------
    def _with_pim(self, phase: str, gpu_s: np.ndarray, lp, layer: int) -> None:
        """A GPU phase and its PIM work, as the engine runs them: attention's PIM part after
        the GPU's, experts' PIM part beside the GPU's experts (the GPU waits, phase ``pim``)."""
        work = lp.pim
        if work is None or work.phase != phase:
            self._compute(phase, gpu_s, layer)
            return
        pim_s, in_s = self._pim_s(work)
        if phase == "attention":
            self._compute(phase, gpu_s, layer)
            self._pim_track(work, self._now + in_s, layer)
            self._compute("pim", pim_s, layer)
            return
        self._pim_track(work, self._now + in_s, layer)
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

    def _pim_s(self, work) -> tuple[np.ndarray, np.ndarray]:
        """Per device: activations in over its PIM link, the PIM kernels, results back (no
        other traffic shares a PIM link), and the first part alone; the link bytes and busy
        time are recorded."""
        topo = self.topology
        total = np.where((work.seconds > 0) | (work.in_bytes > 0), work.seconds, 0.0)
        transfer = []
        for key, nbytes in (("pim_up", work.in_bytes), ("pim_down", work.out_bytes)):
            link = topo.tables[key]
            busy = nbytes / topo.bandwidth_bytes_per_s[link]
            transfer.append(np.where(nbytes > 0, busy + topo.latency_s[link], 0.0))
            self.link_stats.bytes_carried[link] += nbytes
            self.link_stats.busy_s[link] += busy
        return total + transfer[0] + transfer[1], transfer[0]

    def _pim_track(self, work, start: np.ndarray, layer: int) -> None:
        """The PIM units' busy slices (their own tracks in trace.json)."""
        if self.rec.keep_slices:
            for g in np.flatnonzero(work.seconds > 0):
                s0 = float(start[g])
                end = s0 + float(work.seconds[g])
                self.rec.pim_slices.append((int(g), work.phase, s0, end, layer))

    def _compute(self, phase: str, seconds: np.ndarray, layer: int) -> None:
        """All devices start together and the phase lasts as long as the slowest one; a
        faster device's idle time becomes part of its next collective wait."""
        span = float(seconds.max())
        self._slices(phase, self._now, seconds, layer)
        self.rec.phase_s[phase] += seconds
        self._idle += span - seconds
        self._advance(phase, span)

    def _collective(
        self,
        phase: str,
        traffic: Traffic,
        layer: int,
        overlap: np.ndarray | None = None,
        overlap_phase: str = "shared_experts",
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
            self._slices(overlap_phase, self._now, overlap, layer)
            self.rec.phase_s[overlap_phase] += overlap
            self._advance(overlap_phase, float(own.max()), move=False)
        self._slices(phase, self._now + own, total - own, layer)
        self.rec.phase_s[phase] += self._idle + total - own
        self._idle = np.zeros(n)
        self._advance(phase, total - float(own.max()), move=False)
        self._now += total

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
        hit = (paths, float(self.topology.path_latency_s(paths).max()))
        self._recent_hops = [(src, dst, hit), *self._recent_hops[:3]]  # never modified
        return hit

    def _network_s(self, traffic: Traffic, factor: float = 1.0) -> float:
        """Bottleneck time of ``traffic`` with its bytes scaled by ``factor`` (a chunk).
        Link loads are computed once per traffic object (training repeats each collective
        every pass); the cache holds the object, so its id stays unique."""
        if not len(traffic.src):
            return 0.0
        topo = self.topology
        hit = self._link_loads.get(id(traffic))
        if hit is None:
            paths, path_latency_s = self._hops(traffic.src, traffic.dst)
            loads = link_loads(paths, traffic.nbytes, topo.n_links)
            latency_s = path_latency_s * traffic.latency_steps
            hit = self._link_loads[id(traffic)] = (traffic, loads, latency_s)
        _, loads, latency_s = hit
        link_bytes = loads * factor
        busy = link_bytes / topo.bandwidth_bytes_per_s
        self.link_stats.bytes_carried += link_bytes
        self.link_stats.busy_s += busy
        if self.rec.keep_slices:
            for lid in np.flatnonzero(busy):
                self.link_stats.intervals.append(
                    (int(lid), self._now, self._now + float(busy[lid]))
                )
        return float(busy.max()) + latency_s

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
