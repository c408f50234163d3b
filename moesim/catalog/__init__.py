"""Catalog of published models, devices and links (YAML data beside this file).

Each entry carries a ``sources`` mapping citing where every number comes from.
"""

from __future__ import annotations

import hashlib
import marshal
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from moesim.catalog.specs import GpuSpec, LinkSpec, ModelSpec, PimSpec

_KINDS = {"models": ModelSpec, "devices": GpuSpec, "links": LinkSpec}


@cache
def raw(kind: str) -> dict[str, dict[str, Any]]:
    """The YAML mapping of one catalog file (``models``, ``devices`` or ``links``); the parse
    is cached on disk (:func:`parse_yaml`)."""
    path = resources.files(__name__).joinpath(f"{kind}.yaml")
    cache_dir = Path(str(path)).parent / "__pycache__" if isinstance(path, Path) else None
    return parse_yaml(path.read_bytes(), cache_dir, kind) or {}


def parse_yaml(data: bytes, cache_dir: Path | None, stem: str) -> Any:
    """``yaml.safe_load(data)``, kept in ``cache_dir`` as marshal bytes keyed by a hash of
    ``data`` (as ``__pycache__`` keeps bytecode): the pure-Python YAML parser takes ~0.2 s a
    process on the catalog, reading it back ~1 ms. A cache that cannot be written or read
    (a read-only install, a data type marshal does not keep) only costs the parse."""
    key = hashlib.blake2b(data, digest_size=12).hexdigest()
    tag = sys.implementation.cache_tag
    cached = None if cache_dir is None else cache_dir / f"{stem}.{tag}.{key}.yaml.marshal"
    if cached is not None:
        try:
            return marshal.loads(cached.read_bytes())
        except (OSError, ValueError, EOFError, TypeError):
            pass
    import yaml

    parsed = yaml.safe_load(data)
    if cached is not None:
        try:
            blob = marshal.dumps(parsed)
            cache_dir.mkdir(exist_ok=True)
            for old in cache_dir.glob(f"{stem}.{tag}.*.yaml.marshal"):
                old.unlink(missing_ok=True)
            tmp = cached.with_suffix(f".tmp{id(blob)}")
            tmp.write_bytes(blob)
            tmp.replace(cached)  # atomic: a concurrent reader sees all of it or nothing
        except (OSError, ValueError):
            pass
    return parsed


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
