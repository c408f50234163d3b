"""Frozen specifications: what a model, a device and a link *are*.

Catalog entries (``moesim/catalog/*.yaml``) and inline scenario blocks both validate into these
pydantic models. Units are in the field names: ``_bytes``, ``_s``, ``_bytes_per_s`` (bytes per
second, per direction), ``_flops_per_s``, ``_w``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "tf32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
"""Storage size of one element per dtype (int4 packs two values per byte)."""

GEMM_TILE = 128
"""Rows and columns of one GEMM output tile (BLOCK_M = BLOCK_N = 128 of the Hopper CUTLASS and
DeepGEMM kernels), used to count tiles for ``GpuSpec.gemm_tiles_half``."""

Dtype = Literal["fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4"]
AttentionKind = Literal["softmax", "linear", "mla"]


class Spec(BaseModel):
    """Base for all specs: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MLASpec(Spec):
    """Multi-head latent attention dimensions (DeepSeek-V2/V3)."""

    q_lora_rank: PositiveInt | None = Field(None, description="None: queries not compressed")
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt


class ModelSpec(Spec):
    """Transformer MoE architecture: enough to count FLOPs, bytes and parameters per op."""

    name: str = "custom"
    description: str = ""
    n_layers: PositiveInt
    d_model: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt
    head_dim: PositiveInt
    vocab_size: PositiveInt = 32000
    d_ff_expert: PositiveInt
    n_experts: PositiveInt
    top_k: PositiveInt
    n_shared_experts: int = Field(0, ge=0)
    d_ff_shared: int = Field(0, ge=0)
    n_dense_layers: int = Field(0, ge=0, description="leading layers with a dense FFN")
    d_ff_dense: int = Field(0, ge=0)
    attention_pattern: tuple[AttentionKind, ...] = Field(
        ("softmax",), min_length=1, description="attention kind per layer, repeated cyclically"
    )
    router: Literal["linear", "attention"] = "linear"
    kv_share_group: PositiveInt = Field(1, description="consecutive layers sharing one KV cache")
    mla: MLASpec | None = None
    tied_embeddings: bool = False
    linear_output_gate: bool = Field(
        False,
        description="lightning-attention layers gate their output with a sigmoid of one more "
        "d x (heads x head_dim) projection (MiniMax-01)",
    )
    lf_conv_width: int = Field(
        0,
        ge=0,
        description="localized filtering (Yuan 2.0): two causal 1-D convolutions of this width "
        "(d -> d/2 -> d) in front of each attention; 0 = none",
    )
    active_params_exclude: tuple[Literal["input_embedding", "lm_head"], ...] = Field(
        (),
        description="parts the published active count leaves out (model cards differ: "
        "DeepSeek-V3 omits the input embedding, MiniMax-01 both embeddings)",
    )
    total_params: float | None = Field(None, description="published total parameters")
    active_params: float | None = Field(None, description="published active parameters/token")
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        if self.n_dense_layers > self.n_layers:
            raise ValueError("n_dense_layers exceeds n_layers")
        if self.n_dense_layers and not self.d_ff_dense:
            raise ValueError("n_dense_layers > 0 needs d_ff_dense")
        if self.n_shared_experts and not self.d_ff_shared:
            raise ValueError("n_shared_experts > 0 needs d_ff_shared")
        if "mla" in self.attention_pattern and self.mla is None:
            raise ValueError("attention_pattern uses 'mla' but no mla dimensions are given")
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        return self

    def attention_kind(self, layer: int) -> AttentionKind:
        """Attention kind of ``layer`` (0-based): the pattern repeated cyclically."""
        return self.attention_pattern[layer % len(self.attention_pattern)]

    def is_moe(self, layer: int) -> bool:
        """Layers after the leading dense ones carry an MoE block."""
        return layer >= self.n_dense_layers


