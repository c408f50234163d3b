"""Adversarial input: every shipped scenario, sweep and plan file, mutated at random (wrong types,
missing and unknown keys at every depth, negative / zero / huge / NaN / infinite values, bad file
references), either runs to a finite result or exits 2 with one ``error: FILE: field: reason``
line; never a traceback, a hang or a NaN. Whole-file attacks (binary bytes, deep nesting, alias
bombs, directories) and every reproducer of issue 21 are explicit regression cases.

Each case runs in-process through ``moesim.cli.main`` on a shrunk copy of the file (a few
layers, ``sim.fidelity: analytic``, few points), under a hang detector (SIGALRM; a bound on a
stuck run, not a timing measurement). Hypothesis is derandomized, so the suite draws the same
inputs every time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import re
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim import catalog
from moesim.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
SWEEPS = sorted((ROOT / "scenarios" / "sweeps").glob("*.yaml"))
PLANS = sorted((ROOT / "scenarios" / "plans").glob("*.yaml"))
CORPUS = ROOT / "tests" / "fuzz_corpus"
HANG_S = 90
"""A case still running after this long is a hang (the slowest shrunk case takes ~3 s)."""
TRIED: dict[str, int] = {"scenario": 0, "sweep": 0, "plan": 0, "corpus": 0}

VALUES = [
    "x",
    "",
    [],
    [1, 2],
    {"bogus": 1},
    None,
    True,
    -1,
    -1.5,
    0,
    0.0,
    10**9,
    10**12,
    10**30,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    ".nan",
    "1e999",
    "\x00\x01\x7f",
    "../no-such-file.yaml",
]
PY_EXCEPTION = re.compile(r"^[A-Z]\w*(Error|Exception|Warning)\b")
NON_FINITE = re.compile(r"(?<![\w.])-?(nan|inf|infinity)(?![\w])", re.IGNORECASE)


@pytest.fixture(scope="module", autouse=True)
def _report_count(request):
    """Print how many inputs this module tried, once it is done."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz inputs tried: {TRIED} ({sum(TRIED.values())} in all)")


class Hang(BaseException):
    """Raised by the alarm in a case that runs too long (not an Exception: nothing catches it)."""


@contextlib.contextmanager
def _alarm(seconds: int) -> Iterator[None]:
    def fire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with _alarm(HANG_S), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def _floats(value: Any) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, list):
        for v in value:
            yield from _floats(v)


