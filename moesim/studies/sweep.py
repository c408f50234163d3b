"""Parameter sweeps: many scenarios from one base, run on an executor, resumable.

A sweep file names a base scenario and axes (dotted paths into it) combined as a grid, zipped,
or sampled (random / Latin hypercube). Every point is validated before anything runs. Points run
on any ``concurrent.futures`` executor: a local process pool (default), in-process (one
worker), or Dask distributed (``Client(address).get_executor()``, or a ``LocalCluster``).
Each finished point is appended to ``points.jsonl`` at once (the durable journal) and the
results table (``results.parquet`` or ``results.csv``) is rewritten from it, so an interrupted
sweep keeps every finished point and ``--resume`` runs only the rest. Per-point seeds derive
from the sweep seed and the point's values, never from which worker ran it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moesim.config.scenario import (
    ScenarioError,
    _format_validation_error,
    apply_overrides,
    read_yaml,
    scenario_from_dict,
)

JOURNAL = "points.jsonl"
WALL_COLUMNS = ("sim.wall_s",)
"""Columns that measure the host, not the simulated system (they differ between reruns)."""


class Range(BaseModel):
    """A continuous axis for random / Latin-hypercube sampling."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float
    high: float
    log: bool = Field(False, description="sample uniformly in log space")
    integer: bool = Field(False, description="round samples to integers")


class SweepSpec(BaseModel):
    """A sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "sweep"
    description: str = ""
    base: str | dict[str, Any] = Field(
        description="scenario file (relative to the sweep file) or an inline scenario"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted-path overrides applied to every point"
    )
    axes: dict[str, list[Any] | Range] = Field(min_length=1)
    mode: Literal["grid", "zip", "random", "lhs"] = "grid"
    samples: int | None = Field(None, gt=0, description="points for random / lhs")
    constraints: list[str] = Field(
        default_factory=list,
        description="expressions over dotted scenario paths; points where one is false are "
        "skipped, e.g. 'parallelism.ep <= cluster.nodes * cluster.devices_per_node'",
    )
    repetitions: int = Field(1, gt=0, description="runs per point with different seeds")
    seed: int = Field(0, ge=0)
    common_random_numbers: bool = Field(
        False,
        description="every point of a repetition runs on the same seed (the same routing draws "
        "and request stream), so differences between points are the configuration's; false: "
        "each point draws its own seed from its values",
    )

    @field_validator("axes")
    @classmethod
    def _non_empty(cls, axes: dict[str, Any]) -> dict[str, Any]:
        for path, values in axes.items():
            if isinstance(values, list) and not values:
                raise ValueError(f"axis {path} has no values")
        return axes


@dataclass(frozen=True)
class Point:
    """One simulation of the sweep: axis values, repetition and its own seed."""

    index: int
    values: dict[str, Any]
    repetition: int
    seed: int

    @property
    def key(self) -> str:
        """Stable identity for resuming: the values and the repetition."""
        return _digest(self.values, self.repetition).hex()[:16]


def _digest(values: dict[str, Any], repetition: int) -> bytes:
    """SHA-256 of a point's values and repetition (canonical JSON)."""
    blob = json.dumps([values, repetition], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).digest()


# -- loading and expanding --------------------------------------------------------------------
def load_sweep(path: str | Path) -> tuple[SweepSpec, dict[str, Any]]:
    """Read a sweep file and its base scenario mapping; raises :class:`ScenarioError`."""
    path = Path(path)
    data = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        where, reason = _format_validation_error(err)
        raise ScenarioError(where, reason, str(path)) from None
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base).resolve()
        if not base_path.exists():
            raise ScenarioError("base", f"scenario file {spec.base} not found", str(path))
        base = read_yaml(base_path)
    else:
        base = spec.base
    if spec.mode in ("random", "lhs") and spec.samples is None:
        raise ScenarioError("samples", f"mode {spec.mode} needs samples", str(path))
    if spec.mode in ("grid", "zip") and any(isinstance(v, Range) for v in spec.axes.values()):
        raise ScenarioError(
            "axes", f"mode {spec.mode} needs lists of values, not ranges", str(path)
        )
    if spec.mode == "zip" and len({len(v) for v in spec.axes.values()}) > 1:
        raise ScenarioError("axes", "mode zip needs axes of equal length", str(path))
    return spec, base


