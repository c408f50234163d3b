"""Dispatch modes: what an all-to-all sends per (token, expert), (token, rank), (token, node)."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from moesim.config.scenario import scenario_from_dict
from moesim.plan.dispatch import dispatch_mode, distinct_tokens
from moesim.plan.workload import build_plan
from moesim.routing.distributions import LayerRouting


def _deepseek(dispatch: str, node_limit: int | None, phase: str = "prefill"):
    routing = {"distribution": "uniform", "dispatch": dispatch}
    if node_limit:
        routing["node_limit"] = node_limit
    workload = {"phase": phase, "batch_size": 64, "seq_len": 8 if phase == "prefill" else 512}
    return scenario_from_dict(
        {
            "model": {"preset": "deepseek-v3", "n_layers": 4},
            "cluster": {"nodes": 8, "devices_per_node": 8, "device": "h800"},
            "parallelism": {"ep": 64},
            "workload": workload,
            "routing": routing,
            "sim": {"progress": False, "trace": False},
        }
    )


def _cross_node_bytes(plan) -> float:
    n = plan.scenario.cluster.devices_per_node
    total = 0.0
    for lp in plan.layers:
        if lp.moe:
            t = lp.dispatch
            total += float(t.nbytes[t.src // n != t.dst // n].sum())
    return total


def test_node_limit_cuts_inter_node_bytes_per_node_but_not_per_pair():
    """DeepSeek-V3 top-8 of 256 on EP 64 over 8 nodes: with ``node_limit: 4`` a token reaches
    at most 4 nodes, so per_node's network bytes are at most 4 rows a token, against
    ``7 (1 - C(224, 8) / C(256, 8))`` = 4.6 remote nodes a token without the limit (uniform
    routing); per pair the limit moves few bytes off the network."""
    row = 7168 * 2  # d_model x bf16
    limited = build_plan(_deepseek("per_node", 4))
    free = build_plan(_deepseek("per_node", None))
    tokens = 64 * 8
    # expected remote nodes per token without a limit: 7 x P(node touched), uniform top-8
    p_touch = 1 - comb(256 - 32, 8) / comb(256, 8)
    assert _cross_node_bytes(free) == pytest.approx(tokens * 7 * p_touch * row, rel=0.05)
    assert _cross_node_bytes(limited) <= tokens * 4 * row
    assert _cross_node_bytes(limited) < 0.85 * _cross_node_bytes(free)
    pairs_limited = _cross_node_bytes(build_plan(_deepseek("pairs", 4)))
    pairs_free = _cross_node_bytes(build_plan(_deepseek("pairs", None)))
    assert pairs_limited > 0.5 * pairs_free  # pairs still cross per expert
    assert _cross_node_bytes(limited) < 0.5 * pairs_limited


def test_per_rank_and_per_node_send_fewer_bytes_than_pairs():
    plans = {m: build_plan(_deepseek(m, None)) for m in ("pairs", "per_rank", "per_node")}
    net = {m: _cross_node_bytes(p) for m, p in plans.items()}
    assert net["per_node"] < net["per_rank"] <= net["pairs"]
    lp = next(lp for lp in plans["per_node"].layers if lp.moe)
    assert lp.dispatch_forward is not None  # the NVLink stage inside each node
    n = 8
    fwd = lp.dispatch_forward
    assert np.all(fwd.src // n == fwd.dst // n)


def test_expected_distinct_tokens_match_the_closed_form():
    """On aggregate counts, distinct tokens per rank follow ``T (1 - C(E-m, k) / C(E, k))``
    (uniform top-k); the per-token count of a large draw agrees within sampling noise."""
    rng = np.random.default_rng(0)
    n_experts, k, ranks, tokens = 32, 4, 8, 20000
    experts = np.argsort(rng.random((tokens, n_experts)), axis=1)[:, :k]
    kept = np.bincount(experts.ravel(), minlength=n_experts)[None, :]
    rank_of = (np.arange(n_experts) // (n_experts // ranks))[None, :]
    group = np.zeros(1, dtype=np.int64)
    probs = np.full(n_experts, 1 / n_experts)
    aggregate = LayerRouting(kept, np.zeros((1, n_experts)), tokens * k, probs)
    exact = LayerRouting(
        kept, np.zeros((1, n_experts)), tokens * k, probs, token_source=[np.zeros(tokens, int)],
        token_experts=[experts],
    )  # fmt: skip
    m = n_experts // ranks
    closed = tokens * (1 - comb(n_experts - m, k) / comb(n_experts, k))
    est = distinct_tokens(aggregate, rank_of, group, ranks, k)[0]
    drawn = distinct_tokens(exact, rank_of, group, ranks, k)[0]
    # the estimate scales each rank's drawn pairs, so it follows their noise like the draw
    np.testing.assert_allclose(est, drawn, rtol=0.02)
    np.testing.assert_allclose(drawn, closed, rtol=0.03)
    assert est.mean() == pytest.approx(closed, rel=0.003)


def test_auto_picks_the_kernel_a_deployment_would_use():
    assert dispatch_mode(_deepseek("auto", None, "decode")) == "pairs"
    assert dispatch_mode(_deepseek("auto", None, "prefill")) == "per_node"
    one_node = _deepseek("auto", None).model_copy(
        update={"parallelism": _deepseek("auto", None).parallelism.model_copy(update={"ep": 8})}
    )
    assert dispatch_mode(one_node) == "per_rank"


def test_fp8_dispatch_and_bf16_combine_move_one_and_two_bytes_a_value():
    sc = _deepseek("per_node", None).model_copy()
    data = sc.model_dump(mode="json")
    data["workload"]["dtypes"] = {"dispatch": "fp8", "combine": "bf16"}
    plan = build_plan(scenario_from_dict(data))
    lp = next(lp for lp in plan.layers if lp.moe)
    fwd = sum(t.total_bytes for t in lp.dispatch_stages)
    back = sum(t.total_bytes for t in lp.combine_stages())
    assert back == pytest.approx(2.0 * fwd, rel=1e-12)
    assert lp.all_to_all_bytes == pytest.approx(3.0 * fwd, rel=1e-12)
    bf16 = next(x for x in build_plan(_deepseek("per_node", None)).layers if x.moe)
    assert fwd == pytest.approx(0.5 * sum(t.total_bytes for t in bf16.dispatch_stages), rel=1e-12)


def _legs_graph(plan, legs, streamed: bool):
    from moesim.plan.graph import StepGraph, _all_to_all

    graph = StepGraph(plan.n_devices, streamed_stages=streamed)
    _all_to_all(graph, "dispatch", legs, 0)
    return graph


@pytest.mark.parametrize("engine", ["des", "analytic"])
def test_streamed_per_node_costs_the_slower_leg_and_sequential_the_sum(engine):
    """per_node's network leg (GPU -> NIC -> switch -> NIC -> GPU) and its forwarding leg
    (NVLink) use disjoint links, so streamed as one kernel they take the slower leg's time,
    ``max(T_net, T_fwd)``, and one after the other (a uniform router: every device's part
    arrives together) ``T_net + T_fwd``; each leg timed alone on the same engine."""
    from moesim.engine.analytic import AnalyticEngine
    from moesim.engine.des import Engine

    cls = Engine if engine == "des" else AnalyticEngine
    plan = build_plan(_deepseek("per_node", None))
    lp = next(lp for lp in plan.layers if lp.moe)
    net, fwd = lp.dispatch_stages

    def step_s(legs, streamed):
        return float(cls(plan, graph=_legs_graph(plan, legs, streamed)).run().rec.finish_s.max())

    t_net, t_fwd = step_s([net], False), step_s([fwd], False)
    assert t_net > 0 and t_fwd > 0
    assert step_s([net, fwd], True) == pytest.approx(max(t_net, t_fwd), rel=0.02)
    assert step_s([net, fwd], False) == pytest.approx(t_net + t_fwd, rel=0.05)


def test_streamed_is_the_default_and_beats_pairs_where_it_cuts_network_bytes():
    """With its legs streamed, per_node's fewer network bytes make the step faster than
    pairs on DeepSeek-V3 EP 64 over 8 nodes (uniform router, prefill)."""
    from moesim.studies.simulate import simulate

    assert _deepseek("per_node", None).routing.per_node_stages == "streamed"
    step = {}
    for mode in ("pairs", "per_node"):
        data = _deepseek(mode, None).model_dump(mode="json")
        data["sim"]["fidelity"] = "analytic"
        data["workload"]["seq_len"] = 512
        step[mode] = simulate(scenario_from_dict(data)).summary["breakdown_s"]["dispatch"]
    assert step["per_node"] < step["pairs"]


def test_column_sums_add_in_the_order_of_np_add_at():
    """The per-column pair sums of the aggregate dispatch equal ``np.add.at`` bit for bit,
    columns with no expert included."""
    from moesim.plan.dispatch import _column_sums

    rng = np.random.default_rng(3)
    for _ in range(200):
        n, rows, cols_n = rng.integers(0, 40), rng.integers(1, 6), rng.integers(1, 10)
        values = rng.random((rows, n)) * rng.integers(1, 1000)
        cols = rng.integers(0, cols_n, n)
        for v in (values, (values * 1e6).astype(np.int64)):  # floats, and token counts
            ref = np.zeros((rows, cols_n))
            np.add.at(ref.T, cols, v.T.astype(float))
            got = _column_sums(v, cols, cols_n)
            assert got.dtype == float and np.array_equal(got, ref)


@pytest.mark.parametrize("uniform", [True, False])
def test_cached_distinct_tokens_equal_uncached_over_layers(uniform):
    """The per-plan cache of :func:`distinct_tokens` (ratios kept per preferences and
    columns) gives what a fresh computation gives, layer after layer, with other counts,
    other columns and other preferences."""
    rng = np.random.default_rng(1)
    n_experts, k, ranks, n_src = 32, 4, 8, 12
    group = np.repeat(np.arange(3), 4)
    cache: dict = {}
    for layer in range(6):
        probs = np.full(n_experts, 1 / n_experts) if uniform else rng.dirichlet(np.ones(n_experts))
        probs = probs if layer % 2 else np.full(n_experts, 1 / n_experts)
        kept = rng.integers(0, 50, (n_src, n_experts))
        routing = LayerRouting(kept, np.zeros((3, n_experts)), int(kept.sum()), probs)
        rank_of = rng.permutation(np.arange(n_experts) % ranks)[None, :].repeat(3, axis=0)
        rank_of = rank_of if layer < 3 else np.sort(rank_of, axis=1)
        fresh = distinct_tokens(routing, rank_of, group, ranks, k)
        cached = distinct_tokens(routing, rank_of, group, ranks, k, cache)
        again = distinct_tokens(routing, rank_of, group, ranks, k, cache)
        assert fresh.dtype == cached.dtype
        np.testing.assert_array_equal(fresh, cached)
        np.testing.assert_array_equal(fresh, again)
    assert cache
