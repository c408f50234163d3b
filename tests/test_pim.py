"""Processing in memory: the GEMV/GEMM crossover, capacity, energy accounting, placement."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moesim import ScenarioError, catalog, load_scenario, scenario_from_dict, simulate
from moesim.cli import main
from moesim.network import build_topology
from moesim.plan.workload import build_plan

from .conftest import ROOT

HBMPIM = ROOT / "scenarios" / "mixtral-8x7b-8xh100-hbmpim-decode.yaml"
COLD = ROOT / "scenarios" / "minimax-text-01-8xh100-hbmpim-cold-decode.yaml"
EDGE = ROOT / "scenarios" / "edge-moe-1xorin-cim-decode.yaml"
FP16 = {"weights": "fp16", "activations": "fp16", "kv_cache": "fp16", "compute": "fp16"}


def one_expert(tokens: int, policy: str, units: int, d: int = 4096, f: int = 14336):
    """One H100 running one layer of a model with a single expert (top-1): every token of
    the decode step goes to that expert, so the expert's GEMMs have ``tokens`` rows."""
    return scenario_from_dict(
        {
            "name": "one-expert",
            "model": {
                "n_layers": 1,
                "d_model": d,
                "n_heads": 32,
                "n_kv_heads": 8,
                "head_dim": 128,
                "d_ff_expert": f,
                "n_experts": 1,
                "top_k": 1,
            },
            "cluster": {"nodes": 1, "devices_per_node": 1, "device": "h100-sxm"},
            "workload": {"phase": "decode", "batch_size": tokens, "seq_len": 128, "dtypes": FP16},
            "pim": {"device": "hbm-pim-aquabolt-xl", "units_per_gpu": units, "policy": policy},
            "sim": {"progress": False},
        }
    )


def closed_form(units: int, d: int = 4096, f: int = 14336):
    """The expert's GPU and PIM time as lines in the token count m, from the catalog
    constants, with the regime of every kernel checked rather than assumed.

    GPU (HBM-bound for small m): gate_up reads 2df weights and m(d+2f) activations, the
    SwiGLU activation 3mf, down df weights and m(f+d): ``t_g = (3dfw + m a (2d + 6f)) /
    (BW e_m) + 3 launches``. PIM: gate_up (4mdf FLOPs) and down (2mdf) run compute-bound at
    ``U P e_c``, the activation (5mf FLOPs on 3mf values) bank-bound at ``U BW_i e_m``, and
    ``m d a`` bytes cross the link each way: ``t_p = m (6df / (U P e_c) + 3fa / (U BW_i e_m)
    + 2da / link) + 3 command overheads + 2 link latencies``."""
    gpu, pim = catalog.device("h100-sxm"), catalog.pim("hbm-pim-aquabolt-xl")
    link = catalog.link(pim.host_link)
    w = a = 2.0
    bw_g = gpu.memory_bandwidth_bytes_per_s * gpu.memory_efficiency
    p_g = gpu.peak_flops_per_s["fp16"] * gpu.compute_efficiency
    p_p = units * pim.peak_flops_per_s["fp16"] * pim.compute_efficiency
    bw_i = units * pim.internal_bandwidth_bytes_per_s * pim.memory_efficiency
    bw_link = units * min(pim.external_bandwidth_bytes_per_s, link.bandwidth_bytes_per_s)
    gpu_line = (3 * d * f * w / bw_g + 3 * gpu.kernel_launch_s, a * (2 * d + 6 * f) / bw_g)
    pim_line = (
        3 * pim.command_overhead_s + 2 * link.latency_s,
        6 * d * f / p_p + 3 * f * a / bw_i + 2 * d * a / bw_link,
    )
    m_star = (gpu_line[0] - pim_line[0]) / (pim_line[1] - gpu_line[1])

    def regimes_hold(m: float) -> bool:
        gemm = [
            (4 * m * d * f, 2 * d * f * w + m * (d + 2 * f) * a),
            (2 * m * d * f, d * f * w + m * (f + d) * a),
        ]
        act = (5 * m * f, 3 * m * f * a)
        gpu_mem = all(fl / p_g < by / bw_g for fl, by in [*gemm, act])
        pim_cmp = all(fl / p_p > by / bw_i for fl, by in gemm) and act[0] / p_p < act[1] / bw_i
        return gpu_mem and pim_cmp

    def times(m: int) -> tuple[float, float]:
        return gpu_line[0] + m * gpu_line[1], pim_line[0] + m * pim_line[1]

    return m_star, regimes_hold, times


