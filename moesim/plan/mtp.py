"""Multi-token prediction / speculative decoding in a decode step (``workload.mtp``).

A step drafts ``k`` tokens per sequence with the MTP module, then the full model verifies
the ``k + 1`` tokens (the one it would decode plus the drafts) in one pass. DeepSeek-V3's
MTP module (arXiv:2412.19437 Sec. 2.2) is one transformer block (its last layer's kind,
MoE) and a ``2d x d`` projection, sharing the embedding and the LM head with the main
model; drafting ``k`` tokens runs it ``k`` times over one token per sequence.

Per-token acceptance ``a``: draft ``i`` counts only if drafts ``1..i`` were all accepted,
so a step yields ``sum_{i=0..k} a^i`` tokens per sequence on average (the verified token
always counts; Leviathan et al. 2023, Eq. 1, with ``gamma = k``). Tokens per second and TPOT
count these accepted tokens.
"""

from __future__ import annotations

import numpy as np

from moesim.config.scenario import Scenario
from moesim.plan.types import WorkloadPlan


def mtp_scenario(sc: Scenario) -> Scenario:
    """The draft pass: the same decode step with one new token per sequence."""
    return sc.model_copy(update={"workload": sc.workload.model_copy(update={"mtp": None})})


def add_draft(plan: WorkloadPlan, draft: WorkloadPlan) -> None:
    """Attach the MTP module's layer and LM head (run ``k`` times before the verify pass)
    and its weights: the block and the projection (embedding and head are shared)."""
    sc = plan.scenario
    m, tp = sc.model, sc.parallelism.tp
    wb = sc.workload.dtypes.bytes_of("weights")
    plan.draft = draft.layers
    plan.draft_lm_head_s = draft.lm_head_s
    shared = m.vocab_size * m.d_model / tp * wb  # the output head the stage already holds
    projection = 2 * m.d_model * m.d_model / tp * wb
    plan.memory_bytes["mtp_weights"] = np.maximum(
        draft.memory_bytes["weights"] - shared + projection, 0.0
    )
