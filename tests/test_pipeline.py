"""Pipeline parallelism: stages, schedules and their bubbles, timed by both engines."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.errors import ScenarioError
from moesim.engine.analytic import AnalyticEngine
from moesim.engine.des import Engine
from moesim.plan.pipeline import schedule_order
from moesim.plan.workload import build_plan
from tests.conftest import small_scenario

ENGINES = [Engine, AnalyticEngine]
DENSE = {"preset": "mixtral-8x7b", "n_layers": 8, "n_dense_layers": 8, "d_ff_dense": 14336}
FAST_LINK = {"bandwidth_bytes_per_s": 1e15, "latency_s": 0.0}  # stage sends cost ~nothing
FREE_CALLS = {"preset": "h100-sxm", "collective_launch_s": 0.0}  # no fixed cost per send


def _train(schedule: str, pp: int = 4, m: int = 8, model=None, v: int = 1, **kw):
    return small_scenario(
        model=model or {"preset": "mixtral-8x7b", "n_layers": 8},
        cluster={"nodes": 1, "devices_per_node": 2 * pp, "device": kw.pop("device", "h100-sxm")},
        topology=kw.pop("topology", {}),
        parallelism={"tp": 2, "ep": 2, "pp": pp},
        workload={
            "phase": "train",
            "batch_size": m,
            "seq_len": 1024,
            "train": {"micro_batches": m, "schedule": schedule, "virtual_stages": v},
        },
    )


def _uniform(plan):
    """No LM head and no optimizer: every stage does the same work per micro-batch."""
    plan.lm_head_s[:] = 0.0
    plan.train.lm_head_bwd_s[:] = 0.0
    for seconds in plan.pipeline.optimizer_s:
        seconds[:] = 0.0
    return plan


def _idle_fraction(engine) -> np.ndarray:
    """Per device: the share of the step it is not working (waiting for another stage,
    or done before the last stage)."""
    step = engine.rec.finish_s.max()
    return (engine.rec.phase_s["pipeline"] + step - engine.rec.finish_s) / step


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
def test_uniform_stages_give_the_closed_form_bubble(engine_cls, schedule):
    """Bubble (pp - 1) / (v m + pp - 1) (Narayanan et al. SC'21 Sec. 2.2; v = 1 but for
    interleaved) for identical stages and free stage-to-stage sends."""
    pp, m, v = 4, 8, 2 if schedule == "interleaved" else 1
    fast = {"intra_node_link": FAST_LINK}
    sc = _train(schedule, pp, m, DENSE, v, topology=fast, device=FREE_CALLS)
    plan = _uniform(build_plan(sc))
    idle = _idle_fraction(engine_cls(plan).run())
    closed = (pp - 1) / (v * m + pp - 1)
    np.testing.assert_allclose(idle, closed, rtol=0.01)


def test_schedules_run_every_item_once_in_dependency_order():
    """Every (micro-batch, chunk) forward and backward appears once per stage; 1F1B keeps at
    most pp - s micro-batches in flight on stage s."""
    pp, m = 4, 8
    for schedule, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("dualpipe", 2)):
        for s, order in enumerate(schedule_order(schedule, pp, m, chunks)):
            items = [item for step in order for item in step]
            per_stage = m * chunks if schedule == "interleaved" else m
            # a zero-bubble backward (I) leaves its weight gradients (W) for later
            inputs = [(mb, c) for k, mb, c in items if k == "I"]
            weights = [(mb, c) for k, mb, c in items if k == "W"]
            assert sorted(inputs) == sorted(weights), (schedule, s)
            assert all(items.index(("I", *w)) < items.index(("W", *w)) for w in weights)
            assert len(items) == len(set(items)) == 2 * per_stage + len(weights), (schedule, s)
            backwards = {(mb, c) for k, mb, c in items if k in ("B", "I")}
            assert len(backwards) == per_stage, (schedule, s)
            if schedule == "1f1b":
                live = np.cumsum([1 if k == "F" else -1 for k, _, _ in items])
                assert live.max() == min(m, pp - s)


def _prefill(pp: int):
    return small_scenario(
        model={"preset": "mixtral-8x7b", "n_layers": 8},
        cluster={"nodes": 1, "devices_per_node": 2 * pp, "device": "h100-sxm"},
        parallelism={"tp": 2, "ep": 2, "pp": pp},
        workload={"phase": "prefill", "batch_size": 2, "seq_len": 512},
    )


def test_stage_memory_counts_its_own_layers():
    """Weights per stage: a quarter of the layers each, the embedding on the first stage
    and the LM head on the last (untied); KV cache a quarter; against one stage."""
    one, four = build_plan(_prefill(1)), build_plan(_prefill(4))
    m = one.scenario.model
    emb = m.vocab_size * m.d_model * 2 / 2  # bytes of one matrix on a device (bf16, tp 2)
    layers_one = one.memory_bytes["weights"][0] - 2 * emb
    w = four.memory_bytes["weights"].reshape(4, 2)[:, 0]
    np.testing.assert_allclose(w - np.array([emb, 0, 0, emb]), layers_one / 4, rtol=1e-9)
    kv = four.memory_bytes["kv_cache"].reshape(4, 2)[:, 0]
    np.testing.assert_allclose(kv, one.memory_bytes["kv_cache"][0] / 4, rtol=1e-9)


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_an_inference_pipeline_runs_the_stages_in_turn(engine_cls):
    """One micro-batch through four stages with free sends takes the single-stage step (no
    overlap: each stage waits for the one before)."""
    fast = {"intra_node_link": FAST_LINK}
    sc4 = small_scenario(
        model={"preset": "mixtral-8x7b", "n_layers": 8},
        cluster={"nodes": 1, "devices_per_node": 8, "device": FREE_CALLS},
        topology=fast,
        parallelism={"tp": 2, "ep": 2, "pp": 4},
        workload={"phase": "prefill", "batch_size": 2, "seq_len": 512},
    )
    sc1 = small_scenario(
        model={"preset": "mixtral-8x7b", "n_layers": 8},
        cluster={"nodes": 1, "devices_per_node": 2, "device": FREE_CALLS},
        topology=fast,
        parallelism={"tp": 2, "ep": 2},
        workload={"phase": "prefill", "batch_size": 2, "seq_len": 512},
    )
    four = engine_cls(build_plan(sc4)).run().rec.finish_s.max()
    single = engine_cls(build_plan(sc1)).run().rec.finish_s.max()
    np.testing.assert_allclose(four, single, rtol=1e-3)


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipe"])
def test_engines_agree_on_uniform_routing(schedule):
    plan = build_plan(_train(schedule))
    des, ana = Engine(plan).run(), AnalyticEngine(plan).run()
    np.testing.assert_allclose(des.rec.finish_s.max(), ana.rec.finish_s.max(), rtol=0.05)


@pytest.mark.parametrize("engine_cls", ENGINES, ids=["des", "analytic"])
def test_dualpipe_bubble_is_the_zero_bubble_closed_form(engine_cls):
    """DeepSeek-V3 Table 2: DualPipe's bubble is ``(pp/2 - 1)(F&B + B - 3W)`` and 1F1B's
    ``(pp - 1)(F + B)``, with F, B (input and weight gradients) and W (weight gradients) the
    times of one chunk; identical dense stages, free sends and no SMs held for communication,
    so the overlapped pair F&B is F + B. The bubble is the step minus each device's work,
    ``m (F + B)``."""
    pp, m = 4, 8
    fast = {"intra_node_link": FAST_LINK}
    bubble, chunk = {}, {}
    for schedule in ("1f1b", "dualpipe"):
        sc = _train(schedule, pp, m, DENSE, topology=fast, device=FREE_CALLS)
        sc = sc.model_copy(
            update={"parallelism": sc.parallelism.model_copy(update={"comm_sms": 0})}
        )
        plan = _uniform(build_plan(sc))
        pipe = plan.pipeline
        layers = pipe.chunks[0][0]
        backward = [pipe.backward[0][i] for i in layers]
        f = sum(sum(v[0] for v in pipe.layers[0][i].compute_s.values()) for i in layers)
        b = sum(sum(v[0] for v in bl.compute_s.values()) + bl.recompute_s[0] for bl in backward)
        w = sum(sum(v[0] for v in bl.weight_s.values()) for bl in backward)
        assert 0 < w < b
        chunk[schedule] = (f, b, w)
        engine = engine_cls(plan).run()
        bubble[schedule] = engine.rec.finish_s.max() - m * (f + b)
        np.testing.assert_allclose(
            _idle_fraction(engine) * engine.rec.finish_s.max(), bubble[schedule], rtol=1e-3
        )
    f, b, w = chunk["1f1b"]
    assert bubble["1f1b"] == pytest.approx((pp - 1) * (f + b), rel=0.01)
    f, b, w = chunk["dualpipe"]
    assert bubble["dualpipe"] == pytest.approx((pp / 2 - 1) * ((f + b) + b - 3 * w), rel=0.01)


def test_dualpipe_bubble_is_smaller_than_1f1b():
    """Same stages, same micro-batches: DualPipe's two directions fill each other's bubbles."""
    idle = {}
    for schedule in ("1f1b", "dualpipe"):
        plan = _uniform(build_plan(_train(schedule)))
        idle[schedule] = float(_idle_fraction(AnalyticEngine(plan).run()).mean())
    assert idle["dualpipe"] < idle["1f1b"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"parallelism": {"tp": 2, "ep": 2, "pp": 3}}, "parallelism.pp"),
        (
            {"parallelism": {"tp": 2, "ep": 2, "pp": 2, "pp_layers": [3, 3]}},
            "parallelism.pp_layers",
        ),
        ({"parallelism": {"tp": 1, "ep": 1, "pp_layers": [8]}}, "parallelism.pp_layers"),
    ],
)
def test_bad_pipeline_fields_name_the_field(overrides, field):
    with pytest.raises(ScenarioError) as err:
        small_scenario(model={"preset": "mixtral-8x7b", "n_layers": 8}, **overrides)
    assert err.value.path == field


def test_dualpipe_needs_enough_micro_batches():
    with pytest.raises(ScenarioError, match="dualpipe"):
        _train("dualpipe", pp=4, m=4)


def _tp_bytes_per_layer(sc) -> dict[int, float]:
    """Bytes of the tensor-parallel collectives the step graph sends, per layer."""
    from moesim.plan.graph import build_graph

    out: dict[int, float] = {}
    for node in build_graph(build_plan(sc)).nodes:
        if node.phase == "tp_comm":
            out[node.layer] = out.get(node.layer, 0.0) + node.traffic.total_bytes
    return out


@pytest.mark.parametrize("phase", ["train", "prefill"])
def test_pipeline_stages_charge_the_shared_experts_tp_collectives(phase):
    """pp 2 x tp 2 sends per layer the tp collectives of pp 1 (attention and the shared
    experts' gather and reduce-scatter), forward and backward."""
    model = {"preset": "mixtral-8x7b", "n_layers": 4, "n_shared_experts": 1, "d_ff_shared": 4096}

    def scenario(pp: int):
        wl = {"phase": phase, "batch_size": 8, "seq_len": 256}
        if phase == "train":
            wl["train"] = {"micro_batches": 4, "schedule": "1f1b"}
        return small_scenario(
            model=model,
            cluster={"nodes": 1, "devices_per_node": 4 * pp, "device": "h100-sxm"},
            parallelism={"tp": 2, "ep": 2, "pp": pp},
            workload=wl,
        )

    one, two = _tp_bytes_per_layer(scenario(1)), _tp_bytes_per_layer(scenario(2))
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    plain = build_plan(scenario(1))
    passes = 2 * 4 if phase == "train" else 1  # forward and backward of 4 micro-batches
    for lp in plain.layers:
        shared = lp.tp_shared_in.total_bytes + lp.tp_shared_out.total_bytes
        assert one[lp.index] > passes * shared > 0
        assert two[lp.index] == pytest.approx(one[lp.index], rel=1e-12)
