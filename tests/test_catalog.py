"""Catalog: every entry validates and every number cites a source."""

from __future__ import annotations

import numbers

import pytest

from moesim import catalog
from moesim.cost.ops import param_counts


def _numeric_fields(entry: dict) -> list[str]:
    fields = []
    for key, value in entry.items():
        if key == "sources":
            continue
        if (isinstance(value, numbers.Number) and not isinstance(value, bool)) or (
            isinstance(value, dict) and any(isinstance(v, numbers.Number) for v in value.values())
        ):
            fields.append(key)
    return fields


@pytest.mark.parametrize("kind", ["models", "devices", "links"])
def test_every_number_has_a_source(kind):
    for name, entry in catalog.raw(kind).items():
        missing = [f for f in _numeric_fields(entry) if f not in entry.get("sources", {})]
        assert not missing, f"{kind}/{name} lacks sources for {missing}"
        catalog.lookup(kind, name)  # validates


def test_device_links_exist():
    for name in catalog.names("devices"):
        spec = catalog.device(name)
        catalog.link(spec.host_link if spec.type in ("pim", "cim") else spec.intra_node_link)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3", "hunyuan-large"])
def test_preset_parameter_counts_match_published(name):
    """Independent check of the dimensions: counts from them match the model cards (2%)."""
    spec = catalog.model(name)
    counts = param_counts(spec)
    assert counts["total"] == pytest.approx(spec.total_params, rel=0.02)
    assert counts["active"] == pytest.approx(spec.active_params, rel=0.02)
