"""Which routing sampling a scenario uses: ``routing.sampling``, or the fidelity's default."""

from __future__ import annotations

SAMPLING_DEFAULTS = {"des": "draw", "analytic": "expected"}
"""``sim.fidelity`` -> ``routing.sampling`` when the scenario leaves it unset."""


def sampling_mode(sc) -> str:
    """``routing.sampling`` of scenario ``sc`` (``draw`` or ``expected``); unset, ``draw`` for
    the discrete-event engine and ``expected`` for the analytic one."""
    chosen = sc.routing.sampling
    return chosen if chosen is not None else SAMPLING_DEFAULTS[sc.sim.fidelity]
