"""Continuous-batching schedulers in simpy, one event per iteration and one per arrival.

At every iteration boundary, waiting requests are admitted first come first served while their
KV cache fits and the iteration's prompt-token budget lasts, and prefilled together (prefill
first, as vLLM's default scheduler); otherwise every running request decodes one token (never
one event per token). Each admitted request is packed into one of the instance's ``dp``
attention replicas (``replica_packing``), whose KV pool and batch it then stays in; an
iteration lasts as long as its slowest replica's part (the MoE all-to-all synchronises them).
Optional disaggregation: prefill instances hand each request's KV to a decode instance over
``kv_transfer_link``, reserved on the decode side before the transfer.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import simpy

from moesim.config.scenario import Scenario, ScenarioError
from moesim.config.serve import ServeConfig
from moesim.serving.cost_model import CostModel, cached_prefix_tokens


class SharedLinks:
    """Links whose bandwidth the transfers crossing them share max-min fairly (the fluid
    max-min share, by progressive filling: the most contended link fixes the rate of its
    transfers, what they leave goes to the others). A transfer may cross several links (the
    prefill replica's egress and the decode replica's ingress); with one link each of ``n``
    transfers moves at ``bandwidth / n`` (processor sharing). Rates are re-solved at every
    start and finish (one event each, not per byte). Latency is added once per transfer,
    outside the shared part."""

    def __init__(self, env: simpy.Environment, bandwidth_bytes_per_s: dict) -> None:
        self.env, self.bandwidth = env, dict(bandwidth_bytes_per_s)
        self.remaining: dict[simpy.Event, float] = {}
        self.route: dict[simpy.Event, tuple] = {}
        self.rate: dict[simpy.Event, float] = {}
        self.since = 0.0
        self.changed: simpy.Event | None = None
        self.bytes_moved = 0.0
        self.busy_s = 0.0
        env.process(self._run())

    def send(self, nbytes: float, links: tuple = ("link",)) -> simpy.Event:
        """An event that succeeds when ``nbytes`` have crossed every one of ``links``."""
        self._advance()
        done = self.env.event()
        self.remaining[done] = float(nbytes)
        self.route[done] = tuple(links)
        self.bytes_moved += float(nbytes)
        self._solve()
        if self.changed is not None and not self.changed.triggered:
            self.changed.succeed()
        return done

    def _solve(self) -> None:
        """Max-min fair rates by progressive filling."""
        left = dict(self.bandwidth)
        free = set(self.remaining)
        self.rate = {}
        while free:
            users: dict = {}
            for ev in free:
                for link in self.route[ev]:
                    users.setdefault(link, []).append(ev)
            link = min(users, key=lambda k: (left[k] / len(users[k]), str(k)))
            share = left[link] / len(users[link])
            for ev in users[link]:
                self.rate[ev] = share
                free.discard(ev)
                for other in self.route[ev]:
                    left[other] -= share

    def _advance(self) -> None:
        now = self.env.now
        if self.remaining:
            self.busy_s += now - self.since
            for ev in self.remaining:
                self.remaining[ev] -= self.rate[ev] * (now - self.since)
        self.since = now

    def _run(self):
        env = self.env
        while True:
            self.changed = env.event()
            if not self.remaining:
                yield self.changed
                continue
            first = min(self.remaining, key=lambda e: self.remaining[e] / self.rate[e])
            timer = env.timeout(max(self.remaining[first], 0.0) / self.rate[first])
            yield timer | self.changed
            self._advance()
            if timer.processed:  # the first is through (whatever rounding left of it)
                self.remaining[first] = 0.0
            done = [e for e, left in self.remaining.items() if left <= 1e-6]
            for ev in done:
                del self.remaining[ev], self.route[ev]
                ev.succeed()
            if done:
                self._solve()


class SharedLink(SharedLinks):
    """One link its transfers share equally (processor sharing)."""

    def __init__(self, env: simpy.Environment, bandwidth_bytes_per_s: float) -> None:
        super().__init__(env, {"link": bandwidth_bytes_per_s})


@dataclass
class _Replica:
    """One attention data-parallel replica of an instance: its running batch and KV pool
    (``capacity_bytes``, its share of the instance's KV memory, in per-device units)."""

    index: int
    capacity_bytes: float
    running: list = field(default_factory=list)
    seated: int = 0  # requests holding one of its batch seats (running or being prefilled)
    used_bytes: float = 0.0
    peak_bytes: float = 0.0
    kv_area: float = 0.0  # integral of used_bytes over time
    kv_since: float = 0.0


@dataclass
class _Instance:
    """One copy of the cluster: its waiting queue and its ``dp`` attention replicas, each
    with its own running batch and KV pool."""

    index: int
    role: str  # both | prefill | decode
    replicas: list[_Replica]
    batch_limit: int  # running sequences: max_batch_size
    seats: int  # running sequences per replica: ceil(max_batch_size / dp)
    waiting: deque = field(default_factory=deque)
    incoming: deque = field(default_factory=deque)  # decode role: prefilled, awaiting KV
    ready: list = field(default_factory=list)  # decode role: KV arrived
    transferring: int = 0
    cursor: int = 0  # round_robin packing: the replica the next request goes to
    wake: simpy.Event | None = None

    @property
    def capacity_bytes(self) -> float:
        return sum(rep.capacity_bytes for rep in self.replicas)

    @property
    def used_bytes(self) -> float:
        return sum(rep.used_bytes for rep in self.replicas)

    @property
    def kv_area(self) -> float:
        return sum(rep.kv_area for rep in self.replicas)

    @property
    def full(self) -> bool:
        """Every one of the instance's ``max_batch_size`` seats taken."""
        return sum(rep.seated for rep in self.replicas) >= self.batch_limit

    @property
    def n_running(self) -> int:
        return sum(len(rep.running) for rep in self.replicas)

    @property
    def load(self) -> int:
        return (
            len(self.waiting)
            + self.n_running
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
        self.replica = np.full(n, -1, dtype=np.int64)  # replica within its current instance
        self.admitted_s = np.full(n, np.nan)
        self.first_token_s = np.full(n, np.nan)
        self.done_s = np.full(n, np.nan)
        self.held = np.zeros(n)  # KV bytes reserved by each request on its current replica
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.prefilled = np.zeros(n, dtype=np.int64)  # chunked prefill: tokens in the cache
        # prefix caching: leading prompt tokens found in the cache (never the whole prompt)
        self.cached = cached_prefix_tokens(self.serve, self.prompt)
        self.last_token_s = np.full(n, np.nan)
        self.max_gap_s = np.full(n, np.nan)  # longest wait between two output tokens
        self.dp = costs.dp
        self.pack = PACKINGS[self.serve.replica_packing]
        dis = self.serve.disaggregated
        if dis is None:
            self.front = [self._instance(i, "both") for i in range(self.serve.replicas)]
            self.back: list[_Instance] = []
        else:
            self.front = [self._instance(i, "prefill") for i in range(dis.prefill_replicas)]
            self.back = [
                self._instance(dis.prefill_replicas + i, "decode")
                for i in range(dis.decode_replicas)
            ]
        self.links: SharedLinks | None = None  # disaggregated: every replica's egress, ingress
        if dis is not None:
            bw = dis.kv_transfer_link.bandwidth_bytes_per_s * dis.kv_transfer_bandwidth_share
            keys = [("out", i.index, j) for i in self.front for j in range(self.dp)]
            keys += [("in", i.index, j) for i in self.back for j in range(self.dp)]
            self.links = SharedLinks(self.env, dict.fromkeys(keys, bw))
        self.iterations: list[tuple] = []
        self.held_source: dict[int, tuple[_Replica, float]] = {}  # KV left on the prefill side
        self.in_system = 0
        self.in_system_area = 0.0
        self._since = 0.0
        self._check_fits()

    def _instance(self, index: int, role: str) -> _Instance:
        reps = [_Replica(j, self.costs.kv_budget_bytes) for j in range(self.dp)]
        limit = self.serve.max_batch_size
        return _Instance(index, role, reps, batch_limit=limit, seats=-(-limit // self.dp))

    def _check_fits(self) -> None:
        """Every request must fit an empty replica, or it would wait forever."""
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

    def _reserve(self, rep: _Replica, r: int, nbytes: float) -> None:
        self._kv(rep, nbytes)
        self.held[r] = nbytes
        self.replica[r] = rep.index
        rep.seated += 1

    def _release(self, rep: _Replica, r: int) -> None:
        self._kv(rep, -self.held[r])
        self.held[r] = 0.0

    def _kv(self, rep: _Replica, delta: float) -> None:
        now = self.env.now
        rep.kv_area += rep.used_bytes * (now - rep.kv_since)
        rep.kv_since = now
        rep.used_bytes = max(rep.used_bytes + delta, 0.0)
        rep.peak_bytes = max(rep.peak_bytes, rep.used_bytes)

    @staticmethod
    def _wake(inst: _Instance) -> None:
        if inst.wake is not None and not inst.wake.triggered:
            inst.wake.succeed()

    def _sleep(self, inst: _Instance):
        inst.wake = self.env.event()
        return inst.wake

    def _finish(self, rep: _Replica, r: int) -> None:
        self.done_s[r] = self.env.now
        self._release(rep, r)
        rep.seated -= 1
        self._count(-1)

    def _record(
        self,
        inst: _Instance,
        kind: str,
        start: float,
        seqs,
        prefill: int,
        decode: int,
        decoding: int | None = None,
    ) -> None:
        """One iteration; ``seqs``: its sequences on each replica; ``decode`` output tokens of
        ``decoding`` decoded sequences (more tokens than sequences with multi-token
        prediction)."""
        self.iterations.append(
            (
                inst.index,
                inst.role,
                kind,
                start,
                self.env.now,
                int(sum(seqs)),
                prefill + decode,
                prefill,
                decode,
                len(inst.waiting) + len(inst.incoming),
                inst.n_running,
                inst.used_bytes,
                decode if decoding is None else decoding,
                int(max(seqs)),
                int(min(seqs)),
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
        budget allow (a prompt longer than the budget runs alone); each admitted request is
        packed into a replica (``replica_packing``)."""
        serve, batch, tokens = self.serve, [], 0
        while inst.waiting:
            r = inst.waiting[0]
            p = self._prefill_tokens(r) - int(self.cached[r])
            if batch and tokens + p > serve.max_batched_tokens:
                break
            if not self._take(inst, r):
                break
            batch.append(r)
            tokens += p
        return batch

    def _take(self, inst: _Instance, r: int) -> bool:
        """Admit the head of the queue into the replica the packing policy picks, if that
        replica has a free seat and its KV fits: on demand its prefill tokens plus room for
        the next decode step of every request seated there; reserved, its prompt and
        output."""
        costs = self.costs
        rep = self.pack(inst, r)
        if rep is None:
            return False
        if self.serve.kv_allocation == "on_demand" or inst.role == "prefill":
            need = float(costs.footprint_bytes(self._prefill_tokens(r)))
            decodes = inst.role == "both"
            room = (rep.seated + 1) * costs.kv_bytes_per_token * decodes
        else:
            need = float(costs.footprint_bytes(self.prompt[r] + self.output[r]))
            room = 0.0
        if rep.used_bytes + need + room > rep.capacity_bytes:
            return False
        inst.waiting.popleft()
        inst.cursor += 1
        self._reserve(rep, r, need)
        if np.isnan(self.admitted_s[r]):  # first admission (not a recompute)
            self.admitted_s[r] = self.env.now
        return True

    def _prefill_s(self, batch: list[int]) -> float:
        """One prefill iteration of ``batch`` over its replicas: the slowest of the grid's
        prefills (:meth:`StepGrid.prefill_at`) at :func:`slowest_replica_prefill`, plus for
        each prompt of a replica the attention of its new tokens to its cached prefix
        (:meth:`StepGrid.chunk_time` at offset ``cached`` minus at offset 0, at least 0), the
        largest such sum of any replica."""
        grid = self.costs.grid
        lengths = np.array([self._prefill_tokens(r) for r in batch])
        cached = self.cached[batch]
        where = self.replica[batch]
        new = (lengths - cached).astype(float)
        t = max(grid.prefill_at(b, p) for b, p in slowest_replica_prefill(new, where, self.dp))
        extra = np.zeros(self.dp)
        for c, k, j in zip(cached[cached > 0], new[cached > 0], where[cached > 0], strict=True):
            # never negative: where the grid is concave for other reasons (expert imbalance
            # shrinking with tokens) the difference is not attention
            extra[j] += max(grid.chunk_time(int(c), int(k)) - grid.chunk_time(0, int(k)), 0.0)
        return t + float(extra.max())

    def _prefill_tokens(self, r: int) -> int:
        """Tokens a prefill of ``r`` processes: its prompt, or after a preemption its prompt and
        every token it generated but the last (recomputed into the cache)."""
        return int(self.prompt[r] + max(self.generated[r] - 1, 0))

    def _seqs(self, batch: list[int]) -> np.ndarray:
        return np.bincount(self.replica[batch], minlength=self.dp)

    def _front(self, inst: _Instance):
        """A colocated (prefill and decode) or prefill-only instance."""
        env = self.env
        while True:
            batch = self._admit(inst)
            if batch:
                start = env.now
                prompt_tokens = sum(self._prefill_tokens(r) for r in batch)
                yield env.timeout(self._prefill_s(batch))
                seqs = self._seqs(batch)
                for r in batch:
                    rep = inst.replicas[self.replica[r]]
                    if self.generated[r] == 0:
                        self.first_token_s[r] = self.last_token_s[r] = env.now
                        self.generated[r] = 1
                    if self.output[r] == 1:
                        self._finish(rep, r)
                    elif inst.role == "both":
                        rep.running.append(r)
                    else:
                        rep.seated -= 1
                        self._hand_off(rep, r)
                self._record(inst, "prefill", start, seqs, prompt_tokens, 0)
            elif inst.role == "both" and inst.n_running:
                yield from self._decode(inst)
            else:
                yield self._sleep(inst)

    def _decode(self, inst: _Instance):
        env = self.env
        if inst.role == "both" and self.serve.kv_allocation == "on_demand":
            running, counts = self._grow(inst)
        else:
            running, counts = self._running(inst)
        start = env.now
        yield env.timeout(self._decode_s(running, counts))
        accepted = self._decoded(inst, running)
        self._record(inst, "decode", start, counts, 0, accepted, len(running))

    def _running(self, inst: _Instance) -> tuple[np.ndarray, list[int]]:
        """The instance's running requests, replica after replica, and their count on each."""
        counts = [len(rep.running) for rep in inst.replicas]
        if len(counts) == 1:
            return np.array(inst.replicas[0].running, dtype=np.int64), counts
        rows = itertools.chain.from_iterable(rep.running for rep in inst.replicas)
        return np.fromiter(rows, dtype=np.int64, count=sum(counts)), counts

    def _decode_s(self, running: np.ndarray, counts: list[int]) -> float:
        """One decode step of ``running`` (``counts`` on each replica): the grid step at
        :func:`slowest_replica_decode` of their cached contexts."""
        context = self.prompt[running] + self.generated[running] - 1
        if self.dp == 1:
            batch, mean = len(running), float(context.sum()) / len(running)
        else:
            sums = np.bincount(self.replica[running], weights=context, minlength=self.dp)
            batch, mean = slowest_replica_decode(np.array(counts), sums)
        return self.costs.grid.decode_time(batch, mean)

    def _gain(self, running: np.ndarray) -> np.ndarray:
        """Tokens each of ``running`` gains in its next decode step. With multi-token
        prediction a step yields on average ``tau = sum_{i=0..k} a^i`` accepted tokens
        (:attr:`moesim.config.scenario.MtpConfig.tokens_per_step`), aggregated without random
        draws: after ``n`` decode steps a request holds ``1 + floor(n tau)`` tokens (the
        first from its prefill), at most its output; without MTP one token a step."""
        if self.tokens_per_step == 1.0:  # floor(n + 1 + 1e-9) = n + 1 for integer n: exact
            total = self.decode_steps[running] + 2
        else:
            steps = self.decode_steps[running] + 1
            total = (1 + np.floor(steps * self.tokens_per_step + 1e-9)).astype(np.int64)
        return np.minimum(total, self.output[running]) - self.generated[running]

    def _decoded(self, inst: _Instance, running: np.ndarray) -> int:
        """Advance ``running`` by one decode step; returns the output tokens it produced."""
        now = self.env.now
        last = self.last_token_s[running]
        self.max_gap_s[running] = np.fmax(self.max_gap_s[running], now - last)
        self.last_token_s[running] = now
        gain = self._gain(running)
        self.generated[running] += gain
        self.decode_steps[running] += 1
        done = self.generated[running] >= self.output[running]
        produced = int(gain.sum())
        if not done.any():
            return produced
        finished = running[done].tolist()
        for r in finished:
            self._finish(inst.replicas[self.replica[r]], r)
        gone = set(finished)
        for j in set(self.replica[finished].tolist()):
            rep = inst.replicas[j]
            rep.running = [r for r in rep.running if r not in gone]
        return produced

    def _front_chunked(self, inst: _Instance):
        """Chunked prefill (Sarathi-Serve): every iteration decodes every running request and
        fills the rest of a ``chunked_prefill_tokens`` budget with prompt chunks, oldest first.
        Its time is the decode step plus the largest sum, over replicas, of the marginal
        prefill cost of the replica's chunks (:meth:`StepGrid.chunk_time`)."""
        env, grid, serve = self.env, self.costs.grid, self.serve
        prefilling: list[int] = []  # admitted, prompt not yet fully in the cache
        done_tokens = self.prefilled
        while True:
            if serve.kv_allocation == "on_demand" and inst.n_running:
                running, counts = self._grow(inst)
            else:
                running, counts = self._running(inst)
            n_running = len(running)
            left = serve.chunked_prefill_tokens - n_running
            chunks: list[tuple[int, int, int]] = []  # (request, offset, tokens)
            for r in prefilling:
                if left <= 0:
                    break
                c = min(left, self._prefill_tokens(r) - int(done_tokens[r]))
                chunks.append((r, int(done_tokens[r]), c))
                left -= c
            while left > 0 and inst.waiting:
                r = inst.waiting[0]
                if not self._take(inst, r):
                    break
                prefilling.append(r)
                done_tokens[r] = self.cached[r]  # the cached prefix needs no compute
                c = min(left, self._prefill_tokens(r) - int(done_tokens[r]))
                chunks.append((r, int(done_tokens[r]), c))
                left -= c
            if not chunks and not n_running:
                yield self._sleep(inst)
                continue
            start = env.now
            if n_running:
                t = self._decode_s(running, counts)
            else:  # the weights are read once per iteration either way
                t = grid.decode_time(1, float(grid.decode_contexts[0]))
            per_replica = np.zeros(self.dp)
            for r, o, c in chunks:
                per_replica[self.replica[r]] += grid.chunk_time(o, c)
            yield env.timeout(t + float(per_replica.max()))
            accepted = self._decoded(inst, running) if n_running else 0
            seqs = np.array(counts) + self._seqs([r for r, _, _ in chunks])
            for r, _, c in chunks:
                done_tokens[r] += c
                if done_tokens[r] < self._prefill_tokens(r):
                    continue
                prefilling.remove(r)
                done_tokens[r] = 0
                rep = inst.replicas[self.replica[r]]
                if self.generated[r] == 0:
                    self.first_token_s[r] = self.last_token_s[r] = env.now
                    self.generated[r] = 1
                if self.output[r] == 1:
                    self._finish(rep, r)
                else:
                    rep.running.append(r)
            kind = "mixed" if chunks and n_running else ("prefill" if chunks else "decode")
            prefilled = sum(c for _, _, c in chunks)
            self._record(inst, kind, start, seqs, prefilled, accepted, n_running)

    def _grow(self, inst: _Instance) -> tuple[np.ndarray, list[int]]:
        """Give every running request the KV of the tokens its next step adds (one, or the
        accepted tokens of multi-token prediction: :meth:`_gain`); when that does not fit a
        replica, preempt its newest running requests (their KV freed, back to the head of the
        instance's queue, recomputed when readmitted), as vLLM does. Returns
        :meth:`_running` after it."""
        running, counts = self._running(inst)
        every = self._gain(running) * self.costs.kv_bytes_per_token  # replica after replica
        if len(counts) > 1 and self._grow_all(inst, running, counts, every):
            return running, counts
        preempted = False
        lo = 0
        for rep, count in zip(inst.replicas, counts, strict=True):
            need = every[lo : lo + count]
            total = float(need.sum())
            while len(rep.running) > 1 and rep.used_bytes + total > rep.capacity_bytes:
                victim = rep.running.pop()
                total -= float(need[len(rep.running)])
                self._release(rep, victim)
                rep.seated -= 1
                self.preemptions[victim] += 1
                inst.waiting.appendleft(victim)
                preempted = True
            if rep.running:  # what stays is a prefix of the replica's running list
                need = need[: len(rep.running)]
                self.held[running[lo : lo + len(rep.running)]] += need
                self._kv(rep, float(need.sum()))
            lo += count
        return self._running(inst) if preempted else (running, counts)

    def _grow_all(
        self, inst: _Instance, running: np.ndarray, counts: list[int], every: np.ndarray
    ) -> bool:
        """:meth:`_grow` in one pass where no replica preempts and each replica's sum is
        exact in any order (whole bytes per token, so integer bytes, summed below 2**53):
        every replica's total from one cumulative sum, one update of ``held``. False, with
        nothing changed, where that does not hold."""
        if not float(self.costs.kv_bytes_per_token).is_integer():
            return False
        ends = np.cumsum(counts)
        cum = np.concatenate(([0.0], np.cumsum(every)))
        if cum[-1] >= 2.0**53:
            return False
        totals = (cum[ends] - cum[ends - counts]).tolist()
        for rep, total in zip(inst.replicas, totals, strict=True):
            if len(rep.running) > 1 and rep.used_bytes + total > rep.capacity_bytes:
                return False
        self.held[running] += every
        now = self.env.now
        for rep, total in zip(inst.replicas, totals, strict=True):
            if rep.running:  # self._kv(rep, total), inlined
                used = rep.used_bytes
                rep.kv_area += used * (now - rep.kv_since)
                rep.kv_since = now
                rep.used_bytes = used = max(used + total, 0.0)
                rep.peak_bytes = max(rep.peak_bytes, used)
        return True

    def _hand_off(self, rep: _Replica, r: int) -> None:
        target = ROUTERS[self.serve.router](self.back, r)
        self.decode_instance[r] = target.index
        self.held_source[r] = (rep, self.held[r])
        target.incoming.append(r)
        self._wake(target)

    def _transfer(self, source: _Instance, target: _Instance, r: int):
        """The request's KV (per device, every device of the replica in parallel over its own
        link) from its prefill replica's links into its decode replica's, sharing both with
        the other transfers crossing them (:class:`SharedLinks`)."""
        link = self.serve.disaggregated.kv_transfer_link
        nbytes = float(self.costs.footprint_bytes(self.prompt[r]))
        rep, held = self.held_source.pop(r)
        route = (("out", source.index, rep.index), ("in", target.index, int(self.replica[r])))
        yield self.links.send(nbytes, route)
        yield self.env.timeout(link.latency_s)
        self._kv(rep, -held)
        self._wake(source)
        target.transferring -= 1
        target.ready.append(r)
        self._wake(target)

    def _back(self, inst: _Instance):
        """A decode-only instance: reserve KV on a replica, receive it, decode."""
        env = self.env
        while True:
            while inst.incoming:
                r = inst.incoming[0]
                rep = self.pack(inst, r)
                need = float(self.costs.footprint_bytes(self.prompt[r] + self.output[r]))
                if rep is None or rep.used_bytes + need > rep.capacity_bytes:
                    break
                inst.incoming.popleft()
                inst.cursor += 1
                source = self.front[self.instance[r]]
                self._reserve(rep, r, need)
                inst.transferring += 1
                env.process(self._transfer(source, inst, r))
            for r in inst.ready:
                inst.replicas[self.replica[r]].running.append(r)
            inst.ready = []
            if inst.n_running:
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
            for rep in inst.replicas:
                self._kv(rep, 0.0)
        return self


def slowest_replica_decode(counts: np.ndarray, context_sums: np.ndarray) -> tuple[int, float]:
    """The grid decode step that stands for replicas running ``counts`` sequences holding
    ``context_sums`` cached tokens each: every replica waits for the slowest in the MoE
    layer's all-to-all, so the step is the even-split step (``split_evenly``) whose busiest
    replica holds ``b = max counts`` sequences and ``max context_sums`` cached tokens:
    ``B = max(sum counts, dp (b - 1) + 1)`` sequences at ``max context_sums / b`` each. Exact
    for one replica and for batches as even as integers allow; otherwise the expert work is
    taken at ``B >= sum counts`` tokens (an upper bound)."""
    total = int(counts.sum())
    if len(counts) == 1:
        return total, float(context_sums[0]) / total
    b = int(counts.max())
    return max(total, len(counts) * (b - 1) + 1), float(context_sums.max()) / b


def slowest_replica_prefill(
    new: np.ndarray, replica: np.ndarray, dp: int
) -> list[tuple[float, float]]:
    """The grid prefill points ``(b_eff, p_eff)`` that stand for prompts of ``new`` tokens
    packed on ``replica``, one per busy replica ``r`` (the iteration takes the slowest): the
    replica's own ``p_r = sum p^2 / sum p`` and ``b_r = (sum p)^2 / sum p^2``
    (:meth:`StepGrid.prefill_time`), at ``b = max(T / p_r, dp (b_r - 1) + 1)`` prompts, ``T``
    the instance's prompt tokens: the even-split step whose busiest replica holds ``b_r``
    prompts of ``p_r`` and whose experts see at least ``T`` tokens. One replica: the
    instance's own point; identical prompts packed evenly: exact."""
    tokens, squares = new.sum(), (new * new).sum()
    if dp == 1:
        return [(tokens * tokens / squares, squares / tokens)]
    t_r = np.bincount(replica, weights=new, minlength=dp)
    q_r = np.bincount(replica, weights=new * new, minlength=dp)
    busy = t_r > 0
    b_r, p_r = t_r[busy] ** 2 / q_r[busy], q_r[busy] / t_r[busy]
    b = np.maximum(tokens / p_r, dp * (b_r - 1) + 1)
    return list(zip(b.tolist(), p_r.tolist(), strict=True))


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


def _pack_least_loaded(inst: _Instance, request: int) -> _Replica | None:
    """The replica with the fewest KV bytes in use (so the most free) among those with a free
    seat, lowest index on ties; none when every replica's batch is full."""
    if inst.full:
        return None
    free = [rep for rep in inst.replicas if rep.seated < inst.seats]
    return min(free, key=lambda rep: (rep.used_bytes, rep.index)) if free else None


def _pack_round_robin(inst: _Instance, request: int) -> _Replica | None:
    """The instance's replicas in turn (the ``k``-th request admitted to replica ``k mod dp``);
    none, so admission waits, while that replica's batch is full."""
    rep = inst.replicas[inst.cursor % len(inst.replicas)]
    return rep if rep.seated < inst.seats and not inst.full else None


PACKINGS: dict[str, Callable[[_Instance, int], _Replica | None]] = {
    "least_loaded": _pack_least_loaded,
    "round_robin": _pack_round_robin,
}
"""``workload.serve.replica_packing``: which attention data-parallel replica of an instance an
admitted request joins (its KV cache and its decode batch stay there)."""

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
