"""MoE blocks planned once per distinct preferences under expected routing
(``moesim.plan.workload.REUSE_MOE_BLOCKS``) give the plans built layer by layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moesim
from moesim.plan import workload
from moesim.plan.workload import build_plan
from tests.conftest import same_value

CASES = [
    ("mixtral-8x7b-8xh100-decode.yaml", {}),
    ("mixtral-8x7b-8xh100-train.yaml", {}),
    ("deepseek-v3-64xh800-decode.yaml", {}),  # node-limited, bias warm-up: not reused
    ("deepseek-v3-64xh800-decode.yaml", {"routing.bias_balancing.steps": 0}),  # node-limited
    ("mixtral-8x7b-8xh100-decode.yaml", {"routing.distribution": "zipf", "routing.zipf_s": 1.2}),
    ("minimax-text-01-64xh100-prefill.yaml", {"routing.replicate_hot": 4}),
]


def _summary(path: str, over: dict, reuse: bool, monkeypatch) -> dict:
    monkeypatch.setattr(workload, "REUSE_MOE_BLOCKS", reuse)
    sc = moesim.load_scenario(
        f"scenarios/{path}",
        {**over, "sim.fidelity": "analytic", "sim.trace": False, "sim.progress": False},
    )
    s = dict(moesim.simulate(sc).summary)
    s.pop("sim")  # wall times
    return json.loads(json.dumps(s, sort_keys=True, default=str))


@pytest.mark.parametrize(("path", "over"), CASES)
def test_reused_blocks_give_the_layer_by_layer_result(path, over, monkeypatch):
    assert _summary(path, over, True, monkeypatch) == _summary(path, over, False, monkeypatch)


def _layers(sc, reuse: bool, monkeypatch):
    monkeypatch.setattr(workload, "REUSE_MOE_BLOCKS", reuse)
    return build_plan(sc).layers


def test_reused_layer_plans_equal_field_by_field(monkeypatch):
    """Every field of every layer, arrays and traffic included, on the 256-GPU per-node
    prefill."""
    sc = moesim.load_scenario(
        "scenarios/deepseek-v3-256xh800-prefill.yaml",
        {"sim.fidelity": "analytic", "sim.trace": False, "sim.progress": False},
    )
    a, b = _layers(sc, True, monkeypatch), _layers(sc, False, monkeypatch)
    assert len(a) == len(b)

    for la, lb in zip(a, b, strict=True):
        assert same_value(vars(la), vars(lb)), la.index


def test_reused_blocks_share_no_writable_array(monkeypatch):
    """Layers that reuse a block share its arrays read-only: a write to one layer's array
    raises and leaves the others' alone; their tables are their own."""
    sc = moesim.load_scenario(
        "scenarios/mixtral-8x7b-8xh100-decode.yaml",
        {"sim.trace": False, "sim.fidelity": "analytic"},
    )
    layers = _layers(sc, True, monkeypatch)
    assert layers[0].compute_s["experts"] is layers[1].compute_s["experts"]  # reused
    before = layers[1].compute_s["experts"].copy()
    with pytest.raises(ValueError, match="read-only"):
        layers[0].compute_s["experts"] *= 2.0
    assert np.array_equal(layers[1].compute_s["experts"], before)
    layers[0].compute_s["experts"] = before * 2.0  # a table entry replaced: that layer's only
    assert np.array_equal(layers[1].compute_s["experts"], before)
    assert layers[0].compute_s is not layers[1].compute_s


def test_the_key_spawns_nothing():
    """Computing a block's key leaves the layer's seed as it was, so its streams are the
    ones the block draws from."""
    over = {"sim.fidelity": "analytic", "routing.distribution": "zipf", "routing.zipf_s": 1.2}
    sc = moesim.load_scenario("scenarios/mixtral-8x7b-8xh100-decode.yaml", over)
    seed = np.random.SeedSequence(7)
    ctx = workload._Context(sc, None, None, None, None, {})
    key = workload._moe_key(ctx, seed, 3)
    place, _ = workload.layer_generators(seed)
    n = sc.model.n_experts
    assert key == workload.layer_probabilities(sc.routing, n, 3, place).tobytes()


def test_drawn_routing_is_not_reused(monkeypatch):
    """Under ``sampling: draw`` each layer draws its own routing: no block is shared."""
    sc = moesim.load_scenario(
        "scenarios/mixtral-8x7b-8xh100-decode.yaml",
        {"sim.trace": False, "routing.sampling": "draw"},
    )
    layers = _layers(sc, True, monkeypatch)
    loads = {layers[i].expert_load.tobytes() for i in range(len(layers))}
    assert len(loads) > 1


def test_traffic_is_read_only_and_shared_between_reused_layers(monkeypatch):
    """Reused layers share their (read-only) dispatch and combine objects; the combine is
    the dispatch's stages reversed, in reverse order, scaled by the combine's dtype."""
    sc = moesim.load_scenario(
        "scenarios/deepseek-v3-256xh800-prefill.yaml", {"sim.fidelity": "analytic"}
    )
    layers = [lp for lp in _layers(sc, True, monkeypatch) if lp.moe]
    first, later = layers[0], layers[-1]
    assert later.dispatch is first.dispatch
    assert all(p is q for p, q in zip(later.combine_stages(), first.combine_stages(), strict=True))
    with pytest.raises(ValueError, match="read-only"):
        first.dispatch.nbytes[0] = 1.0
    stages = first.dispatch_stages
    for got, src in zip(first.combine_stages(), reversed(stages), strict=True):
        assert np.array_equal(got.src, src.dst) and np.array_equal(got.dst, src.src)
        assert np.allclose(got.nbytes, src.nbytes * first.combine_scale)


def test_a_topology_is_built_once_per_cluster():
    """The same cluster settings give the same topology object (another seed or batch does
    not matter), equal to a fresh build; another cluster gives another; the cache keeps a
    bounded number, the least recently used dropped first."""
    from moesim.engine import inputs
    from moesim.network import build_topology

    def load(name: str, over: dict | None = None):
        return moesim.load_scenario(f"scenarios/{name}.yaml", over or {})

    sc = load("mixtral-8x7b-8xh100-decode")
    topo = inputs.scenario_topology(sc)
    again = load("mixtral-8x7b-8xh100-decode", {"sim.seed": 3, "workload.batch_size": 64})
    assert inputs.scenario_topology(again) is topo
    fresh = build_topology(sc.cluster, sc.topology, sc.pim, sc.tiers)
    assert topo.link_names == fresh.link_names
    assert np.array_equal(topo.bandwidth_bytes_per_s, fresh.bandwidth_bytes_per_s)
    others = [
        "hunyuan-large-16xh100-decode", "yuan2-m32-8xa100-decode",
        "deepseek-v3-32xh800-prefill", "deepseek-v3-64xh800-decode",
        "mixtral-8x7b-8xh100-hbmpim-decode",
    ]  # fmt: skip
    built = [inputs.scenario_topology(load(name)) for name in others]
    assert all(t is not topo for t in built)
    assert [t.n_devices for t in built[:4]] == [16, 8, 32, 64]
    assert len(inputs._TOPOLOGIES) == inputs.TOPOLOGY_CACHE_SIZE
    assert inputs.scenario_topology(sc) is not topo  # dropped, built again
    assert inputs.scenario_topology(load(others[-1])) is built[-1]  # kept
