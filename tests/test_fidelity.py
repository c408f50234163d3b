"""Issue 17: dtypes per direction and per op, links and compute as measured."""

from __future__ import annotations

import pytest

from moesim import catalog
from moesim.config.scenario import DtypeConfig
from moesim.cost.ops import attention_ops, workload_bytes
from moesim.cost.roofline import op_time_s

H100 = catalog.device("h100-sxm")


def test_dispatch_and_combine_default_to_activations():
    b = workload_bytes(DtypeConfig(activations="bf16"))
    assert (b.dispatch, b.combine) == (2.0, 2.0)
    b = workload_bytes(DtypeConfig(activations="bf16", dispatch="fp8"))
    assert (b.dispatch, b.combine, b.activations) == (1.0, 2.0, 2.0)


def test_attention_core_runs_in_bf16_under_fp8_compute():
    assert DtypeConfig(compute="fp8").attention_compute_dtype() == "bf16"
    assert DtypeConfig(compute="bf16").attention_compute_dtype() == "bf16"
    assert DtypeConfig(compute="fp8", attention_compute="fp8").attention_compute_dtype() == "fp8"
    spec = catalog.model("mixtral-8x7b")
    b = workload_bytes(DtypeConfig(compute="fp8"))
    core = next(o for o in attention_ops(spec, "softmax", 1, 8192, 0, 1, b) if "core" in o.name)
    t_fp8_run = float(op_time_s(H100, core, "fp8", launches=False))
    t_bf16 = float(core.flops) / (989.4e12 * H100.compute_efficiency)
    assert t_fp8_run == pytest.approx(t_bf16, rel=1e-9)  # compute-bound at the BF16 peak
