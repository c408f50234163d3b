"""Pipeline stages and micro-batches: which layers each stage holds, the order in which a
stage runs its work, and the whole-cluster plan assembled from one plan per stage.

Layout: with ``parallelism.pp`` stages of ``D / pp`` devices, stage ``s`` is the devices
``[s D / pp, (s + 1) D / pp)``, each laid out inside as a cluster of its own (tp, ep, etp,
its all-to-alls within the stage). A stage's plan is :func:`moesim.plan.workload.build_plan`
of :func:`piece_scenario` (one stage, one micro-batch) over that stage's layers only, so its
weights, KV cache and optimizer states count only them; :func:`assemble` places the stage
plans side by side.

A *chunk* is a set of layers a stage runs in one piece of work; a micro-batch's *route* is
the chain of (stage, chunk) it goes through. Work items are ``(kind, micro-batch, chunk)``
with kind ``F`` (forward), ``B`` (backward, weight gradients included), or the zero-bubble
split of a backward (Qi et al., ICLR 2024): ``I`` (input gradients only, sent on to the
previous stage) and ``W`` (the weight gradients of an earlier ``I``, run later to fill a
bubble); a stage's order is a list of steps, each one item or two overlapped items
(DualPipe's forward-backward pairs).

Schedules (bubbles are not computed here: the engines time the orders):

- ``gpipe`` (Huang et al. 2019): every forward, then every backward.
- ``1f1b`` (PipeDream-Flush, Narayanan et al. SC'21 Sec. 2.2): ``pp - s - 1`` warm-up
  forwards, then one forward and one backward in turn, then the remaining backwards.
- ``interleaved`` (Narayanan et al. SC'21 Sec. 2.2, Megatron-LM): ``v`` chunks per stage,
  chunk ``c`` of stage ``s`` is virtual stage ``c pp + s``; micro-batches go in groups of
  ``pp`` through each chunk; ``2 (pp - s - 1) + (v - 1) pp`` warm-up forwards.
- ``dualpipe`` (DeepSeek-V3, arXiv:2412.19437 Sec. 3.2.1, Fig. 5; the order of
  deepseek-ai/DualPipe ``dualpipe.py``): half of the micro-batches enter at stage 0, half at
  stage ``pp - 1``; stage ``s`` holds the layers of stage ``s`` for the first direction and
  of stage ``pp - 1 - s`` for the second (two copies of the weights); in its main phase a
  forward of one direction runs together with a backward of the other, each layer's
  all-to-all under the other's compute. Where the reference runs a backward with
  ``enable_zb`` (steps 3, 6 and 7), it is an ``I`` and its ``W`` runs at the reference's
  ``_weight_chunk`` (first in, first out): in step 3 right after it, in steps 7 and 8 in the
  cool-down. Table 2 of the report gives its bubble as ``(pp/2 - 1)(F&B + B - 3W)``.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from moesim.config.scenario import Scenario
from moesim.plan.types import (
    BackwardLayer,
    LayerPlan,
    PipelinePlan,
    Traffic,
    TrainingPlan,
    WorkloadPlan,
)

Item = tuple[str, int, int]  # (F | B, micro-batch, chunk)
Step = tuple[Item, ...]  # one item, or two overlapped ones


def stage_layers(sc: Scenario) -> list[range]:
    """The layers of each stage: ``parallelism.pp_layers``, or an even split."""
    par, n = sc.parallelism, sc.model.n_layers
    sizes = par.pp_layers or [n // par.pp] * par.pp
    edges = np.concatenate([[0], np.cumsum(sizes)])
    return [range(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def stage_chunks(sc: Scenario) -> list[list[tuple[int, ...]]]:
    """Per stage, the layer indices of each of its chunks (see the module docstring)."""
    ranges = stage_layers(sc)
    pp = len(ranges)
    tr = sc.workload.train
    schedule = tr.schedule if sc.workload.phase == "train" and tr is not None else "none"
    if pp == 1 or schedule in ("none", "gpipe", "1f1b"):
        return [[tuple(r)] for r in ranges]
    if schedule == "dualpipe":
        return [[tuple(ranges[s]), tuple(ranges[pp - 1 - s])] for s in range(pp)]
    v = tr.virtual_stages  # interleaved: virtual stage j = c pp + s, len(stage s) / v layers
    sizes = [len(ranges[j % pp]) // v for j in range(pp * v)]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    virtual = [tuple(range(int(edges[j]), int(edges[j + 1]))) for j in range(pp * v)]
    return [[virtual[c * pp + s] for c in range(v)] for s in range(pp)]


def route(
    schedule: str, pp: int, chunks: int, mb: int, micro_batches: int
) -> list[tuple[int, int]]:
    """The (stage, chunk) a micro-batch's forward goes through, in order (its backward goes
    back the same way)."""
    if schedule == "dualpipe":
        if mb < micro_batches // 2:
            return [(s, 0) for s in range(pp)]
        return [(pp - 1 - k, 1) for k in range(pp)]
    return [(j % pp, j // pp) for j in range(pp * chunks)]


def schedule_order(schedule: str, pp: int, m: int, chunks: int = 1) -> list[list[Step]]:
    """Per stage, the steps it runs in order (``none``: inference, forwards only)."""
    if schedule == "dualpipe":
        return [_dualpipe(pp, m, s) for s in range(pp)]
    order = []
    for s in range(pp):
        if schedule == "none":
            steps = [("F", i, 0) for i in range(m)]
        elif schedule == "gpipe":
            steps = [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
        elif schedule == "1f1b":
            steps = _one_f_one_b(
                [("F", i, 0) for i in range(m)], [("B", i, 0) for i in range(m)], pp - s - 1
            )
        else:  # interleaved (Megatron-LM forward_backward_pipelining_with_interleaving)
            total = m * chunks

            def item(kind: str, k: int) -> Item:
                c = (k // pp) % chunks
                return (
                    kind,
                    (k // (pp * chunks)) * pp + k % pp,
                    c if kind == "F" else chunks - 1 - c,
                )

            warm = min(2 * (pp - s - 1) + (chunks - 1) * pp, total)
            steps = _one_f_one_b(
                [item("F", k) for k in range(total)], [item("B", k) for k in range(total)], warm
            )
        order.append([(step,) for step in steps])
    return order


def _one_f_one_b(forwards: list[Item], backwards: list[Item], warm: int) -> list[Item]:
    """``warm`` forwards, then a forward and a backward in turn, then the backwards left."""
    warm = min(warm, len(forwards))
    steps = forwards[:warm]
    for f, b in zip(forwards[warm:], backwards, strict=False):
        steps += [f, b]
    return steps + backwards[len(forwards) - warm :]


def _dualpipe(pp: int, m: int, rank: int) -> list[Step]:
    """DualPipe's order on one rank (deepseek-ai/DualPipe ``DualPipe.step``, steps 1-8). A
    backward the reference runs with ``enable_zb`` is an ``I`` whose ``W`` waits in a queue
    for the next ``_weight_chunk``. Phase 0 is the direction in which this rank comes early
    (the first direction on the first half of the ranks)."""
    half_ranks, half_rank = pp // 2, min(rank, pp - 1 - rank)
    half_m = m // 2
    second = rank >= half_ranks
    middle = half_rank == half_ranks - 1
    count = {"F": [0, 0], "B": [0, 0]}
    queue: list[Item] = []  # the reference's WeightGradStore

    def item(kind: str, phase: int, zb: bool = False) -> Item:
        direction = phase ^ second
        k = count[kind][direction]
        count[kind][direction] += 1
        if zb:
            queue.append(("W", direction * half_m + k, direction))
            return ("I", direction * half_m + k, direction)
        return (kind, direction * half_m + k, direction)

    def weight() -> Step:
        return (queue.pop(0),)

    steps: list[Step] = []
    steps += [(item("F", 0),) for _ in range((half_ranks - half_rank - 1) * 2)]  # 1: nF0
    for _ in range(half_rank + 1):  # 2: nF0F1
        steps += [(item("F", 0),), (item("F", 1),)]
    for _ in range(half_ranks - half_rank - 1):  # 3: nB1W1F1
        steps += [(item("B", 1, zb=True),), weight(), (item("F", 1),)]
    for i in range(half_m - pp + half_rank + 1):  # 4: nF0B1F1B0
        if i == 0 and middle:
            steps += [(item("F", 0),), (item("B", 1),)]
        else:
            steps.append((item("F", 0), item("B", 1)))
        steps.append((item("F", 1), item("B", 0)))
    for _ in range(half_ranks - half_rank - 1):  # 5: nB1F1B0
        steps += [(item("B", 1),), (item("F", 1), item("B", 0))]
    zb, step_6 = False, half_rank + 1
    for i in range(step_6):  # 6: nB1B0, the second half zero-bubble
        zb = zb or (i == step_6 // 2 and half_rank % 2 == 1)
        steps.append((item("B", 1, zb),))
        zb = zb or (i == step_6 // 2 and half_rank % 2 == 0)
        steps.append((item("B", 0, zb),))
    for _ in range(half_ranks - half_rank - 1):  # 7: nWB0
        steps += [weight(), (item("B", 0, zb=True),)]
    steps += [weight() for _ in range(half_rank + 1)]  # 8: nW
    assert not queue
    return steps


def in_flight(schedule: str, pp: int, m: int, stage: int, chunks: int = 1) -> float:
    """Micro-batches whose activations a stage holds at its peak, in units of one
    micro-batch's activations over all of the stage's layers: gpipe ``m``; 1f1b
    ``min(m, pp - s)``; interleaved its warm-up forwards over ``v`` chunks plus one; dualpipe
    ``pp + 1`` chunks of half the stage's layers (DeepSeek-V3 Table 2: ``PP + 1``)."""
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved":
        warm = min(2 * (pp - stage - 1) + (chunks - 1) * pp, m * chunks)
        return (warm + 1) / chunks
    if schedule == "dualpipe":
        return (pp + 1) / 2
    return float(min(m, pp - stage))


