"""Analytic fidelity agrees with the discrete-event engine where it should."""

from __future__ import annotations

import pytest

from moesim import simulate


@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_analytic_within_5_percent_of_des_without_contention(small, phase):
    overrides = {"workload.phase": phase, "workload.batch_size": 64 if phase == "decode" else 8}
    des = simulate(small(**overrides))
    ana = simulate(small(**overrides, **{"sim.fidelity": "analytic"}))
    assert ana.step_time_s == pytest.approx(des.step_time_s, rel=0.05)
    assert ana.summary["sim"]["fidelity"] == "analytic"
    assert sum(ana.summary["breakdown_s"].values()) == pytest.approx(ana.step_time_s)
    # the same plan (the same routing draws, not the analytic default of expected counts)
    # moves the same bytes over the same links
    same = simulate(small(**overrides, **{"sim.fidelity": "analytic", "routing.sampling": "draw"}))
    assert same.links["bytes_carried"].sum() == pytest.approx(des.links["bytes_carried"].sum())


def test_analytic_equals_des_on_one_device(small):
    kw = {
        "cluster.devices_per_node": 1,
        "parallelism.ep": 1,
        "model.n_experts": 2,
        "model.top_k": 1,
        "model.d_ff_expert": 1024,
        "workload.batch_size": 4,
    }
    des = simulate(small(**kw))
    ana = simulate(small(**kw, **{"sim.fidelity": "analytic", "routing.sampling": "draw"}))
    assert ana.step_time_s == pytest.approx(des.step_time_s, rel=1e-12)
