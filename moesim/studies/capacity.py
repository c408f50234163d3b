"""Capacity planning: the cheapest candidate cluster that meets every target, and why.

A plan file names a base scenario, a candidate space (dotted scenario paths, each with a list of
values, combined as a grid), targets over any summary metric (``{min: X}`` / ``{max: Y}``), a
budget, and prices (catalog ``prices.yaml``, overridable). :func:`run_plan`:

1. expands the grid; a combination the scenario rejects (say, ep not dividing the devices) is
   recorded ``invalid`` with the reason;
2. prunes before simulating, only where the result is certain: cost over budget; a per-device
   memory lower bound above capacity (weights of the E/ep experts every rank holds, plus the KV
   cache: the model cannot fit); a step-time lower bound that already misses a target (each
   device runs its kernels one after another, so its step is at least the sum of its
   routing-independent kernels, and the cluster's mean expert work is at least the roofline of
   the top-k experts' weights per group with tokens and of ``6 d f T k`` FLOPs when nothing
   is dropped);
3. screens the rest with the sweep machinery (``sim.fidelity: analytic`` by default);
4. confirms the best feasible candidates with the discrete-event engine, again until the best
   feasible one is confirmed;
5. picks the candidate with the lowest objective (cost per hour by default) that meets every
   target and the budget, marks the Pareto frontiers (cost vs throughput, energy vs
   throughput) and, when nothing is feasible, names the closest candidate and what it misses.

Pruning applies to ``prefill`` and ``decode`` steps without PIM placement, where the bounds
are derived; other phases are simulated in full (a misfit is then caught by the plan builder).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim import catalog
from moesim.config.constraints import check_constraint
from moesim.config.plan import PlanSpec
from moesim.config.plan import load_plan as load_plan  # re-exported
from moesim.config.scenario import Scenario, ScenarioError, apply_overrides, scenario_from_dict
from moesim.cost.ops import (
    attention_ops,
    ffn_ops,
    lm_head_ops,
    router_ops,
)
from moesim.cost.roofline import op_time_s
from moesim.plan.batch import kv_bytes_per_seq, weights_bytes_per_device, with_batch_resolved
from moesim.plan.layout import dtype_bytes, layout, split_evenly
from moesim.results.collect import Result
from moesim.studies.sweep import flatten

HOUR_S = 3600.0
TIMELINE_DEVICE_LAYERS = 2048
"""Devices x layers above which the timeline is recorded on a cut model (see timeline_layers)."""
PLAN_KEYS = ("devices", "device", "price_per_device_hour_usd", "cost_per_hour_usd", "power_w")
"""Candidate columns the plan sets (devices paid for, price); a run's summary never overrides
them (its ``devices`` counts one instance)."""
CLOSEST_PRUNED = 3
"""Bound-pruned candidates simulated anyway when nothing is feasible (to name the closest)."""


def price_per_device_hour_usd(spec: PlanSpec, device: str) -> float:
    """The plan's price for ``device``, else the catalog's (``prices.yaml``). PIM parts have
    no catalog price (none is published): a plan that uses them names one (0 compares GPUs
    only)."""
    if device in spec.prices:
        return float(spec.prices[device])
    entry = catalog.raw("prices").get(device)
    if entry is None:
        raise ScenarioError(
            "prices",
            f"no price for device '{device}'; add prices: {{{device}: USD_PER_DEVICE_HOUR}} "
            f"(catalog prices: {', '.join(sorted(catalog.raw('prices')))})",
        )
    return float(entry["price_per_device_hour_usd"])


# -- bounds -----------------------------------------------------------------------------------
def total_devices(sc: Scenario) -> int:
    """Devices paid for: the cluster, times the serving instances (replicas, or prefill plus
    decode pools) when a run has several."""
    serve = getattr(sc.workload, "serve", None)
    if serve is None:
        return sc.cluster.n_devices
    return sc.cluster.n_devices * int(serve.instances)


def bounds_apply(sc: Scenario) -> bool:
    """The bounds below are derived for forward steps (prefill, decode) without PIM, every
    device running every layer (no pipeline stages)."""
    return (
        sc.workload.phase in ("prefill", "decode")
        and getattr(sc, "pim", None) is None
        and sc.parallelism.pp == 1
    )


def memory_lower_bound_bytes(sc: Scenario) -> float:
    """A per-device memory floor for the fullest device: its weights
    (:func:`moesim.plan.batch.weights_bytes_per_device`) and its KV cache or linear-attention
    state. Activations (>= 0) are left out, so the true need is at least this."""
    wl = sc.workload
    seqs = int(split_evenly(wl.batch_size, sc.cluster.n_devices // sc.parallelism.tp).max())
    context = wl.seq_len + (1 if wl.phase == "decode" else 0)
    return weights_bytes_per_device(sc) + seqs * kv_bytes_per_seq(sc, context)


def step_time_lower_bound_s(sc: Scenario) -> float:
    """A floor on the step time in either engine.

    Every device runs its compute kernels one after another (communication only adds), so the
    step is at least ``max_g T_g`` and at least ``mean_g T_g + E_mean``, where ``T_g`` is the
    roofline time of device g's routing-independent kernels (attention, router, dense FFN,
    shared experts, LM head: the same ops and token split the plan builder uses) and
    ``E_mean`` the mean routed-expert time per device: at least ``max(F / P, B / W) / n``
    with F = ``6 d f T k`` FLOPs when no token can be dropped (else 0) and B the weights of
    the ``k`` distinct experts each token reaches, read at least once per MoE layer in each
    expert-data-parallel group that has tokens (peak rates when a measured kernel table may
    beat the roofline's efficiencies)."""
    m, par, wl, dev = sc.model, sc.parallelism, sc.workload, sc.cluster.device
    n_dev, tp = sc.cluster.n_devices, par.tp
    b, cdt = dtype_bytes(sc), wl.dtypes.compute
    lay = layout(sc)
    new, context = lay.new_per_seq, lay.context
    tokens_dp, tokens_dev, seqs_dev, tokens_att = (
        lay.tokens_dp,
        lay.tokens_dev,
        lay.seqs_dev,
        lay.tokens_att,
    )

    def t(ops) -> np.ndarray:
        return np.asarray(sum(op_time_s(dev, op, cdt) for op in ops), dtype=float) * np.ones(n_dev)

    fixed = np.zeros(n_dev)
    att: dict[str, np.ndarray] = {}
    n_moe = 0
    for i in range(m.n_layers):
        kind = m.attention_kind(i)
        if kind not in att:
            att[kind] = t(attention_ops(m, kind, seqs_dev, new, context, tp, b))
        fixed += att[kind]
        if not m.is_moe(i):
            fixed += t(ffn_ops("dense_ffn", tokens_att, m.d_model, m.d_ff_dense / tp, b))
            continue
        n_moe += 1
        fixed += t(router_ops(m, tokens_dev, b))
        if m.n_shared_experts:
            d_ff = m.n_shared_experts * m.d_ff_shared / tp
            fixed += t(ffn_ops("shared", tokens_att, m.d_model, d_ff, b))
    last = seqs_dev if wl.phase == "prefill" else tokens_att
    fixed += t([lm_head_ops(m, last, tp, b)])

    r = sc.routing
    tokens = int(tokens_dp.sum())
    # experts every token reaches: k distinct ones (top-k), at least one otherwise; a trace
    # may leave choices empty, so it promises nothing
    k = min(m.top_k, m.n_experts) if r.gating == "topk" else 1
    if r.distribution == "trace":
        k = 0
    drops = r.capacity_factor is not None or r.gating != "topk"
    flops = 0.0 if drops else 6.0 * m.d_model * m.d_ff_expert * tokens * k
    # expert-data-parallel groups that have tokens each read their experts' weights
    with_tokens = np.unique(lay.group[tokens_dev > 0]).size
    groups = min(1, with_tokens) if r.global_routing else with_tokens
    weight_bytes = groups * k * 3.0 * m.d_model * m.d_ff_expert * b.expert_weights
    # a measured kernel table may beat the roofline's efficiencies, never the peaks
    eff_c = 1.0 if dev.kernel_table else dev.compute_efficiency
    eff_m = 1.0 if dev.kernel_table else dev.memory_efficiency
    expert_s = n_moe * max(
        flops / (dev.flops_per_s(cdt) * eff_c),
        weight_bytes / (dev.memory_bandwidth_bytes_per_s * eff_m),
    )
    return float(max(fixed.max(), fixed.mean() + expert_s / n_dev))


def _metric_bounds(spec: PlanSpec, sc: Scenario, cost_h: float, lb_s: float) -> dict:
    """(low, high) a metric can reach given the step-time floor ``lb_s``."""
    tokens = sc.workload.tokens
    out = {"step_time_s": (lb_s, math.inf)}
    if spec.throughput_metric == "tokens_per_s" and lb_s > 0:
        out["tokens_per_s"] = (0.0, tokens / lb_s)
        out["cost_per_million_tokens_usd"] = (cost_h * 1e6 / (HOUR_S * tokens / lb_s), math.inf)
    return out


# -- candidates -------------------------------------------------------------------------------
def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _value_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name") or value.get("preset") or value)
    return str(value)


def expand_candidates(spec: PlanSpec) -> list[dict[str, Any]]:
    """Every combination of the candidate values (grid), in a stable order."""
    names = list(spec.candidates)
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(*(spec.candidates[n] for n in names))
    ]


