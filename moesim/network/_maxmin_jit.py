"""Compiled progressive filling for :func:`moesim.network.fluid.maxmin_rates`.

The same algorithm as the numpy version there (``maxmin_rates_by_component``, which stays
as the reference and the fallback where numba is not installed), as loops: the
filling rounds are sequential by nature, and compiled they cost O(incidences + the sum over
components of rounds x links) with no per-round call overhead. The network re-solves only
the components whose flows changed. Compiled once per machine (``cache=True`` keeps the
machine code next to this file).
"""

from __future__ import annotations

import numpy as np

from moesim._jit import njit


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
def _find(parent: np.ndarray, a: int) -> int:  # pragma: no cover - compiled
    """Root of ``a`` in a union-find forest, compressing the path on the way."""
    root = a
    while parent[root] != root:
        root = parent[root]
    while parent[a] != root:
        nxt = parent[a]
        parent[a] = root
        a = nxt
    return root


@njit(cache=True)
def _sort_small(a: np.ndarray) -> None:  # pragma: no cover - compiled
    """Sort ``a`` in place: insertion sort where short (a component's links), else numba's
    (whose call costs more than sorting a few dozen numbers)."""
    n = a.shape[0]
    if n > 64:
        a[:] = np.sort(a)
        return
    for i in range(1, n):
        x = a[i]
        j = i - 1
        while j >= 0 and a[j] > x:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x


