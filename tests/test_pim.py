"""Processing in memory: the GEMV/GEMM crossover, capacity, energy accounting, placement."""

from __future__ import annotations

import copy
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
    gpu = catalog.device("h100-sxm").with_graphs()  # decode replays CUDA graphs
    pim = catalog.pim("hbm-pim-aquabolt-xl")
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
    from moesim.plan.pim_placement import token_threshold

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
    """HBM2-PIM pins are half duplex: one link per GPU carries activations in and out."""
    sc = load_scenario(COLD, {"sim.progress": False})
    assert sc.pim.device.external_duplex == "half"
    with_pim = build_topology(sc.cluster, sc.topology, sc.pim)
    without = build_topology(sc.cluster, sc.topology)
    src, dst = np.divmod(np.arange(64), 8)
    assert np.array_equal(with_pim.routes(src, dst), without.routes(src, dst))
    assert with_pim.n_links == without.n_links + 8
    assert np.array_equal(with_pim.tables["pim_up"], with_pim.tables["pim_down"])
    full = sc.pim.model_copy(
        update={"device": sc.pim.device.model_copy(update={"external_duplex": "full"})}
    )
    assert build_topology(sc.cluster, sc.topology, full).n_links == without.n_links + 2 * 8
    r = simulate(sc)
    plan = build_plan(sc)
    tokens = sum(lp.pim.tokens for lp in plan.layers if lp.pim is not None)
    a = sc.model.d_model * 2  # fp16 activations per token
    pim = r.links["kind"] == "pim"
    assert np.allclose(r.links.loc[pim, "bytes_carried"], 2 * tokens * a)  # in and out


@pytest.mark.parametrize("duplex", ["half", "full"])
def test_half_duplex_pins_carry_in_and_out_in_turn(duplex):
    """Two PIM transfers at once, one in and one out of equal size ``x``, on a unit of pin
    bandwidth ``B``: half duplex shares the pins, both end at ``2x / B``; full duplex runs
    them side by side, both end at ``x / B`` (plus the link latency each)."""
    import simpy

    from moesim.network.fluid import FluidNetwork

    sc = load_scenario(COLD, {"sim.progress": False})
    spec = sc.pim.device.model_copy(update={"external_duplex": duplex})
    topo = build_topology(sc.cluster, sc.topology, sc.pim.model_copy(update={"device": spec}))
    up, down = int(topo.tables["pim_up"][0]), int(topo.tables["pim_down"][0])
    bw, lat = topo.bandwidth_bytes_per_s[up], topo.latency_s[up]
    assert bw == sc.pim.units_per_gpu * min(
        spec.external_bandwidth_bytes_per_s, catalog.link(spec.host_link).bandwidth_bytes_per_s
    )
    env = simpy.Environment()
    net = FluidNetwork(env, topo, tolerance=1e-9)
    x, ends = 1e8, []
    for link in (up, down):
        gid, event = net.group(1)
        block = net.add_block(
            np.array([[link]]),
            topo.latency_s[[link]],
            np.arange(2),
            np.array([gid]),
            np.ones(1, np.int64),
        )
        net.contribute(block, np.arange(1), np.array([x]), np.ones(1))
        event.callbacks.append(lambda _e: ends.append(env.now))
    env.run()
    expected = (2 * x if duplex == "half" else x) / bw + lat
    assert ends == pytest.approx([expected, expected], rel=1e-6)


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
    busy = sum(e["dur"] for e in pim) * 1e-6  # each to the nanosecond: within 1 ns a slice
    assert busy == pytest.approx(r.devices["pim_busy_s"].sum(), rel=1e-9, abs=1e-9 * len(pim))
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


