"""Steady-state figures of a serving run: the arrivals window, batch means and a stability test.

**Steady window** (arrivals window with MSER truncation): it ends at the last arrival (drain
excluded: after it the load falls) and starts at the later of the arrival of request
``ceil(warmup_fraction x n)`` and the MSER truncation point of the output-token rate (White,
Cobb and Spratt, *A comparison of five steady-state truncation heuristics*, 2000): the rate is
counted in ``MSER_BINS`` equal spans from the first to the last arrival, and the first ``d``
spans are dropped where ``d <= MSER_BINS / 2`` minimises ``sum_{i>d} (y_i - mean_d)^2 /
(n - d)^2``. Output is produced about one request latency after arrival, so a run whose window
is not much longer than its latencies loses most of it here, and its interval shows it. Output
tokens are counted where they are produced: each decode (or mixed) iteration emits one token
per running sequence at its end, each request's first token comes at its ``first_token_s``.

**Confidence interval** (batch means; Law, *Simulation Modeling and Analysis*, 5th ed., 9.5.3):
the window is cut into ``batches`` equal spans; the throughput of each span is one observation,
and the 95% interval is ``mean +- t(0.975, K-1) s / sqrt(K)``.

**Stability**: a run is unstable when, over the last quarter of the window, the queue (requests
arrived and not yet admitted, seen at each arrival) or the time to first token still grows: the
mean over the arrivals of the last quarter exceeds the mean over the third quarter by more than
``growth_tolerance`` (relative), by more than three standard errors (each quarter's standard
error from four sub-batch means) and, for the queue, by at least one request. A stable queue
fluctuates around a level; an overloaded one grows about linearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from moesim.config.serve import SteadyConfig


@dataclass(frozen=True)
class SteadyWindow:
    """The steady window and its figures (see the module docstring)."""

    start_s: float
    end_s: float
    requests: np.ndarray  # bool mask: arrived in the window
    tokens_per_s: float
    tokens_per_s_ci: float  # 95% half-width (batch means); nan with fewer than 2 batches
    requests_per_s: float  # completions per second in the window
    arrival_rate_per_s: float
    mean_requests_in_system: float  # time average over the window
    growth: dict[str, float | None]  # last over third quarter; None: too few arrivals
    stable: bool
    unstable_reason: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def token_times(requests: pd.DataFrame, iterations: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Times at which output tokens appear and how many at each: decode tokens at the end of
    their iteration, first tokens at each request's ``first_token_s``."""
    dec = iterations[iterations["decode_tokens"] > 0]
    times = np.concatenate([dec["end_s"].to_numpy(float), requests["first_token_s"].to_numpy()])
    counts = np.concatenate(
        [dec["decode_tokens"].to_numpy(float), np.ones(len(requests), dtype=float)]
    )
    return times, counts


