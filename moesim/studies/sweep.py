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

from moesim.config.constraints import ConstraintError, check_constraint
from moesim.config.scenario import ScenarioError, apply_overrides, scenario_from_dict
from moesim.config.sweep import Range, SweepSpec
from moesim.config.sweep import load_sweep as load_sweep  # re-exported
from moesim.plan.limits import check_size

JOURNAL = "points.jsonl"
WALL_COLUMNS = ("sim.wall_s",)
"""Columns that measure the host, not the simulated system (they differ between reruns)."""


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


# -- expanding --------------------------------------------------------------------------------
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
    except ScenarioError as err:
        return {"status": "error", "error": str(err)}
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
    compiled_kernels: bool = False  # a point runs the compiled network kernels

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
    """Expand, filter by constraints and validate every point (schema and size limits);
    raises :class:`ScenarioError` naming the axis path and value of the first invalid point."""
    kept, skipped = [], []
    compiled = False
    for point in expand(spec):
        over = point_overrides(spec, point)
        try:
            ok = all(check_constraint(c, apply_overrides(base, over)) for c in spec.constraints)
        except ConstraintError as err:
            raise ScenarioError("constraints", str(err), file) from None
        if not ok:
            skipped.append(point)
            continue
        try:
            sc = scenario_from_dict(base, over)
            check_size(sc)
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
        compiled = compiled or uses_compiled_kernels(sc)
    return SweepRun(spec, base, kept, skipped, out, fmt, compiled)


def uses_compiled_kernels(sc) -> bool:
    """Whether a run of ``sc`` uses the network's compiled kernels: discrete-event, not
    serving, on at least ``COMPILED_MIN_DEVICES`` devices."""
    from moesim.network.fluid import COMPILED_MIN_DEVICES

    des = sc.sim.fidelity == "des" and sc.workload.phase != "serve"
    return des and sc.cluster.n_devices >= COMPILED_MIN_DEVICES


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
    with ProcessPoolExecutor(max_workers=n, initializer=_one_process_a_point) as pool:
        yield pool


def _one_process_a_point() -> None:
    """A sweep worker runs a point's independent parts in itself (the sweep already runs a
    point per CPU: forking more would oversubscribe them)."""
    from moesim.engine.parts import FORK_ALLOWED

    FORK_ALLOWED["parts"] = False


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
