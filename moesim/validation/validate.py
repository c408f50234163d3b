"""Cross-validation of the simulator against the numpy reference layer.

Functional: the first MoE layer of a scenario (routing ``router``) is run for real in numpy on
the same router inputs, token by token, split over the scenario's devices; its per-expert token
counts, drops and (source, destination) dispatch bytes must equal the simulator's plan exactly,
and its output must equal a dense per-token loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.config.loading import read_mapping
from moesim.config.scenario import Scenario, ScenarioError
from moesim.plan.dispatch import dispatch_mode
from moesim.plan.layout import layout
from moesim.plan.workload import WorkloadPlan, build_plan, layer_generators
from moesim.routing.distributions import router_weights, synthetic_router_inputs
from moesim.routing.placement import base_placement
from moesim.validation.reference import make_layer


@dataclass
class FunctionalCheck:
    """What the reference measured and what the simulator planned, side by side."""

    expert_tokens_ref: np.ndarray  # [group, expert]
    expert_tokens_sim: np.ndarray
    dropped_ref: int
    dropped_sim: int
    dispatch_bytes_ref: np.ndarray  # [source device, destination device]
    dispatch_bytes_sim: np.ndarray
    output_max_abs_error: float
    output_scale: float
    forward_bytes_ref: np.ndarray | None = None  # per_node: the intra-node stage
    forward_bytes_sim: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        return (
            np.array_equal(self.expert_tokens_ref, self.expert_tokens_sim)
            and self.dropped_ref == self.dropped_sim
            and np.array_equal(self.dispatch_bytes_ref, self.dispatch_bytes_sim)
            and (
                self.forward_bytes_ref is None
                or np.array_equal(self.forward_bytes_ref, self.forward_bytes_sim)
            )
        )


def _dense_traffic(traffic, n: int) -> np.ndarray:
    mat = np.zeros((n, n))
    np.add.at(mat, (traffic.src, traffic.dst), traffic.nbytes)
    return mat


def reference_dispatch(
    token: np.ndarray,
    source: np.ndarray,
    dest: np.ndarray,
    mode: str,
    devices_per_node: int,
    n_devices: int,
    row_bytes: float,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Bytes per (source, destination) of the reference layer's pairs (token ``token[p]``
    of device ``source[p]`` to device ``dest[p]``) as ``mode`` sends them: every pair;
    every distinct (token, device); or once per distinct (token, node) to the source's rail
    peer there, then once per distinct (token, device) from that peer (or the source, on its
    own node). Bytes a device keeps are left out."""
    stage1 = np.zeros((n_devices, n_devices))
    stage2 = None
    if mode == "pairs":
        np.add.at(stage1, (source, dest), row_bytes)
    else:
        _, first = np.unique(token * n_devices + dest, return_index=True)
        t, s, d = token[first], source[first], dest[first]
        if mode == "per_rank":
            np.add.at(stage1, (s, d), row_bytes)
        else:
            node = d // devices_per_node
            via = node * devices_per_node + s % devices_per_node
            via = np.where(node == s // devices_per_node, s, via)
            _, hop = np.unique(t * n_devices + via, return_index=True)
            np.add.at(stage1, (s[hop], via[hop]), row_bytes)
            stage2 = np.zeros((n_devices, n_devices))
            np.add.at(stage2, (via, d), row_bytes)
            np.fill_diagonal(stage2, 0.0)
    np.fill_diagonal(stage1, 0.0)
    return stage1, stage2


def functional_check(sc: Scenario, plan: WorkloadPlan | None = None) -> FunctionalCheck:
    """Run the scenario's first MoE layer in numpy and compare with the plan (see module doc)."""
    r, m, par = sc.routing, sc.model, sc.parallelism
    if r.distribution != "router" or r.replicate_hot or r.global_routing or r.gating == "hash":
        raise ScenarioError(
            "routing",
            "functional validation needs distribution: router, no "
            "replicas, no global routing and top-k or expert-choice gating",
        )
    plan = plan or build_plan(sc)
    layer = next(lp.index for lp in plan.layers if lp.moe)
    n_dev, ep, etp, edp = plan.n_devices, par.ep, par.etp, n_dev_groups(sc)
    # the simulator's own layout and random streams for this layer
    seeds = np.random.SeedSequence(sc.sim.seed).spawn(m.n_layers)
    _, route_rng = layer_generators(seeds[layer])
    rank_of = base_placement(
        m.n_experts, ep, par.expert_placement, np.full(m.n_experts, 1 / m.n_experts)
    )
    weights = router_weights(m.d_model, m.n_experts, route_rng)
    d_ff_small = 32  # the expert width does not change routing or dispatch bytes
    ref = make_layer(m.d_model, d_ff_small, m.n_experts, m.top_k, seed=sc.sim.seed, router=weights)
    tokens_dev = _tokens_per_device(plan)
    group = np.arange(n_dev) // (ep * etp)
    act_bytes = plan.scenario.workload.dtypes.bytes_of("activations")
    expert_ref = np.zeros((edp, m.n_experts), dtype=np.int64)
    pairs_token, pairs_source, pairs_dest = [], [], []
    tokens_seen = 0
    dropped = 0
    rest_rng = np.random.default_rng(sc.sim.seed + 1)
    err, scale = 0.0, 0.0
    for g in range(edp):
        rows = np.flatnonzero(group == g)
        t = int(tokens_dev[rows].sum())
        if t == 0:
            continue
        x_router = synthetic_router_inputs(weights, t, route_rng)
        x = np.concatenate(
            [
                x_router,
                rest_rng.standard_normal((t, m.d_model - x_router.shape[1]), dtype=np.float32),
            ],
            axis=1,
        )
        policy = "expert_choice" if r.gating == "expert_choice" else "topk"
        routing = ref.route(
            x, policy=policy, capacity_factor=r.capacity_factor, drop_priority=r.drop_priority
        )
        y = ref.forward(x, routing=routing)
        y_loop = ref.forward_dense_loop(x, routing)
        err = max(err, float(np.abs(y - y_loop).max()))
        scale = max(scale, float(np.abs(y_loop).max()))
        expert_ref[g] = routing.tokens_per_expert(m.n_experts)
        dropped += int(routing.dropped_per_expert.sum())
        source = np.repeat(rows, tokens_dev[rows])[routing.token]
        for shard in range(etp):
            pairs_token.append(tokens_seen + routing.token)
            pairs_source.append(source)
            pairs_dest.append(g * ep * etp + rank_of[routing.expert] * etp + shard)
        tokens_seen += t
    mode = _plan_mode(plan)
    traffic, forward = reference_dispatch(
        np.concatenate(pairs_token), np.concatenate(pairs_source), np.concatenate(pairs_dest),
        mode, sc.cluster.devices_per_node, n_dev, m.d_model * act_bytes,
    )  # fmt: skip
    lp = plan.layers[layer]
    return FunctionalCheck(
        expert_ref,
        lp.expert_load,
        dropped,
        lp.dropped_pairs,
        traffic,
        _dense_traffic(lp.dispatch, n_dev),
        err,
        scale,
        forward,
        None if lp.dispatch_forward is None else _dense_traffic(lp.dispatch_forward, n_dev),
    )


def _plan_mode(plan: WorkloadPlan) -> str:
    """The dispatch mode the plan used (``per_node`` falls back inside one node)."""
    lp = next(lp for lp in plan.layers if lp.moe)
    if lp.dispatch_forward is not None:
        return "per_node"
    mode = dispatch_mode(plan.scenario)
    return "per_rank" if mode == "per_node" else mode


def n_dev_groups(sc: Scenario) -> int:
    return sc.cluster.n_devices // (sc.parallelism.ep * sc.parallelism.etp)


def _tokens_per_device(plan: WorkloadPlan) -> np.ndarray:
    """MoE-block tokens each device owns (the plan's layout)."""
    return layout(plan.scenario).tokens_dev


# -- timing cross-validation -------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One held-out MoE layer shape for timing validation."""

    tokens: int
    d_model: int
    d_ff: int
    n_experts: int
    top_k: int
    zipf_s: float
    capacity_factor: float | None

    @property
    def name(self) -> str:
        cf = "none" if self.capacity_factor is None else f"{self.capacity_factor:g}"
        return (
            f"T{self.tokens}-d{self.d_model}-f{self.d_ff}-E{self.n_experts}-k{self.top_k}"
            f"-s{self.zipf_s:g}-cf{cf}"
        )


def timing_cases(n: int, seed: int = 1) -> list[Case]:
    """``n`` shapes sampled from a grid disjoint from the calibration GEMMs' shapes."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    seen = set()
    while len(cases) < n:
        c = Case(
            tokens=int(rng.choice([192, 384, 768, 1536, 3072])),
            d_model=int(rng.choice([192, 384, 768])),
            d_ff=int(rng.choice([384, 768, 1536])),
            n_experts=int(rng.choice([4, 8, 16])),
            top_k=int(rng.choice([1, 2])),
            zipf_s=float(rng.choice([0.0, 0.0, 0.8, 1.4])),
            capacity_factor=[None, None, 1.25, 1.0][int(rng.integers(4))],
        )
        if c not in seen:
            seen.add(c)
            cases.append(c)
    return cases


def _case_layer(case: Case, seed: int):
    from moesim.routing.distributions import expert_probabilities

    layer = make_layer(case.d_model, case.d_ff, case.n_experts, case.top_k, seed=seed)
    rng = np.random.default_rng(seed)
    probs = expert_probabilities(case.n_experts, "zipf", case.zipf_s, rng, shuffle=True)
    layer.router_bias = np.log(probs).astype(np.float32) * 2.0
    x = rng.standard_normal((case.tokens, case.d_model), dtype=np.float32)
    return layer, x


def measure_case(case: Case, seed: int = 0) -> tuple[float, np.ndarray]:
    """Median seconds of the reference layer's forward (router to combine), and its routing."""
    from moesim.validation.calibrate import median_time_s

    layer, x = _case_layer(case, seed)
    r = layer.route(x, capacity_factor=case.capacity_factor)
    seconds = median_time_s(
        lambda: layer.forward(x, capacity_factor=case.capacity_factor), repeats=5, min_sample_s=0.02
    )
    return seconds, r.chosen


def predict_case(case: Case, chosen: np.ndarray, device: dict, link: dict, workdir: Path) -> float:
    """The simulator's time for the same layer on the calibrated device, routed as the
    reference routed it (its top-k choices as a trace)."""
    from moesim.config.scenario import scenario_from_dict

    trace = workdir / f"{case.name}.npz"
    np.savez(trace, expert_ids=chosen[None])
    sc = scenario_from_dict(
        {
            "model": {
                "n_layers": 1,
                "d_model": case.d_model,
                "n_heads": 1,
                "n_kv_heads": 1,
                "head_dim": 8,
                "vocab_size": 8,
                "d_ff_expert": case.d_ff,
                "n_experts": case.n_experts,
                "top_k": case.top_k,
            },
            "cluster": {"nodes": 1, "devices_per_node": 1, "device": device},
            "topology": {"intra_node_link": link},
            "workload": {
                "phase": "prefill",
                "batch_size": 1,
                "seq_len": case.tokens,
                "dtypes": {
                    "weights": "fp32",
                    "activations": "fp32",
                    "kv_cache": "fp32",
                    "compute": "fp32",
                },
            },
            "routing": {
                "distribution": "trace",
                "trace": str(trace),
                "capacity_factor": case.capacity_factor,
            },
        }
    )
    lp = build_plan(sc).layers[0]
    return float(sum(lp.compute_s[k][0] for k in ("router", "permute", "experts", "unpermute")))


# -- communication cross-validation ------------------------------------------------------------
def _exchange_peer(
    name_out: str, name_in: str, n_out: int, n_in: int, d: int, barrier, rounds: int
) -> None:
    """The second rank: write its outgoing rows to shared memory, read the other rank's."""
    from multiprocessing import shared_memory

    out_shm = shared_memory.SharedMemory(name=name_out)
    in_shm = shared_memory.SharedMemory(name=name_in)
    out = np.ndarray((max(n_out, 1), d), dtype=np.float32, buffer=out_shm.buf)
    inbox = np.ndarray((max(n_in, 1), d), dtype=np.float32, buffer=in_shm.buf)
    rows = np.ones((n_out, d), dtype=np.float32)
    got = np.empty((n_in, d), dtype=np.float32)
    for _ in range(rounds):
        barrier.wait()
        out[:n_out] = rows
        barrier.wait()
        got[:] = inbox[:n_in]
        barrier.wait()
    del out, inbox
    out_shm.close()
    in_shm.close()


def measure_exchange(n01: int, n10: int, d: int, rounds: int = 7) -> float:
    """Median seconds of one dispatch between two OS processes through shared memory: each
    writes the rows bound for the other, a barrier, each copies its inbound rows out."""
    import multiprocessing as mp
    from multiprocessing import shared_memory

    ctx = mp.get_context("spawn")
    a = shared_memory.SharedMemory(create=True, size=max(n01, 1) * d * 4)
    b = shared_memory.SharedMemory(create=True, size=max(n10, 1) * d * 4)
    try:
        barrier = ctx.Barrier(2)
        peer = ctx.Process(
            target=_exchange_peer, args=(b.name, a.name, n10, n01, d, barrier, rounds + 1)
        )
        peer.start()
        out = np.ndarray((max(n01, 1), d), dtype=np.float32, buffer=a.buf)
        inbox = np.ndarray((max(n10, 1), d), dtype=np.float32, buffer=b.buf)
        rows = np.ones((n01, d), dtype=np.float32)
        got = np.empty((n10, d), dtype=np.float32)
        times = []
        for _ in range(rounds + 1):
            barrier.wait()
            t0 = time.perf_counter()
            out[:n01] = rows
            barrier.wait()
            got[:] = inbox[:n10]
            barrier.wait()
            times.append(time.perf_counter() - t0)
        peer.join()
        del out, inbox
    finally:
        for shm in (a, b):
            shm.close()
            shm.unlink()
    return float(np.median(times[1:]))


def predict_exchange(n01: int, n10: int, d: int, device: dict, link: dict) -> float:
    """The simulator's fluid network for the same two flows on the calibrated shm link."""
    import simpy

    from moesim.config.scenario import scenario_from_dict
    from moesim.network import FluidNetwork, build_topology

    sc = scenario_from_dict(
        {
            "model": {
                "n_layers": 1,
                "d_model": d,
                "n_heads": 1,
                "n_kv_heads": 1,
                "head_dim": 8,
                "vocab_size": 8,
                "d_ff_expert": 8,
                "n_experts": 2,
                "top_k": 1,
            },
            "cluster": {"nodes": 1, "devices_per_node": 2, "device": device},
            "topology": {"intra_node_link": link},
            "parallelism": {"ep": 2},
            "workload": {"phase": "prefill", "batch_size": 2, "seq_len": 1},
        }
    )
    env = simpy.Environment()
    net = FluidNetwork(
        env, build_topology(sc.cluster, sc.topology), tolerance=1e-6, record_intervals=False
    )
    src, dst, nbytes = [], [], []
    for s_, d_, n in ((0, 1, n01), (1, 0, n10)):
        if n:
            src.append(s_)
            dst.append(d_)
            nbytes.append(n * d * 4.0)
    gid, done = net.group(len(src))
    net.send(np.array(src), np.array(dst), np.array(nbytes), np.full(len(src), gid))
    env.run(until=done)
    return float(env.now)


def comm_cases(quick: bool) -> list[tuple[int, int, int]]:
    """(rows 0->1, rows 1->0, d_model) for a two-rank dispatch of a top-2 layer, 8 experts
    split 4 + 4: each rank sends about half its token-expert pairs to the other."""
    tokens = (1024, 8192) if quick else (512, 2048, 8192, 32768)
    dims = (512,) if quick else (256, 1024)
    rng = np.random.default_rng(7)
    cases = []
    for t in tokens:
        for d in dims:
            n01, n10 = rng.binomial(t, 0.5, size=2)  # each of t pairs crosses with p = 1/2
            cases.append((int(n01), int(n10), d))
    return cases


# -- the whole validation run --------------------------------------------------------------------
FUNCTIONAL_CASES = [
    ({"ep": 8}, 1, 8, {}),
    ({"ep": 4, "etp": 2}, 1, 8, {"capacity_factor": 1.0}),
    ({"ep": 4, "tp": 2}, 2, 4, {"capacity_factor": 0.9, "drop_priority": "choice"}),
    ({"ep": 8, "expert_placement": "round_robin"}, 2, 4, {"gating": "expert_choice"}),
]


def functional_scenario(
    par: dict, nodes: int, per_node: int, routing: dict, top_k: int = 2
) -> Scenario:
    """A small one-layer MoE (128 wide, 8 experts, top-2, 400 tokens) for functional checks."""
    from moesim.config.scenario import scenario_from_dict

    return scenario_from_dict(
        {
            "model": {
                "n_layers": 1,
                "d_model": 128,
                "n_heads": 4,
                "n_kv_heads": 4,
                "head_dim": 32,
                "d_ff_expert": 256,
                "n_experts": 8,
                "top_k": top_k,
            },
            "cluster": {"nodes": nodes, "devices_per_node": per_node, "device": "h100-sxm"},
            "parallelism": par,
            "workload": {"phase": "prefill", "batch_size": 4, "seq_len": 100},
            "routing": {"distribution": "router", **routing},
        }
    )


def functional_rows() -> list[dict]:
    """Exact functional checks on a few layouts and gating policies."""
    rows = []
    for par, nodes, per_node, routing in FUNCTIONAL_CASES:
        sc = functional_scenario(par, nodes, per_node, routing)
        c = functional_check(sc)
        name = "functional-" + "-".join(f"{k}{v}" for k, v in {**par, **routing}.items())
        rows.append(
            {
                "case": name,
                "kind": "functional",
                "exact": c.exact,
                "output_rel_error": c.output_max_abs_error / max(c.output_scale, 1e-30),
            }
        )
    return rows


NOISE_REPEATS = 15
"""Timings of the same reference GEMM that measure this host's noise before validating."""
NOISE_SHAPE = (256, 1024, 1024)
"""(m, k, n) of the float32 reference GEMM, about 0.5 GFLOP: long enough to time alone."""
NOISE_LIMIT = 0.10
"""Relative spread of those timings, ``(p90 - p10) / median``, above which the host is too
noisy for a timing error of the size validated (15% median) to mean anything."""


def measure_noise(repeats: int = NOISE_REPEATS, seed: int = 0) -> list[dict]:
    """Seconds of one float32 GEMM of ``NOISE_SHAPE``, timed ``repeats`` times (each the median
    of a few calls): rows ``kind: noise`` of validation.csv. Their spread is the host's noise."""
    from moesim.validation.calibrate import median_time_s

    rng = np.random.default_rng(seed)
    m, k, n = NOISE_SHAPE
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    return [
        {
            "case": f"noise-gemm-{m}x{k}x{n}-{i}",
            "kind": "noise",
            "measured_s": median_time_s(lambda: a @ b, repeats=3, min_sample_s=0.01),
        }
        for i in range(repeats)
    ]


def noise_spread(df) -> float:
    """``(p90 - p10) / median`` of the noise timings (NaN when there are none)."""
    t = df.loc[df["kind"] == "noise", "measured_s"].dropna()
    if t.empty:
        return float("nan")
    return float((t.quantile(0.9) - t.quantile(0.1)) / t.median())


def run_validation(
    out: Path, quick: bool = False, calibration: Path | None = None, progress: bool = True
):
    """Measure the host's timing noise, calibrate (or load a calibration), then run the
    functional, timing and communication checks; writes ``validation.csv`` (noise rows
    included) and ``validation.png`` into ``out``."""
    import pandas as pd
    from tqdm import tqdm

    from moesim.validation.calibrate import calibrate, write_calibration

    out.mkdir(parents=True, exist_ok=True)
    if calibration is not None:
        devices = read_mapping(calibration / "devices.yaml", "calibration")
        links = read_mapping(calibration / "links.yaml", "calibration")
    else:
        devices, links = calibrate(quick=quick)
        write_calibration(out / "calibration", devices, links)
    dev_name, dev = next(iter(devices.items()))
    dev = {k: v for k, v in dev.items() if k != "measured_gemms"}
    link_name, link = next(iter(links.items()))
    device, link_spec = {"name": dev_name, **dev}, {"name": link_name, **link}
    rows = [*measure_noise(), *functional_rows()]
    cases = timing_cases(8 if quick else 36)
    exchanges = comm_cases(quick)
    bar = tqdm(
        total=len(cases) + len(exchanges),
        disable=not progress,
        desc="validate",
        unit="case",
        leave=False,
    )
    workdir = out / "traces"
    workdir.mkdir(exist_ok=True)
    for c in cases:
        measured, chosen = measure_case(c)
        predicted = predict_case(c, chosen, device, link_spec, workdir)
        rows.append(
            {
                "case": c.name,
                "kind": "timing",
                "predicted_s": predicted,
                "measured_s": measured,
                **c.__dict__,
            }
        )
        bar.update()
    for n01, n10, d in exchanges:
        measured = measure_exchange(n01, n10, d)
        predicted = predict_exchange(n01, n10, d, device, link_spec)
        rows.append(
            {
                "case": f"dispatch-{n01}+{n10}x{d}",
                "kind": "comm",
                "predicted_s": predicted,
                "measured_s": measured,
                "rows_0to1": n01,
                "rows_1to0": n10,
                "d_model": d,
            }
        )
        bar.update()
    bar.close()
    df = pd.DataFrame(rows)
    df["rel_error"] = (df["predicted_s"] - df["measured_s"]) / df["measured_s"]
    first = ["case", "kind", "predicted_s", "measured_s", "rel_error"]
    df = df[first + [c for c in df.columns if c not in first]]
    df.to_csv(out / "validation.csv", index=False)
    from moesim.report import plot_validation

    fig = plot_validation(df)
    fig.savefig(out / "validation.png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return df


def error_stats(df, kind: str) -> tuple[float, float, int]:
    """Median and 90th-percentile absolute relative error of one kind of case."""
    err = df.loc[df["kind"] == kind, "rel_error"].abs().dropna()
    if err.empty:
        return float("nan"), float("nan"), 0
    return float(err.median()), float(err.quantile(0.9)), len(err)
