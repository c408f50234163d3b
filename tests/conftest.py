"""Shared fixtures: small scenarios built from catalog entries with overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim import scenario_from_dict

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))


def small_scenario(**overrides):
    """Mixtral with 2 layers on one 8-GPU H100 node, decode, uniform routing."""
    base = {
        "name": "test",
        "model": {"preset": "mixtral-8x7b", "n_layers": 2},
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"tp": 1, "ep": 8},
        "workload": {"phase": "decode", "batch_size": 64, "seq_len": 1024},
        "routing": {"distribution": "uniform"},
        "sim": {"seed": 0, "progress": False},
    }
    return scenario_from_dict(base, overrides)


@pytest.fixture
def small():
    return small_scenario


def same_value(x, y) -> bool:
    """Whether two plan values are equal all the way down: arrays by dtype and contents,
    dicts, lists and tuples item by item, objects field by field."""
    if isinstance(x, np.ndarray):
        return isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same_value(x[k], y[k]) for k in x)
    if hasattr(x, "__dict__") and not isinstance(x, type):
        return type(x) is type(y) and same_value(vars(x), vars(y))
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(same_value(p, q) for p, q in zip(x, y, strict=True))
    return x == y
