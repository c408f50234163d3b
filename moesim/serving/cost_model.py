"""Serving step-cost model: iteration times from the simulator on a small grid, interpolated.

A prefill of ``b`` prompts of ``p`` tokens and a decode step of ``B`` sequences at ``L`` cached
tokens each are ordinary moesim steps (``workload.phase: prefill / decode``); they are timed
with the engine on a small grid and interpolated (:class:`StepGrid`). A mixed batch maps onto
the grid exactly where the step is linear in the batch: a decode batch at its mean context
(every term of the step that depends on context, the KV read and the attention FLOPs, is
linear in the sum of contexts); a prefill batch at ``p_eff = sum p^2 / sum p`` and
``b_eff = (sum p)^2 / sum p^2``, which keeps both the token count ``b p`` (projections,
experts) and the causal attention work ``b p^2`` of the batch. KV bytes per token and device
come from :func:`moesim.cost.ops.kv_cache_bytes_per_token`; the KV budget per device is
``memory_utilization x memory - weights - peak activations``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from moesim.config.resolve import resolve
from moesim.config.scenario import Scenario, ScenarioError
from moesim.config.serve import ServeConfig
from moesim.cost.ops import Bytes, kv_cache_bytes_per_token, linear_state_bytes_per_seq
from moesim.plan.pim_placement import kv_budget_bytes, without_memory_limits


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


def cached_prefix_tokens(serve: ServeConfig, prompts: np.ndarray) -> np.ndarray:
    """Leading prompt tokens found in the prefix cache: ``floor(hit_rate x prompt)``, at most
    ``prompt - 1`` (the last token is always computed: it yields the first output)."""
    hit = serve.prefix_cache_hit_rate
    prompts = np.asarray(prompts, dtype=np.int64)
    return np.minimum(np.floor(hit * prompts), prompts - 1).astype(np.int64)


# -- iteration times -----------------------------------------------------------------------
_STEP_CACHE: dict[tuple[str, str, int, int], tuple[float, float, float]] = {}
"""(step digest, phase, batch, length) -> (step_s, weights_bytes, activations_bytes); grid
points are shared by every serving run of the same model and cluster in one process, and
through :func:`cache_dir` between processes (sweep workers, later runs)."""
_LOADED: set[str] = set()
_CODE_DIGEST: list[str] = []


def _step_scenario(sc: Scenario, phase: str, batch: int, length: int) -> Scenario:
    """The scenario of one prefill or decode step. The memory check is left to the scheduler
    (device memory set to infinity here), so grid corners that would not fit still time."""
    serve = sc.workload.serve
    update = {"phase": phase, "batch_size": int(batch), "seq_len": int(length), "serve": None}
    if phase != "decode":
        update["mtp"] = None  # prefills draft nothing; a decode step verifies k + 1 tokens
    wl = sc.workload.model_copy(update=update)
    device = sc.cluster.device.model_copy(update={"memory_bytes": math.inf})
    sim = sc.sim.model_copy(
        update={"fidelity": serve.step_fidelity, "trace": False, "progress": False}
    )
    return sc.model_copy(
        update={
            "workload": wl,
            "cluster": sc.cluster.model_copy(update={"device": device}),
            "sim": sim,
            **without_memory_limits(sc),  # PIM units and memory tiers too
        }
    )


def _digest(sc: Scenario) -> str:
    """What iteration times depend on: the scenario without the request stream, the names,
    the fields each grid step sets itself (phase, batch, length, fidelity) and the display
    switches."""
    data = sc.model_dump(mode="json", exclude={"name", "description"})
    serve = data["workload"].pop("serve")
    for key in ("phase", "batch_size", "seq_len"):
        data["workload"].pop(key, None)
    for key in ("fidelity", "progress", "trace"):
        data["sim"].pop(key, None)
    data["step_fidelity"] = serve["step_fidelity"]
    return json.dumps(data, sort_keys=True)


def cache_dir() -> Path | None:
    """Where timed grid steps are kept between processes: ``$MOESIM_CACHE_DIR`` (empty: no
    disk cache), else ``$XDG_CACHE_HOME/moesim/steps`` or ``~/.cache/moesim/steps``."""
    env = os.environ.get("MOESIM_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "moesim" / "steps"


def _code_digest() -> str:
    """Hash of the package's code and catalog: a cached step is reused only by the same code."""
    if not _CODE_DIGEST:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml", ".csv") and path.is_file():
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
        _CODE_DIGEST.append(h.hexdigest()[:16])
    return _CODE_DIGEST[0]


def _cache_file(digest: str) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    name = hashlib.sha256((_code_digest() + digest).encode()).hexdigest()[:32]
    return folder / f"{name}.json"


def _load_steps(digest: str) -> None:
    """Fill the in-process cache from the disk cache once per digest."""
    if digest in _LOADED:
        return
    _LOADED.add(digest)
    path = _cache_file(digest)
    if path is None or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for key, value in saved.items():
        phase, batch, length = key.split(",")
        _STEP_CACHE[(digest, phase, int(batch), int(length))] = tuple(value)


