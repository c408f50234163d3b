"""Independent parts of a step: sets of devices that exchange no traffic, share no link and
wait on no barrier together (data-parallel inference replicas, each with its own expert
parallel group, are the common case).

The discrete-event engine simulates each part on its own network and event loop
(``sim.parts: split``): nothing of one part can reach another, so this is the same model
with one difference, that a part's flow completions and admissions are batched within
``sim.network_tolerance`` of its own events only, not of every part's. A part's result is
then the same whatever else the cluster runs, and the parts can run in separate processes
(``sim.workers``, forked: the plan and the loaded kernels are shared) with the same bytes
out as in one.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np

from moesim.network.aggregate import PatternCache
from moesim.plan.graph import COLLECTIVE, TRANSFER, StepGraph

MAX_PARTS = 64
"""At most this many parts: beyond it, consecutive parts (in order of their lowest device)
are simulated together, ``ceil(n / MAX_PARTS)`` at a time, so a cluster of many tiny parts
does not pay an engine's set-up per part."""

PARALLEL_MIN_DEVICES = 64
"""Clusters of fewer devices run their parts one after another in this process: their runs
take less than starting workers (about 25 ms: 4 parts of 8 GPUs take 9 ms in-process, 31-40
ms on two workers)."""

FORK_ALLOWED = {"parts": True}
"""Whether this process may fork workers for the parts (a sweep's worker processes say no:
the sweep already runs one point per CPU)."""


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per node ``0..n-1``, the smallest node of its connected component (edges ``a[i]-b[i]``):
    label propagation to the minimum, with pointer jumping."""
    label = np.arange(n)
    if len(a) == 0:
        return label
    while True:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:  # every label points at a node of its component with a smaller label
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            return label
        label = new


def _distinct(arrays: list[tuple[np.ndarray, ...]]) -> list[tuple[np.ndarray, ...]]:
    """Each distinct tuple of integer arrays once (int64), in order of first appearance:
    told apart by identity first (layers share their arrays), then by contents."""
    by_id: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}
    for arrs in arrays:
        by_id.setdefault(tuple(map(id, arrs)), arrs)
    if len(by_id) <= 8:  # few: not worth hashing (a repeat only repeats edges)
        return [tuple(np.asarray(x, np.int64) for x in arrs) for arrs in by_id.values()]
    by_contents: dict[bytes, tuple[np.ndarray, ...]] = {}
    for arrs in by_id.values():
        arrs = tuple(np.asarray(x, np.int64) for x in arrs)
        h = hashlib.blake2b(digest_size=16)
        for x in arrs:
            h.update(len(x).to_bytes(8, "little"))
            h.update(np.ascontiguousarray(x).tobytes())
        by_contents.setdefault(h.digest(), arrs)
    return list(by_contents.values())


def pair_components(pairs: list[tuple[np.ndarray, np.ndarray]], n_devices: int) -> np.ndarray:
    """Per device, the lowest device it is connected to by the ``(src, dst)`` pairs."""
    if not pairs:
        return np.arange(n_devices)
    a = np.concatenate([np.asarray(s, np.int64) for s, _ in pairs])
    b = np.concatenate([np.asarray(d, np.int64) for _, d in pairs])
    return _components(n_devices, a, b)


def pairs_by_component(
    src: np.ndarray, dst: np.ndarray, label: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pairs sent from each component of ``label`` (in order of its lowest device), in
    their order: what a part's engine selects of a collective (``Engine._part_pairs``), so
    flow patterns built from these are the ones it looks up."""
    of = label[src]
    out = []
    for c in np.unique(of).tolist():
        sel = np.flatnonzero(of == c)
        out.append((src[sel], dst[sel]))
    return out


