"""Hugging Face ``config.json`` files as moesim models (read locally; nothing is downloaded).

``model: {hf_config: path/to/config.json}`` in a scenario, or ``moesim model CONFIG``. Each
supported ``model_type`` maps its field names onto :class:`moesim.catalog.specs.ModelSpec`; an
unsupported one is an error listing those that are.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesim.config.errors import ScenarioError
from moesim.config.loading import read_text


def _get(cfg: dict[str, Any], key: str, default: Any = ..., *, where: str = "") -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is ...:
                raise ScenarioError(f"{where}{key}", "missing in config.json")
            return default
        node = node[part]
    return node


def _attention(
    cfg: dict[str, Any],
    heads_key="num_attention_heads",
    kv_key="num_key_value_heads",
    d_key="hidden_size",
) -> dict[str, Any]:
    d, h = _get(cfg, d_key), _get(cfg, heads_key)
    return {
        "d_model": d,
        "n_heads": h,
        "n_kv_heads": _get(cfg, kv_key, h) or h,
        "head_dim": _get(cfg, "head_dim", None) or d // h,
        "vocab_size": _get(cfg, "vocab_size"),
        "tied_embeddings": bool(_get(cfg, "tie_word_embeddings", False)),
    }


def _mixtral(cfg):
    return {
        "n_layers": _get(cfg, "num_hidden_layers"),
        **_attention(cfg),
        "d_ff_expert": _get(cfg, "intermediate_size"),
        "n_experts": _get(cfg, "num_local_experts"),
        "top_k": _get(cfg, "num_experts_per_tok"),
    }


def _qwen_moe(cfg):
    step = _get(cfg, "decoder_sparse_step", 1)
    if step != 1 or _get(cfg, "mlp_only_layers", []):
        raise ScenarioError(
            "decoder_sparse_step",
            "only every-layer MoE (decoder_sparse_step 1, no mlp_only_layers) is supported",
        )
    shared = _get(cfg, "shared_expert_intermediate_size", 0) or 0
    return {
        "n_layers": _get(cfg, "num_hidden_layers"),
        **_attention(cfg),
        "d_ff_expert": _get(cfg, "moe_intermediate_size"),
        "n_experts": _get(cfg, "num_experts"),
        "top_k": _get(cfg, "num_experts_per_tok"),
        "n_shared_experts": 1 if shared else 0,
        "d_ff_shared": shared,
    }


def _deepseek(cfg):
    d_ff = _get(cfg, "moe_intermediate_size")
    n_shared = _get(cfg, "n_shared_experts", 0) or 0
    return {
        "n_layers": _get(cfg, "num_hidden_layers"),
        **_attention(cfg),
        "n_kv_heads": _get(cfg, "num_attention_heads"),
        "head_dim": _get(cfg, "v_head_dim"),
        "d_ff_expert": d_ff,
        "n_experts": _get(cfg, "n_routed_experts"),
        "top_k": _get(cfg, "num_experts_per_tok"),
        "n_shared_experts": n_shared,
        "d_ff_shared": d_ff if n_shared else 0,
        "n_dense_layers": _get(cfg, "first_k_dense_replace", 0),
        "d_ff_dense": _get(cfg, "intermediate_size"),
        "attention_pattern": ["mla"],
        "mla": {
            k: _get(cfg, k, None)
            for k in (
                "q_lora_rank",
                "kv_lora_rank",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
            )
        },
    }


def _olmoe(cfg):
    return {
        "n_layers": _get(cfg, "num_hidden_layers"),
        **_attention(cfg),
        "d_ff_expert": _get(cfg, "intermediate_size"),
        "n_experts": _get(cfg, "num_experts"),
        "top_k": _get(cfg, "num_experts_per_tok"),
    }


def _dbrx(cfg):
    return {
        "n_layers": _get(cfg, "n_layers"),
        **_attention(cfg, heads_key="n_heads", kv_key="attn_config.kv_n_heads", d_key="d_model"),
        "d_ff_expert": _get(cfg, "ffn_config.ffn_hidden_size"),
        "n_experts": _get(cfg, "ffn_config.moe_num_experts"),
        "top_k": _get(cfg, "ffn_config.moe_top_k"),
    }


def _llama(cfg):
    d_ff = _get(cfg, "intermediate_size")
    layers = _get(cfg, "num_hidden_layers")
    return {
        "n_layers": layers,
        **_attention(cfg),
        "d_ff_expert": d_ff,
        "n_experts": 1,
        "top_k": 1,
        "n_dense_layers": layers,
        "d_ff_dense": d_ff,
    }


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen_moe,
    "qwen3_moe": _qwen_moe,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
    "olmoe": _olmoe,
    "dbrx": _dbrx,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
}
"""model_type -> field mapping."""


def model_fields(cfg: dict[str, Any], name: str = "hf-model") -> dict[str, Any]:
    """ModelSpec fields from a parsed config.json."""
    kind = cfg.get("model_type")
    if kind not in ARCHITECTURES:
        raise ScenarioError(
            "model_type",
            f"unsupported architecture {kind!r}; supported: {', '.join(sorted(ARCHITECTURES))}",
        )
    fields = ARCHITECTURES[kind](cfg)
    return {"name": name, "description": f"from config.json ({kind})", **fields}


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """ModelSpec fields from a local config.json; errors name the config field."""
    path = Path(path)
    try:
        cfg = json.loads(read_text(path, "config.json"))
    except ScenarioError as err:
        raise ScenarioError("model.hf_config", f"{path}: {err.reason}") from None
    except json.JSONDecodeError as err:
        raise ScenarioError(
            "model.hf_config", f"{path}: invalid JSON: {err.msg} at line {err.lineno}"
        ) from None
    except RecursionError:
        raise ScenarioError("model.hf_config", f"{path}: JSON nested too deeply") from None
    if not isinstance(cfg, dict):
        raise ScenarioError("model.hf_config", f"{path}: not a JSON object")
    try:
        return model_fields(cfg, str(cfg.get("_name_or_path") or path.stem))
    except ScenarioError as err:
        raise ScenarioError(f"model.hf_config.{err.path}", f"{path}: {err.reason}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError) as err:
        raise ScenarioError("model.hf_config", f"{path}: malformed config ({err})") from None