def _label(spec: PlanSpec, values: dict[str, Any]) -> str:
    varying = [a for a in spec.candidates if len(spec.candidates[a]) > 1] or list(spec.candidates)
    return " ".join(f"{_short(a)}={_value_text(values[a])}" for a in varying)


def _overrides(spec: PlanSpec, values: dict[str, Any], fidelity: str) -> dict[str, Any]:
    demand = {}
    if spec.demand is not None:
        demand = {"workload.serve.rate": spec.demand.model_dump(exclude_none=True)}
    return {
        **spec.overrides,
        **demand,
        **values,
        "sim.fidelity": fidelity,
        "sim.seed": spec.seed,
        "sim.progress": False,
        "sim.trace": False,
    }


def _hard_error(err: ScenarioError) -> bool:
    """Mistakes in the plan itself (a typo, an unknown catalog name) rather than a candidate
    combination that does not work."""
    return err.reason.startswith(("unknown", "Input should", "Field required"))


# -- simulation through the sweep machinery ---------------------------------------------------
def _simulate(
    spec: PlanSpec,
    base: dict[str, Any],
    values: list[dict[str, Any]],
    fidelity: str,
    out: Path,
    executor: Any,
    progress: bool,
    resume: bool,
) -> list[dict[str, Any]]:
    """Run candidates as one zip-mode sweep in ``out`` (journaled, so ``resume`` keeps finished
    ones); returns one metrics mapping per candidate, in order."""
    from moesim.studies.sweep import JOURNAL, SweepSpec, execute, prepare

    if not values:
        return []
    axes = {a: [v[a] for v in values] for a in spec.candidates}
    sweep = SweepSpec(
        name=f"{spec.name}-{fidelity}",
        base=base,
        overrides=_overrides(spec, {}, fidelity),
        axes=axes,
        mode="zip",
        seed=spec.seed,
        common_random_numbers=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in (JOURNAL, "results.csv"):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    run = prepare(sweep, base, out, spec.name, "csv")
    table = execute(run, executor, progress=progress)
    keys = {p.key: p.index for p in run.points}
    rows: list[dict[str, Any]] = [{} for _ in values]
    for rec in table.to_dict("records"):
        if rec.get("key") in keys:
            rows[keys[rec["key"]]] = rec
    return rows


# -- evaluation -------------------------------------------------------------------------------
def _num(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


def _derive(spec: PlanSpec, row: dict[str, Any]) -> None:
    """Cost per million tokens and energy per token from a row's throughput and power."""
    thr = _num(row.get(spec.throughput_metric))
    copies, per_copy = _num(row.get("instances")), _num(row.get("devices_per_instance"))
    if copies > 0 and per_copy > 0:  # a serving run says how many devices it used
        row["devices"] = int(copies * per_copy)
        row["cost_per_hour_usd"] = row["price_per_device_hour_usd"] * row["devices"]
    cost_h = row["cost_per_hour_usd"]
    row["cost_per_million_tokens_usd"] = cost_h * 1e6 / (HOUR_S * thr) if thr > 0 else math.nan
    per_token = _num(row.get("energy_j.per_token"))
    energy = _num(row.get("energy_j.total", row.get("energy_j")))
    tokens = _num(row.get("tokens"))
    if per_token > 0 or (energy > 0 and tokens > 0):
        row["energy_per_token_j"] = per_token if per_token > 0 else energy / tokens
        row["energy_source"] = "simulated"
    elif thr > 0 and row.get("power_w"):
        # every device at its board power for the whole step: an upper estimate
        row["energy_per_token_j"] = row["power_w"] * row["devices"] / thr
        row["energy_source"] = "board power"
    else:
        row["energy_per_token_j"] = math.nan
        row["energy_source"] = ""


def _margins(spec: PlanSpec, row: dict[str, Any]) -> dict[str, float]:
    """Relative headroom per target (>= 0 met): ``v / min - 1`` and ``1 - v / max``."""
    out = {}
    for metric, target in spec.targets.items():
        v = _num(row.get(metric))
        parts = []
        if target.min is not None:
            parts.append(v / target.min - 1 if target.min else v - target.min)
        if target.max is not None:
            parts.append(1 - v / target.max if target.max else -v)
        out[metric] = min(parts) if not math.isnan(v) else -math.inf
    return out


def unstable(row: dict[str, Any]) -> bool:
    """A serving run flagged unstable (``stable`` false; absent for step runs)."""
    value = row.get("stable")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("false", "0")
    return not bool(value)


def _worst_miss(spec: PlanSpec, row: dict[str, Any]) -> float:
    """The largest relative shortfall over the targets (0 when every target is met)."""
    return max(max(0.0, -m) for m in _margins(spec, row).values())


def _g(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _budget_ok(spec: PlanSpec, row: dict[str, Any]) -> bool:
    bud = spec.budget
    if (
        bud.max_cost_per_hour_usd is not None
        and row["cost_per_hour_usd"] > bud.max_cost_per_hour_usd
    ):
        return False
    if bud.max_devices is not None and row["devices"] > bud.max_devices:
        return False
    cpm = _num(row.get("cost_per_million_tokens_usd"))
    return not (
        bud.max_cost_per_million_tokens_usd is not None
        and not cpm <= bud.max_cost_per_million_tokens_usd
    )


COMM_CLASSES = {
    "dispatch": "all-to-all",
    "combine": "all-to-all",
    "tp_comm": "tp communication",
    "grad_reduce": "gradient communication",
    "param_gather": "gradient communication",
}
"""Breakdown phases (and their ``_bwd`` twins) that wait on the network, by kind."""


def phase_class(phase: str) -> str:
    """compute, or the kind of communication a step-breakdown phase waits for."""
    return COMM_CLASSES.get(phase.removesuffix("_bwd"), "compute")


def limited_by(row: dict[str, Any]) -> tuple[str, float]:
    """What dominates a simulated step, from its breakdown (the timeline of the last device to
    finish): compute (device kernels, FLOP- or HBM-bound, less the imbalance), all-to-all
    (dispatch and combine waits), tensor-parallel or gradient communication, or imbalance (the
    seconds the slowest device's experts add over the mean device's, summed over MoE layers);
    and its share of the step."""
    parts: dict[str, float] = {}
    for key, value in row.items():
        if key.startswith("breakdown_s.") and not math.isnan(_num(value)):
            kind = phase_class(key.split(".", 1)[1])
            parts[kind] = parts.get(kind, 0.0) + _num(value)
    if not parts:
        return "", math.nan
    imbalance = _num(row.get("routing.imbalance_s"))
    if not math.isnan(imbalance) and imbalance > 0:
        parts["imbalance"] = min(imbalance, parts.get("compute", 0.0))
        parts["compute"] = parts.get("compute", 0.0) - parts["imbalance"]
    total = sum(parts.values())
    if total <= 0:
        return "", math.nan
    name = max(parts, key=lambda k: parts[k])
    return name, parts[name] / total


def pareto_front(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """True where no other point has cost <= and value >= with one strict (min cost, max
    value); NaNs are never on the front."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    ok = ~(np.isnan(cost) | np.isnan(value))
    c, v = cost[:, None], value[:, None]
    dominated = (
        (cost[None, :] <= c) & (value[None, :] >= v) & ((cost[None, :] < c) | (value[None, :] > v))
    )
    dominated &= ok[None, :]
    return ok & ~dominated.any(axis=1)


@dataclass
class PlanResult:
    """Everything the report needs: the candidate table and the answer."""

    spec: PlanSpec
    table: pd.DataFrame
    chosen: int | None
    closest: int | None
    binding: str
    binding_reason: str
    detail: Result | None = None
    detail_fidelity: str = ""
    timeline: Result | None = None
    step_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    step_note: str = ""
    timeline_layers: tuple[int, int] = (0, 0)
    wall_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.chosen is not None

    def row(self, candidate: int | None) -> dict[str, Any]:
        if candidate is None:
            return {}
        return self.table.loc[self.table["candidate"] == candidate].iloc[0].to_dict()

    def misses(self, candidate: int) -> list[str]:
        """'metric value vs target (-x%)' for each target the candidate misses."""
        row, out = self.row(candidate), []
        for metric, target in self.spec.targets.items():
            v = _num(row.get(metric))
            if target.min is not None and not v >= target.min:
                out.append(f"{metric} {_g(v)} < {_g(target.min)} ({v / target.min - 1:+.1%})")
            if target.max is not None and not v <= target.max:
                out.append(f"{metric} {_g(v)} > {_g(target.max)} ({v / target.max - 1:+.1%})")
        if not _budget_ok(self.spec, row):
            out.append(f"over budget (cost {row['cost_per_hour_usd']:,.2f} USD/h)")
        if unstable(row):
            out.append(f"unstable ({row.get('unstable_reason', '')})")
        return out


def run_plan(
    spec: PlanSpec,
    base: dict[str, Any],
    out: Path,
    file: str = "plan",
    executor: Any = None,
    progress: bool = False,
    resume: bool = False,
    detail: bool = True,
) -> PlanResult:
    """Search the candidate space (see the module docstring); simulations run on ``executor``
    (a ``concurrent.futures`` executor, None: in this process) and are journaled under
    ``out/work/``."""
    from moesim.studies.simulate import simulate

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    first_invalid: ScenarioError | None = None
    candidate_values = expand_candidates(spec)
    for i, values in enumerate(candidate_values):
        row: dict[str, Any] = {"candidate": i, "label": _label(spec, values)}
        row.update({a: _value_text(v) for a, v in values.items()})
        over = _overrides(spec, values, spec.screen_fidelity)
        try:
            ok = all(check_constraint(c, apply_overrides(base, over)) for c in spec.constraints)
        except (ValueError, SyntaxError) as err:
            raise ScenarioError("constraints", str(err), file) from None
        if not ok:
            continue
        try:
            sc = with_batch_resolved(scenario_from_dict(base, over))
        except ScenarioError as err:
            if _hard_error(err):
                axis = next((a for a in values if err.path.startswith(a)), None)
                where = f"candidates.{axis}" if axis else err.path
                reason = f"{_value_text(values[axis])}: {err.reason}" if axis else err.reason
                raise ScenarioError(where, reason, file) from None
            first_invalid = first_invalid or err
            row.update(status="invalid", reason=f"{err.path}: {err.reason}")
            rows.append(row)
            continue
        dev = sc.cluster.device
        n_total = total_devices(sc)
        pim = getattr(sc, "pim", None)
        pim_units = 0 if pim is None or pim.policy == "gpu_only" else pim.units_per_gpu
        try:
            price = price_per_device_hour_usd(spec, dev.name)
            if pim_units:  # PIM units bought with every GPU
                price += pim_units * price_per_device_hour_usd(spec, pim.device.name)
        except ScenarioError as err:
            raise ScenarioError(err.path, err.reason, file) from None
        row.update(
            device=dev.name,
            devices=n_total,
            pim_units_per_device=pim_units,
            pim_device=pim.device.name if pim_units else "",
            price_per_device_hour_usd=price,
            cost_per_hour_usd=price * n_total,
            power_w=dev.power_w,
            memory_capacity_bytes=dev.memory_bytes,
            status="",
            reason="",
        )
        bud = spec.budget
        if (
            bud.max_cost_per_hour_usd is not None
            and row["cost_per_hour_usd"] > bud.max_cost_per_hour_usd
        ) or (bud.max_devices is not None and row["devices"] > bud.max_devices):
            row.update(status="over_budget", reason="cost or devices over budget")
        elif bounds_apply(sc):
            mem = memory_lower_bound_bytes(sc)
            lb = step_time_lower_bound_s(sc)
            row.update(memory_lower_bound_bytes=mem, step_time_lower_bound_s=lb)
            if spec.prune.memory and mem > dev.memory_bytes:
                row.update(
                    status="pruned_memory",
                    reason=f"needs at least {mem / 1e9:.1f} GB per device, has "
                    f"{dev.memory_bytes / 1e9:.1f} GB",
                )
            elif spec.prune.bound:
                for metric, (lo, hi) in _metric_bounds(
                    spec, sc, row["cost_per_hour_usd"], lb
                ).items():
                    target = spec.targets.get(metric)
                    if target is None:
                        continue
                    if target.min is not None and hi < target.min:
                        row.update(
                            status="pruned_bound",
                            reason=f"{metric} at most {_g(hi)} < {_g(target.min)}",
                            bound_miss=1 - hi / target.min,
                        )
                    elif target.max is not None and lo > target.max:
                        row.update(
                            status="pruned_bound",
                            reason=f"{metric} at least {_g(lo)} > {_g(target.max)}",
                            bound_miss=lo / target.max - 1,
                        )
                    if row["status"]:
                        break
        rows.append(row)
    if not any(r["status"] != "invalid" for r in rows):
        if first_invalid is None:
            raise ScenarioError("candidates", "no candidate satisfies the constraints", file)
        raise ScenarioError(
            first_invalid.path, f"no valid candidate; e.g. {first_invalid.reason}", file
        )

    def simulate_rows(idx: list[int], fidelity: str, stage: str) -> None:
        values = [candidate_values[rows[i]["candidate"]] for i in idx]
        results = _simulate(
            spec, base, values, fidelity, out / "work" / stage, executor, progress, resume
        )
        for i, res in zip(idx, results, strict=True):
            row = rows[i]
            for key in [k for k in row if k.startswith(("breakdown_s.", "routing."))]:
                del row[key]
            if stage != "screen":
                row["screen_step_time_s"] = row.get("step_time_s")
                row[f"screen_{spec.throughput_metric}"] = row.get(spec.throughput_metric)
            skip = {"point", "key", "repetition", "seed", *spec.candidates, *PLAN_KEYS}
            metrics = {
                k: v
                for k, v in res.items()
                if k not in skip and not (isinstance(v, float) and math.isnan(v))
            }
            status, error = metrics.pop("status", "error"), metrics.pop("error", "")
            row.update(metrics)
            row["fidelity"] = fidelity
            if status == "ok":
                note = "bound-pruned; simulated: nothing is feasible" if stage == "closest" else ""
                row.update(status="ok", reason=note)
                _derive(spec, row)
            else:
                fit = "does not fit" in str(error)
                row.update(status="no_fit" if fit else "error", reason=str(error)[:300])

    def evaluate() -> None:
        for row in rows:
            if row.get("status") != "ok":
                row["feasible"] = False
                continue
            margins = _margins(spec, row)
            for metric, m in margins.items():
                row[f"margin.{metric}"] = m
            row["feasible"] = (
                all(m >= 0 for m in margins.values())
                and _budget_ok(spec, row)
                and not unstable(row)  # serving: an unstable run never is feasible
            )

    todo = [i for i, r in enumerate(rows) if r["status"] == ""]
    simulate_rows(todo, spec.screen_fidelity, "screen")
    evaluate()
    confirmed: set[int] = set()
    conf = spec.confirm
    if conf.top > 0 and conf.fidelity != spec.screen_fidelity:
        for rnd in range(conf.rounds):
            feas = sorted(
                (i for i, r in enumerate(rows) if r["feasible"]),
                key=lambda i: (
                    _num(rows[i].get(spec.objective)),
                    -_num(rows[i].get(spec.throughput_metric)),
                    rows[i]["candidate"],
                ),
            )
            if not feas or feas[0] in confirmed:
                break
            batch = [i for i in feas if i not in confirmed][: conf.top]
            simulate_rows(batch, conf.fidelity, f"confirm{rnd}")
            confirmed.update(batch)
            evaluate()

    if spec.search == "max_rate":
        for row in rows:
            if row.get("status") == "ok":
                _search_max_rate(spec, base, candidate_values[row["candidate"]], row)
                row["feasible"] = row["max_rate_per_s"] > 0 and _budget_ok(spec, row)

    if not any(r["feasible"] for r in rows):
        # nothing feasible: simulate the pruned candidates nearest their target, so the report
        # can name the closest candidate with simulated (not bound) numbers
        near = sorted(
            (i for i, r in enumerate(rows) if r["status"] == "pruned_bound"),
            key=lambda i: (rows[i]["bound_miss"], rows[i]["cost_per_hour_usd"]),
        )[:CLOSEST_PRUNED]
        if near:
            simulate_rows(near, spec.screen_fidelity, "closest")
            evaluate()

    table = pd.DataFrame(rows)
    sim_ok = table["status"] == "ok"
    thr = table.get(spec.throughput_metric, pd.Series(math.nan, index=table.index))
    table["pareto_cost"] = pareto_front(
        np.where(sim_ok, table["cost_per_hour_usd"], np.nan), thr.astype(float)
    )
    if "energy_per_token_j" in table:
        table["pareto_energy"] = pareto_front(
            np.where(sim_ok, table["energy_per_token_j"].astype(float), np.nan), thr.astype(float)
        )
    lim = [limited_by(r) if r["status"] == "ok" else ("", math.nan) for r in rows]
    table["limited_by"] = [name for name, _ in lim]
    table["limited_by_share"] = [share for _, share in lim]
    table.loc[table["status"].isin(["pruned_memory", "no_fit"]), "limited_by"] = "memory capacity"

    obj = table[spec.objective].astype(float) if spec.objective in table else None
    feas = table[table["feasible"]]
    chosen = closest = None
    if len(feas):
        # ties (same price) go to the higher throughput; max_rate: the highest rate first
        order = feas.assign(_o=obj[feas.index], _t=-thr[feas.index].astype(float))
        if spec.search == "max_rate":
            order["_t"], order["_o"] = order["_o"], -order["max_rate_per_s"].astype(float)
        order = order.sort_values(["_o", "_t", "candidate"])
        chosen = int(order["candidate"].iloc[0])
    else:
        sims = table[sim_ok].copy()
        if len(sims):
            sims["_miss"] = [_worst_miss(spec, r) for r in sims.to_dict("records")]
            sims["_o"] = obj[sims.index] if obj is not None else 0.0
            closest = int(sims.sort_values(["_miss", "_o", "candidate"])["candidate"].iloc[0])
    counts = table["status"].value_counts().to_dict()
    result = PlanResult(spec, table, chosen, closest, "", "", counts=counts)
    result.binding, result.binding_reason = binding_constraint(result)
    focus = chosen if chosen is not None else closest
    if detail and focus is not None:
        fid = conf.fidelity if conf.top > 0 else spec.screen_fidelity

        def step_overrides(cand: int, fidelity: str) -> dict[str, Any]:
            over = _overrides(spec, candidate_values[cand], fidelity)
            sc = scenario_from_dict(base, over)
            if sc.workload.phase != "serve":
                return over
            return {**over, **representative_step(sc, result.row(cand))}

        # the top candidates' steps, for the breakdown plot
        ok_rows = table[table["status"] == "ok"]
        top = ok_rows.assign(_o=ok_rows[spec.objective].astype(float))
        top = top.sort_values(["feasible", "_o"], ascending=[False, True])
        top = pd.concat([top[top["candidate"] == focus], top[top["candidate"] != focus]])
        top = top.head(spec.report_top)
        serving = scenario_from_dict(base, _overrides(spec, candidate_values[focus], fid))
        if serving.workload.phase == "serve":
            steps = []
            for cand, label in zip(top["candidate"], top["label"], strict=True):
                over = step_overrides(int(cand), spec.screen_fidelity)
                res = simulate(scenario_from_dict(base, over))
                steps.append({"candidate": cand, "label": label, **flatten(res.summary)})
            result.step_table = pd.DataFrame(steps)
            result.step_note = SERVE_STEP_NOTE
        else:
            result.step_table = top
        over = step_overrides(focus, fid)
        sc = scenario_from_dict(base, over)
        layers = sc.model.n_layers
        keep = timeline_layers(sc)
        result.detail = simulate(scenario_from_dict(base, {**over, "sim.trace": keep == layers}))
        result.detail_fidelity = fid
        result.timeline = result.detail
        if keep < layers:  # the timeline of a cut model: the first `keep` layers
            cut = {**over, "sim.trace": True, "model.n_layers": keep}
            result.timeline = simulate(scenario_from_dict(base, cut))
        result.timeline_layers = (keep, layers)
    result.wall_s = time.perf_counter() - start
    return result


def _search_max_rate(
    spec: PlanSpec, base: dict[str, Any], values: dict[str, Any], row: dict[str, Any]
) -> None:
    """``search: max_rate`` for one candidate: bisection on the arrival rate with the
    predicate stable and every target met (``moesim/studies/max_rate.py``); the row takes the
    metrics of the run at the highest passing rate and the bracket."""
    from moesim.studies.max_rate import max_rate_search
    from moesim.studies.simulate import simulate

    over = _overrides(spec, values, row.get("fidelity", spec.screen_fidelity))
    over.pop("workload.serve.rate", None)
    serve = scenario_from_dict(base, over).workload.serve
    mean_output = serve.output_tokens.expected()

    def passes(rate: float) -> tuple[bool, dict[str, Any]]:
        at = {**over, "workload.serve.rate": {"requests_per_s": rate}}
        trial = {**row, **flatten(simulate(scenario_from_dict(base, at)).summary)}
        _derive(spec, trial)
        ok = not unstable(trial) and all(m >= 0 for m in _margins(spec, trial).values())
        return ok, trial

    cfg = spec.max_rate
    found = max_rate_search(
        passes, cfg.start_per_s or serve.arrival_rate_per_s, cfg.rel_tol, cfg.max_evaluations
    )
    if found.best is not None:
        row.update({k: v for k, v in found.best.items() if k not in PLAN_KEYS})
    row.update(
        max_rate_per_s=found.lower_per_s,
        max_rate_upper_per_s=found.upper_per_s,
        max_rate_tokens_per_s=found.lower_per_s * mean_output,
        max_rate_upper_tokens_per_s=found.upper_per_s * mean_output,
        max_rate_evaluations=len(found.evaluations),
        max_rate_converged=found.converged,
    )


SERVE_STEP_NOTE = (
    "serving runs record requests, not steps: the step plots show one decode step of each "
    "candidate at its run's mean decode batch (rounded to the attention data-parallel degree) "
    "and mean context (mean prompt plus half the mean output)"
)


def representative_step(sc: Scenario, row: dict[str, Any]) -> dict[str, Any]:
    """Overrides that turn a serving candidate into one decode step at its mean operating
    point (see ``SERVE_STEP_NOTE``), for the step breakdown, expert load, link and timeline
    plots that a request-level run does not record."""
    serve = sc.workload.serve
    dp = sc.cluster.n_devices // sc.parallelism.tp
    batch = _num(row.get("iterations.mean_decode_batch"))
    if not batch > 0:
        batch = serve.max_batch_size

    def mean(lengths) -> float:
        return float(lengths.mean) if lengths.mean else sum(lengths.bounds) / 2

    context = int(mean(serve.prompt_tokens) + mean(serve.output_tokens) / 2)
    return {
        "workload.phase": "decode",
        "workload.batch_size": max(dp, round(batch / dp) * dp),
        "workload.seq_len": context,
        "workload.serve": None,
    }


def timeline_layers(sc: Scenario) -> int:
    """Layers to record for the one-step timeline: all of them while devices x layers stays
    within ``TIMELINE_DEVICE_LAYERS``, else the dense layers and enough MoE layers to fill it
    (at least two), so that big clusters keep the trace small."""
    m = sc.model
    if sc.cluster.n_devices * m.n_layers <= TIMELINE_DEVICE_LAYERS:
        return m.n_layers
    fit = TIMELINE_DEVICE_LAYERS // sc.cluster.n_devices
    return min(m.n_layers, max(m.n_dense_layers + 2, fit))


def _step_text(row: dict[str, Any]) -> str:
    name, share = row.get("limited_by") or "", _num(row.get("limited_by_share"))
    return f"its step is {share:.0%} {name}" if name and not math.isnan(share) else ""


def _tightest(spec: PlanSpec, row: dict[str, Any]) -> tuple[str, float]:
    """The target with the least headroom, and that headroom."""
    margins = _margins(spec, row)
    name = min(margins, key=lambda k: margins[k])
    return name, margins[name]


def binding_constraint(result: PlanResult) -> tuple[str, str]:
    """What decided the answer: why nothing cheaper works (memory capacity, or what limits the
    best cheaper simulated candidate: compute, all-to-all, imbalance, or for runs without a
    step breakdown the target it misses), else what limits the chosen one."""
    spec, table = result.spec, result.table
    focus = result.chosen if result.chosen is not None else result.closest
    if focus is None:
        mem = table["status"].isin(["pruned_memory", "no_fit"])
        if mem.any() and not (table["status"] == "ok").any():
            near = table[mem]
            if (
                "memory_lower_bound_bytes" in near
                and near["memory_lower_bound_bytes"].notna().any()
            ):
                ratio = near["memory_lower_bound_bytes"] / near["memory_capacity_bytes"]
                best = near.loc[ratio.idxmin()]
                return "memory capacity", (
                    f"no candidate fits in device memory; the closest, {best['label']}, "
                    f"{best['reason']}"
                )
            return "memory capacity", "no candidate fits in device memory"
        return "", "nothing was simulated successfully"
    row = result.row(focus)
    obj = spec.objective
    tight, margin = _tightest(spec, row)
    own = row.get("limited_by") or tight
    own_text = "; ".join(
        t for t in (_step_text(row), f"tightest target {tight} ({margin:+.1%})") if t
    )
    if result.chosen is None:
        return own, f"the closest candidate: {own_text}"
    cheaper = table[
        (table[obj].astype(float) < float(row[obj]))
        & ~table["status"].isin(["invalid", "over_budget"])
    ]
    word = "cheaper" if obj.startswith("cost") else "lower-energy"
    if not len(cheaper):
        return own, f"nothing {word} in the candidate space; the chosen: {own_text}"
    mem = cheaper["status"].isin(["pruned_memory", "no_fit"])
    if mem.all():
        return "memory capacity", (
            f"every {word} candidate ({len(cheaper)}) does not fit in memory; the chosen: "
            f"{own_text}"
        )
    sims = cheaper[cheaper["status"] == "ok"]
    if len(sims):
        miss = [_worst_miss(spec, r) for r in sims.to_dict("records")]
        best = sims.assign(_m=miss).sort_values(["_m", obj]).iloc[0].to_dict()
        misses = result.misses(int(best["candidate"]))
        step = _step_text(best)
        name = best.get("limited_by") or (misses[0].split(" ", 1)[0] if misses else tight)
        return name, (
            f"the closest {word} candidate ({best['label']}) misses: {'; '.join(misses)}"
            + (f"; {step}" if step else "")
        )
    pruned = cheaper[cheaper["status"] == "pruned_bound"].iloc[0]
    return (
        "compute",
        f"{word} candidates cannot reach the targets even at their roofline "
        f"bound (e.g. {pruned['label']}: {pruned['reason']})",
    )
