"""Token-to-expert routing: expert popularity models, top-k sampling, capacity and drops.

Everything here is vectorised numpy over (source device, expert) count matrices: the engine never
sees individual tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from moesim.config.tables import read_routing_trace
from moesim.routing import gating
from moesim.routing.placement import split_integer

EXACT_SAMPLING_MAX_ELEMENTS = 1 << 20
"""Above this many (token, expert) scores per layer, top-k counts are sampled in aggregate."""


def expert_probabilities(
    n_experts: int, distribution: str, zipf_s: float, rng: np.random.Generator, shuffle: bool
) -> np.ndarray:
    """Router preference per expert: uniform, or Zipf ``p(rank r) ~ r**-s`` (ranks from 1).

    With ``shuffle`` the hot ranks land on a random permutation of expert ids (per layer).
    """
    if distribution == "uniform" or zipf_s == 0:
        return np.full(n_experts, 1.0 / n_experts)
    weights = np.arange(1, n_experts + 1, dtype=float) ** -zipf_s
    probs = weights / weights.sum()
    return rng.permutation(probs) if shuffle else probs


def standard_gumbel(rng: np.random.Generator, size: tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel draws, ``-log(-log(1 - U))`` with ``U = rng.random(size)``: the
    transform and the stream of ``rng.gumbel(size=size)`` (numpy's ``random_gumbel``, one
    double per draw), with numpy's vectorised ``log`` in place of one libm call per draw
    (5x faster; values within a few ulp of numpy's). ``-log(1 - U)`` is floored at the
    least normal double so that ``U = 0`` (``rng.gumbel`` redraws it; probability 2^-53)
    gives a large finite draw rather than ``+inf``."""
    e = rng.random(size)
    np.subtract(1.0, e, out=e)
    np.log(e, out=e)
    np.negative(e, out=e)
    np.maximum(e, np.finfo(float).tiny, out=e)
    np.log(e, out=e)
    return np.negative(e, out=e)


