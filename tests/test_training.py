"""Training steps (workload.phase: train) against hand-derived numbers.

The 2-GPU layout makes every quantity closed-form: 2 experts top-2 on ep 2 sends each token
to both experts, one of them remote, so every all-to-all moves exactly T x d x 2 bytes each
way over one switch path, and both devices do identical work."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moesim import ScenarioError, catalog, simulate
from moesim.plan.collectives import (
    ring_allreduce,
    ring_reduce_scatter,
    tree_allreduce,
    tree_allreduce_s,
)
from moesim.plan.workload import build_plan

from .conftest import small_scenario

SLOW_LINK_BPS = 20e9  # makes the all-to-all comparable to the experts
NVL, PCIE, IB = (catalog.link(k) for k in ("nvlink4", "pcie5-x16", "ib-ndr-400"))
LINK_BPS = SLOW_LINK_BPS * NVL.efficiency  # what transfers reach (catalog efficiency)
COLL_LAUNCH_S = catalog.device("h100-sxm").collective_launch_s
# one message over a switched NVLink hop: the hop's latency (split over its two edges) and the
# link's per-message overhead; every collective also pays its kernel's fixed cost once
# (moesim/network/topology.py)
NVLINK_LATENCY_S = NVL.latency_s + NVL.message_overhead_s
D_MODEL, HEADS, KV_HEADS, HEAD_DIM, D_FF, VOCAB = 4096, 32, 8, 128, 14336, 32000  # Mixtral


def two_gpus(fidelity: str = "des", **train):
    """2 layers of Mixtral dims, 2 experts top-2 on ep 2, one sequence of 512 per GPU."""
    return small_scenario(
        **{
            "cluster.devices_per_node": 2,
            "parallelism.ep": 2,
            "model.n_experts": 2,
            "model.top_k": 2,
            "topology.intra_node_link": {
                "preset": "nvlink4",
                "bandwidth_bytes_per_s": SLOW_LINK_BPS,
            },
            "workload.phase": "train",
            "workload.batch_size": 2 * train.get("micro_batches", 1),
            "workload.seq_len": 512,
            "workload.train": {"zero_stage": 0, **train},
            "sim.fidelity": fidelity,
        }
    )


def dense_params_by_hand(layers: int, n_experts: int) -> float:
    """Attention + router per layer, input embedding and LM head (tp 1)."""
    attn = D_MODEL * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * D_MODEL
    return layers * (attn + D_MODEL * n_experts) + 2 * VOCAB * D_MODEL


def compute_by_hand(plan, g: int = 0) -> float:
    """Every compute phase of device g from the plan, in the order nothing overlaps."""
    tr = plan.train
    fwd = sum(v[g] for lp in plan.layers for v in lp.compute_s.values())
    bwd = sum(v[g] for bl in tr.backward for v in bl.compute_s.values())
    redo = sum(bl.recompute_s[g] for bl in tr.backward)
    if tr.full_recompute:
        redo += fwd
    per_pass = fwd + bwd + redo + plan.lm_head_s[g] + tr.lm_head_bwd_s[g]
    return tr.micro_batches * per_pass + tr.optimizer_s[g]


def a2a_s(chunks: int = 1) -> float:
    """One all-to-all: 512 tokens x d x bf16 through the switch, in ``chunks`` pieces."""
    nbytes = 512 * D_MODEL * 2.0
    return chunks * (nbytes / chunks / LINK_BPS + NVLINK_LATENCY_S + COLL_LAUNCH_S)


def grad_allreduce_s() -> float:
    """Ring all-reduce of the fp32 dense gradients over 2 GPUs (experts: edp 1, none)."""
    nbytes, n = dense_params_by_hand(2, 2) * 4.0, 2
    return 2 * (n - 1) / n * nbytes / LINK_BPS + 2 * (n - 1) * NVLINK_LATENCY_S + COLL_LAUNCH_S


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_no_overlap_step_is_the_sum_of_its_parts(fidelity):
    sc = two_gpus(fidelity, micro_batches=2)
    plan = build_plan(sc)
    result = simulate(sc)
    moe_passes = 2 * 2 * 4  # micro-batches x MoE layers x (dispatch, combine, and backward)
    comm = moe_passes * a2a_s() + grad_allreduce_s()
    compute = compute_by_hand(plan)
    assert result.step_time_s == pytest.approx(compute + comm, rel=1e-6)
    assert result.summary["exposed_comm_s"] == pytest.approx(comm, rel=1e-6)
    assert result.summary["train"]["compute_s"] == pytest.approx(compute, rel=1e-6)
    assert sum(result.summary["breakdown_s"].values()) == pytest.approx(result.step_time_s)


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_chunked_overlap_between_max_and_sum(fidelity):
    chunks = 4
    serial = simulate(two_gpus(fidelity))
    sc = two_gpus(fidelity, overlap="chunked", chunks=chunks)
    plan = build_plan(sc)
    overlapped = simulate(sc)
    compute = compute_by_hand(plan)
    comm = 2 * 4 * a2a_s(chunks) + grad_allreduce_s()
    step = overlapped.step_time_s
    assert step >= max(compute, comm) * (1 - 1e-9)
    assert step < compute + comm
    assert step < serial.step_time_s
    # the same work: only the exposed communication shrinks
    assert overlapped.summary["train"]["compute_s"] == pytest.approx(compute, rel=1e-6)
    assert overlapped.summary["exposed_comm_s"] < comm


def test_full_recompute_adds_one_forward_per_micro_batch():
    base = two_gpus(micro_batches=2)
    full = two_gpus(micro_batches=2, recompute="full")
    plan = build_plan(base)
    forward = sum(v[0] for lp in plan.layers for v in lp.compute_s.values()) + 2 * 2 * a2a_s()
    extra = simulate(full).step_time_s - simulate(base).step_time_s
    assert extra == pytest.approx(2 * forward, rel=1e-6)


def test_backward_costs_twice_the_forward_flops():
    plan = build_plan(two_gpus())
    for lp, bl in zip(plan.layers, plan.train.backward, strict=True):
        # GEMMs: dgrad + wgrad; elementwise: ELEMENTWISE_BACKWARD_RATIO = 2
        assert bl.flops["experts_bwd"] == pytest.approx(2 * lp.flops["experts"])
        ratio = bl.flops["attention_bwd"] / lp.flops["attention"]
        assert np.all((ratio > 2.0) & (ratio < 2.5))  # attention core: 2.5x


def ring_closed_form_s(nbytes: float, n: int, bw: float, alpha: float) -> float:
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * alpha


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_ring_allreduce_across_nodes_matches_alpha_beta(fidelity):
    """8 GPUs on 2 rail-optimized nodes, a dense-equivalent model (1 expert, ep 1: no
    all-to-all, identical devices). The ring's two node crossings take the PXN path
    (switched NVLink hop, PCIe, IB up and down, PCIe): bandwidth 50 GB/s, latencies summed
    (a switched hop costs its link latency once)."""
    sc = small_scenario(
        **{
            "cluster.nodes": 2,
            "cluster.devices_per_node": 4,
            "parallelism.ep": 1,
            "model.n_experts": 1,
            "model.top_k": 1,
            "workload.phase": "train",
            "workload.batch_size": 8,
            "workload.seq_len": 256,
            "workload.train": {"zero_stage": 0, "grad_allreduce": "ring"},
            "sim.fidelity": fidelity,
        }
    )
    bw = min(k.effective_bandwidth_bytes_per_s for k in (NVL, PCIE, IB))
    alpha = sum(k.latency_s for k in (NVL, PCIE, IB))
    alpha += max(k.message_overhead_s for k in (NVL, PCIE, IB)) + COLL_LAUNCH_S
    dense = dense_params_by_hand(2, 1) * 4.0
    expert = 2 * 3 * D_MODEL * D_FF * 4.0  # replicated on all 8 (edp 8)
    expected = ring_closed_form_s(dense, 8, bw, alpha) + ring_closed_form_s(expert, 8, bw, alpha)
    got = simulate(sc).summary["breakdown_s"]["grad_reduce"]
    assert got == pytest.approx(expected, rel=0.01)


def test_tree_allreduce_on_a_switch():
    """Double binary tree over 8 GPUs: depth 3, the busiest port moves 2B."""
    sc = small_scenario(
        **{
            "parallelism.ep": 1,
            "model.n_experts": 1,
            "model.top_k": 1,
            "workload.phase": "train",
            "workload.batch_size": 8,
            "workload.seq_len": 256,
            "workload.train": {"zero_stage": 0, "grad_allreduce": "tree"},
            "sim.fidelity": "analytic",
        }
    )
    bw, alpha = NVL.effective_bandwidth_bytes_per_s, NVLINK_LATENCY_S
    total = dense_params_by_hand(2, 1) * 4.0 + 2 * 3 * D_MODEL * D_FF * 4.0
    expected = 2 * 2 * 3 * alpha + 2 * total / bw  # two all-reduces' latency, all the bytes
    got = simulate(sc).summary["breakdown_s"]["grad_reduce"]
    assert got == pytest.approx(expected, rel=0.01)
    des = simulate(sc.model_copy(update={"sim": sc.sim.model_copy(update={"fidelity": "des"})}))
    assert des.summary["breakdown_s"]["grad_reduce"] == pytest.approx(expected, rel=0.01)


def test_collective_bytes_by_hand():
    groups = np.arange(8).reshape(2, 4)
    ring = ring_allreduce(groups, 100.0)
    assert ring.total_bytes == pytest.approx(8 * 2 * 3 / 4 * 100.0)
    assert ring.latency_steps == 6
    rs = ring_reduce_scatter(groups, 100.0)
    assert rs.total_bytes == pytest.approx(8 * 3 / 4 * 100.0)
    tree = tree_allreduce(np.arange(8)[None, :], 100.0)
    # 7 edges per tree, 2 trees, half the buffer up and down each edge
    assert tree.total_bytes == pytest.approx(2 * 7 * 2 * 50.0)
    assert tree.latency_steps == 2 * math.floor(math.log2(8))
    assert tree_allreduce_s(100.0, 8, 1.0, 0.0) == pytest.approx(200.0)
    assert tree_allreduce_s(100.0, 4, 1.0, 0.0) == pytest.approx(150.0)


def test_mfu_of_a_dense_equivalent_model_by_hand():
    """One expert, top-1, ep 1: a dense SwiGLU transformer. Model FLOPs per token are
    6 N + 12 L h hd S (PaLM, App. B), N = matmul parameters (embedding lookup excluded)."""
    seq, layers, n_dev, peak = 1024, 2, 8, 989.4e12  # h100-sxm bf16 dense
    sc = small_scenario(
        **{
            "parallelism.ep": 1,
            "model.n_experts": 1,
            "model.top_k": 1,
            "workload.phase": "train",
            "workload.batch_size": 16,
            "workload.seq_len": seq,
        }
    )
    result = simulate(sc)
    n = dense_params_by_hand(layers, 1) - VOCAB * D_MODEL + layers * 3 * D_MODEL * D_FF
    flops_per_token = 6 * n + 12 * layers * HEADS * HEAD_DIM * seq
    assert result.summary["train"]["model_flops_per_token"] == pytest.approx(flops_per_token)
    tokens = 16 * seq
    mfu = tokens / result.step_time_s * flops_per_token / (n_dev * peak)
    assert result.summary["mfu"] == pytest.approx(mfu, rel=1e-9)
    assert 0 < result.summary["mfu"] < 0.7  # below the catalog's achieved GEMM efficiency


def test_memory_by_hand_and_sharding():
    """Per device (2 GPUs, ep 2, tp 1): dense parameters replicated (dp 2), one expert per
    layer (edp 1). Weights bf16, gradients fp32, Adam 12 bytes per parameter."""
    dense = dense_params_by_hand(2, 2)
    expert = 2 * 3 * D_MODEL * D_FF
    mem = {z: build_plan(two_gpus(zero_stage=z)).memory_bytes for z in (0, 1, 2)}
    assert mem[0]["weights"][0] == pytest.approx((dense + expert) * 2.0)
    assert mem[0]["gradients"][0] == pytest.approx((dense + expert) * 4.0)
    assert mem[0]["optimizer_states"][0] == pytest.approx((dense + expert) * 12.0)
    assert mem[1]["optimizer_states"][0] == pytest.approx((dense / 2 + expert) * 12.0)
    assert mem[1]["gradients"][0] == pytest.approx((dense + expert) * 4.0)
    assert mem[2]["gradients"][0] == pytest.approx((dense / 2 + expert) * 4.0)
    act = {r: build_plan(two_gpus(recompute=r)).memory_bytes["activations"][0] for r in
           ("none", "selective", "full")}  # fmt: skip
    assert act["full"] < act["selective"] < act["none"]


def test_training_that_does_not_fit_names_device_and_shortfall():
    sc = small_scenario(
        **{
            "model.n_layers": 32,
            "workload.phase": "train",
            "workload.batch_size": 8,
            "workload.seq_len": 4096,
            "workload.train": {"zero_stage": 0},
        }
    )
    with pytest.raises(ScenarioError, match=r"device n0\.d\d needs .*short by \d+\.\d GB"):
        build_plan(sc)


def test_batch_must_split_into_micro_batches_per_replica():
    with pytest.raises(ScenarioError, match="micro_batches"):
        small_scenario(
            **{
                "workload.phase": "train",
                "workload.batch_size": 12,
                "workload.train": {"micro_batches": 2},
            }
        )


def test_tree_needs_unsharded_optimizer():
    with pytest.raises(
        ScenarioError, match=r"workload\.train\.grad_allreduce: tree needs zero_stage 0"
    ):
        two_gpus(grad_allreduce="tree", zero_stage=1)


def test_micro_batches_accumulate():
    """Two micro-batches of the same size run the same passes twice: twice the tokens, and
    the step grows by one pass (forward, backward, all-to-alls), not by the gradient sync."""
    one, two = simulate(two_gpus()), simulate(two_gpus(micro_batches=2))
    assert two.summary["tokens"] == 2 * one.summary["tokens"]
    plan = build_plan(two_gpus())
    pass_s = compute_by_hand(plan) - plan.train.optimizer_s[0] + 2 * 4 * a2a_s()
    assert two.step_time_s - one.step_time_s == pytest.approx(pass_s, rel=1e-6)


def test_cli_run_prints_training_lines(tmp_path, capsys):
    import yaml

    from moesim.cli import main

    data = {
        "model": {"preset": "mixtral-8x7b", "n_layers": 2},
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"ep": 8},
        "workload": {"phase": "train", "batch_size": 8, "seq_len": 512},
        "sim": {"progress": False, "fidelity": "analytic"},
    }
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "training          MFU" in out and "optimizer_states" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train"]["micro_batches"] == 1 and 0 < summary["mfu"] < 1


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_gradient_buckets_overlap_the_backward(fidelity):
    """With per-layer buckets only the embeddings' and LM head's all-reduce (last) stays
    exposed for sure; the layers' buckets hide behind the rest of the backward."""
    serial = simulate(two_gpus(fidelity))
    sc = two_gpus(fidelity, overlap_grad_reduce=True)
    overlapped = simulate(sc)
    plan = build_plan(sc)
    tail_bytes, n = 2 * VOCAB * D_MODEL * 4.0, 2
    tail = 2 * (n - 1) / n * tail_bytes / SLOW_LINK_BPS + 2 * (n - 1) * NVLINK_LATENCY_S
    floor = compute_by_hand(plan) + 2 * 4 * a2a_s() + tail
    assert floor * (1 - 1e-9) <= overlapped.step_time_s < serial.step_time_s
    assert overlapped.summary["train"]["grad_reduce_bytes"] == pytest.approx(
        serial.summary["train"]["grad_reduce_bytes"]
    )


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_replicated_experts_all_reduce_their_gradients(fidelity):
    """8 experts on ep 8 (one node), the hottest of each of the 2 layers given ``extra``
    copies: ``r = extra + 1`` ranks all-reduce its fp32 weight gradient, each sending
    ``2 (r - 1) / r`` of it in a ring; nothing without replication."""

    def run(extra):
        routing = {"distribution": "uniform", "replicate_hot": 1 if extra else 0}
        if extra:
            routing["replicas_per_hot"] = extra
        sc = small_scenario(
            **{
                "routing": routing,
                "workload.phase": "train",
                "workload.batch_size": 8,
                "workload.seq_len": 128,
                "workload.train": {"zero_stage": 1, "grad_allreduce": "ring"},
                "sim.fidelity": fidelity,
            }
        )
        return simulate(sc).summary

    base = run(0)
    assert base["train"]["replica_grad_reduce_bytes"] == 0.0
    grad = 3 * D_MODEL * D_FF * 4.0  # one expert's weight gradient, fp32
    bw, alpha = NVL.effective_bandwidth_bytes_per_s, NVLINK_LATENCY_S
    for extra in (1, 3):
        r = extra + 1
        s = run(extra)
        per_replica = s["train"]["replica_grad_reduce_bytes"] / (2 * r)  # 2 layers x r ranks
        assert per_replica == pytest.approx(2 * (r - 1) / r * grad)
        added = s["breakdown_s"]["grad_reduce"] - base["breakdown_s"]["grad_reduce"]
        ring_s = ring_closed_form_s(grad, r, bw, alpha) + COLL_LAUNCH_S
        assert added == pytest.approx(2 * ring_s, rel=0.01)
