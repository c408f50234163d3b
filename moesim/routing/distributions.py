"""Token-to-expert routing: expert popularity models, top-k sampling, capacity and drops.

Everything here is vectorised numpy over (source device, expert) count matrices: the engine never
sees individual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from moesim.config.tables import read_routing_trace

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
            scores = log_p + rng.gumbel(size=(m, n_exp))
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


def layer_probabilities(
    cfg, n_experts: int, moe_layer: int, rng: np.random.Generator
) -> np.ndarray:
    """Router preference per expert for one MoE layer under ``cfg`` (a RoutingConfig)."""
    if cfg.distribution == "zipf":
        return expert_probabilities(
            n_experts, "zipf", cfg.zipf_for(moe_layer), rng, cfg.shuffle_hot_experts
        )
    if cfg.distribution == "dirichlet":
        return rng.dirichlet(np.full(n_experts, cfg.dirichlet_alpha))
    if cfg.distribution == "hot":
        return hot_expert_probabilities(
            n_experts, cfg.hot_experts, cfg.hot_weight, cfg.hot_drift, cfg.step, rng
        )
    return np.full(n_experts, 1.0 / n_experts)


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


def _bias_history(
    cfg, probs: np.ndarray, total_tokens: int, top_k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate aux-loss-free bias updates over ``cfg.bias_balancing.steps`` earlier steps:
    ``b_e += rate * sign(mean_load - load_e)``; returns the final bias and max/mean per step."""
    steps, rate = cfg.bias_balancing.steps, cfg.bias_balancing.rate
    bias = np.zeros(len(probs))
    history = []
    for _ in range(steps):
        tilted = probs * np.exp(bias)
        load = sample_topk_counts(np.array([total_tokens]), tilted / tilted.sum(), top_k, rng)[0]
        history.append(max_over_mean(load))
        bias += rate * np.sign(load.mean() - load)
    return bias, np.array(history)


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
) -> LayerRouting:
    """Route one MoE layer. ``limit_group_of_expert[G, e]`` is the node (or device) that
    serves expert ``e`` for sources of group ``G`` when routing is node/device limited."""
    from moesim.routing import gating

    n_experts = len(probs)
    total = int(tokens_per_source.sum())
    bias, history = (np.zeros(n_experts), np.zeros(0))
    if cfg.bias_balancing.steps and cfg.distribution not in ("trace", "router"):
        bias, history = _bias_history(cfg, probs, total, top_k, rng)
    n_src = len(tokens_per_source)
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
    offset = 0
    for g in range(n_groups):
        rows = np.flatnonzero(group_of_source == g)
        n_tok = tokens_per_source[rows]
        t = int(n_tok.sum())
        if t == 0:
            continue
        source = np.repeat(rows, n_tok)
        cap = None
        if cfg.capacity_factor is not None:
            cap = int(np.ceil(cfg.capacity_factor * t * top_k / n_experts))
        if cfg.distribution == "trace":
            layer_ids = trace[moe_layer % len(trace)]
            take = (offset + np.arange(t)) % len(layer_ids)
            experts = layer_ids[take][:, :top_k]
            offset += t
        elif cfg.gating == "hash":
            experts = gating.hash_gate(rng.integers(0, 32000, t), n_experts, top_k, seed=moe_layer)
        else:
            if weights is not None:
                logits = synthetic_router_logits(weights, t, rng)
            else:
                with np.errstate(divide="ignore"):  # p = 0: logit -inf, never chosen
                    logits = np.log(probs) + rng.gumbel(size=(t, n_experts))
            if cfg.gating == "expert_choice":
                c = int(np.ceil((cfg.capacity_factor or 1.0) * t * top_k / n_experts))
                tok, _ = gating.expert_choice_gate(logits, c)
                chosen = np.repeat(np.arange(n_experts), tok.shape[1])
                np.add.at(kept, (source[tok.ravel()], chosen), 1)
                routed += tok.size
                by_token = np.full((t, n_experts), -1, dtype=np.int64)
                by_token[tok.ravel(), chosen] = chosen
                token_source.append(source)
                token_experts.append(by_token)
                continue
            if limit_group_of_expert is not None:
                limit = cfg.node_limit or cfg.device_limit
                experts, _ = gating.limited_topk_gate(
                    logits, top_k, limit_group_of_expert[g], limit, bias
                )
            else:
                experts, _ = gating.topk_gate(logits, top_k, bias)
        routed += int((experts >= 0).sum())
        keep = experts >= 0
        if cap is not None:
            keep &= gating.drop_over_capacity(experts, cap, n_experts, cfg.drop_priority)
        kept += gating.counts_by_source(experts, keep, source, n_src, n_experts)
        token_source.append(source)
        token_experts.append(np.where(keep, experts, -1))
        dropped[g] = np.bincount(experts[(experts >= 0) & ~keep], minlength=n_experts)
    return LayerRouting(kept, dropped, routed, probs, history, token_source, token_experts)
