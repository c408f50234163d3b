"""Independent parts of a step (moesim/engine/parts.py): found from traffic, barriers and
shared links; simulated apart with the same bytes in any number of processes."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

import moesim
from moesim.engine import parts as eparts
from moesim.plan.graph import COLLECTIVE, COMPUTE

from .conftest import ROOT, small_scenario


def replicas(nodes: int = 4, **sim):
    """Mixtral decode on ``nodes`` 8-GPU nodes, expert parallel within each node: one
    data-parallel replica a node."""
    cluster = {"nodes": nodes, "devices_per_node": 8, "device": "h100-sxm"}
    return small_scenario(cluster=cluster, sim={"seed": 0, "progress": False, **sim})


def test_replicas_are_the_parts():
    sc = replicas(4)
    from moesim.engine.des import Engine
    from moesim.plan.workload import build_plan

    engine = Engine(build_plan(sc))
    parts = eparts.independent_parts(engine.graph, engine.patterns, 32, engine.topology.n_links)
    assert [p.tolist() for p in parts] == [list(range(8 * r, 8 * r + 8)) for r in range(4)]


def test_training_replicas_are_one_part():
    """Data-parallel replicas in training all-reduce their gradients: nothing splits."""
    sc = moesim.load_scenario(
        ROOT / "scenarios" / "mixtral-8x7b-8xh100-train.yaml",
        {"cluster.nodes": 2, "model.n_layers": 2, "workload.batch_size": 64, "sim.progress": False},
    )
    inference = replicas(2)
    assert moesim.simulate(inference).summary["sim"]["network_parts"] == 2
    assert moesim.simulate(sc).summary["sim"]["network_parts"] == 1


def _fake_graph(pairs, members=None):
    """A step graph of one collective per ``(src, dst)`` of ``pairs``."""
    nodes = []
    for k, (s, d) in enumerate(pairs):
        traffic = SimpleNamespace(
            src=np.array(s), dst=np.array(d), members=members, barrier=members is not None
        )
        nodes.append(SimpleNamespace(kind=COLLECTIVE, traffic=traffic, id=k))
    nodes.append(SimpleNamespace(kind=COMPUTE, traffic=None, links=None, id=len(nodes)))
    return SimpleNamespace(nodes=nodes)


class _Patterns:
    """One slot per pair, on the links given per pair."""

    def __init__(self, links, n_devices):
        self.links, self.n_devices = links, n_devices

    def get(self, src, dst):
        n = len(src)
        paths = np.array([self.links[(int(s), int(d))] for s, d in zip(src, dst, strict=True)])
        order = np.argsort(src, kind="stable")
        return SimpleNamespace(
            n_slots=n,
            paths=paths,
            receivers=np.asarray(dst),
            receiver_ptr=np.arange(n + 1),
            contrib_slot=order,
            contrib_offsets=np.searchsorted(np.asarray(src)[order], np.arange(self.n_devices + 1)),
        )


def test_pairs_on_a_shared_link_are_one_part():
    graph = _fake_graph([([0], [1]), ([2], [3])])
    apart = _Patterns({(0, 1): [0, -1], (2, 3): [1, -1]}, 4)
    shared = _Patterns({(0, 1): [0, 2], (2, 3): [1, 2]}, 4)
    assert [p.tolist() for p in eparts.independent_parts(graph, apart, 4, 3)] == [[0, 1], [2, 3]]
    assert [p.tolist() for p in eparts.independent_parts(graph, shared, 4, 3)] == [[0, 1, 2, 3]]


def test_a_barrier_group_is_one_part():
    apart = _Patterns({(0, 1): [0, -1], (2, 3): [1, -1]}, 4)
    pairs = [([0], [1]), ([2], [3])]
    barrier = _fake_graph(pairs, members=np.array([0, -1, 0, -1]))  # 0 and 2 wait together
    assert [p.tolist() for p in eparts.independent_parts(barrier, apart, 4, 3)] == [[0, 1, 2, 3]]
    apart_groups = _fake_graph(pairs, members=np.array([0, -1, 1, -1]))
    assert len(eparts.independent_parts(apart_groups, apart, 4, 3)) == 2


def test_components_match_a_union_find():
    rng = np.random.default_rng(3)
    n = 200
    a, b = rng.integers(0, n, 150), rng.integers(0, n, 150)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    expected = [min(i for i in range(n) if find(i) == find(j)) for j in range(n)]
    assert eparts._components(n, a, b).tolist() == expected


def test_many_parts_are_binned_in_order():
    n = eparts.MAX_PARTS * 2 + 2  # single devices with nothing between them
    graph = _fake_graph([([0], [1])])
    parts = eparts.independent_parts(graph, _Patterns({(0, 1): [0, -1]}, n), n, 1)
    assert len(parts) <= eparts.MAX_PARTS
    assert np.array_equal(np.concatenate(parts), np.arange(n))


def _tables(result):
    s = dict(result.summary)  # less the run's wall time and the workers it was given
    s["sim"] = {k: v for k, v in s["sim"].items() if k != "wall_s"}
    s["scenario_resolved"]["sim"] = {
        k: v for k, v in s["scenario_resolved"]["sim"].items() if k != "workers"
    }
    return s, result.devices, result.links


@pytest.mark.parametrize("trace", [False, True])
def test_parts_give_the_same_bytes_in_one_process_or_several(trace, monkeypatch):
    monkeypatch.setattr(eparts, "PARALLEL_MIN_DEVICES", 1)
    one = moesim.simulate(replicas(4, workers=1, trace=trace))
    two = moesim.simulate(replicas(4, workers=2, trace=trace))
    assert one.summary["sim"]["network_parts"] == 4
    s1, d1, l1 = _tables(one)
    s2, d2, l2 = _tables(two)
    assert s1 == s2
    assert d1.equals(d2) and l1.equals(l2)
    assert one.slices == two.slices
    assert one.link_intervals == two.link_intervals


def test_split_and_whole_move_the_same_bytes_and_agree_on_time():
    split = moesim.simulate(replicas(4))
    whole = moesim.simulate(replicas(4, parts="whole"))
    assert whole.summary["sim"]["network_parts"] == 1
    # per-link bytes are summed over the same pairs in the same order either way
    assert np.array_equal(split.links["bytes_carried"], whole.links["bytes_carried"])
    assert split.devices["expert_tokens"].equals(whole.devices["expert_tokens"])
    # the difference is the batching of completions across parts (network_tolerance: 1e-2)
    t_split, t_whole = split.summary["step_time_s"], whole.summary["step_time_s"]
    assert abs(t_split - t_whole) <= 1e-2 * t_whole


def test_a_part_is_what_it_is_alone():
    """A part's devices finish as they do when the engine runs that part by itself."""
    from moesim.engine.des import Engine
    from moesim.plan.workload import build_plan

    plan = build_plan(replicas(4))
    split = Engine(plan).run()
    alone = Engine(plan, devices=np.arange(8, 16)).run()
    assert np.array_equal(split.rec.finish_s[8:16], alone.rec.finish_s[8:16])
    assert not alone.rec.finish_s[:8].any() and not alone.rec.finish_s[16:].any()


