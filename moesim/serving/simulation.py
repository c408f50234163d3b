"""Serving (``workload.phase: serve``): a request stream on continuous-batching instances.

Two layers, as in Vidur (Agrawal et al., MLSys 2024):

1. **Iteration times** from the simulator itself. A prefill of ``b`` prompts of ``p`` tokens
   and a decode step of ``B`` sequences at ``L`` cached tokens each are ordinary moesim steps
   (``workload.phase: prefill / decode``); they are timed with the engine on a small grid and
   interpolated (:class:`StepGrid`). A mixed batch maps onto the grid exactly where the step is
   linear in the batch: a decode batch at its mean context (every term of the step that depends
   on context, the KV read and the attention FLOPs, is linear in the sum of contexts); a prefill
   batch at ``p_eff = sum p^2 / sum p`` and ``b_eff = (sum p)^2 / sum p^2``, which keeps both the
   token count ``b p`` (projections, experts) and the causal attention work ``b p^2`` of the
   batch.
2. **A scheduler** per instance in simpy, one event per iteration and one per request arrival
   (never per token): at every iteration boundary, waiting requests are admitted first come
   first served while their KV cache fits and the iteration's prompt-token budget lasts, and
   prefilled together (prefill first, as vLLM's default scheduler); otherwise every running
   request decodes one token. A request reserves KV for its prompt plus all its output tokens
   at admission (no preemption). KV bytes per token and device come from
   :func:`moesim.cost.ops.kv_cache_bytes_per_token` (GQA heads over tp, MLA latent, cross-layer
   sharing) plus the fixed linear-attention state per sequence; the KV budget per device is
   ``memory_utilization x memory - weights - peak activations``.

Optional disaggregation: prefill instances hand each request's KV to a decode instance over
``kv_transfer_link`` (bytes per device / bandwidth + latency), reserved on the decode side
before the transfer starts.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import simpy
from tqdm import tqdm

from moesim.config.resolve import resolve
from moesim.config.scenario import Scenario, ScenarioError
from moesim.config.serve import ServeConfig
from moesim.cost.ops import Bytes, kv_cache_bytes_per_token, linear_state_bytes_per_seq

PERCENTILES = (50, 90, 99)


# -- KV cache ------------------------------------------------------------------------------
def kv_bytes_per_token(sc: Scenario) -> float:
    """KV-cache bytes one token adds on one device, summed over layers (GQA kv heads / tp,
    MLA latent, one cache per ``kv_share_group`` layers, nothing for linear attention)."""
    m, tp = sc.model, sc.parallelism.tp
    b = Bytes(kv_cache=sc.workload.dtypes.bytes_of("kv_cache"))
    return float(sum(kv_cache_bytes_per_token(m, i, tp, b) for i in range(m.n_layers)))


def state_bytes_per_seq(sc: Scenario) -> float:
    """Fixed recurrent state a sequence holds on one device (lightning-attention layers)."""
    m, tp = sc.model, sc.parallelism.tp
    return float(sum(linear_state_bytes_per_seq(m, i, tp) for i in range(m.n_layers)))


# -- iteration times -----------------------------------------------------------------------
_STEP_CACHE: dict[tuple[str, str, int, int], tuple[float, float, float]] = {}
"""(scenario digest, phase, batch, length) -> (step_s, weights_bytes, activations_bytes);
grid points are shared by serving runs of the same model and cluster in one process (sweeps
over arrival rate)."""


def _step_scenario(sc: Scenario, phase: str, batch: int, length: int) -> Scenario:
    """The scenario of one prefill or decode step. The memory check is left to the scheduler
    (device memory set to infinity here), so grid corners that would not fit still time."""
    serve = sc.workload.serve
    wl = sc.workload.model_copy(
        update={"phase": phase, "batch_size": int(batch), "seq_len": int(length), "serve": None}
    )
    device = sc.cluster.device.model_copy(update={"memory_bytes": math.inf})
    sim = sc.sim.model_copy(
        update={"fidelity": serve.step_fidelity, "trace": False, "progress": False}
    )
    return sc.model_copy(
        update={
            "workload": wl,
            "cluster": sc.cluster.model_copy(update={"device": device}),
            "sim": sim,
        }
    )


def _digest(sc: Scenario) -> str:
    """Everything but the request stream: what iteration times depend on."""
    data = sc.model_dump(mode="json", exclude={"name", "description"})
    serve = data["workload"].pop("serve")
    data["step_fidelity"] = serve["step_fidelity"]
    return json.dumps(data, sort_keys=True)


def step_time(sc: Scenario, phase: str, batch: int, length: int, topology=None) -> float:
    """Seconds of one ``phase`` step of ``batch`` sequences at ``length`` tokens (prompt, or
    cached context) on the scenario's cluster, with ``workload.serve.step_fidelity``."""
    return _timed_step(sc, _digest(sc), phase, batch, length, topology)[0]


