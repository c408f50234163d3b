"""What both engines start from: the plan's topology (built from the scenario unless given)
and its step graph (built from the plan unless given); for the discrete-event engine, the
topology and the flow patterns of the MoE all-to-alls built alongside the plan
(:class:`NetworkPrefetch`)."""

from __future__ import annotations

import threading

import numpy as np

from moesim.engine.parts import pair_components, pairs_by_component
from moesim.network import Topology, build_topology
from moesim.network.aggregate import PatternCache
from moesim.plan.graph import StepGraph, build_graph
from moesim.plan.types import WorkloadPlan
from moesim.plan.workload import dispatch_pairs

TOPOLOGY_CACHE_SIZE = 4
"""Topologies kept per process, keyed by the cluster, topology, PIM and tier settings they
are built from, so that a screening loop (or a sweep over layouts of one cluster) builds each
once; a topology is never modified after it is built, apart from its lazily routed table."""

_TOPOLOGIES: dict[str, Topology] = {}
_TOPOLOGIES_LOCK = threading.Lock()  # a prefetch thread may still run beside the next point


def scenario_topology(sc) -> Topology:
    """The topology of scenario ``sc``, built once per distinct cluster settings
    (:data:`TOPOLOGY_CACHE_SIZE` kept, the oldest dropped first); safe to call from
    several threads."""
    parts = (sc.cluster, sc.topology, sc.pim, sc.tiers)
    key = "\n".join("null" if p is None else p.model_dump_json() for p in parts)
    with _TOPOLOGIES_LOCK:
        topology = _TOPOLOGIES.pop(key, None)
        if topology is None:
            topology = build_topology(*parts)
        _TOPOLOGIES[key] = topology  # most recent last
        while len(_TOPOLOGIES) > TOPOLOGY_CACHE_SIZE:
            del _TOPOLOGIES[next(iter(_TOPOLOGIES))]
    return topology


def step_inputs(
    plan: WorkloadPlan, topology: Topology | None = None, graph: StepGraph | None = None
) -> tuple[Topology, StepGraph]:
    """``(topology, graph)`` of one step of ``plan``."""
    topology = topology or scenario_topology(plan.scenario)
    return topology, graph or build_graph(plan, topology.tables)


class NetworkPrefetch:
    """A scenario's topology and the flow patterns of its dispatch and combine pairs
    (:func:`moesim.plan.workload.dispatch_pairs`, fixed by the layout), built on a daemon
    thread while the main thread builds the plan. Mapping the pairs onto flows is numpy
    (sorts, ``unique``) that runs without the GIL, like the plan's routing draws, so the two
    overlap on two cores: on the 2,048-GPU decode the patterns (~1.4 s) come at no cost to
    the plan (docs/speed.md). The patterns are the ones the engine would build on first
    use (:class:`PatternCache` keys them by the pairs themselves), so a run is the same
    either way. :meth:`result` joins the thread and re-raises what it raised."""

    def __init__(self, scenario) -> None:
        self.scenario = scenario
        self.topology: Topology | None = None
        self.patterns: PatternCache | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._build, name="moesim-patterns", daemon=True)
        self.thread.start()

    def _build(self) -> None:
        try:
            topology = scenario_topology(self.scenario)
            patterns = PatternCache(topology, self.scenario.sim.aggregate)
            pairs = dispatch_pairs(self.scenario)
            if self.scenario.sim.parts == "split":  # the parts' own pairs, if it splits
                label = pair_components(pairs, topology.n_devices)
                if len(np.unique(label)) > 1:
                    pairs = [p for s, d in pairs for p in pairs_by_component(s, d, label)]
            patterns.build(pairs)
            self.topology, self.patterns = topology, patterns
        except BaseException as err:  # raised in the main thread by result()
            self.error = err

    def result(self) -> tuple[Topology, PatternCache]:
        """The topology and its patterns, once built."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.topology, self.patterns