def test_workers_are_one_where_forking_is_not_wise(monkeypatch):
    assert eparts.worker_count("auto", 1, 4096) == 1
    assert eparts.worker_count("auto", 8, eparts.PARALLEL_MIN_DEVICES - 1) == 1
    assert eparts.worker_count(3, 2, 4096) == 2
    assert eparts.worker_count(1, 8, 4096) == 1
    out = []
    thread = threading.Thread(target=lambda: out.append(eparts.worker_count(4, 8, 4096)))
    thread.start()
    thread.join()
    assert out == [1]
    monkeypatch.setattr(eparts.sys, "platform", "darwin")
    assert eparts.worker_count(4, 8, 4096) == 1
    monkeypatch.setattr(eparts.sys, "platform", "linux")
    assert eparts.worker_count(4, 8, 4096) == 4
    monkeypatch.setitem(eparts.FORK_ALLOWED, "parts", False)
    assert eparts.worker_count(4, 8, 4096) == 1


def test_a_sweep_worker_runs_its_parts_in_itself(monkeypatch):
    from moesim.studies.sweep import _one_process_a_point

    monkeypatch.setitem(eparts.FORK_ALLOWED, "parts", True)
    _one_process_a_point()
    assert eparts.worker_count(4, 8, 4096) == 1


def test_a_failing_part_fails_the_run(monkeypatch):
    monkeypatch.setattr(eparts, "PARALLEL_MIN_DEVICES", 1)

    def boom(k):
        raise RuntimeError(f"part {k}")

    with pytest.raises(RuntimeError, match="part"):
        list(eparts.run_parts(boom, 3, 2))


def test_a_worker_that_dies_fails_the_run_rather_than_waiting():
    """A worker killed mid-part (as the kernel's memory killer would) breaks the pool: the
    run raises instead of waiting for a result that never comes."""
    import os
    from concurrent.futures.process import BrokenProcessPool

    def die(k):
        if k == 1:
            os._exit(9)
        return k

    with pytest.raises(BrokenProcessPool):
        list(eparts.run_parts(die, 3, 2))
