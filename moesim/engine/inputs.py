"""What both engines start from: the plan's topology (built from the scenario unless given)
and its step graph (built from the plan unless given)."""

from __future__ import annotations

from moesim.network import Topology, build_topology
from moesim.plan.graph import StepGraph, build_graph
from moesim.plan.types import WorkloadPlan

TOPOLOGY_CACHE_SIZE = 4
"""Topologies kept per process, keyed by the cluster, topology, PIM and tier settings they
are built from, so that a screening loop (or a sweep over layouts of one cluster) builds each
once; a topology is never modified after it is built, apart from its lazily routed table."""

_TOPOLOGIES: dict[str, Topology] = {}


def scenario_topology(sc) -> Topology:
    """The topology of scenario ``sc``, built once per distinct cluster settings
    (:data:`TOPOLOGY_CACHE_SIZE` kept, the oldest dropped first)."""
    parts = (sc.cluster, sc.topology, sc.pim, sc.tiers)
    key = "\n".join("null" if p is None else p.model_dump_json() for p in parts)
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
