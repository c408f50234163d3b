"""Token-to-expert routing: expert popularity models, top-k sampling, capacity and drops.

Everything here is vectorised numpy over (source device, expert) count matrices: the engine never
sees individual tokens.
"""

from __future__ import annotations

import numpy as np

EXACT_SAMPLING_MAX_ELEMENTS = 1 << 24
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


def inclusion_probabilities(
    probs: np.ndarray, top_k: int, rng: np.random.Generator, samples: int = 1 << 15
) -> np.ndarray:
    """P(expert e is among a token's top-k draws); exact ``k/E`` for uniform, else Monte Carlo."""
    if np.allclose(probs, probs[0]):
        return np.full(len(probs), top_k / len(probs))
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
    pi = inclusion_probabilities(probs, top_k, rng)
    return rng.multinomial(tokens_per_source * top_k, pi / pi.sum())


def apply_capacity(
    counts: np.ndarray, group_of_source: np.ndarray, n_groups: int, capacity_factor: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Drop token-expert pairs beyond each expert's capacity within its expert-parallel group.

    Capacity per expert = ceil(cf * T_group * k / E) (GShard / Switch Transformer), with
    ``T_group * k`` the group's routed pairs. Excess pairs are removed from the group's sources in
    proportion to what each sent (largest-remainder rounding, so it is deterministic).
    Returns (kept counts, dropped pairs per [group, expert]).
    """
    n_exp = counts.shape[1]
    dropped = np.zeros((n_groups, n_exp), dtype=np.int64)
    if capacity_factor is None:
        return counts, dropped
    kept = counts.copy()
    for g in range(n_groups):
        rows = np.flatnonzero(group_of_source == g)
        block = counts[rows]
        load = block.sum(axis=0)
        capacity = int(np.ceil(capacity_factor * load.sum() / n_exp))
        for e in np.flatnonzero(load > capacity):
            share = block[:, e] * capacity / load[e]
            base = np.floor(share).astype(np.int64)
            extra = capacity - base.sum()
            order = np.argsort(-(share - base), kind="stable")[:extra]
            base[order] += 1
            kept[rows, e] = base
            dropped[g, e] = load[e] - capacity
    return kept, dropped


def max_over_mean(loads: np.ndarray) -> float:
    """Imbalance of a load vector: max / mean (1.0 is perfectly even; 0 loads give 1.0)."""
    mean = float(np.mean(loads))
    return float(np.max(loads)) / mean if mean > 0 else 1.0
