"""``moesim model``: parameters, FLOPs, weight and KV-cache bytes of one model."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.cli.common import positive_int
from moesim.config.errors import ScenarioError

NAME = "model"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim model``."""
    p = subparsers.add_parser(
        NAME,
        help="parameters, FLOPs per token, weight and KV-cache bytes of a model",
        description="Describe a catalog model or a local Hugging Face config.json: total and "
        "active parameters, forward FLOPs per token, weight bytes per dtype, KV-cache bytes "
        "per token. Supported config.json architectures: mixtral, qwen2_moe, qwen3_moe, "
        "deepseek_v2, deepseek_v3, olmoe, dbrx, and dense llama / mistral / qwen2.",
    )
    p.add_argument("model", help="catalog name (moesim catalog models) or config.json path")
    p.add_argument(
        "--context",
        type=positive_int,
        default=4096,
        help="context length for attention FLOPs (default 4096)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from moesim.catalog.specs import DTYPE_BYTES, ModelSpec
    from moesim.config.loading import validate
    from moesim.config.scenario import catalog_lookup
    from moesim.cost.ops import (
        Bytes,
        forward_flops_per_token,
        kv_cache_bytes_per_token,
        linear_state_bytes_per_seq,
        param_counts,
    )

    target = args.model
    if target.endswith(".json") or Path(target).exists():
        from moesim.config.hf import load_hf_config

        try:
            fields = load_hf_config(target)
        except ScenarioError as err:
            err.path, err.reason = err.path.removeprefix("model."), err.reason.split(": ", 1)[-1]
            err.file = target
            raise
        spec = validate(ModelSpec, fields, target, "model")
    else:
        try:
            spec = catalog_lookup("models", target)
        except ValueError as err:
            raise ScenarioError("model", str(err), "moesim model") from None
    p = param_counts(spec)
    kv = sum(kv_cache_bytes_per_token(spec, i, 1, Bytes()) for i in range(spec.n_layers))
    state = sum(linear_state_bytes_per_seq(spec, i, 1) for i in range(spec.n_layers))
    print(
        f"model             {spec.name}: {spec.n_layers} layers ({spec.n_dense_layers} dense), "
        f"d_model {spec.d_model}, {spec.n_experts} experts top-{spec.top_k}"
        f"{f' + {spec.n_shared_experts} shared' if spec.n_shared_experts else ''}"
    )
    published = ""
    if spec.total_params:
        published = (
            f" (published {spec.total_params / 1e9:.1f}B / {(spec.active_params or 0) / 1e9:.1f}B)"
        )
    print(
        f"parameters        {p['total'] / 1e9:.2f}B total, {p['active'] / 1e9:.2f}B active per "
        f"token{published}"
    )
    print(
        f"forward FLOPs     {forward_flops_per_token(spec, args.context) / 1e9:.2f} GFLOP per "
        f"token at {args.context:,} tokens of context"
    )
    print(
        "weights           "
        + ", ".join(
            f"{p['total'] * DTYPE_BYTES[d] / 1e9:,.1f} GB {d}" for d in ("bf16", "fp8", "int4")
        )
    )
    line = f"KV cache          {kv / 1e3:,.1f} kB per token (bf16)"
    if state:
        line += f", plus {state / 1e6:,.1f} MB of linear-attention state per sequence"
    print(line)
    return 0