@njit(cache=True)
def maxmin_components(
    paths: np.ndarray,
    capacity: np.ndarray,
    weight: np.ndarray,
    tolerance: float,
    alive: np.ndarray,
    ptr: np.ndarray,
    flows_by_link: np.ndarray,
    dirty: np.ndarray,
    rate: np.ndarray,
) -> None:  # pragma: no cover - compiled
    """Weighted max-min rates by progressive filling, run separately on each connected
    component of the live flows (two flows connect when they share a link), in place in
    ``rate``, and only on the components that hold a ``dirty`` link (one whose flows or
    weights changed since the last solve); ``dirty`` is cleared.

    A component with no dirty link has the flows, weights and links of its last solve, so
    its rates stand: re-solving only the others gives the rates of solving every component.
    The dirty components are found by a breadth-first search from their dirty links over
    ``ptr``/``flows_by_link`` (flows by link, :func:`build_csr`, over at least the live
    rows; rows not ``alive`` are skipped), so a solve costs the size of the components it
    re-fills, not of the network; the search sums each link's load as it visits the link
    (all its live flows are in its component). The components' links are put in ascending
    id by one pass over every link where they are at least an eighth of the network
    (cheaper than sorting each of hundreds of components), else by a sort per component.
    Each round of a filling takes the next round's smallest share in the pass that drops
    its saturated links. Each component's filling is
    :func:`moesim.network.fluid.maxmin_rates_numpy` on its flows alone: its own fill level
    (so the tolerance lumps links of one component only), ``eps = 1e-9 x`` its smallest
    weight, its links' loads summed over their flows in row order and its links taken in
    ascending id, the floating-point operations of filling it alone."""
    n_flows, width = paths.shape
    n_links = capacity.shape[0]
    seen = np.zeros(n_links, np.bool_)
    frozen = np.ones(n_flows, np.bool_)  # flows not alive or of a component kept as it was
    links = np.empty(n_links, np.int64)  # the dirty components' links, one after another
    starts = np.empty(n_links + 1, np.int64)
    eps = np.empty(n_links)  # per component: 1e-9 x its least weight
    load = np.empty(n_links)  # valid on the dirty components' links
    n_comp = 0
    n_seen = 0
    for first in range(n_links):
        if not dirty[first]:
            continue
        dirty[first] = False
        if seen[first]:
            continue
        starts[n_comp] = n_seen
        tiny = np.inf
        seen[first] = True
        links[n_seen] = first
        n_seen += 1
        head = starts[n_comp]
        while head < n_seen:
            link = links[head]
            head += 1
            total = 0.0
            for e in range(ptr[link], ptr[link + 1]):  # its flows in row order
                f = flows_by_link[e]
                if not alive[f]:
                    continue
                w = weight[f]
                total += w
                if not frozen[f]:
                    continue
                frozen[f] = False
                rate[f] = 0.0
                if 1e-9 * w < tiny:
                    tiny = 1e-9 * w
                for h in range(width):
                    other = paths[f, h]
                    if other < 0:
                        break
                    if not seen[other]:
                        seen[other] = True
                        links[n_seen] = other
                        n_seen += 1
            load[link] = total
        eps[n_comp] = tiny
        n_comp += 1
    starts[n_comp] = n_seen
    by_id = n_seen * 8 >= n_links  # many links: one pass in id order sorts every component
    if by_id:
        comp = np.empty(n_links, np.int64)
        for c in range(n_comp):
            for i in range(starts[c], starts[c + 1]):
                comp[links[i]] = c
        fill = starts[:n_comp].copy()
        for link in range(n_links):
            if seen[link]:
                c = comp[link]
                links[fill[c]] = link
                fill[c] += 1
    cap = np.empty(n_links)
    live = np.empty(n_links, np.int64)
    share = np.empty(n_links)
    for c in range(n_comp):
        members = links[starts[c] : starts[c + 1]]
        if not by_id:
            _sort_small(members)
        tiny = eps[c]
        n_live = 0
        step = np.inf
        for i in range(members.shape[0]):
            link = members[i]
            cap[link] = capacity[link]
            if load[link] > tiny:
                live[n_live] = link
                s = cap[link] / load[link]
                share[n_live] = s
                if s < step:
                    step = s
                n_live += 1
        level = 0.0
        while n_live > 0:
            level += step
            thr = step + tolerance * level
            for i in range(n_live):
                link = live[i]
                cap[link] -= step * load[link]
            for i in range(n_live):
                if share[i] > thr:
                    continue
                link = live[i]
                for e in range(ptr[link], ptr[link + 1]):
                    f = flows_by_link[e]
                    if frozen[f]:
                        continue
                    frozen[f] = True
                    w = weight[f]
                    rate[f] = level * w
                    for h in range(width):
                        other = paths[f, h]
                        if other < 0:
                            break
                        load[other] -= w
            j = 0  # drop the saturated and emptied links; the next round's least share
            nxt = np.inf
            for i in range(n_live):
                link = live[i]
                if share[i] <= thr:
                    load[link] = 0.0
                elif load[link] > tiny:
                    live[j] = link
                    s = cap[link] / load[link]
                    share[j] = s
                    if s < nxt:
                        nxt = s
                    j += 1
            n_live = j
            step = nxt


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
    n_links = capacity.shape[0]
    ptr, flows_by_link = build_csr(paths, n_links, alive)
    for link in range(n_links):
        active[link] = ptr[link + 1] > ptr[link]
    rate = np.zeros(paths.shape[0])
    dirty = np.ones(n_links, np.bool_)
    maxmin_components(paths, capacity, weight, tolerance, alive, ptr, flows_by_link, dirty, rate)
    return rate


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
    paths: np.ndarray,
    waited: np.ndarray,
    link_flows: np.ndarray,
    dirty: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """First advance every live flow by ``rate x elapsed`` (in place); then retire the live
    flows inside their completion window (``FluidNetwork._window``): their rows and the
    delay until each is delivered (its finish at the current rate plus its path latency);
    each retired row is left dead (not alive, remaining inf, rate and wait 0), off its links'
    flow counts, and its links marked ``dirty``."""
    n = remaining.shape[0]
    width = paths.shape[1]
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
            alive[f] = False
            remaining[f] = np.inf
            rate[f] = 0.0
            waited[f] = 0.0
            for h in range(width):
                link = paths[f, h]
                if link < 0:
                    break
                link_flows[link] -= 1
                dirty[link] = True
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
    group's latest arrival, and return the groups whose last slot this was (in no order:
    numba's sort is several times slower than numpy's, which the caller uses)."""
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
    return done[:k]


@njit(cache=True)
def finish_rows(
    idx: np.ndarray,
    delay: np.ndarray,
    blk_col: np.ndarray,
    loc_col: np.ndarray,
    block: int,
    now: float,
    pos: np.ndarray,
    contributors_left: np.ndarray,
    group_ptr: np.ndarray,
    groups: np.ndarray,
    group_left: np.ndarray,
    group_at: np.ndarray,
) -> tuple[int, np.ndarray, int]:  # pragma: no cover - compiled
    """``FluidNetwork._finish`` of the retired rows ``idx`` (delivery delays ``delay``)
    that belong to ``block``: each one's slot idles (``pos`` -1); those with no contributor
    to come are delivered at ``now + delay`` to the groups they feed (:func:`deliver`, in
    the order of ``idx``). Returns how many slots were delivered, the groups whose last
    slot this was, and how many rows of ``idx`` belong to other blocks (left as they are)."""
    k = idx.shape[0]
    final = np.empty(k, np.int64)
    at_s = np.empty(k)
    n_final = 0
    others = 0
    for i in range(k):
        r = idx[i]
        if blk_col[r] != block:
            others += 1
            continue
        s = loc_col[r]
        pos[s] = -1
        if contributors_left[s] == 0:
            final[n_final] = s
            at_s[n_final] = now + delay[i]
            n_final += 1
    done = deliver(group_ptr, groups, final[:n_final], at_s[:n_final], group_left, group_at)
    return n_final, done, others


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
    entry_slot: np.ndarray,
    entry_bytes: np.ndarray,
    entry_weight: np.ndarray,
    first: np.ndarray,
    end: np.ndarray,
    times: np.ndarray,
    contributors_left: np.ndarray,
    acc: np.ndarray,
    mark: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Several senders' contributions summed per slot: sender ``j`` sent entries
    ``first[j]:end[j]`` (slot, bytes, weight each) at ``times[j]``. Returns the slots
    ascending, their bytes and weights (added in entry order, senders in the order given, as
    ``np.bincount`` adds them) and their first sending time; ``contributors_left`` loses
    each slot's count. ``acc`` (count, bytes, weight, first time: one row per slot of the
    block) and ``mark`` (a byte per slot: touched) are scratch, zero (first: inf) on entry
    and left so; the slots come out of a sweep of the touched range of ``mark`` (small
    enough to stay in cache) or, where that range is far wider than the slots, a sort."""
    m = 0
    for j in range(first.shape[0]):
        m += end[j] - first[j]
    touched = np.empty(m, np.int64)
    k = 0
    lo, hi = acc.shape[0], -1
    for j in range(first.shape[0]):
        t = times[j]
        for i in range(first[j], end[j]):  # branch-free: slots come in no predictable order
            s = entry_slot[i]
            touched[k] = s
            k += mark[s] == 0
            mark[s] = 1
            lo = min(lo, s)
            hi = max(hi, s)
            acc[s, 0] += 1.0
            acc[s, 1] += entry_bytes[i]
            acc[s, 2] += entry_weight[i]
            acc[s, 3] = min(acc[s, 3], t)
    if hi - lo < 64 * k:  # a branch-free sweep of the range beats sorting the slots
        slots = np.empty(k + 1, np.int64)
        j = 0
        for s in range(lo, hi + 1):
            slots[j] = s
            j += mark[s]
        slots = slots[:k]
    else:
        slots = np.sort(touched[:k])
    out_bytes = np.empty(k)
    out_weight = np.empty(k)
    out_first = np.empty(k)
    for j in range(k):
        s = slots[j]
        out_bytes[j] = acc[s, 1]
        out_weight[j] = acc[s, 2]
        out_first[j] = acc[s, 3]
        contributors_left[s] -= np.int64(acc[s, 0])
        mark[s] = 0
        acc[s, 0] = 0.0
        acc[s, 1] = 0.0
        acc[s, 2] = 0.0
        acc[s, 3] = np.inf
    return slots, out_bytes, out_weight, out_first


