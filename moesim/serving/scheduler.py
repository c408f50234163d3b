"""Continuous-batching schedulers in simpy, one event per iteration and one per arrival.

At every iteration boundary, waiting requests are admitted first come first served while their
KV cache fits and the iteration's prompt-token budget lasts, and prefilled together (prefill
first, as vLLM's default scheduler); otherwise every running request decodes one token (never
one event per token). Optional disaggregation: prefill instances hand each request's KV to a
decode instance over ``kv_transfer_link``, reserved on the decode side before the transfer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import simpy

from moesim.config.scenario import Scenario, ScenarioError
from moesim.config.serve import ServeConfig
from moesim.serving.cost_model import CostModel, cached_prefix_tokens


class SharedLink:
    """A link whose bandwidth its active transfers share equally (processor sharing, the
    fluid max-min share of flows on one bottleneck): with ``n`` transfers each moves at
    ``bandwidth / n``; the link re-shares at every start and finish (one event each, not per
    byte). Latency is added once per transfer, outside the shared part."""

    def __init__(self, env: simpy.Environment, bandwidth_bytes_per_s: float) -> None:
        self.env, self.bandwidth = env, bandwidth_bytes_per_s
        self.remaining: dict[simpy.Event, float] = {}
        self.since = 0.0
        self.changed: simpy.Event | None = None
        self.bytes_moved = 0.0
        self.busy_s = 0.0
        env.process(self._run())

    def send(self, nbytes: float) -> simpy.Event:
        """An event that succeeds when ``nbytes`` have crossed the link."""
        self._advance()
        done = self.env.event()
        self.remaining[done] = float(nbytes)
        self.bytes_moved += float(nbytes)
        if self.changed is not None and not self.changed.triggered:
            self.changed.succeed()
        return done

    def _advance(self) -> None:
        now = self.env.now
        if self.remaining:
            moved = self.bandwidth / len(self.remaining) * (now - self.since)
            self.busy_s += now - self.since
            for ev in self.remaining:
                self.remaining[ev] -= moved
        self.since = now

    def _run(self):
        env = self.env
        while True:
            self.changed = env.event()
            if not self.remaining:
                yield self.changed
                continue
            rate = self.bandwidth / len(self.remaining)
            first = min(self.remaining, key=self.remaining.get)
            timer = env.timeout(max(self.remaining[first], 0.0) / rate)
            yield timer | self.changed
            self._advance()
            if timer.processed:  # the smallest is through (whatever rounding left of it)
                self.remaining[first] = 0.0
            for ev in [e for e, left in self.remaining.items() if left <= 1e-6]:
                del self.remaining[ev]
                ev.succeed()


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
        self.decode_steps = np.zeros(n, dtype=np.int64)  # decode steps each request ran
        mtp = sc.workload.mtp  # multi-token prediction: accepted tokens per decode step
        self.tokens_per_step = mtp.tokens_per_step if mtp is not None else 1.0
        self.instance = np.full(n, -1, dtype=np.int64)
        self.decode_instance = np.full(n, -1, dtype=np.int64)
        self.admitted_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.held = np.zeros(n)  # KV bytes reserved by each request on its current instance
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.prefilled = np.zeros(n, dtype=np.int64)  # chunked prefill: tokens in the cache
        # prefix caching: leading prompt tokens found in the cache (never the whole prompt)
        self.cached = cached_prefix_tokens(self.serve, self.prompt)
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
        self.links: dict[int, SharedLink] = {}  # disaggregated: each decode instance's ingress
        if dis is not None:
            bw = dis.kv_transfer_link.bandwidth_bytes_per_s * dis.kv_transfer_bandwidth_share
            self.links = {i.index: SharedLink(self.env, bw) for i in self.back}
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
        self,
        inst: _Instance,
        kind: str,
        start: float,
        seqs: int,
        prefill: int,
        decode: int,
        decoding: int | None = None,
    ) -> None:
        """One iteration: ``decode`` output tokens of ``decoding`` decoded sequences (more
        tokens than sequences with multi-token prediction)."""
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
                decode if decoding is None else decoding,
            )
        )

    # processes ----------------------------------------------------------------------------
    def _arrivals(self):
        env = self.env
        for r in range(len(self.arrival)):
            delay = self.arrival[r] - env.now
            if delay > 0:
                yield env.timeout(delay)
            inst = ROUTERS[self.serve.router](self.front, r)
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
            p = self._prefill_tokens(r) - int(self.cached[r])
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

    def _prefill_s(self, lengths: np.ndarray, cached: np.ndarray) -> float:
        """One prefill iteration of prompts of ``lengths`` tokens whose first ``cached`` are in
        the prefix cache: the batch of the uncached tokens, plus for each prompt the attention
        of its new tokens to the cached prefix (:meth:`StepGrid.chunk_time` at offset
        ``cached`` minus at offset 0, at least 0)."""
        grid = self.costs.grid
        new = lengths - cached
        t = grid.prefill_time(new)
        for c, k in zip(cached[cached > 0], new[cached > 0], strict=True):
            # never negative: where the grid is concave for other reasons (expert imbalance
            # shrinking with tokens) the difference is not attention
            t += max(grid.chunk_time(int(c), int(k)) - grid.chunk_time(0, int(k)), 0.0)
        return t

    def _prefill_tokens(self, r: int) -> int:
        """Tokens a prefill of ``r`` processes: its prompt, or after a preemption its prompt and
        every token it generated but the last (recomputed into the cache)."""
        return int(self.prompt[r] + max(self.generated[r] - 1, 0))

    def _front(self, inst: _Instance):
        """A colocated (prefill and decode) or prefill-only instance."""
        env = self.env
        while True:
            batch = self._admit(inst)
            if batch:
                start = env.now
                lengths = np.array([self._prefill_tokens(r) for r in batch])
                yield env.timeout(self._prefill_s(lengths, self.cached[batch]))
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
        accepted = self._decoded(inst, running)
        self._record(inst, "decode", start, len(running), 0, accepted, len(running))

    def _decode_s(self, running: np.ndarray) -> float:
        """One decode step of ``running`` at their mean cached context."""
        context = self.prompt[running] + self.generated[running] - 1
        return self.costs.grid.decode_time(len(running), float(context.mean()))

    def _gain(self, running: np.ndarray) -> np.ndarray:
        """Tokens each of ``running`` gains in its next decode step. With multi-token
        prediction a step yields on average ``tau = sum_{i=0..k} a^i`` accepted tokens
        (:attr:`moesim.config.scenario.MtpConfig.tokens_per_step`), aggregated without random
        draws: after ``n`` decode steps a request holds ``1 + floor(n tau)`` tokens (the
        first from its prefill), at most its output; without MTP one token a step."""
        total = 1 + np.floor((self.decode_steps[running] + 1) * self.tokens_per_step + 1e-9)
        return np.minimum(total.astype(np.int64), self.output[running]) - self.generated[running]

    def _decoded(self, inst: _Instance, running: np.ndarray) -> int:
        """Advance ``running`` by one decode step; returns the output tokens it produced."""
        now = self.env.now
        gap = now - self.last_token_s[running]
        self.max_gap_s[running] = np.fmax(self.max_gap_s[running], gap)
        self.last_token_s[running] = now
        gain = self._gain(running)
        self.generated[running] += gain
        self.decode_steps[running] += 1
        done = self.generated[running] >= self.output[running]
        for r in running[done]:
            self._finish(inst, int(r))
        inst.running = [int(r) for r in running[~done]]
        return int(gain.sum())

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
                done_tokens[r] = self.cached[r]  # the cached prefix needs no compute
                c = min(left, self._prefill_tokens(r) - int(done_tokens[r]))
                chunks.append((r, int(done_tokens[r]), c))
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
            accepted = self._decoded(inst, running) if len(running) else 0
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
            prefilled = sum(c for _, _, c in chunks)
            self._record(inst, kind, start, seqs, prefilled, accepted, len(running))

    def _grow(self, inst: _Instance) -> None:
        """Give every running request the KV of the tokens its next step adds (one, or the
        accepted tokens of multi-token prediction: :meth:`_gain`); when that does not fit,
        preempt the newest running requests (their KV freed, back to the head of the queue,
        recomputed when readmitted), as vLLM does."""
        need = self._gain(np.asarray(inst.running, dtype=np.int64)) * self.costs.kv_bytes_per_token
        total = float(need.sum())
        while len(inst.running) > 1 and inst.used_bytes + total > inst.capacity_bytes:
            victim = inst.running.pop()
            total -= float(need[len(inst.running)])
            self._release(inst, victim)
            self.preemptions[victim] += 1
            inst.waiting.appendleft(victim)
        running = np.asarray(inst.running, dtype=np.int64)
        need = need[: len(running)]
        self.held[running] += need
        self._kv(inst, float(need.sum()))

    def _hand_off(self, r: int) -> None:
        target = ROUTERS[self.serve.router](self.back, r)
        self.decode_instance[r] = target.index
        target.incoming.append(r)
        self._wake(target)

    def _transfer(self, source: _Instance, target: _Instance, r: int):
        """The request's KV (per device, every device of the instance in parallel over its
        own link) into ``target``, sharing the target's links with its other transfers."""
        link = self.serve.disaggregated.kv_transfer_link
        nbytes = float(self.costs.footprint_bytes(self.prompt[r]))
        yield self.links[target.index].send(nbytes)
        yield self.env.timeout(link.latency_s)
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
        for inst in self.front + self.back:
            process = SCHEDULERS[scheduler_name(self.serve, inst.role)]
            self.env.process(process(self, inst))
        self.env.run()
        if np.isnan(self.done_s).any():  # a scheduling bug, not an input problem
            raise RuntimeError(f"{int(np.isnan(self.done_s).sum())} requests never finished")
        self._count(0)
        for inst in self.front + self.back:
            self._kv(inst, 0.0)
        return self


