"""moesim: what a Mixture-of-Experts model costs on a cluster, before you buy it.

``load_scenario(path)`` -> :class:`Scenario`; ``simulate(scenario)`` -> :class:`Result`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from moesim.scenario import Scenario, ScenarioError, load_scenario, scenario_from_dict

try:
    __version__ = version("moesim")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"


def simulate(scenario: Scenario, progress: bool | None = None):
    """Run one step of ``scenario`` (``sim.fidelity``: discrete-event or analytic); returns a
    ``Result`` with ``summary``, ``devices``, ``links`` and ``routing``. ``phase: serve`` runs
    the request stream instead and returns a ``moesim.serving.ServeResult``."""
    if scenario.workload.phase == "serve":
        from moesim.serving import simulate_serving

        return simulate_serving(scenario, progress=progress)
    from moesim.analytic import AnalyticEngine
    from moesim.engine import Engine
    from moesim.results import collect
    from moesim.workload import build_plan

    engine_cls = AnalyticEngine if scenario.sim.fidelity == "analytic" else Engine
    return collect(engine_cls(build_plan(scenario), progress=progress).run())


__all__ = [
    "Scenario",
    "ScenarioError",
    "__version__",
    "load_scenario",
    "scenario_from_dict",
    "simulate",
]
