"""Model FLOPs utilisation against a named peak.

``mfu = model FLOPs per step / (step time x devices x peak)`` (PaLM, Chowdhery et al. 2022,
App. B), the peak being the device's dense tensor rate in the scenario's compute dtype
(``GpuSpec.flops_per_s``; H100/H800 BF16: 989.4 TFLOP/s, FP8: 1978.9). Model FLOPs per token
are :func:`moesim.cost.ops.forward_flops_per_token` (``2 x`` active matmul parameters plus
the attention core at the full context): at ``seq_len`` for prefill (the PaLM convention, as
training counts it), at ``seq_len + 1`` keys for a decode token, ``3 x`` the forward at
``seq_len`` for a training token; recomputation and speculative drafts do not count.
"""

from __future__ import annotations

from moesim.cost.ops import forward_flops_per_token
from moesim.plan.types import WorkloadPlan


def mfu_peak(plan: WorkloadPlan) -> tuple[float, str]:
    """(FLOP/s, name) of the peak MFU is stated against, e.g. ``"h800 dense BF16 989.4
    TFLOP/s"``."""
    device = plan.scenario.cluster.device
    dtype = plan.scenario.workload.dtypes.compute
    peak = device.flops_per_s(dtype)
    return peak, f"{device.name} dense {dtype.upper()} {peak / 1e12:.1f} TFLOP/s"


def model_flops_per_step(plan: WorkloadPlan) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    sc = plan.scenario
    if plan.train is not None:
        return plan.tokens * plan.train.model_flops_per_token
    context = sc.workload.seq_len + (1 if sc.workload.phase == "decode" else 0)
    return plan.tokens * forward_flops_per_token(sc.model, context)


def mfu(plan: WorkloadPlan, step_s: float) -> dict:
    """``{"mfu", "mfu_peak", "model_flops_per_step"}`` for ``summary.json``."""
    peak, name = mfu_peak(plan)
    flops = model_flops_per_step(plan)
    value = flops / (step_s * plan.n_devices * peak) if step_s > 0 and peak > 0 else 0.0
    return {"mfu": value, "mfu_peak": name, "model_flops_per_step": flops}
