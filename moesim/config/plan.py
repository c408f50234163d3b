"""Schema and loading of capacity-plan files (``moesim plan PLAN.yaml``); the search is
``moesim/studies/capacity.py``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from moesim.config.constraints import parse_constraints
from moesim.config.errors import ScenarioError
from moesim.config.loading import did_you_mean, read_mapping, validate
from moesim.config.serve import RateConfig
from moesim.config.sweep import load_base
from moesim.config.types import FiniteFloat, InputModel, NonNegativeFiniteFloat, PositiveFiniteFloat

MAX_PLAN_CANDIDATES = 100_000
"""Most candidate combinations a plan may expand to."""

PLAN_METRICS = (
    "cost_per_hour_usd",
    "cost_per_million_tokens_usd",
    "energy_per_token_j",
    "devices",
    "price_per_device_hour_usd",
    "power_w",
)
"""Metrics the plan derives for every candidate (besides the simulation's summary)."""
SUMMARY_METRICS = (
    "step_time_s",
    "tokens_per_s",
    "tokens",
    "all_to_all_bytes",
    "exposed_comm_s",
    "mfu",
    "measured_kernel_fraction",
    "duration_s",
    "goodput_requests_per_s",
    "instances",
    "devices_per_instance",
    "mean_requests_in_system",
    "offered_rate_per_s",
    "prompt_tokens_per_s",
    "requests",
    "slo_attainment",
    "throughput_requests_per_s",
    "throughput_tokens_per_s",
    *(
        f"{m}_{s}_s"
        for m in ("latency", "max_token_gap", "queue", "tpot", "ttft")
        for s in ("mean", "p50", "p90", "p99")
    ),
)
"""Top-level numeric metrics of a ``moesim run`` summary (forward, training and serving)."""
SUMMARY_GROUPS = (
    "breakdown_s",
    "busiest_device",
    "busiest_link",
    "energy_j",
    "iterations",
    "kv_cache",
    "memory",
    "pim",
    "routing",
    "sim",
    "slo",
    "train",
)
"""Summary blocks whose members are metrics too, as ``block.member`` (``breakdown_s.experts``)."""


def is_known_metric(name: str) -> bool:
    """Whether ``name`` is a metric a plan can target: a summary metric, a ``block.member``
    of a summary block, or one the plan derives."""
    head = name.split(".", 1)
    if len(head) == 2:
        return head[0] in SUMMARY_GROUPS and bool(head[1])
    return name in SUMMARY_METRICS or name in PLAN_METRICS


def _unknown_metric(name: str) -> str:
    return f"unknown metric '{name}'" + did_you_mean(name, (*SUMMARY_METRICS, *PLAN_METRICS))


class Target(InputModel):
    """Bounds on one summary metric: ``min`` (throughput-like) and / or ``max`` (latency-like)."""

    min: FiniteFloat | None = Field(None, description="the metric must be at least this")
    max: FiniteFloat | None = Field(None, description="the metric must be at most this")

    @model_validator(mode="after")
    def _one(self) -> Target:
        if self.min is None and self.max is None:
            raise ValueError("a target needs min, max or both")
        if self.min is not None and self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}")
        return self


class Budget(InputModel):
    """Limits a candidate must respect besides the targets (checked before simulating where the
    number is known then)."""

    max_cost_per_hour_usd: PositiveFiniteFloat | None = Field(
        None, description="USD per hour for every device of the candidate"
    )
    max_devices: int | None = Field(None, gt=0, description="devices paid for")
    max_cost_per_million_tokens_usd: PositiveFiniteFloat | None = Field(
        None, description="USD per million tokens at the candidate's throughput"
    )


class Confirm(InputModel):
    """Re-simulate the best screened candidates at a higher fidelity."""

    fidelity: Literal["des", "analytic"] = Field("des", description="confirmation engine")
    top: int = Field(2, ge=0, description="candidates confirmed per round (0: no confirmation)")
    rounds: int = Field(
        3, ge=1, le=100, description="rounds while the best feasible candidate is unconfirmed"
    )


class Prune(InputModel):
    """Which certain-to-fail candidates are skipped before simulating."""

    memory: bool = Field(True, description="memory lower bound above device capacity")
    bound: bool = Field(True, description="step-time lower bound already misses a target")


Objective = Literal["cost_per_hour_usd", "cost_per_million_tokens_usd", "energy_per_token_j"]