@pytest.mark.parametrize("units", [5, 8, 16])
def test_crossover_closed_form_matches_the_simulator(units):
    m_star, regimes_hold, times = closed_form(units)
    lo, hi = math.floor(m_star), math.floor(m_star) + 1
    assert lo >= 1 and m_star - lo > 0.01 and hi - m_star > 0.01  # not on a knife edge
    assert regimes_hold(1) and regimes_hold(hi)
    intensity = 2 * m_star / 2.0  # FLOPs per weight byte of the expert's GEMMs at m*
    assert intensity == pytest.approx(m_star)
    for m, pim_wins in ((lo, True), (hi, False)):
        gpu_s, pim_s = times(m)
        on_gpu = simulate(one_expert(m, "gpu_only", units))
        on_pim = simulate(one_expert(m, "all_experts", units))
        assert on_gpu.devices["experts_s"][0] == pytest.approx(gpu_s, rel=1e-9)
        assert on_pim.devices["pim_wait_s"][0] == pytest.approx(pim_s, rel=1e-9)
        # everything else is the same step: the difference is the expert's two costs
        delta = on_pim.step_time_s - on_gpu.step_time_s
        assert delta == pytest.approx(pim_s - gpu_s, rel=1e-6)
        assert (on_pim.step_time_s < on_gpu.step_time_s) == pim_wins
    assert on_gpu.summary["pim"]["token_threshold"] is None
    plan = build_plan(one_expert(1, "by_batch", units))
    from moesim.plan.layout import dtype_bytes
    from moesim.plan.pim import token_threshold

    assert token_threshold(plan.scenario, 14336, dtype_bytes(plan.scenario)) == lo


