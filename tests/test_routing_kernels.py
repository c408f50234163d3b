"""The vectorised and compiled limited top-k make the same choices as the per-group loop they
replace, on equal score distributions (same random scores in, same experts out)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.routing.gating import limited_topk_gate, topk_gate


def _per_group_loop(logits, k, group_of_expert, max_groups, bias):
    """The former implementation: one sort per group, one mask per kept group."""
    select = logits + bias
    groups = np.unique(group_of_expert)
    per = max(1, k // max_groups)
    affinity = np.full((len(select), len(groups)), -np.inf)
    for gi, grp in enumerate(groups):
        cols = select[:, group_of_expert == grp]
        top = -np.sort(-cols, axis=1)[:, : min(per, cols.shape[1])]
        affinity[:, gi] = top.sum(axis=1)
    keep_groups = np.argpartition(-affinity, max_groups - 1, axis=1)[:, :max_groups]
    allowed = np.zeros_like(select, dtype=bool)
    for gi in range(max_groups):
        allowed |= group_of_expert[None, :] == groups[keep_groups[:, gi]][:, None]
    masked = np.where(allowed, logits, -np.inf)
    return topk_gate(masked, k, np.where(allowed, bias, 0.0))[0]


@pytest.mark.parametrize(
    ("tokens", "n_experts", "n_groups", "k", "limit"),
    [(2048, 256, 8, 8, 4), (500, 64, 8, 6, 3), (300, 32, 4, 4, 2), (100, 60, 6, 9, 2)],
)
def test_limited_topk_paths_agree_with_the_per_group_loop(tokens, n_experts, n_groups, k, limit):
    rng = np.random.default_rng(tokens)
    logits = np.log(rng.dirichlet(np.ones(n_experts))) + rng.gumbel(size=(tokens, n_experts))
    group_of_expert = np.repeat(np.arange(n_groups), n_experts // n_groups)
    group_of_expert = group_of_expert[rng.permutation(n_experts)]
    bias = rng.normal(0, 0.3, n_experts)
    old = _per_group_loop(logits, k, group_of_expert, limit, bias)
    args = (logits, k, group_of_expert, limit, bias)
    numpy_path, _ = limited_topk_gate(*args, weights=False, compiled=False)
    compiled, _ = limited_topk_gate(*args, weights=False)
    with_weights, w = limited_topk_gate(*args)
    np.testing.assert_array_equal(numpy_path, old)
    np.testing.assert_array_equal(compiled, old)
    np.testing.assert_array_equal(with_weights, old)
    # each token reaches at most `limit` groups, and its weights renormalise to 1
    reached = np.array([len(set(group_of_expert[row])) for row in compiled])
    assert reached.max() <= limit
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