def in_system_at(times: np.ndarray, arrival: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Requests arrived and not yet past ``done`` (finished, or admitted for the queue) at each
    of ``times`` (right-continuous)."""
    return np.searchsorted(np.sort(arrival), times, side="right") - np.searchsorted(
        np.sort(done), times, side="right"
    )


def time_average_in_system(arrival: np.ndarray, done: np.ndarray, t0: float, t1: float) -> float:
    """Time-average of requests in the system over ``[t0, t1]``: each request contributes the
    overlap of its stay ``[arrival, done]`` with the window."""
    if t1 <= t0:
        return math.nan
    overlap = np.clip(np.minimum(done, t1) - np.maximum(arrival, t0), 0.0, None)
    return float(overlap.sum() / (t1 - t0))


MSER_BINS = 200
"""Spans of the output-token rate series the MSER truncation works on."""


def mser_truncation(y: np.ndarray) -> int:
    """MSER: the number of leading observations to drop, ``argmin_{d <= n/2} sum_{i>d} (y_i -
    mean(y_{>d}))^2 / (n - d)^2``."""
    n = len(y)
    best, best_d = math.inf, 0
    for d in range(n // 2 + 1):
        tail = y[d:]
        v = float(((tail - tail.mean()) ** 2).sum()) / (n - d) ** 2
        if v < best:
            best, best_d = v, d
    return best_d


def _growth(values: np.ndarray, tolerance: float, floor: float = 0.0) -> tuple[float, bool]:
    """Ratio of the last quarter's mean to the third quarter's and whether it is a real rise
    (see the module docstring)."""
    n = len(values)
    if n < 16:
        return math.nan, False
    third, last = values[n // 2 : 3 * n // 4], values[3 * n // 4 :]

    def mean_se(x: np.ndarray) -> tuple[float, float]:
        subs = np.array([s.mean() for s in np.array_split(x, 4)])
        return float(x.mean()), float(subs.std(ddof=1) / 2.0)

    (a, sa), (b, sb) = mean_se(third), mean_se(last)
    ratio = b / a if a > 0 else (math.inf if b > 0 else 1.0)
    grows = b > a * (1 + tolerance) and b - a > max(3 * math.hypot(sa, sb), floor)
    return float(ratio), bool(grows)


def steady_window(
    requests: pd.DataFrame, iterations: pd.DataFrame, cfg: SteadyConfig
) -> SteadyWindow:
    """Steady-state throughput with its interval and the stability verdict of a finished run
    (``requests`` sorted by arrival, as the scheduler sees them)."""
    arrival = requests["arrival_s"].to_numpy(float)
    done = requests["done_s"].to_numpy(float)
    n = len(arrival)
    first = min(math.ceil(cfg.warmup_fraction * n), n - 1)
    t0, t1 = float(arrival[first]), float(arrival[-1])
    times, counts = token_times(requests, iterations)
    if t1 <= t0:  # one request, or all at once: the whole run is the window
        t0, t1 = 0.0, float(np.nanmax(done))
    else:
        edges = np.linspace(arrival[0], t1, MSER_BINS + 1)
        rate = np.histogram(times, bins=edges, weights=counts)[0]
        t0 = max(t0, float(edges[mser_truncation(rate)]))
    inside = (arrival >= t0) & (arrival <= t1)
    edges = np.linspace(t0, t1, cfg.batches + 1)
    per_batch = np.histogram(times, bins=edges, weights=counts)[0] / np.diff(edges)
    tokens_per_s = float(per_batch.mean())
    k = len(per_batch)
    ci = (
        float(stats.t.ppf(0.975, k - 1) * per_batch.std(ddof=1) / math.sqrt(k))
        if k > 1
        else math.nan
    )
    completed = float(((done >= t0) & (done <= t1)).sum())
    admitted = requests["admitted_s"].to_numpy(float)
    watched = {
        "queue": (in_system_at(arrival[inside], arrival, admitted).astype(float), 1.0),
        "ttft": (requests["ttft_s"].to_numpy(float)[inside], 0.0),
    }
    growth, reasons = {}, []
    for name, (values, floor) in watched.items():
        ratio, grows = _growth(values, cfg.growth_tolerance, floor)
        growth[name] = ratio if math.isfinite(ratio) else None  # too few arrivals to tell
        if grows:
            size = f"{ratio:.2f}x" if math.isfinite(ratio) else "from zero"
            reasons.append(f"{name} grows {size} over the last quarter of the window")
    return SteadyWindow(
        start_s=t0,
        end_s=t1,
        requests=inside,
        tokens_per_s=tokens_per_s,
        tokens_per_s_ci=ci,
        requests_per_s=completed / (t1 - t0),
        arrival_rate_per_s=float(inside.sum()) / (t1 - t0),
        mean_requests_in_system=time_average_in_system(arrival, done, t0, t1),
        growth=growth,
        stable=not reasons,
        unstable_reason="; ".join(reasons),
    )