def independent_parts(
    graph: StepGraph, patterns: PatternCache, n_devices: int, n_links: int
) -> list[np.ndarray]:
    """The step's independent parts, each a sorted array of devices, in order of their lowest
    device (one part of every device where nothing splits). Two devices are in one part
    when a collective has a pair between them (zero-byte pairs too: a receiver waits for
    every sender), when they share a barrier group, or when flows of both (a collective's
    slots, from its senders to its receivers, or a transfer) cross one link. The links are
    read from the flow patterns of each part's own pairs (the ones its engine uses)."""
    traffic = [n.traffic for n in graph.nodes if n.kind == COLLECTIVE and n.traffic is not None]
    pairs = _distinct([(t.src, t.dst) for t in traffic])
    barriers = _distinct(
        [(t.members,) for t in traffic if t.barrier and t.members is not None and len(t.members)]
    )
    edges = list(pairs)
    for (members,) in barriers:  # a barrier group waits for its last member
        valid = np.flatnonzero(members >= 0)
        first = np.full(int(members.max()) + 1, -1)
        first[members[valid][::-1]] = valid[::-1]
        edges.append((valid, first[members[valid]]))
    label = pair_components(edges, n_devices)
    transfers = [n for n in graph.nodes if n.kind == TRANSFER and n.links is not None]
    if len(np.unique(label)) == 1 and not transfers:
        return [np.arange(n_devices)]
    # devices whose flows cross one link: every slot's senders and receivers with its links
    # (nodes n_devices + link), a slot standing for its first receiver's part so far (its
    # first sender's where it feeds none)
    a, b = [], []
    for src, dst in pairs:
        for s, d in pairs_by_component(src, dst, label):
            pat = patterns.get(s, d)
            if pat.n_slots == 0:
                continue
            senders = label[np.repeat(np.arange(n_devices), np.diff(pat.contrib_offsets))]
            rep = np.full(pat.n_slots, -1)
            rep[pat.contrib_slot[::-1]] = senders[::-1]
            fed = np.diff(pat.receiver_ptr) > 0
            rep[fed] = label[pat.receivers[pat.receiver_ptr[:-1][fed]]]
            hops = pat.paths.ravel()
            a += [senders, np.repeat(rep, pat.paths.shape[1])]
            b += [rep[pat.contrib_slot], np.where(hops >= 0, n_devices + hops, -1)]
    for node in transfers:
        g = np.flatnonzero(np.asarray(node.links) >= 0)
        a.append(label[g])
        b.append(n_devices + np.asarray(node.links)[g].astype(np.int64))
    a, b = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (a, b))
    keep = (a >= 0) & (b >= 0)
    label = _components(n_devices + n_links, a[keep], b[keep])[label]
    _, part_of = np.unique(label, return_inverse=True)  # parts in order of their lowest device
    order = np.argsort(part_of, kind="stable")
    parts = np.split(order, np.cumsum(np.bincount(part_of))[:-1])
    per = -(-len(parts) // MAX_PARTS)
    if per > 1:
        parts = [np.sort(np.concatenate(parts[k : k + per])) for k in range(0, len(parts), per)]
    return parts


def worker_count(requested: int | str, n_parts: int, n_devices: int) -> int:
    """Processes to run ``n_parts`` parts of ``n_devices`` in: ``sim.workers`` (``auto``: one
    per CPU this process may use), at most one per part; 1 where forking is not possible or
    not worth it (not Linux, not the main thread, a sweep's worker process, or fewer than
    :data:`PARALLEL_MIN_DEVICES` devices)."""
    if n_parts < 2 or n_devices < PARALLEL_MIN_DEVICES or not FORK_ALLOWED["parts"]:
        return 1
    if not sys.platform.startswith("linux"):  # fork: macOS's system libraries refuse it
        return 1
    if threading.current_thread() is not threading.main_thread():
        return 1
    if requested == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        requested = cpus or os.cpu_count() or 1
    return max(1, min(int(requested), n_parts))


_JOB: dict[str, Callable[[int], Any]] = {}


def _run_one(k: int) -> tuple[int, Any]:
    return k, _JOB["run"](k)


def _worker_start() -> None:
    """A worker leaves Ctrl-C to the process that forked it (which stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_parts(run: Callable[[int], Any], n_parts: int, workers: int) -> Iterator[tuple[int, Any]]:
    """``(k, run(k))`` for every part ``k``: in order in this process (``workers`` 1), else as
    forked workers finish them (each inherits this process as it is: the plan, the flow
    patterns and the loaded kernels). A worker that dies (killed for memory, say) fails the
    run (``BrokenProcessPool``) rather than leaving it waiting; on any error, Ctrl-C
    included, the workers are stopped at once."""
    if workers <= 1:
        for k in range(n_parts):
            yield k, run(k)
        return
    _JOB["run"] = run
    with warnings.catch_warnings():  # Python >= 3.12 warns on fork with threads alive
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_start
        )
        try:
            futures = [pool.submit(_run_one, k) for k in range(n_parts)]
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            _JOB.clear()
