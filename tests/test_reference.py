"""The numpy reference layer, and the simulator checked against it exactly."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.validation.reference import make_layer
from moesim.validation.validate import functional_check, functional_scenario


def _layer_and_input(cf=None, shared=16):
    layer = make_layer(32, 64, 8, 2, seed=1, d_ff_shared=shared)
    x = np.random.default_rng(0).standard_normal((50, 32), dtype=np.float32)
    return layer, x, layer.forward(x, capacity_factor=cf)


@pytest.mark.parametrize("cf", [None, 0.8])
def test_forward_equals_dense_per_token_loop(cf):
    layer, x, y = _layer_and_input(cf)
    loop = layer.forward_dense_loop(x, layer.cache["r"])
    np.testing.assert_allclose(y, loop, rtol=1e-5, atol=1e-5)
    assert y.dtype == np.float32


@pytest.mark.parametrize("cf", [None, 0.8])
def test_backward_matches_finite_differences(cf):
    layer, x, y = _layer_and_input(cf)
    r = layer.cache["r"]
    dy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    grads = layer.backward(dy)

    def loss(xv):
        return float(
            (layer.forward(xv, routing=layer.reweight(xv, r)).astype(np.float64) * dy).sum()
        )

    eps = 1e-2
    for name in ("w_gate", "w_up", "w_down", "router"):
        w = getattr(layer, name)
        for idx in [(1,) * w.ndim, (0,) * (w.ndim - 1) + (3,)]:
            old = w[idx]
            w[idx] = old + eps
            up = loss(x)
            w[idx] = old - eps
            down = loss(x)
            w[idx] = old
            assert grads[name][idx] == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=2e-3), (
                name
            )
    for idx in [(3, 1), (7, 20)]:
        xv = x.copy()
        xv[idx] += eps
        up = loss(xv)
        xv[idx] -= 2 * eps
        down = loss(xv)
        assert grads["x"][idx] == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=2e-3)


ROUTINGS = [
    {},
    {"capacity_factor": 1.0},
    {"capacity_factor": 0.9, "drop_priority": "choice"},
    {"gating": "expert_choice"},
]
LAYOUTS = [
    ({"ep": 8}, 1, 8),
    ({"ep": 4, "etp": 2}, 1, 8),
    ({"ep": 4, "tp": 2}, 2, 4),
    ({"ep": 8, "expert_placement": "round_robin"}, 2, 4),
]


@pytest.mark.parametrize("dispatch", ["pairs", "per_rank", "per_node"])
@pytest.mark.parametrize(
    "routing", ROUTINGS, ids=lambda r: ",".join(map(str, r.values())) or "topk"
)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: str(lay[0]))
def test_simulator_counts_drops_and_dispatch_bytes_equal_the_reference(routing, layout, dispatch):
    """Per dispatch mode, the bytes of every (source, destination) pair, per stage, equal
    what the numpy reference layer's own routing sends that way (top-4 of 8, so a token
    often has two experts on one rank or node)."""
    par, nodes, per_node = layout
    sc = functional_scenario(par, nodes, per_node, {**routing, "dispatch": dispatch}, top_k=4)
    check = functional_check(sc)
    np.testing.assert_array_equal(check.expert_tokens_ref, check.expert_tokens_sim)
    assert check.dropped_ref == check.dropped_sim
    np.testing.assert_array_equal(check.dispatch_bytes_ref, check.dispatch_bytes_sim)
    if check.forward_bytes_ref is not None or check.forward_bytes_sim is not None:
        np.testing.assert_array_equal(check.forward_bytes_ref, check.forward_bytes_sim)
    assert check.output_max_abs_error <= 1e-5 * max(1.0, check.output_scale)
    if "capacity_factor" in routing:
        assert check.dropped_ref > 0
