"""Compiled progressive filling for :func:`moesim.network.fluid.maxmin_rates`.

The same algorithm as the numpy version there (which stays as the reference and the fallback
where numba is not installed), as loops: the filling rounds are sequential by nature, and
compiled they cost O(rounds x live links + incidences) with no per-round call overhead, 5-7x
faster on DeepSeek-V3 all-to-alls than the vectorised version. Compiled once per machine
(``cache=True`` keeps the machine code next to this file).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def build_csr(
    paths: np.ndarray, n_links: int, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Flows by link (CSR ``ptr[n_links + 1]``, ``flows``) over the ``rows`` selected."""
    n_flows, width = paths.shape
    ptr = np.zeros(n_links + 1, np.int64)
    for f in range(n_flows):
        if not rows[f]:
            continue
        for h in range(width):
            link = paths[f, h]
            if link < 0:
                break
            ptr[link + 1] += 1
    for link in range(n_links):
        ptr[link + 1] += ptr[link]
    fill = ptr[:-1].copy()
    flows = np.empty(ptr[n_links], np.int64)
    for f in range(n_flows):
        if not rows[f]:
            continue
        for h in range(width):
            link = paths[f, h]
            if link < 0:
                break
            flows[fill[link]] = f
            fill[link] += 1
    return ptr, flows


