"""Parameters each device holds: ONE formula that memory, planning, training, PIM and energy
all use, consistent with what the compute of :mod:`moesim.cost.ops` reads.

Tensor parallelism over ``tp`` ranks (Megatron-LM, Shoeybi et al. 2019) splits the head
dimension of every projection; what has no head dimension is replicated on every rank:
MLA's down-projections ``q_down`` (``d x q_lora``) and ``kv_down`` (``d x (kv_lora + rope)``)
(DeepSeek-V2, Sec. 2.1), and with grouped-query attention each rank keeps
``max(1, kv_heads / tp)`` KV heads (a KV head is replicated when ``kv_heads < tp``).
The router (``d x E``) is replicated; a routed expert (``3 d d_ff``, SwiGLU) is split over
``etp`` shards; embeddings, LM head, dense FFNs and shared experts are split over ``tp``.
"""

from __future__ import annotations

from moesim.catalog.specs import ModelSpec


def attention_params_per_device(m: ModelSpec, kind: str, tp: int) -> float:
    """Attention projection parameters one tensor-parallel rank holds (and reads)."""
    d, h, hd = m.d_model, m.n_heads, m.head_dim
    if kind == "mla":
        a = m.mla
        assert a is not None
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        replicated = d * (a.kv_lora_rank + a.qk_rope_head_dim)  # kv_down
        split = a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim) + h * a.v_head_dim * d
        if a.q_lora_rank:
            replicated += d * a.q_lora_rank  # q_down
            split += a.q_lora_rank * h * qk
        else:
            split += d * h * qk
        return replicated + split / tp
    kv = h if kind == "linear" else m.n_kv_heads
    return d * (h / tp + 2 * max(1.0, kv / tp)) * hd + h * hd * d / tp


def expert_params_per_shard(m: ModelSpec, etp: int) -> float:
    """One routed expert's parameters on one of its ``etp`` shards (gate, up, down)."""
    return 3 * m.d_model * m.d_ff_expert / etp


def dense_params_per_device(m: ModelSpec, layer: int, tp: int) -> float:
    """Parameters of layer ``layer`` every device holds outside the routed experts:
    attention, then the dense FFN, or the shared experts and the router."""
    params = attention_params_per_device(m, m.attention_kind(layer), tp)
    if m.is_moe(layer):
        return (
            params
            + m.n_shared_experts * 3 * m.d_model * m.d_ff_shared / tp
            + (m.d_model * m.n_experts)
        )
    return params + 3 * m.d_model * m.d_ff_dense / tp


def embedding_params_per_device(m: ModelSpec, tp: int, matrices: int | None = None) -> float:
    """Input embeddings and LM head (one matrix when tied), split over ``tp``; ``matrices``:
    how many of them the device holds (a pipeline stage: the first the embedding, the last
    the head)."""
    count = (1 if m.tied_embeddings else 2) if matrices is None else matrices
    return m.vocab_size * m.d_model * count / tp