class GpuSpec(Spec):
    """A GPU-like device: roofline constants plus its intra-node interconnect."""

    type: Literal["gpu", "cpu", "npu"] = "gpu"
    name: str = "custom-gpu"
    description: str = ""
    memory_bytes: PositiveFloat
    memory_bandwidth_bytes_per_s: PositiveFloat
    peak_flops_per_s: dict[str, PositiveFloat] = Field(
        description="dense peak per compute dtype (no sparsity)"
    )
    compute_efficiency: float = Field(
        0.7,
        gt=0,
        le=1,
        description="fraction of peak FLOP/s a large GEMM reaches (before the shape factors)",
    )
    compute_efficiency_by_dtype: dict[str, float] = Field(
        default_factory=dict,
        description="compute_efficiency for particular compute dtypes (e.g. fp8 GEMMs with "
        "fine-grained scaling reach a smaller share of their peak)",
    )
    memory_efficiency: float = Field(
        0.8, gt=0, le=1, description="fraction of peak memory bandwidth a streaming kernel reaches"
    )
    kernel_launch_s: float = Field(
        4e-6, ge=0, description="fixed cost per kernel without CUDA graphs (host dispatch)"
    )
    async_launch: bool = Field(
        False,
        description="the host enqueues kernels ahead of the device (GPU streams): a kernel costs "
        "max(its roofline time, kernel_launch_s); false: the two add (synchronous calls, numpy)",
    )
    cuda_graphs_hide_launch: bool = Field(
        False,
        description="decode steps replay CUDA graphs: each kernel costs launch_s_with_graphs, "
        "added to its time, instead of the host dispatch",
    )
    launch_s_with_graphs: float | None = Field(
        None, ge=0, description="per-kernel gap inside a CUDA graph replay (None: kernel_launch_s)"
    )
    attention_efficiency: float | None = Field(
        None,
        gt=0,
        le=1,
        description="fraction of peak FLOP/s a long attention core reaches before its shape "
        "factors (None: compute_efficiency)",
    )
    attention_efficiency_max: float = Field(
        1.0,
        gt=0,
        le=1,
        description="ceiling on the attention core's efficiency after its shape factors (wide "
        "heads cannot push it past what the tensor cores sustain at their throttled clock)",
    )
    attention_keys_half: float = Field(
        0.0,
        ge=0,
        description="keys per query at which the attention core's efficiency halves: "
        "L / (L + attention_keys_half); 0 = no penalty",
    )
    attention_head_dim_half: float = Field(
        0.0,
        ge=0,
        description="head dimension at which the attention core's efficiency halves: "
        "hd / (hd + attention_head_dim_half); 0 = no penalty",
    )
    collective_launch_s: float = Field(
        0.0,
        ge=0,
        description="fixed cost of a collective kernel, charged with each message's latency "
        "(once for an all-to-all, at each step of a ring)",
    )
    gemm_m_half: float = Field(
        0.0,
        ge=0,
        description="GEMM rows at which a GEMM reaches half its compute efficiency: "
        "efficiency x m / (m + gemm_m_half); 0 = no small-GEMM penalty",
    )
    gemm_k_half: float = Field(
        0.0,
        ge=0,
        description="GEMM inner dimension at which efficiency halves: efficiency x "
        "k / (k + gemm_k_half); 0 = no penalty",
    )
    gemm_tiles_half: dict[str, float] = Field(
        default_factory=dict,
        description="per compute dtype, the output tiles (GEMM_TILE x GEMM_TILE) at which a GEMM "
        "reaches half its compute and bandwidth efficiency: T / (T + half), T = ceil(m / 128) x "
        "ceil(n / 128) (few tiles leave SMs idle); a dtype not listed has no tile penalty",
    )
    gemm_split_k_below_tiles: int = Field(
        0,
        ge=0,
        description="a GEMM with fewer output tiles (GEMM_TILE x GEMM_TILE) than this runs as "
        "split-K: partial products in a workspace and a reduction kernel, launched inside the "
        "same library call (cuBLAS); 0 = never",
    )
    gemm_split_k_launch_s: dict[str, float] = Field(
        default_factory=dict,
        description="per compute dtype, the host time a split-K GEMM's extra kernels add to its "
        "launch (added to kernel_launch_s; under CUDA graphs launch_s_with_graphs instead); a "
        "dtype not listed has no split-K path",
    )
    dequant_ops_per_weight: float = Field(
        0.0,
        ge=0,
        description="vector (fp32) operations to dequantise one weight of a weight-only "
        "quantised GEMM (int8/int4 weights, wider activations); 0 = not modelled",
    )
    fused_elementwise: bool = Field(
        True,
        description="elementwise chains (SwiGLU activation, softmax, weighted combine) "
        "run as one fused kernel (GPU); false: one memory pass per step, as numpy does",
    )
    gating_s_per_score: float = Field(
        0.0,
        ge=0,
        description="measured seconds per (token, expert) score for softmax, top-k "
        "and capacity (numpy's selection is compute-bound); 0 = roofline only",
    )
    kernel_table: str | None = Field(
        None,
        description="CSV of measured kernels (op, m, k, n, dtype, seconds); GEMMs it "
        "covers use it, interpolated in log space over m, the rest fall back to the roofline",
    )
    grouped_experts: bool = Field(
        True,
        description="experts run as one grouped launch (GPU grouped GEMM); false: one "
        "launch per active expert and projection (a loop over experts, as numpy does)",
    )
    sm_count: PositiveInt | None = Field(
        None,
        description="streaming multiprocessors; with parallelism.comm_sms, the share of the "
        "GPU that overlapped communication kernels take from compute (None: not modelled)",
    )
    intra_node_link: str = "nvlink4"
    intra_node_topology: Literal["nvswitch", "full_mesh", "ring", "pcie", "bus"] = "nvswitch"
    power_w: float | None = None
    energy_pj_per_flop: float = Field(
        0.0, ge=0, description="dynamic energy per FLOP (energy model; 0 = not modelled)"
    )
    memory_energy_pj_per_bit: float = Field(
        0.0, ge=0, description="DRAM energy per bit read or written (0 = not modelled)"
    )
    idle_power_w: float = Field(
        0.0, ge=0, description="static power drawn for the whole step (0 = not modelled)"
    )
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> GpuSpec:
        unknown = set(self.peak_flops_per_s) - set(DTYPE_BYTES)
        if unknown:
            raise ValueError(f"peak_flops_per_s has unknown dtypes {sorted(unknown)}")
        return self

    def efficiency(self, dtype: str) -> float:
        """Large-GEMM compute efficiency for ``dtype``."""
        return self.compute_efficiency_by_dtype.get(dtype, self.compute_efficiency)

    def with_graphs(self) -> GpuSpec:
        """This device as a CUDA graph replay sees it (decode): the per-kernel gap
        ``launch_s_with_graphs`` adds to each kernel instead of the host dispatch."""
        if not self.cuda_graphs_hide_launch or self.launch_s_with_graphs is None:
            return self
        split_k = {d: self.launch_s_with_graphs for d in self.gemm_split_k_launch_s}
        return self.model_copy(
            update={
                "kernel_launch_s": self.launch_s_with_graphs,
                "async_launch": False,
                "gemm_split_k_launch_s": split_k,
            }
        )

    def flops_per_s(self, dtype: str) -> float:
        """Peak for ``dtype``; int4 and narrower run at the device's bf16 rate (dequantised)."""
        if dtype in self.peak_flops_per_s:
            return self.peak_flops_per_s[dtype]
        for fallback in ("bf16", "fp16"):
            if fallback in self.peak_flops_per_s:
                return self.peak_flops_per_s[fallback]
        raise ValueError(f"device {self.name} has no peak for {dtype}")


