"""Expert placement: which EP rank serves which share of each expert's tokens.

A placement is ``share[e, r]``: the fraction of expert ``e``'s tokens served by EP rank ``r``
(rows sum to 1). Plain placements are one-hot; replicated hot experts split their row.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def base_placement(n_experts: int, ep: int, kind: str, expected_load: np.ndarray) -> np.ndarray:
    """Rank of each expert under the placement ``kind`` (a key of :data:`PLACEMENTS`)."""
    return PLACEMENTS[kind](n_experts, ep, expected_load)


def contiguous_placement(n_experts: int, ep: int, expected_load: np.ndarray) -> np.ndarray:
    """``e // (E/ep)``: consecutive experts share a rank."""
    return np.arange(n_experts) // (n_experts // ep)


def round_robin_placement(n_experts: int, ep: int, expected_load: np.ndarray) -> np.ndarray:
    """``e % ep``: experts dealt to ranks in turn."""
    return np.arange(n_experts) % ep


def lpt_placement(load: np.ndarray, ep: int) -> np.ndarray:
    """Greedy longest-processing-time packing (Graham 1969): experts by decreasing load, each
    onto the least-loaded rank that still has room (``E/ep`` experts per rank, so memory per
    device is unchanged). Ties go to the lowest rank."""
    n = len(load)
    room = np.full(ep, n // ep)
    total = np.zeros(ep)
    rank = np.empty(n, dtype=np.int64)
    for e in np.argsort(-load, kind="stable"):
        open_ranks = np.flatnonzero(room > 0)
        r = open_ranks[np.argmin(total[open_ranks])]
        rank[e] = r
        total[r] += load[e]
        room[r] -= 1
    return rank


PLACEMENTS: dict[str, Callable[[int, int, np.ndarray], np.ndarray]] = {
    "contiguous": contiguous_placement,
    "round_robin": round_robin_placement,
    "lpt": lambda n_experts, ep, expected_load: lpt_placement(expected_load, ep),
}
"""Placement name (``parallelism.expert_placement``) -> ``(n_experts, ep, expected_load)`` ->
rank of each expert."""


def share_matrix(rank: np.ndarray, ep: int) -> np.ndarray:
    """One-hot ``share[e, r]`` from a rank per expert."""
    share = np.zeros((len(rank), ep))
    share[np.arange(len(rank)), rank] = 1.0
    return share


def replicate_hot(
    share: np.ndarray, expected_load: np.ndarray, k: int, replicas: int | str = 1
) -> np.ndarray:
    """Add replicas of hot experts; a replicated expert's tokens split evenly over its copies.

    ``replicas`` an integer: each of the ``k`` hottest experts gets that many more replicas.
    ``proportional`` (DeepSeek EPLB, ``replicate_experts``): ``k`` extra replicas in all, each
    given to the expert with the highest expected load per copy, ``load_e / copies_e``, so
    copies end up roughly in proportion to load. Every new replica goes to the rank with the
    least expected load that does not hold the expert yet; an expert has at most ``ep`` copies.
    """
    share = share.copy()
    ep = share.shape[1]
    if ep < 2 or k <= 0:
        return share
    if replicas == "proportional":
        order = []
        copies = (share > 0).sum(axis=1).astype(float)
        for _ in range(k):
            per_copy = np.where(copies < ep, expected_load / copies, -np.inf)
            e = int(np.argmax(per_copy))
            if per_copy[e] == -np.inf:
                break
            order.append(e)
            copies[e] += 1
    else:
        hottest = np.argsort(-expected_load, kind="stable")[:k]
        order = [int(e) for e in hottest for _ in range(int(replicas))]
    for e in order:
        rank_load = expected_load @ share
        holders = share[e] > 0
        candidates = np.flatnonzero(~holders)
        if not len(candidates):
            continue
        target = candidates[np.argmin(rank_load[candidates])]
        holders[target] = True
        share[e] = holders / holders.sum()
    return share


def local_slots(share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each EP rank's local experts as ``(expert[rank, slot], valid[rank, slot])``: the
    experts with a share on the rank, in id order, padded to the busiest rank's count.
    Per-expert work is computed over these slots (E/ep per device), not over all experts."""
    held = (share > 0).T  # [rank, expert]
    n_slots = max(int(held.sum(axis=1).max()), 1)
    expert = np.argsort(~held, axis=1, kind="stable")[:, :n_slots]
    return expert, np.take_along_axis(held, expert, axis=1)


def rank_totals(counts: np.ndarray, share: np.ndarray) -> np.ndarray:
    """``counts[n, expert] @ share[expert, rank]`` over the placement's nonzeros only (one or
    two per expert), by prefix sums. One-hot placements give exact integers (integer dtype),
    replicated ones floats."""
    rank, expert = np.nonzero(share.T)  # grouped by rank
    weight = share[expert, rank]
    cols = counts if np.array_equal(expert, np.arange(counts.shape[1])) else counts[:, expert]
    per_rank = np.bincount(rank, minlength=share.shape[1])
    if np.all(weight == 1.0) and np.all(per_rank == per_rank[0]):  # one-hot, even: a reshape
        return cols.reshape(len(cols), share.shape[1], per_rank[0]).sum(axis=2)
    if not np.all(weight == 1.0):
        cols = cols * weight
    acc = np.zeros((counts.shape[0], len(expert) + 1), dtype=cols.dtype)
    np.cumsum(cols, axis=1, out=acc[:, 1:])
    bounds = np.searchsorted(rank, np.arange(share.shape[1] + 1))
    return acc[:, bounds[1:]] - acc[:, bounds[:-1]]


def split_integer(total: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Split integer totals ``[...]`` over ``weights [..., m]`` (rows summing to 1) into integers
    that sum back exactly (largest remainder; ties to the lower index).

    The ``short`` units left after flooring go to the entries with the largest remainders:
    those above the row's ``short``-th largest remainder, then the lowest-indexed ties.
    """
    total = np.asarray(total, dtype=np.int64)
    exact = total[..., None] * weights
    base = np.floor(exact + 1e-9).astype(np.int64)
    short = total - base.sum(axis=-1)
    if not np.any(short > 0):
        return base
    frac = exact - base
    m = weights.shape[-1]
    k = np.clip(short, 0, m)[..., None]
    ordered = np.sort(frac, axis=-1)
    thr = np.take_along_axis(ordered, np.clip(m - k, 0, m - 1), axis=-1)
    thr = np.where(k > 0, thr, np.inf)
    above = frac > thr
    ties = frac == thr
    need = k - above.sum(axis=-1, keepdims=True)
    return base + (above | (ties & (np.cumsum(ties, axis=-1) <= need)))
