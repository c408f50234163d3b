"""moesim compare: the side-by-side table equals single runs, --set reaches one or all files."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from moesim import load_scenario, simulate
from moesim.cli import main

SCENARIO = {
    "model": {"preset": "mixtral-8x7b", "n_layers": 2},
    "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
    "parallelism": {"ep": 8},
    "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
    "routing": {"distribution": "zipf", "zipf_s": 1.0},
    "sim": {"fidelity": "analytic", "seed": 3},
}


def _write(tmp_path, name, **over):
    data = {**SCENARIO, "name": name, **over}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_compare_table_matches_single_runs_and_writes_a_chart(tmp_path, capsys):
    a = _write(tmp_path, "a")
    b = _write(tmp_path, "b", workload={"phase": "decode", "batch_size": 128, "seq_len": 512})
    out = tmp_path / "out"
    assert (
        main(
            [
                "compare",
                str(a),
                str(b),
                "--set",
                "b.yaml::routing.zipf_s=0",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    table = pd.read_csv(out / "compare.csv", index_col="metric")
    assert list(table.columns) == ["a", "b"]
    single_a = simulate(load_scenario(a)).summary
    single_b = simulate(load_scenario(b, {"routing.zipf_s": 0})).summary
    assert float(table.loc["step_time_s", "a"]) == single_a["step_time_s"]
    assert float(table.loc["step_time_s", "b"]) == single_b["step_time_s"]
    assert float(table.loc["breakdown_s.experts", "b"]) == single_b["breakdown_s"]["experts"]
    assert float(table.loc["tokens", "b"]) == 2 * float(table.loc["tokens", "a"])
    ratio = single_b["tokens_per_s"] / single_a["tokens_per_s"]
    assert f"({ratio:.2f}x)" in capsys.readouterr().out
    assert (out / "compare.png").stat().st_size > 10_000


def test_compare_bad_input_exits_2(tmp_path, capsys):
    a = _write(tmp_path, "a")
    assert main(["compare", str(a), "--out", str(tmp_path / "o")]) == 2
    assert main(["compare", str(a), str(a), "--set", "nope.yaml::sim.seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("error: ") for line in err) and len(err) == 2


@pytest.mark.parametrize("bad", ["workload.batch_size=-1"])
def test_compare_bad_override_names_the_field(tmp_path, capsys, bad):
    a = _write(tmp_path, "a")
    assert main(["compare", str(a), str(a), "--set", bad]) == 2
    assert "workload.batch_size" in capsys.readouterr().err
