"""Scenario schema and loading: one YAML file describes model, cluster, layout, workload, routing.

Catalog names (``model: mixtral-8x7b``, ``device: h100-sxm``, ``inter_node_link: ib-ndr-400``)
resolve to full specs; ``{preset: NAME, field: value}`` overrides single fields of a catalog
entry; a full mapping describes a new one. Every error names the file, the field path and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from moesim import catalog
from moesim.catalog.specs import DTYPE_BYTES, Dtype, GpuSpec, LinkSpec, ModelSpec, PimSpec
from moesim.config.errors import ScenarioError
from moesim.config.loading import did_you_mean, format_validation_error, read_yaml, validate
from moesim.config.serve import ServeConfig
from moesim.config.tables import read_kernel_table, read_routing_trace

MAX_ZIPF_S = 100.0
"""Largest Zipf exponent: rank^-100 already puts every token on the top experts."""


def catalog_lookup(kind: str, name: Any, /, **overrides: Any) -> Any:
    """``catalog.lookup`` with a did-you-mean for an unknown name, and a ``name`` override
    renaming the entry (``{preset: mixtral-8x7b, name: mine}``)."""
    if not isinstance(name, str):
        raise ValueError(f"a catalog {kind[:-1]} name must be a string, not {type(name).__name__}")
    known = catalog.names(kind)
    if name not in known:
        raise ValueError(
            f"unknown {kind[:-1]} '{name}'{did_you_mean(name, known)}; known: {', '.join(known)}"
        )
    rename = overrides.pop("name", None)
    spec = catalog.lookup(kind, name, **overrides)
    return spec if rename is None else spec.model_copy(update={"name": str(rename)})


def _resolver(kind: str):
    """A before-validator turning a catalog name, ``{preset: ...}`` or (models)
    ``{hf_config: path}`` into spec data."""

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            return catalog_lookup(kind, value)
        if kind == "models" and isinstance(value, dict) and "hf_config" in value:
            from moesim.config.hf import load_hf_config

            overrides = {k: v for k, v in value.items() if k != "hf_config"}
            return {**load_hf_config(value["hf_config"]), **overrides}
        if isinstance(value, dict) and "preset" in value:
            overrides = {k: v for k, v in value.items() if k != "preset"}
            return catalog_lookup(kind, value["preset"], **overrides)
        return value

    return resolve


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClusterConfig(Config):
    """Identical nodes of identical devices."""

    nodes: PositiveInt = Field(1, description="number of nodes (servers)")
    devices_per_node: PositiveInt = Field(8, description="accelerators per node")
    device: GpuSpec = Field(description="catalog device name, {preset: name, ...} or a full spec")

    _device = field_validator("device", mode="before")(_resolver("devices"))

    @property
    def n_devices(self) -> int:
        return self.nodes * self.devices_per_node


class TopologyConfig(Config):
    """Interconnect by dimension: inside a node, then between nodes."""

    intra_node: Literal["nvswitch", "full_mesh", "ring", "pcie", "bus"] | None = Field(
        None, description="default: the device's catalog intra_node_topology"
    )
    intra_node_link: LinkSpec | None = Field(
        None, description="default: the device's catalog intra_node_link"
    )
    inter_node: Literal["rail_optimized", "fat_tree"] = Field(
        "rail_optimized",
        description="rail_optimized: NIC k of every node on rail switch k, cross-rail traffic "
        "forwarded over the intra-node fabric first (PXN); fat_tree: leaf switches and a spine",
    )
    inter_node_link: LinkSpec = Field("ib-ndr-400", validate_default=True)
    nics_per_node: PositiveInt | None = Field(None, description="default: one NIC per device")
    nic_host_link: LinkSpec = Field(
        "pcie5-x16", validate_default=True, description="device-to-NIC link"
    )
    nodes_per_leaf: PositiveInt | None = Field(
        None, description="fat_tree: nodes under one leaf switch (default: all on one leaf)"
    )
    oversubscription: float = Field(
        1.0, ge=1.0, description="fat_tree: leaf downlink over uplink bandwidth"
    )

    _links = field_validator("intra_node_link", "inter_node_link", "nic_host_link", mode="before")(
        _resolver("links")
    )


class ParallelismConfig(Config):
    """Device layout. Attention: tp x dp = devices. Experts: ep x etp x edp = devices."""

    tp: PositiveInt = Field(1, description="tensor parallel degree of attention / dense layers")
    dp: PositiveInt | None = Field(None, description="attention data parallel (devices / tp)")
    ep: PositiveInt = Field(1, description="expert parallel degree: ranks experts are spread over")
    etp: PositiveInt = Field(
        1, description="expert tensor parallel: shards per expert (MiniMax-01)"
    )
    edp: PositiveInt | None = Field(
        None, description="expert data parallel: replicas of the expert set (devices / ep / etp)"
    )
    expert_placement: Literal["contiguous", "round_robin", "lpt"] = Field(
        "contiguous",
        description="expert e on EP rank e // (E/ep), e % ep, or lpt: greedy longest-processing-"
        "time packing of each layer's experts by expected load, E/ep per rank",
    )
    pp: PositiveInt = Field(
        1,
        description="pipeline stages: devices = pp x (the tp / ep layout of one stage); stage s "
        "holds a contiguous range of layers on devices [s D / pp, (s + 1) D / pp)",
    )
    pp_layers: list[PositiveInt] | None = Field(
        None, description="layers per stage, first to last (default: n_layers / pp each)"
    )
    overlap: Literal["none", "two_batch"] = Field(
        "none",
        description="inference: two_batch splits the batch into micro_batches whose dispatch / "
        "combine travel while another micro-batch's attention and experts run (DeepSeek-V3 "
        "prefill, SGLang two-batch overlap)",
    )
    micro_batches: PositiveInt | None = Field(
        None,
        description="inference micro-batches (two_batch overlap, or stages of an inference "
        "pipeline); default 2 with two_batch, else 1; training uses workload.train.micro_batches",
    )
    comm_sms: NonNegativeInt = Field(
        20,
        description="SMs the communication kernels hold while they overlap compute (two_batch): "
        "compute runs at (sm_count - comm_sms) / sm_count of its speed; DeepEP's normal kernels "
        "use 20 of the H800's 132 SMs (DeepEP README)",
    )

    @property
    def inference_micro_batches(self) -> int:
        """Micro-batches an inference step runs (2 by default with two_batch overlap)."""
        if self.micro_batches is not None:
            return self.micro_batches
        return 2 if self.overlap == "two_batch" else 1


class DtypeConfig(Config):
    """Storage dtype per tensor kind; ``compute`` picks the peak FLOP/s used."""

    weights: Dtype = "bf16"
    expert_weights: Dtype | None = Field(None, description="default: weights")
    activations: Dtype = "bf16"
    kv_cache: Dtype = "bf16"
    compute: Dtype = "bf16"
    dispatch: Dtype | None = Field(
        None, description="activation rows the all-to-all sends to experts (default: activations)"
    )
    combine: Dtype | None = Field(
        None, description="expert outputs the all-to-all sends back (default: activations)"
    )
    attention_compute: Dtype | None = Field(
        None,
        description="dtype the attention core computes in; default: bf16 when compute is fp8 "
        "(FlashAttention-3 and FlashMLA run the core in BF16), else compute",
    )

    def bytes_of(self, kind: str) -> float:
        """Bytes per element of a tensor kind (``dispatch``/``combine`` default to
        ``activations``, ``expert_weights`` to ``weights``)."""
        dtype = getattr(self, kind)
        if dtype is None:
            dtype = self.weights if kind == "expert_weights" else self.activations
        return DTYPE_BYTES[dtype]

    def attention_compute_dtype(self) -> str:
        """The attention core's compute dtype (see ``attention_compute``)."""
        if self.attention_compute is not None:
            return self.attention_compute
        return "bf16" if self.compute == "fp8" else self.compute


