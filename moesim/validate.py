"""Cross-validation of the simulator against the numpy reference layer.

Functional: the first MoE layer of a scenario (routing ``router``) is run for real in numpy on
the same router inputs, token by token, split over the scenario's devices; its per-expert token
counts, drops and (source, destination) dispatch bytes must equal the simulator's plan exactly,
and its output must equal a dense per-token loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.placement import base_placement
from moesim.reference import make_layer
from moesim.routing import layer_probabilities, router_weights, synthetic_router_inputs
from moesim.scenario import Scenario, ScenarioError
from moesim.workload import WorkloadPlan, build_plan, layer_generators


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

    @property
    def exact(self) -> bool:
        return (
            np.array_equal(self.expert_tokens_ref, self.expert_tokens_sim)
            and self.dropped_ref == self.dropped_sim
            and np.array_equal(self.dispatch_bytes_ref, self.dispatch_bytes_sim)
        )


def _dense_traffic(plan: WorkloadPlan, layer: int) -> np.ndarray:
    lp = plan.layers[layer]
    n = plan.n_devices
    mat = np.zeros((n, n))
    np.add.at(mat, (lp.dispatch.src, lp.dispatch.dst), lp.dispatch.nbytes)
    return mat


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
    place_rng, route_rng = layer_generators(seeds[layer])
    probs = layer_probabilities(r, m.n_experts, 0, place_rng)
    rank_of = base_placement(
        m.n_experts, ep, par.expert_placement, np.full(m.n_experts, 1 / m.n_experts)
    )
    del probs
    weights = router_weights(m.d_model, m.n_experts, route_rng)
    d_ff_small = 32  # the expert width does not change routing or dispatch bytes
    ref = make_layer(m.d_model, d_ff_small, m.n_experts, m.top_k, seed=sc.sim.seed, router=weights)
    tokens_dev = _tokens_per_device(plan)
    group = np.arange(n_dev) // (ep * etp)
    act_bytes = plan.scenario.workload.dtypes.bytes_of("activations")
    expert_ref = np.zeros((edp, m.n_experts), dtype=np.int64)
    traffic = np.zeros((n_dev, n_dev))
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
            dest = g * ep * etp + rank_of[routing.expert] * etp + shard
            np.add.at(traffic, (source, dest), m.d_model * act_bytes)
    np.fill_diagonal(traffic, 0.0)  # bytes a device keeps do not cross the network
    lp = plan.layers[layer]
    return FunctionalCheck(
        expert_ref,
        lp.expert_load,
        dropped,
        lp.dropped_pairs,
        traffic,
        _dense_traffic(plan, layer),
        err,
        scale,
    )


def n_dev_groups(sc: Scenario) -> int:
    return sc.cluster.n_devices // (sc.parallelism.ep * sc.parallelism.etp)


def _tokens_per_device(plan: WorkloadPlan) -> np.ndarray:
    """MoE-block tokens each device owns (the same split the plan used)."""
    from moesim.workload import _split

    sc = plan.scenario
    tp = sc.parallelism.tp
    dp = plan.n_devices // tp
    wl = sc.workload
    per_seq = wl.seq_len if wl.phase == "prefill" else 1
    return _split(_split(wl.batch_size, dp) * per_seq, tp).ravel()
