"""Catalog: every entry validates and every number cites a source."""

from __future__ import annotations

import numbers
from pathlib import Path

import pytest

from moesim import catalog
from moesim.cost.ops import Bytes, attention_ops, forward_flops_per_token, param_counts


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


PUBLISHED = {
    # name: (total, active as the card counts it, source)
    "mixtral-8x7b": (
        46.7e9,
        12.9e9,
        "mistral.ai/news/mixtral-of-experts: 46.7B total, 12.9B/token",
    ),
    "deepseek-v3": (671e9, 36.6e9, "DeepSeek-V3 README_WEIGHTS.md: 671B, 36.6B activated"),
    "hunyuan-large": (389e9, 52e9, "arXiv:2411.02265 abstract: 389B total, 52B activated"),
    "minimax-text-01": (456e9, 45.9e9, "arXiv:2501.08313 abstract: 456B total, 45.9B active"),
    "yuan2-m32": (40e9, 3.7e9, "arXiv:2405.17976 abstract: 40B total, 3.7B active"),
    "gpt3-175b": (175.0e9, 175.0e9, "arXiv:2005.14165 Table 2.1: 175.0B, dense"),
}


def test_every_catalog_model_has_a_published_count():
    assert sorted(PUBLISHED) == catalog.names("models")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_within_1pct(name):
    """Counts from the dimensions against the model cards' figures (written here, not read
    from the catalog, so a wrong catalog figure fails too)."""
    total, active, _ = PUBLISHED[name]
    counts = param_counts(catalog.model(name))
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts["active_as_published"] == pytest.approx(active, rel=0.01)


def test_minimax_needs_its_output_gate_for_456b():
    spec = catalog.model("minimax-text-01")
    without = param_counts(spec.model_copy(update={"linear_output_gate": False}))["total"]
    assert abs(without / 456e9 - 1) > 0.005  # 452.6B: the gate is what closes the gap
    assert param_counts(spec)["total"] - without == pytest.approx(70 * 6144 * 64 * 128)


def test_yuan_forward_flops_per_token_match_published():
    """Yuan 2.0-M32 abstract: 7.4 GFLOPs of forward computation per token."""
    spec = catalog.model("yuan2-m32")
    assert forward_flops_per_token(spec, 0) == pytest.approx(7.4e9, rel=0.02)
    no_lf = spec.model_copy(update={"lf_conv_width": 0})
    assert param_counts(no_lf)["active"] == pytest.approx(3.50e9, rel=0.01)


def test_mla_decode_core_uses_absorbed_dims():
    """FlashMLA decode attends the 576-wide latent (512 + 64 rope) and reads out 512 wide:
    ``2 c h (576 + 512)`` FLOPs per query, 3.4x the non-absorbed ``2 c h (192 + 128)``."""
    spec = catalog.model("deepseek-v3")
    batch, ctx = 4, 4096
    core = {o.name: o for o in attention_ops(spec, "mla", batch, 1, ctx, 1, Bytes())}
    keys = ctx + 1  # the cache plus the new token itself
    assert float(core["attention_core"].flops) == 2 * batch * keys * 128 * (576 + 512)
    absorbed = float(core["q_absorb"].flops + core["o_absorb"].flops)
    assert absorbed == 2 * batch * 128 * 512 * (128 + 128)
    prefill = {o.name: o for o in attention_ops(spec, "mla", 1, 64, 0, 1, Bytes())}
    assert float(prefill["attention_core"].flops) == 2 * 64 * (65 / 2) * 128 * (192 + 128)


def test_lightning_prefill_has_intra_block_term():
    """Lightning attention: ``4 hd^2`` per token and head through the state plus the masked
    block ``4 k_b hd``, ``k_b = (min(s, 256) + 1) / 2`` keys per query."""
    spec = catalog.model("minimax-text-01")
    s, h, hd = 4096, 64, 128
    ops = {o.name: o for o in attention_ops(spec, "linear", 1, s, 0, 1, Bytes())}
    expect = 4 * s * h * hd * hd + 4 * s * (257 / 2) * h * hd
    assert float(ops["attention_core"].flops) == pytest.approx(expect)
    assert "output_gate" in ops


def test_the_parse_cache_returns_what_yaml_parses(tmp_path):
    """The catalog's parse, kept on disk, reads back equal to a fresh YAML parse; a damaged
    cache file is parsed again, a changed file gets its own entry."""
    import yaml

    from moesim.catalog import parse_yaml

    data = (Path(catalog.__file__).parent / "devices.yaml").read_bytes()
    fresh = yaml.safe_load(data)
    assert parse_yaml(data, tmp_path, "devices") == fresh  # parsed, then written
    (kept,) = tmp_path.glob("devices.*.yaml.marshal")
    assert parse_yaml(data, tmp_path, "devices") == fresh  # read back
    kept.write_bytes(b"\x00damaged")
    assert parse_yaml(data, tmp_path, "devices") == fresh
    changed = data + b"\nextra-entry: {type: gpu}\n"
    assert parse_yaml(changed, tmp_path, "devices")["extra-entry"] == {"type": "gpu"}
    assert len(list(tmp_path.glob("devices.*.yaml.marshal"))) == 1  # the old key dropped