class TrainConfig(Config):
    """A training step (``workload.phase: train``): forward and backward of every micro-batch,
    then gradient reduction and the optimizer step (see README "Training")."""

    micro_batches: PositiveInt = Field(
        1, description="gradient accumulation: batch_size sequences run in this many passes"
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "none",
        description="activation recomputation: none; selective (attention core and SwiGLU "
        "activation recomputed, Korthikanti et al. 2022); full (each layer's forward rerun, "
        "its all-to-all included, before its backward)",
    )
    overlap: Literal["none", "chunked"] = Field(
        "none",
        description="chunked: the MoE block's tokens split into `chunks`; the all-to-all of one "
        "chunk overlaps the experts of another (Tutel / DeepEP-style pipelining)",
    )
    chunks: PositiveInt = Field(2, description="chunks per MoE block when overlap: chunked")
    grad_allreduce: Literal["ring", "tree"] = Field(
        "ring",
        description="gradient all-reduce algorithm: ring or NCCL double binary tree "
        "(zero_stage 0; reduce-scatter and all-gather are rings)",
    )
    zero_stage: Literal[0, 1, 2] = Field(
        1,
        description="ZeRO (Rajbhandari et al. 2020): 0 replicated optimizer states and "
        "all-reduce; 1 optimizer states sharded over data-parallel ranks, gradients "
        "reduce-scattered and weights all-gathered; 2 gradients sharded too",
    )
    grad_dtype: Dtype = Field("fp32", description="gradient storage and reduction dtype")
    optimizer_bytes_per_param: PositiveFloat = Field(
        12.0,
        description="Adam in mixed precision: fp32 master weight, momentum and variance "
        "(K = 12 in ZeRO, Rajbhandari et al. 2020 Sec. 3.1)",
    )
    overlap_grad_reduce: bool = Field(
        False,
        description="reduce each layer's gradients (one bucket per layer) on a communication "
        "stream as soon as the last micro-batch's backward has produced them, overlapping the "
        "rest of the backward (PyTorch DDP buckets, Megatron overlap_grad_reduce); "
        "embeddings and LM head last",
    )
    schedule: Literal["gpipe", "1f1b", "interleaved", "dualpipe"] = Field(
        "1f1b",
        description="pipeline schedule when parallelism.pp > 1: gpipe (all forwards, then all "
        "backwards), 1f1b (PipeDream-Flush, Narayanan et al. 2021), interleaved (virtual_stages "
        "chunks per stage, Megatron-LM), dualpipe (bidirectional, DeepSeek-V3 Sec. 3.2.1)",
    )
    virtual_stages: PositiveInt = Field(
        1, description="interleaved: model chunks per stage (layers of a stage split evenly)"
    )


