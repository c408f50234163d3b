"""Collectives over groups of devices as aggregated flows, and their alpha-beta closed forms.

A collective among the rows of ``groups`` (``[n_groups, n]`` device ids) becomes one
:class:`~moesim.plan.types.Traffic`: every flow carries the bytes its (source, destination)
pair moves over all steps, and ``latency_steps`` counts the sequential steps, each of which
pays the path latency once. The network (fluid engine or analytic bottleneck) then turns
bytes and links into time, so rings that cross nodes slow down at their slowest link.

Ring all-reduce (Patarasuk & Yuan, JPDC 2009): a reduce-scatter then an all-gather, each
``n - 1`` steps of ``B / n`` bytes to the ring successor::

    t_ring = 2 (n - 1) alpha + 2 (n - 1) / n x B / beta

Double binary tree all-reduce (Sanders, Speck & Traeff 2009; NCCL's tree algorithm): two
complementary binary trees each reduce and then broadcast half of the buffer, every tree edge
carrying ``B / 2`` up and ``B / 2`` down; pipelined, a rank's busiest port moves ``2 B``::

    t_tree = 2 depth alpha + max_port_bytes / beta,  depth = floor(log2 n)

``alpha`` is the path latency and ``beta`` the bottleneck bandwidth (bytes per second).
"""

from __future__ import annotations

import math

import numpy as np

from moesim.plan.types import Traffic

EMPTY = Traffic(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0))


def _per_member(groups: np.ndarray, nbytes: float | np.ndarray) -> np.ndarray:
    """Bytes of each member's buffer, indexed by device id."""
    groups = np.asarray(groups)
    size = int(groups.max()) + 1 if groups.size else 0
    return np.broadcast_to(np.asarray(nbytes, dtype=float), (size,)).copy()


def _ring(groups: np.ndarray, per_flow: np.ndarray, steps: float) -> Traffic:
    """Every member sends ``per_flow[src]`` bytes to its ring successor; each row is a group
    behind a barrier (a ring step waits for its receive, so no member gets ahead)."""
    groups = np.asarray(groups)
    if groups.shape[1] < 2:
        return EMPTY
    src = groups.ravel()
    dst = np.roll(groups, -1, axis=1).ravel()
    keep = per_flow[src] > 0
    if not keep.any():
        return EMPTY
    return Traffic(
        src[keep],
        dst[keep],
        per_flow[src][keep],
        0.0,
        float(steps),
        _members(groups),
        True,
        ring_steps=int(steps),
    )


def _members(groups: np.ndarray) -> np.ndarray:
    """Group id of every device (its row in ``groups``), -1 for devices in no row."""
    members = np.full(int(groups.max()) + 1, -1, dtype=np.int64)
    members[groups.ravel()] = np.repeat(np.arange(groups.shape[0]), groups.shape[1])
    return members


def ring_allreduce(groups: np.ndarray, nbytes: float | np.ndarray) -> Traffic:
    """Ring all-reduce of a ``nbytes`` buffer (scalar or per device) within each row."""
    n = np.asarray(groups).shape[1]
    return _ring(groups, 2.0 * (n - 1) / n * _per_member(groups, nbytes), 2 * (n - 1))


def ring_reduce_scatter(groups: np.ndarray, nbytes: float | np.ndarray) -> Traffic:
    """Ring reduce-scatter of a ``nbytes`` buffer: each member ends with ``1/n`` reduced."""
    n = np.asarray(groups).shape[1]
    return _ring(groups, (n - 1) / n * _per_member(groups, nbytes), n - 1)


def ring_allgather(groups: np.ndarray, nbytes: float | np.ndarray) -> Traffic:
    """Ring all-gather into a ``nbytes`` buffer (each member contributes ``1/n``)."""
    return ring_reduce_scatter(groups, nbytes)


def tree_depth(n: int) -> int:
    """Depth of a heap-ordered binary tree of ``n`` nodes."""
    return math.floor(math.log2(n)) if n > 1 else 0


def tree_allreduce(groups: np.ndarray, nbytes: float | np.ndarray) -> Traffic:
    """Double binary tree all-reduce within each row: tree 1 is heap-ordered over the ranks
    (parent of rank r is (r - 1) // 2), tree 2 the same over the mirrored ranks n - 1 - r, so
    the internal nodes of one tree are leaves of the other. Each tree reduces up and
    broadcasts down half of the buffer."""
    groups = np.asarray(groups)
    n = groups.shape[1]
    if n < 2:
        return EMPTY
    buf = _per_member(groups, nbytes)
    child = np.arange(1, n)
    parent = (child - 1) // 2
    pairs = []
    for a, b in ((child, parent), (n - 1 - child, n - 1 - parent)):  # the two trees
        pairs += [(a, b), (b, a)]  # reduce up, broadcast down
    loc_src = np.concatenate([p[0] for p in pairs])
    loc_dst = np.concatenate([p[1] for p in pairs])
    src = groups[:, loc_src].ravel()
    dst = groups[:, loc_dst].ravel()
    # aggregate flows of the same (src, dst) pair (both trees may use an edge)
    key = src * (buf.size + 1) + dst
    _, first, count = np.unique(key, return_index=True, return_counts=True)
    nb = buf[src[first]] / 2.0 * count
    keep = nb > 0
    if not keep.any():
        return EMPTY
    return Traffic(
        src[first][keep],
        dst[first][keep],
        nb[keep],
        0.0,
        2.0 * tree_depth(n),
        _members(groups),
        True,
    )


def tree_allreduce_s(
    nbytes: float, n: int, bandwidth_bytes_per_s: float, latency_s: float
) -> float:
    """Alpha-beta time of the double binary tree above when every rank has its own port (a
    switch): ``2 depth alpha + port_bytes / beta``; the busiest port carries ``B`` for n = 2,
    ``3B/2`` for n = 3, 4 and ``2B`` from n = 5 (an internal node with two children in one
    tree is a leaf of the other)."""
    if n < 2:
        return 0.0
    flows = tree_allreduce(np.arange(n)[None, :], nbytes)
    port = max(
        np.bincount(flows.src, flows.nbytes, minlength=n).max(),
        np.bincount(flows.dst, flows.nbytes, minlength=n).max(),
    )
    return 2 * tree_depth(n) * latency_s + float(port) / bandwidth_bytes_per_s
