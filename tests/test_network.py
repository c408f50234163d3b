"""Fluid network: closed-form alpha-beta times, fair sharing, routing against networkx."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import simpy

from moesim import catalog, scenario_from_dict
from moesim.network import FluidNetwork, build_topology, maxmin_rates

MB = 1e6
NVL, PCIE, IB = (catalog.link(k) for k in ("nvlink4", "pcie5-x16", "ib-ndr-400"))
LAUNCH_S = catalog.device("h100-sxm").collective_launch_s
# one NVSwitch hop: its latency, the per-message overhead, the collective kernel's fixed cost
HOP_S = NVL.latency_s + NVL.message_overhead_s + LAUNCH_S


def _topology(nodes=1, per_node=8, device="h100-sxm", **topo):
    sc = scenario_from_dict(
        {
            "model": {"preset": "mixtral-8x7b", "n_layers": 1},
            "cluster": {"nodes": nodes, "devices_per_node": per_node, "device": device},
            "topology": topo,
            "workload": {"phase": "decode", "batch_size": nodes * per_node, "seq_len": 16},
            "parallelism": {"ep": 8},
        }
    )
    return build_topology(sc.cluster, sc.topology)


def _run_flows(topo, src, dst, nbytes, tolerance=1e-3):
    """Send flows at t=0; return each destination group's arrival time."""
    env = simpy.Environment()
    net = FluidNetwork(env, topo, tolerance)
    done: dict[int, float] = {}
    gids = {}
    for d in sorted(set(dst)):
        gid, ev = net.group(int(np.sum(np.asarray(dst) == d)))
        gids[d] = gid
        ev.callbacks.append(lambda _e, d=d: done.__setitem__(d, env.now))
    net.send(
        np.asarray(src),
        np.asarray(dst),
        np.asarray(nbytes, float),
        np.array([gids[d] for d in dst]),
    )
    env.run()
    return done, net


def test_uniform_all_to_all_on_switch_matches_alpha_beta():
    topo = _topology()
    n, per_pair = 8, 4 * MB
    pairs = [(s, d) for s, d in itertools.product(range(n), repeat=2) if s != d]
    src, dst = zip(*pairs, strict=True)
    done, _ = _run_flows(topo, src, dst, [per_pair] * len(pairs))
    bw = NVL.effective_bandwidth_bytes_per_s  # NVLink4 per direction as transfers reach it
    expected = (n - 1) * per_pair / bw + HOP_S
    for t in done.values():
        assert t == pytest.approx(expected, rel=0.01)


def test_two_flows_sharing_a_link_each_get_half():
    topo = _topology()
    nbytes = 9 * MB
    # d0 -> d2 and d1 -> d2 share only the switch -> d2 link
    done, _net = _run_flows(topo, [0, 1], [2, 2], [nbytes, nbytes])
    expected = 2 * nbytes / NVL.effective_bandwidth_bytes_per_s + HOP_S
    assert done[2] == pytest.approx(expected, rel=1e-6)
    rates = maxmin_rates(
        topo.routes(np.array([0, 1]), np.array([2, 2])), topo.bandwidth_bytes_per_s
    )
    np.testing.assert_allclose(rates, [NVL.effective_bandwidth_bytes_per_s / 2] * 2)


def test_maxmin_textbook_example():
    # link 0 (cap 1): flows A, B; link 1 (cap 1): flows A, C, D -> A, C, D get 1/3, B gets 2/3
    paths = np.array([[0, 1], [0, -1], [1, -1], [1, -1]])
    np.testing.assert_allclose(
        maxmin_rates(paths, np.array([1.0, 1.0])), [1 / 3, 2 / 3, 1 / 3, 1 / 3]
    )
    # weighted: a flow of weight 3 gets three times the share of a weight-1 flow
    np.testing.assert_allclose(
        maxmin_rates(np.array([[0], [0]]), np.array([4.0]), weight=np.array([3.0, 1.0])), [3.0, 1.0]
    )


def test_link_bytes_equal_traffic_times_hops():
    topo = _topology(nodes=2, inter_node="rail_optimized")
    rng = np.random.default_rng(1)
    src = rng.integers(0, 16, 200)
    dst = rng.integers(0, 16, 200)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    nbytes = rng.integers(1, 1000, len(src)).astype(float)
    _, net = _run_flows(topo, src, dst, nbytes)
    hops = (topo.routes(src, dst) >= 0).sum(axis=1)
    assert net.stats.bytes_carried.sum() == pytest.approx(float((nbytes * hops).sum()))


