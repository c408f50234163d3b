"""Expected-count routing (``routing.sampling: expected``) against closed forms and the mean
of many draws; exact top-k inclusion probabilities against hand enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moesim import scenario_from_dict
from moesim.config.scenario import RoutingConfig
from moesim.routing.distributions import (
    _gumbel_topk_counts,
    calibrated_inclusion,
    expected_max_normal,
    normal_cdf,
    route_layer,
    topk_inclusion,
)
from moesim.routing.sampling import sampling_mode


def _enumerated_inclusion(p: np.ndarray, k: int) -> np.ndarray:
    """P(e in top k) of sequential sampling without replacement, every ordered k-tuple."""
    pi = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for e in seq:
            prob *= p[e] / left
            left -= p[e]
        pi[list(seq)] += prob
    return pi


@pytest.mark.parametrize(("n", "k", "s"), [(8, 1, 1.0), (8, 2, 1.2), (8, 6, 1.5), (10, 4, 2.0)])
def test_inclusion_quadrature_matches_enumeration(n, k, s):
    p = np.arange(1, n + 1.0) ** -s
    p /= p.sum()
    pi = topk_inclusion(np.random.default_rng(0).permutation(p), k)
    exact = _enumerated_inclusion(np.random.default_rng(0).permutation(p), k)
    assert pi.sum() == pytest.approx(k, rel=1e-6)
    np.testing.assert_allclose(pi, exact, rtol=1e-5)


def test_inclusion_quadrature_matches_gumbel_sampling_on_256_experts():
    rng = np.random.default_rng(1)
    p = np.arange(1, 257.0) ** -1.0 * np.exp(rng.normal(0, 0.5, 256))
    p /= p.sum()
    n = 200_000
    freq = _gumbel_topk_counts(np.array([n]), np.log(p), 8, rng)[0] / n
    pi = topk_inclusion(p, 8)
    z = np.abs(freq - pi) / np.sqrt(pi * (1 - pi) / n)
    assert z.max() < 5.0  # 256 independent-ish z scores: the largest is about 3


def test_uniform_inclusion_is_k_over_e_and_zero_preference_is_never_chosen():
    np.testing.assert_array_equal(topk_inclusion(np.full(16, 1 / 16), 4), np.full(16, 0.25))
    pi = topk_inclusion(np.array([0.5, 0.3, 0.2, 0.0]), 2)
    assert pi[3] == 0.0 and pi.sum() == pytest.approx(2.0)


def test_normal_cdf_and_expected_max_closed_forms():
    assert normal_cdf(np.array([0.0]))[0] == pytest.approx(0.5, abs=1e-7)
    assert normal_cdf(np.array([1.959963985]))[0] == pytest.approx(0.975, abs=2e-7)
    # two iid N(mu, s^2): E[max] = mu + s / sqrt(pi)
    got = expected_max_normal(np.array([10.0, 10.0]), np.array([4.0, 4.0]))
    assert got == pytest.approx(10.0 + 2.0 / math.sqrt(math.pi), rel=1e-4)
    # one dominant expert: the maximum is its mean
    assert expected_max_normal(np.array([100.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(
        100.0, rel=1e-6
    )


def _route(cfg, probs, tokens, groups, k, seed, sampling):
    n_groups = int(groups.max()) + 1
    return route_layer(
        cfg,
        probs,
        k,
        64,
        tokens,
        groups,
        n_groups,
        None,
        0,
        np.random.default_rng(seed),
        sampling=sampling,
    )


@pytest.mark.parametrize("distribution", ["uniform", "zipf"])
def test_expected_loads_match_the_mean_of_many_draws(distribution):
    """Per-expert loads within 4.5 standard errors of the mean of 400 draws (the error of a
    mean of N Binomial(T, pi) loads is sqrt(T pi (1 - pi) / N)), the expected maximum over
    experts within 3% of the mean of the drawn maxima."""
    n_exp, k, draws = 8, 2, 400
    probs = np.arange(1, n_exp + 1.0) ** (-0.7 if distribution == "zipf" else 0.0)
    probs /= probs.sum()
    tokens = np.array([64, 64, 64, 64])
    groups = np.zeros(4, dtype=np.int64)
    cfg = RoutingConfig()
    exp = _route(cfg, probs, tokens, groups, k, 0, "expected")
    loads = np.array(
        [_route(cfg, probs, tokens, groups, k, s, "draw").kept.sum(axis=0) for s in range(draws)]
    )
    t = tokens.sum()
    pi = topk_inclusion(probs, k)
    expected_loads = exp.kept.sum(axis=0)
    hot = int(np.argmax(expected_loads))
    se = np.sqrt(t * pi * (1 - pi) / draws)
    others = np.arange(n_exp) != hot
    # the others carry their mean, scaled down by the hot expert's excess (a few pairs)
    assert np.all(np.abs(loads.mean(axis=0) - t * pi)[others] < 4.5 * se[others])
    assert np.all(np.abs(expected_loads - t * pi)[others] <= 0.05 * t * pi[others] + 1)
    assert expected_loads.max() == pytest.approx(loads.max(axis=1).mean(), rel=0.03)
    # conservation: every source sends T_s k pairs; nothing dropped without a capacity
    np.testing.assert_array_equal(exp.kept.sum(axis=1), tokens * k)
    assert exp.routed_pairs == t * k and exp.dropped.sum() == 0


def test_expected_counts_conserve_pairs_with_capacity_drops_and_groups():
    probs = np.arange(1, 17.0) ** -1.0
    probs /= probs.sum()
    tokens = np.array([37, 38, 37, 38, 50, 51])
    groups = np.array([0, 0, 0, 0, 1, 1])
    cfg = RoutingConfig(capacity_factor=1.0)
    r = _route(cfg, probs, tokens, groups, 4, 0, "expected")
    assert r.kept.sum() + r.dropped.sum() == tokens.sum() * 4
    assert r.kept.dtype.kind == "i" and r.kept.min() >= 0
    for g in (0, 1):
        t = tokens[groups == g].sum()
        cap = math.ceil(1.0 * t * 4 / 16)
        assert r.kept[groups == g].sum(axis=0).max() <= cap
    # no randomness: any seed gives the same counts
    again = _route(cfg, probs, tokens, groups, 4, 99, "expected")
    np.testing.assert_array_equal(r.kept, again.kept)


def test_expected_bias_balancing_is_deterministic_and_evens_the_expected_loads():
    probs = np.arange(1, 33.0) ** -1.0
    probs /= probs.sum()
    cfg = RoutingConfig(bias_balancing={"steps": 100, "rate": 0.05})
    tokens, groups = np.array([256]), np.array([0])
    a = _route(cfg, probs, tokens, groups, 4, 1, "expected")
    b = _route(cfg, probs, tokens, groups, 4, 2, "expected")
    np.testing.assert_array_equal(a.kept, b.kept)
    np.testing.assert_array_equal(a.balance_history, b.balance_history)
    assert a.balance_history[-1] < 0.5 * a.balance_history[0]
    drawn = _route(cfg, probs, tokens, groups, 4, 1, "draw")
    assert drawn.balance_history[-1] < 0.6 * drawn.balance_history[0]


def _scenario(**overrides):
    base = {
        "name": "t",
        "model": "mixtral-8x7b",
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"tp": 1, "ep": 8},
        "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
    }
    for key, value in overrides.items():
        base.setdefault(key, {}).update(value)
    return scenario_from_dict(base)


def test_sampling_defaults_follow_the_fidelity_and_an_explicit_choice_wins():
    assert sampling_mode(_scenario()) == "draw"
    assert sampling_mode(_scenario(sim={"fidelity": "analytic"})) == "expected"
    assert sampling_mode(_scenario(sim={"fidelity": "analytic"}, routing={"sampling": "draw"})) == (
        "draw"
    )
    assert sampling_mode(_scenario(routing={"sampling": "expected"})) == "expected"


def test_calibrated_inclusion_is_exact_at_its_solve_and_close_after_a_bias_step():
    rng = np.random.default_rng(5)
    p0 = np.arange(1, 129.0) ** -0.8
    p0 /= p0.sum()
    pi0 = topk_inclusion(p0, 8)
    theta = -np.log1p(-pi0) / p0
    np.testing.assert_allclose(calibrated_inclusion(p0, theta, 8), pi0, rtol=1e-9)
    # eight bias steps of rate 0.02 move log preferences by at most 0.16
    p = p0 * np.exp(rng.uniform(-0.16, 0.16, 128))
    p /= p.sum()
    got = calibrated_inclusion(p, theta, 8)
    assert got.sum() == pytest.approx(8.0, rel=1e-9)
    np.testing.assert_allclose(got, topk_inclusion(p, 8), rtol=5e-3)


@pytest.mark.parametrize("zipf_s", [0.0, 0.6, 1.2])
def test_small_batches_keep_the_expected_active_experts_and_maximum(zipf_s):
    """16 tokens over 32 experts: most experts get 0 or 1 pair, so the cost depends on how many
    get any (weights read) and on the hottest; both within one of the mean of 1,000 draws."""
    probs = np.arange(1, 33.0) ** -zipf_s
    probs /= probs.sum()
    tokens, groups = np.full(8, 2), np.zeros(8, dtype=np.int64)
    cfg = RoutingConfig()
    exp = _route(cfg, probs, tokens, groups, 2, 0, "expected").kept.sum(axis=0)
    drawn = np.array(
        [_route(cfg, probs, tokens, groups, 2, s, "draw").kept.sum(axis=0) for s in range(1000)]
    )
    pi = topk_inclusion(probs, 2)
    active = np.sum(1 - (1 - pi) ** 16)  # Binomial(16, pi_e) marginals
    assert (drawn > 0).sum(axis=1).mean() == pytest.approx(active, abs=0.5)
    assert abs((exp > 0).sum() - active) <= 1.0
    assert abs(exp.max() - drawn.max(axis=1).mean()) <= 1.0
    assert exp.sum() == 32
