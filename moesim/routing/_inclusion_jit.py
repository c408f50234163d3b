"""Top-k inclusion probabilities of Plackett-Luce (Gumbel-top-k) sampling, as loops.

Compiled with numba where it is installed (``cache=True``: the machine code is kept next to
this file, so a second process pays no compile); the same functions run as plain Python
otherwise (slowly, but with the same results).

A token's top-k under Gumbel-perturbed log preferences is the ``k`` smallest of
``T_j = X_j / p_j`` with ``X_j ~ Exp(1)`` independent (``-log X`` is a standard Gumbel), so

    pi_e = P(e in top k) = int_0^inf P(N_{-e}(u) <= k - 1) p_e exp(-p_e u) du,

with ``N_{-e}(u)`` the number of other experts arrived by ``u``: a Poisson-binomial count of
independent indicators of probability ``q_j(u) = 1 - exp(-p_j u)``. Its distribution up to
``k - 1`` comes from prefix and suffix products of the generating polynomials
``(1 - q_j + q_j z)`` truncated to degree ``k - 1``: an expert with ``q_j <= 1/2`` is left out
by dividing its factor out of the full product (stable: errors shrink by ``q/(1-q) <= 1`` a
degree), the others by prefix and suffix products among themselves; and the
integral from Gauss-Legendre quadrature in ``log u`` between ``u_lo`` (where fewer than k
arrivals is certain to 1e-12, below which the integrand is ``p_e exp(-p_e u)`` and integrates
in closed form) and ``u_hi`` (where ``sum_j q_j`` first reaches ``k + 10 sqrt(k) + 40`` on a
doubling search, so k or more arrivals is certain to far below 1e-12).
"""

from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - exercised where numba is installed
    from moesim._jit import njit
except ImportError:  # pragma: no cover - numba not installed

    def njit(**_kwargs):
        return lambda fn: fn


@njit(cache=True)
def _arrivals(p: np.ndarray, u: float) -> float:  # pragma: no cover - compiled
    """Expected arrivals by ``u``: ``sum_j 1 - exp(-p_j u)``."""
    total = 0.0
    for j in range(p.shape[0]):
        total += -math.expm1(-p[j] * u)
    return total


@njit(cache=True)
def inclusion_quadrature(
    p: np.ndarray, k: int, x: np.ndarray, wx: np.ndarray
) -> np.ndarray:  # pragma: no cover - compiled
    """``pi_e`` for preferences ``p`` (summing to 1, all > 0) and Gauss-Legendre nodes ``x``
    with weights ``wx`` on [-1, 1] (see the module docstring)."""
    n = p.shape[0]
    pi = np.zeros(n)
    if k >= n:
        pi[:] = 1.0
        return pi
    # lower end: P(N >= k) <= (sum q)^k / k! <= u^k / k!, below 1e-12
    u_lo = math.exp((math.log(1e-12) + math.lgamma(k + 1.0)) / k)
    target = k + 10.0 * math.sqrt(k) + 40.0
    if target >= n - 1:
        p_min = p[0]
        for j in range(n):
            p_min = min(p_min, p[j])
        u_hi = 40.0 / p_min
    else:
        hi = max(u_lo, target)  # sum_j q_j(u) <= u sum_j p_j = u: never past the target yet
        while _arrivals(p, hi) < target:
            hi *= 2.0
        u_hi = hi
    for j in range(n):
        pi[j] = -math.expm1(-p[j] * u_lo)
    if u_hi <= u_lo:
        return pi
    a, b = math.log(u_lo), math.log(u_hi)
    half = 0.5 * (b - a)
    q = np.empty(n)
    heavy = np.empty(n, np.int64)
    light = np.empty(k)  # product over the light experts, truncated to degree k - 1
    full = np.empty(k)
    loo = np.empty(k)
    tmp = np.empty(k)
    pre = np.empty((n + 1, k))
    suf = np.empty((n + 1, k))
    for i in range(x.shape[0]):
        u = math.exp(half * x[i] + 0.5 * (a + b))
        n_heavy = 0
        for m in range(k):
            light[m] = 0.0
        light[0] = 1.0
        for j in range(n):
            q[j] = -math.expm1(-p[j] * u)
            if q[j] > 0.5:  # dividing its factor out again would be unstable
                heavy[n_heavy] = j
                n_heavy += 1
                continue
            _times_factor(light, q[j], k)
        # heavy experts: prefix and suffix products, so each can be left out without division
        for m in range(k):
            pre[0, m] = 0.0
            suf[n_heavy, m] = 0.0
        pre[0, 0] = 1.0
        suf[n_heavy, 0] = 1.0
        for h in range(n_heavy):
            for m in range(k):
                pre[h + 1, m] = pre[h, m]
            _times_factor(pre[h + 1], q[heavy[h]], k)
        for h in range(n_heavy - 1, -1, -1):
            for m in range(k):
                suf[h, m] = suf[h + 1, m]
            _times_factor(suf[h], q[heavy[h]], k)
        _product(light, pre[n_heavy], full, k)
        w = half * wx[i]
        for j in range(n):
            if q[j] > 0.5:
                continue
            # leave expert j out of the full product: divide by (1 - q_j + q_j z), q_j <= 1/2
            s_, t_ = 1.0 - q[j], q[j]
            prev, below = 0.0, 0.0
            for m in range(k):
                prev = (full[m] - t_ * prev) / s_
                below += prev
            pi[j] += w * below * p[j] * u * s_  # s_ = exp(-p_j u)
        for h in range(n_heavy):
            _product(pre[h], suf[h + 1], tmp, k)
            _product(tmp, light, loo, k)
            below = 0.0
            for m in range(k):
                below += loo[m]
            j = heavy[h]
            pi[j] += w * below * p[j] * u * (1.0 - q[j])
    return pi


@njit(cache=True)
def _times_factor(poly: np.ndarray, q: float, k: int) -> None:  # pragma: no cover - compiled
    """``poly *= (1 - q + q z)`` in place, truncated to degree ``k - 1``."""
    for m in range(k - 1, 0, -1):
        poly[m] = poly[m] * (1.0 - q) + poly[m - 1] * q
    poly[0] *= 1.0 - q


@njit(cache=True)
def _product(
    f: np.ndarray, g: np.ndarray, out: np.ndarray, k: int
) -> None:  # pragma: no cover - compiled
    """``out = f g`` truncated to degree ``k - 1`` (``out`` may not alias ``f`` or ``g``)."""
    for m in range(k):
        acc = 0.0
        for a in range(m + 1):
            acc += f[a] * g[m - a]
        out[m] = acc
