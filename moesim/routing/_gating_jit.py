"""Group-limited top-k per token, as loops (numba, ``cache=True``; plain Python without it).

The same selection as :func:`moesim.routing.gating.limited_topk_gate` (which stays the numpy
reference): a token's group affinity is the sum of its best ``per`` selection scores in the
group (largest first), the ``max_groups`` groups of highest affinity are kept, and the token
takes its ``k`` best experts inside them, ordered by score. One pass over a token's scores per
step, so ``O(tokens x experts)`` with no ``[tokens, experts]`` temporaries.
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised where numba is installed
    from moesim._jit import njit
except ImportError:  # pragma: no cover - numba not installed

    def njit(**_kwargs):
        return lambda fn: fn


@njit(cache=True)
def _best_first(
    values: np.ndarray, n: int, count: int, out: np.ndarray, best: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Indices of the ``count`` largest of ``values[:n]`` into ``out``, largest first (ties:
    lower index first), by insertion into a sorted list of ``count`` (``best`` is scratch)."""
    for c in range(count):
        best[c] = -np.inf
        out[c] = -1
    for i in range(n):
        v = values[i]
        if v > best[count - 1]:
            c = count - 1
            while c > 0 and v > best[c - 1]:
                best[c] = best[c - 1]
                out[c] = out[c - 1]
                c -= 1
            best[c] = v
            out[c] = i


@njit(cache=True, nogil=True)
def limited_topk(
    select: np.ndarray,
    k: int,
    members: np.ndarray,
    max_groups: int,
    per: int,
) -> np.ndarray:  # pragma: no cover - compiled
    """Experts ``[tokens, k]`` from selection scores ``select [tokens, E]`` (logits + bias);
    ``members [groups, m]`` lists each group's experts in id order (equal-size groups)."""
    n_tok = select.shape[0]
    n_groups, m = members.shape
    take = min(per, m)
    experts = np.empty((n_tok, k), np.int64)
    affinity = np.empty(n_groups)
    top = np.empty(take)
    groups = np.empty(max_groups, np.int64)
    cand = np.empty(max_groups * m)
    cand_id = np.empty(max_groups * m, np.int64)
    pick = np.empty(k, np.int64)
    scratch = np.empty(max(k, max_groups))
    for t in range(n_tok):
        row = select[t]
        for g in range(n_groups):
            for c in range(take):  # the group's best ``take`` scores, largest first
                top[c] = -np.inf
            for j in range(m):
                v = row[members[g, j]]
                if v > top[take - 1]:
                    c = take - 1
                    while c > 0 and v > top[c - 1]:
                        top[c] = top[c - 1]
                        c -= 1
                    top[c] = v
            acc = 0.0
            for c in range(take):
                acc += top[c]
            affinity[g] = acc
        _best_first(affinity, n_groups, max_groups, groups, scratch)
        n = 0
        for gi in range(max_groups):
            for j in range(m):
                e = members[groups[gi], j]
                cand[n] = row[e]
                cand_id[n] = e
                n += 1
        _best_first(cand, n, k, pick, scratch)
        for c in range(k):
            experts[t, c] = cand_id[pick[c]]
    return experts


@njit(cache=True, nogil=True)
def topk_rows(select: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Experts ``[tokens, k]``: each token's ``k`` largest selection scores, largest first,
    by insertion into a sorted list of ``k + 1`` (:func:`_best_first`, one pass over a
    token's scores; NaN scores are never taken, so the caller flags tokens holding one).
    Where a token's best ``k + 1`` scores hold two equal ones, the choice among them is
    the numpy reference's (``argpartition``) and not this loop's: such tokens are flagged
    (``tied``; so are tokens with fewer than ``k + 1`` scores above -inf) for the caller to
    take from :func:`moesim.routing.gating.topk_gate`'s numpy path. Elsewhere the best ``k`` are
    distinct and strictly above every other score, so the set and its order are the
    reference's."""
    n_tok, m = select.shape
    experts = np.empty((n_tok, k), np.int64)
    tied = np.zeros(n_tok, np.bool_)
    best = np.empty(k + 1)
    idx = np.empty(k + 1, np.int64)
    for t in range(n_tok):
        _best_first(select[t], m, k + 1, idx, best)
        for c in range(k):
            if best[c] == best[c + 1]:  # -inf among the best k + 1 too (never inserted)
                tied[t] = True
            experts[t, c] = idx[c]
    return experts, tied
