"""Schema of ``workload.serve``: the request stream, the scheduler and the latency targets.

Kept apart from ``scenario.py`` (which embeds it as ``WorkloadConfig.serve``) so the serving
options read as one block; ``moesim/serving.py`` runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from moesim import catalog
from moesim.catalog.specs import LinkSpec


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthConfig(_Config):
    """Token counts of prompts or outputs: ``{mean: 512}`` is a constant; ``uniform`` draws
    integers in ``[low, high]``; ``lognormal`` has the given ``mean`` and log-space ``sigma``
    (mu = ln(mean) - sigma^2 / 2), clipped to ``[low, high]``."""

    distribution: Literal["constant", "uniform", "lognormal"] = "constant"
    mean: PositiveInt | None = Field(None, description="constant value, or lognormal mean")
    sigma: PositiveFloat = Field(1.0, description="lognormal: standard deviation of ln(tokens)")
    low: PositiveInt = Field(1, description="smallest value (uniform, lognormal clip)")
    high: PositiveInt | None = Field(None, description="largest value (uniform, lognormal clip)")

    @model_validator(mode="after")
    def _check(self) -> LengthConfig:
        if self.distribution in ("constant", "lognormal") and self.mean is None:
            raise ValueError(f"{self.distribution} lengths need a mean")
        if self.distribution == "uniform" and self.high is None:
            raise ValueError("uniform lengths need high (and low, default 1)")
        if self.high is not None and self.high < self.low:
            raise ValueError("high must be >= low")
        return self

    @property
    def bounds(self) -> tuple[int, int]:
        """Smallest and largest value a draw can take."""
        if self.distribution == "constant":
            return int(self.mean), int(self.mean)
        if self.distribution == "uniform":
            return self.low, int(self.high)
        # lognormal: clipped to high, or to 20 x the mean (P(> 20 x mean) < 1e-3 for sigma <= 1.5)
        return self.low, int(self.high or 20 * self.mean)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` integer lengths."""
        lo, hi = self.bounds
        if self.distribution == "constant":
            return np.full(n, lo, dtype=np.int64)
        if self.distribution == "uniform":
            return rng.integers(lo, hi + 1, size=n)
        mu = np.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, size=n)), lo, hi).astype(np.int64)


class SloConfig(_Config):
    """Latency targets: a request is good when both hold (goodput counts good requests)."""

    ttft_s: PositiveFloat = Field(2.0, description="time to first token, arrival to first token")
    tpot_s: PositiveFloat = Field(
        0.1, description="time per output token after the first: (done - first) / (outputs - 1)"
    )


class DisaggregatedConfig(_Config):
    """Separate prefill and decode pools (Splitwise, DistServe): prefill instances hand each
    request's KV cache to a decode instance over ``kv_transfer_link``, one link per device
    (device i of one instance to device i of the other)."""

    prefill_replicas: PositiveInt = Field(1, description="instances that only run prefills")
    decode_replicas: PositiveInt = Field(1, description="instances that only run decodes")
    kv_transfer_link: LinkSpec = Field("ib-ndr-400", validate_default=True)

    @field_validator("kv_transfer_link", mode="before")
    @classmethod
    def _link(cls, value: Any) -> Any:
        if isinstance(value, str):
            return catalog.lookup("links", value)
        if isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            return catalog.lookup("links", value["preset"], **rest)
        return value


class ServeConfig(_Config):
    """A request stream served by ``replicas`` copies of the scenario's cluster, each running
    continuous batching (Orca, vLLM): at every iteration boundary, waiting requests whose KV
    cache fits are prefilled (prefill first), otherwise every running request decodes one token."""

    arrivals: Literal["poisson", "trace"] = Field(
        "poisson", description="poisson (rate_per_s, n_requests, length distributions) or trace"
    )
    rate_per_s: PositiveFloat = Field(1.0, description="poisson: mean arrivals per second")
    n_requests: PositiveInt = Field(1000, description="poisson: requests simulated")
    prompt_tokens: LengthConfig = LengthConfig(mean=512)
    output_tokens: LengthConfig = LengthConfig(mean=128)
    trace: str | None = Field(
        None,
        description="trace: CSV with columns arrival_s, prompt_tokens, output_tokens; "
        "relative paths are relative to the scenario file",
    )
    replicas: PositiveInt = Field(
        1,
        description="identical instances (data-parallel replicas) of the cluster, each with "
        "its own batch and KV cache; a request joins one of them (router)",
    )
    router: Literal["least_loaded", "round_robin"] = Field(
        "least_loaded",
        description="which instance a request joins: least_loaded (fewest requests queued, "
        "running or in transfer) or round_robin (request r to instance r mod replicas); the "
        "same rule sends prefilled requests to decode pools",
    )
    max_batch_size: PositiveInt = Field(
        256, description="running sequences per instance (vLLM max_num_seqs)"
    )
    max_batched_tokens: PositiveInt = Field(
        8192,
        description="prompt tokens per prefill iteration (vLLM max_num_batched_tokens); a "
        "longer prompt runs alone",
    )
    chunked_prefill_tokens: PositiveInt | None = Field(
        None,
        description="chunked prefill (Sarathi-Serve): tokens per iteration, every running "
        "request's decode token plus prompt chunks filling the rest; null: whole prompts in "
        "prefill-only iterations (colocated instances only)",
    )
    memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of device memory for weights, activations and KV cache (vLLM "
        "gpu_memory_utilization default 0.9); the KV cache gets what weights and peak "
        "activations leave",
    )
    kv_allocation: Literal["on_demand", "reserve"] = Field(
        "on_demand",
        description="on_demand (vLLM paged attention): KV grows token by token; a request is "
        "admitted when its prompt and the next decode step of every running request fit, and "
        "when a decode step does not fit the newest running requests are preempted and later "
        "recomputed; reserve: prompt plus all output tokens reserved at admission, never "
        "preempted (as if output lengths were known; decode instances of disaggregated pools "
        "always reserve)",
    )
    slo: SloConfig = SloConfig()
    disaggregated: DisaggregatedConfig | None = Field(
        None, description="separate prefill and decode pools (replicas is then ignored)"
    )
    step_fidelity: Literal["analytic", "des"] = Field(
        "analytic",
        description="engine that times the grid of prefill and decode iterations the scheduler "
        "interpolates (see README Serving)",
    )
    grid_points: int = Field(
        8, ge=2, le=32, description="points per length axis of the iteration-time grid"
    )

    @property
    def instances(self) -> int:
        """Copies of the cluster this stream runs on (prefill plus decode pools if split)."""
        dis = self.disaggregated
        return dis.prefill_replicas + dis.decode_replicas if dis else self.replicas

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.arrivals == "trace":
            if self.trace is None:
                raise ValueError("arrivals: trace needs a trace file")
            if not Path(self.trace).exists():
                raise ValueError(f"trace file {self.trace!r} not found")
        return self