class MtpConfig(Config):
    """Multi-token prediction / speculative decoding (DeepSeek-V3 Sec. 2.2 and 5.4.3): each
    decode step drafts ``draft_tokens`` tokens with one extra layer (the MTP module: a
    transformer block and the shared LM head) and verifies them with the full model."""

    draft_tokens: PositiveInt = Field(1, description="k: tokens drafted per step (DeepSeek-V3: 1)")
    acceptance: float = Field(
        0.85,
        ge=0.0,
        le=1.0,
        description="probability a draft token is accepted given the ones before it were "
        "(DeepSeek-V3 Sec. 5.4.3: 85-90% for the second token)",
    )

    @property
    def tokens_per_step(self) -> float:
        """Expected tokens a sequence gains per step: sum_{i=0..k} a^i (the verified token
        and each draft accepted after all earlier ones)."""
        a = self.acceptance
        return float(sum(a**i for i in range(self.draft_tokens + 1)))


class WorkloadConfig(Config):
    """One forward step: ``prefill`` processes whole prompts, ``decode`` one token per sequence."""

    phase: Literal["prefill", "decode", "train", "serve"] = "prefill"
    batch_size: int | str | None = Field(
        None,
        description="sequences in the step, whole cluster (required except for serve, or "
        "with batch_per_replica); max (decode): as many as the KV cache of every attention "
        "replica holds at seq_len (moesim/plan/batch.py)",
    )
    batch_per_replica: PositiveInt | None = Field(
        None,
        description="sequences per attention data-parallel replica (devices / tp of them); "
        "the cluster's batch is this times dp, so more devices serve more sequences",
    )
    kv_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="batch_size max: share of device memory for weights and KV cache, the "
        "rest left to activations and the runtime (vLLM gpu_memory_utilization default)",
    )
    seq_len: PositiveInt | None = Field(
        None,
        description="prompt length (prefill) or context already in the KV cache (decode); "
        "required except for serve",
    )
    dtypes: DtypeConfig = DtypeConfig()
    train: TrainConfig | None = Field(
        None, description="training step options (phase: train; defaults filled in)"
    )
    serve: ServeConfig | None = Field(
        None, description="request stream and scheduler (phase: serve; defaults filled in)"
    )
    mtp: MtpConfig | None = Field(
        None, description="multi-token prediction / speculative decoding (phase: decode)"
    )

    @model_validator(mode="before")
    @classmethod
    def _phase_defaults(cls, data: Any) -> Any:
        """A serving or training workload gets its section's defaults when it has none."""
        if isinstance(data, dict):
            section = {"serve": "serve", "train": "train"}.get(data.get("phase"))
            if section and data.get(section) is None:
                data = {**data, section: {}}
        return data

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> int | str | None:
        """A positive integer, or ``max`` (one error message, not one per union member)."""
        if value is None or value == "max":
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("Input should be a positive integer or 'max'")
        if value <= 0:
            raise ValueError("Input should be greater than 0")
        return value

    @model_validator(mode="after")
    def _phase_fields(self) -> WorkloadConfig:
        if self.phase == "serve":
            return self
        if self.batch_size == "max" and self.phase != "decode":
            raise ScenarioError("workload.batch_size", "max is for decode steps")
        if self.batch_per_replica is not None and self.phase == "train":
            raise ScenarioError("workload.batch_per_replica", "not for training steps")
        for key in ("batch_size", "seq_len"):
            if key == "batch_size" and self.batch_per_replica is not None:
                continue
            if getattr(self, key) is None:
                raise ScenarioError(f"workload.{key}", f"Field required for phase {self.phase}")
        return self

    @property
    def tokens(self) -> int:
        """Tokens processed by the step (train: every micro-batch)."""
        return self.batch_size * (self.seq_len if self.phase in ("prefill", "train") else 1)

    @property
    def pass_batch_size(self) -> int:
        """Sequences in one forward pass: a micro-batch in training, else the batch."""
        if self.phase == "train" and self.train is not None:
            return self.batch_size // self.train.micro_batches
        return self.batch_size


class BiasBalancingConfig(Config):
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 Sec. 2.1.2): after each
    step, every expert's selection bias moves by ``rate`` toward the mean load."""

    steps: int = Field(0, ge=0, description="training steps simulated before this one")
    rate: PositiveFloat = Field(
        0.001, le=1.0, description="bias update speed (gamma in the paper), at most 1"
    )


