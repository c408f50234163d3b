"""Capacity planning: a hand-solvable plan, pruning never loses the answer, infeasible plans,
the report (self-contained HTML with valid embedded PNGs; rendered by headless Chromium where
one is installed), prices with sources, bad plan input."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from moesim import catalog, load_scenario, scenario_from_dict, simulate
from moesim.cli import main
from moesim.studies.capacity import (
    load_plan,
    pareto_front,
    phase_class,
    run_plan,
    step_time_lower_bound_s,
)
from moesim.studies.capacity_report import PLOTS, write_plan_report

ROOT = Path(__file__).resolve().parents[1]

# -- a plan solvable by hand ---------------------------------------------------------------
# One device, decode of one token with one token of context, every expert chosen (top_k = E),
# compute peak so high and launches free that the step is the weights streamed once over HBM:
# t = W / bandwidth, with W the bytes of every weight read in the step.
D, H, HD, F, E, L, VOCAB = 1024, 8, 128, 4096, 4, 2, 1000
MODEL = {
    "name": "hand",
    "n_layers": L,
    "d_model": D,
    "n_heads": H,
    "n_kv_heads": H,
    "head_dim": HD,
    "vocab_size": VOCAB,
    "d_ff_expert": F,
    "n_experts": E,
    "top_k": E,
}
W_BYTES = 2.0 * (L * (D * 3 * H * HD + H * HD * D + D * E + E * 3 * D * F) + VOCAB * D)
"""qkv and output projections, router and E experts (3 d f each) per layer, LM head; bf16."""


def _device(name: str, bandwidth: float, memory: float = 80e9) -> dict:
    return {
        "name": name,
        "memory_bytes": memory,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "peak_flops_per_s": {"bf16": 1e18},
        "compute_efficiency": 1.0,
        "memory_efficiency": 1.0,
        "kernel_launch_s": 0.0,
        "power_w": 100.0,
    }


BANDWIDTH = {"slow": 1e11, "mid": 2e11, "fast": 4e11, "tiny": 8e11}
PRICE = {"slow": 1.0, "mid": 1.5, "fast": 4.0, "tiny": 0.5}


def _hand_plan(tmp_path: Path, step_max_s: float, **fields) -> Path:
    devices = [_device(n, bw, 0.1e9 if n == "tiny" else 80e9) for n, bw in BANDWIDTH.items()]
    plan = {
        "name": "hand",
        "base": {
            "model": MODEL,
            "cluster": {"nodes": 1, "devices_per_node": 1, "device": devices[0]},
            "workload": {"phase": "decode", "batch_size": 1, "seq_len": 1},
        },
        "candidates": {"cluster.device": devices},
        "targets": {"step_time_s": {"max": step_max_s}},
        "prices": PRICE,
        **fields,
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _run(path: Path, out: Path, **kw):
    spec, base = load_plan(path)
    return run_plan(spec, base, out, str(path), **kw)


def test_hand_solvable_plan_picks_the_cheapest_that_meets_the_target(tmp_path):
    t = {n: W_BYTES / bw for n, bw in BANDWIDTH.items()}  # slow 2.2 ms, mid 1.1, fast 0.55
    target = 0.5 * (t["slow"] + t["mid"])  # mid and fast meet it; mid is cheaper
    result = _run(_hand_plan(tmp_path, target), tmp_path / "out")
    table = result.table.set_index("device")
    assert result.feasible
    assert table.loc["mid", "candidate"] == result.chosen
    # the simulated step is the hand-computed weight stream (KV and activations are < 1%)
    for name in ("mid", "fast"):
        assert table.loc[name, "step_time_s"] == pytest.approx(t[name], rel=0.01)
    assert table.loc["mid", "fidelity"] == "des"  # confirmed by the discrete-event engine
    # the cheap device cannot hold the weights; the slow one cannot reach the step time
    assert table.loc["tiny", "status"] == "pruned_memory"
    assert table.loc["slow", "status"] == "pruned_bound"
    # cost and margin: 1 device at 1.5 USD/h; margin 1 - t / target
    assert table.loc["mid", "cost_per_hour_usd"] == pytest.approx(1.5)
    assert table.loc["mid", "margin.step_time_s"] == pytest.approx(1 - t["mid"] / target, rel=0.02)
    out = write_plan_report(result, tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "**Chosen: device=mid**" in md.split("## Why")[0]
    assert json.loads((out / "plan.json").read_text())["answer"]["device"] == "mid"


def test_pruned_candidates_are_never_cheaper_and_feasible(tmp_path):
    """Re-simulate every pruned candidate (pruning off): none may be feasible and cheaper than
    the answer, and the answer is the same."""
    t_mid = W_BYTES / BANDWIDTH["mid"]
    path = _hand_plan(tmp_path, 1.2 * t_mid)
    pruned = _run(path, tmp_path / "a", detail=False)
    full = _run(
        _hand_plan(tmp_path, 1.2 * t_mid, prune={"memory": False, "bound": False}),
        tmp_path / "b",
        detail=False,
    )
    _check_pruned(pruned, full)
    assert (pruned.table["status"].str.startswith("pruned")).sum() == 2


def _check_pruned(pruned, full):
    assert pruned.chosen == full.chosen
    chosen_cost = pruned.row(pruned.chosen)["cost_per_hour_usd"]
    redone = full.table.set_index("candidate")
    for cand in pruned.table.loc[pruned.table["status"].str.startswith("pruned"), "candidate"]:
        row = redone.loc[cand]
        assert not (row["feasible"] and row["cost_per_hour_usd"] < chosen_cost), row["label"]
        if pruned.row(cand)["status"] == "pruned_memory":
            assert row["status"] == "no_fit"  # the plan builder agrees: it does not fit
        else:
            assert row["status"] == "ok" and not row["feasible"]


MIXTRAL = {
    "model": {"preset": "mixtral-8x7b", "n_layers": 2},
    "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
    "parallelism": {"tp": 1, "ep": 8},
    "workload": {"phase": "decode", "batch_size": 64, "seq_len": 1024},
    "routing": {"distribution": "zipf", "zipf_s": 1.0},
}


def _mixtral_plan(tmp_path: Path, name: str = "plan.yaml", **fields) -> Path:
    """Full 32-layer Mixtral decode (so that one GPU cannot hold it in bf16), 16 candidates."""
    plan = {
        "name": "mixtral",
        "base": MIXTRAL,
        "overrides": {"model.n_layers": 32, "workload.batch_size": 256},
        "candidates": {
            "cluster.device": ["h100-sxm", "a100-sxm-80gb"],
            "cluster.devices_per_node": [1, 8],
            "parallelism.ep": [1, 8],
            "workload.dtypes.expert_weights": ["bf16", "int4"],
        },
        "targets": {"tokens_per_s": {"min": 30000}},
        "confirm": {"top": 1},
        **fields,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(plan))
    return path


def test_pruning_on_a_real_grid_loses_nothing(tmp_path):
    pruned = _run(_mixtral_plan(tmp_path), tmp_path / "a", detail=False)
    full = _run(
        _mixtral_plan(tmp_path, "full.yaml", prune={"memory": False, "bound": False}),
        tmp_path / "b",
        detail=False,
    )
    statuses = set(pruned.table["status"])
    assert {"pruned_memory", "pruned_bound", "invalid", "ok"} <= statuses
    _check_pruned(pruned, full)


@pytest.mark.parametrize("fidelity", ["analytic", "des"])
def test_step_time_lower_bound_holds(fidelity):
    """The bound is below the simulated step on every layout, skewed routing and drops too."""
    cases = [(8, 8, 1, None, 64), (8, 4, 2, None, 64), (4, 4, 1, 1.0, 64), (2, 2, 2, None, 64)]
    cases.append((8, 2, 1, None, 2))  # prefill of 2 sequences: 3 of 4 groups have no tokens
    for dpn, ep, tp, cf, batch in cases:
        over = {
            "workload.batch_size": batch,
            "cluster.devices_per_node": dpn,
            "parallelism.ep": ep,
            "parallelism.tp": tp,
            "routing.capacity_factor": cf,
            "workload.dtypes.expert_weights": "int4",
            "sim.fidelity": fidelity,
            "sim.progress": False,
        }
        for phase, seq in (("decode", 1024), ("prefill", 256))[batch < 64 :]:
            sc = scenario_from_dict(
                MIXTRAL, {**over, "workload.phase": phase, "workload.seq_len": seq}
            )
            lb = step_time_lower_bound_s(sc)
            step = simulate(sc).step_time_s
            assert lb <= step * (1 + 1e-9), (dpn, ep, tp, cf, phase)
            if cf is None and batch >= 64:  # and useful: no drops, every device busy
                assert lb > 0.3 * step, (dpn, ep, tp, cf, phase)


def test_infeasible_plan_names_the_closest_candidate_and_the_miss(tmp_path, capsys):
    t_fast = W_BYTES / BANDWIDTH["fast"]
    target = 0.5 * t_fast  # nothing is that fast; fast misses by t_fast / target - 1 = +100%
    path = _hand_plan(tmp_path, target)
    result = _run(path, tmp_path / "out")
    assert not result.feasible
    assert result.row(result.closest)["device"] == "fast"
    (miss,) = result.misses(result.closest)
    assert miss.startswith("step_time_s") and "+100." in miss  # +100.x%: KV, activations
    out = write_plan_report(result, tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "No candidate meets every target" in md and "Closest: **device=fast**" in md
    assert main(["plan", str(path), "--out", str(tmp_path / "cli"), "-q", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "no candidate meets every target" in printed and "device=fast" in printed


# -- the report ----------------------------------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    plan = {
        "name": "mixtral-2-layers",
        "base": MIXTRAL,
        "candidates": {"cluster.device": ["h100-sxm", "a100-sxm-80gb"], "parallelism.ep": [4, 8]},
        "targets": {"tokens_per_s": {"min": 40000}},
    }
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert main(["plan", str(path), "--out", str(tmp / "out"), "-q", "--workers", "1"]) == 0
    return tmp / "out"


def test_report_html_is_self_contained_with_valid_pngs(report):
    text = (report / "report.html").read_text()
    parser = _Tags()
    parser.feed(text)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == len(PLOTS)
    for attrs in imgs:
        head, data = attrs["src"].split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(data, validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert np.ptp(pixels) > 0  # not a blank image
    # nothing loaded from elsewhere: no src or href besides the inline images
    for tag, attrs in parser.tags:
        for key in ("src", "href"):
            if key in attrs:
                assert tag == "img" and attrs[key].startswith("data:"), (tag, attrs)
    # the Markdown report points at the same PNGs, written beside it
    md = (report / "report.md").read_text()
    for name in PLOTS:
        assert f"({name}.png)" in md and (report / f"{name}.png").stat().st_size > 0
    plan = json.loads((report / "plan.json").read_text(), parse_constant=_no_nan)  # strict
    assert plan["feasible"] and plan["answer"]["label"] in md.split("## Why")[0]


def _no_nan(name: str):
    raise ValueError(f"{name} is not JSON")


CHROMIUM = next(
    (
        shutil.which(b)
        for b in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
        if shutil.which(b)
    ),
    None,
)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    """Every image decodes in the browser (the report's own load check writes the counts into
    the DOM), and a screenshot renders without errors."""
    url = (report / "report.html").resolve().as_uri()
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run(
        [*args, "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert f'data-images="{len(PLOTS)}"' in dom
    assert f'data-images-loaded="{len(PLOTS)}"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1200,3000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200) and np.ptp(pixels) > 0


# -- pieces ----------------------------------------------------------------------------------
def test_pareto_front_by_hand():
    cost = np.array([1.0, 2.0, 2.0, 3.0, 4.0, math.nan])
    value = np.array([10.0, 30.0, 20.0, 25.0, 40.0, 50.0])
    # (2, 20) is beaten by (2, 30); (3, 25) by (2, 30); NaN is never on the front
    assert pareto_front(cost, value).tolist() == [True, True, False, False, True, False]


def test_every_price_has_a_source():
    for name, entry in catalog.raw("prices").items():
        assert entry["price_per_device_hour_usd"] > 0
        assert entry["sources"]["price_per_device_hour_usd"], name
        assert name in catalog.names("devices"), name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "colour: unknown key"),
        ({"candidates": {"cluster.device": ["h900"]}}, "candidates.cluster.device: h900: unknown"),
        ({"targets": {"tokens_per_s": {}}}, "targets.tokens_per_s: a target needs min, max"),
        (
            {"candidates": {"cluster.device": [_device("nameless", 1e12)]}},
            "prices: no price for device 'nameless'",
        ),
        ({"candidates": {"parallelism.ep": [3]}}, "no valid candidate; e.g. ep x etp = 3 does not"),
    ],
)
def test_bad_plan_is_one_line_exit_2(tmp_path, capsys, change, message):
    plan = yaml.safe_load(_mixtral_plan(tmp_path).read_text())
    plan.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(plan))
    assert main(["plan", str(path), "--out", str(tmp_path / "o"), "-q", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and message in err and "\n" not in err


def test_training_plan_runs_unpruned_and_picks_the_cheapest_feasible(tmp_path):
    """Training steps have no derived floors: every valid candidate is simulated; the answer is
    the cheapest feasible row (ties: higher throughput), recomputed here from the table; the
    binding class's share is its breakdown phases over the whole step."""
    plan = {
        "name": "train",
        "base": str(ROOT / "scenarios/mixtral-8x7b-8xh100-train.yaml"),
        "overrides": {"model.n_layers": 2, "sim.fidelity": "analytic"},
        "candidates": {"cluster.devices_per_node": [4, 8], "parallelism.ep": [2, 4, 8]},
        "targets": {"tokens_per_s": {"min": 400000}},
        "confirm": {"top": 0},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    result = _run(path, tmp_path / "out", detail=False)
    t = result.table
    assert not t["status"].str.startswith("pruned").any()
    ok = t[t["status"] == "ok"]
    assert len(ok) >= 3
    feas = ok[ok["tokens_per_s"] >= 400000]
    best = feas.sort_values(["cost_per_hour_usd", "tokens_per_s"], ascending=[True, False])
    assert result.chosen == best["candidate"].iloc[0]
    for row in ok.to_dict("records"):
        parts = {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("breakdown_s.")}
        parts = {k: v for k, v in parts.items() if isinstance(v, float) and not math.isnan(v)}
        assert sum(parts.values()) == pytest.approx(row["step_time_s"], rel=1e-6)
        assert "grad_reduce" in parts or "param_gather" in parts
        comm = {"dispatch", "combine", "tp_comm", "grad_reduce", "param_gather"}
        waits = sum(v for k, v in parts.items() if k.removesuffix("_bwd") in comm)
        imbalance = row["routing.imbalance_s"]
        shares = {
            "compute": (row["step_time_s"] - waits - imbalance) / row["step_time_s"],
            "imbalance": imbalance / row["step_time_s"],
        }
        for name in ("all-to-all", "gradient communication", "tp communication"):
            mine = sum(v for k, v in parts.items() if phase_class(k) == name)
            shares[name] = mine / row["step_time_s"]
        assert row["limited_by"] == max(shares, key=shares.get)
        assert row["limited_by_share"] == pytest.approx(shares[row["limited_by"]])


def test_plan_where_nothing_fits_names_the_shortfall(tmp_path, capsys):
    path = _hand_plan(tmp_path, 1.0)
    plan = yaml.safe_load(path.read_text())
    plan["candidates"]["cluster.device"] = [_device("tiny", 8e11, memory=0.1e9)]
    path.write_text(yaml.safe_dump(plan))
    assert main(["plan", str(path), "--out", str(tmp_path / "o"), "-q", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    # the weights alone (W plus the embedding table) are 0.22 GB against 0.1 GB
    need = (W_BYTES + 2.0 * VOCAB * D) / 1e9
    assert "no candidate meets every target" in printed
    assert (
        f"memory capacity: no candidate fits in device memory; the closest, device=tiny, "
        f"needs at least {need:.1f} GB per device, has 0.1 GB" in printed
    )


def test_confirmation_overturns_a_screened_answer(tmp_path, monkeypatch):
    """Plan logic with a stand-in simulator: the screen says every device meets the step-time
    target, the confirming engine says the cheapest does not; the plan confirms in rounds and
    answers the cheapest candidate whose confirmed step meets the target."""
    import moesim.studies.capacity as plan_mod

    screen = {"slow": 1.0, "mid": 1.0, "fast": 1.0, "tiny": 1.0}  # ms
    confirmed = {"slow": 3.0, "mid": 1.5, "fast": 0.5, "tiny": 3.0}
    calls = []

    def fake(spec, base, values, fidelity, out, executor, progress, resume):
        table = confirmed if fidelity == "des" else screen
        calls.append((fidelity, [v["cluster.device"]["name"] for v in values]))
        return [
            {"status": "ok", "error": "", "step_time_s": table[v["cluster.device"]["name"]] * 1e-3}
            for v in values
        ]

    monkeypatch.setattr(plan_mod, "_simulate", fake)
    path = _hand_plan(tmp_path, 2e-3, prune={"memory": False, "bound": False})
    plan = yaml.safe_load(path.read_text())
    plan["confirm"] = {"fidelity": "des", "top": 1, "rounds": 3}
    path.write_text(yaml.safe_dump(plan))
    result = _run(path, tmp_path / "out", detail=False)
    # cost order tiny 0.5 < slow 1.0 < mid 1.5 < fast 4.0: tiny and slow fail when confirmed
    assert calls == [
        ("analytic", ["slow", "mid", "fast", "tiny"]),
        ("des", ["tiny"]),
        ("des", ["slow"]),
        ("des", ["mid"]),
    ]
    assert result.row(result.chosen)["device"] == "mid"
    table = result.table.set_index("device")
    assert table.loc["fast", "fidelity"] == "analytic" and table.loc["fast", "feasible"]
    assert not table.loc["slow", "feasible"] and table.loc["slow", "screen_step_time_s"] == 1e-3


# -- common random numbers -------------------------------------------------------------------
def test_common_random_numbers_sweep_gives_identical_routing_for_identical_configs(tmp_path):
    from moesim.studies.sweep import SweepSpec, execute, prepare

    base = {
        "name": "crn",
        "model": {"preset": "mixtral-8x7b", "n_layers": 2},
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"ep": 8},
        "workload": {"phase": "decode", "batch_size": 64, "seq_len": 512},
        "routing": {"distribution": "zipf", "zipf_s": 1.0, "sampling": "draw"},
        "sim": {"fidelity": "analytic"},
    }
    tables = {}
    for crn in (True, False):
        # three points that differ only in a label: the same configuration three times
        spec = SweepSpec(
            name="crn", base=base, axes={"description": ["a", "b", "c"]}, common_random_numbers=crn
        )
        run = prepare(spec, base, tmp_path / str(crn), "crn.yaml", "csv")
        tables[crn] = execute(run, None, progress=False)
    same, own = tables[True], tables[False]
    assert same["seed"].nunique() == 1 and own["seed"].nunique() == 3
    for col in ("routing.max_over_mean_load", "step_time_s"):
        assert same[col].nunique() == 1, col
    assert own["routing.max_over_mean_load"].nunique() > 1
    # the seed column is the seed the point ran on
    rerun = simulate(scenario_from_dict(base, {"sim.seed": int(same["seed"].iloc[0])}))
    assert (
        rerun.summary["routing"]["max_over_mean_load"] == same["routing.max_over_mean_load"].iloc[0]
    )


# -- per-replica batch -----------------------------------------------------------------------
def _decode(over=None, **workload):
    from .conftest import small_scenario

    wl = {"phase": "decode", "seq_len": 1024, **workload}
    return small_scenario(workload=wl, **{"sim.fidelity": "analytic", **(over or {})})


def test_batch_size_max_fills_the_kv_memory_left_by_the_weights():
    from moesim.plan.batch import batch_size_for

    sc = _decode(batch_size="max")
    # hand count: Mixtral, 8 KV heads x 128 x bf16 x (K, V) per layer, 2 layers, tp 1
    kv_per_token = 2 * 8 * 128 * 2 * 2
    # the weights per device as the plan builder places them, from a run of any batch
    weights = simulate(_decode(batch_size=8)).devices["weights_bytes"].max()
    per_replica = math.floor((0.9 * 80e9 - weights) / ((1024 + 1) * kv_per_token))
    assert batch_size_for(sc) == 8 * per_replica  # dp 8 replicas (tp 1)
    result = simulate(sc)
    assert result.summary["tokens"] == 8 * per_replica
    # one more sequence per replica would not fit
    peak = result.devices["weights_bytes"].max() + (per_replica + 1) * 1025 * kv_per_token
    assert peak > 0.9 * 80e9


def test_batch_per_replica_scales_with_the_cluster():
    one = _decode(batch_per_replica=16)
    two = _decode({"cluster.nodes": 2}, batch_per_replica=16)
    from moesim.plan.batch import batch_size_for

    assert batch_size_for(one) == 16 * 8 and batch_size_for(two) == 16 * 16
    a, b = simulate(one).summary, simulate(two).summary
    # the same per-replica work: twice the tokens at about the same step time
    assert b["tokens"] == 2 * a["tokens"]
    assert b["tokens_per_s"] > 1.5 * a["tokens_per_s"]


def test_batch_options_reject_bad_combinations():
    from moesim import ScenarioError

    with pytest.raises(ScenarioError, match="not both"):
        _decode(batch_size=64, batch_per_replica=16)
    with pytest.raises(ScenarioError, match="decode"):
        from .conftest import small_scenario

        small_scenario(workload={"phase": "prefill", "seq_len": 512, "batch_size": "max"})


# -- serving plans: stability, demand, max_rate ----------------------------------------------
def _serve_plan(tmp_path: Path, name: str, **fields) -> Path:
    base = {
        "name": "serve-plan",
        "model": {"preset": "mixtral-8x7b", "n_layers": 2},
        "cluster": {"nodes": 1, "devices_per_node": 8, "device": "h100-sxm"},
        "parallelism": {"tp": 1, "ep": 8},
        "workload": {
            "phase": "serve",
            "serve": {
                "n_requests": 2000,
                "prompt_tokens": {"distribution": "uniform", "low": 64, "high": 1024},
                "output_tokens": {"distribution": "lognormal", "mean": 48, "high": 512},
                "grid_points": 4,
                "max_batch_size": 64,
                "max_batched_tokens": 4096,
            },
        },
        "routing": {"distribution": "uniform"},
        "sim": {"fidelity": "analytic"},
    }
    plan = {
        "name": name,
        "base": base,
        "candidates": {"workload.serve.replicas": [1, 2]},
        "targets": {"ttft_p99_s": {"max": 1000.0}},  # loose: stability decides
        "throughput_metric": "throughput_tokens_per_s",
        "confirm": {"top": 0},
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_max_rate_plan_then_an_overloaded_candidate_is_never_feasible(tmp_path):
    found = _run(
        _serve_plan(tmp_path, "rate", search="max_rate", max_rate={"start_per_s": 200.0}),
        tmp_path / "rate",
        detail=False,
    )
    table = found.table.set_index("workload.serve.replicas")
    one, two = (float(table.loc[str(r), "max_rate_per_s"]) for r in (1, 2))
    for r in ("1", "2"):
        lo, hi = table.loc[r, "max_rate_per_s"], table.loc[r, "max_rate_upper_per_s"]
        assert 0 < lo < hi <= 1.02 * lo  # bracketed to rel_tol
        assert table.loc[r, "stable"]  # the metrics are those of the highest passing run
    assert 1.6 * one < two < 2.4 * one  # two replicas sustain about twice the rate
    assert found.chosen == int(table.loc["2", "candidate"])
    # demand 1.4 x what one replica sustains: one replica is unstable, never feasible
    result = _run(
        _serve_plan(tmp_path, "demand", demand={"requests_per_s": 1.4 * one}),
        tmp_path / "demand",
        detail=False,
    )
    table = result.table.set_index("workload.serve.replicas")
    assert not table.loc["1", "stable"] and not table.loc["1", "feasible"]
    assert table.loc["1", "ttft_p99_s"] <= 1000.0  # it meets the (loose) target ...
    assert any("unstable" in m for m in result.misses(int(table.loc["1", "candidate"])))
    assert table.loc["2", "feasible"] and result.chosen == int(table.loc["2", "candidate"])
    assert table.loc["2", "offered_rate_per_s"] == pytest.approx(1.4 * one)


@pytest.mark.parametrize(
    "name",
    [
        "mixtral-8x7b-8xh100-decode",
        "mixtral-8x7b-32xh100-pp4-train",
        "minimax-text-01-8xh100-hbmpim-cold-decode",
    ],
)
def test_measured_fraction_is_the_plain_sum(name):
    """The measured share of compute seconds equals a plain loop over layers and phases."""
    from moesim.plan.workload import build_plan

    plan = build_plan(load_scenario(f"scenarios/{name}.yaml", {"sim.trace": False}))
    total = float(np.sum(plan.lm_head_s))
    measured = (
        float(np.sum(plan.lm_head_measured_s)) if plan.lm_head_measured_s is not None else 0.0
    )
    for lp in plan.layers:
        total += sum(float(np.sum(v)) for v in lp.compute_s.values())
        measured += sum(float(np.sum(v)) for v in lp.measured_s.values())
    assert plan.measured_fraction() == measured / total
