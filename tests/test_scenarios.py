"""Every shipped scenario validates and runs: small ones in full, large ones with fewer layers."""

from __future__ import annotations

import pytest

from moesim import load_scenario, simulate

from .conftest import SCENARIOS

LARGE_DEVICE_LAYERS = 8 * 32 * 2  # devices x layers above this run with fewer layers


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_runs(path):
    sc = load_scenario(path)
    assert sc.name == path.stem, "scenario name should match its file name"
    overrides = {"sim.progress": False}
    if sc.workload.phase == "serve":
        _check_serve(path, sc, overrides)
        return
    if sc.cluster.n_devices * sc.model.n_layers > LARGE_DEVICE_LAYERS:
        overrides["model.n_layers"] = sc.model.n_dense_layers + 1 + (sc.model.n_dense_layers == 0)
        overrides["sim.network_tolerance"] = 0.01
        overrides["sim.trace"] = False
    if sc.workload.phase == "train":  # every layer runs forward, backward, per micro-batch
        overrides["model.n_layers"] = sc.model.n_dense_layers + 2
    pp = sc.parallelism.pp
    if pp > 1 and "model.n_layers" in overrides:  # fewer layers, still a layer per stage
        overrides["model.n_layers"] = pp * -(-overrides["model.n_layers"] // pp)
        overrides["parallelism.pp_layers"] = None
    result = simulate(load_scenario(path, overrides))
    s = result.summary
    assert s["step_time_s"] > 0 and s["tokens_per_s"] > 0
    assert sum(s["breakdown_s"].values()) == pytest.approx(s["step_time_s"], rel=1e-6)
    assert s["memory"]["max_used_bytes"] <= s["memory"]["capacity_bytes"]


def _check_serve(path, sc, overrides):
    """Serving scenarios: a short stream on a model cut to one attention pattern period."""
    overrides.update(
        {
            "workload.serve.n_requests": 12,
            "workload.serve.grid_points": 2,
            "model.n_layers": len(sc.model.attention_pattern),
        }
    )
    s = simulate(load_scenario(path, overrides)).summary
    assert s["requests"] == 12 and s["throughput_tokens_per_s"] > 0
    assert 0 <= s["ttft_p50_s"] <= s["ttft_p99_s"] <= s["latency_p99_s"]
    assert 0 < s["kv_cache"]["utilization_max"] <= 1
