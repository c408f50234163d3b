"""``moesim compare A.yaml B.yaml [...] [--set PATH=VALUE ...] [--out DIR]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.config.errors import ScenarioError

HELP = """\
Simulate two or more scenarios (step or serving runs alike) and print their headline metrics
and step-time breakdowns side by side, with each value relative to the first scenario.
--set applies to every scenario; FILE::PATH=VALUE (say b.yaml::parallelism.ep=4) to one.
With --out DIR: DIR/compare.csv (metric x scenario) and DIR/compare.png (a bar per scenario
for each headline metric, and the stacked step-time breakdown).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "compare",
        help="scenarios side by side: headline metrics, breakdowns, a bar chart",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenarios", type=Path, nargs="+", help="two or more scenario YAML files")
    p.add_argument("--set", action="append", metavar="PATH=VALUE", help="override (repeatable)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write compare.csv and compare.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _overrides(items: list[str] | None, files: list[Path]) -> list[dict[str, object]]:
    """--set items for each file: plain ones for all, ``FILE::PATH=VALUE`` for one."""
    import yaml

    per_file: list[dict[str, object]] = [{} for _ in files]
    for item in items or []:
        target, _, rest = item.rpartition("::")
        if "=" not in rest:
            raise ScenarioError(item, "--set expects PATH=VALUE, e.g. workload.batch_size=64")
        path, value = rest.split("=", 1)
        hits = [
            i for i, f in enumerate(files) if not target or str(f) == target or f.name == target
        ]
        if not hits:
            raise ScenarioError(item, f"no scenario {target!r} among {[str(f) for f in files]}")
        for i in hits:
            per_file[i][path.strip()] = yaml.safe_load(value)
    return per_file


def run(args: argparse.Namespace) -> int:
    """Simulate, print the side-by-side table, and write it and its chart with ``--out``."""
    import pandas as pd

    from moesim.config.scenario import load_scenario
    from moesim.report.compare_plots import plot_compare
    from moesim.studies.compare import compare_scenarios, relative_to_first

    if len(args.scenarios) < 2:
        raise ScenarioError("scenarios", "compare needs at least two scenario files")
    named = []
    for path, over in zip(args.scenarios, _overrides(args.set, args.scenarios), strict=True):
        sc = load_scenario(path, over)
        named.append((sc.name, sc))
    table = compare_scenarios(named, progress=not args.quiet)
    rel = relative_to_first(table)
    shown = table.copy().astype(object)
    for col in table.columns[1:]:
        shown[col] = [
            _cell(v) + (f" ({r:.2f}x)" if pd.notna(r) and not isinstance(v, bool) else "")
            for v, r in zip(table[col], rel[col], strict=True)
        ]
    shown[table.columns[0]] = [_cell(v) for v in table[table.columns[0]]]
    print(shown.to_string())
    if args.out:
        import matplotlib.pyplot as plt

        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "compare.csv")
        fig = plot_compare(table)
        fig.savefig(args.out / "compare.png", dpi=110)
        plt.close(fig)
        print(f"wrote {args.out}/compare.csv compare.png")
    return 0


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
