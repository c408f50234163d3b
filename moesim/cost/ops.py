"""Per-operation FLOPs and memory bytes of an MoE transformer layer, and parameter counts.

All functions are plain and vectorised: token counts may be numpy arrays. A GEMM of an
``m x k`` by ``k x n`` costs ``2 m k n`` FLOPs; its memory traffic is the weights read once
plus the activations read and written (roofline accounting, Williams et al. 2009). SwiGLU
experts have three matrices (gate, up: d -> f; down: f -> d), so ``6 n d f`` FLOPs for n tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.catalog.specs import ModelSpec
from moesim.config.scenario import DtypeConfig

ArrayLike = float | np.ndarray


@dataclass(frozen=True)
class OpCost:
    """One kernel (or a group launched together): work and memory traffic, per device."""

    name: str
    flops: ArrayLike
    memory_bytes: ArrayLike
    kernels: int = 1
    rows: ArrayLike | None = None  # GEMM M dimension, for small-GEMM efficiency
    inner: float | None = None  # GEMM K dimension
    unfused_memory_bytes: ArrayLike | None = None  # traffic when each elementwise step is a pass
    unfused_kernels: int | None = None
    scores: ArrayLike | None = None  # router scores handled (for gating_s_per_score)
    gemm: tuple[float, float] | None = None  # (k, n) of each GEMM, for measured kernel tables
    gemm_count: int = 1  # how many (m x k) @ (k x n) GEMMs the op is
    compute_dtype: str | None = None  # its own compute dtype (attention core), else the workload's
    dequant_weights: float | None = None  # weights dequantised (weight-only quantised GEMMs)
    attention: tuple[float, float] | None = None  # core: (keys per query, head dim)


@dataclass(frozen=True)
class Bytes:
    """Bytes per element of each tensor kind, and the attention core's compute dtype.

    ``dispatch`` and ``combine`` are the activation rows the all-to-all carries each way
    (DeepSeek-V3 dispatches in FP8 and combines in BF16, arXiv:2412.19437 Sec. 3.3;
    :func:`workload_bytes` resolves them to ``activations`` where a workload leaves them
    unset). ``attention_compute`` is the dtype the attention core runs in (``None``: the
    workload's compute dtype)."""

    weights: float = 2.0
    expert_weights: float = 2.0
    activations: float = 2.0
    kv_cache: float = 2.0
    dispatch: float = 2.0
    combine: float = 2.0
    attention_compute: str | None = None


def workload_bytes(dt: DtypeConfig) -> Bytes:
    """The :class:`Bytes` of a workload's ``dtypes`` block."""
    kinds = ("weights", "expert_weights", "activations", "kv_cache", "dispatch", "combine")
    return Bytes(*(dt.bytes_of(k) for k in kinds), dt.attention_compute_dtype())


LINEAR_ATTENTION_STATE_BYTES = 4.0
"""Lightning-attention state is kept in fp32 (MiniMax-01 report, Sec. 2.2)."""

LIGHTNING_BLOCK_TOKENS = 256
"""Tokens per block of lightning attention (Qin et al., Lightning Attention-2, arXiv:2401.04658,
Sec. 3: intra-block attention is computed as masked ``Q K^T V`` within a block, inter-block
through the recurrent state). Assumption: 256, the block size is not published for MiniMax-01."""


def _gemm(
    name: str,
    tokens: ArrayLike,
    k: float,
    n: float,
    w_bytes: float,
    a_bytes: float,
    kernels: int = 1,
) -> OpCost:
    """``tokens x k`` times ``k x n`` with weights read once (skipped when no tokens)."""
    tokens = np.asarray(tokens, dtype=float)
    flops = 2.0 * tokens * k * n
    memory = np.where(tokens > 0, k * n * w_bytes, 0.0) + tokens * (k + n) * a_bytes
    return OpCost(
        name,
        flops,
        memory,
        kernels,
        rows=tokens,
        inner=float(k),
        gemm=(float(k), float(n)),
        dequant_weights=_dequant(k * n, w_bytes, a_bytes),
    )


def _dequant(weights: float, w_bytes: float, a_bytes: float) -> float | None:
    """Weights a weight-only quantised GEMM dequantises (narrower than its activations)."""
    return float(weights) if w_bytes < a_bytes else None


def attention_weight_params(m: ModelSpec, kind: str) -> float:
    """Parameters of one attention block (projections only; norms are negligible)."""
    d, h, hd = m.d_model, m.n_heads, m.head_dim
    if kind == "mla":
        a = m.mla
        assert a is not None
        return (
            (
                d * a.q_lora_rank + a.q_lora_rank * h * (a.qk_nope_head_dim + a.qk_rope_head_dim)
                if a.q_lora_rank
                else d * h * (a.qk_nope_head_dim + a.qk_rope_head_dim)
            )
            + d * (a.kv_lora_rank + a.qk_rope_head_dim)
            + a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
            + h * a.v_head_dim * d
        )
    kv = h if kind == "linear" else m.n_kv_heads
    gate = d * h * hd if kind == "linear" and m.linear_output_gate else 0
    return d * (h + 2 * kv) * hd + h * hd * d + gate + lf_conv_params(m)


def lf_conv_params(m: ModelSpec) -> float:
    """Localized filtering (Yuan 2.0, arXiv:2311.15786 Sec. 3): causal convolutions of width
    ``w`` from ``d`` to ``d/2`` and back, ``2 w d (d/2) = w d^2`` weights per layer."""
    return float(m.lf_conv_width * m.d_model * m.d_model)


def attention_ops(
    m: ModelSpec,
    kind: str,
    batch: ArrayLike,
    new_tokens_per_seq: int,
    context_len: int,
    tp: int,
    b: Bytes,
) -> list[OpCost]:
    """Attention of ``batch`` sequences each adding ``new_tokens_per_seq`` tokens after
    ``context_len`` cached ones, sharded over ``tp`` heads.

    Softmax core: ``4 * q * c * h * hd`` FLOPs for q queries attending c keys (QK^T and PV),
    causal within the new tokens; KV cache read ``c * 2 * kv_heads * hd`` elements (decode is
    memory-bound on it). Linear (lightning) attention: ``4 * hd^2`` FLOPs per token and head
    (state update and readout) and an fp32 state of ``h * hd^2`` per sequence. MLA (DeepSeek-V2
    Sec. 2.1): low-rank q/kv projections, latent KV cache of ``kv_lora + rope`` per token;
    decode (one new token) runs with the up-projections absorbed (FlashMLA): the core attends
    the latent, ``2 q c h (2 kv_lora + rope)`` FLOPs, and the absorbed ``W_UK`` / ``W_UV``
    cost ``2 q h kv_lora (nope + v)``. Lightning prefill adds the intra-block term
    ``4 q k_b h hd`` with ``k_b = (min(s, B) + 1) / 2`` keys per query inside a block of
    :data:`LIGHTNING_BLOCK_TOKENS`. Yuan's localized filtering adds two GEMM-shaped
    convolutions per token. The core runs in ``b.attention_compute``.
    """
    batch = np.asarray(batch, dtype=float)
    s, c = new_tokens_per_seq, context_len
    tokens = batch * s
    d, h, hd = m.d_model, m.n_heads, m.head_dim
    h_loc = h / tp
    ab, wb, kvb = b.activations, b.weights, b.kv_cache
    # average keys attended per new token: the cache plus the causal part of the new tokens
    keys_per_query = c + (s + 1) / 2.0
    ops: list[OpCost] = []
    core_dtype = b.attention_compute
    if m.lf_conv_width:
        w = m.lf_conv_width
        ops.append(_gemm("lf_conv_down", tokens, w * d, d / 2, wb, ab))
        ops.append(_gemm("lf_conv_up", tokens, w * d / 2, d, wb, ab))
    if kind == "mla":
        a = m.mla
        assert a is not None
        qk, lat = a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank + a.qk_rope_head_dim
        if a.q_lora_rank:
            ops.append(_gemm("q_down", tokens, d, a.q_lora_rank, wb, ab))
            ops.append(_gemm("q_up", tokens, a.q_lora_rank, h_loc * qk, wb, ab))
        else:
            ops.append(_gemm("q_proj", tokens, d, h_loc * qk, wb, ab))
        ops.append(_gemm("kv_down", tokens, d, lat, wb, ab))
        if s == 1:  # absorbed (FlashMLA decode): per-head W_UK on q, W_UV on the output
            r = a.kv_lora_rank
            for name, inner in (("q_absorb", a.qk_nope_head_dim), ("o_absorb", a.v_head_dim)):
                ops.append(
                    OpCost(
                        name,
                        2.0 * tokens * h_loc * inner * r,
                        np.where(tokens > 0, h_loc * inner * r * wb, 0.0)
                        + tokens * h_loc * (inner + r) * ab,
                        rows=tokens,
                        inner=float(inner),
                    )
                )
            core_flops = 2.0 * tokens * keys_per_query * h_loc * (lat + r)
            core_bytes = batch * (c + s) * lat * kvb + tokens * h_loc * (lat + r) * ab
        else:
            ops.append(
                _gemm(
                    "kv_up",
                    tokens,
                    a.kv_lora_rank,
                    h_loc * (a.qk_nope_head_dim + a.v_head_dim),
                    wb,
                    ab,
                )
            )
            core_flops = 2.0 * tokens * keys_per_query * h_loc * (qk + a.v_head_dim)
            core_bytes = batch * (c + s) * lat * kvb + tokens * h_loc * (qk + a.v_head_dim) * ab
        core_dim = float(lat if s == 1 else qk)
        ops.append(
            OpCost(
                "attention_core",
                core_flops,
                core_bytes,
                compute_dtype=core_dtype,
                attention=(keys_per_query, core_dim),
            )
        )
        ops.append(_gemm("o_proj", tokens, h_loc * a.v_head_dim, d, wb, ab))
        return ops
    kv = h if kind == "linear" else m.n_kv_heads
    kv_loc = max(1.0, kv / tp)
    ops.append(_gemm("qkv_proj", tokens, d, (h_loc + 2 * kv_loc) * hd, wb, ab))
    if kind == "linear":
        state = batch * h_loc * hd * hd * LINEAR_ATTENTION_STATE_BYTES
        intra_keys = (min(s, LIGHTNING_BLOCK_TOKENS) + 1) / 2.0
        core_flops = 4.0 * tokens * h_loc * hd * hd + 4.0 * tokens * intra_keys * h_loc * hd
        core_bytes = 2.0 * state + tokens * 4 * h_loc * hd * ab
        ops.append(OpCost("attention_core", core_flops, core_bytes, compute_dtype=core_dtype))
    else:
        ops.append(
            softmax_core_op(batch, s, keys_per_query, c + s, h_loc, kv_loc, hd, ab, kvb, core_dtype)
        )
    if kind == "linear" and m.linear_output_gate:
        ops.append(_gemm("output_gate", tokens, d, h_loc * hd, wb, ab))
    ops.append(_gemm("o_proj", tokens, h_loc * hd, d, wb, ab))
    return ops


def softmax_core_op(
    batch: ArrayLike,
    queries_per_seq: float,
    keys_per_query: float,
    kv_per_seq: float,
    heads: float,
    kv_heads: float,
    head_dim: float,
    a_bytes: float,
    kv_bytes: float,
    compute_dtype: str | None = None,
) -> OpCost:
    """Softmax attention core (FlashAttention): ``4 q L h hd`` FLOPs for q queries attending
    L keys each (QK^T and PV; causal: L is the mean over queries), reading ``kv_per_seq`` cached
    keys and values per sequence and the queries and outputs once (Dao et al. 2022)."""
    batch = np.asarray(batch, dtype=float)
    q = batch * queries_per_seq
    flops = 4.0 * q * keys_per_query * heads * head_dim
    memory = batch * kv_per_seq * 2 * kv_heads * head_dim * kv_bytes
    memory = memory + q * 2 * heads * head_dim * a_bytes
    return OpCost(
        "attention_core",
        flops,
        memory,
        compute_dtype=compute_dtype,
        attention=(float(keys_per_query), float(head_dim)),
    )


def router_ops(m: ModelSpec, tokens: ArrayLike, b: Bytes) -> list[OpCost]:
    """Gate scores for ``tokens``. Linear: ``2 T d E``. Attention router (Yuan2.0-M32, Sec. 2):
    Q, K, V projections to E each (``6 T d E``) and an E x E attention (``4 T E^2``)."""
    d, e = m.d_model, m.n_experts
    if m.router == "linear":
        return [_gemm("gate", tokens, d, e, b.weights, b.activations), gating_ops(tokens, e)]
    tokens = np.asarray(tokens, dtype=float)
    return [
        _gemm("gate_qkv", tokens, d, 3 * e, b.weights, b.activations),
        OpCost("gate_attention", 4.0 * tokens * e * e, tokens * 3 * e * b.activations),
        gating_ops(tokens, e),
    ]


GATING_PASSES = 3
"""Softmax and top-k read the fp32 scores about three times (max, exp-sum, select)."""


def gating_ops(tokens: ArrayLike, n_experts: int) -> OpCost:
    """Softmax and top-k selection over fp32 scores: ``~5 T E`` FLOPs (exp, sums, divisions).
    Fused (GPU): ``GATING_PASSES`` passes over the ``T x E`` scores. Unfused (numpy): max,
    subtract, exp, sum, divide, select, gather: ``UNFUSED_GATING_PASSES`` passes, 8 kernels."""
    tokens = np.asarray(tokens, dtype=float)
    scores = tokens * n_experts
    return OpCost(
        "gating",
        5.0 * scores,
        GATING_PASSES * scores * 4.0,
        unfused_memory_bytes=UNFUSED_GATING_PASSES * scores * 4.0,
        unfused_kernels=8,
        scores=scores,
    )


UNFUSED_GATING_PASSES = 12
"""Reads and writes of the score matrix when softmax and top-k run as separate numpy calls."""


def permute_ops(pairs: ArrayLike, d_model: int, b: Bytes) -> OpCost:
    """Dispatch permutation: gather each routed token-expert pair's activation into
    expert-contiguous order (one read and one write of ``d`` values per pair)."""
    pairs = np.asarray(pairs, dtype=float)
    return OpCost("permute", np.zeros_like(pairs), 2.0 * pairs * d_model * b.activations)


def unpermute_ops(pairs: ArrayLike, tokens: ArrayLike, d_model: int, b: Bytes) -> OpCost:
    """Combine: scale each returned pair by its gate weight and add it into its token's
    output (``2 d`` FLOPs per pair; read the pair and read-modify-write the output row). On a
    GPU the weighted reduction runs inside the combine kernel, which reduces the top-k rows as
    they arrive (DeepEP's combine), so it launches nothing of its own (``kernels = 0``)."""
    pairs = np.asarray(pairs, dtype=float)
    tokens = np.asarray(tokens, dtype=float)
    return OpCost(
        "unpermute",
        2.0 * pairs * d_model,
        (pairs * b.combine + (2.0 * pairs + tokens) * b.activations) * d_model,
        kernels=0,
        # unfused: scale (r+w), gather the output rows (r), add (2r+w), scatter (w), zero (w)
        unfused_memory_bytes=(pairs * b.combine + (6.0 * pairs + tokens) * b.activations) * d_model,
        unfused_kernels=6,
    )


SWIGLU_ACT_FLOPS_PER_ELEMENT = 5.0
"""silu(g) * u per hidden element: exp, add, divide, two multiplies."""


def swiglu_ops(
    name: str, tokens: ArrayLike, d_model: int, d_ff: float, w_bytes: float, b: Bytes
) -> list[OpCost]:
    """A SwiGLU FFN ``down(silu(x Wg) * (x Wu))`` as its three kernels: the gate/up GEMM
    (``4 n d f`` FLOPs, ``2 d f`` weights), the elementwise activation (read g and u, write h:
    ``3 n f`` values) and the down GEMM (``2 n d f``, ``d f`` weights). Weights are read only
    when the FFN has tokens. ``tokens`` may be an array (one FFN per element)."""
    n = np.asarray(tokens, dtype=float)
    has = n > 0
    ab = b.activations
    return [
        OpCost(
            f"{name}_gate_up",
            4.0 * n * d_model * d_ff,
            np.where(has, 2.0 * d_model * d_ff * w_bytes, 0.0) + n * (d_model + 2 * d_ff) * ab,
            rows=n,
            inner=float(d_model),
            unfused_kernels=2,  # gate and up as two GEMMs (one concatenated GEMM when fused)
            gemm=(float(d_model), float(d_ff)),
            gemm_count=2,
            dequant_weights=_dequant(2.0 * d_model * d_ff, w_bytes, ab),
        ),
        OpCost(
            f"{name}_act",
            SWIGLU_ACT_FLOPS_PER_ELEMENT * n * d_ff,
            3.0 * n * d_ff * ab,
            # unfused: -g, exp, +1, g / (.), * u: 2 + 2 + 2 + 3 + 3 array passes
            unfused_memory_bytes=12.0 * n * d_ff * ab,
            unfused_kernels=5,
        ),
        OpCost(
            f"{name}_down",
            2.0 * n * d_model * d_ff,
            np.where(has, d_model * d_ff * w_bytes, 0.0) + n * (d_ff + d_model) * ab,
            rows=n,
            inner=float(d_ff),
            gemm=(float(d_ff), float(d_model)),
            dequant_weights=_dequant(d_model * d_ff, w_bytes, ab),
        ),
    ]


def expert_ops(tokens_per_expert: np.ndarray, d_model: int, d_ff: float, b: Bytes) -> list[OpCost]:
    """Routed SwiGLU experts (``tokens_per_expert`` is ``[..., experts]``), expert weights."""
    return swiglu_ops("experts", tokens_per_expert, d_model, d_ff, b.expert_weights, b)


def ffn_ops(name: str, tokens: ArrayLike, d_model: int, d_ff: float, b: Bytes) -> list[OpCost]:
    """A dense SwiGLU FFN (dense layers, shared experts), weights at ``b.weights``."""
    return swiglu_ops(name, tokens, d_model, d_ff, b.weights, b)


def lm_head_ops(m: ModelSpec, tokens: ArrayLike, tp: int, b: Bytes) -> OpCost:
    """Logits for ``tokens`` over a vocabulary sharded ``tp`` ways."""
    return _gemm("lm_head", tokens, m.d_model, m.vocab_size / tp, b.weights, b.activations)


def kv_cache_bytes_per_token(m: ModelSpec, layer: int, tp: int, b: Bytes) -> float:
    """KV-cache bytes one token adds on one device in ``layer`` (0 for linear attention).

    GQA keeps ``2 * kv_heads * hd`` per token (kv heads sharded by tp, at least one per device);
    MLA keeps the latent ``kv_lora + rope`` (replicated across tp); cross-layer sharing
    (Hunyuan-Large CLA) stores one cache per ``kv_share_group`` layers.
    """
    kind = m.attention_kind(layer)
    if kind == "linear" or layer % m.kv_share_group:
        return 0.0
    if kind == "mla":
        assert m.mla is not None
        return (m.mla.kv_lora_rank + m.mla.qk_rope_head_dim) * b.kv_cache
    return 2.0 * max(1.0, m.n_kv_heads / tp) * m.head_dim * b.kv_cache


def linear_state_bytes_per_seq(m: ModelSpec, layer: int, tp: int) -> float:
    """Lightning-attention recurrent state per sequence on one device."""
    if m.attention_kind(layer) != "linear":
        return 0.0
    return m.n_heads / tp * m.head_dim**2 * LINEAR_ATTENTION_STATE_BYTES


def param_counts(m: ModelSpec) -> dict[str, float]:
    """Total and per-token active parameters, by part (embeddings counted once if tied)."""
    emb = m.vocab_size * m.d_model * (1 if m.tied_embeddings else 2)
    attn = sum(attention_weight_params(m, m.attention_kind(i)) for i in range(m.n_layers))
    n_moe = m.n_layers - m.n_dense_layers
    router = n_moe * m.d_model * m.n_experts * (3 if m.router == "attention" else 1)
    expert = 3 * m.d_model * m.d_ff_expert
    routed = n_moe * m.n_experts * expert
    shared = n_moe * m.n_shared_experts * 3 * m.d_model * m.d_ff_shared
    dense = m.n_dense_layers * 3 * m.d_model * m.d_ff_dense
    norms = m.n_layers * 2 * m.d_model
    common = emb + attn + router + shared + dense + norms
    active = common + n_moe * m.top_k * expert
    left_out = m.vocab_size * m.d_model * len(m.active_params_exclude)
    return {
        "total": float(common + routed),
        "active": float(active),
        "active_as_published": float(active - left_out),
        "embeddings": float(emb),
        "attention": float(attn),
        "routed_experts": float(routed),
        "shared_experts": float(shared),
        "dense_ffn": float(dense),
    }


def forward_flops_per_token(m: ModelSpec, context: int) -> float:
    """Forward FLOPs of one token at ``context`` cached tokens: ``2 x`` the active matmul
    parameters (embedding lookup excluded, LM head included) plus the attention core per
    layer (softmax ``4 C h hd``; MLA ``2 C h (qk + v)``; linear ``4 h hd^2`` plus the
    intra-block ``4 k_b h hd``)."""
    p = param_counts(m)
    emb_in = m.vocab_size * m.d_model if not m.tied_embeddings else 0
    matmul = 2.0 * (p["active"] - emb_in - m.n_layers * 2 * m.d_model)
    core = 0.0
    for i in range(m.n_layers):
        kind = m.attention_kind(i)
        if kind == "linear":
            intra = (min(context, LIGHTNING_BLOCK_TOKENS) + 1) / 2.0
            core += 4.0 * m.n_heads * m.head_dim**2 + 4.0 * intra * m.n_heads * m.head_dim
        elif kind == "mla":
            a = m.mla
            qk = a.qk_nope_head_dim + a.qk_rope_head_dim
            core += 2.0 * context * m.n_heads * (qk + a.v_head_dim)
        else:
            core += 4.0 * context * m.n_heads * m.head_dim
    return matmul + core
