"""Engine end to end: conservation, timelines, outputs, and a hand-computed single device."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from moesim import catalog, simulate
from moesim.engine.des import Engine
from moesim.plan.workload import build_plan
from moesim.results.collect import collect, write_outputs


def test_tokens_and_bytes_are_conserved(small):
    sc = small(
        **{
            "routing.capacity_factor": 1.0,
            "routing.distribution": "zipf",
            "workload.batch_size": 512,
        }
    )
    plan = build_plan(sc)
    engine = Engine(plan, progress=False).run()
    d_bytes = sc.model.d_model * 2
    total_traffic = 0.0
    for lp in plan.layers:
        kept = lp.routed_pairs - lp.dropped_pairs
        assert lp.routed_pairs == sc.workload.tokens * sc.model.top_k
        assert lp.device_tokens.sum() == kept  # etp 1: each kept pair processed once
        assert lp.expert_load.sum() == kept
        sent = lp.dispatch.total_bytes + lp.dispatch.local_bytes
        assert sent == kept * d_bytes
        total_traffic += 2 * lp.dispatch.total_bytes  # dispatch + combine
    # bytes received: what the links into devices delivered (single switch: last hop)
    links = collect(engine).links
    into_device = links["link"].str.contains(r"->n\d+\.d\d+$")
    assert links.loc[into_device, "bytes_carried"].sum() == pytest.approx(total_traffic)
    assert links.loc[~into_device, "bytes_carried"].sum() == pytest.approx(total_traffic)


def test_breakdown_tiles_the_critical_timeline_and_trace_has_no_overlaps(small, tmp_path):
    result = simulate(small(**{"routing.distribution": "zipf", "routing.zipf_s": 1.2}))
    s = result.summary
    assert sum(s["breakdown_s"].values()) == pytest.approx(s["step_time_s"], rel=1e-9)
    assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["step_time_s"])
    out = write_outputs(result, tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "step_time_s",
        "tokens_per_s",
        "breakdown_s",
        "routing",
        "devices",
        "links",
        "scenario_resolved",
    ):
        assert key in summary
    for key in ("attention", "router", "dispatch", "experts", "combine"):
        assert key in summary["breakdown_s"]
    assert {"max_over_mean_load", "drop_rate"} <= set(summary["routing"])
    devices = pd.read_csv(out / "devices.csv")
    links = pd.read_csv(out / "links.csv")
    assert len(devices) == summary["devices"] == 8
    assert len(links) == summary["links"] == 16
    assert {"utilization", "memory_used_bytes", "experts_s", "combine_wait_s"} <= set(devices)
    assert {"bytes_carried", "busy_s", "utilization"} <= set(links)
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    slices = [e for e in trace if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {1, 2}
    for (pid, tid), grp in pd.DataFrame(slices).groupby(["pid", "tid"]):
        grp = grp.sort_values("ts")
        ends = (grp["ts"] + grp["dur"]).to_numpy()[:-1]
        assert (grp["ts"].to_numpy()[1:] >= ends - 1e-6).all(), (pid, tid)


def test_imbalance_shows_as_waiting_on_other_devices(small):
    result = simulate(
        small(
            **{
                "routing.distribution": "zipf",
                "routing.zipf_s": 1.5,
                "routing.shuffle_hot_experts": False,
                "workload.batch_size": 512,
            }
        )
    )
    dev = result.devices
    hot = dev["experts_s"].idxmax()
    # expert 0 is the hottest (no shuffle) and lives on device 0 (contiguous placement)
    assert hot == 0
    others = dev.drop(index=hot)
    assert (others["combine_wait_s"] > dev.at[hot, "combine_wait_s"]).all()
    # the hot device's extra expert time is what the others wait for at the combine
    gap = dev.at[hot, "experts_s"] - others["experts_s"]
    assert (others["combine_wait_s"] >= 0.9 * gap).all()


PLAIN_ROOFLINE = {  # the plain roofline: no shape factors, launches add (tests/test_roofline.py)
    "gemm_k_half": 0.0,
    "gemm_tiles_half": {},
    "gemm_split_k_launch_s": {},
    "attention_efficiency": None,
    "async_launch": False,
}


def test_single_device_step_is_sum_of_closed_form_kernels():
    """One device, one MoE layer, 1 expert top-1, no attention context: hand-computed."""
    from moesim import scenario_from_dict

    d, f, heads, hd, vocab, tokens = 1024, 4096, 8, 128, 1000, 2048
    plain = {"preset": "h100-sxm", **PLAIN_ROOFLINE}
    sc = scenario_from_dict(
        {
            "model": {
                "n_layers": 1,
                "d_model": d,
                "n_heads": heads,
                "n_kv_heads": heads,
                "head_dim": hd,
                "vocab_size": vocab,
                "d_ff_expert": f,
                "n_experts": 1,
                "top_k": 1,
            },
            "cluster": {"nodes": 1, "devices_per_node": 1, "device": plain},
            "workload": {"phase": "prefill", "batch_size": 1, "seq_len": tokens},
            "sim": {"progress": False},
        }
    )
    dev = catalog.device("h100-sxm", **PLAIN_ROOFLINE)
    peak = 989.4e12 * dev.compute_efficiency
    bw = 3.35e12 * dev.memory_efficiency
    launch = dev.kernel_launch_s

    def roof(flops, nbytes, kernels=1):
        return max(flops / peak, nbytes / bw) + kernels * launch

    qkv = roof(
        2 * tokens * d * 3 * heads * hd, 2 * (d * 3 * heads * hd + tokens * (d + 3 * heads * hd))
    )
    keys = (tokens + 1) / 2
    core = roof(
        4 * tokens * keys * heads * hd, tokens * 2 * heads * hd * 2 + tokens * 2 * heads * hd * 2
    )
    o = roof(2 * tokens * heads * hd * d, 2 * (heads * hd * d + tokens * (heads * hd + d)))
    gate = roof(2 * tokens * d * 1, 2 * (d + tokens * (d + 1)))
    gating = roof(5 * tokens * 1, 3 * tokens * 1 * 4)  # softmax + top-k over fp32 scores
    permute = roof(0, 2 * tokens * d * 2)  # gather: read + write each pair's activation
    # weighted scatter-add, inside the combine kernel: no launch of its own
    unpermute = roof(2 * tokens * d, (3 * tokens + tokens) * d * 2, 0)
    experts = (
        roof(4 * tokens * d * f, 2 * (2 * d * f + tokens * (d + 2 * f)), 0)  # gate + up GEMM
        + roof(5 * tokens * f, 2 * 3 * tokens * f, 0)  # silu(g) * u
        + roof(2 * tokens * d * f, 2 * (d * f + tokens * (f + d)), 0)  # down GEMM
        + 3 * launch
    )
    head = roof(2 * 1 * d * vocab, 2 * (d * vocab + (d + vocab)))
    expected = qkv + core + o + gate + gating + permute + experts + unpermute + head
    result = simulate(sc)
    assert result.step_time_s == pytest.approx(expected, rel=1e-9)
    assert result.summary["breakdown_s"]["dispatch"] == 0.0


def test_rerun_is_deterministic(small):
    a = simulate(small(**{"routing.distribution": "zipf"}))
    b = simulate(small(**{"routing.distribution": "zipf"}))
    assert a.step_time_s == b.step_time_s
    np.testing.assert_array_equal(a.devices["finish_s"], b.devices["finish_s"])


def test_a_batch_smaller_than_the_attention_replicas_is_flagged(small):
    """Prefill with 3 prompts on 8 attention replicas leaves 5 GPUs without attention work:
    the summary says so (and stays silent when every replica has a sequence)."""
    short = small(**{"workload.phase": "prefill", "workload.batch_size": 3})
    plan = build_plan(short)
    assert len(plan.warnings) == 1 and "5 replicas (5 devices)" in plan.warnings[0]
    assert collect(Engine(plan, progress=False).run()).summary["warnings"] == plan.warnings
    full = small(**{"workload.phase": "prefill", "workload.batch_size": 8})
    assert build_plan(full).warnings == []


def test_every_moe_layer_dispatches_over_the_same_pairs(small):
    """Skewed routing leaves some (source, rank) pairs empty, differently in every layer; the
    dispatch still lists every pair (zero-byte ones too), so the engine routes and merges
    one flow pattern per direction for the whole step."""
    sc = small(
        **{
            "model.n_layers": 4,
            "routing.distribution": "zipf",
            "routing.zipf_s": 2.0,
            "workload.batch_size": 8,
        }
    )
    plan = build_plan(sc)
    moe = [lp for lp in plan.layers if lp.moe]
    assert any((lp.dispatch.nbytes == 0).any() for lp in moe)  # some pairs drew no token
    for lp in moe[1:]:
        assert lp.dispatch.src is moe[0].dispatch.src and lp.dispatch.dst is moe[0].dispatch.dst
    engine = Engine(plan, progress=False).run()
    assert len(engine.patterns._cache) == 2  # dispatch and combine


def test_time_in_flight_is_the_union_of_intervals():
    """Per device, the time some collective is in flight is the measure of the union of its
    intervals (single devices and arrays of devices recorded in any mix), against a fine
    grid count; a device without any (the fourth) has none."""
    from moesim.engine.recorder import Recorder

    rng = np.random.default_rng(2)
    rec = Recorder(4, keep_slices=False)
    intervals = []
    for k in range(40):
        start = float(rng.integers(0, 90))
        end = start + float(rng.integers(0, 15))
        if k % 5 == 0:
            rec.in_flight(np.arange(3), start, end)
            intervals += [(g, start, end) for g in range(3)]
        else:
            g = int(rng.integers(0, 3))
            rec.in_flight_one(g, start, end)
            intervals.append((g, start, end))
    grid = np.arange(0, 110, 0.5) + 0.25  # integer endpoints: half-step cells are exact
    for g in range(3):
        covered = np.zeros(len(grid), dtype=bool)
        for h, s, e in intervals:
            if h == g:
                covered |= (grid > s) & (grid < e)
        assert rec.comm_busy_s()[g] == pytest.approx(0.5 * covered.sum())
    assert rec.comm_busy_s()[3] == 0.0


def test_time_in_flight_adds_in_the_order_of_a_plain_loop():
    """The union per device equals, bit for bit, a loop over the device's intervals sorted
    by start (ties in recording order) that adds from 0.0 what reaches past the ones before;
    float times, ties, empty and nested intervals, single devices mixed with arrays."""
    from moesim.engine.recorder import Recorder

    rng = np.random.default_rng(5)
    for case in range(60):
        n = int(rng.integers(1, 7))
        every = case % 2 == 0  # only collectives of every device (the stacked tables)
        rec = Recorder(n, keep_slices=False)
        intervals: list[tuple[int, float, float]] = []
        for _ in range(int(rng.integers(1, 40))):
            start = float(rng.choice([rng.random() * 10, float(rng.integers(0, 5))]))
            end = start + float(rng.random() * 3 * rng.integers(0, 2))
            if every or rng.random() < 0.4:
                devices = np.arange(n) if every else np.flatnonzero(rng.random(n) < 0.7)
                ends = end + rng.random(len(devices))
                rec.in_flight(devices, start, ends)
                intervals += [(int(g), start, float(e)) for g, e in zip(devices, ends, strict=True)]
            else:
                g = int(rng.integers(0, n))
                rec.in_flight_one(g, start, end)
                intervals.append((g, start, end))
        want = np.zeros(n)
        for g in range(n):
            reach = -np.inf
            for _, s, e in sorted((x for x in intervals if x[0] == g), key=lambda x: x[1]):
                want[g] += max(0.0, e - max(s, reach))
                reach = max(reach, e)
        assert np.array_equal(rec.comm_busy_s(), want)


def test_a_stream_runs_its_walk_as_a_simpy_process_would():
    """``_Stream`` drives a generator with the events ``simpy.Process`` gives it: the same
    clock at every step, a failed event raised into it (and caught there), the value of a
    succeeded one sent, and the same number of events processed, its end included."""
    from moesim.engine.des import _Stream
    from moesim.engine.recorder import CountingEnvironment

    def walk(env, seen):
        yield env.timeout(1.5)
        seen.append(env.now)
        bad = env.event()
        bad.fail(ValueError("late"))
        try:
            yield bad
        except ValueError as err:
            seen.append(str(err))
        good = env.event()
        good.succeed("value")
        seen.append((yield good))
        yield env.timeout(0.25)
        seen.append(env.now)

    runs = []
    for start in (lambda env, g: env.process(g), _Stream):
        env, seen = CountingEnvironment(), []
        for _ in range(3):
            start(env, walk(env, seen))
        env.run()
        runs.append((seen, env.now, env.events_processed))
    assert runs[0] == runs[1]
    seen, end, _ = runs[0]
    assert seen == [1.5] * 3 + ["late"] * 3 + ["value"] * 3 + [1.75] * 3 and end == 1.75


def test_the_counting_environment_schedules_timeouts_and_events_as_simpy_does():
    """Its own ``timeout`` and ``event`` queue what simpy's would: the same (time, priority,
    id) entries for the same calls, a value carried, a negative delay refused."""
    import simpy

    from moesim.engine.recorder import CountingEnvironment

    queues = []
    for env in (simpy.Environment(), CountingEnvironment()):
        env.timeout(0.5)
        pending = env.event()
        pending.succeed("done")
        env.timeout(2.0, value="late")
        env.timeout(0.0)
        queues.append([(t, prio, eid, type(ev), ev._value) for t, prio, eid, ev in env._queue])
        with pytest.raises(ValueError, match="Negative delay"):
            env.timeout(-1.0)
    assert queues[0] == queues[1]
    by_id = sorted(queues[1], key=lambda entry: entry[2])
    assert [(entry[0], entry[4]) for entry in by_id] == [
        (0.5, None),
        (0.0, "done"),
        (2.0, "late"),
        (0.0, None),
    ]
