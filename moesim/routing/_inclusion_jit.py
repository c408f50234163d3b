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
``(1 - q_j + q_j z)`` truncated to degree ``k - 1`` (leave-one-out without division), and the
integral from Gauss-Legendre quadrature in ``log u`` between ``u_lo`` (where fewer than k
arrivals is certain to 1e-12, below which the integrand is ``p_e exp(-p_e u)`` and integrates
in closed form) and ``u_hi`` (where ``sum_j q_j`` is ``k + 10 sqrt(k) + 40``, so k or more
arrivals is certain to far below 1e-12).
"""

from __future__ import annotations

import math

import numpy as np

try:  # pragma: no cover - exercised where numba is installed
    from numba import njit
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
        lo, hi = u_lo, max(u_lo, target)
        while _arrivals(p, hi) < target:
            hi *= 2.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if _arrivals(p, mid) < target:
                lo = mid
            else:
                hi = mid
        u_hi = hi
    for j in range(n):
        pi[j] = -math.expm1(-p[j] * u_lo)
    if u_hi <= u_lo:
        return pi
    a, b = math.log(u_lo), math.log(u_hi)
    half = 0.5 * (b - a)
    pre = np.empty((n + 1, k))
    suf = np.empty((n + 1, k))
    q = np.empty(n)
    for i in range(x.shape[0]):
        u = math.exp(half * x[i] + 0.5 * (a + b))
        for j in range(n):
            q[j] = -math.expm1(-p[j] * u)
        for m in range(k):
            pre[0, m] = 0.0
            suf[n, m] = 0.0
        pre[0, 0] = 1.0
        suf[n, 0] = 1.0
        for j in range(n):
            s, t = 1.0 - q[j], q[j]
            pre[j + 1, 0] = pre[j, 0] * s
            for m in range(1, k):
                pre[j + 1, m] = pre[j, m] * s + pre[j, m - 1] * t
        for j in range(n - 1, -1, -1):
            s, t = 1.0 - q[j], q[j]
            suf[j, 0] = suf[j + 1, 0] * s
            for m in range(1, k):
                suf[j, m] = suf[j + 1, m] * s + suf[j + 1, m - 1] * t
        for j in range(n):
            below, cum = 0.0, 0.0  # P(N_{-j} <= k - 1)
            for m in range(k - 1, -1, -1):
                cum += suf[j + 1, k - 1 - m]
                below += pre[j, m] * cum
            v = p[j] * u
            pi[j] += half * wx[i] * below * v * math.exp(-v)  # du = u dlog(u)
    return pi