def test_per_bank_figures_give_the_unit_totals_and_op_per_byte():
    npm = catalog.pim("neupims-pim")
    banks = npm.stacks * npm.banks_per_stack
    assert npm.banks == banks == 512
    assert npm.internal_bandwidth_bytes_per_s == pytest.approx(banks * 32e9)
    assert npm.flops_per_s("fp16") == pytest.approx(banks * 32e9)
    assert npm.ops_per_byte("fp16") == pytest.approx(1.0)
    duplex = catalog.pim("duplex-logic-pim")
    assert duplex.ops_per_byte("fp16") == pytest.approx(8.0)  # the top of the paper's 4-8
    with pytest.raises(ValueError, match="stacks x banks_per_stack"):
        catalog.pim("neupims-pim", internal_bandwidth_bytes_per_s=1e12)


def attacc_decode(batch: int = 16, context: int = 2048, **extra):
    """One GPT-3-175B layer decoding on 8 A100s, each with an AttAcc HBM3-PIM device."""
    return scenario_from_dict(
        {
            "model": {"preset": "gpt3-175b", "n_layers": 1, "n_dense_layers": 1},
            "cluster": {"nodes": 1, "devices_per_node": 8, "device": "a100-sxm-80gb"},
            "parallelism": {"tp": 8, "ep": 1},
            "workload": {
                "phase": "decode",
                "batch_size": batch,
                "seq_len": context,
                "dtypes": FP16,
            },
            "pim": {"device": "attacc-hbm3-pim", "policy": "attention"},
            "sim": {"progress": False},
            **extra,
        }
    )


def test_attention_on_pim_is_internal_bandwidth_bound_as_its_closed_form():
    """MHA decode attention on AttAcc: per device ``B`` sequences read ``(L + 1)`` cached
    tokens of ``2 h hd`` fp16 values (h = 96/8 heads) plus ``B`` queries and outputs of
    ``h hd`` each; ``4 B (L + 1) h hd`` FLOPs. At AttAcc's op/B of 1 the banks bound it:
    ``t = bytes / (BW_internal e_m) + command overhead``."""
    batch, context = 16, 2048
    sc = attacc_decode(batch, context)
    pim = sc.pim.device
    h, hd = 96 // 8, 128
    nbytes = batch * (context + 1) * 2 * h * hd * 2 + batch * 2 * h * hd * 2
    flops = 4 * batch * (context + 1) * h * hd
    bw = pim.internal_bandwidth_bytes_per_s * pim.memory_efficiency
    memory_s = nbytes / bw
    assert flops / (pim.flops_per_s("fp16") * pim.compute_efficiency) < memory_s  # its regime
    plan = build_plan(sc)
    work = plan.layers[0].pim
    assert work.phase == "attention"
    assert np.allclose(work.seconds, memory_s + pim.command_overhead_s, rtol=1e-12)
    assert np.allclose(work.internal_bytes, nbytes) and np.allclose(work.flops, flops)
    # the KV cache lives on the PIM device, not in the GPU's HBM
    assert np.allclose(plan.pim_memory_bytes["kv_cache"], batch * (context + 1) * 2 * h * hd * 2)


# -- memory tiers (moesim/cost/tiers.py, moesim/plan/tiers.py) ---------------------------------
def mixtral_one_gpu(tiers: dict | None, batch: int = 1, layers: int = 2, **routing):
    """Mixtral-8x7B decoding on one H100 (fp16), experts optionally in a memory tier."""
    data = {
        "model": {"preset": "mixtral-8x7b", "n_layers": layers},
        "cluster": {"nodes": 1, "devices_per_node": 1, "device": "h100-sxm"},
        "parallelism": {"tp": 1, "ep": 1},
        "workload": {"phase": "decode", "batch_size": batch, "seq_len": 512, "dtypes": FP16},
        "routing": {"distribution": "uniform", **routing},
        "sim": {"progress": False},
    }
    if tiers is not None:
        data["tiers"] = tiers
    return scenario_from_dict(data)


