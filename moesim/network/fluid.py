"""Fluid network: concurrent flows share links max-min fairly, re-solved on every change.

A single simpy process owns the active flows as numpy arrays. It sleeps until the earliest
flow completion or until a sender injects new flows, then advances every flow by
``rate x elapsed``, retires the finished ones (their bytes arrive one path latency later),
re-solves the fair rates and sleeps again. Cost grows with the number of flow *batches*, not
with tokens or bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from moesim.network.topology import Topology


def maxmin_rates(
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
        if len(new) > 1:
            new = np.unique(new)
        frozen[new] = True
        rows = paths[new]
        ok = rows >= 0
        if unit:
            rate[new] = level
            load -= np.bincount(rows[ok], minlength=n_links)
        else:
            rate[new] = level * weight[new]
            load -= np.bincount(
                rows[ok],
                weights=np.broadcast_to(weight[new][:, None], rows.shape)[ok],
                minlength=n_links,
            )
        load[sat] = 0.0
        alive = alive[load[alive] > eps]
    return rate


@dataclass
class _Group:
    remaining: int
    event: simpy.Event


@dataclass
class LinkStats:
    """Per-link accounting collected while the network runs."""

    bytes_carried: np.ndarray
    busy_s: np.ndarray
    intervals: list[tuple[int, float, float]] = field(default_factory=list)


class FluidNetwork:
    """Flows between devices over a :class:`Topology`, sharing links max-min fairly.

    Senders call :meth:`send` with arrays of (src, dst, bytes) for one *group* (e.g. all
    dispatch traffic into one device for one layer, registered with :meth:`group`); the group's
    event succeeds when its last flow has arrived.
    """

    def __init__(
        self,
        env: simpy.Environment,
        topology: Topology,
        tolerance: float = 1e-3,
        record_intervals: bool = True,
    ) -> None:
        self.env, self.topology, self.tolerance = env, topology, tolerance
        self.capacity = topology.bandwidth_bytes_per_s
        n_links = topology.n_links
        self.stats = LinkStats(np.zeros(n_links), np.zeros(n_links))
        self.record_intervals = record_intervals
        self._groups: dict[int, _Group] = {}
        self._next_group = 0
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._paths = np.zeros((0, 0), dtype=np.int64)
        self._remaining = np.zeros(0)
        self._rate = np.zeros(0)
        self._start = np.zeros(0)
        self._latency = np.zeros(0)
        self._gid = np.zeros(0, dtype=np.int64)
        self._link_active = np.zeros(n_links, dtype=bool)
        self._link_since = np.zeros(n_links)
        self._last_t = 0.0
        self._wake = env.event()
        self.solves = 0
        env.process(self._run())

    # -- API for senders -------------------------------------------------------------------
    def group(self, n_flows: int) -> tuple[int, simpy.Event]:
        """Register a group expecting ``n_flows`` flows; its event fires when all arrived."""
        gid = self._next_group
        self._next_group += 1
        event = self.env.event()
        if n_flows == 0:
            event.succeed()
        else:
            self._groups[gid] = _Group(n_flows, event)
        return gid, event

    def send(
        self,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        gid: np.ndarray,
        latency_steps: float = 1.0,
    ) -> None:
        """Start flows now. ``latency_steps`` multiplies path latency (ring collectives)."""
        paths = self.topology.routes(src, dst)
        latency = self.topology.path_latency_s(paths) * latency_steps
        self.send_routed(paths, np.asarray(nbytes, float), latency, np.asarray(gid))

    def send_routed(
        self, paths: np.ndarray, nbytes: np.ndarray, latency_s: np.ndarray, gid: np.ndarray
    ) -> None:
        """Start flows whose paths (``[F, H]`` link ids, -1 padded) are already routed."""
        if len(nbytes) == 0:
            return
        valid = paths >= 0
        self.stats.bytes_carried += np.bincount(
            paths[valid],
            weights=np.broadcast_to(nbytes[:, None], paths.shape)[valid],
            minlength=self.topology.n_links,
        )
        self._pending.append((paths, nbytes, latency_s, gid))
        if not self._wake.triggered:
            self._wake.succeed()

    def close_intervals(self) -> None:
        """End the busy intervals of links still marked active (call after the run)."""
        if self.record_intervals:
            for lid in np.flatnonzero(self._link_active):
                self.stats.intervals.append((int(lid), float(self._link_since[lid]), self.env.now))
        self._link_active[:] = False

    # -- the network process ---------------------------------------------------------------
    def _run(self):
        env = self.env
        while True:
            if len(self._remaining) == 0 and not self._pending:
                self._wake = env.event()
                yield self._wake
                yield env.timeout(0)  # let senders at the same instant join this batch
            self._advance()
            self._admit()
            self._retire()
            self._solve()
            self._wake = env.event()
            if len(self._remaining):
                dt = float(np.min(self._remaining / self._rate))
                yield env.any_of([env.timeout(max(dt, 0.0)), self._wake])
            # else: loop back and sleep until woken

    def _advance(self) -> None:
        now = self.env.now
        elapsed = now - self._last_t
        if elapsed > 0 and len(self._remaining):
            self._remaining -= self._rate * elapsed
            self.stats.busy_s[self._link_active] += elapsed
        self._last_t = now

    def _admit(self) -> None:
        if not self._pending:
            return
        batches = [(self._paths, self._remaining, self._latency, self._gid), *self._pending]
        width = max(b[0].shape[1] for b in batches)
        self._paths = np.concatenate(
            [
                np.pad(b[0], ((0, 0), (0, width - b[0].shape[1])), constant_values=-1)
                for b in batches
            ]
        )
        self._remaining = np.concatenate([b[1] for b in batches])
        self._latency = np.concatenate([b[2] for b in batches])
        self._gid = np.concatenate([b[3] for b in batches])
        new = sum(len(b[1]) for b in self._pending)
        self._start = np.concatenate([self._start, np.full(new, self.env.now)])
        self._rate = np.concatenate([self._rate, np.zeros(new)])
        self._pending = []

    def _retire(self) -> None:
        """Finish flows whose remaining time is within ``tolerance`` of their end-to-end time
        (age plus path latency), or ~0; each is delivered at its own finish time."""
        if not len(self._remaining):
            return
        # a flow's end-to-end time so far is its age plus the latency still ahead of it
        age = self.env.now - self._start + self._latency
        slack = self._rate * self.tolerance * age + 1e-9
        done = self._remaining <= slack
        if not done.any():
            return
        # deliver each retiring flow at its own finish time at the current rate (no bias)
        finish = self._remaining[done] / np.where(self._rate[done] > 0, self._rate[done], np.inf)
        lat, gids = self._latency[done] + np.maximum(finish, 0.0), self._gid[done]
        for value in np.unique(lat):
            arriving = gids[lat == value]
            if value > 0:
                ev = self.env.timeout(value)
                ev.callbacks.append(lambda _e, g=arriving: self._deliver(g))
            else:
                self._deliver(arriving)
        keep = ~done
        self._paths, self._remaining = self._paths[keep], self._remaining[keep]
        self._rate, self._start = self._rate[keep], self._start[keep]
        self._latency, self._gid = self._latency[keep], self._gid[keep]

    def _deliver(self, gids: np.ndarray) -> None:
        ids, counts = np.unique(gids, return_counts=True)
        for gid, n in zip(ids.tolist(), counts.tolist(), strict=True):
            grp = self._groups[gid]
            grp.remaining -= n
            if grp.remaining == 0:
                del self._groups[gid]
                grp.event.succeed()

    def _solve(self) -> None:
        self.solves += 1
        if len(self._remaining):
            self._rate = maxmin_rates(self._paths, self.capacity, tolerance=self.tolerance)
            valid = self._paths >= 0
            active = np.zeros(self.topology.n_links, dtype=bool)
            active[self._paths[valid]] = True
        else:
            active = np.zeros(self.topology.n_links, dtype=bool)
        if self.record_intervals:
            now = self.env.now
            ended = self._link_active & ~active
            for lid in np.flatnonzero(ended):
                self.stats.intervals.append((int(lid), float(self._link_since[lid]), now))
            self._link_since[active & ~self._link_active] = now
        self._link_active = active