def _sample(spec: SweepSpec) -> list[dict[str, Any]]:
    """Random or Latin-hypercube samples (McKay et al. 1979): one stratum per sample per axis."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 1]))
    n, names = int(spec.samples or 0), list(spec.axes)
    if spec.mode == "lhs":
        u = np.stack([rng.permutation(n) for _ in names], axis=1) + rng.random((n, len(names)))
        u /= n
    else:
        u = rng.random((n, len(names)))
    points = []
    for row in u:
        values = {}
        for name, q in zip(names, row, strict=True):
            axis = spec.axes[name]
            if isinstance(axis, Range):
                if axis.log:
                    v = math.exp(
                        math.log(axis.low) + q * (math.log(axis.high) - math.log(axis.low))
                    )
                else:
                    v = axis.low + q * (axis.high - axis.low)
                values[name] = round(v) if axis.integer else float(v)
            else:
                values[name] = axis[min(int(q * len(axis)), len(axis) - 1)]
        points.append(values)
    return points


def expand(spec: SweepSpec) -> list[Point]:
    """All points of the sweep (before constraints), each repetition with its own seed."""
    names = list(spec.axes)
    if spec.mode == "grid":
        combos = [
            dict(zip(names, c, strict=True))
            for c in itertools.product(*(spec.axes[n] for n in names))
        ]
    elif spec.mode == "zip":
        combos = [dict(zip(names, c, strict=True)) for c in zip(*spec.axes.values(), strict=True)]
    else:
        combos = _sample(spec)
    points = []
    for values in combos:
        for rep in range(spec.repetitions):
            shared = {} if spec.common_random_numbers else values
            digest = int.from_bytes(_digest(shared, rep)[:8], "little")
            seed = int(np.random.SeedSequence([spec.seed, digest]).generate_state(1)[0])
            points.append(Point(len(points), values, rep, seed))
    return points


# -- constraints ------------------------------------------------------------------------------
_ALLOWED = (
    ast.Expression,
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.Name,
    ast.Attribute,
    ast.Constant,
    ast.Load,
    ast.And,
    ast.Or,
    ast.Not,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.In,
    ast.NotIn,
    ast.Tuple,
    ast.List,
)


class _Tree(dict):
    """Attribute access over nested scenario mappings, for constraint expressions."""

    def __getattr__(self, name: str) -> Any:
        if name not in self:
            raise KeyError(name)
        value = self[name]
        return _Tree(value) if isinstance(value, dict) else value


def check_constraint(expr: str, scenario: dict[str, Any]) -> bool:
    """Evaluate a constraint (arithmetic, comparisons, and/or/not over dotted paths)."""
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ValueError(f"constraint '{expr}': {type(node).__name__} is not allowed")
    namespace = {k: _Tree(v) if isinstance(v, dict) else v for k, v in scenario.items()}
    try:
        return bool(eval(compile(tree, "<constraint>", "eval"), {"__builtins__": {}}, namespace))
    except KeyError as err:
        raise ValueError(f"constraint '{expr}': no field {err.args[0]} in the scenario") from None


# -- running ----------------------------------------------------------------------------------
def point_overrides(spec: SweepSpec, point: Point) -> dict[str, Any]:
    """Overrides that turn the base scenario into this point."""
    over = {**spec.overrides, **point.values}
    over.setdefault("sim.seed", point.seed)
    over["sim.progress"] = False
    return over


def flatten(summary: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar summary metrics as flat dotted columns (the resolved scenario is left out)."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key == "scenario_resolved":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, int | float | str | bool) or value is None:
            out[name] = value
    return out


def run_point(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Simulate one point (runs on a worker); errors become data, not crashes."""
    from moesim.studies.simulate import simulate

    try:
        result = simulate(scenario_from_dict(base, overrides))
        return {"status": "ok", "error": "", **flatten(result.summary)}
    except Exception as err:
        return {"status": "error", "error": f"{type(err).__name__}: {err}"}


