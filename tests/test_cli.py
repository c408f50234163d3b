"""Command line: bad input exits 2 with one line naming file and field; good input runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moesim.cli import main
from moesim.config.scenario import Scenario

from .conftest import ROOT

GOOD = {
    "model": {"preset": "mixtral-8x7b", "n_layers": 2},
    "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
    "parallelism": {"ep": 8},
    "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
    "sim": {"progress": False},
}


def _write(tmp_path: Path, data, name="s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _bad(tmp_path, capsys, data) -> str:
    path = _write(tmp_path, data)
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}: ")
    return err


def _with(path: str, value):
    data = json.loads(json.dumps(GOOD))
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return data


def test_unknown_key(tmp_path, capsys):
    err = _bad(tmp_path, capsys, _with("cluster.nodez", 2))
    assert "cluster.nodez: unknown key" in err


def test_negative_size(tmp_path, capsys):
    err = _bad(tmp_path, capsys, _with("workload.batch_size", -4))
    assert "workload.batch_size:" in err and "greater than 0" in err


def test_unknown_device(tmp_path, capsys):
    err = _bad(tmp_path, capsys, _with("cluster.device", "h900"))
    assert "cluster.device: unknown device 'h900'" in err and "h100-sxm" in err


def test_model_that_does_not_fit(tmp_path, capsys):
    data = _with("cluster.devices_per_node", 1)
    data["model"] = "mixtral-8x7b"
    data["parallelism"] = {"ep": 1}
    data["workload"]["batch_size"] = 1
    err = _bad(tmp_path, capsys, data)
    assert "cluster.device: model does not fit" in err and "short by" in err


def test_inconsistent_parallelism(tmp_path, capsys):
    err = _bad(tmp_path, capsys, _with("parallelism.ep", 3))
    assert "parallelism.ep:" in err


def test_invalid_yaml_and_missing_file(tmp_path, capsys):
    err = _bad(tmp_path, capsys, "model: [unclosed\n")
    assert "invalid YAML" in err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_bad_input_prints_no_traceback(tmp_path):
    path = _write(tmp_path, _with("routing.zipf_s", -1.0))
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "run", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "routing.zipf_s" in proc.stderr


def test_run_prints_table_and_writes_outputs(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--set", "routing.distribution=zipf"]) == 0
    text = capsys.readouterr().out
    for word in ("step time", "tokens/s", "experts", "busiest device", "busiest link", "max/mean"):
        assert word in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario_resolved"]["routing"]["distribution"] == "zipf"
    assert {p.name for p in out.iterdir()} >= {
        "summary.json",
        "devices.csv",
        "links.csv",
        "trace.json",
    }


def test_run_records_timelines_only_where_out_writes_them(tmp_path, capsys, monkeypatch):
    """Without --out nothing writes trace.json, so the engine records no timelines (the
    scenario it gets has ``sim.trace`` off); the summary it prints is the one --out writes
    with the timelines recorded, all but the run's own timings."""
    import moesim.studies.simulate as simulate_module

    seen = []
    real = simulate_module.simulate

    def spy(scenario, *args, **kwargs):
        seen.append(scenario.sim.trace)
        return real(scenario, *args, **kwargs)

    monkeypatch.setattr(simulate_module, "simulate", spy)
    path = _write(tmp_path, GOOD)
    assert main(["run", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "-q"]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "bare"), "--no-trace", "-q"]) == 0
    assert seen == [False, True, False]

    def slices(folder):
        events = json.loads((folder / "trace.json").read_text())["traceEvents"]
        return sum(e["ph"] == "X" for e in events)

    assert slices(out) > 0 and slices(tmp_path / "bare") == 0
    written = json.loads((out / "summary.json").read_text())
    written.pop("scenario_resolved")
    for summary in (printed, written):
        for key in ("wall_s", "cpu_s"):
            summary["sim"].pop(key, None)
    assert printed == written


def test_catalog_schema_version(capsys):
    assert main(["catalog"]) == 0
    text = capsys.readouterr().out
    for name in ("mixtral-8x7b", "deepseek-v3", "h100-sxm", "mi300x", "ib-ndr-400"):
        assert name in text
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "cluster" in schema["properties"]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


def test_run_help_explains_outputs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "trace.json" in text and "--set" in text and "exits with code 2" in text


def test_readme_commands_name_real_files():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    for token in first_block.split():
        if token.startswith("scenarios/"):
            assert (ROOT / token).exists(), token


def test_a_closed_pipe_is_quiet():
    """``moesim schema | head -1``: the reader closes the pipe; moesim exits 141 with nothing
    on stderr (no BrokenPipeError traceback). The schema is larger than a pipe's buffer
    (64 KiB), so moesim cannot have written all of it before the pipe closes."""
    assert len(json.dumps(Scenario.model_json_schema(), indent=2)) > 1 << 16
    proc = subprocess.Popen(
        [sys.executable, "-m", "moesim", "schema"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_every_command_module_registers_and_explains_its_arguments():
    """One module a command: each in COMMANDS registers itself, and every argument has help."""
    import argparse

    from moesim.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) == len(COMMANDS)
    assert all(callable(c.add_parser) and callable(c.run) for c in COMMANDS)
    for name, parser in sub.choices.items():
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, (name, undocumented)


@pytest.mark.parametrize("kind", ["scenario", "sweep", "plan"])
def test_schema_of_each_file_kind(kind, capsys):
    """``moesim schema KIND`` prints JSON Schema; the sweep and plan models' fields all carry a
    description."""
    assert main(["schema", kind]) == 0
    schema = json.loads(capsys.readouterr().out)
    if kind == "scenario":
        assert {"model", "cluster", "workload"} <= set(schema["properties"])
        return
    from moesim.config import plan, sweep

    models = [sweep.SweepSpec, sweep.Range] if kind == "sweep" else [plan.PlanSpec, plan.Target]
    models += [plan.Budget, plan.Confirm, plan.Prune] if kind == "plan" else []
    for model in models:
        for field, info in model.model_fields.items():
            assert info.description, (kind, model.__name__, field)
    assert ("axes" if kind == "sweep" else "targets") in schema["required"]


@pytest.mark.parametrize("value", [0, -1, 2.5, "lots", True])
def test_bad_worker_count_is_one_line(tmp_path, capsys, value):
    err = _bad(tmp_path, capsys, _with("sim.workers", value))
    assert "sim.workers: 'auto' or a whole number of processes, at least 1" in err