def test_inter_node_flow_crosses_nics_and_costs_alpha_beta():
    topo = _topology(nodes=2, inter_node="rail_optimized")
    nbytes = 50 * MB
    done, _ = _run_flows(topo, [0], [8], [nbytes])  # n0.d0 -> n1.d0, same rail
    # bottleneck: the NDR port as transfers reach it; latency: PCIe + IB from the catalog, the
    # path's largest per-message overhead (IB) and the collective kernel's fixed cost
    alpha = PCIE.latency_s + IB.latency_s + IB.message_overhead_s + LAUNCH_S
    assert done[8] == pytest.approx(nbytes / IB.effective_bandwidth_bytes_per_s + alpha, rel=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        {"intra_node": "nvswitch"},
        {"intra_node": "ring"},
        {"intra_node": "pcie"},
        {"intra_node": "full_mesh"},
        {"inter_node": "fat_tree", "nodes_per_leaf": 1, "nics_per_node": 4},
        {"inter_node": "fat_tree"},
        {"inter_node": "rail_optimized", "nics_per_node": 2},
    ],
)
def test_routes_are_shortest_paths_in_the_graph(kw):
    topo = _topology(nodes=2, **kw)
    n = topo.n_devices
    src, dst = np.array([(s, d) for s in range(n) for d in range(n) if s != d]).T
    paths = topo.routes(src, dst)
    edges = {data["link_id"]: (u, v) for u, v, data in topo.graph.edges(data=True)}
    for s, d, row in zip(src, dst, paths, strict=True):
        hops = [edges[int(lid)] for lid in row if lid >= 0]
        assert hops[0][0] == topo.device_name(s) and hops[-1][1] == topo.device_name(d)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(hops))  # contiguous
        shortest = nx.shortest_path_length(topo.graph, topo.device_name(s), topo.device_name(d))
        if topo.inter_kind == "rail_optimized" and s // 8 != d // 8:
            assert len(hops) <= shortest + 2  # PXN: one extra intra-node hop at most
        else:
            assert len(hops) == shortest


def _all_pairs(n):
    pairs = [(s, d) for s, d in itertools.product(range(n), repeat=2) if s != d]
    return tuple(np.array(x) for x in zip(*pairs, strict=True))


def test_node_aggregation_is_exact_where_sources_share_their_way_out():
    """Rail-optimized PXN: every pair from one node to one device shares the whole path out
    of the node, so merging them per (source node, tail) changes no arrival time."""
    from moesim.network.aggregate import collective_times_s, flow_pattern

    topo = _topology(nodes=4, per_node=4, inter_node="rail_optimized")
    src, dst = _all_pairs(16)
    nbytes = np.full(len(src), 4 * MB)
    per_device = collective_times_s(topo, src, dst, nbytes, "device", tolerance=1e-9)
    per_node = collective_times_s(topo, src, dst, nbytes, "node", tolerance=1e-9)
    np.testing.assert_allclose(per_node, per_device, rtol=1e-9)
    # closed form: each NIC sends its rail's share to 3 other nodes: 4 sources x 3 x 4 MB
    nic_bw = IB.effective_bandwidth_bytes_per_s  # IB NDR 400 Gb/s per direction, as reached
    alpha = IB.message_overhead_s + LAUNCH_S  # per message (latencies are within the 2%)
    assert per_device.max() == pytest.approx(4 * 3 * 4 * MB / nic_bw + alpha, rel=0.02)
    merged = flow_pattern(topo, src, dst, "node").n_slots
    assert merged < flow_pattern(topo, src, dst, "device").n_slots


def test_node_aggregation_conserves_link_bytes_and_the_last_arrival():
    from moesim.network.aggregate import collective_times_s, flow_pattern

    topo = _topology(nodes=4, per_node=4, inter_node="rail_optimized")
    src, dst = _all_pairs(16)
    nbytes = np.random.default_rng(0).uniform(1 * MB, 8 * MB, len(src))
    node, dev = flow_pattern(topo, src, dst, "node"), flow_pattern(topo, src, dst, "device")
    np.testing.assert_allclose(
        node.link_bytes(nbytes, topo.n_links), dev.link_bytes(nbytes, topo.n_links)
    )
    # every pair's bytes reach its destination exactly once
    per_slot = np.bincount(node.contrib_slot, node.contribution_bytes(nbytes), node.n_slots)
    tails = np.diff(node.receiver_ptr) == 1
    assert per_slot[tails].sum() == pytest.approx(nbytes.sum())
    a = collective_times_s(topo, src, dst, nbytes, "device", tolerance=1e-9)
    b = collective_times_s(topo, src, dst, nbytes, "node", tolerance=1e-9)
    # the bottleneck NICs stay busy until their last byte either way
    assert b.max() == pytest.approx(a.max(), rel=1e-3)


def test_compiled_and_numpy_max_min_agree():
    """The compiled kernel and the vectorised reference give the same rates (random
    instances, weighted and not, at several tolerances)."""
    from moesim.network.fluid import compiled_kernel, maxmin_rates_by_component

    if compiled_kernel() is None:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(7)
    for trial in range(40):
        n_flows, n_links, hops = rng.integers(1, 60), rng.integers(4, 25), rng.integers(1, 5)
        # each flow: 1..hops distinct links, valid hops first, -1 padding last
        paths = np.full((n_flows, hops), -1)
        for f in range(n_flows):
            k = rng.integers(1, hops + 1)
            paths[f, :k] = rng.choice(n_links, size=k, replace=False)
        cap = rng.uniform(1.0, 10.0, n_links)
        weight = None if trial % 2 else rng.integers(1, 8, n_flows).astype(float)
        tol = [1e-12, 1e-3, 1e-2][trial % 3]
        np.testing.assert_allclose(
            maxmin_rates(paths, cap, weight, tol),
            maxmin_rates_by_component(paths, cap, weight, tol),
            rtol=1e-9,
        )