@dataclass
class SweepRun:
    """State of a sweep on disk: the points, which are done, and where results go."""

    spec: SweepSpec
    base: dict[str, Any]
    points: list[Point]
    skipped: list[Point]
    out: Path
    fmt: Literal["parquet", "csv"] = "parquet"

    @property
    def journal(self) -> Path:
        return self.out / JOURNAL

    @property
    def results_path(self) -> Path:
        return self.out / f"results.{self.fmt}"

    def done_rows(self) -> list[dict[str, Any]]:
        """Rows already in the journal (a torn last line from a kill is ignored)."""
        if not self.journal.exists():
            return []
        rows = []
        for line in self.journal.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows

    def row(self, point: Point, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "point": point.index,
            "key": point.key,
            "repetition": point.repetition,
            "seed": point_overrides(self.spec, point)["sim.seed"],  # the seed used
            **point.values,
            **metrics,
        }

    def drop_torn_line(self) -> None:
        """Cut a last line that a kill left half-written, so that the next append starts on
        a line of its own (appended to the fragment, that row would be unreadable too)."""
        if not self.journal.exists():
            return
        data = self.journal.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.journal.open("r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def append(self, row: dict[str, Any]) -> None:
        with self.journal.open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_results(self) -> pd.DataFrame:
        """Rewrite the results table from the journal (atomically), sorted by point."""
        df = pd.DataFrame(self.done_rows())
        if len(df):
            df = df.drop_duplicates("key", keep="first").sort_values("point", ignore_index=True)
        tmp = self.results_path.with_suffix(".tmp")
        if self.fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, self.results_path)
        return df


def prepare(
    spec: SweepSpec,
    base: dict[str, Any],
    out: Path,
    file: str,
    fmt: Literal["parquet", "csv"] = "parquet",
) -> SweepRun:
    """Expand, filter by constraints and validate every point; raises :class:`ScenarioError`
    naming the axis path and value of the first invalid point."""
    kept, skipped = [], []
    for point in expand(spec):
        over = point_overrides(spec, point)
        try:
            ok = all(check_constraint(c, apply_overrides(base, over)) for c in spec.constraints)
        except (ValueError, SyntaxError) as err:
            raise ScenarioError("constraints", str(err), file) from None
        if not ok:
            skipped.append(point)
            continue
        try:
            scenario_from_dict(base, over)
        except ScenarioError as err:
            axis = next(
                (a for a in point.values if err.path == a or err.path.startswith(a + ".")), None
            )
            if axis is not None:
                raise ScenarioError(
                    f"axes.{axis}", f"value {point.values[axis]!r}: {err.reason}", file
                ) from None
            raise ScenarioError(err.path, f"{err.reason} (at point {point.values})", file) from None
        kept.append(point)
    return SweepRun(spec, base, kept, skipped, out, fmt)


@contextlib.contextmanager
def make_executor(
    kind: str = "local", workers: int | None = None, address: str | None = None
) -> Iterator[Executor | None]:
    """A ``concurrent.futures`` executor: ``local`` process pool (``workers`` 1: none, run
    in-process), or ``dask`` (an existing scheduler at ``address``, else a LocalCluster)."""
    if kind == "dask":
        from distributed import Client, LocalCluster

        if address:
            with Client(address) as client:
                yield client.get_executor()
        else:
            n = workers or os.cpu_count() or 1
            with (
                LocalCluster(
                    n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
                ) as cluster,
                Client(cluster) as client,
            ):
                yield client.get_executor()
        return
    n = workers or os.cpu_count() or 1
    if n == 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=n) as pool:
        yield pool


def _finished(
    run: SweepRun, todo: list[Point], executor: Executor | None
) -> Iterator[tuple[Point, dict[str, Any]]]:
    """(point, metrics) as points finish: in order in-process, or as the executor completes
    them (pending ones are cancelled if the caller stops early)."""
    if executor is None:
        for point in todo:
            yield point, run_point(run.base, point_overrides(run.spec, point))
        return
    futures: dict[Future, Point] = {
        executor.submit(run_point, run.base, point_overrides(run.spec, p)): p for p in todo
    }
    try:
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
    finally:
        for fut in futures:
            fut.cancel()


def execute(
    run: SweepRun, executor: Executor | None, progress: bool = True, checkpoint_s: float = 2.0
) -> pd.DataFrame:
    """Run the points not yet in the journal; returns the results table."""
    from tqdm import tqdm

    run.out.mkdir(parents=True, exist_ok=True)
    run.drop_torn_line()
    done = {r["key"] for r in run.done_rows()}
    todo = [p for p in run.points if p.key not in done]
    bar = tqdm(
        total=len(run.points),
        initial=len(run.points) - len(todo),
        disable=not progress,
        unit="point",
        desc=run.spec.name,
        dynamic_ncols=True,
    )
    last = time.monotonic()
    try:
        for point, metrics in _finished(run, todo, executor):
            run.append(run.row(point, metrics))
            bar.update()
            if time.monotonic() - last > checkpoint_s:
                run.write_results()
                last = time.monotonic()
    finally:
        bar.close()
        table = run.write_results()
    return table