def _gumbel_topk_counts(
    tokens_per_source: np.ndarray, log_p: np.ndarray, top_k: int, rng: np.random.Generator
) -> np.ndarray:
    """Exact: each token draws ``top_k`` distinct experts (Gumbel-top-k = Plackett-Luce)."""
    n_src, n_exp = len(tokens_per_source), len(log_p)
    counts = np.zeros((n_src, n_exp), dtype=np.int64)
    chunk = max(1, (1 << 20) // n_exp)
    for s, n_tok in enumerate(tokens_per_source):
        for start in range(0, int(n_tok), chunk):
            m = min(chunk, int(n_tok) - start)
            scores = log_p + standard_gumbel(rng, (m, n_exp))
            chosen = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
            counts[s] += np.bincount(chosen.ravel(), minlength=n_exp)
    return counts


def inclusion_probabilities(probs: np.ndarray, top_k: int) -> np.ndarray:
    """P(expert e is among a token's top-k draws): exactly ``k/E`` for uniform preferences,
    otherwise estimated by Monte Carlo with about 2^22 scores (a fixed seed, so results do
    not depend on the caller's stream), computed once per distinct set of values."""
    if np.allclose(probs, probs[0]):
        return np.full(len(probs), top_k / len(probs))
    order = np.argsort(-probs, kind="stable")
    pi_sorted = _inclusion_sorted(tuple(np.round(probs[order], 12)), top_k)
    pi = np.empty(len(probs))
    pi[order] = pi_sorted
    return pi


@lru_cache(maxsize=64)
def _inclusion_sorted(sorted_probs: tuple[float, ...], top_k: int) -> np.ndarray:
    probs = np.asarray(sorted_probs)
    samples = max(1 << 14, (1 << 22) // len(probs))
    rng = np.random.default_rng(0x5EED)
    counts = _gumbel_topk_counts(np.array([samples]), np.log(probs), top_k, rng)[0]
    return counts / samples


@lru_cache(maxsize=4)
def _legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


INCLUSION_NODES = 48
"""Gauss-Legendre nodes of :func:`topk_inclusion` (2e-6 relative or better on hand-enumerated
cases with 8 to 10 experts, 1e-12 on 256 experts)."""

BIAS_WARMUP_NODES = 24
"""Nodes for the bias warm-up's many solves: 2e-5 relative on 256 experts, far inside the
sampling noise of one step's loads."""


def topk_inclusion(probs: np.ndarray, top_k: int, nodes: int = INCLUSION_NODES) -> np.ndarray:
    """P(expert e is among a token's top-k) under Plackett-Luce (Gumbel-top-k) sampling, by
    quadrature (no sampling; :mod:`moesim.routing._inclusion_jit` gives the integral):
    ``pi_e = int_0^inf P(N_{-e}(u) < k) p_e exp(-p_e u) du``. Sums to ``top_k``; exactly
    ``k/E`` for uniform preferences; experts of zero preference get 0."""
    probs = np.asarray(probs, dtype=float)
    if np.allclose(probs, probs[0]):
        return np.full(len(probs), top_k / len(probs))
    if top_k == 1:
        return probs / probs.sum()
    from moesim.routing._inclusion_jit import inclusion_quadrature  # numba: only where needed

    live = probs > 0
    pi = np.zeros(len(probs))
    p = probs[live] / probs[live].sum()
    pi[live] = inclusion_quadrature(p, int(top_k), *_legendre(nodes))
    return pi


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF from ``erfc`` (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7):
    ``Phi(x) = erfc(-x / sqrt 2) / 2``."""
    z = -np.asarray(x, dtype=float) / np.sqrt(2.0)
    a = np.abs(z)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erfc_a = poly * np.exp(-a * a)
    return 0.5 * np.where(z >= 0, erfc_a, 2.0 - erfc_a)


def expected_max_normal(mean: np.ndarray, var: np.ndarray, points: int = 512) -> float:
    """``E[max_e X_e]`` for independent ``X_e ~ N(mean_e, var_e)`` (the normal approximation
    of expert loads): ``E[max] = lo + int_lo^hi (1 - prod_e Phi((x - mean_e) / sd_e)) dx``
    with ``lo`` 10 standard deviations below the largest mean (where the product is 0 to
    1e-23) and ``hi`` above every ``mean_e + 10 sd_e``; trapezoid rule on ``points`` points.
    Experts whose ``mean + 10 sd`` is below ``lo`` cannot be the maximum and are skipped."""
    mean, sd = np.asarray(mean, dtype=float), np.sqrt(np.maximum(var, 0.0))
    top = float(mean.max())
    lo = top - 10.0 * float(sd.max())
    hi = float((mean + 10.0 * sd).max())
    if hi <= lo or sd.max() == 0:
        return top
    near = mean + 10.0 * sd > lo
    mean, sd = mean[near], sd[near]
    x = np.linspace(lo, hi, points)
    z = (x[:, None] - mean[None, :]) / np.where(sd > 0, sd, 1.0)[None, :]
    cdf = np.where(sd[None, :] > 0, normal_cdf(z), (x[:, None] >= mean[None, :]).astype(float))
    tail = 1.0 - np.prod(cdf, axis=1)
    return lo + float(np.sum(0.5 * (tail[1:] + tail[:-1]) * np.diff(x)))


def sample_topk_counts(
    tokens_per_source: np.ndarray, probs: np.ndarray, top_k: int, rng: np.random.Generator
) -> np.ndarray:
    """Token-expert pair counts ``[source, expert]``: each token picks ``top_k`` distinct experts.

    Exact per-token Gumbel-top-k sampling when the layer has at most
    :data:`EXACT_SAMPLING_MAX_ELEMENTS` scores; above that, each source's counts are drawn as
    ``Multinomial(T_src * k, pi / k)`` with ``pi`` the inclusion probabilities. That keeps the
    mean exactly and the per-expert variance within a factor ``(1 - pi/k)/(1 - pi)`` (about 1
    when experts >> k), at a cost independent of the token count.
    """
    tokens_per_source = np.asarray(tokens_per_source, dtype=np.int64)
    if tokens_per_source.sum() * len(probs) <= EXACT_SAMPLING_MAX_ELEMENTS:
        return _gumbel_topk_counts(tokens_per_source, np.log(probs), top_k, rng)
    pi = inclusion_probabilities(probs, top_k)
    return rng.multinomial(tokens_per_source * top_k, pi / pi.sum())


def max_over_mean(loads: np.ndarray) -> float:
    """Imbalance of a load vector: max / mean (1.0 is perfectly even; 0 loads give 1.0)."""
    mean = float(np.mean(loads))
    return float(np.max(loads)) / mean if mean > 0 else 1.0


# -- score models ----------------------------------------------------------------------------
def hot_expert_probabilities(
    n_experts: int, n_hot: int, weight: float, drift: int, step: int, rng: np.random.Generator
) -> np.ndarray:
    """``n_hot`` experts preferred ``weight`` times over the others; each step ``drift`` of the
    hot ones are replaced by random cold ones (deterministic in the layer's seed and step)."""
    hot = list(rng.choice(n_experts, size=min(n_hot, n_experts), replace=False))
    for _ in range(step):
        cold = [e for e in range(n_experts) if e not in hot]
        for _ in range(min(drift, len(hot), len(cold))):
            out = int(rng.integers(len(hot)))
            new = cold.pop(int(rng.integers(len(cold))))
            hot[out] = new
    probs = np.ones(n_experts)
    probs[hot] = weight
    return probs / probs.sum()


def _zipf_probabilities(cfg, n_experts: int, moe_layer: int, rng: np.random.Generator):
    return expert_probabilities(
        n_experts, "zipf", cfg.zipf_for(moe_layer), rng, cfg.shuffle_hot_experts
    )


def _dirichlet_probabilities(cfg, n_experts: int, moe_layer: int, rng: np.random.Generator):
    return rng.dirichlet(np.full(n_experts, cfg.dirichlet_alpha))


def _hot_probabilities(cfg, n_experts: int, moe_layer: int, rng: np.random.Generator):
    return hot_expert_probabilities(
        n_experts, cfg.hot_experts, cfg.hot_weight, cfg.hot_drift, cfg.step, rng
    )


def _uniform_probabilities(cfg, n_experts: int, moe_layer: int, rng: np.random.Generator):
    return np.full(n_experts, 1.0 / n_experts)


SCORE_MODELS: dict[str, Callable[..., np.ndarray]] = {
    "uniform": _uniform_probabilities,
    "zipf": _zipf_probabilities,
    "dirichlet": _dirichlet_probabilities,
    "hot": _hot_probabilities,
    "trace": _uniform_probabilities,  # the assignment comes from the file
    "router": _uniform_probabilities,  # scores come from a linear router
}
"""``routing.distribution`` -> ``(cfg, n_experts, moe_layer, rng)`` -> preference per expert."""


def layer_probabilities(
    cfg, n_experts: int, moe_layer: int, rng: np.random.Generator
) -> np.ndarray:
    """Router preference per expert for one MoE layer under ``cfg`` (a RoutingConfig)."""
    return SCORE_MODELS[cfg.distribution](cfg, n_experts, moe_layer, rng)


def router_weights(
    d_model: int, n_experts: int, rng: np.random.Generator, d_router: int = 64
) -> np.ndarray:
    """A layer's linear router ``W ~ N(0, 1/d)`` over the first ``d_router`` embedding dims."""
    d = min(d_model, d_router)
    return rng.standard_normal(size=(d, n_experts), dtype=np.float32) / np.float32(np.sqrt(d))


def synthetic_router_inputs(
    weights: np.ndarray, n_tokens: int, rng: np.random.Generator
) -> np.ndarray:
    """Synthetic token embeddings ``x ~ N(0, I)`` (float32) over the router's input dims."""
    return rng.standard_normal(size=(n_tokens, weights.shape[0]), dtype=np.float32)


def synthetic_router_logits(
    weights: np.ndarray, n_tokens: int, rng: np.random.Generator
) -> np.ndarray:
    """A real linear router on synthetic token embeddings: logits ``x W`` in float32, exactly
    as the numpy reference layer computes them."""
    return synthetic_router_inputs(weights, n_tokens, rng) @ weights


def load_trace(path: str) -> list[np.ndarray]:
    """Expert ids per MoE layer, each ``[tokens, top_k]`` (see ``read_routing_trace``)."""
    return read_routing_trace(path)


# -- one layer's routing ---------------------------------------------------------------------
def position_capacity(
    counts: np.ndarray, group_of_source: np.ndarray, n_groups: int, capacity_factor: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Capacity drops in token order (Switch Transformer): within each group, sources hold
    consecutive positions, so earlier sources fill each expert's capacity first."""
    n_exp = counts.shape[1]
    dropped = np.zeros((n_groups, n_exp), dtype=np.int64)
    if capacity_factor is None:
        return counts, dropped
    kept = counts.copy()
    for g in range(n_groups):
        rows = np.flatnonzero(group_of_source == g)
        block = counts[rows]
        capacity = int(np.ceil(capacity_factor * block.sum() / n_exp))
        before = np.cumsum(block, axis=0) - block
        kept[rows] = np.clip(capacity - before, 0, block)
        dropped[g] = block.sum(axis=0) - kept[rows].sum(axis=0)
    return kept, dropped


def expected_drop_rate_uniform(
    tokens: int, n_experts: int, top_k: int, capacity_factor: float
) -> float:
    """Closed form for uniform top-k: each expert's load is Binomial(T, k/E) (a token picks a
    given expert with probability k/E, independently of other tokens), capacity
    ``C = ceil(cf T k / E)``; drop rate = E * E[(X - C)+] / (T k)."""
    from math import ceil, exp, lgamma, log

    p = top_k / n_experts
    cap = ceil(capacity_factor * tokens * top_k / n_experts)
    excess = 0.0
    for x in range(cap + 1, tokens + 1):
        logpmf = (
            lgamma(tokens + 1)
            - lgamma(x + 1)
            - lgamma(tokens - x + 1)
            + x * log(p)
            + (tokens - x) * log(1 - p)
            if p < 1
            else 0.0
        )
        excess += (x - cap) * exp(logpmf)
    return n_experts * excess / (tokens * top_k)


@dataclass
class LayerRouting:
    """One MoE layer's routing: kept pairs per (source device, expert), drops per (group,
    expert), the preference it was drawn from and the bias-balancing history."""

    kept: np.ndarray
    dropped: np.ndarray
    routed_pairs: int
    probs: np.ndarray
    balance_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # per-token routing only: each token's source device and kept experts (-1: none), one
    # array per group, for dispatch modes that count distinct (token, rank) pairs
    token_source: list[np.ndarray] = field(default_factory=list)
    token_experts: list[np.ndarray] = field(default_factory=list)


BIAS_REFRESH_STEPS = 8
"""The bias warm-up solves the exact inclusion probabilities every this many steps."""


def calibrated_inclusion(probs: np.ndarray, theta: np.ndarray, top_k: int) -> np.ndarray:
    """Inclusion probabilities near a solved point: ``pi_e = 1 - exp(-c p_e theta_e)``, with
    ``theta_e = -log(1 - pi0_e) / p0_e`` from exact ``pi0`` at preferences ``p0`` (so it is
    exact there) and ``c`` the root of ``sum_e pi_e = k`` (Newton, from ``c = 1``). Rosen's
    order-sampling approximation (one threshold for all experts) with per-expert thresholds
    carried over from the last exact solve."""
    a = probs * theta
    c = 1.0
    for _ in range(20):
        e = np.exp(-a * c)
        f = float(np.sum(1.0 - e)) - top_k
        slope = float(np.sum(a * e))
        if slope <= 0:
            break
        step = f / slope
        c -= step
        if abs(step) <= 1e-12 * c:
            break
    return 1.0 - np.exp(-a * c)


def _bias_history(
    cfg,
    probs: np.ndarray,
    total_tokens: int,
    top_k: int,
    rng: np.random.Generator,
    sampling: str = "draw",
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate aux-loss-free bias updates over ``cfg.bias_balancing.steps`` earlier steps:
    ``b_e += rate * sign(mean_load - load_e)``; returns the final bias and max/mean per step.

    Each step's loads are ``Multinomial(T k, pi / k)`` with ``pi`` the top-k inclusion
    probabilities of the tilted preferences, whatever the token count (``draw``); or their
    expectation ``T pi`` (``expected``: no sampling, and the history is the max/mean of the
    expected loads). ``pi`` is solved exactly (:func:`topk_inclusion`) every
    :data:`BIAS_REFRESH_STEPS` steps and carried between solves by
    :func:`calibrated_inclusion`."""
    steps, rate = cfg.bias_balancing.steps, cfg.bias_balancing.rate
    bias = np.zeros(len(probs))
    history = np.empty(steps)
    theta = np.zeros(len(probs))
    for i in range(steps):
        tilted = probs * np.exp(bias)
        tilted /= tilted.sum()
        if i % BIAS_REFRESH_STEPS == 0:
            pi = topk_inclusion(tilted, top_k, BIAS_WARMUP_NODES)
            live = (tilted > 0) & (pi < 1.0)
            theta = np.zeros(len(probs))
            theta[live] = -np.log1p(-pi[live]) / tilted[live]
            theta[pi >= 1.0] = np.inf
        else:
            pi = calibrated_inclusion(tilted, theta, top_k)
        if sampling == "expected":
            load = total_tokens * pi
        else:
            load = rng.multinomial(total_tokens * top_k, pi / pi.sum())
        history[i] = max_over_mean(load)
        bias += rate * np.sign(load.mean() - load)
    return bias, history


NORMAL_MAX_MIN_VARIANCE = 25.0
""":func:`expected_max_binomial` takes the normal approximation from this variance of the
hottest expert's load up (about 2% off the exact maximum there, less above)."""


def expected_max_binomial(n: int, pi: np.ndarray) -> float:
    """:func:`_expected_max_binomial`, remembered per ``(n, pi)``: layers and groups of one
    plan mostly share both."""
    pi = np.ascontiguousarray(pi, dtype=float)
    return _expected_max_cached(int(n), pi.tobytes())


@lru_cache(maxsize=256)
def _expected_max_cached(n: int, pi_bytes: bytes) -> float:
    return _expected_max_binomial(n, np.frombuffer(pi_bytes, dtype=float))


def _expected_max_binomial(n: int, pi: np.ndarray) -> float:
    """``E[max_e X_e]`` for independent ``X_e ~ Binomial(n, pi_e)`` (the loads of ``n`` tokens
    that each pick expert ``e`` with probability ``pi_e``): exactly,
    ``sum_{x >= 1} (1 - prod_e P(X_e < x))`` with the pmf by its recursion ``f(x + 1) = f(x)
    (n - x) / (x + 1) p / (1 - p)``; or :func:`expected_max_normal` where the hottest load's
    variance reaches :data:`NORMAL_MAX_MIN_VARIANCE`."""
    pi = np.clip(np.asarray(pi, dtype=float), 0.0, 1.0)
    if n <= 0:
        return 0.0
    if np.any(pi >= 1.0):
        return float(n)
    var = n * pi * (1.0 - pi)
    if var.max() >= NORMAL_MAX_MIN_VARIANCE:
        return expected_max_normal(n * pi, var)
    hi = int(min(n, np.ceil((n * pi + 12.0 * np.sqrt(var)).max() + 12.0)))
    pmf = (1.0 - pi) ** n
    cdf = pmf.copy()
    ratio = pi / (1.0 - pi)
    total = 0.0
    for x in range(1, hi + 1):
        total += 1.0 - float(np.prod(cdf))  # P(max >= x)
        pmf = pmf * (n - x + 1) / x * ratio
        cdf = cdf + pmf
    return total


def expected_expert_loads(tokens: int, pi: np.ndarray, top_k: int, hottest: int) -> np.ndarray:
    """:func:`_expected_expert_loads`, remembered per input (groups and layers of one plan
    mostly share it); read-only."""
    pi = np.ascontiguousarray(pi, dtype=float)
    return _expected_loads_cached(int(tokens), pi.tobytes(), int(top_k), int(hottest))


@lru_cache(maxsize=256)
def _expected_loads_cached(tokens: int, pi_bytes: bytes, top_k: int, hottest: int) -> np.ndarray:
    loads = _expected_expert_loads(tokens, np.frombuffer(pi_bytes, dtype=float), top_k, hottest)
    loads.flags.writeable = False
    return loads


def _expected_expert_loads(tokens: int, pi: np.ndarray, top_k: int, hottest: int) -> np.ndarray:
    """One group's integer load per expert, summing to ``tokens * top_k``, that keeps the three
    expectations a step's cost depends on: how many experts get any token
    (``sum_e 1 - (1 - pi_e)^T``, Binomial marginals), the pairs each receives
    (``T pi_e / P(X_e >= 1)`` when it gets any) and the maximum over experts
    (:func:`expected_max_binomial`, carried by ``hottest``). Which experts are active is a
    systematic selection along expert ids of probability ``P(X_e >= 1)`` each (all of them
    once every expert expects a token or more); the others share the rest in proportion."""
    mean = tokens * pi
    active = -np.expm1(tokens * np.log1p(-np.clip(pi, 0.0, 1.0 - 1e-16)))
    active[pi >= 1.0] = 1.0
    cum = np.cumsum(active)
    chosen = (np.floor(cum + 0.5) - np.floor(cum - active + 0.5)) > 0
    chosen[hottest] = True
    total = tokens * top_k
    while chosen.sum() > total:  # rounding can pick one more than there are pairs
        chosen[np.flatnonzero(chosen & (np.arange(len(pi)) != hottest))[-1]] = False
    cond = np.where(chosen, mean / np.maximum(active, 1e-300), 0.0)
    peak = max(expected_max_binomial(tokens, pi), float(cond[hottest]), 1.0)
    peak = min(peak, total - (chosen.sum() - 1))
    rest = cond.sum() - cond[hottest]
    real = cond * ((total - peak) / rest) if rest > 0 else cond
    real[hottest] = peak
    extra = np.maximum(real - 1.0, 0.0) * chosen
    base = chosen.astype(np.int64)
    left = total - int(base.sum())
    if left > 0 and extra.sum() > 0:
        base += split_integer(np.array(left), extra / extra.sum())
    elif left > 0:
        base[hottest] += left
    return base


def _split_columns(tokens: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """:func:`_split_columns_uncached`, remembered per input (groups and layers repeat)."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    loads = np.ascontiguousarray(loads, dtype=np.int64)
    key = (tokens.tobytes(), loads.tobytes())
    hit = _SPLIT_CACHE.get(key)
    if hit is None:
        if len(_SPLIT_CACHE) >= 256:
            _SPLIT_CACHE.clear()
        hit = _SPLIT_CACHE[key] = _split_columns_uncached(tokens, loads)
        hit.flags.writeable = False
    return hit


_SPLIT_CACHE: dict[tuple[bytes, bytes], np.ndarray] = {}


def _split_columns_uncached(tokens: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """Integer pairs ``[source, expert]``: each expert's ``loads[e]`` split over the sources in
    proportion to their tokens, exactly (largest remainder). Remainders are dealt on from
    where the previous expert's stopped (a rotation), so equal sources get equal totals."""
    n_src = len(tokens)
    exact = loads[:, None] * (tokens / tokens.sum())[None, :]  # [expert, source]
    base = np.floor(exact + 1e-9).astype(np.int64)
    short = loads - base.sum(axis=1)
    frac = exact - base
    offset = (np.cumsum(short) - short) % n_src
    start = (np.arange(n_src)[None, :] + offset[:, None]) % n_src  # dealing order per expert
    order = np.take_along_axis(
        start, np.argsort(-np.take_along_axis(frac, start, axis=1), axis=1, kind="stable"), axis=1
    )
    take = np.arange(n_src)[None, :] < short[:, None]
    rows, cols = np.nonzero(take)
    np.add.at(base, (rows, order[rows, cols]), 1)
    return base.T


def expected_counts(
    tilted: np.ndarray,
    top_k: int,
    tokens_per_source: np.ndarray,
    group_of_source: np.ndarray,
    n_groups: int,
) -> np.ndarray:
    """Expected token-expert pairs ``[source, expert]`` with no sampling: each
    expert-data-parallel group's loads from :func:`expected_expert_loads` (``pi``:
    :func:`topk_inclusion`), split over the group's sources in proportion to their tokens
    (:func:`_split_columns`). The hottest expert is the one of largest mean; where several tie,
    group ``g`` takes the ``g``-th of them (cyclically), so the groups' maxima fall on
    different experts. Integers; the pairs sum to ``tokens x top_k`` exactly, each expert's
    and (within a pair) each source's."""
    pi = topk_inclusion(tilted, top_k)
    counts = np.zeros((len(tokens_per_source), len(pi)), dtype=np.int64)
    tied = np.flatnonzero(pi >= pi.max() * (1.0 - 1e-12))
    for g in range(n_groups):
        rows = np.flatnonzero(group_of_source == g)
        t = int(tokens_per_source[rows].sum())
        if t == 0:
            continue
        loads = expected_expert_loads(t, pi, top_k, int(tied[g % len(tied)]))
        counts[rows] = _split_columns(tokens_per_source[rows], loads)
    return counts


def expected_applies(cfg) -> bool:
    """Whether ``sampling: expected`` has a closed form for ``cfg``: token-choice top-k,
    node/device-limited or not (the limit is taken not to move the expected per-expert loads,
    exact for uniform preferences over equal groups), drops by position, preferences from a
    score model. Expert choice, hash gating, ``drop_priority: choice``, traces and the linear
    router always draw."""
    return (
        cfg.gating == "topk"
        and cfg.drop_priority == "position"
        and cfg.distribution not in ("trace", "router")
    )


@dataclass(frozen=True)
class GateInput:
    """What a gating policy sees for one group of sources: the layer's preferences, its
    balancing bias, the router weights (``router`` scores) and, for node/device-limited
    routing, the group (node or device) serving each expert and how many a token may reach."""

    cfg: Any
    probs: np.ndarray
    top_k: int
    moe_layer: int
    bias: np.ndarray
    weights: np.ndarray | None = None
    limit_group_of_expert: np.ndarray | None = None
    limit: int | None = None


def _scores(x: GateInput, t: int, rng: np.random.Generator) -> np.ndarray:
    """Router scores ``[t, E]``: a linear router on synthetic embeddings, or Gumbel-perturbed
    log preferences (so a top-k of them is a Plackett-Luce draw)."""
    if x.weights is not None:
        return synthetic_router_logits(x.weights, t, rng)
    with np.errstate(divide="ignore"):  # p = 0: logit -inf, never chosen
        return np.log(x.probs) + standard_gumbel(rng, (t, len(x.probs)))


def _topk_assign(x: GateInput, t: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    logits = _scores(x, t, rng)
    if x.limit_group_of_expert is not None:
        experts, _ = gating.limited_topk_gate(
            logits, x.top_k, x.limit_group_of_expert, x.limit, x.bias, weights=False
        )
    else:
        experts, _ = gating.topk_gate(logits, x.top_k, x.bias, weights=False)
    return experts, True


def _expert_choice_assign(
    x: GateInput, t: int, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    n_experts = len(x.probs)
    c = int(np.ceil((x.cfg.capacity_factor or 1.0) * t * x.top_k / n_experts))
    tok, _ = gating.expert_choice_gate(_scores(x, t, rng), c)
    return gating.experts_per_token(tok, t), False


def _hash_assign(x: GateInput, t: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    ids = rng.integers(0, 32000, t)
    return gating.hash_gate(ids, len(x.probs), x.top_k, seed=x.moe_layer), True


GATES: dict[str, Callable[[GateInput, int, np.random.Generator], tuple[np.ndarray, bool]]] = {
    "topk": _topk_assign,
    "expert_choice": _expert_choice_assign,
    "hash": _hash_assign,
}
"""``routing.gating`` -> ``(GateInput, tokens, rng)`` -> ``(experts [t, k], capacity
applies)``; ``experts`` holds -1 where a token has fewer pairs."""


def route_layer(
    cfg,
    probs: np.ndarray,
    top_k: int,
    d_model: int,
    tokens_per_source: np.ndarray,
    group_of_source: np.ndarray,
    n_groups: int,
    limit_group_of_expert: np.ndarray | None,
    moe_layer: int,
    rng: np.random.Generator,
    trace: list[np.ndarray] | None = None,
    *,
    sampling: str = "draw",
) -> LayerRouting:
    """Route one MoE layer. ``limit_group_of_expert[G, e]`` is the node (or device) that
    serves expert ``e`` for sources of group ``G`` when routing is node/device limited.

    ``sampling`` (:func:`moesim.routing.sampling.sampling_mode`): ``draw`` samples the
    assignment; ``expected`` takes the counts from :func:`expected_counts` (no sampling) where
    :func:`expected_applies`, and draws otherwise."""
    n_experts = len(probs)
    total = int(tokens_per_source.sum())
    bias, history = (np.zeros(n_experts), np.zeros(0))
    expected = sampling == "expected" and expected_applies(cfg)
    if cfg.bias_balancing.steps and cfg.distribution not in ("trace", "router"):
        mode = "expected" if expected else "draw"
        bias, history = _bias_history(cfg, probs, total, top_k, rng, mode)
    n_src = len(tokens_per_source)
    if expected:
        tilted = probs * np.exp(bias)
        counts = expected_counts(
            tilted / tilted.sum(), top_k, tokens_per_source, group_of_source, n_groups
        )
        kept, dropped = position_capacity(counts, group_of_source, n_groups, cfg.capacity_factor)
        return LayerRouting(kept, dropped, int(counts.sum()), probs, history)
    if not cfg.per_token and total * n_experts > EXACT_SAMPLING_MAX_ELEMENTS:
        tilted = probs * np.exp(bias)
        counts = sample_topk_counts(tokens_per_source, tilted / tilted.sum(), top_k, rng)
        kept, dropped = position_capacity(counts, group_of_source, n_groups, cfg.capacity_factor)
        return LayerRouting(kept, dropped, int(counts.sum()), probs, history)
    kept = np.zeros((n_src, n_experts), dtype=np.int64)
    dropped = np.zeros((n_groups, n_experts), dtype=np.int64)
    routed = 0
    token_source: list[np.ndarray] = []
    token_experts: list[np.ndarray] = []
    weights = router_weights(d_model, n_experts, rng) if cfg.distribution == "router" else None
    gate = GATES[cfg.gating]
    offset = 0
    for g in range(n_groups):
        rows = np.flatnonzero(group_of_source == g)
        n_tok = tokens_per_source[rows]
        t = int(n_tok.sum())
        if t == 0:
            continue
        source = np.repeat(rows, n_tok)
        if cfg.distribution == "trace":  # the file fixes the assignment, whatever the gate
            layer_ids = trace[moe_layer % len(trace)]
            take = (offset + np.arange(t)) % len(layer_ids)
            experts, capped = layer_ids[take][:, :top_k], True
            offset += t
        else:
            limited = limit_group_of_expert is not None
            x = GateInput(
                cfg,
                probs,
                top_k,
                moe_layer,
                bias,
                weights,
                limit_group_of_expert[g] if limited else None,
                (cfg.node_limit or cfg.device_limit) if limited else None,
            )
            experts, capped = gate(x, t, rng)
        routed += int((experts >= 0).sum())
        keep = experts >= 0
        if capped and cfg.capacity_factor is not None:
            cap = int(np.ceil(cfg.capacity_factor * t * top_k / n_experts))
            keep &= gating.drop_over_capacity(experts, cap, n_experts, cfg.drop_priority)
        kept += gating.counts_by_source(experts, keep, source, n_src, n_experts)
        token_source.append(source)
        token_experts.append(np.where(keep, experts, -1))
        dropped[g] = np.bincount(experts[(experts >= 0) & ~keep], minlength=n_experts)
    return LayerRouting(kept, dropped, routed, probs, history, token_source, token_experts)
