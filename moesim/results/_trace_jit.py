"""trace.json's slice rows written as bytes, as loops (numba, ``cache=True``).

A row is ``head + ts + ', "dur": ' + dur + tail``: the head and the tail each one of a few
distinct texts, ``ts`` and ``dur`` microseconds to the nanosecond. Given whole nanoseconds
``v`` (``0 <= v < 2^53``), ``v / 1e3`` is the double nearest ``q.rrr`` (``q = v // 1000``,
``r = v % 1000``), and ``repr`` of it writes that decimal: no shorter one lies within half a
step of a double below 2^53 / 1000 (two decimals of three places differ by 0.001, far more
than the double spacing there), and it is below 1e16 and not below 1e-4 (or 0), where
``repr`` would switch to an exponent. So ``q``, ``.``, and ``r`` as three digits without
their trailing zeros (``0`` where ``r`` is 0) are the bytes ``json.dumps`` writes; the
caller keeps values outside that range (and -0.0) on the ``repr`` path.
"""

from __future__ import annotations

import numpy as np

from moesim._jit import njit


@njit(cache=True)
def _number_len(v: int) -> int:  # pragma: no cover - compiled
    """Bytes of ``repr(v / 1e3)`` for whole nanoseconds ``v`` (see the module)."""
    q, r = v // 1000, v % 1000
    n = 1
    while q >= 10:
        q //= 10
        n += 1
    if r == 0:
        return n + 2
    frac = 3
    while r % 10 == 0:
        r //= 10
        frac -= 1
    return n + 1 + frac


@njit(cache=True)
def _put_number(out: np.ndarray, at: int, v: int, n: int) -> int:  # pragma: no cover
    """Write ``repr(v / 1e3)`` (``n`` bytes, :func:`_number_len`) at ``out[at:]``; the end."""
    q, r = v // 1000, v % 1000
    if r == 0:
        frac = 1
        digits = 0
    else:
        frac = 3
        digits = r
        while digits % 10 == 0:
            digits //= 10
            frac -= 1
    end = at + n
    pos = end - 1
    for _ in range(frac):  # the fraction, from its last digit
        out[pos] = 48 + digits % 10
        digits //= 10
        pos -= 1
    out[pos] = 46  # "."
    pos -= 1
    while True:  # the whole microseconds
        out[pos] = 48 + q % 10
        q //= 10
        pos -= 1
        if q == 0:
            break
    return end


@njit(cache=True)
def interval_rows(
    pool: np.ndarray,
    ptr: np.ndarray,
    head: np.ndarray,
    tail: np.ndarray,
    start_ns: np.ndarray,
    end_ns: np.ndarray,
    mid: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """The rows ``pool[ptr[head[i]]:ptr[head[i] + 1]] + repr(start_ns[i] / 1e3) + mid +
    repr((end_ns[i] - start_ns[i]) / 1e3) + pool[ptr[tail[i]]:...]`` one after another, as
    bytes (``pool`` the distinct texts encoded back to back, ``ptr`` their offsets)."""
    n = start_ns.shape[0]
    total = 0
    for i in range(n):
        s, d = np.int64(start_ns[i]), np.int64(end_ns[i]) - np.int64(start_ns[i])
        total += ptr[head[i] + 1] - ptr[head[i]] + ptr[tail[i] + 1] - ptr[tail[i]]
        total += _number_len(s) + mid.shape[0] + _number_len(d)
    out = np.empty(total, np.uint8)
    at = 0
    for i in range(n):
        for j in range(ptr[head[i]], ptr[head[i] + 1]):
            out[at] = pool[j]
            at += 1
        s, d = np.int64(start_ns[i]), np.int64(end_ns[i]) - np.int64(start_ns[i])
        at = _put_number(out, at, s, _number_len(s))
        for j in range(mid.shape[0]):
            out[at] = mid[j]
            at += 1
        at = _put_number(out, at, d, _number_len(d))
        for j in range(ptr[tail[i]], ptr[tail[i] + 1]):
            out[at] = pool[j]
            at += 1
    return out
