"""Routing drawn on a worker thread ahead of the layer being planned
(``moesim.plan.ahead.Ahead``, ``moesim.plan.workload._routes_ahead``) gives the plans drawn
layer by layer; the worker keeps its order, its bound and its errors. Synchronised on
events, never on wall time."""

from __future__ import annotations

import threading

import pytest

import moesim
from moesim.plan import workload
from moesim.plan.ahead import Ahead
from moesim.plan.workload import build_plan
from tests.conftest import same_value


def _gated(keys):
    """``fn(k)`` that records where and in what order it starts, then waits for ``gates[k]``."""
    gates = {k: threading.Event() for k in keys}
    started: list[tuple[int, str]] = []

    def fn(k: int) -> int:
        started.append((k, threading.current_thread().name))
        gates[k].wait()
        if k == 3:
            raise ValueError("item 3")
        return 10 * k

    return fn, gates, started


def test_results_in_order_on_the_worker_at_most_depth_ahead():
    keys = [0, 1, 2, 4]
    fn, gates, started = _gated(keys)
    ahead = Ahead(fn, {k: (k,) for k in keys}, depth=2)
    try:
        gates[0].set()
        assert ahead.take(0) == 0
        assert set(ahead._futures) == {1, 2}  # the next two submitted, not the one after
        gates[1].set()
        gates[2].set()
        assert ahead.take(1) == 10 and ahead.take(2) == 20
        gates[4].set()
        assert ahead.take(4) == 40
    finally:
        ahead.close()
    assert [k for k, _ in started] == keys
    assert all(name.startswith("moesim-ahead") for _, name in started)


def test_an_error_is_raised_by_the_take_of_its_item():
    keys = [0, 3]
    fn, gates, _ = _gated(keys)
    for gate in gates.values():
        gate.set()
    with Ahead(fn, {k: (k,) for k in keys}) as ahead:
        assert ahead.take(0) == 0
        with pytest.raises(ValueError, match="item 3"):
            ahead.take(3)


def test_close_cancels_what_has_not_started():
    keys = [0, 1, 2]
    fn, gates, started = _gated(keys)
    ahead = Ahead(fn, {k: (k,) for k in keys}, depth=2)
    ahead.close()  # item 0 may be running (held at its gate), item 1 not started
    gates[0].set()
    ahead._pool.shutdown(wait=True)  # the worker has ended
    assert [k for k, _ in started] in ([], [0])


@pytest.mark.parametrize(
    ("path", "over"),
    [
        ("deepseek-v3-256xh800-prefill.yaml", {"model.n_layers": 8}),
        ("deepseek-v3-64xh800-decode.yaml", {"model.n_layers": 6}),  # node-limited, bias
        ("minimax-text-01-64xh100-prefill.yaml", {"model.n_layers": 4, "routing.zipf_s": 1.1}),
    ],
)
def test_routes_drawn_ahead_give_the_layer_by_layer_plan(path, over, monkeypatch):
    sc = moesim.load_scenario(f"scenarios/{path}", {**over, "sim.trace": False})
    calls = []
    real = workload.Ahead

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(workload, "Ahead", counting)
    ahead = build_plan(sc)
    assert calls, "the routing was not drawn ahead"
    monkeypatch.setattr(workload, "ROUTES_AHEAD_MIN_SCORES", 1 << 62)
    calls.clear()
    in_turn = build_plan(sc)
    assert not calls
    assert len(ahead.layers) == len(in_turn.layers)
    for a, b in zip(ahead.layers, in_turn.layers, strict=True):
        assert same_value(vars(a), vars(b)), a.index