class PimSpec(Spec):
    """A processing-in-memory part (``pim``: compute units beside the DRAM banks, e.g. HBM-PIM,
    GDDR6-AiM, or on a stack's logic die) or a weight-stationary compute-in-memory part (``cim``).

    One *unit* as attached to a host (a stack, a chip, a card, or a device of several stacks);
    a scenario attaches ``pim.units_per_gpu`` of them. Weights and KV cache placed on it are read
    by its compute units at ``internal_bandwidth_bytes_per_s`` (``cim``: in place, at no
    bandwidth cost); activations cross ``external_bandwidth_bytes_per_s`` over ``host_link``
    (moesim/cost/pim.py). Where the papers describe the design per bank or per stack, the entry
    gives ``stacks``, ``banks_per_stack`` and ``processing_units_per_stack``, and may give
    ``bank_bandwidth_bytes_per_s`` / ``bank_flops_per_s`` instead of the unit totals:

    ``internal_bandwidth = stacks x banks_per_stack x bank_bandwidth``,
    ``peak_flops = stacks x banks_per_stack x bank_flops``, and
    ``op/B = peak_flops / internal_bandwidth`` (:meth:`ops_per_byte`), the arithmetic intensity
    at which the unit turns from bandwidth- to compute-bound.
    """

    type: Literal["pim", "cim"] = "pim"
    name: str = "custom-pim"
    description: str = ""
    level: Literal["bank", "bank_group", "buffer_die", "logic_die", "array", "module"] = Field(
        "bank",
        description="where the compute sits: beside each bank, each bank group, on the "
        "buffer (base) die, on a logic die with extra TSVs, inside the arrays (cim), or on a "
        "separate module",
    )
    stacks: PositiveInt = Field(1, description="memory stacks or chips in one unit")
    banks_per_stack: PositiveInt | None = Field(None, description="DRAM banks per stack")
    processing_units_per_stack: PositiveInt | None = Field(
        None, description="compute units per stack (per bank, per bank pair, per bank group...)"
    )
    capacity_bytes: PositiveFloat
    internal_bandwidth_bytes_per_s: PositiveFloat | None = Field(
        None,
        description="bandwidth the compute units see, all banks of all stacks (pim; "
        "weight-stationary cim parts keep operands in their arrays and need none)",
    )
    bank_bandwidth_bytes_per_s: PositiveFloat | None = Field(
        None, description="per bank; with banks_per_stack it gives internal_bandwidth"
    )
    external_bandwidth_bytes_per_s: PositiveFloat = Field(
        description="off-chip pin bandwidth of the unit, per direction when full duplex, in "
        "and out together when half duplex"
    )
    external_duplex: Literal["full", "half"] = Field(
        "full",
        description="half: the pins carry either direction at a time (a DRAM data bus), so "
        "activations in and results out share one link; full: one link each way",
    )
    peak_flops_per_s: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="peak per supported compute dtype; other dtypes are not supported",
    )
    bank_flops_per_s: dict[str, PositiveFloat] | None = Field(
        None, description="per bank; with banks_per_stack it gives peak_flops_per_s"
    )
    compute_efficiency: float = Field(1.0, gt=0, le=1, description="fraction of peak FLOP/s")
    memory_efficiency: float = Field(
        1.0, gt=0, le=1, description="fraction of internal bandwidth a streaming kernel reaches"
    )
    command_overhead_s: float = Field(
        0.0, ge=0, description="fixed cost per kernel (host command sequence, mode switches)"
    )
    weight_stationary: bool = Field(
        False, description="cim: weights stay in the compute arrays (no weight traffic)"
    )
    host_link: str = Field(description="links.yaml entry joining the unit to its host")
    host_device: str | None = Field(
        None,
        description="devices.yaml entry the design is built around (a GPU, or an NPU: "
        "type npu); informative, the scenario's cluster.device is the host",
    )
    energy_pj_per_bit_internal: float = Field(
        0.0, ge=0, description="bank to compute unit (the host link's energy covers the pins)"
    )
    energy_pj_per_flop: float = Field(0.0, ge=0, description="per FLOP (or integer op)")
    adc_energy_pj_per_flop: float = Field(
        0.0, ge=0, description="cim: analog/digital conversion energy, amortised per op"
    )
    idle_power_w: float = Field(0.0, ge=0, description="static power per unit")
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _per_bank(cls, data: Any) -> Any:
        """Unit totals from per-bank figures: ``stacks x banks_per_stack x per-bank``."""
        if not isinstance(data, dict) or not data.get("banks_per_stack"):
            return data
        banks = data.get("stacks", 1) * data["banks_per_stack"]
        data = dict(data)
        bank_bw = data.get("bank_bandwidth_bytes_per_s")
        if bank_bw is not None:
            total = banks * bank_bw
            given = data.get("internal_bandwidth_bytes_per_s")
            if given is not None and abs(given - total) > 1e-9 * total:
                raise ValueError(
                    f"internal_bandwidth_bytes_per_s {given:g} != stacks x banks_per_stack x "
                    f"bank_bandwidth_bytes_per_s = {total:g}"
                )
            data["internal_bandwidth_bytes_per_s"] = total
        bank_flops = data.get("bank_flops_per_s")
        if bank_flops:
            data["peak_flops_per_s"] = {
                **{k: banks * v for k, v in bank_flops.items()},
                **(data.get("peak_flops_per_s") or {}),
            }
        return data

    @model_validator(mode="after")
    def _check(self) -> PimSpec:
        if not self.peak_flops_per_s:
            raise ValueError("peak_flops_per_s (or bank_flops_per_s with banks_per_stack) needed")
        unknown = set(self.peak_flops_per_s) - set(DTYPE_BYTES)
        if unknown:
            raise ValueError(f"peak_flops_per_s has unknown dtypes {sorted(unknown)}")
        if self.internal_bandwidth_bytes_per_s is None and not self.weight_stationary:
            raise ValueError("internal_bandwidth_bytes_per_s is required unless weight_stationary")
        return self

    def flops_per_s(self, dtype: str) -> float:
        """Peak for ``dtype``; no fallback: a PIM unit computes only the dtypes it has."""
        if dtype not in self.peak_flops_per_s:
            raise ValueError(
                f"{self.name} computes {', '.join(sorted(self.peak_flops_per_s))}, not {dtype}"
            )
        return self.peak_flops_per_s[dtype]

    def ops_per_byte(self, dtype: str) -> float:
        """``peak_flops / internal_bandwidth``: FLOPs per byte the banks deliver at the
        ridge point (Duplex calls it op/B); inf for a weight-stationary part."""
        if self.internal_bandwidth_bytes_per_s is None:
            return float("inf")
        return self.flops_per_s(dtype) / self.internal_bandwidth_bytes_per_s

    @property
    def banks(self) -> int | None:
        """Banks in one unit (None when the entry does not say)."""
        return None if self.banks_per_stack is None else self.stacks * self.banks_per_stack


