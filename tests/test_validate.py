"""`moesim validate --quick`: exact functional checks and timing error bounds on this host."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from moesim.cli import main
from moesim.validation.validate import (
    error_stats,
    functional_rows,
    measure_noise,
    noise_spread,
)

# Bounds for the quick grid (8 layer shapes, 2 exchanges) on a shared, noisy CI machine; the
# full grid's targets (median <= 15%, p90 <= 30% over 36 shapes) are quoted in the README.
# Timings on a shared VM move by 10-20% when a neighbour is busy, so a miss is measured again
# (calibration included) up to twice before it counts.
QUICK_MEDIAN, QUICK_P90 = 0.25, 0.50


@pytest.mark.timing  # times numpy on this host: opt-in, `pytest -m timing`
def test_validate_quick(tmp_path, capsys):
    for attempt in range(3):
        out = tmp_path / f"v{attempt}"
        assert main(["validate", "--quick", "--out", str(out), "-q"]) == 0
        printed = capsys.readouterr().out
        assert "4/4 layouts" in printed and "host noise" in printed
        df = pd.read_csv(out / "validation.csv")
        median, p90, _ = error_stats(df, "timing")
        if median <= QUICK_MEDIAN and p90 <= QUICK_P90:
            break
    assert {
        "case",
        "kind",
        "predicted_s",
        "measured_s",
        "rel_error",
        "tokens",
        "d_model",
        "d_ff",
        "n_experts",
        "top_k",
        "zipf_s",
        "capacity_factor",
    } <= set(df.columns)
    functional = df[df["kind"] == "functional"]
    assert functional["exact"].all() and (functional["output_rel_error"] < 1e-5).all()
    median, p90, n = error_stats(df, "timing")
    assert n == 8 and median <= QUICK_MEDIAN and p90 <= QUICK_P90, (median, p90)
    assert error_stats(df, "comm")[2] == 2
    assert (out / "validation.png").exists()
    assert (out / "calibration" / "devices.yaml").exists()


def test_calibration_is_a_catalog_device(tmp_path):
    import yaml

    from moesim.catalog.specs import GpuSpec, LinkSpec

    assert main(["calibrate", "--quick", "--out", str(tmp_path)]) == 0
    devices = yaml.safe_load((tmp_path / "devices.yaml").read_text())
    links = yaml.safe_load((tmp_path / "links.yaml").read_text())
    for name, entry in devices.items():
        spec = GpuSpec.model_validate({"name": name, **entry})
        assert spec.type == "cpu" and spec.peak_flops_per_s["fp32"] > 1e9
        numeric = [
            k
            for k, v in entry.items()
            if k != "sources" and isinstance(v, int | float | dict) and not isinstance(v, bool)
        ]
        assert set(numeric) <= set(entry["sources"])
    for name, entry in links.items():
        LinkSpec.model_validate({"name": name, **entry})


def test_functional_rows_are_exact():
    """The functional half of ``moesim validate`` (no timing): every layout's per-expert tokens,
    drops and dispatch bytes equal the numpy reference exactly."""
    rows = pd.DataFrame(functional_rows())
    assert len(rows) == 4 and rows["exact"].all()
    assert (rows["output_rel_error"] < 1e-5).all()


def test_noise_spread_is_p10_to_p90_over_the_median():
    # 11 timings 1..11 s: p10 = 2, p90 = 10, median 6 (linear quantiles): spread 8 / 6
    df = pd.DataFrame({"kind": ["noise"] * 11 + ["timing"], "measured_s": [*range(1, 12), 99.0]})
    assert noise_spread(df) == pytest.approx(8 / 6)
    assert math.isnan(noise_spread(df[df["kind"] == "timing"]))  # no noise rows
    rows = measure_noise(repeats=3)
    assert [r["kind"] for r in rows] == ["noise"] * 3 and all(r["measured_s"] > 0 for r in rows)