def _save_steps(digest: str) -> None:
    """Write this digest's timed steps (merged with what another process wrote) atomically."""
    path = _cache_file(digest)
    if path is None:
        return
    steps = {f"{p},{b},{n}": list(v) for (d, p, b, n), v in _STEP_CACHE.items() if d == digest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with contextlib.suppress(ValueError):
                steps = {**json.loads(path.read_text()), **steps}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(steps, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk: the run goes on without the cache
        return


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
            _LOADED.clear()
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


def _interp_at(x: float, xp: list[float], f: Callable[[int], float]) -> float:
    """Piecewise-linear interpolation of ``f`` over ``xp`` at ``x``, extended linearly past
    both ends (a step's time keeps growing with its batch); a single point is a constant.
    Reads only the (at most two) values ``f(i)`` it needs, on plain floats, with the
    operations of ``np.interp`` (``slope (x - xp[j]) + fp[j]``) and without its per-call cost
    (the scheduler interpolates at every iteration)."""
    n = len(xp)
    if n == 1:
        return f(0)
    if x > xp[-1]:
        a, b = f(n - 2), f(n - 1)
        return b + (x - xp[-1]) * (b - a) / (xp[-1] - xp[-2])
    if x < xp[0]:
        a, b = f(0), f(1)
        return a + (x - xp[0]) * (b - a) / (xp[1] - xp[0])
    j = bisect.bisect_right(xp, x) - 1
    if j == n - 1 or xp[j] == x:
        return f(j)
    a = f(j)
    return (f(j + 1) - a) / (xp[j + 1] - xp[j]) * (x - xp[j]) + a


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
        return self.prefill_at(tokens * tokens / squares, squares / tokens)

    def prefill_at(self, b_eff: float, p_eff: float) -> float:
        """Seconds of the grid's prefill of ``b_eff`` prompts of ``p_eff`` tokens."""
        lengths, batches, times = self._prefill_lists
        b_eff, p_eff = float(b_eff), float(p_eff)

        def at_length(k: int) -> float:
            return _interp_at(b_eff, batches[k], times[k].__getitem__)

        return max(_interp_at(p_eff, lengths, at_length), 0.0)

    def chunk_time(self, offset: int, tokens: int) -> float:
        """Marginal seconds of prefilling prompt tokens ``offset .. offset + tokens`` in an
        iteration that already pays for the weights (a decode step runs with it): one prompt
        of ``offset + tokens`` minus one of ``offset`` tokens. The difference keeps the chunk's
        projections and expert work (linear in tokens) and its causal attention against the
        cached prefix (``(o + c)^2 - o^2``), and cancels the fixed weight streaming."""
        lengths, _, times = self._prefill_lists
        single = [ts[0] for ts in times]  # batch 1 at every length
        whole = _interp_at(float(offset + tokens), lengths, single.__getitem__)
        return max(whole - _interp_at(float(offset), lengths, single.__getitem__), 0.0)

    def decode_time(self, batch: int, mean_context: float) -> float:
        """Seconds of one decode step of ``batch`` sequences at ``mean_context`` cached tokens."""
        batches, contexts, rows = self._decode_lists
        ctx = float(mean_context)

        def at_batch(i: int) -> float:
            return _interp_at(ctx, contexts, rows[i].__getitem__)

        return max(_interp_at(float(batch), batches, at_batch), 0.0)

    @cached_property
    def _prefill_lists(self) -> tuple[list[float], list[list[float]], list[list[float]]]:
        """The prefill axes and times as plain floats (read once per iteration)."""
        return (
            [float(p) for p in self.prefill_lengths],
            [[float(b) for b in bs] for bs in self.prefill_batches],
            [[float(t) for t in ts] for ts in self.prefill_s],
        )

    @cached_property
    def _decode_lists(self) -> tuple[list[float], list[float], list[list[float]]]:
        """The decode axes and times as plain floats."""
        return (
            [float(b) for b in self.decode_batches],
            [float(c) for c in self.decode_contexts],
            [[float(t) for t in row] for row in self.decode_s],
        )

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
    topology = build_topology(sc.cluster, sc.topology, sc.pim, sc.tiers)
    digest = _digest(sc)
    _load_steps(digest)
    before = len(_STEP_CACHE)
    p_lo, p_hi = int(prompts.min()), int(prompts.max())
    if serve.prefix_cache_hit_rate > 0:  # prefills of the uncached tokens only
        p_lo = max(1, min(p_lo, int((prompts - cached_prefix_tokens(serve, prompts)).min())))
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
    if len(_STEP_CACHE) != before:
        _save_steps(digest)
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
    kv_budget = kv_budget_bytes(  # PIM may hold the cache (moesim/plan/pim_placement.py)
        sc,
        serve.memory_utilization * dev.memory_bytes - weights - activations,
        kv_bytes_per_token(sc),
    )
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
    free = kv_budget_bytes(
        sc, serve.memory_utilization * dev.memory_bytes - step[1], kv_bytes_per_token(sc)
    )
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