def test_kept_flow_index_skips_retired_flows():
    """The network keeps its flows-by-link index between solves, retired rows included;
    solving over it gives the rates the reference gives for the live flows alone."""
    from moesim.network.fluid import _compiled, maxmin_rates_by_component

    kernels = _compiled()
    if "components" not in kernels:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(11)
    for _ in range(20):
        n_flows, n_links = int(rng.integers(2, 60)), int(rng.integers(4, 25))
        paths = np.full((n_flows, 3), -1, dtype=np.int64)
        for f in range(n_flows):
            k = rng.integers(1, 4)
            paths[f, :k] = rng.choice(n_links, size=k, replace=False)
        cap = rng.uniform(1.0, 10.0, n_links)
        weight = rng.integers(1, 8, n_flows).astype(float)
        ptr, flows = kernels["csr"](paths, n_links, np.ones(n_flows, dtype=np.bool_))
        alive = rng.random(n_flows) < 0.6
        alive[0] = True
        rate = np.zeros(n_flows)
        dirty = np.ones(n_links, dtype=np.bool_)
        kernels["components"](paths, cap, weight, 1e-12, alive, ptr, flows, dirty, rate)
        expected = maxmin_rates_by_component(paths[alive], cap, weight[alive], 1e-12)
        np.testing.assert_allclose(rate[alive], expected, rtol=1e-9)
        assert np.all(rate[~alive] == 0)
        assert not dirty.any()


