"""Lazy results: tables built on first access equal tables built eagerly from the same run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import moesim
from moesim.engine.analytic import AnalyticEngine
from moesim.engine.des import Engine
from moesim.plan.graph import COMPUTE_PHASES
from moesim.plan.workload import build_plan
from moesim.results.collect import collect, expert_load_table, routing_table
from tests.conftest import ROOT, small_scenario


@pytest.mark.parametrize("engine_cls", [Engine, AnalyticEngine])
def test_lazily_built_tables_equal_eagerly_built_ones(engine_cls):
    sc = small_scenario(**{"routing.distribution": "zipf", "model.n_layers": 3})
    plan = build_plan(sc)
    engine = engine_cls(plan, progress=False).run()
    result = collect(engine)
    assert result.built == ()  # the summary alone builds no table
    summary = result.summary
    assert result.built == ()
    # eager references, with pandas, from the same plan and engine
    pd.testing.assert_frame_equal(result.routing, routing_table(plan))
    pd.testing.assert_frame_equal(result.expert_load, expert_load_table(plan))
    dev, links = result.devices, result.links
    assert set(result.built) == {"devices", "links", "routing", "expert_load"}
    assert result.devices is dev  # built once
    rec, step = engine.rec, summary["step_time_s"]
    for phase in COMPUTE_PHASES:
        if f"{phase}_s" in dev:
            np.testing.assert_array_equal(dev[f"{phase}_s"], rec.phase_s[phase])
    compute = [f"{p}_s" for p in COMPUTE_PHASES if f"{p}_s" in dev]
    np.testing.assert_allclose(dev["compute_busy_s"], dev[compute].sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(dev["utilization"], dev["compute_busy_s"] / step, rtol=1e-12)
    busiest = dev.loc[dev["compute_busy_s"].idxmax()]
    assert summary["busiest_device"]["device"] == busiest["device"]
    assert summary["busiest_device"]["compute_busy_s"] == busiest["compute_busy_s"]
    util = links["bytes_carried"] / (links["bandwidth_bytes_per_s"] * step)
    np.testing.assert_allclose(links["utilization"], util, rtol=1e-12)
    top = links.loc[links["bytes_carried"].idxmax()]
    assert summary["busiest_link"]["link"] == top["link"]
    energy = dev["energy_j"].sum() + links["energy_j"].sum()
    assert summary["energy_j"]["total"] == pytest.approx(energy, rel=1e-12)
    by_kind = links.groupby("kind")["energy_j"].sum()
    for kind, joules in by_kind.items():
        assert summary["energy_j"]["breakdown"][f"links_{kind}"] == pytest.approx(joules, rel=1e-12)
    r = result.routing
    assert summary["routing"]["max_over_mean_load"] == pytest.approx(
        r["max_over_mean_load"].mean(), rel=1e-12
    )
    assert summary["routing"]["drop_rate"] == r["dropped_pairs"].sum() / r["routed_pairs"].sum()


def test_a_summary_needs_no_pandas():
    path = str(ROOT / "scenarios" / "mixtral-8x7b-8xh100-decode.yaml")
    code = (
        "import sys, moesim\n"
        f"sc = moesim.load_scenario({path!r}, {{'model.n_layers': 2, 'sim.progress': False}})\n"
        "r = moesim.simulate(sc)\n"
        "assert r.summary['step_time_s'] > 0\n"
        "print('pandas' in sys.modules, r.built)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == ["False", "()"]


def test_the_summary_says_which_network_kernels_ran(monkeypatch):
    from moesim import simulate
    from moesim.network import fluid

    sc = small_scenario(**{"cluster.nodes": 2})  # 16 devices, two expert groups
    small = small_scenario()
    assert simulate(small).summary["sim"]["network_kernels"] == "numpy"  # under 16 devices
    compiled = simulate(sc)
    if fluid._compiled():
        assert compiled.summary["sim"]["network_kernels"] == "compiled"
    monkeypatch.setattr(fluid, "_KERNELS", {"loaded": True})  # as if numba were missing
    fallback = simulate(sc)
    assert fallback.summary["sim"]["network_kernels"] == "numpy (numba missing)"
    assert any("numba is not installed" in w for w in fallback.summary["warnings"])
    assert fallback.step_time_s == compiled.step_time_s  # the same arithmetic


def _routing_row_reference(lp) -> dict:
    """One MoE layer's routing statistics, computed on its own arrays one by one."""
    per_expert = lp.expert_load.sum(axis=0)
    mean = per_expert.mean()
    held = lp.device_tokens[lp.local_experts > 0]
    experts_s = lp.compute_s["experts"]
    return {
        "max_over_mean_load": float(per_expert.max() / mean) if mean > 0 else 1.0,
        "cv_load": float(per_expert.std() / mean) if mean > 0 else 0.0,
        "device_max_over_mean_load": float(held.max() / held.mean()) if held.mean() > 0 else 1.0,
        "imbalance_s": float(experts_s.max() - experts_s.mean()),
    }


@pytest.mark.parametrize(
    ("path", "over"),
    [
        ("mixtral-8x7b-8xh100-zipf-decode.yaml", {"routing.sampling": "draw"}),
        ("mixtral-8x7b-32xh100-pp4-train.yaml", {}),  # pipeline stages: devices per layer
        ("deepseek-v3-64xh800-decode.yaml", {"sim.fidelity": "analytic"}),
        ("minimax-text-01-64xh100-prefill.yaml", {"routing.replicate_hot": 4}),
    ],
)
def test_routing_rows_match_the_per_layer_statistics(path, over):
    """The routing table's statistics, computed over all layers at once, equal each layer's
    computed from its own arrays."""
    from moesim.plan.workload import build_plan
    from moesim.results.collect import routing_rows

    sc = moesim.load_scenario(f"scenarios/{path}", {**over, "sim.trace": False})
    plan = build_plan(sc)
    rows = routing_rows(plan)
    moe = [lp for lp in plan.layers if lp.moe]
    assert [r["layer"] for r in rows] == [lp.index for lp in moe]
    for row, lp in zip(rows, moe, strict=True):
        want = _routing_row_reference(lp)
        assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-12, abs=1e-15)
