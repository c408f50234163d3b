"""Schema of ``workload.serve``: the request stream, the scheduler and the latency targets.

Kept apart from ``scenario.py`` (which embeds it as ``WorkloadConfig.serve``) so the serving
options read as one block; ``moesim/serving/`` runs them.
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

    def expected(self) -> float:
        """The exact mean of :meth:`sample`: for lognormal, the mean of the rounded and clipped
        draw, ``sum_k k P(k - 1/2 < X < k + 1/2)`` with the clipped tails at ``low`` and
        ``high`` (not the configured ``mean``, which is that of the unclipped ``X``)."""
        lo, hi = self.bounds
        if self.distribution != "lognormal":
            return (lo + hi) / 2.0
        mu = np.log(self.mean) - self.sigma**2 / 2
        k = np.arange(lo, hi + 1, dtype=float)
        upper = np.append(k[:-1] + 0.5, np.inf)
        lower = np.insert(k[1:] - 0.5, 0, 0.0)
        with np.errstate(divide="ignore"):
            z_hi = (np.log(upper) - mu) / self.sigma
            z_lo = (np.log(lower) - mu) / self.sigma
        from scipy import special

        p = special.ndtr(z_hi) - special.ndtr(z_lo)
        return float((k * p).sum() / p.sum())

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` integer lengths."""
        lo, hi = self.bounds
        if self.distribution == "constant":
            return np.full(n, lo, dtype=np.int64)
        if self.distribution == "uniform":
            return rng.integers(lo, hi + 1, size=n)
        mu = np.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, size=n)), lo, hi).astype(np.int64)


class SteadyConfig(_Config):
    """How the steady window, its interval and the stability verdict are taken (see
    ``moesim/serving/steady.py``), and how far ``n_requests: until_stable`` grows a run."""

    warmup_fraction: float = Field(
        0.2, ge=0, lt=1, description="share of requests, by arrival, excluded as warm-up"
    )
    batches: int = Field(
        10, ge=2, le=100, description="batch means over the steady window (95% interval)"
    )
    growth_tolerance: float = Field(
        0.1,
        gt=0,
        description="relative rise of requests in system or TTFT from the third to the last "
        "quarter of the window above which (and above 3 standard errors) a run is unstable",
    )
    ci_tolerance: float = Field(
        0.05,
        gt=0,
        description="until_stable: stop when the 95% half-width of the steady tokens/s is at "
        "most this share of it (and the run is stable)",
    )
    initial_requests: PositiveInt = Field(1000, description="until_stable: the first run")
    max_requests: PositiveInt = Field(
        16000, description="until_stable: the request count is doubled up to this bound"
    )


class RateConfig(_Config):
    """An arrival rate in requests per second or in output tokens per second (converted with
    the exact mean of the output-length distribution, :meth:`LengthConfig.expected`)."""

    requests_per_s: PositiveFloat | None = None
    tokens_per_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one(self) -> RateConfig:
        if (self.requests_per_s is None) == (self.tokens_per_s is None):
            raise ValueError("give exactly one of requests_per_s, tokens_per_s")
        return self


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
    kv_transfer_bandwidth_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of each kv_transfer_link's bandwidth the KV transfers get, the "
        "rest taken by other traffic on the same links (say the decode pool's own expert "
        "all-to-all over the same NICs); concurrent transfers into one decode instance share "
        "what is left equally",
    )

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
    rate: RateConfig | None = Field(
        None,
        description="poisson: {requests_per_s: X} or {tokens_per_s: Y} (output tokens, divided "
        "by the exact mean output length); replaces rate_per_s when given",
    )
    n_requests: int | str = Field(
        1000,
        description="poisson: requests simulated; until_stable doubles the count from "
        "steady.initial_requests until the run is stable and its steady tokens/s interval is "
        "within steady.ci_tolerance, at most steady.max_requests",
    )
    steady: SteadyConfig = SteadyConfig()
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
    replica_packing: Literal["least_loaded", "round_robin"] = Field(
        "least_loaded",
        description="which attention data-parallel replica of an instance an admitted request "
        "joins (its KV cache and decode batch stay there): least_loaded (the fewest KV bytes "
        "in use among replicas with a free seat) or round_robin (replicas in turn; admission "
        "waits while that one is full)",
    )
    max_batch_size: PositiveInt = Field(
        256,
        description="running sequences per instance (vLLM max_num_seqs), ceil(max_batch_size "
        "/ dp) per attention replica",
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
    prefix_cache_hit_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of each prompt's leading tokens found in the prefix cache (vLLM "
        "automatic prefix caching, SGLang RadixAttention): they skip prefill compute (the new "
        "tokens still attend to them) but occupy the request's KV cache like any other token",
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

    @field_validator("n_requests", mode="before")
    @classmethod
    def _n_requests(cls, value: Any) -> int | str:
        """A positive integer or ``until_stable`` (one message, not one per union member)."""
        if value == "until_stable":
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("Input should be a positive integer or 'until_stable'")
        if value <= 0:
            raise ValueError("Input should be greater than 0")
        return value

    @property
    def arrival_rate_per_s(self) -> float:
        """Poisson arrivals per second: ``rate`` converted, else ``rate_per_s``."""
        if self.rate is None:
            return float(self.rate_per_s)
        if self.rate.requests_per_s is not None:
            return float(self.rate.requests_per_s)
        return float(self.rate.tokens_per_s) / self.output_tokens.expected()

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
