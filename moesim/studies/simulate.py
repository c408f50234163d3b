"""One run of a scenario: build the plan, time it with the chosen engine, collect results."""

from __future__ import annotations

from collections.abc import Callable

from moesim.config.scenario import Scenario
from moesim.plan.limits import check_size


def simulate(
    scenario: Scenario,
    progress: bool | None = None,
    before_engine: Callable[[], object] | None = None,
):
    """Run one step of ``scenario`` (``sim.fidelity``: discrete-event or analytic); returns a
    ``Result`` with ``summary``, ``devices``, ``links`` and ``routing``. ``phase: serve`` runs
    the request stream instead and returns a ``moesim.serving.simulation.ServeResult``.
    Refuses a scenario whose estimated size exceeds ``moesim.plan.limits`` (ScenarioError).
    ``before_engine`` is called once the plan is built, before the engine starts (``moesim
    run`` waits there for the compiled kernels it loads alongside the plan)."""
    check_size(scenario)  # resolves batch_size: max first, as build_plan does
    if scenario.workload.phase == "serve":
        from moesim.serving.simulation import simulate_serving

        return simulate_serving(scenario, progress=progress)
    from moesim.engine.analytic import AnalyticEngine
    from moesim.engine.des import Engine
    from moesim.plan.workload import build_plan
    from moesim.results.collect import collect

    if scenario.sim.fidelity == "analytic":
        plan = build_plan(scenario)
        if before_engine is not None:
            before_engine()
        return collect(AnalyticEngine(plan, progress=progress).run())
    from moesim.engine.inputs import NetworkPrefetch

    network = NetworkPrefetch(scenario)  # topology and all-to-all flows, beside the plan
    plan = build_plan(scenario)  # (if it raises, the daemon thread's work is dropped)
    topology, patterns = network.result()
    if before_engine is not None:
        before_engine()
    return collect(Engine(plan, topology, progress, patterns=patterns).run())
