"""Capacity-plan report: ``report.md``, a self-contained ``report.html`` (PNGs inlined as
base64), the PNGs and ``plan.json``. The answer comes first, then why."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from moesim import catalog
from moesim.report.plan_plots import (
    plot_breakdown_bars,
    plot_gantt,
    plot_link_utilization,
    plot_pareto,
)
from moesim.report.plots import plot_expert_heatmap
from moesim.studies.capacity import PlanResult, unstable

PLOTS = ("breakdown", "pareto", "expert_load", "link_utilization", "timeline")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _seconds(s: float) -> str:
    if math.isnan(s):
        return ""
    return f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


# -- document blocks: rendered to Markdown and to HTML -----------------------------------------
Block = tuple[str, Any]


def _md(blocks: list[Block]) -> str:
    out = []
    for kind, body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body)
        elif kind == "p":
            out.append(body)
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in body))
        elif kind == "table":
            df = body
            head = "| " + " | ".join(map(str, df.columns)) + " |"
            rule = "|" + "---|" * len(df.columns)
            rows = ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in df.itertuples(False)]
            out.append("\n".join([head, rule, *rows]))
        elif kind == "img":
            name, caption = body
            out.append(f"![{caption}]({name}.png)")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Markdown-lite for HTML: **bold** and `code`."""
    text = html.escape(text)
    parts = text.split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;
padding:3px 6px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}code{background:#f3f3f3;padding:0 3px}
.answer{background:#eef6ee;border-left:4px solid #2a2;padding:0.5em 1em}"""

# a self-check a headless browser can read back from the DOM: images that decoded
CHECK = """<script>window.addEventListener('load',function(){var i=document.images,n=0;
for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0)n++;}
document.body.setAttribute('data-images',i.length);
document.body.setAttribute('data-images-loaded',n);});</script>"""


def _html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for kind, body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline(body)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(body)}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in body) + "</ul>")
        elif kind == "table":
            df = body
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>"
                for r in df.itertuples(False)
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            name, caption = body
            data = base64.b64encode(images[name]).decode()
            out.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    out.append(CHECK + "</body></html>")
    return "\n".join(out) + "\n"


# -- content ----------------------------------------------------------------------------------
def _target_rows(result: PlanResult, row: dict[str, Any]) -> pd.DataFrame:
    recs = []
    for metric, t in result.spec.targets.items():
        need = " and ".join(
            s
            for s in (
                f">= {_fmt(t.min)}" if t.min is not None else "",
                f"<= {_fmt(t.max)}" if t.max is not None else "",
            )
            if s
        )
        margin = row.get(f"margin.{metric}", math.nan)
        recs.append(
            {
                "target": metric,
                "required": need,
                "achieved": _fmt(float(row.get(metric, math.nan))),
                "margin": f"{margin:+.1%}"
                if isinstance(margin, float) and math.isfinite(margin)
                else "",
                "met": bool(isinstance(margin, float) and margin >= 0),
            }
        )
    return pd.DataFrame(recs)


def _serving_answer(result: PlanResult, row: dict[str, Any]) -> str:
    """The serving figures of the answer: steady-state throughput with its interval, the
    whole-run figure, stability and (``search: max_rate``) the highest sustained rate."""
    if "whole_run_tokens_per_s" not in row:
        return ""
    spec = result.spec
    thr = float(row.get("throughput_tokens_per_s", math.nan))
    ci = float(row.get("throughput_tokens_per_s_ci", math.nan))
    whole = float(row.get("whole_run_tokens_per_s", math.nan))
    text = (
        f"Steady state (warm-up and drain excluded): **{_fmt(thr)} +- {_fmt(ci)} output "
        f"tokens/s** (95% interval, batch means) at {_fmt(float(row.get('offered_rate_per_s')))}"
        f" requests/s offered, {_fmt(float(row.get('requests', math.nan)))} requests "
        f"simulated; {_fmt(float(row.get('cost_per_million_tokens_usd', math.nan)))} USD per "
        f"million tokens on it. The whole run, ramp and drain included, averages "
        f"{_fmt(whole)} tokens/s. "
    )
    text += (
        "The run is stable: its queue and time to first token do not grow over the last "
        "quarter of the steady window."
        if not unstable(row)
        else f"**The run is unstable**: {row.get('unstable_reason', '')}."
    )
    if spec.search == "max_rate" and "max_rate_per_s" in row:
        text += (
            f" Highest sustained rate within the targets: **{_fmt(row['max_rate_per_s'])} "
            f"requests/s** ({_fmt(row['max_rate_tokens_per_s'])} output tokens/s); "
            f"{_fmt(row['max_rate_upper_per_s'])} requests/s fails (bisection, "
            f"{int(row['max_rate_evaluations'])} runs)."
        )
    return text


