"""Schema and loading of sweep files (``moesim sweep SWEEP.yaml``); running them is
``moesim/studies/sweep.py``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moesim.config.constraints import ConstraintError, parse_constraints
from moesim.config.errors import ScenarioError
from moesim.config.loading import read_mapping, read_yaml, validate
from moesim.config.types import FiniteFloat, InputModel

MAX_SWEEP_POINTS = 100_000
"""Most points (axis combinations x repetitions) a sweep may expand to."""


class Range(InputModel):
    """A continuous axis for random / Latin-hypercube sampling."""

    low: FiniteFloat = Field(description="smallest value")
    high: FiniteFloat = Field(description="largest value")
    log: bool = Field(False, description="sample uniformly in log space (needs low > 0)")
    integer: bool = Field(False, description="round samples to integers")

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.high < self.low:
            raise ValueError(f"high {self.high} is below low {self.low}")
        if self.log and self.low <= 0:
            raise ValueError("log ranges need low > 0")
        return self


class SweepSpec(InputModel):
    """A sweep file."""

    name: str = Field("sweep", description="title of the sweep (summary.md, progress bar)")
    description: str = Field("", description="free text")
    base: str | dict[str, Any] = Field(
        description="scenario file (relative to the sweep file) or an inline scenario"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted-path overrides applied to every point"
    )
    axes: dict[str, list[Any] | Range] = Field(
        min_length=1,
        description="dotted scenario paths, each a list of values or a Range {low, high}",
    )
    mode: Literal["grid", "zip", "random", "lhs"] = Field(
        "grid",
        description="grid: every combination; zip: the i-th values together; random / lhs: "
        "`samples` uniform or Latin-hypercube draws",
    )
    samples: int | None = Field(None, gt=0, description="points for random / lhs")
    constraints: list[str] = Field(
        default_factory=list,
        description="expressions over dotted scenario paths; points where one is false are "
        "skipped, e.g. 'parallelism.ep <= cluster.nodes * cluster.devices_per_node'",
    )
    repetitions: int = Field(1, gt=0, description="runs per point with different seeds")
    seed: int = Field(0, ge=0, description="sweep seed; per-point seeds derive from it")
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

    _constraints = field_validator("constraints")(parse_constraints)

    @property
    def n_points(self) -> int:
        """Points before constraints: combinations (or samples) x repetitions."""
        lengths = [len(v) for v in self.axes.values() if isinstance(v, list)]
        if self.mode == "grid":
            combos = math.prod(lengths)
        elif self.mode == "zip":
            combos = max(lengths, default=0)
        else:
            combos = int(self.samples or 0)
        return combos * self.repetitions


def _check(spec: SweepSpec) -> None:
    if spec.mode in ("random", "lhs") and spec.samples is None:
        raise ScenarioError("samples", f"mode {spec.mode} needs samples")
    if spec.mode in ("grid", "zip") and any(isinstance(v, Range) for v in spec.axes.values()):
        raise ScenarioError("axes", f"mode {spec.mode} needs lists of values, not ranges")
    if spec.mode == "zip" and len({len(v) for v in spec.axes.values()}) > 1:
        raise ScenarioError("axes", "mode zip needs axes of equal length")
    if spec.n_points > MAX_SWEEP_POINTS:
        raise ScenarioError(
            "axes",
            f"too large: {spec.n_points:,} points (limit {MAX_SWEEP_POINTS:,}); "
            "split the sweep or sample it (mode: lhs, samples: N)",
        )


def load_base(path: Path, base: str | dict[str, Any]) -> dict[str, Any]:
    """The base scenario mapping of a sweep or plan file: a file relative to it, or inline."""
    if isinstance(base, dict):
        return dict(base)
    base_path = path.parent / base
    if not base_path.is_file():
        why = "is a directory" if base_path.is_dir() else "not found"
        raise ScenarioError("base", f"scenario file {base} {why}", str(path))
    data = read_yaml(base_path)
    if not isinstance(data, dict):
        raise ScenarioError("", "a scenario must be a YAML mapping", str(base_path))
    return data


def load_sweep(path: str | Path) -> tuple[SweepSpec, dict[str, Any]]:
    """Read a sweep file and its base scenario mapping; raises :class:`ScenarioError`."""
    path = Path(path)
    spec = validate(SweepSpec, read_mapping(path, "sweep"), str(path), "sweep", _check)
    return spec, load_base(path, spec.base)


__all__ = ["MAX_SWEEP_POINTS", "ConstraintError", "Range", "SweepSpec", "load_base", "load_sweep"]