def test_weights_that_do_not_fit_on_a_cim_part_name_device_and_shortfall(capsys):
    sc = load_scenario(EDGE)
    assert sc.pim.device.weight_stationary
    simulate(load_scenario(EDGE, {"sim.progress": False}))  # 6 layers fit
    layers, m = 7, sc.model
    need = layers * m.n_experts * 3 * m.d_model * m.d_ff_expert * 1.0  # int8 bytes
    short_mb = (need - sc.pim.device.capacity_bytes) / 1e6
    with pytest.raises(ScenarioError) as err:
        build_plan(load_scenario(EDGE, {"model.n_layers": layers}))
    assert err.value.path == "pim.device"
    assert "mythic-m1076" in err.value.reason
    assert f"short by {short_mb:.1f} MB" in err.value.reason
    assert main(["run", str(EDGE), "--set", f"model.n_layers={layers}"]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and "short by" in out.err and "Traceback" not in out.err


def _hbmpim(**overrides):
    base = {"sim.progress": False, "model.n_layers": 2}
    return load_scenario(HBMPIM, {**base, **overrides})


@pytest.mark.parametrize("policy", ["all_experts", "attention", "by_batch"])
def test_energy_is_the_sum_of_its_parts(policy):
    sc = _hbmpim(**{"pim.policy": policy, "workload.batch_size": 4})
    r = simulate(sc)
    e, dev, links = r.summary["energy_j"], r.devices, r.links
    assert e["total"] == pytest.approx(dev["energy_j"].sum() + links["energy_j"].sum(), rel=1e-12)
    assert e["total"] == pytest.approx(sum(e["breakdown"].values()), rel=1e-12)
    assert e["per_token"] == pytest.approx(e["total"] / sc.workload.tokens)
    gpu, pim = sc.cluster.device, sc.pim.device
    step = r.step_time_s
    # each part from the counts in the tables and the catalog constants
    assert e["breakdown"]["gpu_compute"] == pytest.approx(
        dev["flops"].sum() * gpu.energy_pj_per_flop * 1e-12
    )
    assert e["breakdown"]["gpu_static"] == pytest.approx(8 * gpu.idle_power_w * step)
    assert e["breakdown"]["pim_static"] == pytest.approx(8 * 5 * pim.idle_power_w * step)
    assert e["breakdown"]["pim_compute"] == pytest.approx(
        dev["pim_flops"].sum() * pim.energy_pj_per_flop * 1e-12
    )
    per_bit = {
        "intra": catalog.link("nvlink4").energy_pj_per_bit,
        "pim": catalog.link(pim.host_link).energy_pj_per_bit,
    }
    for kind, group in links.groupby("kind"):
        expected = group["bytes_carried"].sum() * 8 * per_bit[kind] * 1e-12
        assert e["breakdown"][f"links_{kind}"] == pytest.approx(expected)
    assert e["breakdown"]["links_pim"] > 0 and e["breakdown"]["pim_memory"] > 0
    parts = [c for c in dev.columns if c.startswith(("gpu_", "pim_")) and c.endswith("_j")]
    assert np.allclose(dev[parts].sum(axis=1), dev["energy_j"])


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_energy_is_linear_in_tokens_for_a_fixed_per_token_workload(fidelity):
    """k independent nodes with k times the sequences (expert choice: every expert gets the
    same tokens on every node) do k times the per-node work in the same time: k x energy."""

    def energy(k: int) -> float:
        sc = scenario_from_dict(
            {
                "model": {"preset": "mixtral-8x7b", "n_layers": 2},
                "cluster": {"nodes": k, "devices_per_node": 1, "device": "h100-sxm"},
                "parallelism": {"tp": 1, "ep": 1},
                "workload": {
                    "phase": "decode",
                    "batch_size": 4 * k,
                    "seq_len": 256,
                    "dtypes": FP16,
                },
                "routing": {"gating": "expert_choice", "capacity_factor": 1.0},
                "pim": {"device": "hbm-pim-aquabolt-xl", "units_per_gpu": 5, "policy": "by_batch"},
                "sim": {"progress": False, "fidelity": fidelity},
            }
        )
        r = simulate(sc)
        assert r.links["bytes_carried"][r.links["kind"] != "pim"].sum() == 0
        assert r.devices["pim_tokens"].sum() > 0
        return r.summary["energy_j"]["total"]

    one = energy(1)
    assert energy(2) == pytest.approx(2 * one, rel=1e-9)
    assert energy(4) == pytest.approx(4 * one, rel=1e-9)


def test_decode_wins_prefill_loses():
    """Latency per token: one sequence's decode step (one token per expert, a GEMV) is faster
    with the experts in HBM-PIM; a 4,096-token prompt (GEMMs of ~1,000 rows) is far slower."""
    decode = {p: simulate(_hbmpim(**{"pim.policy": p})) for p in ("all_experts", "gpu_only")}
    assert decode["all_experts"].step_time_s < decode["gpu_only"].step_time_s
    prefill = {
        p: simulate(
            _hbmpim(**{"pim.policy": p, "workload.phase": "prefill", "workload.seq_len": 4096})
        )
        for p in ("all_experts", "gpu_only")
    }
    assert prefill["all_experts"].step_time_s > prefill["gpu_only"].step_time_s
    e = {p: r.summary["energy_j"]["per_token"] for p, r in decode.items()}
    assert e["all_experts"] < e["gpu_only"]


@pytest.mark.parametrize("policy", ["all_experts", "cold_experts", "attention", "by_batch"])
def test_analytic_agrees_with_des(policy):
    over = {"pim.policy": policy, "sim.progress": False}
    des = simulate(load_scenario(COLD, over))
    # the engines agree on one plan: the same routing draws (not the analytic default, expected)
    ana = simulate(
        load_scenario(COLD, {**over, "sim.fidelity": "analytic", "routing.sampling": "draw"})
    )
    assert ana.step_time_s == pytest.approx(des.step_time_s, rel=0.02)
    assert ana.summary["energy_j"]["total"] == pytest.approx(
        des.summary["energy_j"]["total"], rel=0.02
    )
    pim_links = des.links["kind"] == "pim"
    assert np.allclose(ana.links["bytes_carried"][pim_links], des.links["bytes_carried"][pim_links])


def test_pim_flows_on_the_topology_leave_device_routes_alone():
    sc = load_scenario(COLD, {"sim.progress": False})
    with_pim = build_topology(sc.cluster, sc.topology, sc.pim)
    without = build_topology(sc.cluster, sc.topology)
    src, dst = np.divmod(np.arange(64), 8)
    assert np.array_equal(with_pim.routes(src, dst), without.routes(src, dst))
    assert with_pim.n_links == without.n_links + 2 * 8
    r = simulate(sc)
    plan = build_plan(sc)
    tokens = sum(lp.pim.tokens for lp in plan.layers if lp.pim is not None)
    a = sc.model.d_model * 2  # fp16 activations per token
    up = r.links["link"].str.endswith(".pim")
    assert np.allclose(r.links.loc[up, "bytes_carried"], tokens * a)
    assert np.allclose(r.links.loc[~up & (r.links["kind"] == "pim"), "bytes_carried"], tokens * a)


def test_placements_conserve_tokens_and_expert_weights():
    gpu_only = build_plan(load_scenario(COLD, {"pim.policy": "gpu_only"}))
    held = gpu_only.memory_bytes["weights"]
    for policy in ("all_experts", "cold_experts", "by_batch"):
        plan = build_plan(load_scenario(COLD, {"pim.policy": policy}))
        lp = plan.layers[0]
        gpu_tokens = lp.device_tokens - lp.pim.tokens
        assert (gpu_tokens >= 0).all() and lp.pim.tokens.sum() > 0
        moved = plan.pim_memory_bytes["weights"]
        if policy == "by_batch":  # a copy on both
            assert np.allclose(plan.memory_bytes["weights"], held)
        else:
            assert np.allclose(plan.memory_bytes["weights"] + moved, held)
        if policy == "all_experts":
            assert (gpu_tokens == 0).all()
            assert np.allclose(moved, lp.local_experts * 3 * 6144 * 9216 * 2)
    # cold experts: hot ones stay on the GPU, so some GPU still runs experts
    cold = build_plan(load_scenario(COLD))
    lp = cold.layers[0]
    assert (lp.device_tokens - lp.pim.tokens).sum() > 0
    assert cold.pim_memory_bytes["weights"].sum() < 32 * 3 * 6144 * 9216 * 2


def test_cold_experts_beat_both_extremes_on_the_skewed_layer():
    steps = {
        p: simulate(load_scenario(COLD, {"pim.policy": p, "sim.progress": False})).step_time_s
        for p in ("cold_experts", "gpu_only", "all_experts")
    }
    assert steps["cold_experts"] < steps["gpu_only"] < steps["all_experts"]


def test_bad_pim_input_is_one_line_error():
    with pytest.raises(ScenarioError, match="computes fp16, not bf16"):
        load_scenario(HBMPIM, {"workload.dtypes.compute": "bf16"})
    with pytest.raises(ScenarioError, match="h100-sxm is a gpu"):
        load_scenario(HBMPIM, {"pim.device": "h100-sxm"})
    with pytest.raises(ScenarioError, match="weight-stationary"):
        build_plan(load_scenario(EDGE, {"pim.policy": "attention"}))


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_trace_has_a_track_per_pim_unit_without_overlaps(tmp_path, fidelity):
    import json

    from moesim.results.collect import write_outputs

    r = simulate(_hbmpim(**{"sim.fidelity": fidelity, "workload.batch_size": 8}))
    trace = json.loads((write_outputs(r, tmp_path) / "trace.json").read_text())["traceEvents"]
    names = {
        e["tid"]: e["args"]["name"] for e in trace if e["name"] == "thread_name" and e["pid"] == 1
    }
    pim = [e for e in trace if e.get("cat") == "pim"]
    assert pim and all(names[e["tid"]].endswith(".pim") and e["tid"] >= 8 for e in pim)
    busy = sum(e["dur"] for e in pim) * 1e-6
    assert busy == pytest.approx(r.devices["pim_busy_s"].sum(), rel=1e-9)
    for tid in {e["tid"] for e in trace if e["ph"] == "X" and e["pid"] == 1}:
        spans = sorted(
            (e["ts"], e["ts"] + e["dur"])
            for e in trace
            if e["ph"] == "X" and e["pid"] == 1 and e["tid"] == tid
        )
        assert all(b[0] >= a[1] - 1e-6 for a, b in itertools.pairwise(spans))


def test_catalog_lists_pim_parts(capsys):
    assert main(["catalog", "devices"]) == 0
    out = capsys.readouterr().out
    assert "hbm-pim-aquabolt-xl      pim:" in out and "mythic-m1076             cim:" in out