class RoutingConfig(Config):
    """How tokens choose experts: the score model, the gating policy, drops and mitigations."""

    distribution: Literal["uniform", "zipf", "dirichlet", "hot", "trace", "router"] = Field(
        "uniform",
        description="where router preferences come from: uniform; zipf (p ~ rank^-s); dirichlet "
        "(p ~ Dir(alpha)); hot (hot_experts preferred hot_weight x, the set drifting hot_drift "
        "experts per step); trace (expert ids from a file); router (a random linear router on "
        "synthetic token embeddings)",
    )
    zipf_s: float | list[float] = Field(
        1.0, description="Zipf exponent; a list gives one per MoE layer (cycled)"
    )
    dirichlet_alpha: PositiveFloat = Field(
        1.0, le=1e6, description="Dirichlet concentration (at most 1e6: uniform by then)"
    )
    hot_experts: int = Field(2, ge=1, description="hot: how many experts are hot")
    hot_weight: PositiveFloat = Field(
        8.0, le=1e6, description="hot: preference of a hot vs a cold expert (at most 1e6)"
    )
    hot_drift: int = Field(1, ge=0, description="hot: hot experts replaced per step")
    step: int = Field(0, ge=0, description="which step this is (hot drift, bias balancing)")
    trace: str | None = Field(
        None,
        description="trace: NPZ (expert_ids [moe_layers, tokens, top_k]) or CSV (layer, "
        "token, slot, expert); relative paths are relative to the scenario file",
    )
    gating: Literal["topk", "expert_choice", "hash"] = Field(
        "topk", description="token-choice top-k, expert choice, or hash routing"
    )
    node_limit: PositiveInt | None = Field(
        None, description="each token reaches at most this many nodes (DeepSeek-V3: 4)"
    )
    device_limit: PositiveInt | None = Field(
        None, description="each token reaches at most this many devices"
    )
    capacity_factor: PositiveFloat | None = Field(
        None,
        le=1e3,
        description="capacity per expert = ceil(cf * tokens * top_k / experts), at most 1e3 "
        "(above experts / top_k nothing drops); None: no drop",
    )
    drop_priority: Literal["position", "choice"] = Field(
        "position",
        description="who is dropped first over capacity: later tokens (Switch), or second "
        "choices before any first choice (GShard)",
    )
    replicate_hot: int = Field(
        0,
        ge=0,
        description="replicate the k hottest experts of each layer on the least "
        "loaded EP ranks; their tokens split between replicas",
    )
    replicas_per_hot: PositiveInt | Literal["proportional"] = Field(
        1,
        description="extra replicas each of the replicate_hot experts gets; proportional: "
        "replicate_hot extra replicas in all, each to the expert with the most expected load "
        "per copy (DeepSeek EPLB); in training the copies all-reduce their gradients",
    )
    global_routing: bool = Field(
        False,
        description="MiniMax-01 global routing: tokens may go to an expert's replica in "
        "any expert-data-parallel group, split evenly, so groups share the load",
    )
    bias_balancing: BiasBalancingConfig = BiasBalancingConfig()
    sampling: Literal["draw", "expected"] | None = Field(
        None,
        description="draw: sample which experts each token picks (per token, or multinomial "
        "counts for large layers); expected: per-expert and per-pair loads from the routing "
        "distribution's expectation, the hottest expert at the expected maximum load, no "
        "sampling (token-choice top-k; other gates draw). None: draw for sim.fidelity des, "
        "expected for analytic",
    )
    shuffle_hot_experts: bool = Field(True, description="permute which experts are hot per layer")
    dispatch: Literal["auto", "pairs", "per_rank", "per_node"] = Field(
        "auto",
        description="what the all-to-all sends: pairs (one row per token and expert, DeepEP's "
        "low-latency kernels), per_rank (a token once per EP rank holding one of its experts, "
        "Megatron's all-to-all dispatcher), per_node (once per destination node over the "
        "network, then forwarded inside the node over NVLink: DeepEP's normal kernels); "
        "auto: pairs in decode, per_node in prefill and training when an expert group spans "
        "nodes, per_rank otherwise",
    )
    per_node_stages: Literal["streamed", "sequential"] = Field(
        "streamed",
        description="per_node dispatch and combine: streamed runs the network leg and the "
        "forwarding inside the node as one kernel whose flows move together, so the slower leg "
        "sets the time (DeepEP's normal kernels forward each chunk of tokens over NVLink as it "
        "arrives over RDMA); sequential forwards only once a device's network part has arrived",
    )

    @field_validator("zipf_s")
    @classmethod
    def _non_negative(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if not values or any(not 0 <= v <= MAX_ZIPF_S for v in values):
            raise ValueError(
                f"Zipf exponents must be in [0, {MAX_ZIPF_S}] (and the list non-empty)"
            )
        return value

    def zipf_for(self, moe_layer: int) -> float:
        """Zipf exponent of the ``moe_layer``-th MoE layer."""
        s = self.zipf_s
        return s[moe_layer % len(s)] if isinstance(s, list) else s

    @property
    def per_token(self) -> bool:
        """Policies that need per-token scores (no aggregate shortcut)."""
        return (
            self.gating != "topk"
            or self.node_limit is not None
            or self.device_limit is not None
            or self.drop_priority == "choice"
            or self.distribution in ("trace", "router")
        )


class SimConfig(Config):
    """Engine options."""

    seed: NonNegativeInt = Field(0, description="one seed; per-layer seeds derive from it")
    fidelity: Literal["des", "analytic"] = Field(
        "des",
        description="des: discrete-event engine with max-min fair flows; analytic: closed form "
        "per phase (slowest device, bottleneck link), no event loop",
    )
    network_tolerance: float = Field(
        1e-2,
        gt=0,
        lt=0.1,
        description="relative time resolution of the fluid network: fair-share levels, and flow "
        "completions and sender admissions within this fraction of their collective's duration, "
        "are resolved together (step-time effect of 1e-2 against 1e-4: +0.8% on the 256-GPU "
        "DeepSeek-V3 prefill, docs/modelling.md)",
    )
    aggregate: Literal["auto", "device", "node"] = Field(
        "auto",
        description="flow granularity: device (one flow per device pair), node (inter-node "
        "traffic merged per source node and shared path suffix: exact where sources share "
        "the whole path out of their node, as with rail-optimized PXN), auto (node where "
        "that merges anything, i.e. rail-optimized topologies)",
    )
    collective_steps: Literal["aggregated", "explicit"] = Field(
        "aggregated",
        description="ring collectives as one flow per member carrying all its steps' bytes, "
        "behind a barrier (exact when members start together: the default), or as explicit "
        "steps, each waiting for its receive (a late member's delay travels round the ring; "
        "2 (n - 1) times the network events)",
    )
    parts: Literal["split", "whole"] = Field(
        "split",
        description="discrete-event runs of a cluster whose devices fall into independent parts "
        "(sets that exchange no traffic and share no link, e.g. data-parallel inference "
        "replicas): split simulates each part on its own network and event loop, so a part's "
        "flow completions and admissions are batched (network_tolerance) with its own events "
        "only, and the parts can run in parallel (workers); whole: one network for all",
    )
    workers: Literal["auto"] | int = Field(
        "auto",
        description="processes that simulate the independent parts at once (parts: split; "
        "forked, on Linux): auto is one per CPU, at most one per part; the results "
        "are the same bytes for any number; 1 in the points of a sweep that runs in processes",
    )
    trace: bool = Field(True, description="record device/link timelines for trace.json")
    progress: bool = Field(True, description="progress bar on runs longer than a few seconds")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value):
        if value == "auto" or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ):
            return value
        raise ValueError(f"'auto' or a whole number of processes, at least 1, not {value!r}")


