"""Shared fixtures: small scenarios built from catalog entries with overrides."""

from __future__ import annotations

from pathlib import Path

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