def _candidate_table(result: PlanResult) -> pd.DataFrame:
    spec, t = result.spec, result.table
    thr = spec.throughput_metric
    cols = [
        "candidate",
        "label",
        "devices",
        "cost_per_hour_usd",
        "status",
        "fidelity",
        "step_time_s",
        thr,
        "cost_per_million_tokens_usd",
        "energy_per_token_j",
        f"{thr}_ci",
        "whole_run_tokens_per_s",
        "max_rate_per_s",
        "max_rate_upper_per_s",
        *[m for m in spec.targets if m not in ("step_time_s", thr)],
        "stable",
        "feasible",
        "pareto_cost",
        "limited_by",
        "reason",
    ]
    cols = list(dict.fromkeys(c for c in cols if c in t))
    df = t[cols].copy()
    key = df[spec.objective] if spec.objective in df else df["cost_per_hour_usd"]
    df = df.assign(_k=key.astype(float).fillna(math.inf)).sort_values(["_k", "candidate"])
    df = df.drop(columns="_k")
    if "fidelity" in df:
        df["fidelity"] = df["fidelity"].fillna("")
    df["reason"] = df["reason"].fillna("").astype(str).str.slice(0, 90)
    return df


def _slices_frame(d) -> pd.DataFrame:
    names = list(d.devices["device"])
    return pd.DataFrame(
        [(names[g], ph, s, e, layer) for g, ph, s, e, layer in d.slices],
        columns=["device", "phase", "start_s", "end_s", "layer"],
    )


def _price_sources(result: PlanResult) -> list[str]:
    out = []
    t = result.table
    names = [*t.get("device", pd.Series()).dropna(), *t.get("pim_device", pd.Series()).dropna()]
    devices = sorted({d for d in names if d})
    for dev in devices:
        if dev in result.spec.prices:
            out.append(
                f"`{dev}`: {result.spec.prices[dev]} USD per device-hour (from the plan file)"
            )
        else:
            entry = catalog.raw("prices").get(dev, {})
            src = entry.get("sources", {}).get("price_per_device_hour_usd", "")
            out.append(
                f"`{dev}`: {entry.get('price_per_device_hour_usd')} USD per device-hour ({src})"
            )
    return out


