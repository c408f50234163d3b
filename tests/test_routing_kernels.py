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


@pytest.mark.parametrize("scores", ["distinct", "ties", "minus_inf", "nan"])
def test_compiled_topk_makes_the_numpy_choices(scores):
    """The one-pass compiled top-k equals argpartition + stable sort token for token: on
    distinct scores by itself, and on tokens with equal scores, -inf (experts a token cannot
    take) or NaN among its best k + 1 by handing them to the numpy path."""
    from moesim.routing import gating

    pytest.importorskip("numba")
    assert gating._jit() is not None and gating._jit_if_loaded() is not None  # loaded now
    rng = np.random.default_rng(len(scores))
    for trial in range(40):
        tokens, n_experts = int(rng.integers(1, 200)), int(rng.integers(2, 80))
        k = int(rng.integers(1, n_experts + 1))
        logits = rng.normal(size=(tokens, n_experts))
        if scores == "ties":
            logits = np.round(logits)  # a few values: ties in most tokens
        elif scores == "minus_inf":
            logits[rng.random(logits.shape) < 0.8] = -np.inf
        elif scores == "nan":
            logits[rng.random(logits.shape) < 0.02] = np.nan
        bias = rng.normal(0, 0.3, n_experts) if trial % 2 else None
        numpy_path, _ = topk_gate(logits, k, bias, weights=False, compiled=False)
        compiled, _ = topk_gate(logits, k, bias, weights=False)
        assert compiled.dtype == numpy_path.dtype
        np.testing.assert_array_equal(compiled, numpy_path)
        if scores == "distinct":  # largest first, k distinct experts per token
            chosen = np.take_along_axis(logits + (0 if bias is None else bias), compiled, 1)
            assert (np.diff(chosen, axis=1) < 0).all()