class MaxRateSearch(InputModel):
    """``search: max_rate``: bisection on the arrival rate (``moesim/studies/max_rate.py``)."""

    start_per_s: PositiveFiniteFloat | None = Field(
        None, description="first rate tried (requests/s); default the scenario's rate"
    )
    rel_tol: float = Field(
        0.02, gt=0, lt=1, description="stop when (upper - lower) / lower is at most this"
    )
    max_evaluations: int = Field(40, ge=2, le=1000, description="runs per candidate at most")


class PlanSpec(InputModel):
    """A plan file (``moesim plan PLAN.yaml``)."""

    name: str = Field("plan", description="title of the plan (report, progress bars)")
    description: str = Field("", description="free text, printed at the top of the report")
    base: str | dict[str, Any] = Field(
        description="scenario file (relative to the plan file) or an inline scenario"
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted-path overrides applied to every candidate"
    )
    candidates: dict[str, list[Any]] = Field(
        min_length=1,
        description="dotted scenario paths and the values to try, combined as a grid, e.g. "
        "{cluster.device: [h100-sxm, a100-sxm-80gb], cluster.nodes: [1, 2], "
        "parallelism.ep: [4, 8]}",
    )
    constraints: list[str] = Field(
        default_factory=list, description="sweep-style expressions; false: not a candidate"
    )
    targets: dict[str, Target] = Field(
        min_length=1,
        description="summary metric -> {min, max}, e.g. {tokens_per_s: {min: 20000}, "
        "step_time_s: {max: 0.05}}; also cost_per_million_tokens_usd, energy_per_token_j",
    )
    objective: Objective = Field(
        "cost_per_hour_usd", description="what 'cheapest' minimises among feasible candidates"
    )
    throughput_metric: str = Field(
        "tokens_per_s",
        description="summary metric that is tokens per second (cost per million tokens, "
        "energy per token, Pareto frontier); serving runs may use throughput_tokens_per_s",
    )
    budget: Budget = Field(Budget(), description="cost and device limits")
    prices: dict[str, NonNegativeFiniteFloat] = Field(
        default_factory=dict,
        description="USD per device-hour by device name; overrides moesim/catalog/prices.yaml",
    )
    screen_fidelity: Literal["analytic", "des"] = Field(
        "analytic", description="engine that screens every candidate"
    )
    confirm: Confirm = Field(Confirm(), description="re-simulation of the best candidates")
    prune: Prune = Field(Prune(), description="pruning before simulating")
    report_top: int = Field(5, ge=1, le=100, description="candidates in the breakdown plot")
    seed: int = Field(0, ge=0, description="one seed for every candidate (common random numbers)")
    demand: RateConfig | None = Field(
        None,
        description="serving: the load to serve, {requests_per_s: X} or {tokens_per_s: Y} "
        "(output tokens); sets workload.serve.rate of every candidate, which must then also "
        "be stable (serve all of it)",
    )
    search: Literal["cheapest", "max_rate"] = Field(
        "cheapest",
        description="cheapest: the lowest objective among feasible candidates; max_rate "
        "(serving): each candidate's highest arrival rate that is stable and meets every "
        "target, and the candidate with the highest",
    )
    max_rate: MaxRateSearch = Field(MaxRateSearch(), description="max_rate search options")

    @field_validator("targets")
    @classmethod
    def _metrics(cls, targets: dict[str, Target]) -> dict[str, Target]:
        for metric in targets:
            if not is_known_metric(metric):
                raise ValueError(_unknown_metric(metric))
        return targets

    @field_validator("throughput_metric")
    @classmethod
    def _throughput(cls, metric: str) -> str:
        if not is_known_metric(metric):
            raise ValueError(_unknown_metric(metric))
        return metric

    @field_validator("candidates")
    @classmethod
    def _values(cls, candidates: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for axis, values in candidates.items():
            if not values:
                raise ValueError(f"candidates.{axis}: no values")
        return candidates

    _constraints = field_validator("constraints")(parse_constraints)

    @property
    def n_candidates(self) -> int:
        """Combinations of the candidate values."""
        return math.prod(len(v) for v in self.candidates.values())


def _check(spec: PlanSpec) -> None:
    if spec.n_candidates > MAX_PLAN_CANDIDATES:
        raise ScenarioError(
            "candidates",
            f"too large: {spec.n_candidates:,} candidates (limit {MAX_PLAN_CANDIDATES:,})",
        )


def load_plan(path: str | Path) -> tuple[PlanSpec, dict[str, Any]]:
    """Read a plan file and its base scenario mapping; raises :class:`ScenarioError`."""
    path = Path(path)
    spec = validate(PlanSpec, read_mapping(path, "plan"), str(path), "plan", _check)
    return spec, load_base(path, spec.base)
