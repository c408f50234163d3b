"""Serving (workload.phase: serve): queueing laws, KV-cache memory, scheduler limits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moesim import ScenarioError, catalog, load_scenario, simulate
from moesim.cli import main
from moesim.serving.cost_model import kv_bytes_per_token, state_bytes_per_seq

from .conftest import small_scenario

PROMPT, OUTPUT = 256, 32


def serve_scenario(serve=None, **overrides):
    """Mixtral with 2 layers on one H100 node, constant prompt and output lengths."""
    base = {
        "rate_per_s": 1.0,
        "n_requests": 200,
        "prompt_tokens": {"mean": PROMPT},
        "output_tokens": {"mean": OUTPUT},
        "grid_points": 4,
        "max_batch_size": 64,
        "max_batched_tokens": 4096,
    }
    wl = {"phase": "serve", "serve": {**base, **(serve or {})}}
    return small_scenario(workload=wl, **{"sim.fidelity": "analytic", **overrides})


def one_step_s(sc, phase: str, batch: int, length: int) -> float:
    """An ordinary moesim step of the same model and cluster, simulated on its own."""
    step = sc.model_copy(
        update={
            "workload": sc.workload.model_copy(
                update={"phase": phase, "batch_size": batch, "seq_len": length, "serve": None}
            )
        }
    )
    return simulate(step).step_time_s


def test_low_load_ttft_is_one_prefill_and_tpot_one_decode():
    sc = serve_scenario({"rate_per_s": 0.01, "n_requests": 40})
    req = simulate(sc).requests
    gaps = np.diff(req["arrival_s"])
    assert gaps.min() > req["latency_s"].max(), "requests should not overlap at this rate"
    prefill = one_step_s(sc, "prefill", 1, PROMPT)
    assert np.allclose(req["ttft_s"], prefill, rtol=1e-9)
    assert np.allclose(req["queue_s"], 0.0)
    # every later token is one decode step of batch 1; contexts PROMPT .. PROMPT + OUTPUT - 2
    mid = one_step_s(sc, "decode", 1, PROMPT + (OUTPUT - 2) // 2)
    assert req["tpot_s"].to_numpy() == pytest.approx(mid, rel=0.01)


def test_latency_rises_with_rate_and_throughput_saturates():
    rates = [100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, 12800.0]
    lengths = {
        "n_requests": 1500,
        "prompt_tokens": {"distribution": "uniform", "low": 64, "high": 512},
        "output_tokens": {"distribution": "lognormal", "mean": 32, "high": 256},
    }
    results = [simulate(serve_scenario({"rate_per_s": r, **lengths})) for r in rates]
    runs = [r.summary for r in results]
    for metric in ("ttft", "latency"):
        for q in ("p50", "p90", "p99"):
            values = np.array([s[f"{metric}_{q}_s"] for s in runs])
            # at light load a small eager prefill is dispatch-bound (a kernel costs at least
            # kernel_launch_s, however few tokens it has), so TTFT stays flat within 2% (two
            # prompts on two replicas take the grid at a fractional batch, where the grid's
            # expert imbalance, drawn per step, is not monotone to the last percent)
            assert np.all(np.diff(values) > -0.02 * values[:-1]), (metric, q, values)
            assert values[-1] > 2 * values[0], (metric, q, values)
    assert runs[-1]["ttft_p99_s"] > 100 * runs[0]["ttft_p99_s"]
    outputs = results[0].requests["output_tokens"]  # the same requests at every rate
    offered = np.array(rates) * outputs.mean()
    thr = np.array([s["throughput_tokens_per_s"] for s in runs])
    # light load: everything offered is served (the tail of the last request aside)
    assert thr[0] == pytest.approx(offered[0], rel=0.05)
    # time per output token rises with the batch while the instance keeps up; past
    # saturation prefills arrive batched and it levels off (README: Serving)
    keeps_up = thr > 0.9 * offered
    assert keeps_up.sum() >= 4
    for q in ("p50", "p90", "p99"):
        values = [s[f"tpot_{q}_s"] for s, k in zip(runs, keeps_up, strict=True) if k]
        assert np.all(np.diff(values) > 0), (q, values)
    # overload: doubling the rate no longer buys throughput ...
    assert thr[-1] / thr[-2] < 1.02 and thr[-1] < 0.5 * offered[-1]
    # ... which stays below a full batch decoding back to back at the shortest context
    # (plus the first tokens, which prefills produce)
    full_batch_s = one_step_s(serve_scenario(), "decode", 64, 64)
    assert thr[-1] < 64 / full_batch_s * outputs.mean() / (outputs.mean() - 1)


def test_littles_law_on_the_simulated_queue():
    rate = 400.0
    result = simulate(
        serve_scenario(
            {
                "rate_per_s": rate,
                "n_requests": 3000,
                "prompt_tokens": {"distribution": "uniform", "low": 64, "high": 1024},
                "output_tokens": {"distribution": "lognormal", "mean": 48, "high": 512},
            }
        )
    )
    s, req = result.summary, result.requests
    in_system = s["mean_requests_in_system"]  # time average of the scheduler's own count
    assert in_system > 5, "the test needs a queue"
    assert in_system == pytest.approx(rate * req["latency_s"].mean(), rel=0.05)
    # over the whole run (empty at both ends) the identity is exact
    assert in_system == pytest.approx(req["latency_s"].sum() / s["duration_s"], rel=1e-9)


def hunyuan(kv_share_group: int, tp: int = 8):
    model = {"preset": "hunyuan-large", "n_layers": 4, "kv_share_group": kv_share_group}
    return serve_scenario(
        {"rate_per_s": 200.0, "n_requests": 100},
        model=model,
        **{"parallelism.tp": tp, "parallelism.ep": 8},
    )


def test_hunyuan_cross_layer_kv_sharing_halves_kv_memory():
    shared, unshared = hunyuan(2), hunyuan(1)
    # hand count: 8 KV heads over tp 8 = 1 per device, head_dim 80, bf16, K and V
    per_layer = 2 * 1 * 80 * 2
    assert kv_bytes_per_token(unshared) == 4 * per_layer
    assert kv_bytes_per_token(shared) == 2 * per_layer
    a, b = simulate(shared), simulate(unshared)
    # same schedule (iteration times do not depend on where the cache lives), half the bytes
    assert np.array_equal(a.iterations["end_s"], b.iterations["end_s"])
    assert np.allclose(a.iterations["kv_used_bytes"] * 2, b.iterations["kv_used_bytes"])
    assert a.iterations["kv_used_bytes"].max() > 0
    assert a.summary["kv_cache"]["capacity_tokens"] == pytest.approx(
        2 * b.summary["kv_cache"]["capacity_tokens"]
    )


def test_minimax_linear_attention_state():
    sc = serve_scenario(
        model={"preset": "minimax-text-01", "n_layers": 8},
        **{"parallelism.tp": 8, "parallelism.ep": 8},
    )
    m = catalog.model("minimax-text-01")
    assert m.attention_pattern.count("linear") == 7
    # one softmax layer in 8: K and V of one kv head per device (8 heads / tp 8), bf16
    assert kv_bytes_per_token(sc) == 2 * 1 * 128 * 2
    # seven lightning layers: an fp32 state of (64 / 8) heads x 128 x 128 per sequence
    assert state_bytes_per_seq(sc) == 7 * 8 * 128 * 128 * 4


def test_kv_memory_limits_the_running_batch():
    serve = {
        "rate_per_s": 5000.0,
        "n_requests": 300,
        "max_batch_size": 256,
        "kv_allocation": "reserve",
    }
    probe = simulate(serve_scenario({**serve, "n_requests": 2})).summary["kv_cache"]
    # Mixtral: 8 KV heads x 128 x bf16 x K,V per layer, 2 layers, whole heads on each device
    per_token = 2 * 8 * 128 * 2 * 2
    assert probe["bytes_per_token"] == per_token
    weights = (
        simulate(small_scenario(**{"sim.fidelity": "analytic"})).devices["weights_bytes"].max()
    )
    assert probe["weights_bytes_per_device"] == pytest.approx(weights)
    # usable memory that leaves room for 40.5 requests over the 8 attention replicas
    request_bytes = (PROMPT + OUTPUT) * per_token
    memory = 8e10
    share = (weights + probe["activations_bytes_per_device"] + 40.5 * request_bytes / 8) / memory
    sc = serve_scenario(serve, **{"workload.serve.memory_utilization": share})
    result = simulate(sc)
    kv = result.summary["kv_cache"]
    assert kv["budget_bytes_per_device"] == pytest.approx(40.5 * request_bytes / 8)
    assert result.iterations["running"].max() == 40
    assert result.iterations["kv_utilization"].max() == pytest.approx(40 / 40.5)


def test_on_demand_kv_preempts_and_conserves_tokens():
    serve = {
        "rate_per_s": 5000.0,
        "n_requests": 300,
        "max_batch_size": 256,
        "output_tokens": {"distribution": "uniform", "low": 2, "high": 400},
    }
    probe = simulate(serve_scenario({**serve, "n_requests": 2})).summary["kv_cache"]
    # room for 20 requests of prompt + 200 tokens over the 8 attention replicas
    budget = 20 * (PROMPT + 200) * probe["bytes_per_token"] / 8
    share = (
        probe["weights_bytes_per_device"] + probe["activations_bytes_per_device"] + budget
    ) / 8e10
    tight = {"workload.serve.memory_utilization": share}
    paged = simulate(serve_scenario(serve, **tight))
    reserved = simulate(serve_scenario({**serve, "kv_allocation": "reserve"}, **tight))
    req, it = paged.requests, paged.iterations
    assert req["preemptions"].sum() > 0 and reserved.requests["preemptions"].sum() == 0
    assert it["kv_utilization"].max() <= 1.0
    # every output token is produced once: the first by a prefill, the rest by decode steps,
    # however often a request was preempted and recomputed
    assert it["decode_tokens"].sum() == (req["output_tokens"] - 1).sum()
    assert (it["decode_tokens"] + it["prefill_tokens"] == it["tokens"]).all()
    # recomputation costs prefill work
    assert it["prefill_tokens"].sum() > req["prompt_tokens"].sum()
    assert reserved.iterations["prefill_tokens"].sum() == req["prompt_tokens"].sum()
    # paging packs more requests into the same memory than reserving their full length
    assert (
        paged.summary["iterations"]["mean_decode_batch"]
        > reserved.summary["iterations"]["mean_decode_batch"]
    )


def test_chunked_prefill_pays_one_weight_pass_per_chunk_and_conserves_tokens():
    long_prompt = 4096
    low = {"rate_per_s": 0.01, "n_requests": 5, "prompt_tokens": {"mean": long_prompt}}
    whole = simulate(serve_scenario({**low, "chunked_prefill_tokens": long_prompt}))
    quarters = simulate(serve_scenario({**low, "chunked_prefill_tokens": long_prompt // 4}))
    sc = serve_scenario(low)
    # one chunk holding the whole prompt is one prefill (the weights read once either way)
    prefill = one_step_s(sc, "prefill", 1, long_prompt)
    assert np.allclose(whole.requests["ttft_s"], prefill, rtol=0.01)
    # four chunks: the same prompt work plus three more iterations' weight streaming, which
    # is what a decode step of one sequence costs (to the grid's extrapolation to 0 tokens)
    fixed = one_step_s(sc, "decode", 1, long_prompt)
    extra = quarters.requests["ttft_s"] - whole.requests["ttft_s"]
    assert np.allclose(extra, 3 * fixed, rtol=0.002)
    assert (quarters.iterations["kind"] == "prefill").sum() == 4 * 5
    # under load: mixed iterations, every prompt token prefilled once, every output token
    # decoded once, and no iteration over its token budget
    busy = simulate(
        serve_scenario(
            {
                "rate_per_s": 400.0,
                "n_requests": 300,
                "prompt_tokens": {"distribution": "uniform", "low": 64, "high": 2048},
                "chunked_prefill_tokens": 512,
            }
        )
    )
    it, req = busy.iterations, busy.requests
    assert (it["kind"] == "mixed").sum() > 0
    assert it["prefill_tokens"].sum() == req["prompt_tokens"].sum()
    assert it["decode_tokens"].sum() == (req["output_tokens"] - 1).sum()
    assert it["tokens"].max() <= 512


def test_disaggregated_pools_pay_one_kv_transfer():
    serve = {"rate_per_s": 0.01, "n_requests": 20}
    link = "ib-ndr-400"
    dis = simulate(
        serve_scenario(
            {
                **serve,
                "disaggregated": {
                    "prefill_replicas": 1,
                    "decode_replicas": 1,
                    "kv_transfer_link": link,
                },
            }
        )
    )
    col = simulate(serve_scenario(serve))
    spec = catalog.link(link)
    transfer = PROMPT * 2 * 8 * 128 * 2 * 2 / spec.bandwidth_bytes_per_s + spec.latency_s
    d, c = dis.requests, col.requests
    assert np.allclose(d["ttft_s"], c["ttft_s"])
    assert np.allclose(
        d["done_s"] - d["first_token_s"], c["done_s"] - c["first_token_s"] + transfer
    )
    assert set(d["instance"]) == {0} and set(d["decode_instance"]) == {1}
    assert dis.summary["instances"] == 2


def test_replicas_share_the_load():
    serve = {"rate_per_s": 20000.0, "n_requests": 1000}
    one = simulate(serve_scenario(serve)).summary
    two = simulate(serve_scenario({**serve, "replicas": 2}))
    counts = np.bincount(two.requests["instance"])
    assert len(counts) == 2 and abs(counts[0] - counts[1]) <= 10
    assert two.summary["throughput_tokens_per_s"] > 1.8 * one["throughput_tokens_per_s"]


def test_trace_arrivals_relative_to_scenario(tmp_path):
    (tmp_path / "reqs.csv").write_text(
        "arrival_s,prompt_tokens,output_tokens\n0.5,100,5\n0.0,300,1\n2.0,50,10\n"
    )
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "model: {preset: mixtral-8x7b, n_layers: 2}\n"
        "cluster: {nodes: 1, devices_per_node: 8, device: h100-sxm}\n"
        "parallelism: {ep: 8}\n"
        "workload: {phase: serve, serve: {arrivals: trace, trace: reqs.csv, grid_points: 2}}\n"
        "sim: {progress: false}\n"
    )
    req = simulate(load_scenario(scenario)).requests
    assert list(req["arrival_s"]) == [0.0, 0.5, 2.0]
    assert list(req["output_tokens"]) == [1, 5, 10]
    assert np.isnan(req["tpot_s"][0]) and req["done_s"][0] == req["first_token_s"][0]
    (tmp_path / "reqs.csv").write_text("arrival_s,prompt_tokens\n0.0,10\n")
    with pytest.raises(ScenarioError, match="missing columns"):
        simulate(load_scenario(scenario))


def test_bad_serving_input_is_one_line(tmp_path, capsys):
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "model: {preset: mixtral-8x7b, n_layers: 2}\n"
        "cluster: {nodes: 1, devices_per_node: 8, device: h100-sxm}\n"
        "parallelism: {ep: 8}\n"
        "workload: {phase: serve, serve: {output_tokens: {mean: 50000000}, grid_points: 2}}\n"
    )
    assert main(["run", str(scenario), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: {scenario}: workload.serve: a request of 512 prompt + 50000000 output"
    )
    assert len(err.splitlines()) == 1
    with pytest.raises(ScenarioError, match=r"workload\.batch_size: Field required"):
        small_scenario(workload={"phase": "decode", "seq_len": 16})


def test_run_writes_serving_outputs_and_is_deterministic(tmp_path):
    sc = serve_scenario({"rate_per_s": 300.0, "n_requests": 100})
    assert simulate(sc).requests.equals(simulate(sc).requests)
    path = tmp_path / "s.yaml"
    import yaml

    data = sc.model_dump(mode="json", exclude={"scenario_resolved"})
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    for name in ("summary.json", "requests.csv", "iterations.csv", "step_grid.csv", "kv_cache.png"):
        assert (out / name).exists(), name
    import pandas as pd

    assert len(pd.read_csv(out / "requests.csv")) == 100


def test_sweep_rows_carry_serving_metrics():
    from moesim.studies.sweep import run_point

    base = serve_scenario().model_dump(mode="json")
    row = run_point(base, {"workload.serve.rate_per_s": 50.0, "workload.serve.n_requests": 50})
    assert row["status"] == "ok", row["error"]
    assert row["requests"] == 50 and row["ttft_p50_s"] <= row["ttft_p99_s"]
    assert 0 < row["kv_cache.utilization_max"] <= 1


STEADY_LENGTHS = {
    "prompt_tokens": {"distribution": "uniform", "low": 64, "high": 1024},
    "output_tokens": {"distribution": "lognormal", "mean": 48, "high": 512},
}


def test_littles_law_on_the_steady_window():
    result = simulate(serve_scenario({"rate_per_s": 400.0, "n_requests": 3000, **STEADY_LENGTHS}))
    s, req = result.summary, result.requests
    win = s["steady_window"]
    assert s["stable"], s["unstable_reason"]
    t0, t1 = win["start_s"], win["end_s"]
    assert 0 < t0 < t1 == pytest.approx(req["arrival_s"].max())
    # L: time average over the window from a fine sampling of the requests table
    grid = np.linspace(t0, t1, 20001)
    arrived = np.searchsorted(np.sort(req["arrival_s"]), grid, side="right")
    gone = np.searchsorted(np.sort(req["done_s"]), grid, side="right")
    in_system = float((arrived - gone).mean())
    assert in_system > 5, "the test needs a queue"
    assert win["mean_requests_in_system"] == pytest.approx(in_system, rel=0.01)
    # lambda W over the requests that arrived in the window
    inside = req[(req["arrival_s"] >= t0) & (req["arrival_s"] <= t1)]
    lam = len(inside) / (t1 - t0)
    assert win["requests"] == len(inside)
    assert lam * inside["latency_s"].mean() == pytest.approx(in_system, rel=0.05)
    # a stable run serves what is offered: steady tokens/s within its interval of the arrivals'
    offered = inside["output_tokens"].sum() / (t1 - t0)
    ci = s["throughput_tokens_per_s_ci"]
    assert 0 < ci < 0.1 * offered
    assert abs(s["throughput_tokens_per_s"] - offered) < max(2 * ci, 0.03 * offered)


def overload_scenario(n: int | str = 3000):
    return serve_scenario({"rate_per_s": 12800.0, "n_requests": n, **STEADY_LENGTHS})


def test_overload_is_flagged_unstable_and_throughput_is_the_capacity():
    light = simulate(serve_scenario({"rate_per_s": 400.0, "n_requests": 3000, **STEADY_LENGTHS}))
    heavy = simulate(overload_scenario()).summary
    assert light.summary["stable"] and not heavy["stable"]
    assert "queue grows" in heavy["unstable_reason"]
    # served well below the offered tokens/s: capacity, not demand
    assert heavy["throughput_tokens_per_s"] < 0.5 * heavy["offered_tokens_per_s"]


def test_until_stable_doubles_the_request_count_within_its_bound():
    sc = serve_scenario(
        {
            "rate_per_s": 400.0,
            "n_requests": "until_stable",
            "steady": {"initial_requests": 250, "max_requests": 4000, "ci_tolerance": 0.04},
            **STEADY_LENGTHS,
        }
    )
    s = simulate(sc).summary
    runs = s["until_stable"]["runs"]
    assert runs[0] == 250 and all(b == 2 * a for a, b in itertools.pairwise(runs))
    assert s["requests"] == runs[-1] <= 4000
    if s["until_stable"]["converged"]:
        assert s["stable"] and s["throughput_tokens_per_s_ci"] <= 0.04 * s["tokens_per_s"]
    else:
        assert runs[-1] == 4000
    # an overloaded run never converges: it stops at the bound, flagged
    over = overload_scenario("until_stable")
    over = over.model_copy(
        update={
            "workload": over.workload.model_copy(
                update={
                    "serve": over.workload.serve.model_copy(
                        update={
                            "steady": over.workload.serve.steady.model_copy(
                                update={"initial_requests": 500, "max_requests": 2000}
                            )
                        }
                    )
                }
            )
        }
    )
    o = simulate(over).summary
    assert o["until_stable"] == {"runs": [500, 1000, 2000], "run_count": 3, "converged": False}
    assert not o["stable"]


def test_rate_in_tokens_per_second_uses_the_exact_mean_output():
    from moesim.config.serve import LengthConfig

    out = LengthConfig(distribution="lognormal", mean=256, sigma=1.0, low=1, high=2048)
    exact = out.expected()
    assert exact < 256  # the clip at 2,048 cuts the tail
    draws = out.sample(400_000, np.random.default_rng(1))
    assert exact == pytest.approx(draws.mean(), abs=4 * draws.std() / np.sqrt(len(draws)))
    sc = serve_scenario(
        {
            "rate": {"tokens_per_s": 1000.0},
            "output_tokens": {"distribution": "lognormal", "mean": 256, "high": 2048},
        }
    )
    assert sc.workload.serve.arrival_rate_per_s == pytest.approx(1000.0 / exact)
    with pytest.raises(ScenarioError):
        serve_scenario({"rate": {"tokens_per_s": 1.0, "requests_per_s": 1.0}})


def test_step_grid_is_reused_from_disk_with_identical_results(tmp_path, monkeypatch):
    from moesim.serving import cost_model

    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cost_model, "_STEP_CACHE", {})
    monkeypatch.setattr(cost_model, "_LOADED", set())
    sc = serve_scenario({"rate_per_s": 50.0, "n_requests": 100})
    first = simulate(sc)
    assert len(list(tmp_path.glob("*.json"))) == 1
    # a fresh process: nothing in memory, the steps come from the file
    monkeypatch.setattr(cost_model, "_STEP_CACHE", {})
    monkeypatch.setattr(cost_model, "_LOADED", set())
    second = simulate(sc.model_copy(update={"name": "renamed"}))
    assert second.grid.equals(first.grid)
    assert second.requests.equals(first.requests)
    # another rate shares every grid point (the digest leaves the request stream out)
    faster = serve_scenario({"rate_per_s": 80.0, "n_requests": 100})
    assert cost_model._digest(faster) == cost_model._digest(sc)


def test_max_rate_search_finds_the_md1_saturation_rate():
    from moesim.studies.max_rate import max_rate_search

    # one instance, one request at a time, fixed prompt, one output token (made by the
    # prefill): an M/D/1 queue with service time S = one prefill of PROMPT tokens
    serve = {
        "n_requests": 4000,
        "output_tokens": {"mean": 1},
        "max_batch_size": 1,
        "slo": {"ttft_s": 1e6, "tpot_s": 1e6},
    }
    service_s = one_step_s(serve_scenario(), "prefill", 1, PROMPT)
    saturation = 1.0 / service_s

    def passes(rate):
        s = simulate(serve_scenario({**serve, "rate": {"requests_per_s": rate}})).summary
        return s["stable"], s

    found = max_rate_search(passes, 0.25 * saturation, rel_tol=0.01)
    assert found.converged
    assert found.upper_per_s - found.lower_per_s <= 0.01 * found.lower_per_s
    assert found.lower_per_s == pytest.approx(saturation, rel=0.05)
    # the served rate at the answer is the offered one (stable), below the saturation rate
    assert found.best["throughput_requests_per_s"] <= 1.03 * saturation


def test_prefix_cache_skips_compute_but_not_kv():
    runs = {
        h: simulate(
            serve_scenario({"rate_per_s": 0.01, "n_requests": 20, "prefix_cache_hit_rate": h})
        )
        for h in (0.0, 0.5, 0.9)
    }
    ttft = {h: float(r.requests["ttft_s"].mean()) for h, r in runs.items()}
    assert ttft[0.0] > ttft[0.5] > ttft[0.9]
    # the uncached half still attends to the cached half: no less than a prefill of half a
    # prompt (the step grid interpolates between timed lengths, within 1e-4 here)
    assert ttft[0.5] > one_step_s(serve_scenario(), "prefill", 1, PROMPT // 2) * (1 - 1e-4)
    assert ttft[0.0] == pytest.approx(one_step_s(serve_scenario(), "prefill", 1, PROMPT))
    # cached tokens hold KV like computed ones: the same KV in use, iteration by iteration
    kv = [r.iterations["kv_used_bytes"].to_numpy() for r in runs.values()]
    assert all(np.array_equal(kv[0], k) for k in kv[1:])
    assert (runs[0.5].requests["cached_prompt_tokens"] == PROMPT // 2).all()
    # chunked prefill starts a cached prompt at its first uncached token
    chunked = simulate(
        serve_scenario(
            {
                "rate_per_s": 0.01,
                "n_requests": 20,
                "prefix_cache_hit_rate": 0.5,
                "chunked_prefill_tokens": 512,
            }
        )
    )
    first = chunked.iterations[chunked.iterations["prefill_tokens"] > 0]
    assert (first["prefill_tokens"] == PROMPT // 2).all()


def test_kv_transfers_share_the_link_fairly():
    import simpy

    from moesim.serving.scheduler import SharedLink

    env = simpy.Environment()
    link = SharedLink(env, bandwidth_bytes_per_s=1.0)
    finish = {}

    def send(name, nbytes, at):
        yield env.timeout(at)
        yield link.send(nbytes)
        finish[name] = env.now

    for name, nbytes, at in (("a", 1.0, 0.0), ("b", 2.0, 0.0), ("c", 3.0, 0.0), ("d", 1.0, 6.0)):
        env.process(send(name, nbytes, at))
    env.run()
    # processor sharing: three at 1/3 until a is done (t 3), two at 1/2 until b (t 5), c alone
    assert finish == pytest.approx({"a": 3.0, "b": 5.0, "c": 6.0, "d": 7.0})
    assert link.bytes_moved == 7.0 and link.busy_s == pytest.approx(7.0)


def test_kv_transfer_bandwidth_share_slows_the_hand_off():
    def run(share):
        dis = {"prefill_replicas": 1, "decode_replicas": 1, "kv_transfer_bandwidth_share": share}
        return simulate(
            serve_scenario({"rate_per_s": 0.01, "n_requests": 10, "disaggregated": dis})
        )

    full, quarter = run(1.0).requests, run(0.25).requests
    spec = catalog.link("ib-ndr-400")
    transfer_s = PROMPT * 2 * 8 * 128 * 2 * 2 / spec.bandwidth_bytes_per_s
    gap = (quarter["done_s"] - quarter["first_token_s"]) - (full["done_s"] - full["first_token_s"])
    assert np.allclose(gap, 3 * transfer_s)  # 1 / 0.25 - 1 more transfers' worth


def _trace(tmp_path, rows):
    path = tmp_path / "reqs.csv"
    lines = ["arrival_s,prompt_tokens,output_tokens"] + [f"{a},{p},{o}" for a, p, o in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_replica_packing_is_moot_with_one_attention_replica():
    # tp 8 on 8 GPUs: one attention replica, so both packings give the same run
    runs = [
        simulate(
            serve_scenario(
                {"rate_per_s": 400.0, "replica_packing": packing}, **{"parallelism.tp": 8}
            )
        )
        for packing in ("least_loaded", "round_robin")
    ]
    a, b = (r.requests for r in runs)
    assert a.equals(b)
    it = runs[0].iterations
    assert (it["replica_max_sequences"] == it["sequences"]).all()


def test_round_robin_packing_keeps_identical_requests_within_one():
    # tp 4 on 8 GPUs: two attention replicas; identical requests taken in turn
    res = simulate(
        serve_scenario(
            {"rate_per_s": 300.0, "replica_packing": "round_robin"}, **{"parallelism.tp": 4}
        )
    )
    dec = res.iterations[res.iterations["kind"] == "decode"]
    assert len(dec) and dec["sequences"].max() > 8
    assert (dec["replica_max_sequences"] - dec["replica_min_sequences"] <= 1).all()
    assert (dec["replica_max_sequences"] + dec["replica_min_sequences"] == dec["sequences"]).all()


def test_replicas_serve_every_request_once_within_their_kv():
    from moesim.serving.cost_model import build_cost_model
    from moesim.serving.requests import request_stream
    from moesim.serving.scheduler import ServingSimulation

    def setup(utilization):
        sc = serve_scenario(
            {
                "rate_per_s": 2000.0,
                "n_requests": 150,
                "output_tokens": {"distribution": "uniform", "low": 1, "high": 96},
                "memory_utilization": utilization,
            },
            **{"parallelism.tp": 4},
        )
        req = request_stream(sc)
        lengths = req["prompt_tokens"].to_numpy(), req["output_tokens"].to_numpy()
        return sc, req, build_cost_model(sc, *lengths)

    # a KV pool of about ten requests per replica: admission waits and decodes preempt
    sc, _, costs = setup(0.5)
    fixed = 0.5 * sc.cluster.device.memory_bytes - costs.kv_budget_bytes
    ten = 10 * float(costs.footprint_bytes(PROMPT + 96))
    sc, req, costs = setup((fixed + ten) / sc.cluster.device.memory_bytes)
    sim = ServingSimulation(sc, req, costs).run()
    reps = [rep for inst in sim.front for rep in inst.replicas]
    assert len(reps) == 2 and sim.preemptions.sum() > 0
    assert all(rep.peak_bytes <= rep.capacity_bytes == costs.kv_budget_bytes for rep in reps)
    assert all(rep.used_bytes == pytest.approx(0.0, abs=1e-3) and not rep.seated for rep in reps)
    assert (sim.generated == sim.output).all() and not np.isnan(sim.done_s).any()
    it = pd_iterations(sim)
    # every output token after the first decoded exactly once, recomputes included
    assert it["decode_tokens"].sum() == (sim.output - 1).sum()
    assert (it["replica_max_sequences"] <= -(-sc.workload.serve.max_batch_size // 2)).all()


def pd_iterations(sim):
    from moesim.serving.metrics import collect_serving

    return collect_serving(sim, 0.0).iterations


def test_least_loaded_packing_balances_what_round_robin_does_not(tmp_path):
    # alternating long and short outputs: round robin sends every long one to replica 0
    rows = [(0.0005 * i, PROMPT, 96 if i % 2 == 0 else 4) for i in range(120)]
    trace = _trace(tmp_path, rows)
    imbalance = {}
    for packing in ("round_robin", "least_loaded"):
        it = simulate(
            serve_scenario(
                {"arrivals": "trace", "trace": trace, "replica_packing": packing},
                **{"parallelism.tp": 4},
            )
        ).iterations
        dec = it[it["kind"] == "decode"]
        imbalance[packing] = float((dec["replica_max_sequences"] / (dec["sequences"] / 2)).mean())
    assert 1.0 <= imbalance["least_loaded"] < imbalance["round_robin"]


def test_slowest_replica_sets_the_step():
    from moesim.serving.scheduler import slowest_replica_decode, slowest_replica_prefill

    # even as integers allow: the grid's own even split, unchanged
    assert slowest_replica_decode(np.array([3, 2]), np.array([300.0, 200.0])) == (5, 100.0)
    # uneven: the even split whose busiest replica holds 4 sequences and 400 cached tokens
    assert slowest_replica_decode(np.array([4, 1]), np.array([400.0, 50.0])) == (7, 100.0)
    assert slowest_replica_decode(np.array([1, 0, 0, 0]), np.array([9.0, 0, 0, 0])) == (1, 9.0)
    p = np.full(4, 100.0)
    assert slowest_replica_prefill(p, np.array([0, 1, 2, 3]), 4) == [(4.0, 100.0)] * 4
    assert slowest_replica_prefill(p[:1], np.array([2]), 4) == [(1.0, 100.0)]
    # three on one replica of two, one on the other: the even split of 5 (3 + 2)
    assert slowest_replica_prefill(p, np.array([0, 0, 0, 1]), 2)[0] == (5.0, 100.0)
    # one long prompt beside short ones: one prompt of 400 per replica, 700 tokens in all
    got = slowest_replica_prefill(np.array([400.0, 100, 100, 100]), np.arange(4), 4)
    assert got == [(1.75, 400.0), (7.0, 100.0), (7.0, 100.0), (7.0, 100.0)]


def test_kv_links_share_max_min():
    import simpy

    from moesim.serving.scheduler import SharedLinks

    env = simpy.Environment()
    links = SharedLinks(env, {"out0": 1.0, "out1": 3.0, "in0": 1.0, "in1": 3.0})
    finish = {}

    def send(name, nbytes, route):
        yield links.send(nbytes, route)
        finish[name] = env.now

    # a and b share out0 (1/2 each); c gets what b leaves of in1: 3 - 1/2
    for name, nbytes, route in (
        ("a", 1.0, ("out0", "in0")),
        ("b", 1.0, ("out0", "in1")),
        ("c", 5.0, ("out1", "in1")),
    ):
        env.process(send(name, nbytes, route))
    env.run()
    assert finish == pytest.approx({"a": 2.0, "b": 2.0, "c": 2.0})


def test_kv_transfers_share_the_prefill_replicas_egress(tmp_path):
    # two prompts prefilled together on a one-replica prefill instance (tp 8) leave over the
    # same links for two decode instances: each at half the bandwidth
    trace = _trace(tmp_path, [(0.0, PROMPT, OUTPUT), (0.0, PROMPT, OUTPUT)])
    dis = {"prefill_replicas": 1, "decode_replicas": 2}
    res = simulate(
        serve_scenario(
            {"arrivals": "trace", "trace": trace, "disaggregated": dis}, **{"parallelism.tp": 8}
        )
    )
    spec = catalog.link("ib-ndr-400")
    per_device = PROMPT * 2 * 1 * 128 * 2 * 2  # K and V, 1 of 8 kv heads, 128 dims, bf16, 2 layers
    first = res.iterations[res.iterations["role"] == "decode"].groupby("instance")["start_s"].min()
    prefilled = res.requests["first_token_s"].max()
    expected = prefilled + 2 * per_device / spec.bandwidth_bytes_per_s + spec.latency_s
    assert len(first) == 2 and np.allclose(first, expected, rtol=1e-9)


@pytest.mark.parametrize("utilization", [None, "tight"])
def test_kv_growth_in_one_pass_equals_replica_by_replica(monkeypatch, utilization):
    """On-demand KV growth over 8 attention replicas: the one-pass update (whole bytes per
    token, no replica preempting) gives the tables the replica-by-replica loop gives, with
    room to spare and with a pool so small that decodes preempt (then it falls back)."""
    from moesim.serving.scheduler import ServingSimulation

    serve = {
        "rate_per_s": 4000.0,
        "n_requests": 300,
        "max_batch_size": 256,
        "kv_allocation": "on_demand",
        "output_tokens": {"distribution": "uniform", "low": 2, "high": 200},
    }
    if utilization == "tight":
        probe = simulate(serve_scenario({**serve, "n_requests": 2})).summary["kv_cache"]
        budget = 10 * (PROMPT + 100) * probe["bytes_per_token"]  # per device: one replica
        fixed = probe["weights_bytes_per_device"] + probe["activations_bytes_per_device"]
        serve["memory_utilization"] = (fixed + budget) / 8e10
    sc = serve_scenario(serve)
    one_pass = simulate(sc)
    calls = []

    def per_replica(self, *args):
        calls.append(1)
        return False

    monkeypatch.setattr(ServingSimulation, "_grow_all", per_replica)
    loop = simulate(sc)
    assert calls  # the one-pass path was on the way
    assert one_pass.requests.equals(loop.requests) and one_pass.iterations.equals(loop.iterations)
    preempted = int(one_pass.requests["preemptions"].sum())
    assert (preempted > 0) == (utilization == "tight")
