"""Hugging Face configs and measured kernel tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moesim import catalog, scenario_from_dict, simulate
from moesim.catalog.specs import ModelSpec
from moesim.cli import main
from moesim.config.hf import load_hf_config
from moesim.cost.ops import OpCost, param_counts
from moesim.cost.roofline import op_time_s

from .conftest import ROOT

HF = ROOT / "tests" / "data" / "hf"
PUBLISHED = {  # total, active; sources in tests/data/hf/SOURCES.md
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "deepseek-v3": (671e9, 37e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "olmoe-1b-7b": (6.9e9, 1.3e9),
    "dbrx": (132e9, 36e9),
    "qwen2-moe-a2.7b": (14.3e9, 2.7e9),
    "llama-3-8b": (8.0e9, 8.0e9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_model_card(name):
    spec = ModelSpec.model_validate(load_hf_config(HF / f"{name}.json"))
    counts = param_counts(spec)
    total, active = PUBLISHED[name]
    assert counts["total"] == pytest.approx(total, rel=0.02)
    assert counts["active"] == pytest.approx(active, rel=0.02)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3"])
def test_catalog_presets_agree_with_their_configs(name):
    from_hf = param_counts(ModelSpec.model_validate(load_hf_config(HF / f"{name}.json")))
    preset = param_counts(catalog.model(name))
    assert preset["total"] == pytest.approx(from_hf["total"], rel=1e-9)
    assert preset["active"] == pytest.approx(from_hf["active"], rel=1e-9)


def test_hf_scenario_simulates_like_the_catalog_model():
    base = {
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"ep": 8},
        "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
        "sim": {"progress": False},
    }
    a = simulate(scenario_from_dict({**base, "model": {"preset": "mixtral-8x7b", "n_layers": 4}}))
    b = simulate(
        scenario_from_dict(
            {**base, "model": {"hf_config": str(HF / "mixtral-8x7b.json"), "n_layers": 4}}
        )
    )
    assert a.step_time_s == b.step_time_s


def _scenario_file(tmp_path, config: dict) -> str:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    path = tmp_path / "s.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"hf_config": "config.json"},
                "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
                "parallelism": {"ep": 8},
                "workload": {"phase": "decode", "batch_size": 8, "seq_len": 64},
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c.update(model_type="gpt_oss"), "model.hf_config.model_type"),
        (lambda c: c.pop("num_local_experts"), "model.hf_config.num_local_experts"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path, capsys, mutate, field):
    config = json.loads((HF / "mixtral-8x7b.json").read_text())
    mutate(config)
    assert main(["run", _scenario_file(tmp_path, config), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{field}:" in err
    if "model_type" in field:
        assert "supported: dbrx, deepseek_v2" in err


def test_model_command_prints_counts(capsys):
    assert main(["model", str(HF / "qwen3-30b-a3b.json")]) == 0
    out = capsys.readouterr().out
    assert "30.53B total, 3.35B active" in out and "KV cache" in out


def _table(tmp_path, rows) -> str:
    path = tmp_path / "kernels.csv"
    pd.DataFrame(rows, columns=["op", "m", "k", "n", "dtype", "seconds"]).to_csv(path, index=False)
    return str(path)


def test_kernel_table_reproduces_measurements_and_interpolates_monotonically(tmp_path):
    rows = [
        ("gemm", m, 4096, 14336, "bf16", s)
        for m, s in [(1, 2e-4), (16, 2.1e-4), (256, 6e-4), (4096, 7e-3)]
    ]
    dev = catalog.device("h100-sxm", kernel_table=_table(tmp_path, rows))

    def gemm(m):
        m = np.asarray(m, dtype=float)
        return OpCost(
            "g",
            2 * m * 4096 * 14336,
            2 * (4096 * 14336 + m * (4096 + 14336)),
            rows=m,
            inner=4096.0,
            gemm=(4096.0, 14336.0),
        )

    measured = op_time_s(dev, gemm([1, 16, 256, 4096]), "bf16")
    np.testing.assert_allclose(measured, [2e-4, 2.1e-4, 6e-4, 7e-3], rtol=1e-12)
    ms = np.geomspace(1, 4096, 200)
    curve = op_time_s(dev, gemm(ms), "bf16")
    assert (np.diff(curve) >= 0).all()
    # outside the measured range, and for other shapes, the roofline
    roof = op_time_s(catalog.device("h100-sxm"), gemm([8192]), "bf16")
    assert op_time_s(dev, gemm([8192]), "bf16") == pytest.approx(roof)
    other = OpCost(
        "g", 2 * 64 * 1024 * 1024, 1e6, rows=np.array(64.0), inner=1024.0, gemm=(1024.0, 1024.0)
    )
    assert op_time_s(dev, other, "bf16") == op_time_s(catalog.device("h100-sxm"), other, "bf16")


def test_summary_reports_the_measured_share(tmp_path):
    # Mixtral decode, 8 tokens per expert on average: measure the expert GEMMs' shapes
    rows = [
        ("gemm", m, k, n, "bf16", s)
        for k, n in ((4096, 14336), (14336, 4096))
        for m, s in ((1, 3e-4), (64, 3.2e-4), (512, 1e-3))
    ]
    dev = {"preset": "h100-sxm", "kernel_table": _table(tmp_path, rows)}
    sc = scenario_from_dict(
        {
            "model": {"preset": "mixtral-8x7b", "n_layers": 2},
            "cluster": {"nodes": 1, "devices_per_node": 8, "device": dev},
            "parallelism": {"ep": 8},
            "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
            "sim": {"progress": False},
        }
    )
    frac = simulate(sc).summary["measured_kernel_fraction"]
    assert 0.05 < frac < 1.0


def test_calibration_writes_a_kernel_table_the_cost_model_uses(tmp_path):
    import yaml

    assert main(["calibrate", "--quick", "--out", str(tmp_path)]) == 0
    devices = yaml.safe_load((tmp_path / "devices.yaml").read_text())
    name, entry = next(iter(devices.items()))
    table = pd.read_csv(entry["kernel_table"])
    assert list(table.columns) == ["op", "m", "k", "n", "dtype", "seconds"]
    row = table.iloc[0]
    from moesim.catalog.specs import GpuSpec

    dev = GpuSpec.model_validate({"name": name, **entry})
    m, k, n = float(row["m"]), float(row["k"]), float(row["n"])
    op = OpCost(
        "g", 2 * m * k * n, 4 * (m * k + k * n + m * n), rows=np.array(m), inner=k, gemm=(k, n)
    )
    assert float(op_time_s(dev, op, "fp32")) == pytest.approx(row["seconds"], rel=1e-12)


def test_shipped_h100_table_is_found_by_name_and_used():
    sc = scenario_from_dict(
        {
            "model": {"preset": "mixtral-8x7b", "n_layers": 2},
            "cluster": {
                "nodes": 1,
                "devices_per_node": 8,
                "device": {"preset": "h100-sxm", "kernel_table": "h100-sxm-bf16.csv"},
            },
            "parallelism": {"ep": 8},
            "workload": {"phase": "decode", "batch_size": 256, "seq_len": 2048},
            "sim": {"progress": False},
        }
    )
    with_table = simulate(sc)
    assert with_table.summary["measured_kernel_fraction"] > 0.3
    # the measured expert GEMMs (weights at ~1.85 TB/s) are slower than the catalog roofline
    roofline = simulate(
        scenario_from_dict(
            {
                **sc.model_dump(mode="json"),
                "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
            }
        )
    )
    assert with_table.summary["breakdown_s"]["experts"] > roofline.summary["breakdown_s"]["experts"]


def test_invalid_json_config_exits_2(tmp_path, capsys):
    path = _scenario_file(tmp_path, {})
    (tmp_path / "config.json").write_text('{"model_type": "mixtral",')
    assert main(["run", path, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.hf_config: " in err and "invalid JSON" in err
