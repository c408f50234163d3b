"""``moesim validate``: cross-validate the simulator against real numpy MoE layers here."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.cli.common import out_dir

NAME = "validate"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``moesim validate``."""
    p = subparsers.add_parser(
        NAME,
        help="cross-validate the simulator against real numpy MoE layers on this host",
        description="Functional checks (exact routing counts, drops and dispatch bytes against "
        "the numpy reference layer), then timing: calibrate this host (or --calibration DIR), "
        "time the reference layer on held-out shapes and a two-process shared-memory dispatch, "
        "and compare with moesim's predictions. Writes DIR/validation.csv (case, kind, "
        "predicted_s, measured_s, rel_error, shape columns) and DIR/validation.png.",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder for validation.csv and validation.png",
    )
    p.add_argument("--quick", action="store_true", help="8 layer shapes and 2 exchanges")
    p.add_argument(
        "--calibration",
        type=Path,
        metavar="DIR",
        help="use this calibration (from moesim calibrate) instead of measuring now",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--published",
        action="store_true",
        help="instead: predict the published kernel measurements (moesim/catalog/measurements) "
        "and print median and p90 |error| per kind; writes DIR/published.csv, published.png",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from moesim.validation.validate import NOISE_LIMIT, error_stats, noise_spread, run_validation

    out_dir(args.out)
    if args.published:
        from moesim.validation.published import print_published

        return print_published(args.out)
    df = run_validation(
        args.out, quick=args.quick, calibration=args.calibration, progress=not args.quiet
    )
    spread = noise_spread(df)
    noisy = not spread <= NOISE_LIMIT
    print(
        f"host noise        {spread:.1%} spread (p10-p90 over the median) of "
        f"{int((df['kind'] == 'noise').sum())} timings of one GEMM; limit {NOISE_LIMIT:.0%}"
    )
    functional = df[df["kind"] == "functional"]
    exact = int(functional["exact"].sum())
    print(
        f"functional        {exact}/{len(functional)} layouts: per-expert tokens, drops and "
        "dispatch bytes equal the reference exactly"
        f"; output max rel error {functional['output_rel_error'].max():.1e}"
    )
    for kind, label in (("timing", "MoE layer time"), ("comm", "shm dispatch time")):
        med, p90, n = error_stats(df, kind)
        print(f"{kind:<17} {label}: median |error| {med:.1%}, p90 {p90:.1%} over {n} cases")
    if noisy:
        print(
            f"warning           this host is too noisy ({spread:.0%} timing spread) for the "
            "timing errors above to mean anything: rerun on a quiet machine"
        )
    print(f"wrote             {args.out}/validation.csv validation.png")
    return 0 if exact == len(functional) else 1
