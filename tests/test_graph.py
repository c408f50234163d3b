"""The step graph: both engines walk the same graph, and collectives keep their semantics."""

from __future__ import annotations

import numpy as np
import pytest

from moesim import catalog
from moesim.engine.analytic import AnalyticEngine
from moesim.engine.des import Engine
from moesim.plan.collectives import ring_allreduce
from moesim.plan.graph import COMPUTE_PHASES, StepGraph
from moesim.plan.workload import build_plan
from tests.conftest import small_scenario

ENGINES = [Engine, AnalyticEngine]
LATE_S = 1e-3


def _tp4():
    sc = small_scenario(
        cluster={"nodes": 1, "devices_per_node": 4, "device": "h100-sxm"},
        parallelism={"tp": 4, "ep": 4},
        workload={"phase": "decode", "batch_size": 4, "seq_len": 128},
    )
    return build_plan(sc)


def _late_ring(plan, late_s: float, explicit: bool = False) -> StepGraph:
    """Rank 0 computes ``late_s`` before a tp-4 ring all-reduce of 64 MB; ranks 1-3 none."""
    graph = StepGraph(plan.n_devices, explicit_rings=explicit)
    graph.compute("attention", np.array([late_s, 0.0, 0.0, 0.0]), 0)
    graph.collective("tp_comm", ring_allreduce(np.arange(4)[None, :], 64e6), 0)
    return graph


@pytest.mark.parametrize("explicit", [False, True], ids=["aggregated", "explicit-steps"])
@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_a_late_rank_holds_up_every_member_of_its_ring(engine_cls, explicit):
    """Every rank finishes at or after the late rank's start plus the all-reduce time: as
    one barrier-synchronised flow set, and as 6 explicit steps each waiting its receive."""
    plan = _tp4()
    alone = engine_cls(plan, graph=_late_ring(plan, 0.0, explicit)).run().rec.finish_s
    allreduce_s = float(alone.min())
    # the ring alone: 2 (n-1)/n x 64 MB at one NVLink direction as transfers reach it, plus
    # 6 messages (hop latency and per-message overhead each) and one kernel launch
    link = catalog.link("nvlink4")
    alpha = link.latency_s + link.message_overhead_s
    launch = catalog.device("h100-sxm").collective_launch_s
    expect = 2 * 3 / 4 * 64e6 / link.effective_bandwidth_bytes_per_s + 6 * alpha + launch
    assert allreduce_s == pytest.approx(expect, rel=0.05)
    finish = engine_cls(plan, graph=_late_ring(plan, LATE_S, explicit)).run().rec.finish_s
    assert np.all(finish >= LATE_S + allreduce_s * (1 - 1e-6)), finish
    if not explicit:  # behind the barrier the ring starts when the late rank joins
        np.testing.assert_allclose(finish, LATE_S + allreduce_s, rtol=1e-6)


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_explicit_ring_steps_equal_the_aggregated_ring_when_members_start_together(engine_cls):
    plan = _tp4()
    agg = engine_cls(plan, graph=_late_ring(plan, 0.0)).run().rec.finish_s
    steps = engine_cls(plan, graph=_late_ring(plan, 0.0, True)).run().rec.finish_s
    np.testing.assert_allclose(steps, agg, rtol=1e-9)


@pytest.mark.parametrize("phase", ["decode", "train"])
def test_both_engines_walk_the_same_graph(phase):
    """Same node count, the same bytes on the links for every collective, the same compute
    seconds per device as the graph asks (and so the same FLOPs: the plan's)."""
    workload = {"phase": phase, "batch_size": 64, "seq_len": 256}
    if phase == "train":
        workload["train"] = {"micro_batches": 2, "overlap": "chunked", "chunks": 2}
    sc = small_scenario(parallelism={"tp": 2, "ep": 4}, workload=workload)
    plan = build_plan(sc)
    des, ana = Engine(plan).run(), AnalyticEngine(plan).run()
    assert len(des.graph.nodes) == len(ana.graph.nodes)
    totals = des.graph.totals()
    assert totals["nodes"] == ana.graph.totals()["nodes"]
    np.testing.assert_allclose(
        ana.graph.totals()["collective_bytes"], totals["collective_bytes"], rtol=0
    )
    for engine in (des, ana):
        busy = sum(engine.rec.phase_s[p] for p in COMPUTE_PHASES)
        np.testing.assert_allclose(busy, totals["gpu_seconds"], rtol=1e-12)
    np.testing.assert_allclose(
        des.link_stats.bytes_carried, ana.link_stats.bytes_carried, rtol=1e-9
    )
    assert des.link_stats.bytes_carried.sum() > 0


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_a_node_on_some_devices_leaves_the_others_alone(engine_cls):
    """Devices outside a node's ``devices`` skip it: two halves run different kernels."""
    plan = _tp4()
    graph = StepGraph(plan.n_devices)
    left = np.array([True, True, False, False])
    graph.compute("attention", 2e-3, 0, devices=left)
    graph.compute("experts", 1e-3, 0, devices=~left)
    graph.compute("lm_head", 1e-3, 0)
    finish = engine_cls(plan, graph=graph).run().rec.finish_s
    np.testing.assert_allclose(finish, [3e-3, 3e-3, 2e-3, 2e-3], rtol=1e-12)