def piece_scenario(sc: Scenario) -> Scenario:
    """One stage running one micro-batch: the stage's devices as a cluster (whole nodes, or
    part of one node), the batch of one inference micro-batch (training: one pass already)."""
    par, cl, wl = sc.parallelism, sc.cluster, sc.workload
    devices = cl.n_devices // par.pp
    if devices >= cl.devices_per_node:
        cluster = cl.model_copy(update={"nodes": devices // cl.devices_per_node})
    else:
        cluster = cl.model_copy(update={"nodes": 1, "devices_per_node": devices})
    update: dict[str, object] = {"cluster": cluster}
    mb = par.inference_micro_batches
    if wl.phase != "train" and mb > 1:
        update["workload"] = wl.model_copy(update={"batch_size": wl.batch_size // mb})
    update["parallelism"] = par.model_copy(update={"pp": 1, "pp_layers": None})
    return sc.model_copy(update=update)


# -- the whole cluster from its stages ---------------------------------------------------


def _spread(values: np.ndarray | None, offset: int, n: int, fill: float = 0.0):
    """A stage's per-device array placed at ``offset`` in an ``n``-device array."""
    if values is None:
        return None
    values = np.asarray(values)
    out = np.full((n, *values.shape[1:]), fill, dtype=values.dtype)
    out[offset : offset + len(values)] = values
    return out


class _Shift:
    """Moves a stage's traffic to its devices, once per traffic object (layers and passes
    share them, so engines route and load each once)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.done: dict[tuple[int, int], tuple[Traffic, Traffic]] = {}

    def __call__(self, traffic: Traffic | None, offset: int) -> Traffic | None:
        if traffic is None:
            return None
        key = (id(traffic), offset)
        if key not in self.done:
            members = None
            if traffic.members is not None:
                members = _spread(traffic.members, offset, self.n, -1)
            moved = Traffic(
                traffic.src + offset,
                traffic.dst + offset,
                traffic.nbytes,
                traffic.local_bytes,
                traffic.latency_steps,
                members,
                traffic.barrier,
            )
            self.done[key] = (traffic, moved)  # holds traffic: its id stays unique
        return self.done[key][1]


_PER_DEVICE = (
    "device_tokens",
    "local_experts",
    "expert_tokens",
    "pairs_out",
    "expert_weight_bytes",
)  # LayerPlan arrays indexed by device


def _layer(lp: LayerPlan, offset: int, n: int, shift: _Shift) -> LayerPlan:
    """A stage's layer on the whole cluster: per-device arrays spread, traffic moved."""
    update: dict[str, object] = {}
    for f in dataclasses.fields(lp):
        value = getattr(lp, f.name)
        if isinstance(value, Traffic):
            update[f.name] = shift(value, offset)
        elif isinstance(value, dict):
            update[f.name] = {k: _spread(v, offset, n) for k, v in value.items()}
        elif f.name in _PER_DEVICE:
            update[f.name] = _spread(value, offset, n)
    return dataclasses.replace(lp, **update)


def _send(stage_devices: int, pp: int, bytes_per_device: np.ndarray) -> dict:
    """Activations of one micro-batch from every device of a stage to the device at the same
    position of a neighbouring stage (either way; interleaved chunks also go from the last
    stage to the first): one group per pair, so a receiver waits for its own sender only."""
    out = {}
    n = stage_devices * pp
    local = np.flatnonzero(bytes_per_device > 0)
    pairs = {(s, (s + 1) % pp) for s in range(pp)} if pp > 1 else set()
    for a, b in sorted(pairs | {(b, a) for a, b in pairs}):
        src, dst = a * stage_devices + local, b * stage_devices + local
        members = np.full(n, -1, dtype=np.int64)
        members[src], members[dst] = local, local
        out[(a, b)] = Traffic(src, dst, bytes_per_device[local].astype(float), members=members)
    return out


def assemble(sc: Scenario, stages: list[WorkloadPlan], hidden_bytes: np.ndarray) -> WorkloadPlan:
    """The whole-cluster plan of ``stages`` (one plan per stage, in order, each of one
    micro-batch); ``hidden_bytes``: the activations each device of a stage sends to the
    next stage per micro-batch."""
    pp = len(stages)
    per = stages[0].n_devices
    n = per * pp
    shift = _Shift(n)
    wl = sc.workload
    train = wl.phase == "train"
    schedule = wl.train.schedule if train and pp > 1 else ("gpipe" if train else "none")
    micro = wl.train.micro_batches if train else sc.parallelism.inference_micro_batches
    masks, chunks_of = [], stage_chunks(sc)
    layers: list[dict[int, LayerPlan]] = [{} for _ in stages]  # per stage, by layer index
    backward: list[dict[int, BackwardLayer]] = [{} for _ in stages]
    draft: list[LayerPlan] = []
    for s, plan in enumerate(stages):
        off = s * per
        mask = np.zeros(n, dtype=bool)
        mask[off : off + per] = True
        masks.append(mask)
        for k, lp in enumerate(plan.layers):
            layers[s][lp.index] = _layer(lp, off, n, shift)
            if plan.train is not None:
                bl = plan.train.backward[k]
                backward[s][lp.index] = BackwardLayer(
                    {p: _spread(v, off, n) for p, v in bl.compute_s.items()},
                    {p: _spread(v, off, n) for p, v in bl.flops.items()},
                    _spread(bl.recompute_s, off, n),
                    _spread(bl.recompute_flops, off, n),
                    {p: _spread(v, off, n) for p, v in bl.weight_s.items()},
                )
        if plan.draft:
            draft = [_layer(lp, off, n, shift) for lp in plan.draft]
    last = stages[-1]
    out = WorkloadPlan(
        sc,
        n,
        stages[0].tokens * (1 if train else micro),
        [stage[i] for stage in layers for i in sorted(stage)],  # DualPipe: a layer twice
        sum(_spread(p.lm_head_s, s * per, n) for s, p in enumerate(stages)),
        lm_head_measured_s=_spread(last.lm_head_measured_s, (pp - 1) * per, n),
        warnings=sorted({w for p in stages for w in p.warnings}),
        draft=draft,
        draft_lm_head_s=_spread(last.draft_lm_head_s, (pp - 1) * per, n),
    )
    out.pipeline = PipelinePlan(
        layers=layers,
        backward=backward,
        pp=pp,
        micro_batches=micro,
        schedule=schedule,
        masks=masks,
        chunks=chunks_of,
        send=_send(per, pp, hidden_bytes),
        overlap=sc.parallelism.overlap == "two_batch",
    )
    memory: dict[str, list[np.ndarray]] = {}
    for s, plan in enumerate(stages):
        for kind, used in plan.memory_bytes.items():
            scale = 1.0
            if kind == "activations" and train:
                scale = in_flight(schedule, pp, micro, s, len(chunks_of[s]))
            elif kind == "kv_cache":
                scale = float(micro)  # every micro-batch's cache stays resident
            memory.setdefault(kind, []).append(used * scale)
    out.memory_bytes = {k: np.concatenate(v) for k, v in memory.items()}
    if train:
        _assemble_training(out, stages, shift, backward)
    return out


def _assemble_training(
    out: WorkloadPlan, stages: list[WorkloadPlan], shift: _Shift, backward: list[dict]
) -> None:
    """The whole-cluster training plan: per-layer backward work, each stage's gradient
    collectives and optimizer on its own devices."""
    n, per, pipe = out.n_devices, stages[0].n_devices, out.pipeline
    trs = [p.train for p in stages]
    for s, tr in enumerate(trs):
        off = s * per
        pipe.grad_reduce.append([shift(t, off) for t in tr.grad_reduce])
        pipe.param_gather.append([shift(t, off) for t in tr.param_gather])
        pipe.optimizer_s.append(_spread(tr.optimizer_s, off, n))
    for s, (plan, tr) in enumerate(zip(stages, trs, strict=True)):
        pipe.combine.append(
            {
                lp.index: [shift(t, s * per) for t in c]
                for lp, c in zip(plan.layers, tr.combine, strict=True)
            }
        )
    combine = {i: c for stage in pipe.combine for i, c in stage.items()}
    first = trs[0]
    out.train = TrainingPlan(
        config=first.config,
        backward=[bl for stage in backward for _, bl in sorted(stage.items())],
        lm_head_bwd_s=sum(_spread(t.lm_head_bwd_s, s * per, n) for s, t in enumerate(trs)),
        grad_reduce=[t for ts in pipe.grad_reduce for t in ts],
        param_gather=[t for ts in pipe.param_gather for t in ts],
        optimizer_s=sum(pipe.optimizer_s),
        model_flops_per_token=first.model_flops_per_token,
        # DualPipe: a micro-batch runs one of a stage's two chunks (half of its layers)
        executed_flops=np.concatenate([t.executed_flops for t in trs])
        * (0.5 if pipe.schedule == "dualpipe" else 1.0),
        dense_params=np.concatenate([t.dense_params for t in trs]),
        expert_params=np.concatenate([t.expert_params for t in trs]),
        combine=[combine.get(i) for i in range(max(combine) + 1)],
    )
