"""``moesim run`` loads the network's compiled kernels on a thread while it builds the plan
(:class:`moesim.cli.run.KernelLoad`): only where the engine uses them, joined before the
engine starts, and the outputs are those of a load on the main thread."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from moesim.cli import main
from moesim.cli.common import PROCESS
from moesim.cli.run import KernelLoad
from moesim.config.errors import ScenarioError
from moesim.config.scenario import load_scenario
from moesim.network import fluid
from moesim.network.fluid import COMPILED_MIN_DEVICES, COMPILING
from tests.conftest import ROOT

SMALL = "scenarios/mixtral-8x7b-8xh100-decode.yaml"
BIG = "scenarios/deepseek-v3-64xh800-decode.yaml"
SERVE = "scenarios/mixtral-8x7b-8xh100-serve.yaml"


def test_the_load_starts_only_where_the_engine_uses_the_compiled_kernels():
    small = load_scenario(ROOT / SMALL, {})
    assert small.cluster.n_devices < COMPILED_MIN_DEVICES
    assert KernelLoad.start_for(small) is None
    analytic = load_scenario(ROOT / BIG, {"sim.fidelity": "analytic"})
    assert KernelLoad.start_for(analytic) is None
    load = KernelLoad.start_for(load_scenario(ROOT / BIG, {"sim.fidelity": "des"}))
    assert load is not None and load.thread.daemon
    load.wait()
    assert not load.thread.is_alive()


def test_wait_raises_what_the_load_raised(monkeypatch):
    def broken() -> None:
        raise RuntimeError("no kernels")

    monkeypatch.setattr("moesim.network.fluid.warm_up", broken)
    load = KernelLoad.start_for(load_scenario(ROOT / BIG, {"sim.fidelity": "des"}))
    with pytest.raises(RuntimeError, match="no kernels"):
        load.wait()


def test_no_load_thread_outlives_a_failed_run(monkeypatch):
    started: list[KernelLoad] = []
    start_for = KernelLoad.start_for

    def recording(scenario, **kwargs):
        load = start_for(scenario, **kwargs)
        started.append(load)
        return load

    def failing_plan(scenario):
        raise ScenarioError("model", "no plan")

    monkeypatch.setattr(KernelLoad, "start_for", staticmethod(recording))
    monkeypatch.setattr("moesim.plan.workload.build_plan", failing_plan)
    code = main(["run", "-q", str(ROOT / BIG), "--set", "sim.fidelity=des"])
    assert code == 2 and started and not started[0].thread.is_alive()


def test_a_program_run_with_the_thread_writes_what_an_in_process_run_writes(tmp_path):
    """The process (thread, ``os._exit``) and ``simulate`` then ``write_outputs`` in this
    process (kernels loaded on the main thread, or already) write the same files."""
    from moesim.results.collect import write_outputs
    from moesim.studies.simulate import simulate

    overrides = {"model.n_layers": 4, "sim.fidelity": "des"}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    run = subprocess.run(
        [sys.executable, "-m", "moesim", "run", BIG, "--out", str(tmp_path / "proc"), *sets],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    write_outputs(simulate(load_scenario(ROOT / BIG, overrides)), tmp_path / "here")
    for name in ("devices.csv", "links.csv", "routing.csv", "expert_load.csv", "trace.json"):
        assert (tmp_path / "proc" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


@pytest.mark.parametrize(("path", "cached", "progress", "said"), [
    (BIG, False, True, True), (BIG, False, False, False), (BIG, True, True, False),
    (SMALL, False, True, False),
])  # fmt: skip
def test_an_engine_with_progress_announces_a_compile_and_compiles_first(
    path, cached, progress, said, monkeypatch, capsys
):
    """The Python API (``simulate`` or ``Engine``) with progress on says it compiles, then
    compiles before its progress bar starts, where its network runs the compiled kernels
    and they are not cached; otherwise it says and does nothing."""
    from moesim.engine.des import Engine
    from moesim.plan.workload import build_plan

    warmed: list[bool] = []
    monkeypatch.setattr(fluid, "kernels_cached", lambda: cached)
    monkeypatch.setattr("moesim.engine.des.warm_up", lambda: warmed.append(True))
    plan = build_plan(load_scenario(ROOT / path, {"sim.fidelity": "des", "model.n_layers": 4}))
    capsys.readouterr()
    engine = Engine(plan, progress=progress)
    out = capsys.readouterr()
    assert engine.net.compiled == (path == BIG)
    assert out.out == "" and out.err.count(COMPILING) == int(said)
    assert warmed == [True] * said


def test_the_cache_holds_the_kernels_once_loaded():
    """After a load (compiling where the cache is cold), numba's cache index holds every
    kernel the load took, for this source."""
    pytest.importorskip("numba")
    fluid.warm_up()
    assert fluid.kernels_cached()


@pytest.mark.parametrize(("cached", "announce", "said"), [
    (False, True, True), (False, False, False), (True, True, False),
])  # fmt: skip
def test_a_cold_cache_is_announced_once_on_stderr(cached, announce, said, monkeypatch, capsys):
    monkeypatch.setattr(fluid, "kernels_cached", lambda: cached)
    monkeypatch.setattr(fluid, "warm_up", lambda: None)
    load = KernelLoad.start_for(load_scenario(ROOT / BIG, {"sim.fidelity": "des"}), announce)
    load.wait()
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count(COMPILING) == (1 if said else 0)


@pytest.mark.parametrize("quiet", [False, True])
def test_moesim_run_announces_a_compile_unless_quiet(quiet, monkeypatch, capsys):
    monkeypatch.setattr(fluid, "kernels_cached", lambda: False)
    monkeypatch.setattr(fluid, "warm_up", lambda: None)

    def failing_plan(scenario):
        raise ScenarioError("model", "no plan")

    monkeypatch.setattr("moesim.plan.workload.build_plan", failing_plan)
    args = ["run", str(ROOT / BIG), "--set", "sim.fidelity=des"] + (["-q"] if quiet else [])
    assert main(args) == 2
    assert (COMPILING in capsys.readouterr().err) != quiet


@pytest.fixture
def collector_restored():
    """The cyclic garbage collector on again after the test, whatever it left."""
    yield
    gc.enable()


@pytest.mark.parametrize(("ends", "path", "off"), [
    (False, SMALL, False), (True, SMALL, True), (True, SERVE, False),
])  # fmt: skip
def test_only_a_process_that_ends_with_its_run_leaves_the_collector_off(
    ends, path, off, monkeypatch, collector_restored
):
    """``moesim run`` in the ``moesim`` program (one command, then ``os._exit``) turns the
    cyclic collector off for its step; a serving run, and ``main`` called in a process that
    goes on (tests, scripts), leave it as it was."""
    monkeypatch.setitem(PROCESS, "ends_after_command", ends)
    gc.enable()
    args = ["run", "-q", str(ROOT / path)]
    assert main(args + (["--set", "workload.serve.n_requests=50"] if path == SERVE else [])) == 0
    assert gc.isenabled() != off


@pytest.mark.parametrize("cached", [True, False])
def test_a_compile_runs_with_the_collector_on(cached, monkeypatch, collector_restored):
    """numba's compiler makes cyclic garbage: a load that compiles turns the collector on
    for the compile and off again after; a load from the cache leaves it off."""
    seen: list[bool] = []
    monkeypatch.setattr(fluid, "kernels_cached", lambda: cached)
    monkeypatch.setattr(fluid, "warm_up", lambda: seen.append(gc.isenabled()))
    gc.disable()
    KernelLoad.start_for(load_scenario(ROOT / BIG, {"sim.fidelity": "des"})).wait()
    assert seen == [not cached]
    assert not gc.isenabled()