PIM_IN_TRAINING = (
    "PIM units are not modelled in training (use pim.policy: gpu_only): a training step's "
    "GEMMs have thousands of rows, far above the 1-8 FLOP per byte PIM units are built for, "
    "and its backward pass and optimizer need the weights, gradients and activations in the "
    "GPU's memory (docs/pim.md)"
)
TIERS_IN_TRAINING = (
    "memory tiers are not modelled in training: every step updates every expert, so its "
    "weights, gradients and optimizer states stay on the GPUs (docs/pim.md)"
)


class PimConfig(Config):
    """Processing-in-memory units attached to every GPU and what runs on them (docs/pim.md;
    cost model in moesim/cost/pim.py, placement in moesim/plan/pim_placement.py). Prefill,
    decode and serving steps; training refuses it (:data:`PIM_IN_TRAINING`)."""

    device: PimSpec = Field(description="catalog pim/cim part, {preset: name, ...} or a full spec")
    units_per_gpu: PositiveInt = Field(1, description="PIM units (stacks, chips) per GPU")
    policy: Literal[
        "gpu_only", "all_experts", "cold_experts", "attention", "by_batch", "co_processing"
    ] = Field(
        "all_experts",
        description="gpu_only: nothing on PIM; all_experts: every routed expert on PIM; "
        "cold_experts: experts whose expected tokens per step are at most token_threshold on "
        "PIM, hot ones on the GPU; attention: the attention core and KV cache on PIM; "
        "by_batch: each expert runs on PIM when it has at most token_threshold tokens this "
        "step, else on the GPU (weights kept on both); co_processing: attention as with "
        "attention and the experts as with by_batch (Duplex)",
    )
    token_threshold: int | None = Field(
        None,
        ge=0,
        description="cold_experts / by_batch: tokens per expert at or below which PIM runs it; "
        "default: the crossover where PIM stops being faster than the GPU",
    )
    compute_dtype: Dtype | None = Field(None, description="PIM compute dtype (default: workload)")
    sub_batches: Literal[1, 2] = Field(
        1,
        description="policy attention, decode: 2 splits the batch in two sub-batches that "
        "take turns (NeuPIMs' sub-batch interleaving): the GPU runs one's projections and FFN "
        "while the PIM units run the other's attention",
    )

    @property
    def attention_on_pim(self) -> bool:
        """The attention core and the softmax layers' KV cache live on PIM."""
        return self.policy in ("attention", "co_processing")

    @property
    def experts_on_pim(self) -> bool:
        """Some routed experts run on PIM."""
        return self.policy not in ("gpu_only", "attention")

    @property
    def per_step_experts(self) -> bool:
        """Each expert runs where its tokens this step make it faster, weights on both."""
        return self.policy in ("by_batch", "co_processing")

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        spec = _resolver("devices")(value)
        if isinstance(spec, GpuSpec):
            raise ValueError(f"{spec.name} is a {spec.type}, not a pim or cim part")
        return spec

    @model_validator(mode="after")
    def _link(self) -> PimConfig:
        catalog.link(self.device.host_link)  # unknown link: ValueError naming the known ones
        return self


