"""Roofline: compute-bound and memory-bound kernels against the closed form."""

from __future__ import annotations

import pytest

from moesim import catalog
from moesim.cost.ops import Bytes, expert_ops
from moesim.cost.roofline import kernel_time_s, op_time_s

H100 = catalog.device("h100-sxm")


def test_compute_bound_gemm_is_flops_over_peak():
    """A large GEMM runs at ``compute_efficiency x k / (k + gemm_k_half)`` of the peak; the
    eager launch overlaps it (async_launch), so it adds nothing."""
    m = n = k = 8192
    flops = 2 * m * n * k
    memory = 2 * (m * k + k * n + m * n)  # bf16 operands and result
    t = float(kernel_time_s(H100, flops, memory, "bf16", rows=m, inner=k, cols=n))
    peak = 989.4e12 * H100.compute_efficiency * k / (k + H100.gemm_k_half)
    assert flops / peak > memory / (3.35e12 * H100.memory_efficiency)  # truly compute-bound
    assert flops / peak > H100.kernel_launch_s
    assert t == pytest.approx(flops / peak, rel=1e-9)
    isolated = float(kernel_time_s(H100, flops, memory, "bf16", 1, m, k, n, isolated=True))
    assert isolated == pytest.approx(flops / peak + H100.kernel_launch_s, rel=1e-9)


def test_memory_bound_gemv_is_bytes_over_bandwidth():
    k, n = 8192, 8192
    flops = 2 * k * n  # one token
    memory = 2 * (k * n + k + n)
    t = float(kernel_time_s(H100, flops, memory, "bf16", rows=1, inner=k, cols=n))
    bw = 3.35e12 * H100.memory_efficiency
    assert memory / bw > flops / (989.4e12 * H100.compute_efficiency)
    assert t == pytest.approx(max(memory / bw, H100.kernel_launch_s), rel=1e-9)
    graphs = H100.with_graphs()  # decode: the graph's per-kernel gap adds
    t = float(kernel_time_s(graphs, flops, memory, "bf16", rows=1, inner=k, cols=n))
    assert t == pytest.approx(memory / bw + H100.launch_s_with_graphs, rel=1e-9)


def test_fp8_compute_rate_and_int4_weights_quarter_the_bytes():
    big = 1e15
    t_bf16 = float(kernel_time_s(H100, big, 0, "bf16"))
    t_fp8 = float(kernel_time_s(H100, big, 0, "fp8"))
    fp8 = 1978.9 * H100.efficiency("fp8")
    assert t_bf16 / t_fp8 == pytest.approx(fp8 / (989.4 * H100.compute_efficiency), rel=1e-9)
    # decode expert: 1 token, weights dominate; int4 weights read 1/4 the bytes of bf16
    d, f = 4096, 14336
    dev = H100.with_graphs()

    def expert_s(b):
        return sum(float(op_time_s(dev, op, "bf16")) for op in expert_ops(1, d, f, b))

    bf16 = expert_s(Bytes(expert_weights=2.0))
    int4 = expert_s(Bytes(expert_weights=0.5))
    launch = 3 * dev.kernel_launch_s
    assert (float(bf16) - launch) / (float(int4) - launch) == pytest.approx(4.0, rel=0.01)


def test_weight_only_dequant_costs_vector_ops_per_weight():
    """int4 weights with bf16 activations: each weight is dequantised on the vector units,
    ``dequant_ops_per_weight / fp32 peak`` seconds, added to the compute side."""
    d, f, m = 4096, 14336, 4096
    gate_up = expert_ops(m, d, f, Bytes(expert_weights=0.5))[0]
    assert gate_up.dequant_weights == 2 * d * f
    plain = float(op_time_s(H100, expert_ops(m, d, f, Bytes())[0], "bf16"))
    quant = float(op_time_s(H100, gate_up, "bf16"))
    extra = 2 * d * f * H100.dequant_ops_per_weight / H100.peak_flops_per_s["fp32"]
    assert quant - plain == pytest.approx(extra, rel=1e-9)  # compute-bound at m = 4096


def test_expert_flops_and_bytes_closed_form():
    d, f, n = 4096, 14336, 100
    gate_up, act, down = expert_ops(n, d, f, Bytes())
    assert float(gate_up.flops + down.flops) == 6 * n * d * f
    assert float(gate_up.memory_bytes) == 2 * d * f * 2 + n * (d + 2 * f) * 2
    assert float(act.memory_bytes) == 3 * n * f * 2  # read gate and up, write h
    assert float(down.memory_bytes) == d * f * 2 + n * (f + d) * 2
    # an expert with no tokens costs nothing
    assert sum(float(op_time_s(H100, op, "bf16")) for op in expert_ops(0, d, f, Bytes())) == 0