DeviceSpec = Annotated[GpuSpec | PimSpec, Field(discriminator="type")]
"""Union of device kinds, told apart by ``type``: ``gpu``/``cpu``/``npu`` or ``pim``/``cim``."""


class LinkSpec(Spec):
    """One direction of one port: bandwidth and the latency one hop adds."""

    name: str = "custom-link"
    description: str = ""
    bandwidth_bytes_per_s: PositiveFloat
    latency_s: float = Field(ge=0)
    efficiency: float = Field(
        1.0,
        gt=0,
        le=1,
        description="fraction of bandwidth_bytes_per_s that transfers reach (protocol overhead, "
        "measured); the topology builds links at bandwidth x efficiency",
    )
    message_overhead_s: float = Field(
        0.0,
        ge=0,
        description="fixed cost per message (each step of a collective) on top of latency_s: "
        "the kernel's flag handshake and protocol setup; the largest along a path is charged",
    )
    energy_pj_per_bit: float = Field(
        0.0, ge=0, description="energy per bit carried, end to end of the hop (0 = not modelled)"
    )
    sources: dict[str, str] = Field(default_factory=dict)

    @property
    def effective_bandwidth_bytes_per_s(self) -> float:
        """``bandwidth_bytes_per_s x efficiency``: what the topology's links carry."""
        return self.bandwidth_bytes_per_s * self.efficiency
