"""Catalog of published models, devices and links (YAML data beside this file).

Each entry carries a ``sources`` mapping citing where every number comes from.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml

from moesim.catalog.specs import GpuSpec, LinkSpec, ModelSpec, PimSpec

_KINDS = {"models": ModelSpec, "devices": GpuSpec, "links": LinkSpec}


@cache
def raw(kind: str) -> dict[str, dict[str, Any]]:
    """The YAML mapping of one catalog file (``models``, ``devices`` or ``links``)."""
    text = resources.files(__name__).joinpath(f"{kind}.yaml").read_text()
    return yaml.safe_load(text) or {}


def names(kind: str) -> list[str]:
    """Entry names of one catalog file, sorted."""
    return sorted(raw(kind))


def lookup(kind: str, name: str, **overrides: Any) -> ModelSpec | GpuSpec | LinkSpec:
    """Validated spec for catalog entry ``name``, with optional field overrides."""
    entries = raw(kind)
    if name not in entries:
        raise ValueError(f"unknown {kind[:-1]} '{name}'; known: {', '.join(sorted(entries))}")
    data = {"name": name, **entries[name], **overrides}
    if overrides:
        data["sources"] = {
            **entries[name].get("sources", {}),
            **{k: "scenario override" for k in overrides if k != "sources"},
        }
    if kind == "devices" and data.get("type") in ("pim", "cim"):
        return PimSpec.model_validate(data)
    return _KINDS[kind].model_validate(data)


def model(name: str, **overrides: Any) -> ModelSpec:
    """A catalog model, e.g. ``model("mixtral-8x7b", n_layers=4)``."""
    return lookup("models", name, **overrides)  # type: ignore[return-value]


def device(name: str, **overrides: Any) -> GpuSpec:
    """A catalog device, e.g. ``device("h100-sxm")``."""
    return lookup("devices", name, **overrides)  # type: ignore[return-value]


def pim(name: str, **overrides: Any) -> PimSpec:
    """A catalog processing-in-memory part, e.g. ``pim("hbm-pim-aquabolt-xl")``."""
    spec = lookup("devices", name, **overrides)
    if not isinstance(spec, PimSpec):
        raise ValueError(f"device '{name}' is a {spec.type}, not a pim or cim part")
    return spec


def link(name: str, **overrides: Any) -> LinkSpec:
    """A catalog link, e.g. ``link("ib-ndr-400")``."""
    return lookup("links", name, **overrides)  # type: ignore[return-value]
