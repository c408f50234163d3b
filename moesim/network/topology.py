"""Cluster topologies as networkx DiGraphs, with routing vectorised over device pairs.

Nodes are devices (``n{a}.d{j}``), switches and NICs; every directed edge is a *link* with
``bandwidth_bytes_per_s`` (one direction) and ``latency_s``, numbered by ``link_id``. A switched
hop (device -> switch -> device) splits the link's latency between its two edges, so one hop
costs the catalog latency once.

Routing is structural (computed with numpy from the topology kind, not by graph search) so
that millions of device pairs route in milliseconds; the test suite checks these paths against
``networkx`` shortest paths on the same graph.

Intra-node kinds: ``nvswitch`` / ``pcie`` (one switch, full bandwidth per device port),
``bus`` (every transfer also crosses one shared link: host shared memory, a PCIe root),
``full_mesh`` (a direct link per device pair, e.g. MI300X Infinity Fabric), ``ring``
(bidirectional, shortest direction). Inter-node kinds: ``rail_optimized`` (NIC r of every node
on rail switch r; traffic to a device on rail r first crosses the intra-node fabric to the
local device on rail r, as NCCL's PXN does) and ``fat_tree`` (leaf switches with one spine,
uplinks sized by ``oversubscription``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.config.resolve import resolved_topology
from moesim.config.scenario import ClusterConfig, PimConfig, TiersConfig, TopologyConfig

if TYPE_CHECKING:
    import networkx as nx

ROUTE_TABLE_MAX_DEVICES = 512  # all-pairs route table up to here (512^2 x hops x 8 bytes)


@dataclass
class Topology:
    """A built topology: the graph's nodes and edges, per-link arrays and routing tables.
    :attr:`graph` (networkx, imported on first use: about 0.3 s) is built from them when
    asked for; routing and the engines never need it."""

    graph_nodes: list[tuple[str, dict[str, Any]]]
    graph_edges: list[tuple[str, str, dict[str, Any]]]
    nodes: int
    devices_per_node: int
    intra_kind: str
    inter_kind: str
    link_names: list[str] = field(default_factory=list)
    link_kinds: list[str] = field(default_factory=list)
    bandwidth_bytes_per_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    latency_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    message_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    collective_launch_s: float = 0.0
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    nodes_per_leaf: int = 1
    nic_of_local: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The topology as a networkx DiGraph: devices, switches and NICs as nodes (with
        ``kind``), links as edges (``link_id``, ``kind``, ``bandwidth_bytes_per_s``,
        ``latency_s``), in the order they were built."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from(self.graph_nodes)
        graph.add_edges_from(self.graph_edges)
        return graph

    @property
    def n_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def n_links(self) -> int:
        return len(self.link_names)

    def device_name(self, g: int) -> str:
        return f"n{g // self.devices_per_node}.d{g % self.devices_per_node}"

    def routes(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Link ids along the path of each (src, dst) device pair, padded with -1: ``[F, H]``.
        Up to :data:`ROUTE_TABLE_MAX_DEVICES` devices, every pair is routed once and later
        calls gather rows of that table (skewed routing changes the pairs every layer)."""
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        n_dev = self.n_devices
        if n_dev > ROUTE_TABLE_MAX_DEVICES:
            return self._route(src, dst)
        table = self.tables.get("route_table")
        if table is None:
            every = np.arange(n_dev * n_dev)
            table = self.tables["route_table"] = self._route(every // n_dev, every % n_dev)
        out = table[src * n_dev + dst]
        width = out.shape[1]  # rows are left-justified: drop the columns no row reaches
        while width and not (out[:, width - 1] >= 0).any():
            width -= 1
        return out[:, :width]

    def pair_latency_s(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """:meth:`path_latency_s` of each (src, dst) pair's route, gathered from a table of
        every pair's where :meth:`routes` keeps one (the same numbers: a row's trailing
        padding adds zeros)."""
        table = self.tables.get("route_table")
        if table is None or table.shape[1] > ROW_SUM_MAX_WIDTH:
            return self.path_latency_s(self.routes(src, dst))
        latency = self.tables.get("route_latency_s")
        if latency is None:
            latency = self.tables["route_latency_s"] = self.path_latency_s(table)
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        return latency[src * self.n_devices + dst]

    def _route(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        n = self.devices_per_node
        a, j, b, k = src // n, src % n, dst // n, dst % n
        local = a == b
        out = np.full((len(src), 0), -1, dtype=np.int64)
        if local.any():
            intra = self._intra(a, j, k)
            out = _hstack(out, np.where(local[:, None], intra, -1))
        remote = ~local
        if remote.any():
            out = _hstack(out, np.where(remote[:, None], self._inter(a, j, b, k), -1))
        return left_justify(out)

    def dominated_by(self) -> np.ndarray:
        """For each link, a link ``M`` that every route through it also crosses, with no more
        bandwidth; -1 where there is none. Such a link never sets a max-min rate: ``M`` has
        at least its load and at most its headroom, so ``M`` saturates no later and freezes
        all of its flows first; the rate solver leaves it out. Here: a device's host link up
        to its NIC (every route through it continues on that NIC's network uplink) and down
        from it (every route through it arrives on that NIC's downlink)."""
        dom = np.full(self.n_links, -1, dtype=np.int64)
        t = self.tables
        if "dev_nic_up" not in t:
            return dom
        g = np.arange(self.n_devices)
        node, nic = g // self.devices_per_node, self.nic_of_local[g % self.devices_per_node]
        bw = self.bandwidth_bytes_per_s
        for host, net in (("dev_nic_up", "nic_up"), ("dev_nic_down", "nic_down")):
            link, over = t[host], t[net][node, nic]
            ok = bw[link] >= bw[over]
            dom[link[ok]] = over[ok]
        return dom

    def path_latency_s(self, paths: np.ndarray) -> np.ndarray:
        """Latency of one message along each padded path: the links' ``latency_s`` summed and
        the largest ``message_overhead_s`` along it (the protocol's fixed cost per message); an
        empty path (a device to itself) costs nothing. A ring collective pays it once per step;
        the device's ``collective_launch_s`` is paid once per collective on top
        (:meth:`collective_latency_s`: NCCL runs a whole ring inside one kernel)."""
        valid = paths >= 0
        ids = np.maximum(paths, 0)
        lat = _row_sums(np.where(valid, self.latency_s[ids], 0.0))
        if not self.message_s.size:
            return lat
        msg = np.zeros(len(paths))  # the row maxima from 0.0, a column at a time (exact)
        crossed = np.zeros(len(paths), dtype=bool)
        per_hop = np.where(valid, self.message_s[ids], 0.0)
        for h in range(paths.shape[1]):
            np.maximum(msg, per_hop[:, h], out=msg)
            crossed |= valid[:, h]
        return lat + np.where(crossed, msg, 0.0)

    def collective_latency_s(
        self, path_latency_s: np.ndarray, steps: float, launches: bool = True
    ) -> np.ndarray:
        """A collective's fixed time per flow (of a path between two devices): ``steps``
        messages along the path, then the kernel's launch once."""
        lat = np.asarray(path_latency_s, dtype=float)
        return lat * steps + (self.collective_launch_s if launches else 0.0)

    # -- routing pieces -------------------------------------------------------------------
    def _intra(self, a: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Intra-node path from local device j to k on node a (empty where j == k)."""
        n, t = self.devices_per_node, self.tables
        same = (j == k)[:, None]
        if self.intra_kind in ("nvswitch", "pcie"):
            hops = np.stack([t["up"][a * n + j], t["down"][a * n + k]], axis=1)
        elif self.intra_kind == "bus":
            hops = np.stack([t["up"][a * n + j], t["bus"][a], t["down"][a * n + k]], axis=1)
        elif self.intra_kind == "full_mesh":
            hops = t["mesh"][a, j, k][:, None]
        else:  # ring, shortest direction
            fwd_len = (k - j) % n
            fwd = fwd_len <= n - fwd_len
            length = np.where(fwd, fwd_len, n - fwd_len)
            step = np.arange(max(1, n // 2))[None, :]
            pos = np.where(fwd[:, None], j[:, None] + step, j[:, None] - step) % n
            table = np.where(fwd[:, None], t["next"][a[:, None] * n + pos], 0)
            table = np.where(~fwd[:, None], t["prev"][a[:, None] * n + pos], table)
            hops = np.where(step < length[:, None], table, -1)
        return np.where(same, -1, hops)

    def _inter(self, a: np.ndarray, j: np.ndarray, b: np.ndarray, k: np.ndarray) -> np.ndarray:
        n, t, nic = self.devices_per_node, self.tables, self.nic_of_local
        r_dst = nic[k]
        if self.inter_kind == "rail_optimized":
            # PXN: hop inside the source node to the device on the destination's rail
            nics = int(nic.max()) + 1
            first_on_rail = (r_dst * n + nics - 1) // nics
            p = np.where(nic[j] == r_dst, j, first_on_rail)
            lead = self._intra(a, j, p)
            tail = np.stack(
                [
                    t["dev_nic_up"][a * n + p],
                    t["nic_up"][a, r_dst],
                    t["nic_down"][b, r_dst],
                    t["dev_nic_down"][b * n + k],
                ],
                axis=1,
            )
            return _hstack(lead, tail)
        la, lb = a // self.nodes_per_leaf, b // self.nodes_per_leaf
        cross = la != lb
        return np.stack(
            [
                t["dev_nic_up"][a * n + j],
                t["nic_up"][a, nic[j]],
                np.where(cross, t["leaf_up"][la], -1),
                np.where(cross, t["leaf_down"][lb], -1),
                t["nic_down"][b, r_dst],
                t["dev_nic_down"][b * n + k],
            ],
            axis=1,
        )


def left_justify(rows: np.ndarray) -> np.ndarray:
    """Each row's valid (>= 0) link ids first, in order, then -1 padding; as narrow as the
    longest row. Column by column (paths are a few hops wide): no sort, no 2-D scatter."""
    n_rows, width = rows.shape
    out = np.full(n_rows * width, -1, dtype=rows.dtype)
    fill = np.arange(n_rows, dtype=np.int64) * width  # next free position of each row
    for c in range(width):
        col = rows[:, c]
        valid = col >= 0
        out[fill[valid]] = col[valid]
        fill += valid
    used = int((fill - np.arange(n_rows) * width).max()) if n_rows else 0
    return out.reshape(n_rows, width)[:, :used]


ROW_SUM_MAX_WIDTH = 7
"""Up to this many columns, :func:`_row_sums` adds a row's entries a column at a time, left
to right: what ``sum(axis=1)`` does below numpy's pairwise blocks of 8, several times
faster on narrow tables (a path has a few hops)."""


def _row_sums(a: np.ndarray) -> np.ndarray:
    """``a.sum(axis=1)`` of a 2-D float array, bit for bit: left to right a column at a
    time where ``a`` has at most :data:`ROW_SUM_MAX_WIDTH` columns."""
    if a.shape[1] > ROW_SUM_MAX_WIDTH or a.shape[1] == 0:
        return a.sum(axis=1)
    out = a[:, 0].copy()
    for h in range(1, a.shape[1]):
        out += a[:, h]
    return out


def _hstack(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.concatenate([x, y], axis=1)


class _Builder:
    """Accumulates nodes and links (the graph's, see :attr:`Topology.graph`) and parallel
    arrays."""

    def __init__(self) -> None:
        self.nodes: list[tuple[str, dict[str, Any]]] = []
        self.edges: list[tuple[str, str, dict[str, Any]]] = []
        self.names: list[str] = []
        self.kinds: list[str] = []
        self.bw: list[float] = []
        self.lat: list[float] = []
        self.msg: list[float] = []

    def link(self, u: str, v: str, kind: str, bw: float, lat: float, msg: float = 0.0) -> int:
        """Add one directed link: ``bw`` bytes/s as transfers reach it, ``lat`` seconds,
        ``msg`` seconds of fixed cost per message."""
        lid = len(self.names)
        self.edges.append(
            (u, v, {"link_id": lid, "kind": kind, "bandwidth_bytes_per_s": bw, "latency_s": lat})
        )
        self.names.append(f"{u}->{v}")
        self.kinds.append(kind)
        self.bw.append(bw)
        self.lat.append(lat)
        self.msg.append(msg)
        return lid

    def add_node(self, name: str, **attrs: Any) -> None:
        """Add a graph node (device, switch, NIC) with its attributes."""
        self.nodes.append((name, attrs))


def attach_pim(
    b: _Builder, t: dict[str, np.ndarray], n_devices: int, n: int, pim: PimConfig
) -> None:
    """A PIM node per device (``n{a}.d{j}.pim``: its ``units_per_gpu`` units) joined by one
    link each way of kind ``pim`` (one link both directions share when the unit's pins are
    half duplex): ``units x min(unit pins, host link)`` bytes/s, the host link's latency
    (moesim/cost/pim.py). Links are appended after all others, so device
    pairs route exactly as without PIM; ``t["pim_up"][g]`` / ``t["pim_down"][g]`` are the ids."""
    from moesim import catalog
    from moesim.cost.pim import link_bandwidth_bytes_per_s

    link = catalog.link(pim.device.host_link)
    bw = link_bandwidth_bytes_per_s(pim.device, link, pim.units_per_gpu)
    t["pim_up"], t["pim_down"] = np.empty(n_devices, np.int64), np.empty(n_devices, np.int64)
    for g in range(n_devices):
        dev, unit = f"n{g // n}.d{g % n}", f"n{g // n}.d{g % n}.pim"
        b.add_node(unit, kind="pim", device=g)
        t["pim_up"][g] = b.link(dev, unit, "pim", bw, link.latency_s)
        if pim.device.external_duplex == "half":  # one shared link: in and out take turns
            t["pim_down"][g] = t["pim_up"][g]
        else:
            t["pim_down"][g] = b.link(unit, dev, "pim", bw, link.latency_s)


def attach_tiers(
    b: _Builder, t: dict[str, np.ndarray], n_devices: int, n: int, tiers: TiersConfig
) -> None:
    """A memory-tier node per device (``n{a}.d{j}.tier``: where its offloaded experts live)
    joined by one link of kind ``tier`` toward the device, at the slower of the tier's link
    and its memory (moesim/cost/tiers.py); ``t["tier_fetch"][g]`` is its id. Appended after
    all others, like the PIM links."""
    from moesim.cost.tiers import fetch_bandwidth_bytes_per_s

    bw = fetch_bandwidth_bytes_per_s(tiers.link, tiers.bandwidth_bytes_per_s)
    t["tier_fetch"] = np.empty(n_devices, np.int64)
    for g in range(n_devices):
        dev, tier = f"n{g // n}.d{g % n}", f"n{g // n}.d{g % n}.tier"
        b.add_node(tier, kind="tier", device=g)
        t["tier_fetch"][g] = b.link(tier, dev, "tier", bw, tiers.link.latency_s)


def build_topology(
    cluster: ClusterConfig,
    topo: TopologyConfig,
    pim: PimConfig | None = None,
    tiers: TiersConfig | None = None,
) -> Topology:
    """Build the graph and routing tables for a cluster (defaults of ``topo`` resolved from
    the device: :func:`moesim.config.resolve.resolved_topology`); with ``pim``, each
    device's PIM units too (:func:`attach_pim`), with ``tiers`` the memory tier its offloaded
    experts come from (:func:`attach_tiers`)."""
    topo = resolved_topology(cluster, topo)
    nodes, n = cluster.nodes, cluster.devices_per_node
    intra_link, intra_kind = topo.intra_node_link, topo.intra_node
    b = _Builder()
    for g in range(nodes * n):
        b.add_node(f"n{g // n}.d{g % n}", kind="device", device=g)
    t: dict[str, np.ndarray] = {}
    dev = [[f"n{a}.d{j}" for j in range(n)] for a in range(nodes)]
    # links carry what transfers reach: nominal bandwidth x the link's measured efficiency
    bw, lat = intra_link.effective_bandwidth_bytes_per_s, intra_link.latency_s
    im = intra_link.message_overhead_s
    if intra_kind in ("nvswitch", "pcie"):
        up, down = np.empty(nodes * n, np.int64), np.empty(nodes * n, np.int64)
        for a in range(nodes):
            sw = f"n{a}.{'nvsw' if intra_kind == 'nvswitch' else 'pcisw'}"
            b.add_node(sw, kind="switch")
            for j in range(n):
                up[a * n + j] = b.link(dev[a][j], sw, "intra", bw, lat / 2, im)
                down[a * n + j] = b.link(sw, dev[a][j], "intra", bw, lat / 2, im)
        t["up"], t["down"] = up, down
    elif intra_kind == "bus":
        up, down = np.empty(nodes * n, np.int64), np.empty(nodes * n, np.int64)
        bus = np.empty(nodes, np.int64)
        for a in range(nodes):
            src, dst = f"n{a}.bus", f"n{a}.bus_out"
            b.add_node(src, kind="switch")
            b.add_node(dst, kind="switch")
            bus[a] = b.link(src, dst, "intra", bw, 0.0, im)
            for j in range(n):
                up[a * n + j] = b.link(dev[a][j], src, "intra", bw, lat / 2, im)
                down[a * n + j] = b.link(dst, dev[a][j], "intra", bw, lat / 2, im)
        t["up"], t["down"], t["bus"] = up, down, bus
    elif intra_kind == "full_mesh":
        mesh = np.full((nodes, n, n), -1, np.int64)
        for a in range(nodes):
            for j in range(n):
                for k in range(n):
                    if j != k:
                        mesh[a, j, k] = b.link(dev[a][j], dev[a][k], "intra", bw, lat, im)
        t["mesh"] = mesh
    else:  # ring
        nxt, prv = np.full(nodes * n, -1, np.int64), np.full(nodes * n, -1, np.int64)
        for a in range(nodes):
            for j in range(n):
                if n > 1:
                    nxt[a * n + j] = b.link(dev[a][j], dev[a][(j + 1) % n], "intra", bw, lat, im)
            for j in range(n):
                if n > 2:
                    prv[a * n + j] = b.link(dev[a][j], dev[a][(j - 1) % n], "intra", bw, lat, im)
                elif n == 2:
                    prv[a * n + j] = nxt[a * n + j]
        t["next"], t["prev"] = nxt, prv

    nics = topo.nics_per_node or n
    nic_of_local = np.arange(n) * nics // n
    npl = topo.nodes_per_leaf or nodes
    if nodes > 1:
        host, net = topo.nic_host_link, topo.inter_node_link
        t["dev_nic_up"] = np.empty(nodes * n, np.int64)
        t["dev_nic_down"] = np.empty(nodes * n, np.int64)
        t["nic_up"] = np.empty((nodes, nics), np.int64)
        t["nic_down"] = np.empty((nodes, nics), np.int64)
        hb, hl, hm = (
            host.effective_bandwidth_bytes_per_s,
            host.latency_s / 2,
            host.message_overhead_s,
        )
        nb, nl, nm = net.effective_bandwidth_bytes_per_s, net.latency_s / 2, net.message_overhead_s
        for a in range(nodes):
            for j in range(n):
                nic = f"n{a}.nic{nic_of_local[j]}"
                b.add_node(nic, kind="nic")
                t["dev_nic_up"][a * n + j] = b.link(dev[a][j], nic, "host", hb, hl, hm)
                t["dev_nic_down"][a * n + j] = b.link(nic, dev[a][j], "host", hb, hl, hm)
        if topo.inter_node == "rail_optimized":
            for r in range(nics):
                sw = f"rail{r}"
                b.add_node(sw, kind="switch")
                for a in range(nodes):
                    t["nic_up"][a, r] = b.link(f"n{a}.nic{r}", sw, "network", nb, nl, nm)
                    t["nic_down"][a, r] = b.link(sw, f"n{a}.nic{r}", "network", nb, nl, nm)
        else:
            n_leaves = nodes // npl
            t["leaf_up"] = np.full(n_leaves, -1, np.int64)
            t["leaf_down"] = np.full(n_leaves, -1, np.int64)
            uplink_bw = npl * nics * nb / topo.oversubscription
            for leaf in range(n_leaves):
                sw = f"leaf{leaf}"
                b.add_node(sw, kind="switch")
                for a in range(leaf * npl, (leaf + 1) * npl):
                    for r in range(nics):
                        t["nic_up"][a, r] = b.link(f"n{a}.nic{r}", sw, "network", nb, nl, nm)
                        t["nic_down"][a, r] = b.link(sw, f"n{a}.nic{r}", "network", nb, nl, nm)
                if n_leaves > 1:
                    b.add_node("spine", kind="switch")
                    t["leaf_up"][leaf] = b.link(sw, "spine", "spine", uplink_bw, nl, nm)
                    t["leaf_down"][leaf] = b.link("spine", sw, "spine", uplink_bw, nl, nm)
    if pim is not None:
        attach_pim(b, t, nodes * n, n, pim)
    if tiers is not None:
        attach_tiers(b, t, nodes * n, n, tiers)
    return Topology(
        graph_nodes=b.nodes,
        graph_edges=b.edges,
        nodes=nodes,
        devices_per_node=n,
        intra_kind=intra_kind,
        inter_kind=topo.inter_node,
        link_names=b.names,
        link_kinds=b.kinds,
        bandwidth_bytes_per_s=np.array(b.bw, dtype=float),
        latency_s=np.array(b.lat, dtype=float),
        message_s=np.array(b.msg, dtype=float),
        collective_launch_s=cluster.device.collective_launch_s,
        tables=t,
        nodes_per_leaf=npl,
        nic_of_local=nic_of_local,
    )
