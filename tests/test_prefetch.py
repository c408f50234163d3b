"""The topology and all-to-all flow patterns built alongside the plan
(``moesim.engine.inputs.NetworkPrefetch``): the pairs known before routing are the ones the
step graph carries, and a run with them is the run that builds them on first use."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moesim
from moesim.engine import inputs
from moesim.engine.des import Engine
from moesim.engine.inputs import NetworkPrefetch, step_inputs
from moesim.engine.parts import pair_components, pairs_by_component
from moesim.plan.workload import build_plan, dispatch_pairs
from moesim.results.collect import collect
from tests.conftest import ROOT

ALL_TO_ALL = ("dispatch", "combine", "dispatch_bwd", "combine_bwd")

CASES = [
    ("mixtral-8x7b-8xh100-decode.yaml", {}),  # pairs
    ("mixtral-8x7b-8xh100-decode.yaml", {"routing.dispatch": "per_rank"}),
    ("mixtral-8x7b-8xh100-train.yaml", {}),  # forward and backward all-to-alls
    ("deepseek-v3-64xh800-decode.yaml", {}),  # across 8 nodes
    ("deepseek-v3-256xh800-prefill.yaml", {}),  # per_node, streamed legs
    ("deepseek-v3-256xh800-prefill.yaml", {"routing.per_node_stages": "sequential"}),
    ("deepseek-v3-256xh800-prefill.yaml", {"routing.global_routing": True}),
]


def _scenario(path: str, over: dict):
    over = {"model.n_layers": 4, "sim.progress": False, "sim.trace": False, **over}
    return moesim.load_scenario(ROOT / "scenarios" / path, over)


@pytest.mark.parametrize(("path", "over"), CASES)
def test_dispatch_pairs_are_those_of_the_step_graph(path, over):
    """Every all-to-all of the graph runs over a pair set of ``dispatch_pairs`` (the same
    arrays, element for element), and every pair set is used by some all-to-all."""
    sc = _scenario(path, over)
    _, graph = step_inputs(build_plan(sc))
    pairs = dispatch_pairs(sc)
    used = set()
    n_all_to_all = 0
    for node in graph.nodes:
        if node.kind != "collective" or node.phase not in ALL_TO_ALL:
            continue
        n_all_to_all += 1
        src, dst = node.traffic.src, node.traffic.dst
        hits = [
            k for k, (s, d) in enumerate(pairs) if np.array_equal(s, src) and np.array_equal(d, dst)
        ]
        assert hits, f"{node.phase} of layer {node.layer}: pairs not prefetched"
        used.update(hits)
    assert n_all_to_all > 0
    assert used == set(range(len(pairs)))


def test_no_pairs_where_the_plan_has_pieces_or_no_moe_layer():
    assert dispatch_pairs(_scenario("mixtral-8x7b-32xh100-pp4-train.yaml", {})) == []
    dense = _scenario(
        "mixtral-8x7b-8xh100-decode.yaml", {"model.n_dense_layers": 4, "model.d_ff_dense": 4096}
    )
    assert dispatch_pairs(dense) == []


def _summary(result) -> dict:
    s = dict(result.summary)
    s.pop("sim")  # wall times
    return json.loads(json.dumps(s, sort_keys=True, default=str))


def _pair_sets(pairs, label) -> set[tuple[bytes, bytes]]:
    """The distinct pair sets of ``pairs``, each split by the components of ``label`` where
    there are several (what a run of independent parts looks up), else whole."""
    if label is not None and len(np.unique(label)) > 1:
        pairs = [p for s, d in pairs for p in pairs_by_component(s, d, label)]
    return {(s.tobytes(), d.tobytes()) for s, d in pairs}


@pytest.mark.parametrize("parts", ["split", "whole"])
@pytest.mark.parametrize(("path", "over"), [CASES[3], CASES[4]])
def test_prefetched_patterns_give_the_run_that_builds_them(path, over, parts):
    """The engine given the prefetched patterns builds no all-to-all pattern of its own and
    gives the result of an engine that builds every pattern on first use; split into
    independent parts (the 256-GPU prefill: 4), the patterns prefetched are the parts'."""
    sc = _scenario(path, {**over, "sim.parts": parts})
    prefetch = NetworkPrefetch(sc)
    plan = build_plan(sc)
    topology, patterns = prefetch.result()
    prefetched = len(patterns._cache)
    pairs = dispatch_pairs(sc)
    label = pair_components(pairs, plan.n_devices) if parts == "split" else None
    assert prefetched == len(_pair_sets(pairs, label))
    given = Engine(plan, topology, False, patterns=patterns).run()
    assert given.patterns is patterns
    _, graph = step_inputs(plan, topology)
    others = _pair_sets(  # the other collectives' pair sets (tensor-parallel rings)
        [
            (n.traffic.src, n.traffic.dst)
            for n in graph.nodes
            if n.kind == "collective" and n.traffic is not None and n.phase not in ALL_TO_ALL
        ],
        label,
    )
    assert len(patterns._cache) == prefetched + len(others)
    built = Engine(build_plan(sc), progress=False).run()
    assert _summary(collect(given)) == _summary(collect(built))
    assert _summary(moesim.simulate(sc)) == _summary(collect(built))


def test_patterns_built_at_once_are_those_built_one_by_one():
    """``PatternCache.build`` (one thread per pair set) caches the patterns, and leaves the
    recent list, that ``get`` on each pair set in turn does; a repeated pair set is built
    once."""
    from moesim.engine.inputs import scenario_topology
    from moesim.network.aggregate import PatternCache

    sc = _scenario(*CASES[4])
    topology = scenario_topology(sc)
    pairs = dispatch_pairs(sc)
    assert len(pairs) == 2
    at_once, in_turn = PatternCache(topology, "auto"), PatternCache(topology, "auto")
    at_once.build([*pairs, pairs[0]])
    for src, dst in [*pairs, pairs[0]]:
        in_turn.get(src, dst)
    assert list(at_once._cache) == list(in_turn._cache)
    for a, b in zip(at_once._cache.values(), in_turn._cache.values(), strict=True):
        for field in vars(a):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert [
        (s is s2, d is d2)
        for (s, d, _), (s2, d2, _) in zip(at_once._recent, in_turn._recent, strict=True)
    ] == [(True, True)] * len(in_turn._recent)


def test_a_failure_in_the_prefetch_is_raised_by_simulate(monkeypatch):
    def broken(sc):
        raise RuntimeError("topology failed")

    monkeypatch.setattr(inputs, "scenario_topology", broken)
    with pytest.raises(RuntimeError, match="topology failed"):
        moesim.simulate(_scenario("mixtral-8x7b-8xh100-decode.yaml", {}))