class TiersConfig(Config):
    """Memory tiers for routed experts (docs/pim.md "Memory tiers"): the ``hbm_experts``
    experts of each MoE layer a GPU expects to be busiest stay in its HBM; the others live in
    a slower tier (host DRAM, CXL memory) and are fetched over ``link`` when a token needs them,
    or run on the ``host`` CPU (cost model in moesim/cost/tiers.py, placement in
    moesim/plan/tiers.py)."""

    memory: Literal["host_dram", "cxl"] = Field(
        "host_dram", description="where offloaded experts live (names the tier in outputs)"
    )
    link: LinkSpec = Field(
        "pcie5-x16",
        validate_default=True,
        description="link an expert crosses from the tier to its GPU (catalog name or spec)",
    )
    capacity_bytes: PositiveFloat = Field(
        1.0e12, description="what the tier holds per GPU (bytes); offloaded experts must fit"
    )
    bandwidth_bytes_per_s: PositiveFloat | None = Field(
        None, description="the tier's own memory bandwidth, if below the link's (bytes/s)"
    )
    hbm_experts: NonNegativeInt = Field(
        0, description="routed experts per MoE layer each GPU keeps resident in HBM"
    )
    cache: Literal["expected_load", "lru"] = Field(
        "expected_load",
        description="which experts stay in HBM: expected_load, the hbm_experts with the "
        "highest expected load; lru, the ones the preceding steps used last (routing drawn "
        "from the same distribution)",
    )
    execute: Literal["fetch", "host"] = Field(
        "fetch",
        description="fetch: an offloaded expert's weights cross the link to the GPU before "
        "its kernels; host: it runs on the host CPU beside the GPU's experts, its tokens' "
        "activations crossing the link",
    )
    host: GpuSpec | None = Field(
        None, description="execute: host: the host CPU (catalog device of type cpu, or a spec)"
    )

    _link = field_validator("link", mode="before")(_resolver("links"))
    _host = field_validator("host", mode="before")(_resolver("devices"))

    @model_validator(mode="after")
    def _host_needed(self) -> TiersConfig:
        if self.execute == "host" and self.host is None:
            raise ScenarioError("tiers.host", "execute: host needs a host device (e.g. xeon-8480)")
        return self


class Scenario(Config):
    """A complete, validated simulation input."""

    name: str = "scenario"
    description: str = ""
    model: ModelSpec
    cluster: ClusterConfig
    topology: TopologyConfig = TopologyConfig()
    parallelism: ParallelismConfig = ParallelismConfig()
    workload: WorkloadConfig
    routing: RoutingConfig = RoutingConfig()
    sim: SimConfig = SimConfig()
    pim: PimConfig | None = Field(None, description="processing-in-memory units per GPU")
    tiers: TiersConfig | None = Field(None, description="expert weights in slower memory tiers")

    _model = field_validator("model", mode="before")(_resolver("models"))

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Scenario:
        par, m = self.parallelism, self.model
        n_dev = _check_pipeline(self)  # devices of one pipeline stage
        if n_dev % par.tp:
            raise ScenarioError("parallelism.tp", f"{par.tp} does not divide {n_dev} devices")
        if n_dev % (par.ep * par.etp):
            raise ScenarioError(
                "parallelism.ep", f"ep x etp = {par.ep * par.etp} does not divide {n_dev} devices"
            )
        if m.n_experts % par.ep:
            raise ScenarioError(
                "parallelism.ep", f"{par.ep} does not divide the model's {m.n_experts} experts"
            )
        dp, edp = n_dev // par.tp, n_dev // (par.ep * par.etp)
        if par.dp is not None and par.dp != dp:
            raise ScenarioError("parallelism.dp", f"must be devices / tp = {dp}")
        if par.edp is not None and par.edp != edp:
            raise ScenarioError("parallelism.edp", f"must be devices / (ep x etp) = {edp}")
        if m.d_ff_expert % par.etp:
            raise ScenarioError("parallelism.etp", f"{par.etp} does not divide d_ff_expert")
        wl = self.workload
        if wl.batch_per_replica is not None and wl.batch_size is not None:
            # the cluster's batch is batch_per_replica x dp (moesim/plan/batch.py)
            raise ScenarioError(
                "workload.batch_per_replica", "give batch_size or batch_per_replica, not both"
            )
        if wl.phase == "train":
            if wl.batch_size % (dp * wl.train.micro_batches):
                raise ScenarioError(
                    "workload.batch_size",
                    f"training batch {wl.batch_size} not divisible by micro_batches x "
                    f"attention data-parallel degree = {wl.train.micro_batches} x {dp}",
                )
            if wl.train.grad_allreduce == "tree" and wl.train.zero_stage:
                raise ScenarioError(
                    "workload.train.grad_allreduce",
                    "tree needs zero_stage 0: sharded optimizer states reduce-scatter and "
                    "all-gather over rings (NCCL has no tree reduce-scatter)",
                )
        if (
            self.workload.phase == "decode"
            and isinstance(self.workload.batch_size, int)
            and self.workload.batch_size % dp
        ):
            raise ScenarioError(
                "workload.batch_size",
                f"decode batch {self.workload.batch_size} not divisible "
                f"by attention data-parallel degree {dp}",
            )
        _check_overlap(self, dp)
        topo = self.topology
        nics = topo.nics_per_node or self.cluster.devices_per_node
        if nics > self.cluster.devices_per_node:
            raise ScenarioError("topology.nics_per_node", "more NICs than devices per node")
        if topo.nodes_per_leaf and self.cluster.nodes % topo.nodes_per_leaf:
            raise ScenarioError("topology.nodes_per_leaf", "must divide cluster.nodes")
        r = self.routing
        if r.distribution == "trace" and (r.trace is None or not Path(r.trace).exists()):
            raise ScenarioError("routing.trace", f"trace file {r.trace!r} not found")
        if r.dispatch == "per_node" and r.global_routing:
            raise ScenarioError(
                "routing.dispatch", "per_node needs tokens to stay in their expert group"
            )
        if r.gating == "expert_choice" and (r.node_limit or r.device_limit):
            raise ScenarioError("routing.gating", "expert_choice cannot be node/device limited")
        if r.replicate_hot > m.n_experts:
            raise ScenarioError("routing.replicate_hot", "more replicas than experts")
        pim = self.pim
        if pim is not None:  # processing in memory (moesim/pim.py)
            cdt = pim.compute_dtype or self.workload.dtypes.compute
            if cdt not in pim.device.peak_flops_per_s:
                have = ", ".join(sorted(pim.device.peak_flops_per_s))
                raise ScenarioError(
                    "pim.compute_dtype", f"{pim.device.name} computes {have}, not {cdt}"
                )
            if self.workload.phase == "train" and pim.policy != "gpu_only":
                raise ScenarioError("pim.policy", PIM_IN_TRAINING)
            if pim.sub_batches > 1 and pim.policy != "attention":
                raise ScenarioError(
                    "pim.sub_batches", "sub-batch interleaving needs pim.policy: attention"
                )
        if self.tiers is not None:
            if self.workload.phase == "train":
                raise ScenarioError("tiers", TIERS_IN_TRAINING)
            if m.n_dense_layers == m.n_layers:
                raise ScenarioError("tiers", "the model has no MoE layer: no expert to offload")
        return self

    @model_validator(mode="after")
    def _check_files(self) -> Scenario:
        """Read the data files the scenario names now, so a bad one fails at load time."""
        r, m = self.routing, self.model
        if r.distribution == "trace" and r.trace is not None:
            layers = read_routing_trace(r.trace)
            top = max(int(ids.max()) for ids in layers)
            if top >= m.n_experts:
                raise ScenarioError(
                    "routing.trace",
                    f"{r.trace}: expert id {top} but the model has {m.n_experts} experts",
                )
            if min(ids.shape[1] for ids in layers) < m.top_k:
                raise ScenarioError(
                    "routing.trace", f"{r.trace}: fewer slots per token than top_k = {m.top_k}"
                )
        if self.cluster.device.kernel_table:
            read_kernel_table(self.cluster.device.kernel_table)
        return self


