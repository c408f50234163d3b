"""Two-batch overlap and multi-token prediction, timed by both engines."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moesim.config.errors import ScenarioError
from moesim.engine.analytic import AnalyticEngine
from moesim.engine.des import Engine
from moesim.plan.graph import COMPUTE_PHASES, build_graph
from moesim.plan.workload import build_plan
from moesim.results.collect import collect
from tests.conftest import small_scenario

ENGINES = [Engine, AnalyticEngine]
NO_LATENCY = {"bandwidth_bytes_per_s": 450e9, "latency_s": 0.0}


def _compute_bound(overlap: str, comm_sms: int = 0):
    """Decode on one NVLink node with zero latency: every all-to-all is shorter than the
    kernels of the other micro-batch."""
    return small_scenario(
        topology={"intra_node_link": NO_LATENCY},
        parallelism={
            "tp": 1,
            "ep": 8,
            "overlap": overlap,
            "micro_batches": 2,
            "comm_sms": comm_sms,
        },
    )


def _network_bound(overlap: str):
    """Prefill over a slow inter-node link (8 nodes of one GPU): all-to-alls dominate."""
    return small_scenario(
        cluster={"nodes": 8, "devices_per_node": 1, "device": "h100-sxm"},
        topology={"inter_node_link": {"bandwidth_bytes_per_s": 5e9, "latency_s": 0.0}},
        parallelism={"tp": 1, "ep": 8, "overlap": overlap, "micro_batches": 2, "comm_sms": 0},
        workload={"phase": "prefill", "batch_size": 16, "seq_len": 512},
        routing={"distribution": "uniform", "dispatch": "pairs"},
    )


def _even(plan):
    """The same work on every device: each kernel its mean, each all-to-all pair its mean
    bytes (so no device waits for a slower one and a closed form holds exactly)."""
    for lp in plan.layers:
        for seconds in lp.compute_s.values():
            seconds[:] = seconds.mean()
        if lp.dispatch is not None:
            nbytes = np.full_like(lp.dispatch.nbytes, lp.dispatch.nbytes.mean())
            lp.dispatch = replace(lp.dispatch, nbytes=nbytes)
    return plan


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_two_batch_overlap_hides_the_all_to_all_of_a_compute_bound_step(engine_cls):
    plan = build_plan(_compute_bound("two_batch"))
    engine = engine_cls(plan).run()
    busy = sum(engine.rec.phase_s[p] for p in COMPUTE_PHASES)
    compute = build_graph(plan).totals()["gpu_seconds"]
    np.testing.assert_allclose(busy, compute, rtol=1e-12)
    np.testing.assert_allclose(engine.rec.finish_s.max(), compute.max(), rtol=1e-9)
    # without overlap the same micro-batches wait for their all-to-alls
    alone = engine_cls(build_plan(_compute_bound("none"))).run().rec.finish_s.max()
    assert alone > compute.max() * (1 + 1e-4)
    summary = collect(engine).summary
    assert summary["exposed_comm_s"] == 0.0
    assert summary["overlapped_comm_s"] > 0.0


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_two_batch_overlap_saves_the_compute_it_can_cover_when_network_bound(engine_cls):
    """The all-to-alls run back to back; every kernel but the first micro-batch's before
    its first dispatch and the last one's after its last combine runs under them."""
    steps = {}
    for overlap in ("none", "two_batch"):
        plan = _even(build_plan(_network_bound(overlap)))
        steps[overlap] = engine_cls(plan).run().rec.finish_s.max()
    first, last = plan.layers[0], plan.layers[-1]
    cs = first.compute_s
    exposed = cs["attention"] + cs["router"] + cs["permute"]
    exposed = exposed + last.compute_s["unpermute"] + plan.lm_head_s
    per_micro_batch = sum(sum(lp.compute_s.values()) for lp in plan.layers) + plan.lm_head_s
    covered = float((2 * per_micro_batch - exposed)[0])
    np.testing.assert_allclose(steps["none"] - steps["two_batch"], covered, rtol=1e-9)


def test_communication_sms_slow_the_overlapped_kernels():
    """H100: 132 SMs; 20 held by communication leave 112: kernels take 132 / 112 longer."""
    free = build_graph(build_plan(_compute_bound("two_batch", 0))).totals()["gpu_seconds"]
    held = build_graph(build_plan(_compute_bound("two_batch", 20))).totals()["gpu_seconds"]
    np.testing.assert_allclose(held, free * 132 / 112, rtol=1e-12)