def test_an_offloaded_experts_fetch_is_its_bytes_over_the_link_plus_latency():
    from moesim.cost.tiers import expert_bytes, fetch_time_s

    link = catalog.link("pcie5-x16")
    nbytes = expert_bytes(catalog.model("mixtral-8x7b"), 1, 2.0)
    assert nbytes == 3 * 4096 * 14336 * 2
    one = fetch_time_s(1, nbytes, link)
    assert one == pytest.approx(nbytes / 64e9 + 1e-6, rel=1e-12)
    assert fetch_time_s(3, nbytes, link) == pytest.approx(3 * nbytes / 64e9 + 1e-6)
    assert fetch_time_s(0, nbytes, link) == 0
    slow = fetch_time_s(1, nbytes, link, tier_bandwidth_bytes_per_s=20e9)  # the tier bounds it
    assert slow == pytest.approx(nbytes / 20e9 + 1e-6)
    # in a step: one sequence, top-2 of 8 experts, none resident: two fetches per layer
    base = build_plan(mixtral_one_gpu(None))
    tiered = build_plan(mixtral_one_gpu({"link": "pcie5-x16", "hbm_experts": 0}))
    for lb, lt in zip(base.layers, tiered.layers, strict=True):
        assert lt.tiers.needed[0] == 2 and lt.tiers.offloaded[0] == 8
        assert lt.tiers.fetch_s[0] == pytest.approx(2 * nbytes / 64e9 + 1e-6, rel=1e-12)
        assert np.array_equal(lt.compute_s["experts"], lb.compute_s["experts"])
    # the offloaded experts left HBM; one layer's fetched experts are buffered there
    moved = base.memory_bytes["weights"] - tiered.memory_bytes["weights"]
    assert moved[0] == pytest.approx(2 * 8 * nbytes - 2 * nbytes)  # a buffer of 2 stays
    assert tiered.tier_memory_bytes[0] == pytest.approx(2 * 8 * nbytes)
    r = simulate(mixtral_one_gpu({"link": "pcie5-x16", "hbm_experts": 0}))
    assert r.summary["tiers"]["needed_experts"] == 4
    e = r.summary["energy_j"]
    assert e["breakdown"]["links_tier"] == pytest.approx(4 * nbytes * 8 * 5.0e-12)
    assert e["breakdown"]["tier_link"] == 0  # no host activations
    # the GPU reads its non-expert weights, KV cache and the experts with tokens (the fetched
    # ones included) once: the same as with every expert resident
    from moesim.results.energy import gpu_bytes_read

    fetched = build_plan(mixtral_one_gpu({"link": "pcie5-x16", "hbm_experts": 0}))
    resident = build_plan(mixtral_one_gpu(None))
    assert np.allclose(gpu_bytes_read(fetched), gpu_bytes_read(resident))
    assert e["breakdown"]["gpu_memory"] > 0
    assert e["total"] == pytest.approx(sum(e["breakdown"].values()), rel=1e-12)


def test_resident_experts_are_the_expected_hottest_and_lru_the_recent():
    sc = mixtral_one_gpu({"hbm_experts": 3}, batch=64, layers=1, distribution="zipf", zipf_s=1.5)
    plan = build_plan(sc)
    lp = plan.layers[0]
    assert lp.tiers.resident[0] == 3 and lp.tiers.offloaded[0] == 5
    from moesim.plan.tiers import _top

    score = np.array([[0.1, 0.5, 0.3, 0.05]])
    assert _top(score, np.ones((1, 4), bool), 2).tolist() == [[False, True, True, False]]
    lru = build_plan(
        mixtral_one_gpu(
            {"hbm_experts": 3, "cache": "lru"}, batch=64, layers=1, distribution="zipf", zipf_s=1.5
        )
    )
    assert lru.layers[0].tiers.resident[0] == 3
    again = build_plan(
        mixtral_one_gpu(
            {"hbm_experts": 3, "cache": "lru"}, batch=64, layers=1, distribution="zipf", zipf_s=1.5
        )
    )
    assert np.array_equal(lru.layers[0].compute_s["experts"], again.layers[0].compute_s["experts"])