@njit(cache=True)
def contribution_sums(
    entry_contrib: np.ndarray,
    entry_pair: np.ndarray,
    entry_slot: np.ndarray,
    nbytes: np.ndarray,
    n_contrib: int,
    n_slots: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """A flow pattern's sums over its entries, in entry order: bytes and pairs with bytes
    per contribution, bytes per slot (``FlowPattern.contribution_sums``)."""
    out_bytes = np.zeros(n_contrib)
    out_weight = np.zeros(n_contrib)
    per_slot = np.zeros(n_slots)
    for i in range(entry_contrib.shape[0]):
        b = nbytes[entry_pair[i]]
        c = entry_contrib[i]
        out_bytes[c] += b
        out_weight[c] += 1.0 if b > 0 else 0.0
        per_slot[entry_slot[i]] += b
    return out_bytes, out_weight, per_slot


@njit(cache=True)
def split_contributions(
    nbytes: np.ndarray, weight: np.ndarray, slot: np.ndarray, offsets: np.ndarray
) -> tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray
]:  # pragma: no cover - compiled
    """A collective's contributions (sender ``g``'s are ``offsets[g]:offsets[g + 1]``)
    split in one pass into those that carry bytes (their slot, bytes and weight) and the
    others (their slot), each kept in order, with each sender's offsets into both
    (``FlowPattern.split_contributions``)."""
    n = nbytes.shape[0]
    n_senders = offsets.shape[0] - 1
    full_slot = np.empty(n, np.int64)
    full_bytes = np.empty(n)
    full_weight = np.empty(n)
    empty_slot = np.empty(n, np.int64)
    full_at = np.empty(n_senders + 1, np.int64)
    empty_at = np.empty(n_senders + 1, np.int64)
    k = 0
    z = 0
    for g in range(n_senders):
        full_at[g] = k
        empty_at[g] = z
        for i in range(offsets[g], offsets[g + 1]):
            if nbytes[i] > 0:
                full_slot[k] = slot[i]
                full_bytes[k] = nbytes[i]
                full_weight[k] = weight[i]
                k += 1
            else:
                empty_slot[z] = slot[i]
                z += 1
    full_at[n_senders] = k
    empty_at[n_senders] = z
    return full_slot[:k], full_bytes[:k], full_weight[:k], full_at, empty_slot[:z], empty_at


