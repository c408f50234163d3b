"""The highest arrival rate a serving cluster sustains within its SLO, by bisection.

The predicate at a rate ``r``: the run at ``r`` is stable (``moesim/serving/steady.py``: its
queue and time to first token do not grow over the last quarter of the steady window) and
meets every target. The search doubles the rate from ``start_per_s`` while the predicate holds
(or halves it while it fails) to bracket the boundary, then bisects until the bracket
``[lower, upper]`` (``lower`` passes, ``upper`` fails) is within ``rel_tol`` of ``lower``; the
answer is ``lower`` and the bracket is its interval. Every run uses the same request stream
(common random numbers: unit-exponential gaps divided by the rate), so the predicate is a
function of the rate alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RateSearch:
    """Outcome of :func:`max_rate_search`: the bracket and every rate tried."""

    lower_per_s: float  # highest rate that passed (0: none did)
    upper_per_s: float  # lowest rate that failed (inf: none did)
    evaluations: list[tuple[float, bool]] = field(default_factory=list)
    best: Any = None  # what the predicate returned with the run at lower_per_s

    @property
    def converged(self) -> bool:
        return 0 < self.lower_per_s < self.upper_per_s < float("inf")


def max_rate_search(
    passes: Callable[[float], tuple[bool, Any]],
    start_per_s: float,
    rel_tol: float = 0.02,
    max_evaluations: int = 40,
) -> RateSearch:
    """Bracket and bisect the rate at which ``passes(rate) -> (ok, payload)`` turns false
    (module docstring); ``payload`` of the highest passing rate is kept."""
    out = RateSearch(0.0, float("inf"))

    def test(rate: float) -> bool:
        ok, payload = passes(rate)
        out.evaluations.append((rate, ok))
        if ok and rate > out.lower_per_s:
            out.lower_per_s, out.best = rate, payload
        if not ok and rate < out.upper_per_s:
            out.upper_per_s = rate
        return ok

    rate = start_per_s
    ok = test(rate)
    while len(out.evaluations) < max_evaluations:  # bracket
        if ok and out.upper_per_s == float("inf"):
            rate *= 2
        elif not ok and out.lower_per_s == 0.0:
            rate /= 2
        else:
            break
        ok = test(rate)
    while (
        out.converged
        and out.upper_per_s - out.lower_per_s > rel_tol * out.lower_per_s
        and len(out.evaluations) < max_evaluations
    ):
        test((out.lower_per_s + out.upper_per_s) / 2)
    return out