def test_experts_on_the_host_cpu_run_beside_the_gpus_resident_ones():
    from moesim.cost.tiers import host_expert_time_s

    tiers = {"hbm_experts": 4, "execute": "host", "host": "xeon-8480", "link": "pcie5-x16"}
    sc = mixtral_one_gpu(tiers, batch=8, layers=1)
    plan = build_plan(sc)
    lp, work = plan.layers[0], plan.layers[0].tiers
    base = build_plan(mixtral_one_gpu(None, batch=8, layers=1)).layers[0]
    assert work.host_tokens[0] > 0 and work.fetch_s[0] == 0
    assert lp.device_tokens[0] == base.device_tokens[0]  # the same routing
    host = catalog.device("xeon-8480")
    link = catalog.link("pcie5-x16")
    one = host_expert_time_s(np.array([[1, 0]]), 4096, 14336, plan_bytes_fp16(), host, "fp16", link)
    io = 4096 * 2 / link.bandwidth_bytes_per_s + link.latency_s
    assert one[0] > 2 * io  # weights from DDR5 dominate one token
    assert work.host_s[0] > 0
    assert lp.compute_s["experts"][0] >= work.host_s[0]
    from moesim.results.energy import gpu_bytes_read

    base_plan = build_plan(mixtral_one_gpu(None, batch=8, layers=1))
    assert np.allclose(gpu_bytes_read(plan) + work.host_weight_bytes, gpu_bytes_read(base_plan))
    with pytest.raises(ScenarioError, match="host device"):
        mixtral_one_gpu({"execute": "host"})


def plan_bytes_fp16():
    from moesim.cost.ops import Bytes

    return Bytes(2.0, 2.0, 2.0, 2.0)


def test_tiers_that_do_not_fit_and_training_are_one_line_errors():
    with pytest.raises(ScenarioError) as err:
        build_plan(mixtral_one_gpu({"capacity_bytes": 1e9}))
    need = 2 * 8 * 3 * 4096 * 14336 * 2 / 1e9
    assert err.value.path == "tiers.capacity_bytes"
    assert f"must hold {need:.1f} GB" in err.value.reason and "holds 1.0 GB" in err.value.reason
    with pytest.raises(ScenarioError, match="1-8 FLOP per byte"):
        load_scenario(HBMPIM, {"workload.phase": "train"})