def _check_pipeline(sc: Scenario) -> int:
    """Validate ``parallelism.pp`` / ``pp_layers`` and the schedule; the devices of a stage."""
    par, m, cl = sc.parallelism, sc.model, sc.cluster
    n_dev, pp = cl.n_devices, par.pp
    if n_dev % pp:
        raise ScenarioError("parallelism.pp", f"{pp} does not divide {n_dev} devices")
    stage = n_dev // pp
    if pp > 1 and stage % cl.devices_per_node and cl.devices_per_node % stage:
        raise ScenarioError(
            "parallelism.pp",
            f"a stage of {stage} devices neither fills whole nodes nor divides a node of "
            f"{cl.devices_per_node}",
        )
    if par.pp_layers is not None:
        if len(par.pp_layers) != pp or sum(par.pp_layers) != m.n_layers:
            raise ScenarioError(
                "parallelism.pp_layers",
                f"needs {pp} stages summing to the model's {m.n_layers} layers, got "
                f"{par.pp_layers}",
            )
    elif m.n_layers % pp:
        raise ScenarioError(
            "parallelism.pp",
            f"{pp} does not divide the model's {m.n_layers} layers (give parallelism.pp_layers)",
        )
    if pp > 1 and (sc.pim is not None or getattr(sc, "tiers", None) is not None):
        raise ScenarioError(
            "parallelism.pp", "pipeline stages with PIM units or memory tiers are not modelled"
        )
    tr = sc.workload.train
    if pp > 1 and sc.workload.phase == "train" and tr is not None:
        layers = par.pp_layers or [m.n_layers // pp] * pp
        if tr.schedule == "interleaved":
            v = tr.virtual_stages
            if v < 2 or any(n % v for n in layers):
                raise ScenarioError(
                    "workload.train.virtual_stages",
                    f"interleaved needs >= 2 virtual stages dividing every stage's layers "
                    f"{layers}, got {v}",
                )
            if tr.micro_batches % pp:
                raise ScenarioError(
                    "workload.train.micro_batches",
                    f"interleaved needs micro_batches a multiple of pp = {pp} (Megatron-LM)",
                )
        if tr.schedule == "dualpipe" and (
            pp % 2 or tr.micro_batches % 2 or tr.micro_batches < 2 * pp
        ):
            raise ScenarioError(
                "workload.train.schedule",
                f"dualpipe needs an even pp and an even micro_batches >= 2 pp, got pp {pp}, "
                f"micro_batches {tr.micro_batches}",
            )
        if tr.overlap != "none" or tr.overlap_grad_reduce:
            raise ScenarioError(
                "workload.train.overlap"
                if tr.overlap != "none"
                else "workload.train.overlap_grad_reduce",
                "with parallelism.pp > 1 the schedule decides the overlap (dualpipe); "
                "chunked all-to-alls and per-layer gradient buckets are not modelled there",
            )
    elif par.pp_layers is not None and pp == 1:
        raise ScenarioError("parallelism.pp_layers", "needs parallelism.pp > 1")
    return stage


def _check_overlap(sc: Scenario, dp: int) -> None:
    """Validate the inference micro-batches, the overlap mode and multi-token prediction."""
    par, wl = sc.parallelism, sc.workload
    mb = par.inference_micro_batches
    if par.micro_batches is not None or par.overlap != "none":
        if wl.phase not in ("prefill", "decode"):
            raise ScenarioError(
                "parallelism.overlap" if par.overlap != "none" else "parallelism.micro_batches",
                f"inference micro-batches run prefill and decode, not {wl.phase} "
                "(training: workload.train.micro_batches / overlap)",
            )
        if par.overlap == "two_batch" and mb < 2:
            raise ScenarioError("parallelism.micro_batches", "two_batch needs at least 2")
        if wl.batch_size % mb or ((wl.batch_size // mb) % dp and wl.phase == "decode"):
            raise ScenarioError(
                "parallelism.micro_batches",
                f"{mb} micro-batches do not split batch {wl.batch_size} evenly over {dp} "
                "attention replicas",
            )
        if wl.batch_size // mb < dp:
            raise ScenarioError(
                "parallelism.micro_batches",
                f"a micro-batch of {wl.batch_size // mb} sequences leaves some of the {dp} "
                "attention replicas idle",
            )
        if sc.pim is not None or getattr(sc, "tiers", None) is not None:
            raise ScenarioError(
                "parallelism.micro_batches",
                "inference micro-batches with PIM units or memory tiers are not modelled",
            )
        if par.overlap == "two_batch" and par.pp > 1:
            raise ScenarioError(
                "parallelism.overlap",
                "two_batch inside pipeline stages is not modelled (a stage would wait for "
                "every micro-batch before it starts); use overlap none with micro_batches",
            )
        if par.overlap == "two_batch" and sc.pim is not None:
            raise ScenarioError("parallelism.overlap", "two_batch with PIM units is not modelled")
    sms = sc.cluster.device.sm_count
    if par.overlap == "two_batch" and sms is not None and par.comm_sms >= sms:
        raise ScenarioError(
            "parallelism.comm_sms", f"{par.comm_sms} leaves none of the device's {sms} SMs"
        )
    if wl.mtp is not None and wl.phase not in ("decode", "serve"):
        raise ScenarioError(
            "workload.mtp", f"multi-token prediction drafts decode steps, not {wl.phase}"
        )


def _set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; a catalog name on the way becomes ``{preset: name}``."""
    keys = path.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if isinstance(child, str):
            child = {"preset": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            raise ScenarioError(where, f"is a {type(child).__name__}, not a mapping")
        node[key] = child
        node = child
    node[keys[-1]] = value


def _plain_copy(data: Any) -> Any:
    """A deep copy of plain YAML data: mappings and sequences copied (a tuple becomes a list,
    as a YAML round trip makes it), scalars shared."""
    if isinstance(data, dict):
        return {k: _plain_copy(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain_copy(v) for v in data]
    return data


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a scenario mapping with dotted-path ``overrides`` applied."""
    data = _plain_copy(data)
    for path, value in overrides.items():
        _set_dotted(data, path, value)
    return data


def _format_validation_error(err: ValidationError) -> tuple[str, str]:
    """First error of a scenario as (dotted path, reason), see ``format_validation_error``."""
    return format_validation_error(err, Scenario)


def cuda_graphs_in_decode(sc: Scenario) -> Scenario:
    """A decode scenario as its engine runs it: the step replays CUDA graphs, so the device
    costs ``launch_s_with_graphs`` per kernel (``GpuSpec.with_graphs``); others unchanged."""
    dev = sc.cluster.device
    if sc.workload.phase != "decode" or dev.with_graphs() is dev:
        return sc
    cluster = sc.cluster.model_copy(update={"device": dev.with_graphs()})
    return sc.model_copy(update={"cluster": cluster})


def scenario_from_dict(
    data: dict[str, Any], overrides: dict[str, Any] | None = None, file: str | None = None
) -> Scenario:
    """Validate a scenario mapping, after applying dotted-path ``overrides``."""
    if not isinstance(data, dict):
        raise ScenarioError("", "a scenario must be a YAML mapping", file)
    data = apply_overrides(data, overrides or {})
    return cuda_graphs_in_decode(validate(Scenario, data, file, "scenario"))


def _resolve_relative(data: Any, dotted: str, base: Path) -> None:
    """Make a file path at ``data[a][b]...`` absolute, relative to the scenario file, when
    that file exists (a bare name may instead name shipped data, e.g. a kernel table)."""
    *parents, key = dotted.split(".")
    block = data
    for part in parents:
        block = block.get(part) if isinstance(block, dict) else None
    value = block.get(key) if isinstance(block, dict) else None
    if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
        block[key] = str((base / value).resolve())


def load_scenario(path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Read and validate a scenario YAML file; raises :class:`ScenarioError`."""
    path = Path(path)
    data = read_yaml(path)
    for dotted in (
        "model.hf_config",
        "routing.trace",
        "cluster.device.kernel_table",
        "workload.serve.trace",
    ):
        _resolve_relative(data, dotted, path.parent)
    return scenario_from_dict(data, overrides, str(path))
