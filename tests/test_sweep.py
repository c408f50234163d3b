"""Sweeps: grid rows equal single runs, kill + resume loses and repeats nothing, Dask agrees."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
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


def _failing_sweep(tmp_path: Path, devices: list[int]) -> Path:
    # one device cannot hold a 32-layer Mixtral: that point fails at run time
    return _sweep(
        tmp_path,
        axes={"cluster.devices_per_node": devices, "parallelism.ep": devices},
        mode="zip",
        overrides={"model.n_layers": 32, "sim.fidelity": "analytic"},
    )


def test_failures_are_named_and_set_the_exit_code(tmp_path, capsys):
    """Failed points: each named on stderr and in summary.md; exit 1 when any failed, 0 with
    --allow-failures unless every point failed."""
    some = _failing_sweep(tmp_path, [1, 8])
    assert main(["sweep", str(some), "--out", str(tmp_path / "a"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("failed ") and "cluster.devices_per_node=1" in err
    assert "does not fit" in err and len(err.strip().splitlines()) == 1
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "2 points, 1 failed" in summary and "## Failed points" in summary
    assert "does not fit" in summary.split("## Failed points")[1]
    assert not re.search(r"\bnan\b", summary, re.IGNORECASE)  # failed rows: blank cells
    args = ["sweep", str(some), "--out", str(tmp_path / "b"), "-q", "--allow-failures"]
    assert main(args) == 0
    every = _failing_sweep(tmp_path, [1, 1])
    args = ["sweep", str(every), "--out", str(tmp_path / "c"), "-q", "--allow-failures"]
    assert main(args) == 1
    assert "1 points, 1 failed" in (tmp_path / "c" / "summary.md").read_text()


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


GATED_SWEEP = """
import sys
import moesim.studies.sweep as sweep
from moesim.cli import main

real, calls = sweep.run_point, []


def gated(base, overrides):
    # the N+1-th point waits (forever) once the first N are journaled: the test kills it here
    calls.append(1)
    if len(calls) > int(sys.argv[1]):
        print("paused", flush=True)
        sys.stdin.readline()
    return real(base, overrides)


sweep.run_point = gated
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_kill_and_resume_keeps_every_point_exactly_once(tmp_path, sig):
    """The kill lands after exactly N journaled points, however loaded the machine: the sweep
    (in-process, one worker) blocks before its N+1-th point and says so on stdout."""
    n_before = 5
    path = _sweep(
        tmp_path,
        axes={"routing.zipf_s": [round(0.1 * i, 2) for i in range(20)]},
        overrides={"model.n_layers": 4, "sim.fidelity": "analytic"},
    )
    out = tmp_path / "out"
    args = ["sweep", str(path), "--out", str(out), "--workers", "1", "-q", "--format", "csv"]
    proc = subprocess.Popen(
        [sys.executable, "-c", GATED_SWEEP, str(n_before), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "paused", proc.stderr.read()
    assert len(_journal_keys(out)) == n_before
    os.kill(proc.pid, sig)
    # drain both pipes while it exits (a full pipe would block it); the timeout only guards
    # against a hang, however loaded the machine (exiting takes about a second when quiet)
    _, err = proc.communicate(timeout=600)
    assert len(_journal_keys(out)) == n_before, err
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
    before = (out / "points.jsonl").read_text().splitlines()
    cmd = [sys.executable, "-m", "moesim", *args, "--resume"]
    resumed = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr
    keys = _journal_keys(out)
    assert len(keys) == len(set(keys)) == 20  # every point exactly once
    assert (out / "points.jsonl").read_text().splitlines()[:n_before] == before  # not redone
    assert len(pd.read_csv(out / "results.csv")) == 20


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


def test_overrides_apply_to_a_deep_copy():
    """``apply_overrides`` leaves the base mapping as it was (nested mappings and lists are
    copied, a tuple becomes a list as in YAML) and sets dotted paths, a catalog name on the
    way becoming a preset."""
    from moesim.config.scenario import apply_overrides

    base = {"a": {"b": [1, {"c": 2}]}, "model": "mixtral-8x7b", "t": (1, 2)}
    snapshot = {"a": {"b": [1, {"c": 2}]}, "model": "mixtral-8x7b", "t": (1, 2)}
    out = apply_overrides(base, {"a.b": 5, "model.n_layers": 2})
    out["t"].append(3)
    assert base == snapshot
    assert out == {
        "a": {"b": 5},
        "model": {"preset": "mixtral-8x7b", "n_layers": 2},
        "t": [1, 2, 3],
    }
    copy = apply_overrides(base, {})
    copy["a"]["b"][1]["c"] = 9
    assert base["a"]["b"][1]["c"] == 2


BIG_BASE = {**BASE, "cluster": {"nodes": 2, "devices_per_node": 8, "device": "h100-sxm"}}


@pytest.mark.parametrize(
    ("base", "fidelity", "compiled"),
    [(BASE, "des", False), (BIG_BASE, "des", True), (BIG_BASE, "analytic", False)],
)
def test_a_sweep_knows_whether_a_point_runs_the_compiled_kernels(
    base, fidelity, compiled, tmp_path
):
    path = _sweep(tmp_path, base={**base, "sim": {"fidelity": fidelity}})
    spec, b = load_sweep(path)
    assert prepare(spec, b, tmp_path / "out", str(path)).compiled_kernels is compiled


@pytest.mark.parametrize(("base", "quiet"), [(BIG_BASE, False), (BIG_BASE, True), (BASE, False)])
def test_a_sweep_compiles_the_kernels_once_before_its_workers(
    base, quiet, tmp_path, monkeypatch, capsys
):
    """On a cold cache the sweep compiles the kernels itself, before any point runs (and
    says so unless quiet); a sweep of small networks loads none."""
    from moesim.network import fluid
    from moesim.network.fluid import COMPILING

    loads: list[int] = []
    monkeypatch.setattr(fluid, "kernels_cached", lambda: False)
    monkeypatch.setattr(fluid, "warm_up", lambda: loads.append(1))

    def interrupted(run, executor, progress=True):
        assert len(loads) == (1 if base is BIG_BASE else 0)  # before the first point
        raise KeyboardInterrupt

    monkeypatch.setattr("moesim.studies.sweep.execute", interrupted)
    path = _sweep(tmp_path, base={**base, "sim": {"fidelity": "des"}})
    args = ["sweep", str(path), "--out", str(tmp_path / "out")] + (["-q"] if quiet else [])
    assert main(args) == 130
    err = capsys.readouterr().err
    assert (COMPILING in err) == (base is BIG_BASE and not quiet)
    assert len(loads) == (1 if base is BIG_BASE else 0)
