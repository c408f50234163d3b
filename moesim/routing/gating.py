"""Gating policies: from router scores ``[tokens, experts]`` to a token-expert assignment.

Plain numpy functions shared by the simulator (on sampled or traced scores) and the numpy
reference layer. An assignment is ``experts [T, k]`` (expert id per token and slot, -1 where
the pair is dropped) with ``weights [T, k]`` (combine weights, 0 where dropped).
"""

from __future__ import annotations

import sys
from functools import cache
from types import ModuleType

import numpy as np


@cache
def _jit() -> ModuleType | None:
    """The compiled gating kernels (numba, imported on first use), or None without numba."""
    try:
        from moesim.routing import _gating_jit
    except ImportError:  # pragma: no cover - numba not installed
        return None
    return _gating_jit


def _jit_if_loaded() -> ModuleType | None:
    """:func:`_jit` where numba is imported already (the network's kernels, or a limited
    top-k, loaded it): a choice the numpy path makes as well is not worth numba's import
    (~0.3 s) in a process that would not pay it otherwise."""
    return _jit() if "numba" in sys.modules else None


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def topk_gate(
    logits: np.ndarray,
    k: int,
    bias: np.ndarray | None = None,
    normalize: bool = True,
    weights: bool = True,
    compiled: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Token-choice top-k (Mixtral, MiniMax-01): each token takes its ``k`` best experts.

    ``bias`` (DeepSeek-V3's auxiliary-loss-free balancing) shifts *selection* only; combine
    weights are the softmax probabilities of the chosen experts, renormalised over the k
    (Mixtral) when ``normalize``; ``weights=False`` skips them (returns None) where only the
    assignment is needed, and then, where numba is loaded, the compiled one-pass selection of
    :mod:`moesim.routing._gating_jit` makes the choices (7x faster on 256 experts; tokens with
    equal scores among their best ``k + 1`` take this numpy path's; ``compiled=False``
    forces it for every token).
    """
    select = logits if bias is None else logits + bias
    if not weights and compiled and select.ndim == 2 and 0 < k < select.shape[1]:
        jit = _jit_if_loaded()
        if jit is not None:
            select = np.ascontiguousarray(select, dtype=np.float64)
            experts, tied = jit.topk_rows(select, k)
            tied |= np.isnan(select).any(axis=1)
            if tied.any():  # equal scores among a token's best k + 1, or NaN: numpy's choice
                rows = np.flatnonzero(tied)
                experts[rows] = topk_gate(select[rows], k, weights=False, compiled=False)[0]
            return experts, None
    idx = np.argpartition(-select, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(select, idx, axis=1), axis=1, kind="stable")
    experts = np.take_along_axis(idx, order, axis=1)
    if not weights:
        return experts, None
    probs = np.take_along_axis(softmax(logits), experts, axis=1)
    if normalize:
        probs = probs / probs.sum(axis=1, keepdims=True)
    return experts, probs


def limited_topk_gate(
    logits: np.ndarray,
    k: int,
    group_of_expert: np.ndarray,
    max_groups: int,
    bias: np.ndarray | None = None,
    weights: bool = True,
    compiled: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Group-limited top-k (DeepSeek-V3 node-limited routing, arXiv:2412.19437 Sec. 2.1.2):
    keep the ``max_groups`` groups (nodes or devices) whose best ``k // max_groups`` scores sum
    highest, then take the top-k experts inside them. Each token reaches at most
    ``max_groups`` groups. Array operations over all tokens and groups at once (groups of
    equal size are one ``[tokens, groups, experts per group]`` sort); with ``weights=False``
    and equal groups, the compiled per-token loop of :mod:`moesim.routing._gating_jit` makes
    the same choices (``compiled=False`` forces the numpy path)."""
    select = logits if bias is None else logits + bias
    groups, index = np.unique(group_of_expert, return_inverse=True)
    if max_groups >= len(groups):
        return topk_gate(logits, k, bias, weights=weights)
    per = max(1, k // max_groups)
    sizes = np.bincount(index)
    if np.all(sizes == sizes[0]):
        members = np.argsort(index, kind="stable")  # each group's experts, in id order
        if compiled and not weights and _jit() is not None:
            members = members.reshape(len(groups), int(sizes[0]))
            sel = np.ascontiguousarray(select, dtype=np.float64)
            return _jit().limited_topk(sel, k, members, max_groups, per), None
        blocks = select[:, members].reshape(len(select), len(groups), int(sizes[0]))
        affinity = (-np.sort(-blocks, axis=2))[:, :, : min(per, int(sizes[0]))].sum(axis=2)
    else:
        affinity = np.full((len(select), len(groups)), -np.inf)
        for gi in range(len(groups)):
            cols = select[:, index == gi]
            top = -np.sort(-cols, axis=1)[:, : min(per, cols.shape[1])]
            affinity[:, gi] = top.sum(axis=1)
    keep_groups = np.argpartition(-affinity, max_groups - 1, axis=1)[:, :max_groups]
    kept = np.zeros(affinity.shape, dtype=bool)
    np.put_along_axis(kept, keep_groups, True, axis=1)
    allowed = kept[:, index]
    masked = np.where(allowed, logits, -np.inf)
    masked_bias = None if bias is None else np.where(allowed, bias, 0.0)
    return topk_gate(masked, k, masked_bias, weights=weights)


def expert_choice_gate(logits: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert choice (Zhou et al. 2022): each expert takes its ``capacity`` best tokens.

    Returns ``(token ids [E, C], weights [E, C])``; every expert gets exactly ``capacity``
    tokens (so no drops and even load), a token may get any number of experts.
    """
    probs = softmax(logits)
    cap = min(capacity, len(logits))
    tokens = np.argpartition(-probs.T, cap - 1, axis=1)[:, :cap]
    return tokens, np.take_along_axis(probs.T, tokens, axis=1)


def experts_per_token(tokens_of_expert: np.ndarray, n_tokens: int) -> np.ndarray:
    """An expert-choice assignment (token ids ``[E, C]``) as ``experts [T, m]`` per token,
    ``m`` the most experts any token got, -1 padded; each token's experts in id order."""
    n_experts, c = tokens_of_expert.shape
    tok = tokens_of_expert.ravel()
    exp = np.repeat(np.arange(n_experts), c)
    order = np.argsort(tok, kind="stable")
    per_token = np.bincount(tok, minlength=n_tokens)
    slot = np.arange(len(tok)) - np.repeat(np.cumsum(per_token) - per_token, per_token)
    experts = np.full((n_tokens, max(int(per_token.max(initial=0)), 1)), -1, dtype=np.int64)
    experts[tok[order], slot] = exp[order]
    return experts


def hash_gate(token_ids: np.ndarray, n_experts: int, k: int, seed: int = 0) -> np.ndarray:
    """Hash routing baseline (Roller et al. 2021): a fixed pseudo-random map from token id to
    ``k`` distinct experts, independent of the hidden state."""
    rng = np.random.default_rng(seed)
    table = np.argsort(rng.random((int(token_ids.max()) + 1, n_experts)), axis=1)[:, :k]
    return table[token_ids]


def drop_over_capacity(
    experts: np.ndarray, capacity: int, n_experts: int, priority: str = "position"
) -> np.ndarray:
    """Keep-mask ``[T, k]`` after dropping pairs beyond ``capacity`` per expert.

    ``position``: tokens earlier in the batch first (Switch Transformer); ``choice``: every
    token's first choice before any second choice, then by position (GShard).
    """
    t, k = experts.shape
    # slot-major (all first choices, then all second choices) or token-major
    flat = experts.T.ravel() if priority == "choice" else experts.ravel()
    valid = flat >= 0
    ids = np.where(valid, flat, n_experts)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.searchsorted(sorted_ids, sorted_ids, side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(flat)) - starts
    keep_flat = valid & (rank < capacity)
    keep = keep_flat.reshape(k, t).T if priority == "choice" else keep_flat.reshape(t, k)
    return keep


def counts_by_source(
    experts: np.ndarray,
    keep: np.ndarray,
    source_of_token: np.ndarray,
    n_sources: int,
    n_experts: int,
) -> np.ndarray:
    """Kept pairs per (source, expert) from a per-token assignment."""
    src = np.broadcast_to(source_of_token[:, None], experts.shape)[keep]
    counts = np.zeros((n_sources, n_experts), dtype=np.int64)
    np.add.at(counts, (src, experts[keep]), 1)
    return counts
