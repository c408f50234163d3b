"""Before/after table of every shipped scenario: step time, tokens/s and the share of the step
in dispatch + combine, on an older checkout of moesim and on this one.

    git worktree add /tmp/moesim-before 7067d65
    python tools/before_after.py --before /tmp/moesim-before [--timeout 600] [--out table.md]
    python tools/before_after.py --ablate routing.dispatch=pairs   # this checkout, one item off

Both sides run the same scenario file from this checkout with ``sim.fidelity: analytic`` (the
discrete-event engine on the 64- and 2,048-GPU scenarios takes minutes on the old code) and
``sim.trace: false``; each run is a separate process with ``PYTHONPATH`` set to its checkout, so
the side's own ``moesim`` is imported. A scenario the old code cannot load (fields it did not
have yet) or that fails is reported with the first line of its error. Serving scenarios
(``*-serve.yaml``) time a request stream, not one step, and are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys
import moesim
over = {"sim.fidelity": "analytic", "sim.trace": False, "sim.progress": False}
over.update(json.loads(sys.argv[2]))
sc = moesim.load_scenario(sys.argv[1], overrides=over)
s = moesim.simulate(sc).summary
b = s["breakdown_s"]
print(json.dumps({"step_s": s["step_time_s"], "tokens_per_s": s["tokens_per_s"],
                  "a2a_s": b.get("dispatch", 0.0) + b.get("combine", 0.0)}))
"""


def scenarios() -> list[Path]:
    """Shipped step scenarios: scenarios/*.yaml and scenarios/pim/*.yaml, serving left out."""
    files = sorted((ROOT / "scenarios").glob("*.yaml")) + sorted(
        (ROOT / "scenarios" / "pim").glob("*.yaml")
    )
    return [f for f in files if not f.name.endswith("-serve.yaml")]


def run(tree: Path, scenario: Path, timeout_s: float, overrides: dict | None = None) -> dict:
    """One scenario on one checkout (with ``overrides``): its numbers, or ``{"error": last
    line}``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", RUNNER, str(scenario), json.dumps(overrides or {})],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            cwd=tree,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout_s:.0f} s"}
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1].split(f"{scenario}: ", 1)[-1] if lines else f"exit {out.returncode}"
        return {"error": last[:110]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cell(r: dict) -> tuple[str, str, str]:
    if "error" in r:
        return ("-", "-", "-")
    share = r["a2a_s"] / r["step_s"] if r["step_s"] > 0 else 0.0
    return (f"{r['step_s'] * 1e3:,.2f} ms", f"{r['tokens_per_s']:,.0f}", f"{share:.1%}")


def table(before: Path, timeout_s: float) -> str:
    """Markdown table, one row per scenario."""
    rows = [
        "| scenario | step before | step after | tokens/s before | tokens/s after "
        "| dispatch+combine before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for sc in scenarios():
        old, new = run(before, sc, timeout_s), run(ROOT, sc, timeout_s)
        (sb, tb, ab), (sa, ta, aa) = _cell(old), _cell(new)
        name = str(sc.relative_to(ROOT / "scenarios"))
        rows.append(f"| {name} | {sb} | {sa} | {tb} | {ta} | {ab} | {aa} |")
        for side, r in (("before", old), ("after", new)):
            if "error" in r:
                notes.append(f"- {name}, {side}: {r['error']}")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows + (["", *notes] if notes else []))


def ablation(overrides: dict, timeout_s: float) -> str:
    """This checkout with and without ``overrides``: which scenarios the item moves."""
    key = ", ".join(f"{k}={v}" for k, v in overrides.items())
    rows = [
        f"| scenario | step | step with {key} | dispatch+combine | with {key} |",
        "|---|---|---|---|---|",
    ]
    for sc in scenarios():
        (s0, _, a0), (s1, _, a1) = (_cell(run(ROOT, sc, timeout_s, o)) for o in ({}, overrides))
        rows.append(f"| {sc.relative_to(ROOT / 'scenarios')} | {s0} | {s1} | {a0} | {a1} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="checkout of the older moesim")
    p.add_argument("--ablate", action="append", default=[], help="KEY=VALUE on this checkout")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--out", type=Path, help="write the table here as well")
    a = p.parse_args()
    if a.ablate:
        import yaml

        over = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.ablate)}
        text = ablation(over, a.timeout)
    elif a.before is None:
        p.error("--before or --ablate is required")
    else:
        text = table(a.before.resolve(), a.timeout)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
