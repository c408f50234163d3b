"""The DES run pauses the cyclic garbage collector and gives it back as it found it; the
pause changes no result."""

from __future__ import annotations

import gc

from moesim.engine.des import Engine
from moesim.plan.workload import build_plan
from tests.conftest import small_scenario


def _run() -> Engine:
    return Engine(build_plan(small_scenario()), progress=False).run()


def test_the_run_restores_the_collector_and_its_results_do_not_depend_on_it():
    assert gc.isenabled()
    collected = _run()
    assert gc.isenabled()
    gc.disable()
    try:
        paused = _run()
        assert not gc.isenabled()  # left disabled, as the caller had it
    finally:
        gc.enable()
    assert collected.rec.slices == paused.rec.slices
    assert collected.rec.finish_s.tolist() == paused.rec.finish_s.tolist()
    for phase, seconds in collected.rec.phase_s.items():
        assert seconds.tolist() == paused.rec.phase_s[phase].tolist()
    assert collected.env.events_processed == paused.env.events_processed