def _mtp(acceptance: float, k: int = 1):
    return small_scenario(
        workload={
            "phase": "decode",
            "batch_size": 64,
            "seq_len": 1024,
            "mtp": {"draft_tokens": k, "acceptance": acceptance},
        }
    )


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
@pytest.mark.parametrize("acceptance", [0.0, 1.0])
def test_mtp_tokens_per_step_follow_the_closed_form(engine_cls, acceptance):
    """k drafts with acceptance a: sum_{i=0..k} a^i tokens per sequence per step
    (a = 1: k + 1, a = 0: 1); TPOT is the step over that."""
    k = 2
    plan = build_plan(_mtp(acceptance, k))
    summary = collect(engine_cls(plan).run()).summary
    per_seq = k + 1 if acceptance == 1.0 else 1
    assert summary["tokens"] == 64 * per_seq
    np.testing.assert_allclose(summary["tokens_per_s"], 64 * per_seq / summary["step_time_s"])
    np.testing.assert_allclose(summary["tpot_s"], summary["step_time_s"] / per_seq)


def test_mtp_verifies_k_plus_one_tokens_and_drafts_k_times():
    """The verify pass routes (k + 1) tokens per sequence; the graph adds k draft passes of
    one layer and the LM head."""
    plain = build_plan(small_scenario())
    mtp = build_plan(_mtp(0.85, 2))
    assert mtp.layers[1].routed_pairs == 3 * plain.layers[1].routed_pairs
    assert len(mtp.draft) == 1
    nodes = len(build_graph(plain).nodes)
    per_layer = (nodes - 1) // 2  # two MoE layers and the LM head
    assert len(build_graph(mtp).nodes) - nodes == 2 * (per_layer + 1)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            {"parallelism": {"tp": 1, "ep": 8, "overlap": "two_batch", "micro_batches": 1}},
            "parallelism.micro_batches",
        ),
        ({"parallelism": {"tp": 1, "ep": 8, "micro_batches": 3}}, "parallelism.micro_batches"),
        (
            {"parallelism": {"tp": 1, "ep": 8, "overlap": "two_batch", "comm_sms": 132}},
            "parallelism.comm_sms",
        ),
        (
            {"workload": {"phase": "prefill", "batch_size": 8, "seq_len": 64, "mtp": {}}},
            "workload.mtp",
        ),
        (
            {
                "model": {"preset": "mixtral-8x7b", "n_layers": 4},
                "parallelism": {"tp": 1, "ep": 4, "pp": 2, "overlap": "two_batch"},
            },
            "parallelism.overlap",
        ),
    ],
)
def test_bad_overlap_fields_name_the_field(overrides, field):
    with pytest.raises(ScenarioError) as err:
        small_scenario(**overrides)
    assert err.value.path == field


def _per_node(batch: int, nodes: int = 4, **parallelism):
    """Prefill with an expert group over several nodes of 2 GPUs: DeepEP's per_node
    dispatch (network stage, then forwarding inside the node)."""
    return small_scenario(
        cluster={"nodes": nodes, "devices_per_node": 2, "device": "h100-sxm"},
        parallelism={"tp": 1, **parallelism},
        workload={"phase": "prefill", "batch_size": batch, "seq_len": 128},
        routing={"distribution": "uniform", "dispatch": "per_node"},
    )


@pytest.mark.parametrize(
    ("parallelism", "nodes"),
    [({"ep": 8, "overlap": "two_batch"}, 4), ({"ep": 4, "pp": 2, "micro_batches": 2}, 2)],
    ids=["two_batch", "pipeline"],
)
def test_per_node_dispatch_in_micro_batches_moves_the_plain_bytes(parallelism, nodes):
    """Overlapped micro-batches and pipeline stages keep the two-stage per_node dispatch:
    each micro-batch's layer moves what the same layer moves in a plain per_node step of one
    micro-batch on one stage's devices, network stage and forwarding stage alike."""
    staged = build_plan(_per_node(32, **parallelism))
    plain = build_plan(_per_node(16, nodes=nodes, ep=parallelism["ep"]))
    layers = {i: lp for stage in staged.pipeline.layers for i, lp in stage.items()}
    for lp in plain.layers:
        got = layers[lp.index]
        assert got.dispatch_forward is not None and lp.dispatch_forward is not None
        for a, b in zip(got.dispatch_stages, lp.dispatch_stages, strict=True):
            assert a.total_bytes == pytest.approx(b.total_bytes, rel=1e-12)
    micro = staged.pipeline.micro_batches
    runs = [collect(engine(staged).run()).summary for engine in ENGINES]
    expected = micro * collect(AnalyticEngine(plain).run()).summary["all_to_all_bytes"]
    for s in runs:
        assert s["all_to_all_bytes"] == pytest.approx(expected, rel=1e-12)
    assert runs[0]["step_time_s"] == pytest.approx(runs[1]["step_time_s"], rel=0.05)
    if "overlap" in parallelism:  # no stage-to-stage sends: the links carry the same bytes
        carried = [
            collect(Engine(plan).run()).links["bytes_carried"].sum() for plan in (staged, plain)
        ]
        assert carried[0] == pytest.approx(micro * carried[1], rel=1e-9)
