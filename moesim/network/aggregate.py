"""Flow patterns: how a collective's (source, destination) pairs become network flows.

At ``device`` granularity every pair is one flow. At ``node`` granularity an inter-node pair's
path is cut where it leaves the source's intra-node fabric: the *tail* (NIC links, network,
destination) is merged with every other pair from the same source node that has the same tail,
and the *lead* (intra-node hops to the proxy device, e.g. NCCL's PXN hop to the NIC on the
destination's rail) with every pair that has the same lead. A merged flow carries the sum of
its pairs' bytes and has max-min weight equal to its number of pairs, so on a shared bottleneck
it gets the share its pairs would have had together. The merge is exact where the merged pairs
share the bottleneck of their path (then they progress together and the last byte leaves at
the same time); it trades per-source detail on the source node for far fewer flows:
rail-optimized 256-GPU all-to-all on 32 nodes goes from 65,280 flows to ~9,900.

Patterns depend only on the pairs, so they are cached: every layer's dispatch and combine
reuse the routing of the first.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moesim.network.topology import Topology, left_justify

COMPILED_MIN_ENTRIES = 1 << 16
"""Patterns with at least this many entries sum their contributions with a compiled pass."""


@dataclass(frozen=True)
class FlowPattern:
    """Flows ("slots") of a collective and how the pairs' bytes map onto them.

    ``paths[s]``: links of slot ``s`` (-1 padded); ``latency_s[s]``: path latency its bytes
    see before they are usable (a tail slot includes the lead hops in front of it);
    ``receivers`` (CSR by ``receiver_ptr``): the destination devices a slot feeds;
    ``contrib_*``: one contribution per (sender, slot), sorted by sender (its max-min weight:
    :meth:`contribution_weights`), with
    ``contrib_offsets[g]:contrib_offsets[g + 1]`` those of sender ``g``; ``entry_pair`` /
    ``entry_contrib`` map each pair's bytes onto its contributions (1 or 2 per pair).
    """

    paths: np.ndarray
    latency_s: np.ndarray
    receiver_ptr: np.ndarray
    receivers: np.ndarray
    contributors: np.ndarray
    contrib_slot: np.ndarray
    contrib_offsets: np.ndarray
    entry_pair: np.ndarray
    entry_contrib: np.ndarray

    @property
    def n_slots(self) -> int:
        return len(self.paths)

    def contribution_bytes(self, nbytes: np.ndarray) -> np.ndarray:
        """Bytes of every (sender, slot) contribution for per-pair ``nbytes``."""
        return self.contribution_sums(nbytes)[0]

    def contribution_weights(self, nbytes: np.ndarray) -> np.ndarray:
        """Max-min weight of every (sender, slot) contribution for per-pair ``nbytes``: its
        pairs that carry bytes (a zero-byte pair would finish at once and take no share)."""
        return self.contribution_sums(nbytes)[1]

    def contribution_sums(self, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For per-pair ``nbytes``, in one pass over the entries: each contribution's bytes
        and max-min weight, and each slot's bytes (all summed in entry order, as
        ``np.bincount`` sums them; compiled on large patterns)."""
        nbytes = np.asarray(nbytes, float)
        n_contrib = len(self.contrib_slot)
        if len(self.entry_pair) >= COMPILED_MIN_ENTRIES:
            from moesim.network.fluid import _compiled

            kernel = _compiled().get("sums")
            if kernel is not None:
                return kernel(
                    self.entry_contrib, self.entry_pair, self._entry_slot, nbytes, n_contrib,
                    self.n_slots,
                )  # fmt: skip
        entry = nbytes[self.entry_pair]
        return (
            np.bincount(self.entry_contrib, weights=entry, minlength=n_contrib),
            np.bincount(self.entry_contrib, weights=(entry > 0).astype(float), minlength=n_contrib),
            np.bincount(self._entry_slot, weights=entry, minlength=self.n_slots),
        )

    def split_contributions(
        self, nbytes: np.ndarray, weight: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The contributions of bytes ``nbytes`` (weights ``weight``, per contribution:
        :meth:`contribution_sums`) split into those that carry bytes and the others, each in
        order: ``(slot, bytes, weight)`` of the first, their offsets per sender (``[g]:[g +
        1]`` sender ``g``'s), the others' slots and their offsets per sender (one compiled
        pass on patterns of at least ``COMPILED_MIN_ENTRIES`` entries)."""
        if len(self.entry_pair) >= COMPILED_MIN_ENTRIES:
            from moesim.network.fluid import _compiled

            kernel = _compiled().get("split")
            if kernel is not None:
                return kernel(
                    np.asarray(nbytes, float), np.asarray(weight, float), self.contrib_slot,
                    self.contrib_offsets,
                )  # fmt: skip
        full = nbytes > 0
        full_at = np.concatenate([[0], np.cumsum(full)])[self.contrib_offsets]
        slot = self.contrib_slot
        return (
            slot[full], nbytes[full], weight[full], full_at, slot[~full],
            self.contrib_offsets - full_at,
        )  # fmt: skip

    def inbound(self, n_devices: int) -> np.ndarray:
        """Slots feeding each of ``n_devices`` devices (computed once, read-only)."""
        cached = self.__dict__.get("_inbound")
        if cached is None or len(cached) != n_devices:
            cached = np.bincount(self.receivers, minlength=n_devices)
            cached.setflags(write=False)
            self.__dict__["_inbound"] = cached
        return cached

    def link_bytes(
        self, nbytes: np.ndarray, n_links: int, per_slot: np.ndarray | None = None
    ) -> np.ndarray:
        """Bytes each link carries (the same at every granularity); ``per_slot``: the slots'
        bytes (:meth:`contribution_sums`), if already summed."""
        if per_slot is None:
            per_slot = self.contribution_sums(nbytes)[2]
        slot_of, link_of = self._incidence
        return np.bincount(link_of, weights=per_slot[slot_of], minlength=n_links)

    @cached_property
    def _entry_slot(self) -> np.ndarray:
        return self.contrib_slot[self.entry_contrib]

    @cached_property
    def _incidence(self) -> tuple[np.ndarray, np.ndarray]:
        """(slot, link) of every hop, flattened once."""
        valid = self.paths >= 0
        return np.nonzero(valid)[0], self.paths[valid]


def _row_keys(rows: np.ndarray) -> np.ndarray:
    """Integer id per distinct row of a -1 padded link matrix (exact, via unique on bytes)."""
    if rows.shape[1] == 0:
        return np.zeros(len(rows), dtype=np.int64)
    valid = rows >= 0
    if valid.sum(axis=1).max(initial=0) <= 4 and rows.max(initial=0) + 1 < 1 << 16:
        # up to 4 hops of 16-bit link ids packed into one integer, in path order
        rank = (np.cumsum(valid, axis=1) - 1).astype(np.uint64)
        hop = np.where(valid, rows + 1, 0).astype(np.uint64) << (np.uint64(16) * rank)
        packed = np.bitwise_or.reduce(np.where(valid, hop, np.uint64(0)), axis=1)
        return np.unique(packed, return_inverse=True)[1].ravel().astype(np.int64)
    row_type = np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))
    packed = np.ascontiguousarray(rows).view(row_type)
    _, inverse = np.unique(packed.ravel(), return_inverse=True)
    return inverse.ravel().astype(np.int64)


def flow_pattern(topology: Topology, src: np.ndarray, dst: np.ndarray, mode: str) -> FlowPattern:
    """Build the flows of a collective over ``topology`` (``mode``: device | node)."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    n_pairs = len(src)
    paths = topology.routes(src, dst)
    latency = topology.path_latency_s(paths)
    if mode == "node" and n_pairs and paths.shape[1]:
        kinds = np.array([k != "intra" for k in topology.link_kinds] + [False])
        # position of the first non-intra link on each path (the path leaves its node there)
        leaves = kinds[np.where(paths >= 0, paths, -1)]
        remote = leaves.any(axis=1)
        cut = np.where(remote, leaves.argmax(axis=1), paths.shape[1])
        col = np.arange(paths.shape[1])[None, :]
        lead = np.where(col < cut[:, None], paths, -1)
        tail = np.where(col >= cut[:, None], paths, -1)
        lead_lat = topology.path_latency_s(lead)
        # slot keys: local pairs keep their own flow; remote pairs -> (lead row) and (tail row)
        src_node = src // topology.devices_per_node
        tail_key = _row_keys(np.where(remote[:, None], tail, -2))
        # a tail is shared only within a source node
        tail_key = np.where(remote, tail_key * topology.nodes + src_node, -1)
        has_lead = remote & (lead >= 0).any(axis=1)
        lead_key = np.where(has_lead, _row_keys(np.where(has_lead[:, None], lead, -2)), -1)
        local_pairs = np.flatnonzero(~remote)
        tail_pairs = np.flatnonzero(remote)
        lead_pairs = np.flatnonzero(has_lead)
        t_ids, t_inv = np.unique(tail_key[tail_pairs], return_inverse=True)
        l_ids, l_inv = np.unique(lead_key[lead_pairs], return_inverse=True)
        n_local, n_tail = len(local_pairs), len(t_ids)
        entry_pair = np.concatenate([local_pairs, tail_pairs, lead_pairs])
        entry_slot = np.concatenate(
            [np.arange(n_local), n_local + t_inv.ravel(), n_local + n_tail + l_inv.ravel()]
        )
        first_tail = np.zeros(n_tail, np.int64)
        first_tail[t_inv.ravel()[::-1]] = tail_pairs[::-1]
        first_lead = np.zeros(len(l_ids), np.int64)
        first_lead[l_inv.ravel()[::-1]] = lead_pairs[::-1]
        slot_paths = np.concatenate(
            [paths[local_pairs], tail[first_tail], lead[first_lead]], axis=0
        )
        tail_lat = np.zeros(n_tail)
        np.maximum.at(tail_lat, t_inv.ravel(), latency[tail_pairs])
        slot_lat = np.concatenate([latency[local_pairs], tail_lat, lead_lat[first_lead]])
        slot_paths = left_justify(slot_paths)
    else:
        entry_pair = np.arange(n_pairs)
        entry_slot = np.arange(n_pairs)
        slot_paths, slot_lat = paths, latency
    n_slots = len(slot_paths)
    # receivers per slot: distinct (slot, dst)
    rkey = np.sort(entry_slot * (int(dst.max(initial=0)) + 1) + dst[entry_pair])
    # distinct keys by sort and compare: np.unique here takes a hash path that is ~15x
    # slower on a million wide-range ints (numpy 2.4)
    rkey = rkey[np.concatenate([[True], rkey[1:] != rkey[:-1]])] if len(rkey) else rkey
    r_slot, r_dev = np.divmod(rkey, int(dst.max(initial=0)) + 1)
    receiver_ptr = np.searchsorted(r_slot, np.arange(n_slots + 1))
    # contributions: distinct (sender, slot), sorted by sender
    ckey, entry_contrib = np.unique(src[entry_pair] * n_slots + entry_slot, return_inverse=True)
    c_sender, c_slot = np.divmod(ckey, max(n_slots, 1))
    slot_paths.setflags(write=False)  # shared by every block of the pattern (see add_block)
    return FlowPattern(
        paths=slot_paths,
        latency_s=slot_lat,
        receiver_ptr=receiver_ptr,
        receivers=r_dev,
        contributors=np.bincount(c_slot, minlength=n_slots),
        contrib_slot=c_slot,
        contrib_offsets=np.searchsorted(c_sender, np.arange(topology.n_devices + 1)),
        entry_pair=entry_pair,
        entry_contrib=np.ascontiguousarray(entry_contrib.ravel(), np.int64),
    )


def aggregation_mode(topology: Topology, requested: str) -> str:
    """Resolve ``sim.aggregate``: ``auto`` merges only where pairs share their way out of a
    node (rail-optimized topologies, where the PXN proxy owns the NIC)."""
    if requested != "auto":
        return requested
    return "node" if topology.nodes > 1 and topology.inter_kind == "rail_optimized" else "device"


PATTERN_THREADS = 2
"""Threads :meth:`PatternCache.build` builds patterns on: the dispatch's and the combine's
side by side (more, for the parts of a split run, only contend for the GIL's share of
the work with the plan beside them)."""


class PatternCache:
    """Flow patterns keyed by the exact (src, dst) pairs, built once per distinct pair set."""

    def __init__(self, topology: Topology, mode: str) -> None:
        self.topology, self.mode = topology, aggregation_mode(topology, mode)
        self._cache: dict[bytes, FlowPattern] = {}
        self._recent: list[tuple[np.ndarray, np.ndarray, FlowPattern]] = []

    def get(self, src: np.ndarray, dst: np.ndarray) -> FlowPattern:
        for s, d, pattern in self._recent:  # the same arrays (layers share one layout) first
            if s is src and d is dst:
                return pattern
        for s, d, pattern in self._recent:
            if np.array_equal(s, src) and np.array_equal(d, dst):
                return pattern
        key = _pairs_key(src, dst)
        if key not in self._cache:
            self._cache[key] = flow_pattern(self.topology, src, dst, self.mode)
        # kept by reference: traffic arrays are never modified after the plan is built
        self._recent = [(src, dst, self._cache[key]), *self._recent[:3]]
        return self._cache[key]

    def build(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """The patterns of every ``(src, dst)`` of ``pairs`` built at once, on
        :data:`PATTERN_THREADS` threads (their numpy sorts and gathers release the GIL),
        then cached in that order: what calling :meth:`get` on each in turn leaves."""
        todo = {_pairs_key(s, d): (s, d) for s, d in pairs}  # each distinct set once
        todo = {key: sd for key, sd in todo.items() if key not in self._cache}
        if len(todo) > 1:
            threads = min(len(todo), PATTERN_THREADS)
            with ThreadPoolExecutor(threads, thread_name_prefix="moesim-pattern") as pool:
                built = pool.map(
                    lambda sd: flow_pattern(self.topology, *sd, self.mode), todo.values()
                )
                self._cache.update(zip(todo, built, strict=True))
        for s, d in pairs:
            self.get(s, d)


def _pairs_key(src: np.ndarray, dst: np.ndarray) -> bytes:
    """A digest of the exact pairs (:class:`PatternCache`'s key)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(src, np.int64).tobytes())
    h.update(np.ascontiguousarray(dst, np.int64).tobytes())
    return h.digest()


def collective_times_s(
    topology: Topology,
    src: np.ndarray,
    dst: np.ndarray,
    nbytes: np.ndarray,
    mode: str = "device",
    tolerance: float = 1e-3,
) -> np.ndarray:
    """Time at which each device has received all its bytes when every sender starts at
    t = 0 (devices receiving nothing: 0). The engine's collective path, without devices."""
    import simpy

    from moesim.network.fluid import FluidNetwork

    env = simpy.Environment()
    net = FluidNetwork(env, topology, tolerance, record_intervals=False)
    pat = flow_pattern(topology, src, dst, mode)
    n = topology.n_devices
    inbound = np.bincount(pat.receivers, minlength=n)
    done = np.zeros(n)
    gids = np.empty(n, dtype=np.int64)
    for d in range(n):
        gids[d], ev = net.group(int(inbound[d]))
        ev.callbacks.append(lambda _e, d=d: done.__setitem__(d, env.now))
    block = net.add_block(
        pat.paths, pat.latency_s, pat.receiver_ptr, gids[pat.receivers], pat.contributors
    )
    nb, weight = pat.contribution_bytes(nbytes), pat.contribution_weights(nbytes)
    for g in range(n):
        lo, hi = pat.contrib_offsets[g], pat.contrib_offsets[g + 1]
        net.contribute(block, pat.contrib_slot[lo:hi], nb[lo:hi], weight[lo:hi])
    env.run()
    return done
