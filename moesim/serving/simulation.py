"""Serving (``workload.phase: serve``): a request stream on continuous-batching instances.

Two layers, as in Vidur (Agrawal et al., MLSys 2024):

1. **Iteration times** from the simulator itself. A prefill of ``b`` prompts of ``p`` tokens
   and a decode step of ``B`` sequences at ``L`` cached tokens each are ordinary moesim steps
   (``workload.phase: prefill / decode``); they are timed with the engine on a small grid and
   interpolated (:class:`StepGrid`). A mixed batch maps onto the grid exactly where the step is
   linear in the batch: a decode batch at its mean context (every term of the step that depends
   on context, the KV read and the attention FLOPs, is linear in the sum of contexts); a prefill
   batch at ``p_eff = sum p^2 / sum p`` and ``b_eff = (sum p)^2 / sum p^2``, which keeps both the
   token count ``b p`` (projections, experts) and the causal attention work ``b p^2`` of the
   batch.
2. **A scheduler** per instance in simpy, one event per iteration and one per request arrival
   (never per token): at every iteration boundary, waiting requests are admitted first come
   first served while their KV cache fits and the iteration's prompt-token budget lasts, and
   prefilled together (prefill first, as vLLM's default scheduler); otherwise every running
   request decodes one token. KV grows on demand (preemption and recompute, as vLLM) or is
   reserved for the prompt plus all output tokens at admission (``kv_allocation``).
   KV bytes per token and device come from
   :func:`moesim.cost.ops.kv_cache_bytes_per_token` (GQA heads over tp, MLA latent, cross-layer
   sharing) plus the fixed linear-attention state per sequence; the KV budget per device is
   ``memory_utilization x memory - weights - peak activations``.

Optional disaggregation: prefill instances hand each request's KV to a decode instance over
``kv_transfer_link`` (bytes per device / bandwidth + latency), reserved on the decode side
before the transfer starts.
"""

from __future__ import annotations

import time

from moesim.config.scenario import Scenario
from moesim.serving.cost_model import build_cost_model
from moesim.serving.metrics import ServeResult, collect_serving
from moesim.serving.requests import request_stream
from moesim.serving.scheduler import ServingSimulation

__all__ = ["ServeResult", "simulate_serving"]


def simulate_serving(sc: Scenario, progress: bool | None = None) -> ServeResult:
    """Serve the scenario's request stream; see the module docstring."""
    start = time.perf_counter()
    show = sc.sim.progress if progress is None else progress
    requests = request_stream(sc)
    costs = build_cost_model(
        sc,
        requests["prompt_tokens"].to_numpy(),
        requests["output_tokens"].to_numpy(),
        progress=show,
    )
    serve = sc.workload.serve
    if serve.arrivals == "trace" or serve.n_requests != "until_stable":
        sim = ServingSimulation(sc, requests, costs).run()
        return collect_serving(sim, time.perf_counter() - start)
    n, runs = min(serve.steady.initial_requests, serve.steady.max_requests), []
    while True:  # until_stable: the same stream, doubled (its first n requests each time)
        sim = ServingSimulation(sc, requests.iloc[:n], costs).run()
        result = collect_serving(sim, time.perf_counter() - start)
        s = result.summary
        runs.append(n)
        thr, ci = s["throughput_tokens_per_s"], s["throughput_tokens_per_s_ci"]
        rel = ci / thr if thr > 0 and ci == ci else float("inf")
        if (s["stable"] and rel <= serve.steady.ci_tolerance) or n >= len(requests):
            break
        n = min(2 * n, len(requests))
    s["until_stable"] = {
        "runs": runs,
        "run_count": len(runs),
        "converged": bool(s["stable"] and rel <= serve.steady.ci_tolerance),
    }
    return result