def _timed_step(
    sc: Scenario, digest: str, phase: str, batch: int, length: int, topology
) -> tuple[float, float, float]:
    key = (digest, phase, int(batch), int(length))
    if key not in _STEP_CACHE:
        from moesim.engine.analytic import AnalyticEngine
        from moesim.engine.des import Engine
        from moesim.plan.workload import build_plan

        sub = _step_scenario(sc, phase, batch, length)
        plan = build_plan(sub)
        engine_cls = AnalyticEngine if sub.sim.fidelity == "analytic" else Engine
        engine = engine_cls(plan, topology=topology, progress=False).run()
        if len(_STEP_CACHE) > 100_000:
            _STEP_CACHE.clear()
        _STEP_CACHE[key] = (
            float(engine.rec.finish_s.max()),
            float(plan.memory_bytes["weights"].max()),
            float(plan.memory_bytes["activations"].max()),
        )
    return _STEP_CACHE[key]


def _length_axis(lo: int, hi: int, points: int) -> np.ndarray:
    """``points`` integers spaced geometrically from ``lo`` to ``hi`` (both included)."""
    return np.unique(np.rint(np.geomspace(lo, hi, points)).astype(np.int64))


def _batch_axis(hi: int) -> np.ndarray:
    """1, 2, 4, ... and ``hi``; at least 1 and 2, so a batch past the end extrapolates."""
    powers = 2 ** np.arange(int(math.log2(max(hi, 2))) + 1)
    return np.unique(np.append(powers, hi)).astype(np.int64)


def _interp(x: float, xp: np.ndarray, fp: np.ndarray) -> float:
    """Piecewise-linear interpolation, extended linearly past both ends (a step's time keeps
    growing with its batch); a single point is a constant."""
    if len(xp) == 1:
        return float(fp[0])
    if x > xp[-1]:
        return float(fp[-1] + (x - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]))
    if x < xp[0]:
        return float(fp[0] + (x - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0]))
    return float(np.interp(x, xp, fp))


@dataclass(frozen=True)
class StepGrid:
    """Timed prefill and decode steps and their interpolation.

    Prefill: for each prompt length ``p`` on a geometric axis over the prompt lengths, batches
    ``b = 1, 2, 4, ...`` up to what the iteration's token budget allows at that length
    (``max_batched_tokens // p``, at least 1, at most ``max_batch_size``). Decode: batches
    ``B = 1, 2, 4, ..., max_batch_size`` x contexts on a geometric axis from the shortest
    prompt to the longest prompt plus output. Linear between grid points in each axis
    (bilinear for decode, linear in ``b`` within the two bracketing prompt lengths for prefill).
    """

    prefill_lengths: np.ndarray
    prefill_batches: tuple[np.ndarray, ...]
    prefill_s: tuple[np.ndarray, ...]
    decode_batches: np.ndarray
    decode_contexts: np.ndarray
    decode_s: np.ndarray  # [batch, context]

    def prefill_time(self, prompts: np.ndarray) -> float:
        """Seconds to prefill ``prompts`` (token counts) in one iteration."""
        p = np.asarray(prompts, dtype=float)
        tokens, squares = p.sum(), (p * p).sum()
        b_eff, p_eff = tokens * tokens / squares, squares / tokens
        lengths = self.prefill_lengths
        per_length = np.array(
            [
                _interp(b_eff, bs, ts)
                for bs, ts in zip(self.prefill_batches, self.prefill_s, strict=True)
            ]
        )
        return max(_interp(p_eff, lengths.astype(float), per_length), 0.0)

    def chunk_time(self, offset: int, tokens: int) -> float:
        """Marginal seconds of prefilling prompt tokens ``offset .. offset + tokens`` in an
        iteration that already pays for the weights (a decode step runs with it): one prompt
        of ``offset + tokens`` minus one of ``offset`` tokens. The difference keeps the chunk's
        projections and expert work (linear in tokens) and its causal attention against the
        cached prefix (``(o + c)^2 - o^2``), and cancels the fixed weight streaming."""
        lengths = self.prefill_lengths.astype(float)
        single = np.array([ts[0] for ts in self.prefill_s])  # batch 1 at every length
        whole = _interp(offset + tokens, lengths, single)
        return max(whole - _interp(offset, lengths, single), 0.0)

    def decode_time(self, batch: int, mean_context: float) -> float:
        """Seconds of one decode step of ``batch`` sequences at ``mean_context`` cached tokens."""
        ctx = self.decode_contexts.astype(float)
        per_batch = np.array([_interp(mean_context, ctx, row) for row in self.decode_s])
        return max(_interp(float(batch), self.decode_batches.astype(float), per_batch), 0.0)

    def table(self) -> pd.DataFrame:
        """One row per timed grid point: phase, batch, length (prompt or context), step_s."""
        rows = [
            ("prefill", int(b), int(p), float(t))
            for p, bs, ts in zip(
                self.prefill_lengths, self.prefill_batches, self.prefill_s, strict=True
            )
            for b, t in zip(bs, ts, strict=True)
        ]
        rows += [
            ("decode", int(b), int(c), float(self.decode_s[i, j]))
            for i, b in enumerate(self.decode_batches)
            for j, c in enumerate(self.decode_contexts)
        ]
        return pd.DataFrame(rows, columns=["phase", "batch", "length", "step_s"])


