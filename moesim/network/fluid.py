"""Fluid network: concurrent flows share links max-min fairly, re-solved on every change.

The network owns the active flows as numpy columns. Collectives are registered as blocks of
slots (flows that one or more senders fill, see ``aggregate.py``). Its cycles are timeout
callbacks, one event each: a cycle runs at the earliest flow completion or batch of
admissions, advances every flow by ``rate x elapsed``, retires the flows inside their
completion window (their bytes arrive one path latency after their own finish), re-solves the
fair rates (compiled kernel, numpy fallback) and schedules the next. A receiver waits on one
event per collective, scheduled at its last arrival. Cost grows with the number of completion
and admission batches, not with tokens, bytes or flows delivered.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import simpy
from simpy.events import NORMAL

from moesim.network.topology import Topology, left_justify

_KERNELS: dict = {}


def _compiled():
    """The compiled kernels (numba, imported on first use: importing numba costs ~0.5 s), or
    an empty dict where numba is not installed; numpy versions do the same work slower."""
    if "loaded" not in _KERNELS:
        try:
            from moesim.network import _maxmin_jit as jit
        except ImportError:  # pragma: no cover - numba not installed
            _KERNELS["loaded"] = True
            return _KERNELS
        _KERNELS.update(
            maxmin=jit.maxmin_kernel,
            csr=jit.build_csr,
            components=jit.maxmin_components,
            deliver=jit.deliver,
            link_loads=jit.link_loads,
            merge=jit.merge_contributions,
            cycle=jit.network_cycle,
            admit=jit.admit_block,
            sums=jit.contribution_sums,
            split=jit.split_contributions,
            count_off=jit.count_off,
            finish=jit.finish_rows,
        )
        _KERNELS["loaded"] = True  # after the import: a concurrent caller imports too
    return _KERNELS


COMPILED_MIN_DEVICES = 16
"""Networks of fewer devices run the numpy kernels (the same arithmetic in the same order, so
the same rates): there, loading the compiled ones (about 0.5-1 s a process) costs more than
they save."""

COMPILED_MIN_ELEMENTS = 1 << 16
""":func:`link_loads` on fewer path entries sums with numpy (the same order of additions)."""


def link_loads(paths: np.ndarray, nbytes: np.ndarray, n_links: int) -> np.ndarray:
    """Bytes each link carries when pair ``p`` sends ``nbytes[p]`` along ``paths[p]``
    (-1 padded link ids); compiled where numba is installed and the paths are large."""
    kernel = _compiled().get("link_loads") if paths.size >= COMPILED_MIN_ELEMENTS else None
    if kernel is not None:
        return kernel(np.ascontiguousarray(paths, np.int64), np.asarray(nbytes, float), n_links)
    valid = paths >= 0
    weights = np.broadcast_to(np.asarray(nbytes, float)[:, None], paths.shape)[valid]
    return np.bincount(paths[valid], weights=weights, minlength=n_links)


WARM_KERNELS = ("cycle", "admit", "deliver", "finish", "link_loads", "sums", "split", "count_off")
"""The kernels :func:`warm_up` loads: those the network calls from Python."""


def kernels_cached() -> bool:
    """Whether numba's on-disk cache holds every kernel :func:`warm_up` loads, for this
    source (its index matches the file's stamp): False on a machine's first run, or after
    the source changed, when loading them means compiling them (10-20 s on 2 cores). True
    where numba is missing or its cache cannot be read (nothing to announce). Reads numba's
    cache index (``Dispatcher._cache``, numba's own)."""
    k = _compiled()
    if not k:
        return True
    try:
        return all(bool(k[name]._cache._cache_file._load_index()) for name in WARM_KERNELS)
    except Exception:  # another numba's cache layout: say nothing
        return True


COMPILING = (
    "moesim: compiling the network kernels for this machine (once: numba caches them; 10-20 s)"
)
"""The line printed on stderr (by ``moesim run``, ``moesim sweep`` and a discrete-event run
with progress on) when the kernels a run needs are not cached yet."""


def kernels_cold(quiet: bool) -> bool:
    """Whether loading the compiled kernels means compiling them (:func:`kernels_cached` is
    False); says so on stderr (:data:`COMPILING`) unless ``quiet``."""
    cold = not kernels_cached()
    if cold and not quiet:
        print(COMPILING, file=sys.stderr, flush=True)
    return cold


def warm_up() -> None:
    """Load every compiled kernel that the network calls from Python (from numba's cache,
    compiling it once per machine) by running it on a tiny input, so that timings leave that
    one-off cost out. The kernels only they call (``build_csr``, ``maxmin_components``,
    ``merge_contributions``) come compiled into them, and :func:`maxmin_rates`' own
    (``maxmin_kernel``, which no run calls) loads on its first call: loading those four
    too cost about 40 ms a process."""
    k = _compiled()
    if not k:
        return
    paths, one = np.zeros((1, 1), dtype=np.int64), np.ones(1)
    yes, idx = np.ones(1, dtype=np.bool_), np.zeros(1, dtype=np.int64)
    none, zero = np.zeros(0, dtype=np.int64), np.zeros(1)
    acc, mark = np.array([[0.0, 0.0, 0.0, np.inf]]), np.zeros(1, dtype=np.uint8)
    k["cycle"](
        one.copy(), one.copy(), one, one, one, yes.copy(), zero.copy(), one, paths, paths, none,
        none, one, idx.copy(), yes.copy(), yes.copy(), zero.copy(), zero.copy(), 0.0, 1e-3, 0.0,
        True,
    )  # fmt: skip
    cols, fixed = [np.zeros(2) for _ in range(7)], _frozen(paths)
    store = np.full((2, 1), -1, dtype=np.int64)
    k["admit"](
        idx.copy(), one.copy(), one.copy(), idx, idx + 1, zero, np.ones(1, dtype=np.int64),
        np.full(1, -1),
        acc, mark, fixed, fixed, one, 0.0, 0.0, 0, 0.0, *cols, np.zeros(2, dtype=np.bool_),
        np.zeros(2, dtype=np.int64), np.zeros(2, dtype=np.int64), store, store.copy(), 0,
        yes.copy(), idx.copy(),
    )  # fmt: skip
    k["deliver"](np.array([0, 1]), idx, idx, one, np.ones(1, dtype=np.int64), np.zeros(1))
    k["finish"](
        idx, one, idx, idx, 0, 0.0, np.full(1, -1), np.ones(1, dtype=np.int64), np.array([0, 1]),
        idx, np.ones(1, dtype=np.int64), np.zeros(1),
    )  # fmt: skip
    k["link_loads"](paths, one, 1)
    frozen_bytes = np.ones(1)
    frozen_bytes.flags.writeable = False  # the plan's per-pair bytes are read-only
    k["sums"](idx, idx, idx, frozen_bytes, 1, 1)
    k["split"](one, one, idx, np.array([0, 1]))
    k["count_off"](
        np.ones(1, dtype=np.int64), np.full(1, -1, dtype=np.int64), idx, one, 0.0,
        np.array([0, 1]), idx, np.ones(1, dtype=np.int64), np.zeros(1),
    )  # fmt: skip


def compiled_kernel():
    """The compiled progressive filling, or None where numba is not installed."""
    return _compiled().get("maxmin")


def maxmin_rates(
    paths: np.ndarray,
    capacity_bytes_per_s: np.ndarray,
    weight: np.ndarray | None = None,
    tolerance: float = 1e-9,
    compiled: bool = True,
) -> np.ndarray:
    """Weighted max-min fair rates of flows over links, by progressive filling on each
    connected component of the flows on its own (:func:`maxmin_rates_by_component`); runs
    the compiled kernel when numba is available and ``compiled``."""
    return _rates_and_active(paths, capacity_bytes_per_s, weight, tolerance, compiled)[0]


def _rates_and_active(
    paths: np.ndarray,
    capacity_bytes_per_s: np.ndarray,
    weight: np.ndarray | None,
    tolerance: float,
    compiled: bool = True,
    alive: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Max-min rates and the mask of links that carry any flow; flows not ``alive`` are left
    out (rate 0)."""
    n_links = len(capacity_bytes_per_s)
    alive = np.ones(len(paths), dtype=np.bool_) if alive is None else alive
    kernel = compiled_kernel() if compiled and len(paths) else None
    if kernel is not None:
        w = np.ones(len(paths)) if weight is None else np.asarray(weight, dtype=float)
        active = np.zeros(n_links, dtype=np.bool_)
        rate = kernel(
            np.ascontiguousarray(paths, dtype=np.int64),
            np.asarray(capacity_bytes_per_s, dtype=float),
            w,
            float(tolerance),
            active,
            alive,
        )
        return rate, active
    rows = paths[alive]
    active = np.zeros(n_links, dtype=bool)
    active[rows[rows >= 0]] = True
    rate = np.zeros(len(paths))
    w = None if weight is None else np.asarray(weight, dtype=float)[alive]
    rate[alive] = maxmin_rates_by_component(rows, capacity_bytes_per_s, w, tolerance)
    return rate, active


def link_components(paths: np.ndarray, n_links: int) -> np.ndarray:
    """Connected components of flows over links (two flows connect where they share a
    link): for each link, the smallest link id of its component (a link no flow crosses is
    its own). Label propagation with pointer jumping, O(incidences x log diameter)."""
    label = np.arange(n_links)
    valid = paths >= 0
    if not valid.any():
        return label
    flow_of, link_of = np.nonzero(valid)[0], paths[valid]
    while True:
        flow_label = np.full(len(paths), n_links)
        np.minimum.at(flow_label, flow_of, label[link_of])
        new = label.copy()
        np.minimum.at(new, link_of, flow_label[flow_of])
        new = new[new]  # every label is a smaller id of the same component
        if np.array_equal(new, label):
            return label
        label = new


def maxmin_rates_by_component(
    paths: np.ndarray,
    capacity_bytes_per_s: np.ndarray,
    weight: np.ndarray | None = None,
    tolerance: float = 1e-9,
) -> np.ndarray:
    """Weighted max-min fair rates: :func:`maxmin_rates_numpy` run on each connected
    component of the flows (:func:`link_components`) with its own fill level, all components
    in the same vectorised rounds (the operations on each are those of solving it alone,
    ``eps`` from its own smallest weight included).

    Exact max-min rates (``tolerance`` 0) are the same as one filling over every flow
    (components share no link). With a tolerance, which saturates together the links
    within ``tolerance`` of the fill level, each component's own level keeps links of
    unrelated components from being lumped: a component's rates do not depend on flows it
    shares no link with."""
    n_flows = len(paths)
    rate = np.zeros(n_flows)
    if n_flows == 0:
        return rate
    weight = np.ones(n_flows) if weight is None else np.asarray(weight, dtype=float)
    cap = np.asarray(capacity_bytes_per_s, dtype=float).copy()
    n_links = len(cap)
    comp = link_components(paths, n_links)
    valid = paths >= 0
    flow_of = np.nonzero(valid)[0]
    link_of = paths[valid]
    by_link = np.argsort(link_of, kind="stable")
    flows_by_link = flow_of[by_link]
    ptr = np.searchsorted(link_of[by_link], np.arange(n_links + 1))
    load = np.bincount(link_of, weights=weight[flow_of], minlength=n_links)
    flow_comp = np.where(valid[:, 0], comp[np.maximum(paths[:, 0], 0)], 0)
    eps = np.full(n_links, np.inf)  # per link: 1e-9 x the least weight of its component
    np.minimum.at(eps, flow_comp[valid[:, 0]], 1e-9 * weight[valid[:, 0]])
    eps = eps[comp]
    live = np.flatnonzero(load > eps)
    live = live[np.argsort(comp[live], kind="stable")]  # by component, ascending within
    level = np.zeros(n_links)  # per component, at its label
    frozen = np.zeros(n_flows, dtype=bool)
    stamp = np.empty(n_flows, dtype=np.int64)
    while len(live):
        share = cap[live] / load[live]
        c = comp[live]
        first = np.flatnonzero(np.concatenate([[True], c[1:] != c[:-1]]))
        step = np.minimum.reduceat(share, first)
        level[c[first]] += step
        per_link = np.repeat(step, np.diff(np.append(first, len(live))))
        cap[live] -= per_link * load[live]
        sat = live[share <= per_link + tolerance * level[c]]
        starts, lens = ptr[sat], ptr[sat + 1] - ptr[sat]
        idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        new = flows_by_link[idx]
        new = new[~frozen[new]]
        if len(new) > 1:  # drop duplicates (a flow on two saturated links)
            stamp[new] = np.arange(len(new))
            new = new[stamp[new] == np.arange(len(new))]
        frozen[new] = True
        rate[new] = level[flow_comp[new]] * weight[new]
        rows = paths[new]
        ok = rows >= 0
        load -= np.bincount(
            rows[ok], weights=np.repeat(weight[new], ok.sum(axis=1)), minlength=n_links
        )
        load[sat] = 0.0
        live = live[load[live] > eps[live]]
    return rate


def maxmin_rates_numpy(
    paths: np.ndarray,
    capacity_bytes_per_s: np.ndarray,
    weight: np.ndarray | None = None,
    tolerance: float = 1e-9,
) -> np.ndarray:
    """Weighted max-min fair rates by progressive filling (Bertsekas & Gallager, *Data
    Networks*, Sec. 6.5.2), vectorised over a flow-link incidence.

    ``paths`` is ``[F, H]`` link ids padded with -1. All unfrozen flows grow together, flow
    ``f`` at ``weight[f]`` per unit of fill level; the link with the smallest remaining
    headroom saturates and freezes its flows; links within ``tolerance`` (relative) of that
    level saturate in the same round. Link loads are updated incrementally by the flows each
    round freezes, so a solve costs O(incidences + rounds x links).
    """
    n_flows = len(paths)
    rate = np.zeros(n_flows)
    if n_flows == 0:
        return rate
    unit = weight is None  # equal weights: cheaper unweighted counts below
    weight = np.ones(n_flows) if weight is None else np.asarray(weight, dtype=float)
    cap = np.asarray(capacity_bytes_per_s, dtype=float).copy()
    n_links = len(cap)
    valid = paths >= 0
    flow_of = np.nonzero(valid)[0]
    link_of = paths[valid]
    # stable argsort of small ints is a radix sort in numpy: much faster than a comparison sort
    keys = link_of.astype(np.uint16) if n_links <= np.iinfo(np.uint16).max else link_of
    by_link = np.argsort(keys, kind="stable")
    flows_by_link = flow_of[by_link]
    ptr = np.searchsorted(link_of[by_link], np.arange(n_links + 1))
    if unit:
        load = np.bincount(link_of, minlength=n_links).astype(float)
    else:
        load = np.bincount(link_of, weights=weight[flow_of], minlength=n_links)
    eps = 1e-9 * float(weight.min())
    alive = np.flatnonzero(load > eps)
    frozen = np.zeros(n_flows, dtype=bool)
    stamp = np.empty(n_flows, dtype=np.int64)
    level = 0.0
    while len(alive):
        share = cap[alive] / load[alive]
        step = float(share.min())
        level += step
        cap[alive] -= step * load[alive]
        # links whose fair level is within `tolerance` of this one saturate together
        sat = alive[share <= step + tolerance * level]
        starts, lens = ptr[sat], ptr[sat + 1] - ptr[sat]
        idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        new = flows_by_link[idx]
        new = new[~frozen[new]]
        if len(new) > 1:  # drop duplicates (a flow on two saturated links): keep last stamp
            stamp[new] = np.arange(len(new))
            new = new[stamp[new] == np.arange(len(new))]
        frozen[new] = True
        rows = paths[new]
        ok = rows >= 0
        if unit:
            rate[new] = level
            load -= np.bincount(rows[ok], minlength=n_links)
        else:
            rate[new] = level * weight[new]
            load -= np.bincount(
                rows[ok], weights=np.repeat(weight[new], ok.sum(axis=1)), minlength=n_links
            )
        load[sat] = 0.0
        alive = alive[load[alive] > eps]
    return rate


SMALL_MAX_HOPS = 1024
"""A solve of at most this many (flow, link) incidences runs :func:`maxmin_rates_small`
(plain Python: on a few dozen flows numpy's per-call overhead costs more than the work)."""


def maxmin_rates_small(
    rows: list[list[int]], capacity: list[float], weight: list[float], tolerance: float
) -> list[float]:
    """:func:`maxmin_rates_by_component` over Python lists, the same floating-point
    operations on each component in the same order (so the same rates, bit for bit):
    ``rows[f]`` the links of flow ``f`` (no padding), ``capacity`` per link, ``weight`` per
    flow (all given). Each link's load and flows are gathered in one pass over the rows
    (flows ascending, as ``np.bincount`` adds), its component found by a search over them
    (a link belongs to one component, so these are the component's own sums)."""
    n_flows = len(rows)
    rate = [0.0] * n_flows
    if not n_flows:
        return rate
    load: dict[int, float] = {}
    by_link: dict[int, list[int]] = {}
    for f, row in enumerate(rows):
        w = weight[f]
        for link in row:
            if link in load:
                load[link] += w
                by_link[link].append(f)
            else:
                load[link] = w
                by_link[link] = [f]
    cap = list(capacity)
    seen: set[int] = set()
    for first in by_link:
        if first in seen:
            continue
        seen.add(first)
        links, todo, tiny = [first], [first], math.inf
        while todo:
            for f in by_link[todo.pop()]:
                if weight[f] < tiny:
                    tiny = weight[f]
                for link in rows[f]:
                    if link not in seen:
                        seen.add(link)
                        links.append(link)
                        todo.append(link)
        eps = 1e-9 * tiny
        _fill_small(rows, sorted(x for x in links if load[x] > eps), load, by_link, cap,
                    weight, tolerance, eps, rate)  # fmt: skip
    return rate


def _fill_small(
    rows: list[list[int]],
    alive: list[int],
    load: dict[int, float],
    by_link: dict[int, list[int]],
    cap: list[float],
    weight: list[float],
    tolerance: float,
    eps: float,
    rate: list[float],
) -> None:
    """Progressive filling of one component (its loaded links ``alive``, ascending) in place
    in ``rate``, using up ``cap`` and ``load`` on its links."""
    frozen = set()
    level = 0.0
    while alive:
        share = [cap[link] / load[link] for link in alive]
        step = min(share)
        level += step
        for link in alive:
            cap[link] -= step * load[link]
        threshold = step + tolerance * level
        sat = [link for link, sh in zip(alive, share, strict=True) if sh <= threshold]
        new = [f for link in sat for f in by_link[link] if f not in frozen]
        if len(new) > 1:  # a flow on two saturated links: its last occurrence stays
            last = {f: i for i, f in enumerate(new)}
            new = [f for i, f in enumerate(new) if last[f] == i]
        delta: dict[int, float] = {}
        for f in new:
            frozen.add(f)
            w = weight[f]
            rate[f] = level * w
            for link in rows[f]:
                delta[link] = delta.get(link, 0.0) + w
        for link, d in delta.items():
            load[link] -= d
        for link in sat:
            load[link] = 0.0
        alive = [link for link in alive if load[link] > eps]


_COLUMNS = {
    "remaining": np.float64,  # bytes still to send
    "rate": np.float64,  # current max-min rate, bytes/s
    "weight": np.float64,  # device pairs merged into the flow (max-min weight)
    "start": np.float64,  # its block's first contribution
    "latency": np.float64,  # path latency
    "floor": np.float64,  # its block's lower bound on duration
    "waited": np.float64,  # seconds a just-admitted flow waited to be admitted
    "alive": np.bool_,  # False once retired (row kept until compaction)
    "blk": np.int64,  # block id
    "loc": np.int64,  # slot within the block
}


class _Column:
    """A view of the first ``_n`` rows of one of the network's flow columns."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name.lstrip("_")

    def __get__(self, net: FluidNetwork, owner: type | None = None) -> np.ndarray:
        return net._cols[self.key][: net._n]

    def __set__(self, net: FluidNetwork, value: np.ndarray) -> None:
        net._cols[self.key][: net._n] = value


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only C-contiguous int64 array (one type for the compiled kernels,
    which compile once per argument type)."""
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


@dataclass
class _Block:
    """Slots (flows that may receive bytes from several senders) registered together."""

    paths: np.ndarray
    latency_s: np.ndarray
    cap_min: np.ndarray  # slowest link on each slot's path (lower bound on its duration)
    group_ptr: np.ndarray  # CSR: slot -> global group ids it feeds
    groups: np.ndarray
    contributors_left: np.ndarray
    pos: np.ndarray  # index in the active arrays, -1 while idle
    contributions_left: int  # sum of contributors_left (the block is open while above 0)
    slots_left: int
    solve_paths: np.ndarray | None = None  # paths less the links that never set a rate
    floor_s: float = 0.0  # lower bound on the block's duration (its bottleneck link alone)
    start_s: float = np.inf  # first contribution
    open: bool = True  # some sender has yet to contribute
    counted: bool = False  # link bytes added to the stats at registration
    # its contributions, one entry per (sender, slot): slot, bytes, max-min weight; each
    # sender's entries a range, given at registration or appended by each contribution
    entry_slot: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    entry_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    entry_weight: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_entries: int = 0  # entries appended so far (all of them where given)
    given: bool = False  # entries given at registration
    # the senders' ranges waiting for admission, in arrival order, with their sending times
    wait_lo: list[int] = field(default_factory=list)
    wait_hi: list[int] = field(default_factory=list)
    wait_t: list[float] = field(default_factory=list)
    n_waiting: int = 0  # entries in them

    def append(self, slots: np.ndarray, nbytes: np.ndarray, weight: np.ndarray) -> int:
        """Add one sender's entries (buffers grown with room to spare); where they start."""
        m, k = self.n_entries, len(slots)
        if m + k > len(self.entry_slot):  # room for this and as many again, at most all
            size = max(min(max(2 * (m + k), 1024), m + self.contributions_left), m + k)
            for name in ("entry_slot", "entry_bytes", "entry_weight"):
                old = getattr(self, name)
                grown = np.empty(size, dtype=old.dtype)
                grown[:m] = old[:m]
                setattr(self, name, grown)
        self.entry_slot[m : m + k] = slots
        self.entry_bytes[m : m + k] = nbytes
        self.entry_weight[m : m + k] = weight
        self.n_entries = m + k
        return m


class IntervalLog:
    """Links' busy intervals ``(link, start_s, end_s)`` in the order recorded, kept as the
    arrays they end in (a network cycle ends a batch of them at one instant: one chunk, not
    a tuple an interval); :meth:`columns` joins them, iterating gives the tuples."""

    __slots__ = ("_chunks", "_n")

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n = 0

    @classmethod
    def of(cls, intervals) -> IntervalLog:
        """A log holding ``intervals`` (tuples ``(link, start_s, end_s)``)."""
        log = cls()
        rows = list(intervals)
        if rows:
            links, starts, ends = zip(*rows, strict=True)
            log.add(np.array(links, dtype=np.int64), np.array(starts, float), np.array(ends, float))
        return log

    def add(self, links: np.ndarray, starts: np.ndarray, ends: np.ndarray | float) -> None:
        """Intervals of ``links`` (int64) from ``starts`` to ``ends`` (one end for all, or
        one each); the arrays are kept as given, so the caller hands over its own."""
        if len(links):
            ends = np.full(len(links), float(ends)) if np.ndim(ends) == 0 else ends
            self._chunks.append((links, starts, ends))
            self._n += len(links)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Links (int64), starts and ends (float) of every interval, in the order recorded."""
        if len(self._chunks) != 1:
            if not self._chunks:
                return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
            self._chunks = [tuple(np.concatenate(c) for c in zip(*self._chunks, strict=True))]
        links, starts, ends = self._chunks[0]
        return links, starts, ends

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        links, starts, ends = self.columns()
        return zip(links.tolist(), starts.tolist(), ends.tolist(), strict=True)

    def __eq__(self, other: object) -> bool:
        """The same intervals in the same order (a list of tuples compares as its tuples)."""
        if isinstance(other, IntervalLog):
            return all(map(np.array_equal, self.columns(), other.columns()))
        if isinstance(other, list):
            return list(self) == other
        return NotImplemented

    __hash__ = None  # mutable, as the list it stands for


@dataclass
class LinkStats:
    """Per-link accounting collected while the network runs."""

    bytes_carried: np.ndarray
    busy_s: np.ndarray
    intervals: IntervalLog = field(default_factory=IntervalLog)


class FluidNetwork:
    """Flows between devices over a :class:`Topology`, sharing links max-min fairly.

    Traffic is registered as a *block* of slots (:meth:`add_block`): each slot is one flow
    on one path that one or more senders fill (:meth:`contribute`); it feeds one or more
    receiver *groups* (:meth:`group`), whose event succeeds when every slot feeding them has
    received its last contribution and delivered it. A slot that drains before its last
    contribution idles until the next one. :meth:`send` is the one-sender shortcut.

    New contributions are admitted together: each waits at most ``tolerance`` times the
    shortest time its sender's contribution could take (its longest flow alone: bytes over
    the slowest link on the path plus path latency), so nearly simultaneous senders cost one
    re-solve; a flow admitted late is then credited with what its first fair rate would
    have carried while it waited.
    """

    _remaining = _Column()
    _rate = _Column()
    _weight = _Column()
    _start = _Column()
    _latency = _Column()
    _floor = _Column()
    _waited = _Column()
    _alive = _Column()
    _blk = _Column()
    _loc = _Column()

    @property
    def _paths(self) -> np.ndarray:
        return self._path_store[: self._n]

    def __init__(
        self,
        env: simpy.Environment,
        topology: Topology,
        tolerance: float = 1e-3,
        record_intervals: bool = True,
    ) -> None:
        self.env, self.topology, self.tolerance = env, topology, tolerance
        self.capacity = topology.bandwidth_bytes_per_s
        self._capacity_list: list[float] | None = None  # for maxmin_rates_small
        n_links = topology.n_links
        self.stats = LinkStats(np.zeros(n_links), np.zeros(n_links))
        self.record_intervals = record_intervals
        # receiver groups: slots still to deliver, latest arrival so far, completion event
        self._group_left = np.zeros(1024, dtype=np.int64)
        self._group_at = np.zeros(1024)
        self._group_event: dict[int, simpy.Event] = {}
        self._next_group = 0
        self._blocks: dict[int, _Block] = {}
        self._next_block = 0
        self._pending: list[int] = []  # blocks with contributions to admit, in arrival order
        self._admit_at = np.inf
        # active flows, one row per busy slot, in columns with spare capacity (see _Column);
        # retired rows stay (not alive) until compaction
        self._n = 0
        self._cols = {name: np.zeros(256, dtype=t) for name, t in _COLUMNS.items()}
        self._path_store = np.full((256, 1), -1, dtype=np.int64)
        # the solver's paths (links that never set a rate left out, Topology.dominated_by)
        # and flows by link, kept until rows are added or moved (retired rows stay in it,
        # skipped as not alive)
        self._csr: tuple[np.ndarray, np.ndarray] | None = None
        self._no_csr = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        # what the compiled admission gets where no solver paths are kept apart
        self._no_solve, self._no_solve_store = (
            _frozen(np.zeros((0, 0), np.int64)),
            np.zeros((0, 0), np.int64),
        )
        dominated = topology.dominated_by() >= 0
        self._dominated = dominated if dominated.any() else None
        # the solver's path of each row, kept beside `_path_store` where links are left out
        self._solve_store: np.ndarray | None = None
        self._link_flows = np.zeros(n_links, dtype=np.int64)  # live flows on each link
        self._n_alive = 0
        self._link_active = np.zeros(n_links, dtype=bool)
        self._link_since = np.zeros(n_links)
        self._last_t = 0.0
        self._ticket = 0  # the cycle scheduled last; earlier ones are stale
        self._unsent_s = 0.0  # seconds of sending not yet taken off `remaining`
        self._wake_at = np.inf
        self.solves = 0
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None
        big = topology.n_devices >= COMPILED_MIN_DEVICES
        self._kernels = _compiled() if big and "maxmin" in _compiled() else {}
        self.compiled = bool(self._kernels)  # runs the compiled kernels (>= 16 devices, numba)
        if self._dominated is not None and "components" in self._kernels:
            self._solve_store = self._path_store.copy()
        # links whose flows or weights changed since the last solve: the compiled solve
        # re-solves only their components (the others' rates stand)
        self._dirty = np.zeros(n_links, dtype=np.bool_)
        self._seen_paths: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        # which kernels run: "compiled", "numpy" (small network), or "numpy (numba missing)",
        # which is 2.5-3.5x slower on big all-to-alls: the summary reports it
        self.kernels = "compiled" if self._kernels else "numpy"
        if not self._kernels and big:
            self.kernels = "numpy (numba missing)"

    # -- API for senders -------------------------------------------------------------------
    def group(self, n_slots: int) -> tuple[int, simpy.Event]:
        """Register a group fed by ``n_slots`` slots; its event fires when all delivered."""
        gid = self._next_group
        self._next_group += 1
        event = self.env.event()
        if n_slots == 0:
            event.succeed()
            return gid, event
        if gid >= len(self._group_left):
            grow = max(len(self._group_left), gid + 1)
            self._group_left = np.concatenate([self._group_left, np.zeros(grow, np.int64)])
            self._group_at = np.concatenate([self._group_at, np.zeros(grow)])
        self._group_left[gid] = n_slots
        self._group_at[gid] = 0.0
        self._group_event[gid] = event
        return gid, event

    def groups(self, n_slots: np.ndarray) -> tuple[np.ndarray, list[simpy.Event]]:
        """:meth:`group` for each of ``n_slots`` in order (consecutive ids): the ids and
        the events."""
        k = len(n_slots)
        first = self._next_group
        self._next_group += k
        while first + k > len(self._group_left):
            grow = len(self._group_left)
            self._group_left = np.concatenate([self._group_left, np.zeros(grow, np.int64)])
            self._group_at = np.concatenate([self._group_at, np.zeros(grow)])
        self._group_left[first : first + k] = n_slots
        self._group_at[first : first + k] = 0.0
        env = self.env
        events = [simpy.Event(env) for _ in range(k)]
        for i, count in enumerate(np.asarray(n_slots).tolist()):
            if count == 0:
                events[i].succeed()
            else:
                self._group_event[first + i] = events[i]
        return np.arange(first, first + k, dtype=np.int64), events

    def add_block(
        self,
        paths: np.ndarray,
        latency_s: np.ndarray,
        group_ptr: np.ndarray,
        groups: np.ndarray,
        contributors: np.ndarray,
        floor_s: float = 0.0,
        link_bytes: np.ndarray | None = None,
        entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> int:
        """Register slots (``[S, H]`` link ids, -1 padded) and the groups each feeds (CSR).
        ``floor_s``: a lower bound on the whole block's duration (e.g. its busiest link's
        bytes over bandwidth), which sets the time resolution of its admissions and
        completions. ``link_bytes``: the bytes the block will put on each link, counted now
        (otherwise counted per contribution). ``entries``: every sender's contributions
        (slot, bytes, max-min weight per entry, each sender's a range), which senders then
        name by range (:meth:`contribute_range`) instead of passing them."""
        cap_min, solve_paths = self._path_facts(paths)
        paths = _frozen(paths)
        bid = self._next_block
        self._next_block += 1
        blk = self._blocks[bid] = _Block(
            paths=paths,
            latency_s=np.asarray(latency_s, float),
            cap_min=cap_min,
            group_ptr=group_ptr,
            groups=groups,
            contributors_left=np.asarray(contributors, np.int64).copy(),
            pos=np.full(len(paths), -1, dtype=np.int64),
            contributions_left=int(np.sum(contributors)),
            slots_left=len(paths),
            solve_paths=solve_paths,
            floor_s=floor_s,
            counted=link_bytes is not None,
        )
        if entries is not None:
            slot, nbytes, weight = entries
            # contiguous and writable (copied only where not): one type for the kernels
            blk.entry_slot = np.require(slot, np.int64, ["C", "W"])
            blk.entry_bytes = np.require(nbytes, np.float64, ["C", "W"])
            blk.entry_weight = np.require(weight, np.float64, ["C", "W"])
            blk.n_entries, blk.given = len(slot), True
        if link_bytes is not None:
            self.stats.bytes_carried += link_bytes
        return bid

    def _path_facts(self, paths: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The slowest link's bandwidth on each of ``paths`` and the paths the solver sees
        (dominated links left out), computed once per read-only paths array: the blocks of
        every layer share their pattern's (the last few kept, by identity)."""
        for seen, cap_min, solve_paths in self._seen_paths:
            if seen is paths:
                return cap_min, solve_paths
        if paths.shape[1]:
            cap = np.where(paths >= 0, self.capacity[np.maximum(paths, 0)], np.inf)
            cap_min = cap.min(axis=1)
        else:
            cap_min = np.full(len(paths), np.inf)
        solve_paths = None
        if self._solve_store is not None:  # once per block, not at every rebuild of the CSR
            keep = (paths >= 0) & ~self._dominated[np.maximum(paths, 0)]
            solve_paths = _frozen(left_justify(np.where(keep, paths, -1)))
        if not paths.flags.writeable:  # only a read-only array is known not to change
            self._seen_paths = [(paths, cap_min, solve_paths), *self._seen_paths[:3]]
        return cap_min, solve_paths

    def contribute(
        self, block: int, slots: np.ndarray, nbytes: np.ndarray, weight: np.ndarray
    ) -> None:
        """One sender's bytes into ``slots`` of ``block`` (each slot once per sender), with
        their max-min ``weight`` (device pairs merged into each)."""
        if len(slots) == 0:
            return
        blk = self._blocks[block]
        if blk.given:
            raise ValueError("block registered with its entries: use contribute_range")
        lo = blk.append(slots, np.asarray(nbytes, float), np.asarray(weight, float))
        self.contribute_range(block, lo, lo + len(slots))

    def contribute_range(self, block: int, lo: int, hi: int) -> None:
        """One sender's entries ``lo:hi`` of ``block`` (given at :meth:`add_block`, or
        appended by :meth:`contribute`): queued for admission, which comes at most
        ``tolerance`` x the block's floor from now."""
        blk = self._blocks[block]
        now = self.env.now
        if not blk.counted:
            slots, nbytes = blk.entry_slot[lo:hi], blk.entry_bytes[lo:hi]
            rows = blk.paths[slots]
            valid = rows >= 0
            self.stats.bytes_carried += np.bincount(
                rows[valid],
                weights=np.broadcast_to(nbytes[:, None], rows.shape)[valid],
                minlength=self.topology.n_links,
            )
        if not blk.wait_lo:
            self._pending.append(block)
        blk.wait_lo.append(lo)
        blk.wait_hi.append(hi)
        blk.wait_t.append(now)
        blk.n_waiting += hi - lo
        # neither the block nor this contribution can finish sooner than this (a block's
        # floor, its busiest link, already bounds every flow's bytes over its slowest link)
        floor_s = blk.floor_s
        if not floor_s:
            slots, nbytes = blk.entry_slot[lo:hi], blk.entry_bytes[lo:hi]
            floor_s = float(np.max(nbytes / blk.cap_min[slots] + blk.latency_s[slots]))
        self._admit_at = min(self._admit_at, now + self.tolerance * floor_s)
        blk.start_s = min(blk.start_s, now)
        # bring the next cycle forward only if it would otherwise come after the admission
        if self._admit_at < self._wake_at:
            self._wake_in(self._admit_at - now)

    def contribute_empty(self, block: int, slots: np.ndarray) -> None:
        """One sender's zero-byte contributions to ``slots`` of ``block`` (each slot once):
        nothing to send or admit, so they are counted off at once; a slot this makes final
        whose flow has drained (or never started) is delivered one path latency from now,
        as a zero-byte contribution admitted now would be."""
        if len(slots) == 0:
            return
        blk = self._blocks[block]
        now = self.env.now
        blk.start_s = min(blk.start_s, now)
        blk.contributions_left -= len(slots)
        blk.open = blk.contributions_left > 0
        kernel = self._kernels.get("count_off")
        if kernel is not None:  # counted off and delivered in one call
            delivered, done = kernel(
                blk.contributors_left, blk.pos, slots, blk.latency_s, now, blk.group_ptr,
                blk.groups, self._group_left, self._group_at,
            )  # fmt: skip
            if delivered:
                self._delivered(block, blk, delivered, done)
            return
        left = blk.contributors_left
        left[slots] -= 1
        final = slots[(left[slots] == 0) & (blk.pos[slots] < 0)]
        if len(final):
            self._deliver(block, final, now + blk.latency_s[final])

    def send(
        self,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        gid: np.ndarray,
        latency_steps: float = 1.0,
    ) -> None:
        """Start one flow per (src, dst) now, each feeding group ``gid``; ``latency_steps``
        multiplies path latency (ring collectives)."""
        paths = self.topology.routes(src, dst)
        latency = self.topology.collective_latency_s(
            self.topology.path_latency_s(paths), latency_steps
        )
        n = len(paths)
        bid = self.add_block(
            paths, latency, np.arange(n + 1), np.asarray(gid, np.int64), np.ones(n, np.int64)
        )
        self.contribute(bid, np.arange(n), nbytes, np.ones(n))

    def close_intervals(self) -> None:
        """End the busy intervals of links still marked active (call after the run: a
        link's busy time is added when its interval ends)."""
        still = np.flatnonzero(self._link_active)
        self.stats.busy_s[still] += self.env.now - self._link_since[still]
        if self.record_intervals:
            self.stats.intervals.add(still, self._link_since[still], self.env.now)
        self._link_active[:] = False

    # -- the network's cycles ----------------------------------------------------------------
    def _wake_in(self, delay: float) -> None:
        """Run the next cycle ``delay`` seconds from now (one timeout; a cycle scheduled
        earlier and now superseded finds its ticket stale and does nothing)."""
        self._ticket += 1
        delay = delay if delay > 0.0 else 0.0  # as max(delay, 0.0)
        self._wake_at = self.env.now + delay
        timeout = self.env.timeout(delay)
        timeout.callbacks.append(lambda _e, ticket=self._ticket: self._cycle(ticket))

    def _cycle(self, ticket: int) -> None:
        """Advance flows to now; admit pending contributions once their time has come,
        retire finished flows, re-solve rates if anything changed, then schedule the next
        cycle at the earlier of the next admission and the next finish."""
        if ticket != self._ticket:
            return
        env = self.env
        self._advance()
        admitted = bool(self._pending) and env.now >= self._admit_at
        if admitted:
            self._admit()
        if "cycle" in self._kernels:
            finish_s = self._cycle_compiled(admitted)
        else:
            if self._retire() or admitted:
                self._solve()
                if admitted:
                    self._backdate()
            finish_s = self._next_finish_s() if self._n_alive else np.inf
        wait = min(self._admit_at - env.now, finish_s)
        if np.isfinite(wait):
            self._wake_in(wait)
        else:
            self._wake_at = np.inf  # idle until the next contribution

    def _cycle_compiled(self, admitted: bool) -> float:
        """Advance, retire, re-solve (if a flow retired or ``admitted``), account the links'
        busy intervals and backdate the admitted flows in one compiled call
        (``network_cycle``: what :meth:`_retire`, :meth:`_solve`, :meth:`_backdate` and
        :meth:`_next_finish_s` do); then deliver the retired slots. Seconds to the next
        finish."""
        elapsed, self._unsent_s = self._unsent_s, 0.0
        n, cols, env = self._n, self._cols, self.env
        store = self._path_store if self._solve_store is None else self._solve_store
        solve = store[:n]
        ptr, flows = self._csr if self._csr is not None else self._no_csr
        idx, delay, solved, ptr, flows, ended, since, finish_s = self._kernels["cycle"](
            cols["remaining"][:n],
            cols["rate"][:n],
            cols["start"][:n],
            cols["latency"][:n],
            cols["floor"][:n],
            cols["alive"][:n],
            cols["waited"][:n],
            cols["weight"][:n],
            self._path_store[:n],
            solve,
            ptr,
            flows,
            self.capacity,
            self._link_flows,
            self._dirty,
            self._link_active,
            self._link_since,
            self.stats.busy_s,
            env.now,
            self.tolerance,
            elapsed,
            admitted,
        )
        if len(ptr):
            self._csr = (ptr, flows)
        if solved:
            self.solves += 1
            if self.record_intervals:
                self.stats.intervals.add(ended, since, env.now)
        if len(idx):
            self._finish(idx, delay)
        return finish_s

    def _advance(self) -> None:
        """Bring flows to now: each live flow sends ``rate x elapsed``, here or (compiled) in
        the same pass as the next completion check (a link's busy time is added when its
        busy interval ends, in :meth:`_solve`)."""
        now = self.env.now
        elapsed = now - self._last_t
        if elapsed > 0 and self._n_alive:
            if "cycle" in self._kernels:
                self._unsent_s = elapsed  # applied by network_cycle before anything reads it
            else:
                self._remaining -= self._rate * elapsed
        self._last_t = now

    def _admit(self) -> None:
        """Add pending bytes to their slots: a busy slot's flow grows, an idle slot starts."""
        blocks = [self._blocks[b] for b in self._pending]
        width = max(self._path_store.shape[1], *(blk.paths.shape[1] for blk in blocks))
        solve_width = 0
        if self._solve_store is not None:  # the solver's paths are often narrower
            solve_width = max(
                self._solve_store.shape[1], *(blk.solve_paths.shape[1] for blk in blocks)
            )
        self._reserve(self._n + sum(blk.n_waiting for blk in blocks), width, solve_width)
        admit = self._admit_compiled if "admit" in self._kernels else self._admit_numpy
        added = 0
        for block, blk in zip(self._pending, blocks, strict=True):
            added += admit(block, blk)
            blk.contributions_left -= blk.n_waiting
            blk.open = blk.contributions_left > 0
            blk.wait_lo, blk.wait_hi, blk.wait_t, blk.n_waiting = [], [], [], 0
        self._pending = []
        self._admit_at = np.inf
        if added:
            self._csr = None
            self._n_alive += added

    def _admit_compiled(self, block: int, blk: _Block) -> int:
        """:meth:`_admit` of one block, compiled (``admit_block``): the rows it adds."""
        cols = self._cols
        solve_store = self._solve_store
        if solve_store is None:
            solve_store, solve_paths = self._no_solve_store, self._no_solve
        else:
            solve_paths = blk.solve_paths
        added, empty, at_s = self._kernels["admit"](
            blk.entry_slot,
            blk.entry_bytes,
            blk.entry_weight,
            np.array(blk.wait_lo, dtype=np.int64),
            np.array(blk.wait_hi, dtype=np.int64),
            np.array(blk.wait_t, dtype=float),
            blk.contributors_left,
            blk.pos,
            *self._merge_scratch(len(blk.pos)),
            blk.paths,
            solve_paths,
            blk.latency_s,
            blk.start_s,
            blk.floor_s,
            block,
            self.env.now,
            cols["remaining"],
            cols["rate"],
            cols["weight"],
            cols["start"],
            cols["latency"],
            cols["floor"],
            cols["waited"],
            cols["alive"],
            cols["blk"],
            cols["loc"],
            self._path_store,
            solve_store,
            self._n,
            self._dirty,
            self._link_flows,
        )
        self._n += added
        if len(empty):  # nothing to send: no flow; the last sender's latency delivers it
            self._deliver(block, empty, at_s)
        return added

    def _admit_numpy(self, block: int, blk: _Block) -> int:
        """:meth:`_admit` of one block with numpy: the rows it adds."""
        ranges = list(zip(blk.wait_lo, blk.wait_hi, strict=True))
        every = np.concatenate([blk.entry_slot[lo:hi] for lo, hi in ranges])
        if len(ranges) == 1:  # one sender: its slots are distinct already
            (lo, hi), slots = ranges[0], every
            nbytes, weight = blk.entry_bytes[lo:hi], blk.entry_weight[lo:hi]
            sent = np.full(len(slots), float(blk.wait_t[0]))
            blk.contributors_left[slots] -= 1
        else:  # several senders: sum per slot (slot ids index the block, no sort)
            n_slots = len(blk.pos)
            count = np.bincount(every, minlength=n_slots)
            slots = count.nonzero()[0]
            nbytes = np.concatenate([blk.entry_bytes[lo:hi] for lo, hi in ranges])
            weight = np.concatenate([blk.entry_weight[lo:hi] for lo, hi in ranges])
            nbytes = np.bincount(every, nbytes, n_slots)[slots]
            weight = np.bincount(every, weight, n_slots)[slots]
            first = np.full(n_slots, np.inf)
            np.minimum.at(first, every, np.repeat(blk.wait_t, [hi - lo for lo, hi in ranges]))
            sent = first[slots]
            blk.contributors_left -= count
        pos = blk.pos[slots]
        busy = pos >= 0
        self._remaining[pos[busy]] += nbytes[busy]
        self._weight[pos[busy]] += weight[busy]
        self._mark(pos[busy])
        idle = ~busy
        empty = idle & (nbytes <= 0)
        if empty.any():  # nothing to send: no flow; the last sender's latency delivers it
            done = slots[empty]
            self._deliver(block, done, sent[empty] + blk.latency_s[done])
            idle &= ~empty
        if not idle.any():
            return 0
        slots, nbytes, weight, sent = slots[idle], nbytes[idle], weight[idle], sent[idle]
        cols, row, now = self._cols, self._n, self.env.now
        end = row + len(slots)
        rows = blk.paths[slots]
        self._path_store[row:end, : rows.shape[1]] = rows
        self._path_store[row:end, rows.shape[1] :] = -1
        if self._solve_store is not None:
            solve = blk.solve_paths[slots]
            self._solve_store[row:end, : solve.shape[1]] = solve
            self._solve_store[row:end, solve.shape[1] :] = -1
        cols["blk"][row:end] = block
        cols["loc"][row:end] = slots
        cols["remaining"][row:end] = nbytes
        cols["weight"][row:end] = weight
        cols["latency"][row:end] = blk.latency_s[slots]
        cols["start"][row:end] = blk.start_s
        cols["floor"][row:end] = blk.floor_s
        cols["rate"][row:end] = 0.0
        cols["waited"][row:end] = now - sent
        cols["alive"][row:end] = True
        blk.pos[slots] = np.arange(row, end)
        self._n = end
        hops = rows[rows >= 0]
        self._dirty[hops] = True
        self._link_flows += np.bincount(hops, minlength=len(self._link_flows))
        return end - row

    def _mark(self, rows: np.ndarray) -> None:
        """Mark the links of ``rows`` as changed (see ``_dirty``)."""
        hops = self._path_store[rows]
        self._dirty[hops[hops >= 0]] = True

    def _merge_scratch(self, n_slots: int) -> tuple[np.ndarray, np.ndarray]:
        """Scratch for the compiled ``merge``: per slot (count, bytes, weight, first time)
        and a touched byte, at least ``n_slots`` rows; the kernel leaves it zero (first:
        inf) again."""
        if self._scratch is None or len(self._scratch[1]) < n_slots:
            acc = np.zeros((n_slots, 4))
            acc[:, 3] = np.inf
            self._scratch = (acc, np.zeros(n_slots, dtype=np.uint8))
        return self._scratch

    def _reserve(self, rows: int, width: int, solve_width: int = 0) -> None:
        """Grow the columns (doubling) to hold ``rows`` rows, paths ``width`` hops wide and
        the solver's paths ``solve_width`` hops wide."""
        capacity, old_width = self._path_store.shape
        old_solve = 0 if self._solve_store is None else self._solve_store.shape[1]
        if rows <= capacity and width <= old_width and solve_width <= old_solve:
            return
        grow = rows > capacity
        capacity = max(capacity, 1)
        while capacity < rows:
            capacity *= 2
        if grow:
            for name, col in self._cols.items():
                grown = np.zeros(capacity, dtype=col.dtype)
                grown[: self._n] = col[: self._n]
                self._cols[name] = grown
        if grow or width > old_width:
            paths = np.full((capacity, max(width, old_width)), -1, dtype=np.int64)
            paths[: self._n, :old_width] = self._path_store[: self._n]
            self._path_store = paths
        if self._solve_store is not None and (grow or solve_width > old_solve):
            solve = np.full((capacity, max(solve_width, old_solve)), -1, dtype=np.int64)
            solve[: self._n, :old_solve] = self._solve_store[: self._n]
            self._solve_store = solve

    def _backdate(self) -> None:
        """Credit flows admitted late (see class docstring) with what their first fair rate
        would have carried since they were sent, so batching admissions adds no delay."""
        idx = (self._waited > 0).nonzero()[0]
        if len(idx):
            credit = self._rate[idx] * self._waited[idx]
            self._remaining[idx] = np.maximum(self._remaining[idx] - credit, 0.0)
        self._waited[:] = 0.0

    def _next_finish_s(self) -> float:
        """Seconds until the first live flow finishes at its current rate."""
        rate = self._rate
        finish = np.empty(len(rate))
        finish.fill(np.inf)  # where no live flow sends (dividing only where one does)
        np.divide(self._remaining, rate, out=finish, where=self._alive & (rate > 0))
        return float(finish.min())

    def _due(self) -> np.ndarray:
        """Rows of the live flows inside their completion window (numpy; compiled,
        ``due_rows`` does this)."""
        done = self._alive & (self._remaining <= self._rate * self._window() + 1e-9)
        return done.nonzero()[0]

    def _window(self) -> np.ndarray:
        """Each flow's completion window: ``tolerance`` x its block's end-to-end time so far
        (time since the block's first sender plus path latency, at least the block's floor).
        Flows finishing within it of the earliest finish retire together, each delivered at
        its own finish time; their bandwidth frees up to a window early."""
        age = np.maximum(self.env.now - self._start + self._latency, self._floor)
        return self.tolerance * age

    def _retire(self) -> bool:
        """Finish flows that end within their completion window (see :meth:`_window`). A
        finished slot with senders still to come idles; otherwise it is delivered at its own
        finish time plus path latency (numpy; compiled, ``network_cycle`` does this)."""
        if not self._n_alive:
            return False
        idx = self._due()
        if not len(idx):
            return False
        rate = np.where(self._rate[idx] > 0, self._rate[idx], np.inf)
        delay = self._latency[idx] + np.maximum(self._remaining[idx] / rate, 0.0)
        hops = self._paths[idx]
        hops = hops[hops >= 0]
        self._dirty[hops] = True
        self._link_flows -= np.bincount(hops, minlength=len(self._link_flows))
        # retired rows stay (dead) until they are half of the table, then compacted
        self._alive[idx] = False
        self._remaining[idx], self._rate[idx], self._waited[idx] = np.inf, 0.0, 0.0
        self._finish(idx, delay)
        return True

    def _finish(self, idx: np.ndarray, delay: np.ndarray) -> None:
        """Retired rows ``idx`` (already dead): their slots idle or are delivered ``delay``
        from now (see :meth:`_deliver`), block by block in ascending id; the table is
        compacted once half of it is dead."""
        if "finish" in self._kernels:
            self._finish_compiled(idx, delay)
        else:
            blk_ids, locs = self._blk[idx], self._loc[idx]
            lo, hi = int(blk_ids.min()), int(blk_ids.max())
            for b in [lo] if lo == hi else np.unique(blk_ids).tolist():
                sel = slice(None) if lo == hi else blk_ids == b
                s = locs[sel]
                self._blocks[b].pos[s] = -1
                self._deliver(b, s, self.env.now + delay[sel])
        self._n_alive -= len(idx)
        if self._n - self._n_alive > max(256, self._n // 2):
            self._compact()

    def _finish_compiled(self, idx: np.ndarray, delay: np.ndarray) -> None:
        """:meth:`_finish`'s deliveries with the compiled ``finish_rows``: each block's rows
        counted off and delivered in one call (blocks share no slot and no group), then
        each block's completed groups succeeded, blocks in ascending id."""
        blk_col = self._cols["blk"]
        first = int(blk_col[idx[0]])
        out = [self._finish_block(first, idx, delay)]
        if out[0][3]:  # rows of other blocks too (rare): each of them in its own call
            ids = blk_col[idx]
            others = np.unique(ids[ids != first]).tolist()
            out += [self._finish_block(b, idx, delay) for b in others]
            out.sort(key=lambda o: o[0])
        for block, n_final, done, _ in out:
            if n_final:
                self._delivered(block, self._blocks[block], n_final, done)

    def _finish_block(
        self, block: int, idx: np.ndarray, delay: np.ndarray
    ) -> tuple[int, int, np.ndarray, int]:
        """``finish_rows`` on the rows of ``idx`` in ``block``: (block, slots delivered,
        groups completed, rows of other blocks)."""
        blk, cols = self._blocks[block], self._cols
        n_final, done, others = self._kernels["finish"](
            idx, delay, cols["blk"], cols["loc"], block, self.env.now, blk.pos,
            blk.contributors_left, blk.group_ptr, blk.groups, self._group_left, self._group_at,
        )  # fmt: skip
        return block, n_final, done, others

    def _compact(self) -> None:
        """Drop retired rows and renumber the positions of the flows that stay."""
        keep = self._alive.nonzero()[0]
        k = len(keep)
        self._csr = None
        for col in self._cols.values():
            col[:k] = col[keep]
        self._path_store[:k] = self._path_store[keep]
        if self._solve_store is not None:
            self._solve_store[:k] = self._solve_store[keep]
        self._n = k
        for b, blk in self._blocks.items():
            if blk.open:
                sel = np.flatnonzero(self._blk == b)
                blk.pos[self._loc[sel]] = sel

    def _deliver(self, block: int, slots: np.ndarray, at_s: np.ndarray) -> None:
        """Finished slots of ``block``: those with no sender still to come are delivered (at
        ``at_s``) to every group they feed, the others idle; a block whose slots are all
        delivered is dropped."""
        blk = self._blocks[block]
        final = blk.contributors_left[slots] == 0
        slots, at_s = slots[final], at_s[final]
        if not len(slots):
            return
        kernel = self._kernels.get("deliver")
        if kernel is None:
            blk.slots_left -= len(slots)
            if blk.slots_left == 0:
                del self._blocks[block]
            starts, lens = blk.group_ptr[slots], blk.group_ptr[slots + 1] - blk.group_ptr[slots]
            gidx = (starts - lens.cumsum() + lens).repeat(lens) + np.arange(lens.sum())
            self._arrive(blk.groups[gidx], at_s.repeat(lens))
            return
        done = kernel(blk.group_ptr, blk.groups, slots, at_s, self._group_left, self._group_at)
        self._delivered(block, blk, len(slots), done)

    def _delivered(self, block: int, blk: _Block, n_slots: int, done: np.ndarray) -> None:
        """``n_slots`` final slots of ``block`` delivered (compiled, :func:`deliver`): drop
        the block once all are, and succeed the groups ``done`` (their last slot was among
        them) in ascending order."""
        blk.slots_left -= n_slots
        if blk.slots_left == 0:
            del self._blocks[block]
        if len(done) > 1:
            done.sort()  # ascending: the order their events are scheduled in
        self._succeed(done)

    def _succeed(self, gids: np.ndarray) -> None:
        """Succeed the events of groups ``gids``, in that order, each at its latest arrival:
        what a timeout whose callback succeeds it would do (simpy's Timeout sets these same
        fields), in one event not two."""
        pop, schedule, now = self._group_event.pop, self.env.schedule, self.env.now
        for gid, at in zip(gids.tolist(), self._group_at[gids].tolist(), strict=True):
            event = pop(gid)
            event._ok, event._value = True, None
            schedule(event, NORMAL, max(at - now, 0.0))

    def _arrive(self, gids: np.ndarray, at_s: np.ndarray) -> None:
        """Count slots delivered to their groups (arriving at ``at_s``); a group whose last
        slot is in gets one event, at its latest arrival."""
        lo = int(gids.min())
        span = int(gids.max()) - lo + 1  # a collective's groups are numbered consecutively
        latest = np.full(span, -np.inf)
        np.maximum.at(latest, gids - lo, at_s)
        window = slice(lo, lo + span)
        np.maximum(self._group_at[window], latest, out=self._group_at[window])
        counts = np.bincount(gids - lo, minlength=span)
        ids = counts.nonzero()[0] + lo
        self._group_left[window] -= counts
        self._succeed(ids[self._group_left[ids] == 0])

    def _solve(self) -> None:
        """Re-solve the rates of the live flows (numpy or plain Python; compiled,
        ``network_cycle`` does this) and end and start the links' busy intervals."""
        self.solves += 1
        if self._n_alive and self._n_alive * self._path_store.shape[1] <= SMALL_MAX_HOPS:
            live = self._alive.nonzero()[0]
            rows = [[link for link in row if link >= 0] for row in self._paths[live].tolist()]
            if self._capacity_list is None:
                self._capacity_list = self.capacity.tolist()
            rate = np.zeros(self._n)
            rate[live] = maxmin_rates_small(
                rows, self._capacity_list, self._weight[live].tolist(), self.tolerance
            )
            self._rate = rate
        elif self._n_alive:
            self._rate = _rates_and_active(
                self._paths,
                self.capacity,
                self._weight,
                self.tolerance,
                compiled=False,
                alive=self._alive,
            )[0]
        active = self._link_flows > 0
        now = self.env.now
        ended = (self._link_active & ~active).nonzero()[0]
        if len(ended):
            self.stats.busy_s[ended] += now - self._link_since[ended]
            if self.record_intervals:
                self.stats.intervals.add(ended, self._link_since[ended], now)
        self._link_since[active & ~self._link_active] = now
        self._link_active = active
