"""What an MoE all-to-all sends: one row per (token, expert) pair, per (token, EP rank), or per
(token, node) forwarded inside the node.

- ``pairs``: a token goes to an EP rank once per chosen expert there (DeepEP's low-latency
  kernels, which send per (token, expert); Megatron's alltoall dispatcher before
  permutation).
- ``per_rank``: once per EP rank that holds at least one of its experts (DeepEP's intra-node
  normal kernels; Megatron's dispatcher after local permutation).
- ``per_node``: once per destination node over the network, to the rank of the sender's
  local index on that node (the same rail), which forwards it over NVLink once to each of
  its node's ranks that hold one of the token's experts (DeepEP's normal kernels, DeepSeek-V3
  Sec. 3.2.2). The combine runs the same stages in reverse, reducing at the forwarder.

Distinct (token, rank) and (token, node) counts are exact when routing is drawn per token
(every policy but plain top-k on large batches); on aggregate counts they are the expected
number of distinct tokens: pairs x P(a token touches the set) / E[picks in the set], with the
top-k inclusion probabilities ``pi_e`` (exact hypergeometric for uniform preferences, else
``1 - prod_e (1 - pi_e)`` for the touch probability).
"""

from __future__ import annotations

from math import comb

import numpy as np

from moesim.config.scenario import Scenario
from moesim.routing.distributions import LayerRouting, inclusion_probabilities

MODES = ("pairs", "per_rank", "per_node")


def dispatch_mode(sc: Scenario) -> str:
    """``routing.dispatch``, with ``auto`` resolved: pairs in decode (latency-bound small
    all-to-alls, DeepEP low-latency kernels); per_node in prefill and training when an
    expert group spans nodes (DeepEP normal kernels); per_rank otherwise."""
    mode = sc.routing.dispatch
    if mode != "auto":
        return mode
    if sc.workload.phase == "decode":
        return "pairs"
    group = sc.parallelism.ep * sc.parallelism.etp
    spans = group > sc.cluster.devices_per_node and not sc.routing.global_routing
    return "per_node" if spans else "per_rank"


def distinct_tokens(
    routing: LayerRouting,
    column_of_expert: np.ndarray,
    group_of_source: np.ndarray,
    n_columns: int,
    top_k: int,
    cache: dict | None = None,
) -> np.ndarray:
    """Tokens of each source that reach each column (an EP rank or a node) at least once,
    ``[source, column]``; ``column_of_expert[group, expert]`` is where a source of ``group``
    sends its tokens for ``expert``. ``cache`` (a dict the caller keeps, e.g. one per plan)
    holds what aggregate counts use beyond the counts themselves: the per-column ratios of
    expected distinct tokens to pairs, which depend on the preferences and the columns only
    (the same in every layer of equal preferences)."""
    n_src = routing.kept.shape[0]
    out = np.zeros((n_src, n_columns), dtype=np.int64)
    if routing.token_experts:
        for source, experts in zip(routing.token_source, routing.token_experts, strict=True):
            token, pick = np.nonzero(experts >= 0)
            col = column_of_expert[group_of_source[source[token]], experts[token, pick]]
            key = np.unique(token * n_columns + col)
            flat = source[key // n_columns] * n_columns + key % n_columns
            out += np.bincount(flat, minlength=n_src * n_columns).reshape(n_src, n_columns)
        return out
    # aggregate counts: pairs per column times the expected distinct tokens per pair
    probs, cols = routing.probs, column_of_expert
    arrays = (probs, cols, group_of_source)
    key = (*(x for a in arrays for x in (a.tobytes(), a.dtype.str, a.shape)), n_columns, top_k)
    groups = cache.get(key) if cache is not None else None
    if groups is None:
        groups = _distinct_ratios(probs, cols, group_of_source, n_columns, top_k)
        if cache is not None:
            cache[key] = groups
    for rows, sums, ratio, per_token in groups:
        pairs = sums(routing.kept[rows])
        distinct = np.rint(pairs * ratio)
        # at least one token per min(k, experts there) pairs, at most one per pair
        distinct = np.clip(distinct, np.ceil(pairs / per_token), pairs)
        out[rows] = distinct.astype(np.int64)
    return out


def _distinct_ratios(
    probs: np.ndarray,
    column_of_expert: np.ndarray,
    group_of_source: np.ndarray,
    n_columns: int,
    top_k: int,
) -> list[tuple]:
    """Per group of sources: its rows, its column sums (:func:`_column_summer`), the expected
    distinct tokens per pair of each column, ``P(a token touches the column) / E[picks
    there]``, and the most picks one token makes there, ``min(k, experts there)``."""
    pi = inclusion_probabilities(probs / probs.sum(), top_k)
    uniform = np.allclose(probs, probs[0])
    n_experts = len(pi)
    groups = []
    for g in np.unique(group_of_source):
        rows = np.flatnonzero(group_of_source == g)
        cols = column_of_expert[g]
        picks = np.bincount(cols, weights=pi, minlength=n_columns)
        if uniform:
            size = np.bincount(cols, minlength=n_columns)
            miss = np.array([comb(n_experts - m, top_k) for m in size]) / comb(n_experts, top_k)
        else:
            miss = np.exp(np.bincount(cols, weights=np.log1p(-np.minimum(pi, 1 - 1e-12))))
        ratio = np.where(picks > 0, (1.0 - miss) / np.maximum(picks, 1e-300), 0.0)
        per_token = np.minimum(top_k, np.maximum(np.bincount(cols, minlength=n_columns), 1))
        groups.append((rows, _column_summer(cols, n_columns), ratio, per_token))
    return groups


def _column_summer(cols: np.ndarray, n_columns: int):
    """``values -> _column_sums(values, cols, n_columns)``, with the sort of ``cols`` done
    once: integer counts take one segmented sum (the same result)."""
    order = np.argsort(cols, kind="stable")
    present, starts = np.unique(cols[order], return_index=True)

    def sums(values: np.ndarray) -> np.ndarray:
        if not np.issubdtype(values.dtype, np.integer):
            return _column_sums(values, cols, n_columns)
        out = np.zeros((values.shape[0], n_columns), dtype=values.dtype)
        if len(present):
            out[:, present] = np.add.reduceat(values[:, order], starts, axis=1)
        return out.astype(float)

    return sums


def _column_sums(values: np.ndarray, cols: np.ndarray, n_columns: int) -> np.ndarray:
    """``out[:, c] = sum of values[:, e] over experts e with cols[e] == c``, added in expert
    order from 0.0 (what ``np.add.at`` gives, bit for bit): round ``j`` adds every column's
    ``j``-th expert, so a round's columns are distinct. Integer counts (below 2^53, as every
    token count is) sum exactly in any order: one segmented sum over the sorted columns."""
    order = np.argsort(cols, kind="stable")
    sorted_cols = cols[order]
    if np.issubdtype(values.dtype, np.integer):
        out = np.zeros((values.shape[0], n_columns), dtype=values.dtype)
        present, starts = np.unique(sorted_cols, return_index=True)
        if len(present):
            out[:, present] = np.add.reduceat(values[:, order], starts, axis=1)
        return out.astype(float)
    out = np.zeros((values.shape[0], n_columns))
    counts = np.bincount(sorted_cols, minlength=n_columns)
    rank = np.arange(len(cols)) - np.repeat(np.cumsum(counts) - counts, counts)
    for j in range(int(counts.max(initial=0))):
        pick = order[rank == j]
        out[:, cols[pick]] += values[:, pick]
    return out