@dataclass(frozen=True)
class CostModel:
    """What the scheduler needs from the simulator: iteration times and memory per device."""

    grid: StepGrid
    weights_bytes: float
    activations_bytes: float
    kv_bytes_per_token: float
    state_bytes_per_seq: float
    kv_budget_bytes: float  # per device
    dp: int
    grid_wall_s: float

    @property
    def capacity_bytes(self) -> float:
        """KV bytes (in per-device units) one instance holds: ``dp`` attention replicas."""
        return self.dp * self.kv_budget_bytes

    def footprint_bytes(self, tokens: np.ndarray | int) -> np.ndarray:
        """KV bytes (per device) of sequences holding ``tokens`` tokens each."""
        return np.asarray(tokens) * self.kv_bytes_per_token + self.state_bytes_per_seq


def build_cost_model(
    sc: Scenario, prompts: np.ndarray, outputs: np.ndarray, progress: bool = False
) -> CostModel:
    """Time the prefill and decode grid for the lengths this request stream holds."""
    from moesim.network import build_topology

    serve = sc.workload.serve
    start = time.perf_counter()
    topology = build_topology(sc.cluster, sc.topology)
    digest = _digest(sc)
    p_lo, p_hi = int(prompts.min()), int(prompts.max())
    longest = int((prompts + outputs).max()) - 1  # a request recomputed after preemption
    _check_longest_fits(sc, prompts, outputs, _timed_step(sc, digest, "decode", 1, p_lo, topology))
    if serve.kv_allocation == "on_demand" and serve.disaggregated is None:
        p_hi = max(p_hi, longest)
    lengths = _length_axis(p_lo, p_hi, serve.grid_points)
    chunked = serve.chunked_prefill_tokens and serve.disaggregated is None
    if chunked:  # chunks of one prompt: batch 1 from a single token up, and a full chunk
        extra = [1, serve.chunked_prefill_tokens] if p_hi > serve.chunked_prefill_tokens else [1]
        lengths = np.unique(np.append(extra, lengths))
        prefill_batches = tuple(_batch_axis(2) for _ in lengths)
    else:
        prefill_batches = tuple(
            _batch_axis(max(1, min(serve.max_batch_size, serve.max_batched_tokens // int(p))))
            for p in lengths
        )
    decode_batches = _batch_axis(serve.max_batch_size)
    contexts = _length_axis(p_lo, max(longest, p_lo), serve.grid_points)
    points = [
        ("prefill", int(b), int(p))
        for p, bs in zip(lengths, prefill_batches, strict=True)
        for b in bs
    ]
    points += [("decode", int(b), int(c)) for b in decode_batches for c in contexts]
    timed: dict[tuple[str, int, int], tuple[float, float, float]] = {}
    for point in tqdm(points, delay=2.0, disable=not progress, desc="iteration grid", leave=False):
        timed[point] = _timed_step(sc, digest, *point, topology)
    grid = StepGrid(
        prefill_lengths=lengths,
        prefill_batches=prefill_batches,
        prefill_s=tuple(
            np.array([timed[("prefill", int(b), int(p))][0] for b in bs])
            for p, bs in zip(lengths, prefill_batches, strict=True)
        ),
        decode_batches=decode_batches,
        decode_contexts=contexts,
        decode_s=np.array(
            [[timed[("decode", int(b), int(c))][0] for c in contexts] for b in decode_batches]
        ),
    )
    # peak activations of any iteration the scheduler may run: prefills within the token
    # budget (or one prompt) and every decode batch
    budget = serve.chunked_prefill_tokens if chunked else max(serve.max_batched_tokens, p_hi)
    activations = max(
        act for (phase, b, n), (_, _, act) in timed.items() if phase == "decode" or b * n <= budget
    )
    weights = max(w for _, w, _ in timed.values())
    dev = sc.cluster.device
    kv_budget = serve.memory_utilization * dev.memory_bytes - weights - activations
    if kv_budget <= 0:
        raise ScenarioError(
            "cluster.device",
            f"no memory left for the KV cache: {serve.memory_utilization:.0%} of "
            f"{dev.memory_bytes / 1e9:.1f} GB minus weights {weights / 1e9:.1f} GB and "
            f"activations {activations / 1e9:.1f} GB; add devices, raise parallelism.ep/tp, "
            "or use smaller dtypes",
        )
    return CostModel(
        grid=grid,
        weights_bytes=weights,
        activations_bytes=activations,
        kv_bytes_per_token=kv_bytes_per_token(sc),
        state_bytes_per_seq=state_bytes_per_seq(sc),
        kv_budget_bytes=kv_budget,
        dp=resolve(sc).dp,
        grid_wall_s=time.perf_counter() - start,
    )


def _check_longest_fits(
    sc: Scenario, prompts: np.ndarray, outputs: np.ndarray, step: tuple[float, float, float]
) -> None:
    """Before timing the grid: the longest request's KV cache must fit what the weights leave
    (activations come on top; the scheduler checks again with them)."""
    serve, dev = sc.workload.serve, sc.cluster.device
    free = serve.memory_utilization * dev.memory_bytes - step[1]
    total = prompts + outputs
    worst = int(np.argmax(total))
    need = total[worst] * kv_bytes_per_token(sc) + state_bytes_per_seq(sc)
    if need > free:
        raise ScenarioError(
            "workload.serve",
            f"a request of {prompts[worst]} prompt + {outputs[worst]} output tokens needs "
            f"{need / 1e9:.2f} GB of KV cache per device but only {max(free, 0) / 1e9:.2f} GB "
            "is left after weights; shorten requests, add devices or use a smaller kv_cache "
            "dtype",
        )


# -- the request stream ----------------------------------------------------------------------
def request_stream(sc: Scenario) -> pd.DataFrame:
    """Requests sorted by arrival: ``arrival_s``, ``prompt_tokens``, ``output_tokens``.

    Poisson: exponential gaps of mean ``1 / rate_per_s``. Gaps, prompt and output lengths
    come from three streams of ``sim.seed``, and the gaps are unit exponentials divided by the
    rate, so two rates see the same requests, compressed in time (common random numbers).
    """
    serve: ServeConfig = sc.workload.serve
    if serve.arrivals == "trace":
        return _read_trace(serve.trace)
    seed = np.random.SeedSequence(sc.sim.seed, spawn_key=(0x5E7E,))
    gaps, prompt, output = (np.random.default_rng(s) for s in seed.spawn(3))
    n = serve.n_requests
    return pd.DataFrame(
        {
            "arrival_s": np.cumsum(gaps.exponential(1.0, n)) / serve.rate_per_s,
            "prompt_tokens": serve.prompt_tokens.sample(n, prompt),
            "output_tokens": serve.output_tokens.sample(n, output),
        }
    )


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def _read_trace(path: str) -> pd.DataFrame:
    where = "workload.serve.trace"
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ScenarioError(where, f"cannot read {path}: {err}") from None
    missing = [c for c in TRACE_COLUMNS if c not in df.columns]
    if missing:
        raise ScenarioError(where, f"{path}: missing columns {missing}; need {list(TRACE_COLUMNS)}")
    df = df[list(TRACE_COLUMNS)]
    if not len(df):
        raise ScenarioError(where, f"{path}: no requests")
    numeric = df.apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any():
        raise ScenarioError(where, f"{path}: non-numeric or empty values")
    if (numeric["arrival_s"] < 0).any():
        raise ScenarioError(where, f"{path}: negative arrival_s")
    if (numeric[["prompt_tokens", "output_tokens"]] < 1).any().any():
        raise ScenarioError(where, f"{path}: prompt_tokens and output_tokens must be >= 1")
    numeric = numeric.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    return numeric.astype({"prompt_tokens": np.int64, "output_tokens": np.int64})


# -- the scheduler -------------------------------------------------------------------------
@dataclass
class _Instance:
    """One copy of the cluster: its queues and KV pool (bytes in per-device units)."""

    index: int
    role: str  # both | prefill | decode
    capacity_bytes: float
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    incoming: deque = field(default_factory=deque)  # decode role: prefilled, awaiting KV
    ready: list = field(default_factory=list)  # decode role: KV arrived
    transferring: int = 0
    used_bytes: float = 0.0
    kv_area: float = 0.0  # integral of used_bytes over time
    kv_since: float = 0.0
    wake: simpy.Event | None = None

    @property
    def load(self) -> int:
        return (
            len(self.waiting)
            + len(self.running)
            + len(self.incoming)
            + len(self.ready)
            + self.transferring
        )


class ServingSimulation:
    """Runs a request stream through the instances of a serving scenario."""

    def __init__(self, sc: Scenario, requests: pd.DataFrame, costs: CostModel) -> None:
        from moesim.engine.des import CountingEnvironment

        self.sc, self.costs = sc, costs
        self.serve: ServeConfig = sc.workload.serve
        self.env = CountingEnvironment()
        n = len(requests)
        self.arrival = requests["arrival_s"].to_numpy(dtype=float)
        self.prompt = requests["prompt_tokens"].to_numpy(dtype=np.int64)
        self.output = requests["output_tokens"].to_numpy(dtype=np.int64)
        self.generated = np.zeros(n, dtype=np.int64)
        self.instance = np.full(n, -1, dtype=np.int64)
        self.decode_instance = np.full(n, -1, dtype=np.int64)
        self.admitted_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.held = np.zeros(n)  # KV bytes reserved by each request on its current instance
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.prefilled = np.zeros(n, dtype=np.int64)  # chunked prefill: tokens in the cache
        self.last_token_s = np.full(n, np.nan)
        self.max_gap_s = np.full(n, np.nan)  # longest wait between two output tokens
        cap = costs.capacity_bytes
        dis = self.serve.disaggregated
        if dis is None:
            self.front = [_Instance(i, "both", cap) for i in range(self.serve.replicas)]
            self.back: list[_Instance] = []
        else:
            self.front = [_Instance(i, "prefill", cap) for i in range(dis.prefill_replicas)]
            self.back = [
                _Instance(dis.prefill_replicas + i, "decode", cap)
                for i in range(dis.decode_replicas)
            ]
        self.iterations: list[tuple] = []
        self.held_source: dict[int, float] = {}  # disaggregated: KV left on the prefill side
        self.in_system = 0
        self.in_system_area = 0.0
        self._since = 0.0
        self._check_fits()

    def _check_fits(self) -> None:
        """Every request must fit an empty instance, or it would wait forever."""
        full = self.costs.footprint_bytes(self.prompt + self.output)
        need = float(full.max())
        per_replica = self.costs.kv_budget_bytes
        if need > per_replica:
            worst = int(np.argmax(full))
            raise ScenarioError(
                "workload.serve",
                f"a request of {self.prompt[worst]} prompt + {self.output[worst]} output tokens "
                f"needs {need / 1e9:.2f} GB of KV cache per device but only "
                f"{per_replica / 1e9:.2f} GB is left after weights and activations; shorten "
                "requests, add devices or use a smaller kv_cache dtype",
            )

    # bookkeeping --------------------------------------------------------------------------
    def _count(self, delta: int) -> None:
        now = self.env.now
        self.in_system_area += self.in_system * (now - self._since)
        self._since = now
        self.in_system += delta

    def _reserve(self, inst: _Instance, r: int, nbytes: float) -> None:
        self._kv(inst, nbytes)
        self.held[r] = nbytes

    def _release(self, inst: _Instance, r: int) -> None:
        self._kv(inst, -self.held[r])
        self.held[r] = 0.0

    def _kv(self, inst: _Instance, delta: float) -> None:
        now = self.env.now
        inst.kv_area += inst.used_bytes * (now - inst.kv_since)
        inst.kv_since = now
        inst.used_bytes = max(inst.used_bytes + delta, 0.0)

    @staticmethod
    def _wake(inst: _Instance) -> None:
        if inst.wake is not None and not inst.wake.triggered:
            inst.wake.succeed()

    def _sleep(self, inst: _Instance):
        inst.wake = self.env.event()
        return inst.wake

    def _finish(self, inst: _Instance, r: int) -> None:
        self.done_s[r] = self.env.now
        self._release(inst, r)
        self._count(-1)

    def _record(
        self, inst: _Instance, kind: str, start: float, seqs: int, prefill: int, decode: int
    ) -> None:
        self.iterations.append(
            (
                inst.index,
                inst.role,
                kind,
                start,
                self.env.now,
                seqs,
                prefill + decode,
                prefill,
                decode,
                len(inst.waiting) + len(inst.incoming),
                len(inst.running),
                inst.used_bytes,
            )
        )

    # processes ----------------------------------------------------------------------------
    def _arrivals(self):
        env = self.env
        for r in range(len(self.arrival)):
            delay = self.arrival[r] - env.now
            if delay > 0:
                yield env.timeout(delay)
            inst = min(self.front, key=lambda i: (i.load, i.index))
            self.instance[r] = inst.index
            self._count(+1)
            inst.waiting.append(r)
            self._wake(inst)

    def _admit(self, inst: _Instance) -> list[int]:
        """First come, first served while the KV cache, the batch size and the prompt-token
        budget allow (a prompt longer than the budget runs alone)."""
        serve, batch, tokens = self.serve, [], 0
        while inst.waiting and len(inst.running) + len(batch) < serve.max_batch_size:
            r = inst.waiting[0]
            p = self._prefill_tokens(r)
            if batch and tokens + p > serve.max_batched_tokens:
                break
            if not self._take(inst, r, len(batch)):
                break
            batch.append(r)
            tokens += p
        return batch

    def _take(self, inst: _Instance, r: int, pending: int) -> bool:
        """Admit the head of the queue if its KV fits (``pending``: requests admitted in this
        iteration but not yet running): on demand its prefill tokens plus room for the next
        decode step of every running request; reserved, its prompt and output."""
        costs = self.costs
        if self.serve.kv_allocation == "on_demand" or inst.role == "prefill":
            need = float(costs.footprint_bytes(self._prefill_tokens(r)))
            decodes = inst.role == "both"
            room = (len(inst.running) + pending + 1) * costs.kv_bytes_per_token * decodes
        else:
            need = float(costs.footprint_bytes(self.prompt[r] + self.output[r]))
            room = 0.0
        if inst.used_bytes + need + room > inst.capacity_bytes:
            return False
        inst.waiting.popleft()
        self._reserve(inst, r, need)
        if np.isnan(self.admitted_s[r]):  # first admission (not a recompute)
            self.admitted_s[r] = self.env.now
        return True

    def _prefill_tokens(self, r: int) -> int:
        """Tokens a prefill of ``r`` processes: its prompt, or after a preemption its prompt and
        every token it generated but the last (recomputed into the cache)."""
        return int(self.prompt[r] + max(self.generated[r] - 1, 0))

    def _front(self, inst: _Instance):
        """A colocated (prefill and decode) or prefill-only instance."""
        env, grid = self.env, self.costs.grid
        if inst.role == "both" and self.serve.chunked_prefill_tokens:
            yield from self._front_chunked(inst)
            return
        while True:
            batch = self._admit(inst)
            if batch:
                start = env.now
                lengths = np.array([self._prefill_tokens(r) for r in batch])
                yield env.timeout(grid.prefill_time(lengths))
                for r in batch:
                    if self.generated[r] == 0:
                        self.first_token_s[r] = self.last_token_s[r] = env.now
                        self.generated[r] = 1
                    if self.output[r] == 1:
                        self._finish(inst, r)
                    elif inst.role == "both":
                        inst.running.append(r)
                    else:
                        self._hand_off(r)
                self._record(inst, "prefill", start, len(batch), int(lengths.sum()), 0)
            elif inst.role == "both" and inst.running:
                yield from self._decode(inst)
            else:
                yield self._sleep(inst)

    def _decode(self, inst: _Instance):
        env = self.env
        if inst.role == "both" and self.serve.kv_allocation == "on_demand":
            self._grow(inst)
        running = np.asarray(inst.running)
        start = env.now
        yield env.timeout(self._decode_s(running))
        self._decoded(inst, running)
        self._record(inst, "decode", start, len(running), 0, len(running))

    def _decode_s(self, running: np.ndarray) -> float:
        """One decode step of ``running`` at their mean cached context."""
        context = self.prompt[running] + self.generated[running] - 1
        return self.costs.grid.decode_time(len(running), float(context.mean()))

    def _decoded(self, inst: _Instance, running: np.ndarray) -> None:
        now = self.env.now
        gap = now - self.last_token_s[running]
        self.max_gap_s[running] = np.fmax(self.max_gap_s[running], gap)
        self.last_token_s[running] = now
        self.generated[running] += 1
        done = self.generated[running] >= self.output[running]
        for r in running[done]:
            self._finish(inst, int(r))
        inst.running = [int(r) for r in running[~done]]

    def _front_chunked(self, inst: _Instance):
        """Chunked prefill (Sarathi-Serve): every iteration decodes every running request and
        fills the rest of a ``chunked_prefill_tokens`` budget with prompt chunks, oldest first.
        Its time is the decode step plus each chunk's marginal prefill cost
        (:meth:`StepGrid.chunk_time`)."""
        env, grid, serve = self.env, self.costs.grid, self.serve
        prefilling: list[int] = []  # admitted, prompt not yet fully in the cache
        done_tokens = self.prefilled
        while True:
            if serve.kv_allocation == "on_demand" and inst.running:
                self._grow(inst)
            running = np.asarray(inst.running, dtype=np.int64)
            left = serve.chunked_prefill_tokens - len(running)
            chunks: list[tuple[int, int, int]] = []  # (request, offset, tokens)
            for r in prefilling:
                if left <= 0:
                    break
                c = min(left, self._prefill_tokens(r) - int(done_tokens[r]))
                chunks.append((r, int(done_tokens[r]), c))
                left -= c
            while (
                left > 0
                and inst.waiting
                and len(inst.running) + len(prefilling) < serve.max_batch_size
            ):
                r = inst.waiting[0]
                if not self._take(inst, r, len(prefilling)):
                    break
                prefilling.append(r)
                c = min(left, self._prefill_tokens(r))
                chunks.append((r, 0, c))
                left -= c
            if not chunks and not len(running):
                yield self._sleep(inst)
                continue
            start = env.now
            if len(running):
                t = self._decode_s(running)
            else:  # the weights are read once per iteration either way
                t = grid.decode_time(1, float(grid.decode_contexts[0]))
            t += sum(grid.chunk_time(o, c) for _, o, c in chunks)
            yield env.timeout(t)
            if len(running):
                self._decoded(inst, running)
            for r, _, c in chunks:
                done_tokens[r] += c
                if done_tokens[r] < self._prefill_tokens(r):
                    continue
                prefilling.remove(r)
                done_tokens[r] = 0
                if self.generated[r] == 0:
                    self.first_token_s[r] = self.last_token_s[r] = env.now
                    self.generated[r] = 1
                if self.output[r] == 1:
                    self._finish(inst, r)
                else:
                    inst.running.append(r)
            kind = "mixed" if chunks and len(running) else ("prefill" if chunks else "decode")
            seqs = len(running) + len(chunks)
            self._record(inst, kind, start, seqs, sum(c for _, _, c in chunks), len(running))

    def _grow(self, inst: _Instance) -> None:
        """Give every running request one more token of KV; when that does not fit, preempt
        the newest running requests (their KV freed, back to the head of the queue, recomputed
        when readmitted), as vLLM does."""
        per_token = self.costs.kv_bytes_per_token
        while (
            len(inst.running) > 1
            and inst.used_bytes + len(inst.running) * per_token > inst.capacity_bytes
        ):
            victim = inst.running.pop()
            self._release(inst, victim)
            self.preemptions[victim] += 1
            inst.waiting.appendleft(victim)
        running = np.asarray(inst.running)
        self.held[running] += per_token
        self._kv(inst, len(running) * per_token)

    def _hand_off(self, r: int) -> None:
        target = min(self.back, key=lambda i: (i.load, i.index))
        self.decode_instance[r] = target.index
        target.incoming.append(r)
        self._wake(target)

    def _transfer(self, source: _Instance, target: _Instance, r: int):
        link = self.serve.disaggregated.kv_transfer_link
        nbytes = float(self.costs.footprint_bytes(self.prompt[r]))
        yield self.env.timeout(nbytes / link.bandwidth_bytes_per_s + link.latency_s)
        self._kv(source, -self.held_source.pop(r))
        self._wake(source)
        target.transferring -= 1
        target.ready.append(r)
        self._wake(target)

    def _back(self, inst: _Instance):
        """A decode-only instance: reserve KV, receive it, decode."""
        env = self.env
        while True:
            while (
                inst.incoming
                and len(inst.running) + len(inst.ready) + inst.transferring
                < self.serve.max_batch_size
            ):
                r = inst.incoming[0]
                need = float(self.costs.footprint_bytes(self.prompt[r] + self.output[r]))
                if inst.used_bytes + need > inst.capacity_bytes:
                    break
                inst.incoming.popleft()
                source = self.front[self.instance[r]]
                self.held_source[r] = self.held[r]
                self._reserve(inst, r, need)
                inst.transferring += 1
                env.process(self._transfer(source, inst, r))
            inst.running += inst.ready
            inst.ready = []
            if inst.running:
                yield from self._decode(inst)
            else:
                yield self._sleep(inst)

    def run(self) -> ServingSimulation:
        self.env.process(self._arrivals())
        for inst in self.front:
            self.env.process(self._front(inst))
        for inst in self.back:
            self.env.process(self._back(inst))
        self.env.run()
        if np.isnan(self.done_s).any():  # a scheduling bug, not an input problem
            raise RuntimeError(f"{int(np.isnan(self.done_s).sum())} requests never finished")
        self._count(0)
        for inst in self.front + self.back:
            self._kv(inst, 0.0)
        return self


# -- results -------------------------------------------------------------------------------
@dataclass
class ServeResult:
    """``summary`` (JSON-ready), ``requests`` (one row per request), ``iterations`` (one row
    per scheduler iteration, with the KV cache in use after it) and ``grid`` (timed steps)."""

    summary: dict[str, Any]
    requests: pd.DataFrame
    iterations: pd.DataFrame
    grid: pd.DataFrame


def _stats(values: np.ndarray, name: str) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return {f"{name}_{k}_s": None for k in ("mean", *(f"p{q}" for q in PERCENTILES))}
    out = {f"{name}_mean_s": float(values.mean())}
    for q in PERCENTILES:
        out[f"{name}_p{q}_s"] = float(np.percentile(values, q))
    return out


def collect_serving(sim: ServingSimulation, wall_s: float) -> ServeResult:
    """Per-request table, iteration table and the summary of a finished serving run."""
    sc, serve, costs = sim.sc, sim.serve, sim.costs
    ttft = sim.first_token_s - sim.arrival
    decode_tokens = sim.output - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(decode_tokens > 0, (sim.done_s - sim.first_token_s) / decode_tokens, np.nan)
    latency = sim.done_s - sim.arrival
    good = (ttft <= serve.slo.ttft_s) & ((decode_tokens == 0) | (tpot <= serve.slo.tpot_s))
    decode_inst = np.where(sim.decode_instance >= 0, sim.decode_instance, sim.instance)
    requests = pd.DataFrame(
        {
            "request": np.arange(len(sim.arrival)),
            "instance": sim.instance,
            "decode_instance": decode_inst,
            "arrival_s": sim.arrival,
            "prompt_tokens": sim.prompt,
            "output_tokens": sim.output,
            "admitted_s": sim.admitted_s,
            "first_token_s": sim.first_token_s,
            "done_s": sim.done_s,
            "queue_s": sim.admitted_s - sim.arrival,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "max_token_gap_s": sim.max_gap_s,
            "latency_s": latency,
            "preemptions": sim.preemptions,
            "slo_met": good,
        }
    )
    instances = sim.front + sim.back
    capacity = {i.index: i.capacity_bytes for i in instances}
    iterations = pd.DataFrame(
        sim.iterations,
        columns=[
            "instance",
            "role",
            "kind",
            "start_s",
            "end_s",
            "sequences",
            "tokens",
            "prefill_tokens",
            "decode_tokens",
            "waiting",
            "running",
            "kv_used_bytes",
        ],
    )
    iterations["kv_utilization"] = iterations["kv_used_bytes"] / iterations["instance"].map(
        capacity
    )
    end = float(sim.done_s.max())
    n = len(sim.arrival)
    out_tokens = float(sim.output.sum())
    decodes = iterations[iterations["decode_tokens"] > 0]  # decode and mixed iterations
    prefills = iterations[iterations["prefill_tokens"] > 0]
    span = float(sim.arrival[-1] - sim.arrival[0]) if n > 1 else 0.0
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "phase": "serve",
        "requests": n,
        "instances": serve.instances,
        "devices_per_instance": sc.cluster.n_devices,
        "duration_s": end,
        "offered_rate_per_s": serve.rate_per_s
        if serve.arrivals == "poisson"
        else ((n - 1) / span if span > 0 else None),
        "throughput_tokens_per_s": out_tokens / end,
        "tokens_per_s": out_tokens / end,
        "prompt_tokens_per_s": float(sim.prompt.sum()) / end,
        "throughput_requests_per_s": n / end,
        "goodput_requests_per_s": float(good.sum()) / end,
        "slo_attainment": float(good.mean()),
        "slo": serve.slo.model_dump(),
        **_stats(ttft, "ttft"),
        **_stats(tpot, "tpot"),
        **_stats(sim.max_gap_s, "max_token_gap"),
        **_stats(latency, "latency"),
        **_stats(requests["queue_s"].to_numpy(), "queue"),
        "mean_requests_in_system": sim.in_system_area / end,
        "kv_cache": {
            "bytes_per_token": costs.kv_bytes_per_token,
            "state_bytes_per_seq": costs.state_bytes_per_seq,
            "budget_bytes_per_device": costs.kv_budget_bytes,
            "capacity_tokens": costs.capacity_bytes / costs.kv_bytes_per_token
            if costs.kv_bytes_per_token
            else None,
            "utilization_mean": float(
                sum(i.kv_area for i in instances) / (sum(capacity.values()) * end)
            ),
            "utilization_max": float(iterations["kv_utilization"].max()),
            "weights_bytes_per_device": costs.weights_bytes,
            "activations_bytes_per_device": costs.activations_bytes,
        },
        "iterations": {
            "prefill": int((iterations["kind"] == "prefill").sum()),
            "decode": int((iterations["kind"] == "decode").sum()),
            "mixed": int((iterations["kind"] == "mixed").sum()),
            "mean_decode_batch": float(decodes["decode_tokens"].mean()) if len(decodes) else 0.0,
            "mean_prefill_tokens": float(prefills["prefill_tokens"].mean())
            if len(prefills)
            else 0.0,
            "preemptions": int(sim.preemptions.sum()),
        },
        "sim": {
            "wall_s": wall_s,
            "grid_wall_s": costs.grid_wall_s,
            "grid_points": len(costs.grid.table()),
            "step_fidelity": serve.step_fidelity,
            "events": sim.env.events_processed,
        },
        "scenario_resolved": sc.model_dump(mode="json"),
    }
    return ServeResult(summary, requests, iterations, costs.grid.table())


def simulate_serving(sc: Scenario, progress: bool | None = None) -> ServeResult:
    """Serve the scenario's request stream; see the module docstring."""
    start = time.perf_counter()
    show = sc.sim.progress if progress is None else progress
    requests = request_stream(sc)
    costs = build_cost_model(
        sc,
        requests["prompt_tokens"].to_numpy(),
        requests["output_tokens"].to_numpy(),
        progress=show,
    )
    sim = ServingSimulation(sc, requests, costs).run()
    return collect_serving(sim, time.perf_counter() - start)


def write_serving_outputs(result: ServeResult, out_dir: str | Path) -> Path:
    """summary.json, requests.csv, iterations.csv, step_grid.csv and kv_cache.png."""
    import matplotlib.pyplot as plt

    from moesim.report.serving_plots import plot_kv_cache

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    result.requests.to_csv(out / "requests.csv", index=False)
    result.iterations.to_csv(out / "iterations.csv", index=False)
    result.grid.to_csv(out / "step_grid.csv", index=False)
    fig = plot_kv_cache(result.iterations)
    fig.savefig(out / "kv_cache.png", dpi=110)
    plt.close(fig)
    return out


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def print_serving_summary(s: dict[str, Any]) -> None:
    """The run's headline numbers, one line each."""
    kv, it = s["kv_cache"], s["iterations"]
    print(
        f"scenario          {s['scenario']}  ({s['instances']} instance(s) of "
        f"{s['devices_per_instance']} devices)"
    )
    rate = s["offered_rate_per_s"]
    print(
        f"requests          {s['requests']:,}"
        + (f" at {rate:.3g}/s" if rate else "")
        + f", served in {s['duration_s']:.1f} s"
    )
    print(
        f"throughput        {s['throughput_tokens_per_s']:,.0f} output tokens/s, "
        f"{s['throughput_requests_per_s']:.3g} requests/s"
    )
    print(
        f"goodput           {s['goodput_requests_per_s']:.3g} requests/s within the SLO "
        f"(ttft {_fmt_s(s['slo']['ttft_s'])}, tpot {_fmt_s(s['slo']['tpot_s'])}): "
        f"{s['slo_attainment']:.1%} of requests"
    )
    for name in ("ttft", "tpot", "max_token_gap", "latency", "queue"):
        print(
            f"{name:<17} p50 {_fmt_s(s[f'{name}_p50_s'])}, p90 {_fmt_s(s[f'{name}_p90_s'])}, "
            f"p99 {_fmt_s(s[f'{name}_p99_s'])}"
        )
    print(
        f"kv cache          {kv['bytes_per_token'] / 1e3:,.1f} kB per token per device, "
        f"{kv['budget_bytes_per_device'] / 1e9:.1f} GB per device free for it; utilization "
        f"mean {kv['utilization_mean']:.1%}, max {kv['utilization_max']:.1%}"
    )
    print(
        f"iterations        {it['prefill']:,} prefill (mean {it['mean_prefill_tokens']:,.0f} "
        f"tokens), {it['decode']:,} decode (mean batch {it['mean_decode_batch']:.1f})"
        + (f", {it['mixed']:,} mixed" if it["mixed"] else "")
    )
    print(
        f"simulated in      {s['sim']['wall_s']:.2f} s wall ({s['sim']['grid_points']} grid "
        f"steps timed in {s['sim']['grid_wall_s']:.2f} s), {s['sim']['events']:,} events"
    )
