"""Discrete-event engine: walks the step graph (:mod:`moesim.plan.graph`) in time with simpy.

One process per device and stream walks that stream's nodes in graph order: a compute node
is a timeout, a collective puts the device's flows into the single
:class:`~moesim.network.FluidNetwork` process, a dependency is a wait on the event of the
node it names. Nodes issued by their dependencies (a communication stream) start from event
callbacks. Events are per (node, device) and per flow batch, never per token. Metrics are
collected around the processes (:class:`~moesim.engine.recorder.Recorder`), not inside the
network or device models.
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, field

import numpy as np
import simpy
from simpy.events import URGENT
from tqdm import tqdm

from moesim.engine.inputs import step_inputs
from moesim.engine.parts import independent_parts, run_parts, worker_count
from moesim.engine.recorder import CountingEnvironment, Recorder, failure_copy
from moesim.network import FluidNetwork, Topology
from moesim.network.aggregate import PatternCache, aggregation_mode
from moesim.network.fluid import LinkStats, kernels_cold, warm_up
from moesim.plan.graph import (
    COLLECTIVE,
    COMPUTE,
    GPU,
    Node,
    StepGraph,
    external_deps,
)
from moesim.plan.types import WorkloadPlan


@dataclass
class _Prepared:
    """A collective node mapped onto flows: its network block (which holds every sender's
    contributions with bytes), per sender the range of them and its zero-byte ones (slot);
    for a barrier collective, the members still to join per group and the devices held
    until their group is complete."""

    block: int  # its entries: the contributions with bytes, by sender
    empty_slot: np.ndarray  # zero-byte contributions, by sender
    senders_left: int
    offsets: list[int] = field(default_factory=list)  # sender g: entries offsets[g]:...
    empty_offsets: list[int] = field(default_factory=list)
    members: np.ndarray | None = None
    left: np.ndarray | None = None
    held: dict[int, list[int]] = field(default_factory=dict)


class _Stream:
    """A device stream's walk, driven by simpy's event loop as ``simpy.Process`` drives a
    generator: started by an urgent event, resumed with the value of each event it yields
    (a failed one raised into it), and ending with one more event; the same events in the
    same order. It leaves out what the engine never uses (the active process, interrupts,
    waiting on a walk): about 1,200 instructions a resume (callgrind, docs/speed.md)."""

    __slots__ = ("_callback", "_env", "_generator", "_send")

    def __init__(self, env: simpy.Environment, generator) -> None:
        self._env, self._generator, self._send = env, generator, generator.send
        self._callback = self._resume
        start = simpy.Event(env)  # what simpy's Initialize is
        start.callbacks.append(self._callback)
        start._ok, start._value = True, None
        env.schedule(start, URGENT)

    def _resume(self, event: simpy.Event) -> None:
        send = self._send
        while True:
            try:
                if event._ok:
                    event = send(event._value)
                else:  # as simpy: the walk gets its own copy of the exception
                    event._defused = True
                    event = self._generator.throw(failure_copy(event))
            except StopIteration:
                end = simpy.Event(self._env)  # a process is an event that ends it
                end._ok, end._value = True, None
                self._env.schedule(end)
                return
            callbacks = event.callbacks
            if callbacks is not None:  # not yet processed: resume when it is
                callbacks.append(self._callback)
                return


class _NoBar:
    """The progress bar of a run that shows none: no tqdm (whose lock a forked part
    must never need)."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Engine:
    """Runs one step of a :class:`WorkloadPlan` on its topology."""

    fidelity = "des"

    def __init__(
        self,
        plan: WorkloadPlan,
        topology: Topology | None = None,
        progress: bool | None = None,
        graph: StepGraph | None = None,
        patterns: PatternCache | None = None,
        devices: np.ndarray | None = None,
    ) -> None:
        """``devices``: simulate only these (an independent part of the step,
        :func:`~moesim.engine.parts.independent_parts`): their streams, and of each
        collective the pairs they send; None: every device, split into its independent parts
        by :meth:`run` where ``sim.parts`` is ``split``."""
        sc = plan.scenario
        self.plan = plan
        self._part = None if devices is None else np.asarray(devices, dtype=np.int64)
        self._in_part: np.ndarray | None = None
        if self._part is not None:
            self._in_part = np.zeros(plan.n_devices, dtype=bool)
            self._in_part[self._part] = True
        self._sub_pairs: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self._part_counts = {"events": 0, "network_solves": 0}
        self.n_parts = 1  # the independent parts run apart (1: one network)
        self.topology, self.graph = step_inputs(plan, topology, graph)
        self.env = CountingEnvironment()
        self.net = FluidNetwork(
            self.env, self.topology, sc.sim.network_tolerance, record_intervals=sc.sim.trace
        )
        mode = aggregation_mode(self.topology, sc.sim.aggregate)
        if patterns is None or patterns.topology is not self.topology or patterns.mode != mode:
            patterns = PatternCache(self.topology, mode)
        self.patterns = patterns  # flow patterns by pairs (given: built alongside the plan)
        self.rec = Recorder(plan.n_devices, sc.sim.trace)
        self._comm = plan.train is None  # collectives in flight (inference summaries)
        nodes = self.graph.nodes
        self._ext = external_deps(self.graph)
        uses = np.zeros(len(nodes), dtype=np.int64)  # per device: waits on each node's event
        for node, ext in zip(nodes, self._ext, strict=True):
            for d in ext:
                uses[d] += 1
            if node.kind != COMPUTE and node.stream is not None and node.wait:
                uses[node.id] += 1
        self._uses = uses
        self._complete = self.env.event()  # what a node is on a device it does not involve
        self._complete.succeed()
        self._left: dict[int, list[int]] = {}
        # per node, the devices it involves as a Python list (None: all): read per device
        self._involves = [None if n.devices is None else n.devices.tolist() for n in nodes]
        self._events: dict[int, list[simpy.Event | None]] = {}
        self._prepared: dict[int, _Prepared] = {}
        self._streams = self.graph.streams()
        self._walk_lists = {
            stream: [i for i, node in enumerate(nodes) if node.stream in (stream, None)]
            if stream == GPU
            else ids
            for stream, ids in self._streams.items()
            if stream is not None
        }
        self._awaited = self.graph.awaited()
        gpu_layers = [node.layer for node in nodes if node.stream == GPU]
        spans = 1 + sum(a != b for a, b in itertools.pairwise(gpu_layers))
        show = sc.sim.progress if progress is None else progress
        if show and self.net.compiled and kernels_cold(quiet=False):
            warm_up()  # compiled here, announced, rather than stalling the progress bar
        self._spans = spans
        self._devices = range(plan.n_devices) if self._part is None else self._part.tolist()
        self._bar = (
            _NoBar()
            if not show
            else tqdm(
                total=len(self._devices) * spans,
                delay=2.0,
                unit="device-layer",
                desc=sc.name,
                leave=False,
            )
        )
        self.wall_s = 0.0

    @property
    def link_stats(self) -> LinkStats:
        return self.net.stats

    @property
    def counters(self) -> dict[str, int]:
        counts = self._part_counts
        return {
            "events": self.env.events_processed + counts["events"],
            "network_solves": self.net.solves + counts["network_solves"],
            "network_parts": self.n_parts,
        }

    def run(self) -> Engine:
        start = time.perf_counter()
        if self._part is None and self.plan.scenario.sim.parts == "split":
            parts = independent_parts(
                self.graph, self.patterns, self.plan.n_devices, self.topology.n_links
            )
            if len(parts) > 1:
                self._run_parts(parts)
                self.wall_s = time.perf_counter() - start
                return self
        for stream, ids in self._walk_lists.items():
            for g in self._devices:
                _Stream(self.env, self._walk(g, stream, ids))
        # the walk allocates (events, slices) without making cyclic garbage: the cyclic
        # collector only rescans the growing heap (~8% of the run on 256 devices), so it
        # pauses for the run; reference counting frees everything as before
        collecting = gc.isenabled()
        gc.disable()
        # per-device phase times summed in Python lists for the run (a list element adds a
        # float in a fifth of the time a numpy element takes, the same IEEE sum), then
        # put back in the recorder's arrays
        arrays = self.rec.phase_s
        self.rec.phase_s = {phase: seconds.tolist() for phase, seconds in arrays.items()}
        try:
            self.env.run()
        finally:
            for phase, seconds in self.rec.phase_s.items():
                arrays[phase][:] = seconds
            self.rec.phase_s = arrays
            if collecting:
                gc.enable()
        self._bar.close()
        self.wall_s = time.perf_counter() - start
        self.net.close_intervals()
        return self

    def _run_parts(self, parts: list[np.ndarray]) -> None:
        """Simulate each independent part (:mod:`moesim.engine.parts`) on its own network
        and event loop, in ``sim.workers`` processes, and gather their records here in part
        order: every device's and every link's numbers come from the one part that holds it
        (links are never shared between parts), so they are the part's own."""
        self.n_parts = len(parts)
        workers = worker_count(self.plan.scenario.sim.workers, len(parts), self.plan.n_devices)

        def run(k: int) -> dict:
            part = Engine(self.plan, self.topology, False, self.graph, self.patterns, parts[k])
            return part.run()._records()

        done = {}
        for k, records in run_parts(run, len(parts), workers):
            done[k] = records
            self._bar.update(len(parts[k]) * self._spans)
        stats = self.net.stats
        for k, part in enumerate(parts):
            records = done.pop(k)
            self.rec.add_part(part, records["recorder"])
            stats.busy_s += records["busy_s"]
            stats.bytes_carried += records["bytes_carried"]
            stats.intervals.add(*records["intervals"])
            self._part_counts["events"] += records["events"]
            self._part_counts["network_solves"] += records["network_solves"]
        self._bar.close()

    def _records(self) -> dict:
        """What a part's run hands back to the whole: its devices' records, its links'
        accounting and its counts (picklable: a forked worker sends it)."""
        stats = self.net.stats
        return {
            "recorder": self.rec.part_records(self._part),
            "busy_s": stats.busy_s,
            "bytes_carried": stats.bytes_carried,
            "intervals": stats.intervals.columns(),
            "events": self.env.events_processed,
            "network_solves": self.net.solves,
        }

    # -- events -------------------------------------------------------------------------
    def _event(self, nid: int, g: int) -> simpy.Event:
        """The event of node ``nid`` completing on device ``g`` (made on first use)."""
        involves = self._involves[nid]
        if involves is not None and not involves[g]:  # done where it involves no device
            return self._complete
        events = self._events.get(nid)
        if events is None:
            node = self.graph.nodes[nid]
            if node.kind == COLLECTIVE:
                events = self._prepare(node)
            else:
                events = [None] * self.plan.n_devices
            self._events[nid] = events
        ev = events[g]
        if ev is None:
            ev = events[g] = self.env.event()
        return ev

    def _used(self, nid: int, g: int) -> None:
        """One wait on ``nid``'s event of device ``g`` is done; drop it after the last."""
        left = self._left.get(nid)
        if left is None:
            left = self._left[nid] = [int(self._uses[nid])] * self.plan.n_devices
        left[g] -= 1
        events = self._events.get(nid)
        if events is None:  # only waited on by devices it does not involve
            return
        if left[g] == 0 and events[g] is not None and events[g].triggered:
            events[g] = None

    # -- a device's stream ---------------------------------------------------------------
    def _record_run(self, g: int, kernels: list[tuple[str, float, int]], t: float) -> None:
        """Record back-to-back kernels ``(phase, seconds, layer)`` that started at ``t`` and
        ended now, each as its own slice (as ``rec.add`` would, inlined); empties
        ``kernels``."""
        now = self.env.now
        phase_s, keep = self.rec.phase_s, self.rec.keep_slices
        slices = self.rec.slices
        for phase, seconds, layer in kernels:
            end = min(t + seconds, now)
            phase_s[phase][g] += end - t
            if keep and end > t:
                slices.append((g, phase, t, end, layer))
            t += seconds
        kernels.clear()

    def _walk(self, g: int, stream: str, ids: list[int]):
        """Device ``g``'s ``stream``: its nodes in graph order (the GPU stream also arms the
        nodes that their dependencies issue, at their place in the order).

        Back-to-back GPU kernels run as one timeout (one event), each recorded as its own
        slice (``_record_run``). Exact: nothing else touches a stream between two of its
        kernels, so only sends and waits need the clock."""
        env, nodes, rec = self.env, self.graph.nodes, self.rec
        gpu = stream == GPU
        run: list[tuple[str, float, int]] = []
        awaited = self._awaited
        involves_of = self._involves
        ext_of = self._ext
        event, used, record_run = self._event, self._used, self._record_run
        timeout = env.timeout
        layer = None
        for nid in ids:
            node = nodes[nid]
            involves = involves_of[nid]
            if involves is not None and not involves[g]:
                continue
            if node.stream is None:
                self._arm(node, g)
                continue
            if gpu and node.layer != layer:
                if layer is not None:
                    self._bar.update()
                layer = node.layer
            ext = ext_of[nid]
            waits = [d for d in ext if not event(d, g).triggered] if ext else ext
            compute = node.kind == COMPUTE
            if run and (waits or not compute):
                t = env.now
                total = sum(k[1] for k in run)
                if total > 0:
                    yield timeout(total)
                record_run(g, run, t)
            for d in waits:
                start = env.now
                yield event(d, g)
                if gpu:
                    rec.add(g, nodes[d].phase, start, env.now, node.layer)
            for d in ext:
                used(d, g)
            if compute:
                if node.seconds is None:  # a join: done once its dependencies are
                    if awaited[nid]:
                        if run:
                            t = env.now
                            total = sum(k[1] for k in run)
                            if total > 0:
                                yield timeout(total)
                            record_run(g, run, t)
                        event(nid, g).succeed()
                    continue
                seconds = float(node.seconds[g])
                if gpu:
                    run.append((node.phase, seconds, node.layer))
                    if awaited[nid]:
                        t = env.now
                        total = sum(k[1] for k in run)
                        if total > 0:
                            yield timeout(total)
                        record_run(g, run, t)
                else:  # a PIM unit's kernel: its own track in trace.json
                    start = env.now
                    if seconds > 0:
                        yield timeout(seconds)
                        if rec.keep_slices:
                            rec.pim_slices.append((g, node.label, start, env.now, node.layer))
                if awaited[nid]:
                    event(nid, g).succeed()
                continue
            done = self._issue(node, g)
            if node.wait:
                start = env.now
                yield done
                used(nid, g)
                if gpu:
                    rec.add(g, node.phase, start, env.now, node.layer)
        if run:
            t = env.now
            total = sum(k[1] for k in run)
            if total > 0:
                yield timeout(total)
            record_run(g, run, t)
        if gpu:
            self._bar.update()
            rec.finish_s[g] = env.now

    def _arm(self, node: Node, g: int) -> None:
        """Issue ``node`` on device ``g`` once its dependencies complete (now, if they have)."""
        pending = [self._event(d, g) for d in self._ext[node.id]]
        pending = [ev for ev in pending if not ev.triggered]
        for d in self._ext[node.id]:
            self._used(d, g)
        if not pending:
            self._issue(node, g)
            return
        left = [len(pending)]

        def ready(_event) -> None:
            left[0] -= 1
            if left[0] == 0:
                self._issue(node, g)

        for ev in pending:
            ev.callbacks.append(ready)

    def _issue(self, node: Node, g: int) -> simpy.Event:
        """Put device ``g``'s part of a collective or transfer on the network; its event."""
        done = self._event(node.id, g)
        if node.kind == COLLECTIVE:
            self._send(node, g)
            if self._comm and node.phase != "pipeline" and done.callbacks is not None:
                start = self.env.now
                done.callbacks.append(lambda _e: self.rec.in_flight_one(g, start, self.env.now))
            return done
        link = int(node.links[g])
        if link < 0:
            done.succeed()
            return done
        gid, arrived = self.net.group(1)  # one flow on one link (its path given)
        path = np.array([[link]], dtype=np.int64)
        block = self.net.add_block(
            path, self.topology.latency_s[[link]], np.arange(2), np.array([gid]), np.ones(1, int)
        )
        self.net.contribute(block, np.arange(1), node.nbytes[[g]], np.ones(1))
        arrived.callbacks.append(lambda _e: done.succeed())
        return done

    # -- collectives on the fluid network --------------------------------------------------
    def _send(self, node: Node, g: int) -> None:
        """Device ``g`` joins the collective: its flows start now, or, behind a barrier, when
        the last member of its group has joined."""
        prep = self._prepared[node.id]
        prep.senders_left -= 1
        if prep.senders_left == 0:
            del self._prepared[node.id]
        if prep.members is None:
            self._contribute(prep, g)
            return
        k = int(prep.members[g]) if g < len(prep.members) else -1
        if k < 0:
            return
        prep.held.setdefault(k, []).append(g)
        prep.left[k] -= 1
        if prep.left[k] == 0:
            for h in prep.held.pop(k):
                self._contribute(prep, h)

    def _contribute(self, prep: _Prepared, g: int) -> None:
        net, block = self.net, prep.block
        lo, hi = prep.offsets[g], prep.offsets[g + 1]
        if hi > lo:
            net.contribute_range(block, lo, hi)
        lo, hi = prep.empty_offsets[g], prep.empty_offsets[g + 1]
        if hi > lo:
            net.contribute_empty(block, prep.empty_slot[lo:hi])

    def _prepare(self, node: Node) -> list[simpy.Event]:
        """Map a collective onto flows once (routing cached across layers), register one
        group per receiver, fed by every flow that carries bytes to it; its events."""
        traffic = node.traffic
        n = self.plan.n_devices
        src, dst, pair_bytes = traffic.src, traffic.dst, traffic.nbytes
        if self._in_part is not None:  # this part's pairs (a part sends only within itself)
            src, dst, pair_bytes = self._part_pairs(traffic)
        pat = self.patterns.get(src, dst)
        if self._part is None:
            gids, events = self.net.groups(pat.inbound(n))
        else:  # groups for the part's receivers only (the others' events are never used)
            gids, events = np.full(n, -1, dtype=np.int64), [self._complete] * n
            gids[self._part], part_events = self.net.groups(pat.inbound(n)[self._part])
            for g, event in zip(self._devices, part_events, strict=True):
                events[g] = event
        # the collective takes at least its busiest link's bytes over that link's bandwidth
        nbytes, weight, per_slot = pat.contribution_sums(pair_bytes)
        link_bytes = pat.link_bytes(pair_bytes, self.topology.n_links, per_slot)
        floor_s = float(np.max(link_bytes / self.net.capacity)) if len(link_bytes) else 0.0
        # the contributions without bytes are counted off, never admitted
        *full, full_at, empty_slot, empty_at = pat.split_contributions(nbytes, weight)
        block = self.net.add_block(
            pat.paths,
            self.topology.collective_latency_s(
                pat.latency_s, traffic.latency_steps, traffic.launches
            ),
            pat.receiver_ptr,
            gids[pat.receivers],
            pat.contributors,
            floor_s,
            link_bytes,
            tuple(full),
        )
        involved = node.devices  # the senders (None: every device)
        if self._in_part is not None:
            involved = self._in_part if involved is None else involved & self._in_part
        prep = _Prepared(
            block=block,
            empty_slot=empty_slot,
            senders_left=n if involved is None else int(np.count_nonzero(involved)),
            offsets=full_at.tolist(),
            empty_offsets=empty_at.tolist(),
        )
        if traffic.barrier and traffic.members is not None:
            members = traffic.members
            if self._in_part is not None:  # the part's groups: a group is in one part
                members = np.where(self._in_part[: len(members)], members, -1)
            prep.members = members
            valid = members[members >= 0]
            prep.left = np.bincount(valid) if len(valid) else np.zeros(0, dtype=np.int64)
        self._prepared[node.id] = prep
        return events

    def _part_pairs(self, traffic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``traffic``'s pairs sent by this part's devices (their receivers are in it too)
        and their bytes; the pairs selected once per pair set (the same arrays every layer,
        so the flow pattern is found by identity), read-only as the plan's are."""
        key = (id(traffic.src), id(traffic.dst))
        found = self._sub_pairs.get(key)
        if found is None or found[0] is not traffic.src or found[1] is not traffic.dst:
            sel = np.flatnonzero(self._in_part[traffic.src])
            src, dst = traffic.src[sel], traffic.dst[sel]
            for a in (src, dst, sel):
                a.flags.writeable = False
            found = self._sub_pairs[key] = (traffic.src, traffic.dst, sel, src, dst)
        _, _, sel, src, dst = found
        nbytes = np.asarray(traffic.nbytes)[sel]
        nbytes.flags.writeable = np.asarray(traffic.nbytes).flags.writeable
        return src, dst, nbytes