@njit(cache=True)
def count_off(
    contributors_left: np.ndarray,
    pos: np.ndarray,
    slots: np.ndarray,
    latency_s: np.ndarray,
    now: float,
    group_ptr: np.ndarray,
    groups: np.ndarray,
    group_left: np.ndarray,
    group_at: np.ndarray,
) -> tuple[int, np.ndarray]:  # pragma: no cover - compiled
    """One contribution counted off each of ``slots`` (distinct); the slots this leaves
    with no contributor to come and no flow in the network (``pos`` < 0) are delivered
    ``latency_s`` from ``now`` to the groups they feed (:func:`deliver`, ascending as
    given). Returns how many slots were delivered and the groups whose last slot this
    was."""
    final = np.empty(slots.shape[0], np.int64)
    at_s = np.empty(slots.shape[0])
    k = 0
    for i in range(slots.shape[0]):
        s = slots[i]
        contributors_left[s] -= 1
        if contributors_left[s] == 0 and pos[s] < 0:
            final[k] = s
            at_s[k] = now + latency_s[s]
            k += 1
    return k, deliver(group_ptr, groups, final[:k], at_s[:k], group_left, group_at)


@njit(cache=True)
def link_intervals(
    links: np.ndarray,
    link_flows: np.ndarray,
    link_active: np.ndarray,
    link_since: np.ndarray,
    busy_s: np.ndarray,
    now: float,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """End and start the busy intervals of ``links`` (ascending: those whose flows changed
    since the last call; every other link is as busy as it was) at ``now``: a link is busy
    while a live flow crosses it (``link_flows`` > 0); an interval that ends adds
    ``now - link_since`` to ``busy_s``. Returns the links whose interval ended and the start
    of each."""
    n_ended = 0
    for i in range(links.shape[0]):
        link = links[i]
        if link_active[link] and link_flows[link] <= 0:
            n_ended += 1
    ended = np.empty(n_ended, np.int64)
    ended_since = np.empty(n_ended)
    k = 0
    for i in range(links.shape[0]):
        link = links[i]
        active = link_flows[link] > 0
        if link_active[link] and not active:
            ended[k] = link
            ended_since[k] = link_since[link]
            busy_s[link] += now - link_since[link]
            k += 1
        elif active and not link_active[link]:
            link_since[link] = now
        link_active[link] = active
    return ended, ended_since


@njit(cache=True)
def _marked(flags: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """The indices of the set ``flags``, ascending."""
    n = 0
    for i in range(flags.shape[0]):
        if flags[i]:
            n += 1
    out = np.empty(n, np.int64)
    k = 0
    for i in range(flags.shape[0]):
        if flags[i]:
            out[k] = i
            k += 1
    return out


@njit(cache=True)
def backdate(
    remaining: np.ndarray, rate: np.ndarray, waited: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``FluidNetwork._backdate``: a flow that waited ``waited`` seconds to be admitted is
    credited ``rate x waited`` bytes (``remaining`` floored at 0); every wait is cleared.
    (Its own function: inlined into :func:`network_cycle`, this loop ran some 50x
    slower.)"""
    for f in range(remaining.shape[0]):
        if waited[f] > 0:
            left = remaining[f] - rate[f] * waited[f]
            remaining[f] = left if left >= 0.0 else 0.0  # as np.maximum
        waited[f] = 0.0


@njit(cache=True)
def network_cycle(
    remaining: np.ndarray,
    rate: np.ndarray,
    start: np.ndarray,
    latency: np.ndarray,
    floor: np.ndarray,
    alive: np.ndarray,
    waited: np.ndarray,
    weight: np.ndarray,
    paths: np.ndarray,
    solve_paths: np.ndarray,
    ptr: np.ndarray,
    flows_by_link: np.ndarray,
    capacity: np.ndarray,
    link_flows: np.ndarray,
    dirty: np.ndarray,
    link_active: np.ndarray,
    link_since: np.ndarray,
    busy_s: np.ndarray,
    now: float,
    tolerance: float,
    elapsed: float,
    admitted: bool,
) -> tuple[
    np.ndarray, np.ndarray, bool, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float
]:  # pragma: no cover - compiled
    """One cycle of ``FluidNetwork`` after its admissions, in one call: advance and retire
    (:func:`due_rows`); if a flow retired or ``admitted``, re-solve the rates
    (:func:`maxmin_components`, building the flows-by-link index first where ``ptr`` is
    empty) and end and start the busy intervals of the links whose flows changed, the
    ``dirty`` ones (a link is busy while a live flow crosses it: ``busy_s`` gains
    ``now - link_since`` at the end of each; every change of a link's flows marks it
    dirty, and the solve that clears the marks runs in the same call); after an
    admission, credit the late-admitted flows (``FluidNetwork._backdate``); then the
    seconds to the next finish among the live flows (inf if none).

    Returns the retired rows and their delivery delays, whether it solved, the index it
    solved with (``ptr``, ``flows_by_link``), the links whose busy interval ended with the
    start of each, and the seconds to the next finish."""
    idx, delay = due_rows(
        remaining, rate, start, latency, floor, alive, now, tolerance, elapsed, paths,
        waited, link_flows, dirty,
    )  # fmt: skip
    n_links = capacity.shape[0]
    n = remaining.shape[0]
    solved = idx.shape[0] > 0 or admitted
    ended, ended_since = np.empty(0, np.int64), np.empty(0)
    if solved:
        changed = _marked(dirty)  # every link whose flows changed (the solve clears them)
        any_alive = False
        for f in range(n):
            if alive[f]:
                any_alive = True
                break
        if any_alive:
            if ptr.shape[0] == 0:
                ptr, flows_by_link = build_csr(solve_paths, n_links, alive)
            maxmin_components(
                solve_paths, capacity, weight, tolerance, alive, ptr, flows_by_link, dirty, rate
            )
        ended, ended_since = link_intervals(
            changed, link_flows, link_active, link_since, busy_s, now
        )
        if admitted:
            backdate(remaining, rate, waited)
    wait = next_finish_s(remaining, rate, alive)
    return idx, delay, solved, ptr, flows_by_link, ended, ended_since, wait


@njit(cache=True)
def admit_block(
    entry_slot: np.ndarray,
    entry_bytes: np.ndarray,
    entry_weight: np.ndarray,
    first: np.ndarray,
    end: np.ndarray,
    times: np.ndarray,
    contributors_left: np.ndarray,
    pos: np.ndarray,
    acc: np.ndarray,
    mark: np.ndarray,
    paths: np.ndarray,
    solve_paths: np.ndarray,
    latency_s: np.ndarray,
    start_s: float,
    floor_s: float,
    block: int,
    now: float,
    remaining: np.ndarray,
    rate: np.ndarray,
    weight: np.ndarray,
    start: np.ndarray,
    latency: np.ndarray,
    floor: np.ndarray,
    waited: np.ndarray,
    alive: np.ndarray,
    blk: np.ndarray,
    loc: np.ndarray,
    path_store: np.ndarray,
    solve_store: np.ndarray,
    row0: int,
    dirty: np.ndarray,
    link_flows: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """``FluidNetwork._admit`` for one block: its senders' waiting entries
    (``first[j]:end[j]`` sent at ``times[j]``) summed per slot
    (:func:`merge_contributions`), or from a single sender (distinct slots) kept in order;
    a busy slot's flow grows (its links marked ``dirty``); an idle slot with bytes starts a
    flow in a new row from ``row0`` (the columns hold room for every entry); an idle slot
    with none is returned, with the time it is delivered (its first sending plus path
    latency). Returns the rows added and those slots and times."""
    if first.shape[0] == 1:
        slots = entry_slot[first[0] : end[0]].copy()
        nbytes = entry_bytes[first[0] : end[0]]
        wsum = entry_weight[first[0] : end[0]]
        sent = np.full(slots.shape[0], times[0])
        for i in range(slots.shape[0]):
            contributors_left[slots[i]] -= 1
    else:
        slots, nbytes, wsum, sent = merge_contributions(
            entry_slot, entry_bytes, entry_weight, first, end, times, contributors_left, acc,
            mark,
        )  # fmt: skip
    k = slots.shape[0]
    width, store_width = paths.shape[1], path_store.shape[1]
    solve_width, solve_store_width = solve_paths.shape[1], solve_store.shape[1]
    empty = np.empty(k, np.int64)
    empty_at = np.empty(k)
    n_empty = 0
    row = row0
    for i in range(k):
        s = slots[i]
        p = pos[s]
        if p >= 0:
            remaining[p] += nbytes[i]
            weight[p] += wsum[i]
            for h in range(store_width):
                link = path_store[p, h]
                if link < 0:
                    break
                dirty[link] = True
        elif nbytes[i] <= 0:
            empty[n_empty] = s
            empty_at[n_empty] = sent[i] + latency_s[s]
            n_empty += 1
        else:
            for h in range(width):
                link = paths[s, h]
                path_store[row, h] = link
                if link >= 0:
                    dirty[link] = True
                    link_flows[link] += 1
            for h in range(width, store_width):
                path_store[row, h] = -1
            if solve_store_width:
                for h in range(solve_width):
                    solve_store[row, h] = solve_paths[s, h]
                for h in range(solve_width, solve_store_width):
                    solve_store[row, h] = -1
            blk[row] = block
            loc[row] = s
            remaining[row] = nbytes[i]
            weight[row] = wsum[i]
            latency[row] = latency_s[s]
            start[row] = start_s
            floor[row] = floor_s
            rate[row] = 0.0
            waited[row] = now - sent[i]
            alive[row] = True
            pos[s] = row
            row += 1
    return row - row0, empty[:n_empty], empty_at[:n_empty]
