"""Routing: sampling statistics, capacity drops, skew, determinism, summary consistency."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim import simulate
from moesim.plan.workload import build_plan
from moesim.routing.distributions import (
    expert_probabilities,
    max_over_mean,
    position_capacity,
    sample_topk_counts,
)


def test_topk_counts_conserve_tokens_and_pick_distinct_experts():
    rng = np.random.default_rng(0)
    tokens = np.array([100, 37, 0, 5])
    counts = sample_topk_counts(tokens, np.full(8, 1 / 8), 2, rng)
    np.testing.assert_array_equal(counts.sum(axis=1), tokens * 2)
    # distinct experts per token: no expert can receive more than one pair per token
    assert (counts <= tokens[:, None]).all()


def test_aggregate_sampling_matches_exact_per_token_sampling():
    from moesim.routing.distributions import _gumbel_topk_counts

    rng = np.random.default_rng(0)
    probs = expert_probabilities(16, "zipf", 1.0, rng, shuffle=True)
    big = np.array([2_000_000])  # above the exact-sampling threshold
    counts = sample_topk_counts(big, probs, 2, rng)[0]
    exact = _gumbel_topk_counts(np.array([400_000]), np.log(probs), 2, rng)[0]
    np.testing.assert_allclose(counts / counts.sum(), exact / exact.sum(), atol=2e-3)


def test_standard_gumbel_is_numpys_gumbel_on_the_same_stream():
    """Same stream (one double a draw: the generators end in the same state), values within
    a few ulp of ``rng.gumbel``, and the Gumbel law: mean = Euler's gamma, var = pi^2 / 6."""
    from moesim.routing.distributions import standard_gumbel

    a, b = np.random.default_rng(7), np.random.default_rng(7)
    ours, numpys = standard_gumbel(a, (2000, 64)), b.gumbel(size=(2000, 64))
    np.testing.assert_allclose(ours, numpys, rtol=0, atol=8 * np.finfo(float).eps * 40)
    assert a.random() == b.random()
    assert abs(ours.mean() - np.euler_gamma) < 5 * np.pi / np.sqrt(6 * ours.size)
    assert abs(ours.var() / (np.pi**2 / 6) - 1) < 0.02
    assert np.isfinite(standard_gumbel(np.random.default_rng(0), (0,))).all()


def test_capacity_drops_and_keeps_capacity():
    counts = np.array([[10, 0, 2, 0], [6, 2, 0, 0]])  # group load: 16, 2, 2, 0 -> 20 pairs
    kept, dropped = position_capacity(counts, np.array([0, 0]), 1, capacity_factor=1.0)
    capacity = 5  # ceil(1.0 * 20 / 4)
    assert kept.sum(axis=0).tolist() == [capacity, 2, 2, 0]
    assert kept[:, 0].tolist() == [5, 0]  # position order: the first source fills it
    assert dropped.sum() == 16 - capacity
    assert kept.sum() + dropped.sum() == counts.sum()
    # no drops once capacity covers every pair
    kept, dropped = position_capacity(counts, np.array([0, 0]), 1, capacity_factor=4.0)
    assert dropped.sum() == 0 and (kept == counts).all()


def test_drop_rate_falls_as_capacity_grows(small):
    rates = []
    for cf in (0.8, 1.0, 1.25, 2.0, 8.0):
        plan = build_plan(
            small(
                **{
                    "routing.capacity_factor": cf,
                    "routing.distribution": "zipf",
                    "routing.zipf_s": 1.0,
                }
            )
        )
        moe = [lp for lp in plan.layers if lp.moe]
        rates.append(sum(lp.dropped_pairs for lp in moe) / sum(lp.routed_pairs for lp in moe))
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert rates[0] > 0 and rates[-1] == 0


def test_zipf_is_slower_than_uniform_and_summary_imbalance_matches_counts(small):
    uniform = simulate(small(**{"workload.batch_size": 256}))
    skewed = simulate(
        small(**{"workload.batch_size": 256, "routing.distribution": "zipf", "routing.zipf_s": 1.5})
    )
    assert skewed.step_time_s > uniform.step_time_s
    assert uniform.summary["tokens"] == skewed.summary["tokens"]
    plan = build_plan(
        small(**{"workload.batch_size": 256, "routing.distribution": "zipf", "routing.zipf_s": 1.5})
    )
    direct = np.mean(
        [
            lp.expert_load.sum(axis=0).max() / lp.expert_load.sum(axis=0).mean()
            for lp in plan.layers
            if lp.moe
        ]
    )
    assert skewed.summary["routing"]["max_over_mean_load"] == pytest.approx(direct)
    assert skewed.summary["routing"]["max_over_mean_load"] > 1.5


def test_same_seed_same_assignment_different_seed_different(small):
    a = build_plan(small(**{"sim.seed": 7}))
    b = build_plan(small(**{"sim.seed": 7}))
    c = build_plan(small(**{"sim.seed": 8}))
    la, lb, lc = (np.stack([lp.expert_load for lp in p.layers]) for p in (a, b, c))
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(la, lc)


def test_max_over_mean():
    assert max_over_mean(np.array([1, 1, 1, 1])) == 1.0
    assert max_over_mean(np.array([4, 0, 0, 0])) == 4.0
    assert max_over_mean(np.zeros(3)) == 1.0


def test_replicate_hot_counts_and_proportional_like_eplb():
    from moesim.routing.placement import replicate_hot, share_matrix

    load = np.array([8.0, 4.0, 2.0, 2.0])
    one_hot = share_matrix(np.arange(4), 4)
    # two more replicas of the hottest expert: three copies, a third of its load on each
    two = replicate_hot(one_hot, load, 1, replicas=2)
    assert (two[0] > 0).sum() == 3 and np.allclose(two[0][two[0] > 0], 1 / 3)
    assert np.allclose(two.sum(axis=1), 1.0) and np.array_equal(two[1:], one_hot[1:])
    # proportional, three extra replicas: load per copy 8, 4, 4 (tie: lower id), 8/3 < 4
    prop = replicate_hot(one_hot, load, 3, replicas="proportional")
    assert list((prop > 0).sum(axis=1)) == [3, 2, 1, 1]
    assert np.allclose(prop.sum(axis=1), 1.0)
    # expected tokens are conserved by any placement
    assert (load @ prop).sum() == pytest.approx(load.sum())
    # never more copies than ranks
    assert ((replicate_hot(one_hot, load, 20, "proportional") > 0).sum(axis=1) <= 4).all()
