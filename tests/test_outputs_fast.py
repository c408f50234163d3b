"""The fast output writers give the bytes of their references: the CSVs those of
``DataFrame.to_csv`` and trace.json that of ``json.dumps(chrome_trace(...))``."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from moesim.network.fluid import IntervalLog
from moesim.results import collect
from moesim.results.collect import Result, _Frame, chrome_trace, write_outputs, write_trace
from tests.conftest import ROOT

TRICKY_FLOATS = [0.0, -0.0, 1e-5, 1.5e-4, 1e16, 123456789012345.6, 0.1 + 0.2, np.inf, 2.5]


@pytest.mark.parametrize(
    "data",
    [
        {  # columns: arrays of each kind, strings that need quoting, NaN
            "name": ["a", "b,c", 'say "hi"', "x y", "", "z", "n\nl", "q", "r"],
            "f": np.array(TRICKY_FLOATS),
            "nan": np.array([np.nan, 1.0, 2, 3, 4, 5, 6, 7, 8]),
            "i": np.arange(9, dtype=np.int64) - 4,
            "i32": np.arange(9, dtype=np.int32),
            "b": np.arange(9) % 2 == 0,
            "f32": np.linspace(0, 1, 9, dtype=np.float32),
        },
        [  # rows with Python numbers, None in float and in empty columns, ints then a float
            {"layer": k, "x": 0.1 * k, "none": None, "mix": k if k else 0.5, "maybe": None or k}
            for k in range(5)
        ]
        + [{"layer": 9, "x": None, "none": None, "mix": 3, "maybe": None}],
    ],
)
def test_csv_is_the_bytes_of_pandas(data, tmp_path):
    ours, ref = tmp_path / "ours.csv", tmp_path / "ref.csv"
    assert _Frame(data).write_csv(ours)
    pd.DataFrame(data).to_csv(ref, index=False)
    assert ours.read_bytes() == ref.read_bytes()


def test_csv_refuses_columns_it_does_not_know(tmp_path):
    for data in (
        {"obj": [1, "a"]},  # mixed: pandas keeps objects
        {"big": [2**63, 1]},
        {"scalar": 3},
        {"a": np.zeros(2), "b": np.zeros(3)},
        [],
        [{"a": 1}, {"b": 2}],
    ):
        assert not _Frame(data).write_csv(tmp_path / "x.csv")
        assert not (tmp_path / "x.csv").exists()


def _result(n_slices: int, seed: int) -> tuple[Result, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    t = np.round(rng.random(n_slices), 3)  # repeated instants, as in a real trace
    phases = ["attention", "dispatch", "experts", "combine", "tp_comm"]
    slices = [
        (int(rng.integers(4)), phases[k % 5], float(t[k]), float(t[k] + rng.random()), k % 7)
        for k in range(n_slices)
    ]
    slices[0] = (0, "attention", 0, 1.0, 0)  # an int start, as env.now is at time 0
    pim = [(1, "experts", 0.25, 0.5, 3), (3, "experts", 0.5, 0.625, 2)]
    links = [(int(rng.integers(6)), float(t[k]), float(t[(k + 1) % n_slices])) for k in range(50)]
    links.append((2, 0.5, 0.5))  # empty: left out
    result = Result({}, None, None, None, slices=slices, link_intervals=links, pim_slices=pim)
    return result, [f"link{k}" for k in range(6)], [f"gpu{k}" for k in range(4)]


def _formatter(compiled: bool, monkeypatch) -> list:
    """Rows written by the compiled formatter (numba loaded, from one row) or by ``repr``;
    the formatters handed out, to check which one ran."""
    if compiled:
        pytest.importorskip("numba")
        import moesim.results._trace_jit  # noqa: F401  (numba loaded, as the network loads it)
    monkeypatch.setattr(collect, "TRACE_COMPILED_MIN_ROWS", 1 if compiled else 1 << 62)
    used: list = []
    real = collect._trace_kernel

    def spy():
        kernel = real()
        used.append(kernel)
        return kernel

    monkeypatch.setattr(collect, "_trace_kernel", spy)
    return used


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_trace_is_the_bytes_of_json_dumps(seed, compiled, tmp_path, monkeypatch):
    used = _formatter(compiled, monkeypatch)
    result, link_names, device_names = _result(500, seed)
    write_trace(tmp_path / "trace.json", result, link_names, device_names)
    expected = json.dumps(chrome_trace(result, link_names, device_names))
    assert (tmp_path / "trace.json").read_text() == expected
    assert all(k is not None for k in used) if compiled else not used
    assert used or not compiled


TRICKY_TIMES_S = [
    0.0, 1e-9, 2.5e-9, 3.5e-9, 1.5e-6, 1e-3, 0.1 + 0.2, 123.456789012, 4.0000005e-6,
    999.9999995, 1e6, 86_400.123456789,
]  # fmt: skip
"""Slice ends: zero, a nanosecond, halves (rounded to even), whole microseconds (``.0``),
fractions with trailing zeros, a day."""


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("odd", [None, -0.0, 2.0**53 / 1e9, np.inf])
def test_trace_bytes_on_tricky_times(compiled, odd, tmp_path, monkeypatch):
    """The formatter writes every time as ``json.dumps`` does, and leaves a trace holding a
    time it cannot write (-0.0, 2^53 ns or more, inf) to ``repr``."""
    used = _formatter(compiled, monkeypatch)
    times = sorted(TRICKY_TIMES_S)
    slices = [(0, "experts", a, b, 1) for a, b in itertools.product(times, times) if b >= a]
    if odd is not None:
        slices.append((1, "attention", odd, odd if np.isinf(odd) else odd + 1.0, 2))
    result = Result({}, None, None, None, slices=slices)
    write_trace(tmp_path / "trace.json", result, [], ["gpu0", "gpu1"])
    expected = json.dumps(chrome_trace(result, [], ["gpu0", "gpu1"]))
    assert (tmp_path / "trace.json").read_text() == expected
    assert len(used) == (1 if compiled else 0)


def test_empty_trace_is_the_bytes_of_json_dumps(tmp_path):
    result = Result({}, None, None, None)
    write_trace(tmp_path / "trace.json", result, [], ["gpu0"])
    assert (tmp_path / "trace.json").read_text() == json.dumps(chrome_trace(result, [], ["gpu0"]))


def test_outputs_need_no_pandas_and_equal_pandas_tables(tmp_path):
    path = str(ROOT / "scenarios" / "mixtral-8x7b-8xh100-decode.yaml")
    code = (
        "import sys, moesim\n"
        "from moesim.results.collect import write_outputs\n"
        f"sc = moesim.load_scenario({path!r}, {{'model.n_layers': 2, 'sim.progress': False}})\n"
        "r = moesim.simulate(sc)\n"
        f"write_outputs(r, {str(tmp_path / 'fast')!r})\n"
        "print('pandas' in sys.modules, r.built)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == ["False", "()"]
    import moesim

    sc = moesim.load_scenario(path, {"model.n_layers": 2, "sim.progress": False})
    result = moesim.simulate(sc)
    for name in Result.TABLES:  # pandas' own CSVs of the same run
        getattr(result, name).to_csv(tmp_path / f"{name}.csv", index=False)
        assert (tmp_path / "fast" / f"{name}.csv").read_bytes() == (
            tmp_path / f"{name}.csv"
        ).read_bytes(), name
    write_outputs(result, tmp_path / "built")  # built tables: written by pandas, same bytes
    for name in Result.TABLES:
        assert (tmp_path / "built" / f"{name}.csv").read_bytes() == (
            tmp_path / f"{name}.csv"
        ).read_bytes(), name


def test_trace_times_are_the_nearest_nanoseconds(tmp_path):
    """``ts`` and ``dur`` are microseconds to the nanosecond: each slice's start and end
    within half a nanosecond of its times, and a slice that starts where another ends starts
    where that one's ``ts + dur`` puts its end (the rounded ends, not durations)."""
    rng = np.random.default_rng(3)
    edges = np.cumsum(rng.exponential(3.7e-6, 200))  # back-to-back slices on one device
    slices = [(0, "experts", float(a), float(b), 0) for a, b in itertools.pairwise(edges)]
    result = Result({}, None, None, None, slices=slices)
    write_trace(tmp_path / "trace.json", result, [], ["gpu0"])
    events = [e for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]]
    xs = [e for e in events if e["ph"] == "X"]
    assert len(xs) == len(slices)
    start_ns = np.array([e["ts"] * 1e3 for e in xs])
    end_ns = np.array([(e["ts"] + e["dur"]) * 1e3 for e in xs])
    assert np.allclose(start_ns, np.round(start_ns), rtol=0, atol=1e-6)  # whole nanoseconds
    assert np.all(np.abs(start_ns - edges[:-1] * 1e9) <= 0.5 + 1e-6)
    assert np.all(np.abs(end_ns - edges[1:] * 1e9) <= 0.5 + 1e-6)
    assert np.array_equal(np.round(end_ns[:-1]), np.round(start_ns[1:]))  # still back to back


def test_interval_log_keeps_the_intervals_in_order():
    """Chunks added at once (one end for all, or one each) iterate back as the tuples, in
    order, with int links and float times; logs compare by their intervals."""
    log = IntervalLog()
    log.add(np.array([3, 1]), np.array([0.0, 0.5]), 1)  # an int end, as env.now at 0
    log.add(np.zeros(0, dtype=np.int64), np.zeros(0), 2.0)  # nothing
    log.add(np.array([2]), np.array([1.5]), np.array([2.25]))
    expected = [(3, 0.0, 1.0), (1, 0.5, 1.0), (2, 1.5, 2.25)]
    assert len(log) == 3 and list(log) == expected and log == expected
    assert [type(v) for v in next(iter(log))] == [int, float, float]
    assert log == IntervalLog.of(expected) and log != IntervalLog.of(expected[:2])
    assert list(IntervalLog()) == [] and IntervalLog() == IntervalLog.of([])
