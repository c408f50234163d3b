"""moesim: what a Mixture-of-Experts model costs on a cluster, before you buy it.

``load_scenario(path)`` -> :class:`Scenario`; ``simulate(scenario)`` -> :class:`Result`.
The names below are loaded on first use, so ``import moesim`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from moesim._version import __version__

_EXPORTS = {
    "Scenario": "moesim.config.scenario",
    "ScenarioError": "moesim.config.scenario",
    "load_scenario": "moesim.config.scenario",
    "scenario_from_dict": "moesim.config.scenario",
    "simulate": "moesim.studies.simulate",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in ("catalog",):
        return import_module(f"moesim.{name}")
    raise AttributeError(f"module 'moesim' has no attribute {name!r}")


__all__ = [
    "Scenario",
    "ScenarioError",
    "__version__",
    "load_scenario",
    "scenario_from_dict",
    "simulate",
]
