"""The request stream of a serving scenario: Poisson arrivals with drawn lengths, or a trace."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moesim.config.scenario import Scenario, ScenarioError
from moesim.config.serve import ServeConfig


def request_stream(sc: Scenario, n: int | None = None) -> pd.DataFrame:
    """Requests sorted by arrival: ``arrival_s``, ``prompt_tokens``, ``output_tokens``.

    Poisson: ``n`` requests (default ``n_requests``; ``until_stable``: ``steady.max_requests``),
    exponential gaps of mean ``1 / rate`` (:attr:`ServeConfig.arrival_rate_per_s`). Gaps,
    prompt and output lengths come from three streams of ``sim.seed``, and the gaps are unit
    exponentials divided by the rate, so two rates see the same requests, compressed in time
    (common random numbers).
    """
    serve: ServeConfig = sc.workload.serve
    if serve.arrivals == "trace":
        return _read_trace(serve.trace)
    seed = np.random.SeedSequence(sc.sim.seed, spawn_key=(0x5E7E,))
    gaps, prompt, output = (np.random.default_rng(s) for s in seed.spawn(3))
    if n is None:
        n = serve.n_requests
        if n == "until_stable":
            n = serve.steady.max_requests
    return pd.DataFrame(
        {
            "arrival_s": np.cumsum(gaps.exponential(1.0, n)) / serve.arrival_rate_per_s,
            "prompt_tokens": serve.prompt_tokens.sample(n, prompt),
            "output_tokens": serve.output_tokens.sample(n, output),
        }
    )


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def _read_trace(path: str) -> pd.DataFrame:
    where = "workload.serve.trace"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ScenarioError(where, f"cannot read {path}: {err}") from None
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ScenarioError(where, f"{path}: missing columns {missing}; need {list(TRACE_COLUMNS)}")
    df = df[list(TRACE_COLUMNS)]
    if not len(df):
        raise ScenarioError(where, f"{path}: no requests")
    numeric = df.apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any():
        raise ScenarioError(where, f"{path}: non-numeric or empty values")
    if (numeric["arrival_s"] < 0).any():
        raise ScenarioError(where, f"{path}: negative arrival_s")
    if (numeric[["prompt_tokens", "output_tokens"]] < 1).any().any():
        raise ScenarioError(where, f"{path}: prompt_tokens and output_tokens must be >= 1")
    numeric = numeric.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    return numeric.astype({"prompt_tokens": np.int64, "output_tokens": np.int64})