def _least_loaded(instances: list[_Instance], request: int) -> _Instance:
    """The instance with the fewest requests queued, running or in transfer (lowest index on
    ties)."""
    return min(instances, key=lambda i: (i.load, i.index))


def _round_robin(instances: list[_Instance], request: int) -> _Instance:
    """Request ``r`` goes to instance ``r mod n``."""
    return instances[request % len(instances)]


ROUTERS: dict[str, Callable[[list[_Instance], int], _Instance]] = {
    "least_loaded": _least_loaded,
    "round_robin": _round_robin,
}
"""``workload.serve.router``: which data-parallel replica (instance) a request joins."""

SCHEDULERS: dict[str, Callable[[ServingSimulation, _Instance], Generator]] = {
    "prefill_first": ServingSimulation._front,
    "chunked_prefill": ServingSimulation._front_chunked,
    "decode_only": ServingSimulation._back,
}
"""The process that runs one instance's iterations, by name (see :func:`scheduler_name`)."""


def scheduler_name(serve: ServeConfig, role: str) -> str:
    """Decode pools of disaggregated serving decode only; colocated instances chunk prompts when
    ``chunked_prefill_tokens`` is set; otherwise (and prefill pools) prefill first."""
    if role == "decode":
        return "decode_only"
    if role == "both" and serve.chunked_prefill_tokens:
        return "chunked_prefill"
    return "prefill_first"