def check_outcome(rc: int, out: str, err: str, argv: list[str]) -> None:
    """The contract: 0 with finite output, or 2 with one ``error: FILE: field: reason`` line
    (sweeps: 1 when every point failed, each failure named)."""
    assert "Traceback" not in out + err, (argv, err)
    assert "internal:" not in err, (argv, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert lines[0].count(": ") >= 2, (argv, err)
        return
    if rc == 1 and argv[0] == "sweep":
        assert all(line.startswith("failed ") for line in err.strip().splitlines()), (argv, err)
        return
    assert rc == 0, (argv, rc, err)
    if "--json" in argv:
        data = json.loads(out)
        bad = [x for x in _floats(data) if not math.isfinite(x)]
        assert not bad, (argv, bad)
    else:
        assert not NON_FINITE.search(out), (argv, out)


# -- shrinking the shipped files to fast cases ---------------------------------------------------
def _dense_layers(model: Any) -> int:
    name = model if isinstance(model, str) else (model or {}).get("preset")
    if isinstance(name, str):
        return int(catalog.raw("models").get(name, {}).get("n_dense_layers", 0))
    return int((model or {}).get("n_dense_layers", 0)) if isinstance(model, dict) else 0


def shrink_scenario(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A few layers, analytic fidelity, no trace, few requests; file paths made absolute."""
    data = yaml.safe_load(yaml.safe_dump(data))
    model = data.get("model")
    layers = _dense_layers(model) + 2
    if isinstance(model, str):
        data["model"] = {"preset": model, "n_layers": layers}
    elif isinstance(model, dict):
        model["n_layers"] = layers
        if isinstance(model.get("hf_config"), str):
            model["hf_config"] = str((folder / model["hf_config"]).resolve())
    data["sim"] = {**(data.get("sim") or {}), "fidelity": "analytic", "trace": False}
    data["sim"]["progress"] = False
    routing = data.get("routing") or {}
    if isinstance(routing.get("bias_balancing"), dict):
        routing["bias_balancing"]["steps"] = min(routing["bias_balancing"].get("steps", 0), 2)
    if isinstance(routing.get("trace"), str):
        routing["trace"] = str((folder / routing["trace"]).resolve())
    wl = data.get("workload") or {}
    if wl.get("phase") == "serve":
        serve = wl.setdefault("serve", {}) or {}
        serve["n_requests"] = 20
        if isinstance(serve.get("trace"), str):
            serve["trace"] = str((folder / serve["trace"]).resolve())
    return data


def shrink_study(data: dict[str, Any], folder: Path, tmp: Path, kind: str) -> dict[str, Any]:
    """A sweep or plan over a shrunk base, with at most 2 x 2 points and no confirmation."""
    data = yaml.safe_load(yaml.safe_dump(data))
    base = data["base"]
    if isinstance(base, str):
        base = yaml.safe_load((folder / base).read_text())
        base_folder = (folder / data["base"]).parent
    else:
        base_folder = folder
    (tmp / "base.yaml").write_text(yaml.safe_dump(shrink_scenario(base, base_folder)))
    data["base"] = "base.yaml"
    key = "axes" if kind == "sweep" else "candidates"
    for i, (axis, values) in enumerate(list(data[key].items())):
        if isinstance(values, list):
            data[key][axis] = values[: 2 if i < 2 else 1]
    if kind == "sweep":
        data["samples"] = min(data.get("samples") or 2, 2) if data.get("samples") else None
        if data["samples"] is None:
            data.pop("samples")
        data["repetitions"] = 1
    else:
        data["confirm"] = {"top": 0}
    return data


# -- mutations -----------------------------------------------------------------------------------
def node_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys and indices) to a node of nested dicts and lists."""
    out = []
    if isinstance(data, dict):
        items = list(data.items())
    else:
        items = list(enumerate(data)) if isinstance(data, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(node_paths(value, (*prefix, key)))
    return out


def _parent(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutated(draw, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with one to three mutations at random depths."""
    data = yaml.safe_load(yaml.safe_dump(data))
    for _ in range(draw(st.integers(1, 3))):
        paths = node_paths(data)
        op = draw(st.sampled_from(["replace", "replace", "delete", "unknown", "typo"]))
        if not paths:
            op = "unknown"
        if op == "unknown":
            maps = [()] + [p for p in paths if isinstance(_get(data, p), dict)]
            where = _get(data, draw(st.sampled_from(maps)))
            where[draw(st.sampled_from(["bogus_key", "n_layer", "seed_", "__class__"]))] = 1
            continue
        path = draw(st.sampled_from(paths))
        parent, key = _parent(data, path), path[-1]
        if op == "replace":
            parent[key] = copy.deepcopy(draw(st.sampled_from(VALUES)))
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict) and isinstance(key, str) and len(key) > 1:
            parent[key[:-1]] = parent.pop(key)
    return data


def _get(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _case(kind: str, data: dict[str, Any], tmp: Path) -> list[str]:
    path = tmp / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False))
    if kind == "scenario":
        return ["run", str(path), "--json", "-q", "--no-trace", "--set", "sim.fidelity=analytic"]
    extra = ["--allow-failures"] if kind == "sweep" else []
    return [kind, str(path), "--out", str(tmp / "out"), "--workers", "1", "-q", *extra]


def _check_journal(tmp: Path) -> None:
    """Failed sweep points record input problems, never a Python exception."""
    for journal in tmp.glob("out/**/points.jsonl"):
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            assert not PY_EXCEPTION.match(row.get("error") or ""), row["error"]
            if row.get("status") == "ok":
                for col in ("step_time_s", "tokens_per_s"):
                    if isinstance(row.get(col), float):
                        assert math.isfinite(row[col]), row


@given(st.data())
@settings(FUZZ, max_examples=60)
def test_fuzz_scenarios(data):
    source = data.draw(st.sampled_from(SCENARIOS), label="file")
    base = shrink_scenario(yaml.safe_load(source.read_text()), source.parent)
    case = data.draw(mutated(base))
    with tempfile.TemporaryDirectory() as d:
        argv = _case("scenario", case, Path(d))
        check_outcome(*run_cli(argv), argv)
    TRIED["scenario"] += 1


def _fuzz_study(data, kind: str, files: list[Path]) -> None:
    source = data.draw(st.sampled_from(files), label="file")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = shrink_study(yaml.safe_load(source.read_text()), source.parent, tmp, kind)
        argv = _case(kind, data.draw(mutated(base)), tmp)
        check_outcome(*run_cli(argv), argv)
        _check_journal(tmp)
    TRIED[kind] += 1


@given(st.data())
@settings(FUZZ, max_examples=14)
def test_fuzz_sweeps(data):
    _fuzz_study(data, "sweep", SWEEPS)


@given(st.data())
@settings(FUZZ, max_examples=10)
def test_fuzz_plans(data):
    _fuzz_study(data, "plan", PLANS)


# -- the corpus: every reproducer of issue 21, and whole-file attacks ---------------------------
SMALL = {
    "name": "corpus",
    "model": {"preset": "mixtral-8x7b", "n_layers": 2},
    "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
    "parallelism": {"ep": 8},
    "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
    "sim": {"fidelity": "analytic", "trace": False, "progress": False},
}


def _with(**paths: Any) -> dict[str, Any]:
    """SMALL with dotted-path replacements (``model__n_layers=4`` sets model.n_layers)."""
    data = copy.deepcopy(SMALL)
    for dotted, value in paths.items():
        *parents, key = dotted.split("__")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return data


CSV_CASES = {
    "trace-missing": ({"routing": {"distribution": "trace", "trace": "{tmp}/none.csv"}}, None),
    "trace-malformed": (
        {"routing": {"distribution": "trace", "trace": "{tmp}/t.csv"}},
        'layer,token\n"1,2\n',
    ),
    "trace-binary": (
        {"routing": {"distribution": "trace", "trace": "{tmp}/t.csv"}},
        b"\xff\xfe\x00",
    ),
    "trace-huge-token": (
        {"routing": {"distribution": "trace", "trace": "{tmp}/t.csv"}},
        "layer,token,slot,expert\n0,1000000000000,0,1\n",
    ),
    "trace-expert-out-of-range": (
        {"routing": {"distribution": "trace", "trace": "{tmp}/t.csv"}},
        "layer,token,slot,expert\n0,0,0,99\n0,0,1,1\n",
    ),
    "kernel-table-missing": (
        {"cluster": {"device": {"preset": "h100-sxm", "kernel_table": "{tmp}/none.csv"}}},
        None,
    ),
    "kernel-table-malformed": (
        {"cluster": {"device": {"preset": "h100-sxm", "kernel_table": "{tmp}/t.csv"}}},
        "op,m,k\ngemm,x,1\n",
    ),
    "kernel-table-nan": (
        {"cluster": {"device": {"preset": "h100-sxm", "kernel_table": "{tmp}/t.csv"}}},
        "op,m,k,n,dtype,seconds\ngemm,128,4096,4096,bf16,nan\n",
    ),
    "hf-config-missing": ({"model": {"hf_config": "{tmp}/none.json"}}, None),
    "hf-config-binary": ({"model": {"hf_config": "{tmp}/t.csv"}}, b"\x00\xff{"),
    "hf-config-zero-heads": (
        {"model": {"hf_config": "{tmp}/t.csv"}},
        '{"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64, '
        '"num_attention_heads": 0, "intermediate_size": 8, "vocab_size": 10, '
        '"num_local_experts": 4, "num_experts_per_tok": 2}',
    ),
    "base-missing": ({"base": "{tmp}/none.yaml"}, None),
}
"""File references: (scenario fields, contents of {tmp}/t.csv or None)."""

SCENARIO_CASES = {
    "nan-zipf": _with(routing__distribution="zipf", routing__zipf_s=math.nan),
    "inf-hot-weight": _with(routing__distribution="hot", routing__hot_weight=math.inf),
    "nan-string": _with(routing__distribution="zipf", routing__zipf_s=".nan"),
    "1e999": _with(routing__capacity_factor="1e999"),
    "inf-capacity-factor": _with(routing__capacity_factor=1e308),
    "huge-hot-weight": _with(routing__distribution="hot", routing__hot_weight=1e308),
    "huge-zipf": _with(routing__distribution="zipf", routing__zipf_s=1e308),
    "huge-dirichlet": _with(routing__distribution="dirichlet", routing__dirichlet_alpha=1e308),
    "nan-device-peak": _with(
        cluster__device={"preset": "h100-sxm", "memory_bandwidth_bytes_per_s": math.nan}
    ),
    "inf-link": _with(topology__intra_node_link={"preset": "nvlink4", "latency_s": math.inf}),
    "preset-and-name": _with(model={"preset": "mixtral-8x7b", "name": "mine", "n_layers": 2}),
    "preset-not-a-string": _with(model={"preset": [1], "n_layers": 2}),
    "unknown-model": _with(model="mixtrall"),
    "unknown-device": _with(cluster__device="h100"),
    "unknown-key-deep": _with(workload__dtypes__wieghts="bf16"),
    "1e9-devices": _with(cluster__nodes=125_000_000, parallelism__ep=8),
    "1e12-tokens": _with(
        workload__phase="prefill", workload__batch_size=10**6, workload__seq_len=10**6
    ),
    "1e7-layers": _with(model={"preset": "mixtral-8x7b", "n_layers": 10**7}),
    "1e8-experts": _with(model={"preset": "mixtral-8x7b", "n_layers": 2, "n_experts": 10**8}),
    "balancing-steps": _with(routing__bias_balancing={"steps": 10**9}),
    "serve-requests": _with(workload={"phase": "serve", "serve": {"n_requests": 10**9}}),
    "expert-choice-huge-batch": _with(routing__gating="expert_choice", workload__batch_size=10**8),
    "sim-a-list": _with(sim=[]),
    "not-a-mapping": [1, 2, 3],
    "empty": None,
}


TOO_LARGE = {
    "1e7-layers",
    "1e8-experts",
    "balancing-steps",
    "serve-requests",
    "expert-choice-huge-batch",
}
"""Reproducers the size guards refuse (others fail an earlier check: memory, divisibility)."""


def _write(path: Path, content: str | bytes | None) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)


@pytest.mark.parametrize("name", sorted(SCENARIO_CASES))
def test_corpus_scenarios(name, tmp_path):
    """Each reproducer runs to a finite result or exits 2 with one line."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SCENARIO_CASES[name]))
    argv = ["run", str(path), "--json", "-q", "--no-trace"]
    rc, out, err = run_cli(argv)
    check_outcome(rc, out, err, argv)
    expect_ok = name == "preset-and-name"
    assert (rc == 0) == expect_ok, (name, err)
    if name in TOO_LARGE:
        assert "too large" in err, err
    if name.startswith("unknown"):
        assert "did you mean" in err, err
    TRIED["corpus"] += 1


@pytest.mark.parametrize("name", sorted(CSV_CASES))
def test_corpus_file_references(name, tmp_path):
    """Missing, binary or malformed files a scenario names: exit 2, one line naming the field."""
    fields, content = CSV_CASES[name]
    _write(tmp_path / "t.csv", content)
    text = yaml.safe_dump(fields).replace("{tmp}", str(tmp_path))
    if "base" in fields:
        path = tmp_path / "sweep.yaml"
        path.write_text(text + "axes: {parallelism.ep: [8]}\n")
        argv = ["sweep", str(path), "--out", str(tmp_path / "out"), "-q"]
    else:
        data = {**SMALL, **yaml.safe_load(text)}
        if "hf_config" in str(fields):
            data["model"]["n_layers"] = 2
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(data))
        argv = ["run", str(path), "--json", "-q"]
    rc, out, err = run_cli(argv)
    check_outcome(rc, out, err, argv)
    assert rc == 2, err
    TRIED["corpus"] += 1


def _alias_bomb() -> str:
    lines, prev = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'], "a"
    for i in range(1, 10):
        lines.append(f"b{i}: &b{i} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = f"b{i}"
    return "\n".join(lines) + "\n"


WHOLE_FILES = {
    "binary": b"\xff\xfe\x00\x01binary",
    "deep-nesting": "[" * 5000 + "]" * 5000,
    "deep-mapping": "".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "v: 1\n",
    "alias-bomb": _alias_bomb(),
    "bad-yaml": "model: [unclosed\n",
    "tabs": "model:\tx\n",
}


@pytest.mark.parametrize("kind", ["run", "sweep", "plan"])
@pytest.mark.parametrize("name", [*sorted(WHOLE_FILES), "directory", "missing"])
def test_corpus_whole_files(kind, name, tmp_path):
    """Binary bytes, deep nesting, alias bombs, a directory, a missing file: exit 2, one line."""
    path = tmp_path / "in.yaml"
    if name == "directory":
        path.mkdir()
    elif name != "missing":
        _write(path, WHOLE_FILES[name])
    argv = [kind, str(path)] + ([] if kind == "run" else ["--out", str(tmp_path / "o")])
    rc, out, err = run_cli(argv)
    check_outcome(rc, out, err, argv)
    assert rc == 2 and str(path) in err, err
    TRIED["corpus"] += 1


SET_CASES = [
    "model.n_layers=[unclosed",
    "model.n_layers={",
    "model.n_layers=*nope",
    "model.n_layers=&a [*a]",
    "sim.seed=!!python/object/apply:os.system [true]",
    "noequals",
    "=3",
    "model..n_layers=2",
    "model.__class__=1",
    "model.n_layers=.nan",
    "model.n_layers=-1",
    "routing.zipf_s=.inf",
    "workload=[1]",
    "workload.batch_size.x=1",
    "cluster.device=nope",
    "model.n_layers='2'",
    "sim.fidelity=1",
    "model.n_layers=" + "[" * 500,
    "x=1",
    "model.n_layers=1e9",
    "parallelism.ep=0",
    "routing.trace=/dev/null",
    "cluster.nodes=1e999",
    "name=\x00",
    "sim.seed=-5",
]


@pytest.mark.parametrize("item", SET_CASES)
def test_corpus_set_values(item, tmp_path):
    """Bad ``--set`` values: exit 2 with one line naming --set or the field."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    argv = ["run", str(path), "--json", "-q", "--set", item]
    rc, out, err = run_cli(argv)
    check_outcome(rc, out, err, argv)
    TRIED["corpus"] += 1


def _sweep_file(tmp: Path, **fields: Any) -> Path:
    data = {"name": "corpus", "base": SMALL, "axes": {"parallelism.ep": [4, 8]}, **fields}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


CONSTRAINTS = {
    "dunder": "cluster.__class__.__init__.__globals__",
    "huge-power": "2 ** 10 ** 10",
    "nested-power": "((10 ** 64) ** 64) ** 64 > 1",
    "no-field": "nosuchfield > 1",
    "zero-division": "cluster.nodes / 0 > 1",
    "call": "__import__('os').system('true')",
    "lambda": "(lambda: 1)()",
    "syntax": "parallelism.ep <=",
    "type": "cluster.device + 1 > 0",
}


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_corpus_constraints(name, tmp_path):
    """The constraint evaluator refuses dunders, calls and unbounded powers; names a missing
    field; and an arithmetic error is an input error, all exit 2."""
    path = _sweep_file(tmp_path, constraints=[CONSTRAINTS[name]])
    argv = ["sweep", str(path), "--out", str(tmp_path / "out"), "-q"]
    rc, out, err = run_cli(argv)
    check_outcome(rc, out, err, argv)
    assert rc == 2 and "constraint" in err, err
    TRIED["corpus"] += 1


PLAN_CASES = {
    "unknown-target": {"targets": {"tokens_per_second": {"min": 1}}},
    "nan-target": {"targets": {"tokens_per_s": {"min": math.nan}}},
    "empty-target": {"targets": {"tokens_per_s": {}}},
    "unknown-objective": {"objective": "cheapest"},
    "unknown-throughput": {"throughput_metric": "tps"},
    "inf-price": {"prices": {"h100-sxm": math.inf}},
    "unknown-key": {"budgett": {"max_devices": 8}},
    "empty-candidates": {"candidates": {"parallelism.ep": []}},
    "huge-grid": {"candidates": {f"a{i}": list(range(10)) for i in range(6)}},
}


@pytest.mark.parametrize("name", sorted(PLAN_CASES))
def test_corpus_plans(name, tmp_path):
    """Unknown targets, metrics and keys and non-finite numbers in plans: exit 2 naming them."""
    data = {
        "name": "corpus",
        "base": SMALL,
        "candidates": {"parallelism.ep": [8]},
        "targets": {"tokens_per_s": {"min": 1}},
        **PLAN_CASES[name],
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    argv = ["plan", str(path), "--out", str(tmp_path / "out"), "-q"]
    rc, out, err = run_cli(argv)
    check_outcome(rc, out, err, argv)
    assert rc == 2, err
    if name == "unknown-target":
        assert "did you mean 'tokens_per_s'" in err, err
    TRIED["corpus"] += 1


# -- invariants on random valid scenarios ------------------------------------------------------
@st.composite
def valid_scenarios(draw) -> dict[str, Any]:
    """Small valid scenarios on one 8-GPU NVSwitch node: phase, batch, layout, routing policy,
    capacity and engine drawn at random."""
    tp = draw(st.sampled_from([1, 2]))
    phase = draw(st.sampled_from(["prefill", "decode"]))
    routing: dict[str, Any] = {
        "distribution": draw(st.sampled_from(["uniform", "zipf", "dirichlet", "hot"])),
        "zipf_s": draw(st.floats(0.0, 2.0)),
        "drop_priority": draw(st.sampled_from(["position", "choice"])),
    }
    if draw(st.booleans()):
        routing["capacity_factor"] = draw(st.floats(0.25, 2.0))
    return {
        "name": "property",
        "model": {"preset": "mixtral-8x7b", "n_layers": draw(st.integers(1, 3))},
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"tp": tp, "ep": draw(st.sampled_from([1, 2, 4, 8]))},
        "workload": {
            "phase": phase,
            "batch_size": 8 * draw(st.integers(1, 8)),
            "seq_len": draw(st.sampled_from([16, 64, 256])),
        },
        "routing": routing,
        "sim": {
            "fidelity": draw(st.sampled_from(["analytic", "des"])),
            "seed": draw(st.integers(0, 2**16)),
            "progress": False,
        },
    }


@given(valid_scenarios())
@settings(FUZZ, max_examples=15)
def test_invariants(data):
    """Token conservation (kept = tokens x top_k - dropped), bytes conservation (what leaves the
    devices for the switch arrives back at devices; dispatch and combine carry the same bytes),
    the breakdown summing to the step time, and energy non-negative and the sum of its parts."""
    from moesim import scenario_from_dict, simulate

    sc = scenario_from_dict(data)
    result = simulate(sc)
    s, routing = result.summary, result.routing
    pairs = sc.workload.tokens * sc.model.top_k
    kept = result.expert_load.groupby("layer")["tokens"].sum()
    for row in routing.itertuples():
        assert row.routed_pairs == pairs
        assert kept[row.layer] == pairs - row.dropped_pairs
        assert 0 <= row.dropped_pairs <= pairs
    assert s["all_to_all_bytes"] == pytest.approx(2 * routing["dispatch_bytes"].sum())
    links = result.links
    sent = links.loc[links["link"].str.contains("->n0.nvsw"), "bytes_carried"].sum()
    received = links.loc[links["link"].str.startswith("n0.nvsw->"), "bytes_carried"].sum()
    assert sent == pytest.approx(received)
    if sc.parallelism.tp == 1:
        assert sent == pytest.approx(s["all_to_all_bytes"])
    assert sum(s["breakdown_s"].values()) == pytest.approx(s["step_time_s"], rel=1e-9)
    energy = s["energy_j"]
    parts = list(energy["breakdown"].values())
    assert all(p >= 0 for p in parts) and energy["total"] >= 0
    assert sum(parts) == pytest.approx(energy["total"], rel=1e-12)
    assert all(math.isfinite(x) for x in _floats(s))