@pytest.mark.parametrize("units", [1, 2, 3])
def test_the_batch_pim_memory_holds_grows_as_kv_bytes_per_token_predict(units):
    """Attention-PIM keeps the KV cache on the PIM device: ``2 x 96/8 heads x 128 x 2 B`` per
    token per GPU for each GPT-3 layer, ``seq_len + 1`` tokens per decoding sequence. The
    largest batch is ``floor(units x capacity / (context x that))`` (dp = 1); one more
    sequence does not fit."""
    from moesim.plan.pim_placement import (
        pim_capacity_bytes,
        pim_expert_bytes,
        pim_kv_bytes_per_token,
        pim_max_batch,
    )

    cap, layers, context = 0.5e9, 2, 2048
    sc = scenario_from_dict(
        {
            "model": {"preset": "gpt3-175b", "n_layers": layers, "n_dense_layers": layers},
            "cluster": {"nodes": 1, "devices_per_node": 8, "device": "a100-sxm-80gb"},
            "parallelism": {"tp": 8, "ep": 1},
            "workload": {"phase": "decode", "batch_size": 1, "seq_len": context, "dtypes": FP16},
            "pim": {
                "device": {"preset": "attacc-hbm3-pim", "capacity_bytes": cap},
                "units_per_gpu": units,
                "policy": "attention",
            },
            "sim": {"progress": False},
        }
    )
    per_token = layers * 2 * (96 // 8) * 128 * 2
    assert pim_kv_bytes_per_token(sc) == per_token
    assert pim_capacity_bytes(sc) == units * cap and pim_expert_bytes(sc) == 0
    expected = math.floor(units * cap / ((context + 1) * per_token))
    assert pim_max_batch(sc) == expected
    fits = build_plan(
        sc.model_copy(update={"workload": sc.workload.model_copy(update={"batch_size": expected})})
    )
    assert fits.pim_memory_bytes["kv_cache"].max() <= units * cap
    with pytest.raises(ScenarioError, match="does not fit"):
        build_plan(
            sc.model_copy(
                update={"workload": sc.workload.model_copy(update={"batch_size": expected + 1})}
            )
        )


def test_experts_on_pim_leave_the_rest_of_its_memory_to_the_kv_cache():
    from moesim.plan.pim_placement import pim_expert_bytes

    sc = load_scenario(HBMPIM)
    m = sc.model
    assert pim_expert_bytes(sc) == m.n_layers * 1 * 3 * m.d_model * m.d_ff_expert * 2
    assert pim_expert_bytes(load_scenario(HBMPIM, {"pim.policy": "attention"})) == 0
    from moesim.plan.pim_placement import expert_bytes_off_gpu

    on_gpu = build_plan(load_scenario(HBMPIM, {"pim.policy": "gpu_only"})).memory_bytes["weights"]
    on_pim = build_plan(sc).memory_bytes["weights"]
    assert np.allclose(on_gpu - on_pim, expert_bytes_off_gpu(sc))
    assert expert_bytes_off_gpu(load_scenario(HBMPIM, {"pim.policy": "by_batch"})) == 0


def _serve_with_pim(policy: str, capacity: float = 1e9, rate: float = 0.01, n: int = 30):
    from .conftest import small_scenario

    serve = {
        "rate_per_s": rate,
        "n_requests": n,
        "prompt_tokens": {"mean": 256},
        "output_tokens": {"mean": 32},
        "grid_points": 4,
        "max_batch_size": 64,
        "max_batched_tokens": 4096,
    }
    pim = {
        "device": {"preset": "duplex-logic-pim", "capacity_bytes": capacity},
        "policy": policy,
    }
    return small_scenario(
        workload={"phase": "serve", "serve": serve}, pim=pim, **{"sim.fidelity": "analytic"}
    )


@pytest.mark.parametrize("policy", ["attention", "all_experts"])
def test_serving_steps_include_the_pim_units(policy):
    """At low load every first token is one prefill step and every later one a decode step of
    batch 1, each an ordinary moesim step with the same PIM units."""
    sc = _serve_with_pim(policy)
    req = simulate(sc).requests

    def step(phase: str, length: int) -> float:
        wl = sc.workload.model_copy(
            update={"phase": phase, "batch_size": 1, "seq_len": length, "serve": None}
        )
        return simulate(sc.model_copy(update={"workload": wl})).step_time_s

    assert np.allclose(req["ttft_s"], step("prefill", 256), rtol=1e-9)
    mid = step("decode", 256 + 15)
    assert req["tpot_s"].to_numpy() == pytest.approx(mid, rel=0.01)
    gpu_only = simulate(_serve_with_pim("gpu_only")).requests
    assert not np.allclose(req["tpot_s"], gpu_only["tpot_s"], rtol=1e-6)  # PIM changes it


def test_serving_kv_budget_is_the_pim_memory_when_pim_holds_the_cache():
    """Mixtral's layers are all softmax: with attention on PIM the whole cache lives there,
    so the budget per device is the PIM capacity, whatever the GPU has left."""
    sc = _serve_with_pim("attention", capacity=0.5e9, n=2)
    kv = simulate(sc).summary["kv_cache"]
    assert kv["budget_bytes_per_device"] == pytest.approx(0.5e9)


# -- the papers' headline directions (scenarios/pim/, docs/pim.md) ----------------------------
PAPERS = ROOT / "scenarios" / "pim"


def _run(name: str, **overrides):
    return simulate(load_scenario(PAPERS / f"{name}.yaml", {"sim.progress": False, **overrides}))


def test_attacc_beats_the_gpu_system_of_the_same_memory_in_throughput_and_energy():
    from moesim.plan.pim_placement import pim_max_batch

    attacc = load_scenario(PAPERS / "gpt3-175b-8xa100-attacc-decode.yaml")
    assert attacc.workload.batch_size == pim_max_batch(attacc)  # the batch its PIM holds
    pim, gpus = _run("gpt3-175b-8xa100-attacc-decode"), _run("gpt3-175b-16xa100-decode")
    assert pim.summary["tokens_per_s"] > 1.3 * gpus.summary["tokens_per_s"]
    assert pim.summary["energy_j"]["per_token"] < gpus.summary["energy_j"]["per_token"] / 1.5
    with pytest.raises(ScenarioError, match="does not fit"):  # the GPU-only batch is its most
        build_plan(
            load_scenario(PAPERS / "gpt3-175b-16xa100-decode.yaml", {"workload.batch_size": 58})
        )


def test_duplex_logic_pim_speeds_mixtral_decode_up_and_saves_energy():
    duplex, h100 = (
        _run("mixtral-8x7b-2xh100-duplex-decode", **{"pim.policy": p})
        for p in ("co_processing", "gpu_only")
    )
    assert duplex.step_time_s < h100.step_time_s
    assert duplex.summary["energy_j"]["per_token"] < h100.summary["energy_j"]["per_token"]


def test_offloaded_experts_run_faster_on_the_host_than_fetched_at_batch_one():
    host = _run("mixtral-8x7b-1xh100-offload-decode")
    fetch = _run("mixtral-8x7b-1xh100-offload-decode", **{"tiers.execute": "fetch"})
    assert host.step_time_s < fetch.step_time_s / 2
    assert host.summary["memory"]["max_used_bytes"] <= 80e9  # fits where the whole model does not
    with pytest.raises(ScenarioError, match="does not fit"):
        build_plan(
            load_scenario(
                PAPERS / "mixtral-8x7b-1xh100-offload-decode.yaml", {"tiers.hbm_experts": 8}
            )
        )


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_expert_fetches_are_graph_nodes_hidden_behind_the_permute(fidelity):
    """The fetch leaves when the router has chosen the experts and the expert kernels wait
    for it: on one GPU (no dispatch traffic) each layer's step grows by what of the fetch the
    permute does not hide, ``max(0, fetch - permute)``; the tier link carries the bytes."""
    tiers = {"link": "pcie5-x16", "hbm_experts": 0}
    sc = mixtral_one_gpu(tiers, **{})
    sc = sc.model_copy(update={"sim": sc.sim.model_copy(update={"fidelity": fidelity})})
    base = mixtral_one_gpu(None)
    base = base.model_copy(update={"sim": base.sim.model_copy(update={"fidelity": fidelity})})
    plan = build_plan(sc)
    hidden = sum(max(0.0, lp.tiers.fetch_s[0] - lp.compute_s["permute"][0]) for lp in plan.layers)
    with_tiers, without = simulate(sc), simulate(base)
    assert with_tiers.step_time_s - without.step_time_s == pytest.approx(hidden, rel=1e-6)
    assert with_tiers.summary["breakdown_s"]["expert_fetch"] == pytest.approx(hidden, rel=1e-6)
    tier = with_tiers.links["kind"] == "tier"
    fetched = sum(lp.tiers.fetch_bytes[0] for lp in plan.layers)
    assert with_tiers.links.loc[tier, "bytes_carried"].sum() == pytest.approx(fetched)
    assert "expert_fetch_wait_s" not in without.devices


@pytest.mark.parametrize("fidelity", ["des", "analytic"])
def test_sub_batch_interleaving_with_equal_gpu_and_pim_times_halves_the_layer_time(fidelity):
    """Each sub-batch's layer: GPU attention ``x``, PIM attention ``g``, GPU FFN ``y`` with
    ``x + y = g`` (GPU and PIM equally busy). Serial (the whole batch, phase after phase):
    ``L x 4g``. Interleaved (GPU: rest_a, attention_a, rest_b, attention_b; PIM: a, b) the
    GPU never idles after the first sub-batch's attention: ``(2L + 1) g``, so each extra
    layer costs ``2g`` instead of ``4g``."""
    from moesim.engine.analytic import AnalyticEngine
    from moesim.engine.des import Engine

    x, y, layers = 1.0e-3, 3.0e-3, 4
    g = x + y
    sc = scenario_from_dict(
        {
            "model": {"preset": "gpt3-175b", "n_layers": layers, "n_dense_layers": layers},
            "cluster": {"nodes": 1, "devices_per_node": 1, "device": "a100-sxm-80gb"},
            "workload": {"phase": "decode", "batch_size": 8, "seq_len": 256, "dtypes": FP16},
            "pim": {"device": "attacc-hbm3-pim", "policy": "attention", "sub_batches": 2},
            "sim": {"progress": False, "fidelity": fidelity},
        }
    )
    plan = build_plan(sc)
    assert [p.scenario.workload.batch_size for p in plan.sub_plans] == [4, 4]

    def times(p, scale: float) -> None:
        for lp in p.layers:
            lp.compute_s["attention"] = np.full(1, scale * x)
            lp.compute_s["dense_ffn"] = np.full(1, scale * y)
            lp.pim.seconds = np.full(1, scale * g)
            lp.pim.in_bytes = np.zeros(1)
            lp.pim.out_bytes = np.zeros(1)
        p.lm_head_s = np.zeros(1)

    for sub in plan.sub_plans:
        times(sub, 1.0)
    times(plan, 2.0)
    serial = copy.copy(plan)
    serial.sub_plans = []
    engine = Engine if fidelity == "des" else AnalyticEngine
    interleaved_s = engine(plan, progress=False).run().rec.finish_s.max()
    serial_s = engine(serial, progress=False).run().rec.finish_s.max()
    assert serial_s == pytest.approx(layers * 4 * g, rel=1e-9)
    assert interleaved_s == pytest.approx((2 * layers + 1) * g, rel=1e-9)


def test_sub_batches_need_attention_on_pim():
    with pytest.raises(ScenarioError, match=r"needs pim\.policy: attention"):
        load_scenario(HBMPIM, {"pim.sub_batches": 2})


def test_neupims_pim_holds_the_cache_and_beats_the_npu_alone():
    from moesim.plan.pim_placement import pim_max_batch

    sc = load_scenario(PAPERS / "gpt3-175b-32xnpu-neupims-decode.yaml")
    assert sc.workload.batch_size == pim_max_batch(sc) - pim_max_batch(sc) % 2
    fast = {"sim.fidelity": "analytic", "pim.sub_batches": 1}
    naive = _run("gpt3-175b-32xnpu-neupims-decode", **fast)
    alone = _run(
        "gpt3-175b-32xnpu-neupims-decode",
        **{
            **fast,
            "pim.policy": "gpu_only",
            "cluster.device.memory_bytes": 32e9,
            "workload.batch_size": 276,
        },
    )
    assert naive.summary["tokens_per_s"] > alone.summary["tokens_per_s"]


def test_gpt3_175b_dimensions_give_its_published_parameters():
    from moesim.cost.ops import param_counts

    spec = catalog.model("gpt3-175b")
    assert param_counts(spec)["total"] == pytest.approx(spec.total_params, rel=0.01)
    assert param_counts(spec)["routed_experts"] == 0  # every layer dense


def test_serving_steps_fetch_offloaded_experts():
    """Mixtral on one H100 with every expert offloaded: at low load TPOT is one decode step
    with its fetches."""
    from .conftest import small_scenario

    serve = {
        "rate_per_s": 0.01,
        "n_requests": 10,
        "prompt_tokens": {"mean": 128},
        "output_tokens": {"mean": 16},
        "grid_points": 4,
        "max_batch_size": 8,
    }
    sc = small_scenario(
        workload={"phase": "serve", "serve": serve},
        cluster={"nodes": 1, "devices_per_node": 1, "device": "h100-sxm"},
        parallelism={"tp": 1, "ep": 1},
        tiers={"hbm_experts": 0},
        **{"sim.fidelity": "analytic"},
    )
    req = simulate(sc).requests
    wl = sc.workload.model_copy(
        update={"phase": "decode", "batch_size": 1, "seq_len": 128 + 7, "serve": None}
    )
    step = simulate(sc.model_copy(update={"workload": wl}))
    assert step.summary["breakdown_s"]["expert_fetch"] > 0
    assert req["tpot_s"].to_numpy() == pytest.approx(step.step_time_s, rel=0.01)


def test_co_processing_puts_attention_and_experts_on_pim_in_one_step():
    """Duplex's co-processing is policy attention's attention work plus policy by_batch's
    expert work in the same layers; the energy counts both."""
    plans = {
        p: build_plan(
            load_scenario(PAPERS / "mixtral-8x7b-2xh100-duplex-decode.yaml", {"pim.policy": p})
        )
        for p in ("attention", "by_batch", "co_processing")
    }
    for att, exp, both in zip(*(plans[p].layers for p in plans), strict=True):
        assert both.pim_attention is not None and both.pim.phase == "experts"
        assert np.array_equal(both.pim_attention.seconds, att.pim.seconds)
        assert np.array_equal(both.pim.seconds, exp.pim.seconds)
        assert np.array_equal(both.compute_s["attention"], att.compute_s["attention"])
        assert np.array_equal(both.compute_s["experts"], exp.compute_s["experts"])
    co = plans["co_processing"]
    assert np.allclose(
        co.pim_memory_bytes["kv_cache"], plans["attention"].pim_memory_bytes["kv_cache"]
    )
    assert np.allclose(
        co.pim_memory_bytes["weights"], plans["by_batch"].pim_memory_bytes["weights"]
    )
    steps = {p: _run("mixtral-8x7b-2xh100-duplex-decode", **{"pim.policy": p}) for p in plans}
    assert steps["co_processing"].step_time_s < min(
        s.step_time_s for s in (steps["attention"], steps["by_batch"])
    )
    r = steps["co_processing"]
    assert r.devices["pim_busy_s"].sum() == pytest.approx(
        steps["attention"].devices["pim_busy_s"].sum()
        + steps["by_batch"].devices["pim_busy_s"].sum()
    )


def test_lru_keeps_what_the_preceding_steps_used():
    """All routed pairs go to expert 3: the preceding steps used only it, so an LRU cache of
    one holds it; a second slot goes to the next by expected load (a tie: expert 0)."""
    from moesim.plan.tiers import _lru_resident

    local = np.ones((2, 8), dtype=bool)
    expected = np.zeros(8)
    expected[3] = 1.0
    load = np.zeros((2, 8), dtype=np.int64)
    load[:, 3] = 5
    one = _lru_resident(local, load, expected, 1, np.random.SeedSequence(0))
    assert one.tolist() == [[e == 3 for e in range(8)]] * 2
    two = _lru_resident(local, load, expected, 2, np.random.SeedSequence(0))
    assert two.tolist() == [[e in (0, 3) for e in range(8)]] * 2


def test_sub_batches_read_the_weights_once_each():
    from moesim.results.energy import gpu_bytes_read

    sc = load_scenario(PAPERS / "gpt3-175b-8xa100-attacc-decode.yaml", {"pim.sub_batches": 2})
    plan = build_plan(sc)
    whole = copy.copy(plan)
    whole.sub_plans = []
    weights = plan.memory_bytes["weights"]
    assert np.allclose(gpu_bytes_read(plan) - gpu_bytes_read(whole), weights)  # one more pass


def test_batch_size_max_counts_the_pim_memory():
    """``workload.batch_size: max`` with attention on PIM: the cache lives on the AttAcc
    devices, so the batch is what they hold (the GPU keeps none of it)."""
    from moesim.plan.batch import batch_size_for
    from moesim.plan.pim_placement import pim_max_batch

    sc = load_scenario(
        PAPERS / "gpt3-175b-8xa100-attacc-decode.yaml", {"workload.batch_size": "max"}
    )
    assert batch_size_for(sc) == pim_max_batch(sc) == 66
    two = load_scenario(
        PAPERS / "gpt3-175b-8xa100-attacc-decode.yaml",
        {"workload.batch_size": "max", "pim.units_per_gpu": 2},
    )
    assert batch_size_for(two) == pim_max_batch(two) == 133
    gpu = load_scenario(
        PAPERS / "gpt3-175b-8xa100-attacc-decode.yaml",
        {"workload.batch_size": "max", "pim.policy": "gpu_only"},
    )
    assert batch_size_for(gpu) < batch_size_for(sc)