def test_component_search_gives_the_reference_rates_on_long_chains():
    """The compiled solve finds each dirty component by a search over the flows-by-link
    index, and takes its links in ascending id whatever their number: sorted per component
    (by insertion where short, by numba's sort where long) when the dirty links are few
    against the network's, and by one pass over the links in id order when they are many.
    Components of 3 to 200 links, the links numbered out of order along each chain, one
    chain dirty among 1 or 12 clean ones, give the rates of the numpy reference bit for
    bit."""
    from moesim.network.fluid import _compiled, maxmin_rates_by_component

    kernels = _compiled()
    if "components" not in kernels:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(17)
    for length in [3, 40, 64, 65, 200]:
        for n_clean in [1, 12]:
            n_chains = 1 + n_clean
            n_links = n_chains * length
            order = rng.permutation(n_links)  # chain position -> link id
            rows = [
                [order[c * length + i], order[c * length + i + 1]]
                for c in range(n_chains)
                for i in range(length - 1)
            ]
            paths = np.array(rows, dtype=np.int64)
            cap = rng.uniform(1.0, 10.0, n_links)
            weight = rng.integers(1, 5, len(paths)).astype(float)
            alive = np.ones(len(paths), dtype=np.bool_)
            ptr, flows = kernels["csr"](paths, n_links, alive)
            rate = np.full(len(paths), -1.0)
            dirty = np.zeros(n_links, dtype=np.bool_)
            dirty[order[length // 2]] = True  # only the first chain is re-solved
            kernels["components"](paths, cap, weight, 1e-2, alive, ptr, flows, dirty, rate)
            first = np.arange(len(paths)) < length - 1
            expected = maxmin_rates_by_component(paths[first], cap, weight[first], 1e-2)
            assert np.array_equal(rate[first], expected)
            assert np.all(rate[~first] == -1.0)  # the clean chains' rates stand
            assert not dirty.any()


def test_left_justify_keeps_each_rows_hops_in_order():
    from moesim.network.topology import left_justify

    rng = np.random.default_rng(3)
    for _ in range(100):
        rows = rng.integers(-1, 20, (int(rng.integers(0, 30)), int(rng.integers(1, 7))))
        hops = [[x for x in row if x >= 0] for row in rows]
        out = left_justify(rows)
        assert out.shape == (len(rows), max((len(h) for h in hops), default=0))
        for got, want in zip(out, hops, strict=True):
            assert got[: len(want)].tolist() == want and np.all(got[len(want) :] == -1)


def test_path_latency_equals_the_row_reductions_bit_for_bit():
    """Column-at-a-time sums and maxima give what ``sum(axis=1)`` and ``max(axis=1,
    initial=0)`` give on every row, at every width (also past the column loop's limit), on
    routed pairs of a two-tier topology and on random padded paths."""
    from moesim.network.topology import ROW_SUM_MAX_WIDTH, _row_sums

    rng = np.random.default_rng(5)
    for width in range(ROW_SUM_MAX_WIDTH + 4):
        a = rng.random((500, width)) * 10.0 ** rng.uniform(-9, -3, (500, width))
        assert np.array_equal(_row_sums(a), a.sum(axis=1))
    topo = _topology(nodes=4, per_node=8, inter_node="fat_tree")
    assert topo.message_s.size  # the maxima are exercised
    src, dst = _all_pairs(32)
    paths = topo.routes(src, dst)
    random_paths = rng.integers(-1, topo.n_links, (300, 6))
    for p in (paths, random_paths, paths[:, :0]):
        valid, ids = p >= 0, np.maximum(p, 0)
        lat = np.where(valid, topo.latency_s[ids], 0.0).sum(axis=1)
        msg = np.where(valid, topo.message_s[ids], 0.0).max(axis=1, initial=0.0)
        want = lat + np.where(valid.any(axis=1), msg, 0.0)
        assert np.array_equal(topo.path_latency_s(p), want)
    # gathered from the all-pairs table: the same bits, also where a subset's routes are
    # narrower than the table (pairs inside one node)
    local = src // 8 == dst // 8
    assert topo.routes(src[local], dst[local]).shape[1] < topo.tables["route_table"].shape[1]
    for s, d in [(src, dst), (src[local], dst[local])]:
        direct = topo.path_latency_s(topo.routes(s, d))
        assert np.array_equal(topo.pair_latency_s(s, d), direct)


def test_numpy_fallback_gives_the_compiled_arrival_times(monkeypatch):
    """Without numba every network step runs its numpy version: same arrival times."""
    from moesim.network import fluid
    from moesim.network.aggregate import collective_times_s

    if fluid.compiled_kernel() is None:
        pytest.skip("numba not installed")
    topo = _topology(nodes=4, per_node=4, inter_node="rail_optimized")
    src, dst = _all_pairs(16)
    nbytes = np.random.default_rng(5).uniform(1 * MB, 8 * MB, len(src))
    nbytes[::7] = 0.0  # empty pairs too
    compiled = collective_times_s(topo, src, dst, nbytes, "node", tolerance=1e-3)
    monkeypatch.setattr(fluid, "_KERNELS", {"loaded": True})
    assert fluid.compiled_kernel() is None
    fallback = collective_times_s(topo, src, dst, nbytes, "node", tolerance=1e-3)
    np.testing.assert_allclose(fallback, compiled, rtol=1e-9)


@pytest.mark.parametrize(
    "kw",
    [
        {"inter_node": "rail_optimized"},
        {"inter_node": "rail_optimized", "nics_per_node": 2},
        {"inter_node": "fat_tree", "nodes_per_leaf": 2, "nics_per_node": 4},
    ],
)
def test_links_left_out_of_the_solve_are_dominated_on_every_route(kw):
    """A link the rate solver leaves out is crossed by no route without its dominator, and
    has at least its bandwidth (so it can never set a fair rate)."""
    topo = _topology(nodes=4, per_node=8, **kw)
    dom = topo.dominated_by()
    assert (dom >= 0).any()
    n = topo.n_devices
    every = np.arange(n * n)
    paths = topo.routes(every // n, every % n)
    bw = topo.bandwidth_bytes_per_s
    for link in np.flatnonzero(dom >= 0):
        on = (paths == link).any(axis=1)
        assert on.any() and (paths[on] == dom[link]).any(axis=1).all()
        assert bw[link] >= bw[dom[link]]
    assert not (dom[dom[dom >= 0]] >= 0).any()  # dominators are solved themselves


def test_leaving_dominated_links_out_changes_no_time_or_link_statistic(monkeypatch):
    from moesim import simulate
    from moesim.network.topology import Topology

    sc = scenario_from_dict(
        {
            "model": {"preset": "mixtral-8x7b", "n_layers": 2},
            "cluster": {"nodes": 2, "devices_per_node": 8, "device": "h100-sxm"},
            "topology": {"inter_node": "rail_optimized"},
            "parallelism": {"ep": 8},
            "workload": {"phase": "prefill", "batch_size": 16, "seq_len": 256},
            "routing": {"distribution": "zipf", "zipf_s": 1.2},
            "sim": {"progress": False},
        }
    )
    pruned = simulate(sc)
    monkeypatch.setattr(Topology, "dominated_by", lambda self: np.full(self.n_links, -1))
    full = simulate(sc)
    assert pruned.step_time_s == full.step_time_s
    pd_cols = ["bytes_carried", "busy_s", "utilization"]
    np.testing.assert_array_equal(pruned.links[pd_cols].to_numpy(), full.links[pd_cols].to_numpy())


def test_link_loads_compiled_and_numpy_agree(monkeypatch):
    from moesim.network import fluid

    rng = np.random.default_rng(9)
    paths = np.full((200, 4), -1, dtype=np.int64)
    for p in range(200):
        k = rng.integers(0, 5)
        paths[p, :k] = rng.choice(30, size=k, replace=False)
    nbytes = rng.uniform(0, 1e6, 200)
    expected = np.zeros(30)
    for p in range(200):
        for link in paths[p][paths[p] >= 0]:
            expected[link] += nbytes[p]
    np.testing.assert_allclose(fluid.link_loads(paths, nbytes, 30), expected)
    monkeypatch.setattr(fluid, "_KERNELS", {"loaded": True})
    np.testing.assert_allclose(fluid.link_loads(paths, nbytes, 30), expected)


def test_zero_byte_pairs_carry_no_max_min_weight_and_still_arrive():
    """A merged flow's weight counts only the pairs that carry bytes; a receiver whose pairs
    are all empty still gets its event, one path latency after the sends."""
    from moesim.network.aggregate import collective_times_s, flow_pattern

    topo = _topology(nodes=4, per_node=4, inter_node="rail_optimized")
    src, dst = _all_pairs(16)
    nbytes = np.where(np.arange(len(src)) % 3 == 0, 0.0, 4 * MB)
    nbytes[dst == 5] = 0.0  # device 5 receives nothing
    pat = flow_pattern(topo, src, dst, "node")
    weight = pat.contribution_weights(nbytes)
    # every inter-node pair has one tail (a slot on the network): their weights count the
    # pairs that carry bytes
    network = np.array([k == "network" for k in topo.link_kinds] + [False])
    tail_slot = network[pat.paths].any(axis=1)
    tails = tail_slot[pat.contrib_slot]
    assert weight[tails].sum() == np.count_nonzero(nbytes[src // 4 != dst // 4])
    assert np.all(weight[pat.contribution_bytes(nbytes) == 0] == 0)
    done = collective_times_s(topo, src, dst, nbytes, "node", tolerance=1e-9)
    assert 0 < done[5] < 1e-4 < done.max()  # latency only, while the others move megabytes


def _random_instances(seed: int, n: int):
    """Random max-min instances: paths (-1 padded, valid hops first), capacities (rounded
    every other time, so links tie), weights, tolerance."""
    rng = np.random.default_rng(seed)
    for trial in range(n):
        n_flows, n_links, hops = rng.integers(1, 60), rng.integers(4, 25), rng.integers(1, 5)
        paths = np.full((n_flows, hops), -1, dtype=np.int64)
        for f in range(n_flows):
            k = rng.integers(1, hops + 1)
            paths[f, :k] = rng.choice(n_links, size=k, replace=False)
        cap = rng.uniform(1.0, 10.0, n_links)
        if trial % 2:
            cap = np.round(cap)
        weight = rng.integers(1, 8, n_flows).astype(float)
        yield paths, cap, weight, [1e-12, 1e-3, 1e-2, 0.0][trial % 4]


def test_small_max_min_is_bit_identical_to_the_numpy_reference():
    """The plain-Python solve of small networks does the numpy reference's floating-point
    operations in its order: the same rates, bit for bit (ties and tolerances included)."""
    from moesim.network.fluid import maxmin_rates_by_component, maxmin_rates_small

    for paths, cap, weight, tol in _random_instances(3, 120):
        rows = [[int(x) for x in row if x >= 0] for row in paths]
        small = maxmin_rates_small(rows, cap.tolist(), weight.tolist(), tol)
        expected = maxmin_rates_by_component(paths, cap, weight, tol)
        assert np.array_equal(np.array(small), expected)


def _components_networkx(paths, alive):
    """The flows of each connected component (flows that share a link connect), by
    networkx over a flow-link bipartite graph: independent of the solver's labelling."""
    g = nx.Graph()
    for f in np.flatnonzero(alive):
        g.add_node(("f", int(f)))
        for link in paths[f][paths[f] >= 0]:
            g.add_edge(("f", int(f)), ("l", int(link)))
    return [sorted(k for kind, k in c if kind == "f") for c in nx.connected_components(g)]


def _by_component_loops(paths, capacity, weight, tolerance, alive):
    """:func:`_maxmin_loops` on each component alone."""
    rate = np.zeros(len(paths))
    for flows in _components_networkx(paths, np.asarray(alive)):
        only = np.zeros(len(paths), dtype=bool)
        only[flows] = True
        rate[only] = _maxmin_loops(paths, capacity, weight, tolerance, only)[only]
    return rate


def _maxmin_loops(paths, capacity, weight, tolerance, alive):
    """Progressive filling over the ``alive`` flows as plain loops, one pass per step:
    the reference of each component's filling in the compiled kernel."""
    n_links = len(capacity)
    cap, load = capacity.astype(float).copy(), np.zeros(n_links)
    live_flows = [f for f in range(len(paths)) if alive[f]]
    by_link = [[] for _ in range(n_links)]
    for f in live_flows:
        for link in paths[f]:
            if link < 0:
                break
            load[link] += weight[f]
            by_link[link].append(f)
    eps = 1e-9 * min(weight[f] for f in live_flows)
    live = [link for link in range(n_links) if load[link] > eps]
    rate, frozen, level = np.zeros(len(paths)), ~np.asarray(alive), 0.0
    while live:
        share = [cap[link] / load[link] for link in live]
        step = min(share)
        level += step
        threshold = step + tolerance * level
        sat = []
        for link, s in zip(live, share, strict=True):
            cap[link] -= step * load[link]
            if s <= threshold:
                sat.append(link)
        for link in sat:
            for f in by_link[link]:
                if not frozen[f]:
                    frozen[f] = True
                    rate[f] = level * weight[f]
                    for other in paths[f]:
                        if other < 0:
                            break
                        load[other] -= weight[f]
        for link in sat:
            load[link] = 0.0
        live = [link for link in live if load[link] > eps]
    return rate


def _components_kernel(kernels, paths, cap, weight, tol, alive):
    """Every component solved by the compiled kernel (all links marked changed)."""
    ptr, flows = kernels["csr"](paths, len(cap), np.ones(len(paths), dtype=np.bool_))
    rate = np.zeros(len(paths))
    dirty = np.ones(len(cap), dtype=np.bool_)
    kernels["components"](paths, cap, weight, tol, alive, ptr, flows, dirty, rate)
    return rate


def test_compiled_max_min_is_bit_identical_to_its_loop_reference():
    """The compiled kernel gives the rates of the step-by-step loops run on each connected
    component alone (components found by networkx), bit for bit."""
    from moesim.network.fluid import _compiled

    kernels = _compiled()
    if "components" not in kernels:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(5)
    for paths, cap, weight, tol in _random_instances(9, 100):
        alive = rng.random(len(paths)) < 0.7
        alive[0] = True
        rate = _components_kernel(kernels, paths, cap, weight, tol, alive)
        assert np.array_equal(rate, _by_component_loops(paths, cap, weight, tol, alive))


def test_small_network_solver_changes_no_result(monkeypatch):
    """A step with contention and skewed routing (Zipf, 2 nodes sharing NICs) times the
    same, bit for bit, whether small solves run in plain Python or in numpy."""
    from moesim.network import fluid
    from moesim.studies.simulate import simulate
    from tests.conftest import small_scenario

    sc = small_scenario(
        **{
            "cluster.nodes": 2,
            "cluster.devices_per_node": 4,
            "topology.nics_per_node": 1,
            "routing.distribution": "zipf",
            "workload.batch_size": 128,
        }
    )
    fast = simulate(sc)
    monkeypatch.setattr(fluid, "SMALL_MAX_HOPS", -1)
    ref = simulate(sc)
    assert fast.summary["sim"]["network_solves"] > 20  # the solver did run, many times
    assert fast.step_time_s == ref.step_time_s
    assert fast.summary["breakdown_s"] == ref.summary["breakdown_s"]
    assert fast.devices.equals(ref.devices) and fast.links.equals(ref.links)


def _staggered_arrivals(drop_admit: bool, stagger_s: float) -> np.ndarray:
    """Arrival times of a node-aggregated all-to-all over 16 devices whose senders start
    ``stagger_s`` apart (so merged slots have several senders and different first times)."""
    import simpy

    from moesim.network.aggregate import flow_pattern
    from moesim.network.fluid import FluidNetwork

    topo = _topology(nodes=4, per_node=4, inter_node="rail_optimized")
    src, dst = _all_pairs(16)
    nbytes = np.random.default_rng(9).uniform(1 * MB, 8 * MB, len(src))
    nbytes[::5] = 0.0
    env = simpy.Environment()
    net = FluidNetwork(env, topo, 1e-2, record_intervals=False)
    assert net.kernels == "compiled"
    if drop_admit:  # admissions in numpy, the rest compiled
        net._kernels = {k: v for k, v in net._kernels.items() if k != "admit"}
    pat = flow_pattern(topo, src, dst, "node")
    n = topo.n_devices
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

    def sender(g):
        yield env.timeout(g * stagger_s)
        lo, hi = pat.contrib_offsets[g], pat.contrib_offsets[g + 1]
        net.contribute(block, pat.contrib_slot[lo:hi], nb[lo:hi], weight[lo:hi])

    for g in range(n):
        env.process(sender(g))
    env.run()
    assert not net._blocks  # every slot delivered, the block dropped
    return done


@pytest.mark.parametrize("stagger_s", [0.0, 3e-7, 2e-5])
def test_compiled_merge_of_senders_gives_the_numpy_arrival_times(stagger_s):
    """Contributions of several senders admitted together are summed per slot and turned
    into flows by a compiled kernel (``admit_block``); the numpy bincounts over the block's
    slots give the same arrival times, bit for bit (simultaneous, nearly simultaneous and
    spread senders)."""
    from moesim.network import fluid

    if "admit" not in fluid._compiled():
        pytest.skip("numba not installed")
    compiled = _staggered_arrivals(False, stagger_s)
    assert np.all(compiled > 0)
    assert np.array_equal(compiled, _staggered_arrivals(True, stagger_s))


def test_merge_contributions_kernel_matches_bincount():
    """The compiled merge: slots ascending, bytes and weights summed in entry order (as
    np.bincount sums them), the first sending time, contributors counted off, and its
    scratch left zero (first: inf) for the next call."""
    from moesim.network import fluid

    kernels = fluid._compiled()
    if "merge" not in kernels:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(13)
    n_slots = 50
    scratch = np.zeros((n_slots, 4))
    scratch[:, 3] = np.inf
    mark = np.zeros(n_slots, np.uint8)
    for _ in range(30):
        m = int(rng.integers(1, 120))
        every = rng.integers(0, n_slots, m).astype(np.int64)
        nbytes, weight = rng.uniform(0, 1e6, m), rng.integers(0, 4, m).astype(float)
        cuts = np.unique(np.concatenate([[0, m], rng.integers(0, m, 4)]))  # senders' ranges
        sent = rng.uniform(0, 1e-3, len(cuts) - 1)
        times = np.repeat(sent, np.diff(cuts))
        left = np.full(n_slots, 200, np.int64)
        slots, b, w, first = kernels["merge"](
            every, nbytes, weight, cuts[:-1], cuts[1:], sent, left, scratch, mark
        )
        count = np.bincount(every, minlength=n_slots)
        want = np.flatnonzero(count)
        assert np.array_equal(slots, want)
        assert np.array_equal(b, np.bincount(every, nbytes, n_slots)[want])
        assert np.array_equal(w, np.bincount(every, weight, n_slots)[want])
        lo = np.full(n_slots, np.inf)
        np.minimum.at(lo, every, times)
        assert np.array_equal(first, lo[want])
        assert np.array_equal(left, 200 - count)
        assert not scratch[:, :3].any() and not mark.any()
        assert np.all(scratch[:, 3] == np.inf)


def test_compiled_max_min_matches_the_loops_on_ties_and_fractional_weights():
    """On instances built to tie (equal capacities, equal and fractional weights, zero
    tolerance and a large one) the kernel still gives the per-component loops' rates bit
    for bit."""
    from moesim.network.fluid import _compiled

    kernels = _compiled()
    if "components" not in kernels:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(21)
    for trial in range(300):
        n_flows, n_links = int(rng.integers(2, 80)), int(rng.integers(2, 30))
        paths = np.full((n_flows, 4), -1, dtype=np.int64)
        for f in range(n_flows):
            k = rng.integers(1, min(4, n_links) + 1)
            paths[f, :k] = rng.choice(n_links, size=k, replace=False)
        cap = np.full(n_links, 3.0) if trial % 3 == 0 else rng.uniform(0.1, 10.0, n_links)
        if trial % 2:
            weight = rng.uniform(0.3, 3.0, n_flows)  # fractional: loads round as they drop
        else:
            weight = np.ones(n_flows) if trial % 4 == 0 else rng.integers(1, 5, n_flows) * 1.0
        tol = [0.0, 1e-9, 1e-2, 0.5][trial % 4]
        alive = rng.random(n_flows) < 0.8
        alive[0] = True
        rate = _components_kernel(kernels, paths, cap, weight, tol, alive)
        assert np.array_equal(rate, _by_component_loops(paths, cap, weight, tol, alive))


def test_link_components_are_networkx_connected_components():
    from moesim.network.fluid import link_components

    for paths, cap, _weight, _tol in _random_instances(13, 60):
        label = link_components(paths, len(cap))
        for flows in _components_networkx(paths, np.ones(len(paths), dtype=bool)):
            links = np.unique(paths[flows][paths[flows] >= 0])
            assert np.all(label[links] == links.min())  # one label: the smallest link id
        used = np.unique(paths[paths >= 0])
        unused = np.setdiff1d(np.arange(len(cap)), used)
        assert np.array_equal(label[unused], unused)
        every = np.ones(len(paths), dtype=bool)
        assert len(np.unique(label[used])) == len(_components_networkx(paths, every))


def test_vectorised_components_each_fill_as_if_alone():
    """All components filled in the same vectorised rounds give, bit for bit, what the
    one-component numpy filling gives on each component's flows alone."""
    from moesim.network.fluid import maxmin_rates_by_component, maxmin_rates_numpy

    for paths, cap, weight, tol in _random_instances(17, 80):
        rate = maxmin_rates_by_component(paths, cap, weight, tol)
        for flows in _components_networkx(paths, np.ones(len(paths), dtype=bool)):
            alone = maxmin_rates_numpy(paths[flows], cap, weight[flows], tol)
            assert np.array_equal(rate[flows], alone)


def test_exact_max_min_is_the_same_by_component_or_over_every_flow():
    """At zero tolerance the per-component rates are the textbook max-min rates of one
    filling over every flow (components share no link)."""
    from moesim.network.fluid import maxmin_rates_by_component, maxmin_rates_numpy

    for paths, cap, weight, _tol in _random_instances(19, 80):
        np.testing.assert_allclose(
            maxmin_rates_by_component(paths, cap, weight, 0.0),
            maxmin_rates_numpy(paths, cap, weight, 0.0),
            rtol=1e-12,
        )


def test_a_component_rates_ignore_flows_it_shares_no_link_with():
    """Two links, one flow each, 1% apart in fair share: at a 2% tolerance one filling over
    both would saturate them together; by component each flow gets its link's capacity."""
    paths = np.array([[0], [1]])
    cap = np.array([1.0, 1.01])
    np.testing.assert_array_equal(maxmin_rates(paths, cap, tolerance=0.02), cap)


def test_re_solving_only_changed_components_equals_solving_all():
    """The kernel re-solves only the components with a link marked changed; through random
    arrivals, retirements and weight changes (each marking its flow's links) the rates stay
    bit for bit those of solving every component afresh."""
    from moesim.network.fluid import _compiled

    kernels = _compiled()
    if "components" not in kernels:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(23)
    n_flows, n_links = 120, 60
    paths = np.full((n_flows, 3), -1, dtype=np.int64)
    for f in range(n_flows):  # short paths on many links: many small components
        k = rng.integers(1, 3)
        paths[f, :k] = rng.choice(n_links, size=k, replace=False)
    cap = rng.uniform(1.0, 10.0, n_links)
    weight = rng.integers(1, 6, n_flows).astype(float)
    alive = rng.random(n_flows) < 0.3
    alive[0] = True
    ptr, flows = kernels["csr"](paths, n_links, np.ones(n_flows, dtype=np.bool_))
    rate = np.zeros(n_flows)
    dirty = np.ones(n_links, dtype=np.bool_)
    for step in range(200):
        kernels["components"](paths, cap, weight, 1e-2, alive, ptr, flows, dirty, rate)
        fresh = _components_kernel(kernels, paths, cap, weight, 1e-2, alive)
        assert np.array_equal(rate, fresh), step
        f = int(rng.integers(n_flows))
        what = step % 3
        if what == 0 or not alive[f]:  # a flow arrives (or leaves)
            alive[f] = not alive[f]
            if not alive[f]:
                rate[f] = 0.0
        else:  # more pairs merge into a live flow
            weight[f] += 1.0
        alive[0] = True
        dirty[paths[f][paths[f] >= 0]] = True


def test_compiled_contribution_sums_equal_the_bincounts(monkeypatch):
    """On a pattern large enough for the compiled pass, contribution bytes, weights and slot
    bytes are the numpy bincounts' bit for bit (zero-byte pairs included)."""
    from moesim.network import aggregate, fluid
    from moesim.network.aggregate import flow_pattern

    if "sums" not in fluid._compiled():
        pytest.skip("numba not installed")
    topo = _topology(nodes=32, per_node=8, inter_node="rail_optimized")
    src, dst = _all_pairs(256)
    nbytes = np.random.default_rng(3).uniform(0, 4 * MB, len(src))
    nbytes[::3] = 0.0
    pat = flow_pattern(topo, src, dst, "node")
    assert len(pat.entry_pair) >= aggregate.COMPILED_MIN_ENTRIES
    compiled = pat.contribution_sums(nbytes)
    monkeypatch.setattr(aggregate, "COMPILED_MIN_ENTRIES", 1 << 62)
    reference = pat.contribution_sums(nbytes)
    for got, want in zip(compiled, reference, strict=True):
        assert np.array_equal(got, want)
    assert np.array_equal(
        pat.link_bytes(nbytes, topo.n_links), pat.link_bytes(nbytes, topo.n_links, compiled[2])
    )


def test_compiled_split_of_contributions_equals_the_masks(monkeypatch):
    """Splitting a collective's contributions into those with bytes and the others: the
    compiled pass gives the numpy masks' arrays (values, dtypes, per-sender offsets); each
    sender's two ranges hold its contributions, in order."""
    from moesim.network import aggregate, fluid
    from moesim.network.aggregate import flow_pattern

    if "split" not in fluid._compiled():
        pytest.skip("numba not installed")
    topo = _topology(nodes=32, per_node=8, inter_node="rail_optimized")
    src, dst = _all_pairs(256)
    nbytes = np.random.default_rng(4).uniform(0, 4 * MB, len(src))
    nbytes[np.random.default_rng(5).random(len(src)) < 0.7] = 0.0
    pat = flow_pattern(topo, src, dst, "node")
    per_contrib, weight, _ = pat.contribution_sums(nbytes)
    assert 0 < np.count_nonzero(per_contrib) < len(per_contrib)
    compiled = pat.split_contributions(per_contrib, weight)
    monkeypatch.setattr(aggregate, "COMPILED_MIN_ENTRIES", 1 << 62)
    reference = pat.split_contributions(per_contrib, weight)
    for got, want in zip(compiled, reference, strict=True):
        assert np.array_equal(got, want) and got.dtype == want.dtype
    slot, carried, _, full_at, empty_slot, empty_at = compiled
    off = pat.contrib_offsets
    for g in (0, 17, 255):
        mine = pat.contrib_slot[off[g] : off[g + 1]]
        sent = per_contrib[off[g] : off[g + 1]]
        has = sent > 0
        assert np.array_equal(slot[full_at[g] : full_at[g + 1]], mine[has])
        assert np.array_equal(carried[full_at[g] : full_at[g + 1]], sent[has])
        assert np.array_equal(empty_slot[empty_at[g] : empty_at[g + 1]], mine[~has])


@pytest.mark.parametrize("compiled", [True, False])
def test_a_late_zero_byte_sender_holds_its_receiver_one_latency(compiled):
    """Two senders into one slot of one link (1 GB/s, 1 us latency): A sends 1 MB at 0, B a
    zero-byte contribution at ``t``. The receiver completes at the later of A's last byte
    (1 ms + 1 us) and B's sending time plus the latency, from counting B off alone."""
    from moesim.network.fluid import FluidNetwork

    topo = _topology(nodes=2, per_node=8, inter_node="rail_optimized")
    for t_b, want in [(0.5e-3, 1e-3 + 1e-6), (3e-3, 3e-3 + 1e-6)]:
        env = simpy.Environment()
        net = FluidNetwork(env, topo, 1e-9, record_intervals=False)
        if not compiled:
            net._kernels = {}
        net.capacity = np.full(topo.n_links, 1e9)
        gid, done = net.group(1)
        block = net.add_block(
            np.array([[0]]), np.array([1e-6]), np.array([0, 1]), np.array([gid]), np.array([2])
        )
        net.contribute(block, np.array([0]), np.array([1e6]), np.array([1.0]))

        def late(env, net=net, block=block, t_b=t_b):
            yield env.timeout(t_b)
            net.contribute_empty(block, np.array([0]))

        at: list[float] = []
        done.callbacks.append(lambda _e, env=env, at=at: at.append(env.now))
        env.process(late(env))
        env.run()
        assert at == [pytest.approx(want, rel=1e-9)]
