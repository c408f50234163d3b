"""What both engines start from: the plan's topology (built from the scenario unless given)
and its step graph (built from the plan unless given)."""

from __future__ import annotations

from moesim.network import Topology, build_topology
from moesim.plan.graph import StepGraph, build_graph
from moesim.plan.types import WorkloadPlan


def step_inputs(
    plan: WorkloadPlan, topology: Topology | None = None, graph: StepGraph | None = None
) -> tuple[Topology, StepGraph]:
    """``(topology, graph)`` of one step of ``plan``."""
    sc = plan.scenario
    topology = topology or build_topology(sc.cluster, sc.topology, sc.pim, sc.tiers)
    return topology, graph or build_graph(plan, topology.tables)
