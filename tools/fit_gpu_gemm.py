"""Fit the H100/H800 compute constants of moesim/catalog/devices.yaml on kernel-level timings.

    python tools/fit_gpu_gemm.py

GEMMs: the shipped H100 bf16 table (moesim/catalog/kernels/h100-sxm-bf16.csv, one eager
PyTorch call per row, so each row includes the host dispatch ``kernel_launch_s``) and DeepGEMM's
published FP8 GEMMs on H800 (kernel times, no dispatch) fit ``compute_efficiency``,
``compute_efficiency_by_dtype.fp8``, ``gemm_tiles_half.fp8``, ``gemm_k_half`` and
``kernel_launch_s``; FlashAttention-3's published forward throughput fits
``attention_efficiency``, ``attention_keys_half`` and ``attention_head_dim_half``. Least
squares on log(predicted / measured) through moesim's own cost functions (needs scipy).
Only kernel-level measurements enter: no end-to-end throughput, no MoE all-to-all benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moesim

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from moesim import catalog
from moesim.cost.ops import _gemm
from moesim.cost.roofline import kernel_time_s
from moesim.validation.published import _attention_s, _gemm_s, measurement_files

TABLE = "moesim/catalog/kernels/h100-sxm-bf16.csv"


def _gemm_overrides(x: np.ndarray) -> dict:
    return {
        "compute_efficiency": float(x[0]),
        "compute_efficiency_by_dtype": {"fp8": float(x[1])},
        "gemm_tiles_half": {"fp8": float(x[2])},
        "gemm_k_half": float(x[3]),
        "kernel_launch_s": float(x[4]) * 1e-6,
    }


def fit_gemm() -> dict:
    table = pd.read_csv(TABLE)
    deepgemm = pd.concat(
        [pd.read_csv(p) for p in measurement_files() if "deepgemm" in p.name], ignore_index=True
    )

    def residuals(x: np.ndarray) -> np.ndarray:
        over = _gemm_overrides(x)
        h100 = catalog.device("h100-sxm", **over)
        out = []
        for r in table.itertuples():
            op = _gemm("g", float(r.m), r.k, r.n, 2.0, 2.0)
            t = kernel_time_s(
                h100, op.flops, op.memory_bytes, "bf16", 1, op.rows, op.inner, r.n, isolated=True
            )
            out.append(np.log(float(t) / r.seconds))
        orig = catalog.raw("devices")["h800"]
        catalog.raw("devices")["h800"] = {**orig, **over}
        try:
            for r in deepgemm.itertuples():
                measured = 2.0 * r.m * r.n * r.k * r.groups / (r.tflops * 1e12)
                out.append(np.log(_gemm_s("h800", r.m, r.n, r.k, "fp8", r.groups) / measured))
        finally:
            catalog.raw("devices")["h800"] = orig
        return np.array(out)

    fit = least_squares(
        residuals,
        [0.8, 0.7, 16.0, 500.0, 20.0],
        bounds=([0.3, 0.3, 0, 0, 0], [1, 1, 500, 5e3, 60]),
        loss="soft_l1",
        f_scale=0.1,
    )
    return _gemm_overrides(fit.x, strict=True)


def fit_attention() -> dict:
    fa = pd.concat(
        [pd.read_csv(p) for p in measurement_files() if "flashattention" in p.name],
        ignore_index=True,
    )

    def residuals(x: np.ndarray) -> np.ndarray:
        over = {
            "attention_efficiency": float(x[0]),
            "attention_keys_half": float(x[1]),
            "attention_head_dim_half": float(x[2]),
        }
        orig = catalog.raw("devices")["h100-sxm"]
        catalog.raw("devices")["h100-sxm"] = {**orig, **over}
        try:
            return np.array([np.log(np.divide(*_attention_s(r))) for _, r in fa.iterrows()])
        finally:
            catalog.raw("devices")["h100-sxm"] = orig

    fit = least_squares(residuals, [0.9, 200.0, 50.0], bounds=([0.1, 0, 0], [1, 5e3, 1e3]))
    return dict(
        zip(
            ["attention_efficiency", "attention_keys_half", "attention_head_dim_half"],
            fit.x,
            strict=True,
        )
    )


if __name__ == "__main__":
    for key, value in {**fit_gemm(), **fit_attention()}.items():
        print(f"{key:<28} {value}")