@njit(cache=True)
def maxmin_csr(
    paths: np.ndarray,
    capacity: np.ndarray,
    weight: np.ndarray,
    tolerance: float,
    active: np.ndarray,
    alive: np.ndarray,
    ptr: np.ndarray,
    flows_by_link: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """Progressive filling given flows by link (:func:`build_csr`, over at least the live
    rows; rows not ``alive`` in it are skipped), so a caller that keeps the CSR between solves
    pays one pass over the live flows for the link loads plus one to freeze them.

    A round divides only where it must: every live link's share ``cap / load`` is first
    estimated as ``cap x (1 / load)`` (the reciprocal kept per link, renewed when its load
    changes), within a few ulps of the quotient; the exact quotient is then taken for the
    links whose estimate is within a 1e-12 margin of the smallest estimate's saturation
    threshold. Those include the link of the smallest share and every link that saturates,
    so the step, the links saturated and every floating-point operation on capacities and
    loads are those of dividing every link: the same rates, bit for bit."""
    n_flows, width = paths.shape
    n_links = capacity.shape[0]
    cap = capacity.copy()
    load = np.zeros(n_links)
    for link in range(n_links):
        active[link] = False
    wmin = np.inf
    for f in range(n_flows):
        if not alive[f]:
            continue
        w = weight[f]
        if w < wmin:
            wmin = w
        for h in range(width):
            link = paths[f, h]
            if link < 0:
                break
            load[link] += w
            active[link] = True
    eps = 1e-9 * wmin
    inv = np.empty(n_links)
    live = np.empty(n_links, np.int64)
    approx = np.empty(n_links)
    cand = np.empty(n_links, np.int64)
    cshare = np.empty(n_links)
    n_live = 0
    amin = np.inf
    for link in range(n_links):
        if load[link] > eps:
            live[n_live] = link
            inv[link] = 1.0 / load[link]
            a = cap[link] * inv[link]
            approx[n_live] = a
            if a < amin:
                amin = a
            n_live += 1
    rate = np.zeros(n_flows)
    frozen = ~alive
    sat = np.empty(n_links, np.int64)
    level = 0.0
    margin = 1.0 + 1e-12
    while n_live > 0:
        # candidates: every link whose exact share could be the smallest or saturate
        bound = (amin + tolerance * (level + amin)) * margin
        if bound < 0:  # a share rounded below zero: the margin widens toward zero
            bound = bound / margin / margin
        n_cand = 0
        step = np.inf
        every = False
        while n_cand == 0:  # a second pass divides everywhere (no estimate within the margin)
            for i in range(n_live):
                if every or approx[i] <= bound:
                    link = live[i]
                    s = cap[link] / load[link]
                    cand[n_cand] = link
                    cshare[n_cand] = s
                    n_cand += 1
                    if s < step:
                        step = s
            every = True  # n_live > 0: the second pass finds every live link
        level += step
        thr = step + tolerance * level
        for i in range(n_live):
            link = live[i]
            cap[link] -= step * load[link]
        n_sat = 0
        for k in range(n_cand):
            if cshare[k] <= thr:
                sat[n_sat] = cand[k]
                n_sat += 1
        for k in range(n_sat):
            link = sat[k]
            for e in range(ptr[link], ptr[link + 1]):
                f = flows_by_link[e]
                if frozen[f]:
                    continue
                frozen[f] = True
                w = weight[f]
                rate[f] = level * w
                for h in range(width):
                    link2 = paths[f, h]
                    if link2 < 0:
                        break
                    load[link2] -= w
                    inv[link2] = 1.0 / load[link2] if load[link2] != 0.0 else 0.0
        for k in range(n_sat):
            load[sat[k]] = 0.0
        j = 0
        amin = np.inf
        for i in range(n_live):
            link = live[i]
            if load[link] > eps:
                live[j] = link
                a = cap[link] * inv[link]
                approx[j] = a
                if a < amin:
                    amin = a
                j += 1
        n_live = j
    return rate


@njit(cache=True)
def maxmin_kernel(
    paths: np.ndarray,
    capacity: np.ndarray,
    weight: np.ndarray,
    tolerance: float,
    active: np.ndarray,
    alive: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """Weighted max-min rates; arguments as in ``maxmin_rates`` (weight required). Flows not
    ``alive`` are skipped (rate 0); ``active`` (bool, one per link) is set to the links that
    carry a live flow."""
    ptr, flows_by_link = build_csr(paths, capacity.shape[0], alive)
    return maxmin_csr(paths, capacity, weight, tolerance, active, alive, ptr, flows_by_link)


@njit(cache=True)
def due_rows(
    remaining: np.ndarray,
    rate: np.ndarray,
    start: np.ndarray,
    latency: np.ndarray,
    floor: np.ndarray,
    alive: np.ndarray,
    now: float,
    tolerance: float,
    elapsed: float,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """First advance every live flow by ``rate x elapsed`` (in place); then the live flows
    inside their completion window (``FluidNetwork._window``) and the delay until each is
    delivered: its finish at the current rate plus its path latency."""
    n = remaining.shape[0]
    idx = np.empty(n, np.int64)
    delay = np.empty(n)
    k = 0
    for f in range(n):
        if not alive[f]:
            continue
        if elapsed > 0:
            remaining[f] -= rate[f] * elapsed
        age = now - start[f] + latency[f]
        if age < floor[f]:
            age = floor[f]
        r = rate[f]
        if remaining[f] <= r * tolerance * age + 1e-9:
            idx[k] = f
            finish = remaining[f] / r if r > 0 else 0.0
            delay[k] = latency[f] + max(finish, 0.0)
            k += 1
    return idx[:k], delay[:k]


@njit(cache=True)
def deliver(
    group_ptr: np.ndarray,
    groups: np.ndarray,
    slots: np.ndarray,
    at_s: np.ndarray,
    group_left: np.ndarray,
    group_at: np.ndarray,
) -> np.ndarray:  # pragma: no cover - compiled
    """Count the delivery of each slot (at ``at_s``) to the groups it feeds (CSR): keep each
    group's latest arrival, and return the groups whose last slot this was, ascending."""
    total = 0
    for i in range(slots.shape[0]):
        total += group_ptr[slots[i] + 1] - group_ptr[slots[i]]
    done = np.empty(total, np.int64)
    k = 0
    for i in range(slots.shape[0]):
        s, t = slots[i], at_s[i]
        for e in range(group_ptr[s], group_ptr[s + 1]):
            g = groups[e]
            if t > group_at[g]:
                group_at[g] = t
            group_left[g] -= 1
            if group_left[g] == 0:
                done[k] = g
                k += 1
    return np.sort(done[:k])


@njit(cache=True)
def next_finish_s(
    remaining: np.ndarray, rate: np.ndarray, alive: np.ndarray
) -> float:  # pragma: no cover - compiled
    """Seconds until the first live flow finishes at its current rate."""
    best = np.inf
    for f in range(remaining.shape[0]):
        if alive[f] and rate[f] > 0:
            t = remaining[f] / rate[f]
            if t < best:
                best = t
    return best


@njit(cache=True)
def link_loads(
    paths: np.ndarray, nbytes: np.ndarray, n_links: int
) -> np.ndarray:  # pragma: no cover - compiled
    """Bytes on each link: every pair's ``nbytes`` added to each link of its path."""
    loads = np.zeros(n_links)
    n_pairs, width = paths.shape
    for p in range(n_pairs):
        b = nbytes[p]
        for h in range(width):
            link = paths[p, h]
            if link < 0:
                break
            loads[link] += b
    return loads


@njit(cache=True)
def merge_contributions(
    every: np.ndarray,
    nbytes: np.ndarray,
    weight: np.ndarray,
    times: np.ndarray,
    contributors_left: np.ndarray,
    count: np.ndarray,
    acc_bytes: np.ndarray,
    acc_weight: np.ndarray,
    first: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Several senders' contributions summed per slot (``every[i]`` the slot of entry ``i``):
    the slots ascending, their bytes and weights (added in entry order, as ``np.bincount``
    adds them) and their first sending time; ``contributors_left`` loses each slot's count.
    ``count``/``acc_*``/``first`` are scratch, one per slot of the block, zero (``first``:
    inf) on entry and left so, so that the cost is the entries', not the block's slots'."""
    m = every.shape[0]
    touched = np.empty(m, np.int64)
    k = 0
    for i in range(m):
        s = every[i]
        if count[s] == 0:
            touched[k] = s
            k += 1
        count[s] += 1
        acc_bytes[s] += nbytes[i]
        acc_weight[s] += weight[i]
        if times[i] < first[s]:
            first[s] = times[i]
    slots = np.sort(touched[:k])
    out_bytes = np.empty(k)
    out_weight = np.empty(k)
    out_first = np.empty(k)
    for j in range(k):
        s = slots[j]
        out_bytes[j] = acc_bytes[s]
        out_weight[j] = acc_weight[s]
        out_first[j] = first[s]
        contributors_left[s] -= count[s]
        count[s] = 0
        acc_bytes[s] = 0.0
        acc_weight[s] = 0.0
        first[s] = np.inf
    return slots, out_bytes, out_weight, out_first
