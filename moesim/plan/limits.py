"""Size guards: estimate what building a scenario's plan will allocate, and refuse it beyond
documented limits before anything is allocated (an absurd size is an error naming the
estimate, not a memory blow-up or a run that never ends).

The estimates are upper-bound style counts from the scenario's sizes alone (no routing):

- ``kernel_events = layers x devices x passes`` (passes: 3 per micro-batch in training, for
  forward, backward and recompute; 1 otherwise), the DES events of the compute timeline;
- ``flows_per_collective = devices x (devices - 1)``, the device-pair flows of one all-to-all
  before aggregation;
- ``count_bytes = moe_layers x devices x experts x 8 B x 8``: the int64 per-(device, expert)
  count arrays each MoE layer keeps (routed, kept, dropped, arriving, ...: 8 of them at most);
- ``routing_bytes = tokens x experts x 8 B x 3`` when routing needs per-token scores
  (logits, Gumbel noise, the top-k selection; ``tokens x top_k`` for a trace), else 0;
- ``balancing_work = bias_balancing.steps x moe_layers x elements``, the routing work of the
  training steps simulated before this one (elements: ``tokens x experts`` with per-token
  scores, else ``devices x experts``);
- ``requests`` of a serving run (one record each).
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.scenario import Scenario, ScenarioError

MAX_KERNEL_EVENTS = 50_000_000
"""Most (layer, device, pass) kernel events a run may have."""
MAX_FLOWS_PER_COLLECTIVE = 2**24
"""Most device-pair flows one collective may have (about 4,096 devices)."""
MAX_PLAN_BYTES = 8 * 2**30
"""Most bytes the routing and count arrays of a plan may take (8 GiB)."""
MAX_BALANCING_WORK = 2 * 10**10
"""Most (step, layer, element) routing updates of bias balancing (about a minute)."""
MAX_REQUESTS = 1_000_000
"""Most requests a serving run may simulate."""
MAX_TOKENS = 2**40
"""Most tokens one step may process (keeps every token count far from int64 overflow)."""
COUNT_ARRAYS = 8
SCORE_ARRAYS = 3
INT_BYTES = 8


@dataclass(frozen=True)
class PlanSize:
    """Estimated size of a scenario's plan (see the module docstring for each formula)."""

    devices: int
    tokens: int
    kernel_events: int
    flows_per_collective: int
    count_bytes: int
    routing_bytes: int
    balancing_work: int
    requests: int

    @property
    def plan_bytes(self) -> int:
        """Routing and count arrays together."""
        return self.count_bytes + self.routing_bytes


def estimate_size(sc: Scenario) -> PlanSize:
    """Estimate the plan's size from the scenario's sizes (no allocation)."""
    if sc.workload.phase != "serve":
        from moesim.plan.batch import with_batch_resolved

        sc = with_batch_resolved(sc)  # batch_size: max, batch_per_replica
    m, wl, r = sc.model, sc.workload, sc.routing
    n_dev = sc.cluster.n_devices
    serve = wl.serve if wl.phase == "serve" else None
    if serve is None:
        tokens = int(wl.tokens)
        passes = 3 * wl.train.micro_batches if wl.phase == "train" and wl.train else 1
        per_pass = tokens // max(passes // 3, 1) if wl.phase == "train" else tokens
        requests = 0
    else:
        tokens, passes, per_pass = 0, 1, 0
        n = getattr(serve, "n_requests", 0) or 0
        if n == "until_stable":  # grows by doubling up to its bound
            n = serve.steady.max_requests
        requests = int(n)
    moe_layers = m.n_layers - m.n_dense_layers
    if r.distribution == "trace":
        routing = per_pass * m.top_k * INT_BYTES
    elif r.per_token:
        routing = per_pass * m.n_experts * INT_BYTES * SCORE_ARRAYS
    else:
        routing = 0
    elements = (per_pass if r.per_token else n_dev) * m.n_experts
    return PlanSize(
        devices=n_dev,
        tokens=tokens,
        kernel_events=m.n_layers * n_dev * passes,
        flows_per_collective=n_dev * (n_dev - 1),
        count_bytes=moe_layers * n_dev * m.n_experts * INT_BYTES * COUNT_ARRAYS,
        routing_bytes=routing,
        balancing_work=r.bias_balancing.steps * moe_layers * elements,
        requests=requests,
    )


def check_size(sc: Scenario, file: str | None = None) -> PlanSize:
    """Raise :class:`ScenarioError` when an estimate exceeds its limit; returns the estimate."""
    size = estimate_size(sc)
    gib = 2**30
    checks = (
        ("workload", size.tokens, MAX_TOKENS, f"{size.tokens:,} tokens per step"),
        (
            "model.n_layers",
            size.kernel_events,
            MAX_KERNEL_EVENTS,
            f"{size.kernel_events:,} kernel events (layers x devices x passes)",
        ),
        (
            "cluster",
            size.flows_per_collective,
            MAX_FLOWS_PER_COLLECTIVE,
            f"{size.flows_per_collective:,} flows per collective ({size.devices:,} devices)",
        ),
        (
            "model.n_experts" if size.count_bytes >= size.routing_bytes else "workload",
            size.plan_bytes,
            MAX_PLAN_BYTES,
            f"{size.plan_bytes / gib:,.1f} GiB of routing and count arrays estimated",
        ),
        (
            "routing.bias_balancing.steps",
            size.balancing_work,
            MAX_BALANCING_WORK,
            f"{size.balancing_work:,} routing updates (steps x MoE layers x elements)",
        ),
        (
            "workload.serve.n_requests",
            size.requests,
            MAX_REQUESTS,
            f"{size.requests:,} requests",
        ),
    )
    for where, value, limit, what in checks:
        if value > limit:
            shown = f"{limit / gib:,.0f} GiB" if limit == MAX_PLAN_BYTES else f"{limit:,}"
            raise ScenarioError(where, f"too large: {what}; the limit is {shown}", file)
    return size
