"""The device layout: ONE place that says which replica, tensor rank, expert rank and shard
each device is, where it sits, and how a pass's tokens are split over devices.

Device ``g`` is attention data-parallel replica ``g // tp`` and tensor rank ``g % tp``; in
the MoE block it owns a ``1/tp`` slice of its replica's tokens (sequence parallel) and
dispatches them within its expert group ``g // (ep * etp)``, where it is EP rank
``(g % (ep * etp)) // etp`` and expert shard ``g % etp``. Sequences are split over replicas
and tokens over tensor ranks as evenly as integers allow, the remainder to the first ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config.scenario import Scenario
from moesim.cost.ops import Bytes, workload_bytes


def split_evenly(total: np.ndarray | int, parts: int) -> np.ndarray:
    """Split integer(s) into ``parts`` near-equal integers (remainder to the first ones)."""
    total = np.asarray(total, dtype=np.int64)
    base, rem = np.divmod(total[..., None], parts)
    return base + (np.arange(parts) < rem)


def dtype_bytes(sc: Scenario) -> Bytes:
    """Bytes per element of weights, expert weights, activations, KV cache and the two
    all-to-all directions, and the attention core's compute dtype."""
    return workload_bytes(sc.workload.dtypes)


@dataclass(frozen=True)
class Layout:
    """Per-device indices (arrays of length ``n_devices``) and one pass's token split."""

    n_devices: int
    tp: int
    ep: int
    etp: int
    dp: int  # attention replicas: devices / tp
    edp: int  # expert groups: devices / (ep x etp)
    replica: np.ndarray
    tp_rank: np.ndarray
    group: np.ndarray  # expert group
    ep_rank: np.ndarray
    etp_shard: np.ndarray
    node: np.ndarray
    seqs_dp: np.ndarray  # sequences per replica, [dp]
    tokens_dp: np.ndarray  # new tokens per replica, [dp]
    new_per_seq: int  # new tokens per sequence (prefill / train: the whole sequence)
    context: int  # cached tokens before them (decode: seq_len)

    @property
    def seqs_dev(self) -> np.ndarray:
        """Sequences of each device's replica (attention is tensor parallel over them)."""
        return self.seqs_dp[self.replica]

    @property
    def tokens_att(self) -> np.ndarray:
        """New tokens of each device's replica: attention, dense FFN and shared experts."""
        return self.tokens_dp[self.replica]

    @property
    def tokens_dev(self) -> np.ndarray:
        """MoE-block tokens each device owns (its tensor rank's slice of its replica's)."""
        return split_evenly(self.tokens_dp, self.tp).ravel()


def layout(sc: Scenario) -> Layout:
    """The layout of ``sc`` for one pass (a micro-batch in training)."""
    par, wl = sc.parallelism, sc.workload
    n, tp, ep, etp = sc.cluster.n_devices, par.tp, par.ep, par.etp
    g = np.arange(n)
    dp = n // tp
    whole = wl.phase in ("prefill", "train")  # whole sequences, no KV cache before them
    # decode: one token per sequence, or the k + 1 a multi-token-prediction step verifies
    new_per_seq = wl.seq_len if whole else 1 + (wl.mtp.draft_tokens if wl.mtp else 0)
    seqs_dp = split_evenly(wl.pass_batch_size, dp)
    return Layout(
        n_devices=n,
        tp=tp,
        ep=ep,
        etp=etp,
        dp=dp,
        edp=n // (ep * etp),
        replica=g // tp,
        tp_rank=g % tp,
        group=g // (ep * etp),
        ep_rank=(g % (ep * etp)) // etp,
        etp_shard=g % etp,
        node=g // sc.cluster.devices_per_node,
        seqs_dp=seqs_dp,
        tokens_dp=seqs_dp * new_per_seq,
        new_per_seq=new_per_seq,
        context=0 if whole else wl.seq_len,
    )