def build_report(result: PlanResult, out: Path) -> list[Block]:
    """Write the PNGs into ``out`` and return the document blocks."""
    spec, table = result.spec, result.table
    thr = spec.throughput_metric
    focus = result.chosen if result.chosen is not None else result.closest
    row = result.row(focus)
    blocks: list[Block] = [("h1", f"Capacity plan: {spec.name}")]
    if spec.description:
        blocks.append(("p", spec.description.strip()))
    blocks.append(("h2", "Answer"))
    if result.feasible:
        energy = row.get("energy_per_token_j", math.nan)
        step = float(row.get("step_time_s", math.nan))
        blocks.append(
            (
                "p",
                f"**Chosen: {row['label']}**: {int(row['devices'])} x `{row['device']}`, "
                f"**{row['cost_per_hour_usd']:,.2f} USD per hour** "
                f"({row['price_per_device_hour_usd']:.2f} per device-hour"
                + (
                    f" with {int(row['pim_units_per_device'])} `{row['pim_device']}` units"
                    if row.get("pim_units_per_device")
                    else ""
                )
                + "), "
                f"{_fmt(row.get('cost_per_million_tokens_usd', math.nan))} USD per million "
                f"tokens, {_fmt(energy)} J per token ({row.get('energy_source', '')}); "
                + (f"step {_seconds(step)}, " if math.isfinite(step) else "")
                + f"{_fmt(float(row.get(thr, math.nan)))} {thr} "
                f"({row.get('fidelity', '')} engine). "
                + (
                    "It sustains the highest rate among the candidates (search: max_rate)."
                    if spec.search == "max_rate"
                    else f"It is the lowest `{spec.objective}` among the candidates that meet "
                    "every target and the budget."
                ),
            )
        )
    else:
        blocks.append(("p", "**No candidate meets every target.**"))
        if focus is not None:
            blocks.append(
                (
                    "p",
                    f"Closest: **{row['label']}** ({int(row['devices'])} x `{row['device']}`, "
                    f"{row['cost_per_hour_usd']:,.2f} USD per hour), which misses: "
                    + "; ".join(result.misses(focus)),
                )
            )
    serving = _serving_answer(result, row)
    if serving:
        blocks.append(("p", serving))
    if focus is not None:
        blocks.append(("table", _target_rows(result, row)))
    blocks.append(
        ("p", f"**Binding constraint: {result.binding or 'n/a'}**: {result.binding_reason}.")
    )
    c = result.counts
    fid = table["fidelity"] if "fidelity" in table else pd.Series(dtype=object)
    confirmed = int((fid == spec.confirm.fidelity).sum())
    blocks.append(
        (
            "p",
            f"Search: {len(table)} candidates; {c.get('invalid', 0)} invalid layouts, "
            f"{c.get('over_budget', 0)} over budget, {c.get('pruned_memory', 0)} pruned because "
            f"they cannot fit in memory, {c.get('pruned_bound', 0)} pruned because their "
            f"step-time lower bound already misses a target, {c.get('ok', 0)} simulated "
            f"({spec.screen_fidelity}"
            + (
                f", the best {confirmed} confirmed with {spec.confirm.fidelity})"
                if spec.confirm.top and spec.confirm.fidelity != spec.screen_fidelity
                else ")"
            )
            + f", {c.get('no_fit', 0)} did not fit when simulated, {c.get('error', 0)} failed;"
            f" {result.wall_s:.1f} s.",
        )
    )

    images: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        images[name] = path.read_bytes()

    blocks.append(("h2", "Why"))
    ok = table[table["status"] == "ok"]
    if result.step_note:
        blocks.append(("p", f"Note: {result.step_note}."))
    steps = result.step_table
    if len(steps) and any(c.startswith("breakdown_s.") for c in steps):
        save("breakdown", plot_breakdown_bars(steps))
        blocks.append(("h3", "Step-time breakdown of the top candidates"))
        blocks.append(("img", ("breakdown", "step-time breakdown, top candidates")))
    if len(ok):
        tmin = spec.targets[thr].min if thr in spec.targets else None
        save("pareto", plot_pareto(table, thr, result.chosen, tmin))
        blocks.append(("h3", "Cost and energy against throughput (Pareto frontier)"))
        blocks.append(("img", ("pareto", "Pareto frontier")))
        front = ok[ok["pareto_cost"].astype(bool)].sort_values("cost_per_hour_usd")
        blocks.append(
            (
                "p",
                "Cost frontier (no candidate is both cheaper and faster): "
                + "; ".join(
                    f"{r['label']} ({r['cost_per_hour_usd']:,.2f} USD/h, "
                    f"{_fmt(float(r[thr]))} {thr})"
                    for r in front.to_dict("records")
                )
                + ".",
            )
        )
    d = result.detail
    if d is not None:
        what = "chosen" if result.feasible else "closest"
        expert_load = getattr(d, "expert_load", None)
        links = getattr(d, "links", None)
        if expert_load is not None and len(expert_load):
            save("expert_load", plot_expert_heatmap(expert_load))
            blocks.append(("h3", f"Expert load on the {what} configuration"))
            r = d.summary.get("routing", {})
            blocks.append(
                (
                    "p",
                    f"Max/mean expert load {r.get('max_over_mean_load', 1):.3f} "
                    f"(worst layer {r.get('max_over_mean_load_worst_layer', 1):.3f}), "
                    f"drop rate {r.get('drop_rate', 0):.2%}, imbalance "
                    f"{_seconds(r.get('imbalance_s', 0.0))} over all MoE layers.",
                )
            )
            blocks.append(("img", ("expert_load", "expert load heatmap")))
        if links is not None and len(links):
            save("link_utilization", plot_link_utilization(links))
            blocks.append(("h3", f"Link utilization on the {what} configuration"))
            blocks.append(("img", ("link_utilization", "link utilization")))
        tl = result.timeline
        if getattr(tl, "slices", None) and getattr(tl, "devices", None) is not None:
            save("timeline", plot_gantt(_slices_frame(tl)))
            keep, layers = result.timeline_layers
            cut = f", first {keep} of {layers} layers" if keep < layers else ""
            blocks.append(
                ("h3", f"One step on the {what} configuration ({result.detail_fidelity}{cut})")
            )
            blocks.append(("img", ("timeline", "timeline of one step")))
    blocks.append(("h2", "All candidates"))
    blocks.append(
        (
            "p",
            f"Sorted by `{spec.objective}`. Status: ok (simulated), invalid "
            "(the layout is not possible), pruned_memory / pruned_bound (skipped: "
            "certain not to fit / not to meet a target), no_fit (did not fit when "
            "simulated), over_budget.",
        )
    )
    blocks.append(("table", _candidate_table(result)))
    blocks.append(("h2", "Prices and assumptions"))
    blocks.append(
        (
            "list",
            [
                *_price_sources(result),
                "Energy per token: the simulated `energy_j` where the run reports it, "
                "else every device at its board power (`power_w`, devices.yaml) for "
                "the whole step: an upper estimate.",
            ],
        )
    )
    return blocks, images


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def write_plan_report(result: PlanResult, out: str | Path) -> Path:
    """Write ``report.md``, ``report.html``, the PNGs and ``plan.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    blocks, images = build_report(result, out)
    (out / "report.md").write_text(_md(blocks))
    (out / "report.html").write_text(_html(blocks, images, f"Capacity plan: {result.spec.name}"))
    records = [{k: _jsonable(v) for k, v in r.items()} for r in result.table.to_dict("records")]
    focus = result.chosen if result.chosen is not None else result.closest
    payload = {
        "plan": result.spec.model_dump(mode="json"),
        "feasible": result.feasible,
        "chosen": result.chosen,
        "closest": result.closest,
        "answer": {k: _jsonable(v) for k, v in result.row(focus).items()},
        "misses": result.misses(focus) if (focus is not None and not result.feasible) else [],
        "binding_constraint": result.binding,
        "binding_reason": result.binding_reason,
        "counts": result.counts,
        "wall_s": result.wall_s,
        "images": sorted(f"{n}.png" for n in images),
        "candidates": records,
    }
    (out / "plan.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out
