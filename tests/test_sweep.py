"""Sweeps: grid rows equal single runs, kill + resume loses and repeats nothing, Dask agrees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moesim import scenario_from_dict, simulate
from moesim.cli import main
from moesim.studies.sweep import (
    WALL_COLUMNS,
    execute,
    expand,
    load_sweep,
    make_executor,
    point_overrides,
    prepare,
)

BASE = {
    "name": "sweep-base",
    "model": {"preset": "mixtral-8x7b", "n_layers": 2},
    "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
    "parallelism": {"ep": 8},
    "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
    "routing": {"distribution": "zipf"},
}


def _sweep(tmp_path: Path, **fields) -> Path:
    spec = {
        "name": "t",
        "base": BASE,
        "axes": {"parallelism.ep": [2, 4, 8], "routing.zipf_s": [0.0, 0.7, 1.4]},
        **fields,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _rows(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in WALL_COLUMNS if c in df]).sort_values(
        "point", ignore_index=True
    )


def test_grid_rows_equal_single_runs(tmp_path):
    path = _sweep(tmp_path)
    spec, base = load_sweep(path)
    run = prepare(spec, base, tmp_path / "out", str(path))
    table = execute(run, None, progress=False)
    assert len(table) == 9 and (table["status"] == "ok").all()
    for point in run.points:
        single = simulate(scenario_from_dict(base, point_overrides(spec, point)))
        row = table.loc[table["key"] == point.key].iloc[0]
        assert row["step_time_s"] == single.summary["step_time_s"]
        assert row["routing.max_over_mean_load"] == single.summary["routing"]["max_over_mean_load"]
        assert row["parallelism.ep"] == point.values["parallelism.ep"]


def test_seeds_depend_on_point_not_order(tmp_path):
    spec, _ = load_sweep(_sweep(tmp_path, repetitions=2))
    a = {p.key: p.seed for p in expand(spec)}
    shuffled = spec.model_copy(update={"axes": dict(reversed(list(spec.axes.items())))})
    b = {p.key: p.seed for p in expand(shuffled)}
    assert a == b and len(set(a.values())) == 18


def test_constraints_skip_and_invalid_values_name_the_axis(tmp_path, capsys):
    spec, base = load_sweep(_sweep(tmp_path, constraints=["parallelism.ep >= 4"]))
    run = prepare(spec, base, tmp_path / "o", "f")
    assert len(run.points) == 6 and len(run.skipped) == 3
    bad = _sweep(tmp_path, axes={"parallelism.ep": [2, 3]})
    assert main(["sweep", str(bad), "--out", str(tmp_path / "b"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "axes.parallelism.ep: value 3:" in err


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    # one device cannot hold Mixtral: that point fails at run time, the others finish
    path = _sweep(
        tmp_path,
        axes={"cluster.devices_per_node": [1, 8], "parallelism.ep": [1, 8]},
        mode="zip",
        overrides={"model.n_layers": 32, "sim.fidelity": "analytic"},
    )
    spec, base = load_sweep(path)
    table = execute(prepare(spec, base, tmp_path / "o", str(path)), None, progress=False)
    assert sorted(table["status"]) == ["error", "ok"]
    assert "does not fit" in table.loc[table["status"] == "error", "error"].iloc[0]


def test_latin_hypercube_covers_every_stratum(tmp_path):
    path = _sweep(
        tmp_path,
        mode="lhs",
        samples=10,
        axes={
            "routing.zipf_s": {"low": 0.0, "high": 2.0},
            "workload.batch_size": {"low": 8, "high": 512, "log": True, "integer": True},
        },
    )
    spec, _ = load_sweep(path)
    points = expand(spec)
    strata = sorted(int(p.values["routing.zipf_s"] / 0.2) for p in points)
    assert strata == list(range(10))


def _journal_keys(out: Path) -> list[str]:
    lines = (
        (out / "points.jsonl").read_text().splitlines() if (out / "points.jsonl").exists() else []
    )
    keys = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            keys.append(json.loads(line)["key"])
    return keys


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_kill_and_resume_keeps_every_point_exactly_once(tmp_path, sig):
    path = _sweep(
        tmp_path,
        axes={"routing.zipf_s": [round(0.05 * i, 2) for i in range(40)]},
        overrides={"model.n_layers": 4},
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "moesim",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--workers",
        "1",
        "-q",
        "--format",
        "csv",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(_journal_keys(out)) < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    first = _journal_keys(out)
    assert 5 <= len(first) < 40, "the kill should land mid-way"
    if sig == signal.SIGINT:
        assert proc.returncode == 130
    before = (out / "points.jsonl").read_text().splitlines()[: len(first)]
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    keys = _journal_keys(out)
    assert len(keys) == len(set(keys)) == 40  # every point exactly once
    assert (out / "points.jsonl").read_text().splitlines()[: len(first)] == before  # not redone
    assert len(pd.read_csv(out / "results.csv")) == 40


def test_dask_local_cluster_gives_the_same_rows(tmp_path):
    pytest.importorskip("distributed")
    path = _sweep(tmp_path)
    spec, base = load_sweep(path)
    local = execute(prepare(spec, base, tmp_path / "a", str(path)), None, progress=False)
    with make_executor("dask", workers=2) as ex:
        dask = execute(prepare(spec, base, tmp_path / "b", str(path)), ex, progress=False)
    pd.testing.assert_frame_equal(_rows(local), _rows(dask))


def test_two_hundred_points_on_the_process_pool(tmp_path):
    path = _sweep(
        tmp_path,
        axes={
            "routing.zipf_s": [round(0.01 * i, 2) for i in range(50)],
            "parallelism.ep": [1, 2, 4, 8],
        },
        overrides={"sim.fidelity": "analytic", "model.n_layers": 1, "cluster.devices_per_node": 8},
    )
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2", "-q"]) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert len(table) == 200 and (table["status"] == "ok").all()
    assert (out / "plots" / "step_time_s.png").exists() and (out / "summary.md").exists()


def test_a_torn_last_line_is_cut_before_resuming(tmp_path):
    """A kill can leave the journal's last line half-written; the resumed sweep must not glue
    its next row onto that fragment (which would make that row unreadable and lose it)."""
    path = _sweep(tmp_path)
    spec, base = load_sweep(path)
    run = prepare(spec, base, tmp_path / "out", str(path))
    execute(run, None, progress=False)
    lines = run.journal.read_text().splitlines(keepends=True)
    run.journal.write_text("".join(lines[:6]) + lines[6][:25])  # 6 rows and a torn seventh
    table = execute(run, None, progress=False)
    keys = [r["key"] for r in run.done_rows()]
    assert len(keys) == len(set(keys)) == 9 and len(table) == 9
    assert run.journal.read_text().splitlines(keepends=True)[:6] == lines[:6]
