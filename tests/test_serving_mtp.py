"""Multi-token prediction in serving: decode steps verify k + 1 tokens and advance each
request by the accepted tokens (closed forms at acceptance 1 and 0)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim import simulate

from .test_serving import OUTPUT, PROMPT, one_step_s, serve_scenario

LONE = {"rate_per_s": 0.01, "n_requests": 3}  # requests that never overlap


def mtp_scenario(draft_tokens: int, acceptance: float, serve=None):
    mtp = {"draft_tokens": draft_tokens, "acceptance": acceptance}
    return serve_scenario({**LONE, **(serve or {})}, **{"workload.mtp": mtp})


def decode_steps(result) -> np.ndarray:
    it = result.iterations
    return it[it["kind"] == "decode"]


@pytest.mark.parametrize("k", [1, 3])
def test_full_acceptance_finishes_in_ceil_of_the_closed_form(k):
    res = simulate(mtp_scenario(k, 1.0))
    dec, req = decode_steps(res), res.requests
    # the prefill yields the first token; each decode step k + 1 (the last what is left)
    steps = math.ceil((OUTPUT - 1) / (k + 1))
    assert len(dec) == steps * len(req)
    assert dec["decode_tokens"].sum() == (req["output_tokens"] - 1).sum()
    assert dec["decode_tokens"].max() == k + 1 and (dec["decode_sequences"] == 1).all()
    # TPOT: the request's decode steps over its output tokens after the first
    first = dec[dec["start_s"] < req["done_s"][0]]
    tpot = (first["end_s"] - first["start_s"]).sum() / (OUTPUT - 1)
    assert req["tpot_s"][0] == pytest.approx(tpot, rel=1e-9)
    # a step's cost is the verify shape: the decode step with k + 1 new tokens and k drafts
    mid = PROMPT + OUTPUT // 2
    verify = one_step_s(mtp_scenario(k, 1.0), "decode", 1, mid)
    assert float((first["end_s"] - first["start_s"]).mean()) == pytest.approx(verify, rel=0.02)
    assert res.summary["mtp"]["tokens_per_step"] == k + 1


def test_zero_acceptance_gives_plain_tokens_at_the_verify_cost():
    plain = simulate(serve_scenario(LONE))
    res = simulate(mtp_scenario(2, 0.0))
    dec, ref = decode_steps(res), decode_steps(plain)
    assert len(dec) == len(ref) == (OUTPUT - 1) * len(res.requests)
    assert (dec["decode_tokens"] == 1).all()
    assert res.summary["mtp"]["accepted_tokens_per_step"] == 1.0
    # same tokens, each step paying for 3 verified tokens and 2 draft passes
    t_mtp, t_plain = (dec["end_s"] - dec["start_s"]).to_numpy(), (ref["end_s"] - ref["start_s"])
    assert (t_mtp > t_plain.to_numpy()).all()
    verify = one_step_s(mtp_scenario(2, 0.0), "decode", 1, PROMPT + OUTPUT // 2)
    assert res.requests["tpot_s"].to_numpy() == pytest.approx(verify, rel=0.02)


def test_partial_acceptance_conserves_tokens_and_averages_the_expected_rate():
    a, k, out = 0.85, 1, 401
    serve = {"rate_per_s": 200.0, "n_requests": 60, "output_tokens": {"mean": out}}
    res = simulate(mtp_scenario(k, a, serve))
    dec, req = decode_steps(res), res.requests
    assert dec["decode_tokens"].sum() == (req["output_tokens"] - 1).sum()
    tau = 1 + a
    # after n steps a request holds 1 + floor(n tau) tokens: ceil((out - 1) / tau) steps
    per_request = math.ceil((out - 1) / tau - 1e-9)
    assert dec["decode_sequences"].sum() == per_request * len(req)
    assert res.summary["mtp"]["accepted_tokens_per_step"] == pytest.approx(
        (out - 1) / per_request, rel=1e-12
    )
