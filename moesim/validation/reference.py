"""A real MoE layer in numpy, float32: router, gating, dispatch, SwiGLU experts, combine.

The gating is :mod:`moesim.routing.gating` (the simulator's own code). Dispatch is a permutation:
token-expert pairs sorted by expert, activations gathered into one contiguous block per
expert, each expert's SwiGLU ``down(silu(x Wg) * (x Wu))`` run as two GEMMs and one GEMM, and
outputs scattered back with their combine weights (``np.add.at``). The backward pass returns
gradients for the input and every weight (router included), checked against finite
differences in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.routing import gating

F32 = np.float32


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _silu_grad(x: np.ndarray) -> np.ndarray:
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def combine(rows: np.ndarray, token: np.ndarray, n_tokens: int) -> np.ndarray:
    """Sum expert outputs back into their tokens (the unpermute). Pairs are numbered within
    their token (0, 1, ...); each round adds one pair per token with a plain fancy-index add,
    so a token-choice layer takes ``top_k`` vectorised rounds."""
    y = np.zeros((n_tokens, rows.shape[1]), dtype=rows.dtype)
    if not len(token):
        return y
    order = np.argsort(token, kind="stable")
    sorted_tok = token[order]
    first = np.r_[True, sorted_tok[1:] != sorted_tok[:-1]]
    starts = np.flatnonzero(first)
    rank = np.arange(len(token)) - np.repeat(starts, np.diff(np.r_[starts, len(token)]))
    for j in range(int(rank.max()) + 1):
        sel = order[rank == j]
        y[token[sel]] += rows[sel]
    return y


@dataclass
class ReferenceRouting:
    """Routing of one forward pass: pairs (token, expert, weight) kept, and what was dropped."""

    token: np.ndarray
    expert: np.ndarray
    weight: np.ndarray
    dropped_per_expert: np.ndarray
    logits: np.ndarray
    chosen: np.ndarray | None = None  # [T, k] top-k choices before drops (token choice)

    def tokens_per_expert(self, n_experts: int) -> np.ndarray:
        return np.bincount(self.expert, minlength=n_experts)


@dataclass
class MoELayer:
    """Weights of one MoE layer; ``router`` reads the first ``router.shape[0]`` input dims."""

    router: np.ndarray  # [d_router, E]
    w_gate: np.ndarray  # [E, d, f]
    w_up: np.ndarray  # [E, d, f]
    w_down: np.ndarray  # [E, f, d]
    shared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (gate, up, down)
    top_k: int = 2
    router_bias: np.ndarray | None = None  # [E] added to the logits (a skewed router)
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_experts(self) -> int:
        return self.w_gate.shape[0]

    @property
    def d_model(self) -> int:
        return self.w_gate.shape[1]

    # -- routing --------------------------------------------------------------------------
    def route(
        self,
        x: np.ndarray,
        policy: str = "topk",
        capacity_factor: float | None = None,
        drop_priority: str = "position",
    ) -> ReferenceRouting:
        """Router logits, then the gating policy and capacity drops (moesim.routing.gating)."""
        logits = x[:, : self.router.shape[0]] @ self.router
        if self.router_bias is not None:
            logits = logits + self.router_bias
        t, n_exp, k = len(x), self.n_experts, self.top_k
        if policy == "expert_choice":
            cap = int(np.ceil((capacity_factor or 1.0) * t * k / n_exp))
            tok, w = gating.expert_choice_gate(logits, cap)
            expert = np.repeat(np.arange(n_exp), tok.shape[1])
            return ReferenceRouting(
                tok.ravel(), expert, w.ravel().astype(F32), np.zeros(n_exp, dtype=np.int64), logits
            )
        experts, weights = gating.topk_gate(logits, k)
        keep = np.ones_like(experts, dtype=bool)
        if capacity_factor is not None:
            cap = int(np.ceil(capacity_factor * t * k / n_exp))
            keep = gating.drop_over_capacity(experts, cap, n_exp, drop_priority)
        token = np.broadcast_to(np.arange(t)[:, None], experts.shape)
        dropped = np.bincount(experts[~keep], minlength=n_exp)
        return ReferenceRouting(
            token[keep], experts[keep], weights[keep].astype(F32), dropped, logits, experts
        )

    def reweight(self, x: np.ndarray, r: ReferenceRouting) -> ReferenceRouting:
        """The same token-expert pairs with combine weights recomputed from the current router
        (for finite-difference checks of the router gradient)."""
        logits = x[:, : self.router.shape[0]] @ self.router
        probs = gating.softmax(logits)
        chosen = np.take_along_axis(probs, r.chosen, axis=1)
        w = probs[r.token, r.expert] / chosen.sum(axis=1)[r.token]
        return ReferenceRouting(
            r.token, r.expert, w.astype(F32), r.dropped_per_expert, logits, r.chosen
        )

    # -- forward --------------------------------------------------------------------------
    def forward(
        self, x: np.ndarray, routing: ReferenceRouting | None = None, **gate_kw
    ) -> np.ndarray:
        """``y = sum_e w_te * SwiGLU_e(x_t)`` (+ shared experts), dispatch by permutation."""
        x = x.astype(F32, copy=False)
        r = routing or self.route(x, **gate_kw)
        order = np.argsort(r.expert, kind="stable")
        tok, exp_sorted, w = r.token[order], r.expert[order], r.weight[order]
        bounds = np.searchsorted(exp_sorted, np.arange(self.n_experts + 1))
        xs = x[tok]  # dispatch: gather into expert-contiguous blocks
        out = np.empty_like(xs)
        acts = []
        for e in range(self.n_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                acts.append(None)
                continue
            blk = xs[lo:hi]
            g, u = blk @ self.w_gate[e], blk @ self.w_up[e]
            h = silu(g) * u
            out[lo:hi] = h @ self.w_down[e]
            acts.append((g, u, h))
        y = combine(out * w[:, None], tok, len(x))
        if self.shared is not None:
            sg, su, sd = self.shared
            g_s, u_s = x @ sg, x @ su
            y += (silu(g_s) * u_s) @ sd
            self.cache["shared"] = (g_s, u_s)
        self.cache.update(
            x=x, r=r, order=order, tok=tok, w=w, bounds=bounds, xs=xs, out=out, acts=acts
        )
        return y

    def forward_dense_loop(self, x: np.ndarray, routing: ReferenceRouting) -> np.ndarray:
        """The same layer one token and one expert at a time (the obviously-correct version)."""
        y = np.zeros_like(x, dtype=F32)
        for t, e, w in zip(routing.token, routing.expert, routing.weight, strict=True):
            h = silu(x[t] @ self.w_gate[e]) * (x[t] @ self.w_up[e])
            y[t] += w * (h @ self.w_down[e])
        if self.shared is not None:
            sg, su, sd = self.shared
            y += (silu(x @ sg) * (x @ su)) @ sd
        return y

    # -- backward -------------------------------------------------------------------------
    def backward(self, dy: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of ``sum(dy * y)`` for the input and all weights (top-k gating: the combine
        weights are the renormalised softmax of the chosen experts' logits)."""
        c = self.cache
        x, r, order, tok, w, bounds = c["x"], c["r"], c["order"], c["tok"], c["w"], c["bounds"]
        xs, out, acts = c["xs"], c["out"], c["acts"]
        dy = dy.astype(F32)
        grads = {
            k: np.zeros_like(v)
            for k, v in (("w_gate", self.w_gate), ("w_up", self.w_up), ("w_down", self.w_down))
        }
        dx = np.zeros_like(x)
        dout = dy[tok] * w[:, None]
        dxs = np.zeros_like(xs)
        for e in range(self.n_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            g, u, h = acts[e]
            blk, d_o = xs[lo:hi], dout[lo:hi]
            grads["w_down"][e] = h.T @ d_o
            dh = d_o @ self.w_down[e].T
            dg, du = dh * u * _silu_grad(g), dh * silu(g)
            grads["w_gate"][e] = blk.T @ dg
            grads["w_up"][e] = blk.T @ du
            dxs[lo:hi] = dg @ self.w_gate[e].T + du @ self.w_up[e].T
        np.add.at(dx, tok, dxs)
        # combine weights -> router logits: w = softmax(l)_e / sum_{chosen} softmax(l)
        dw_sorted = (dy[tok] * out).sum(axis=1)
        dw = np.empty_like(dw_sorted)
        dw[order] = dw_sorted
        # combine weights -> router logits. w_e = p_e / sum_{j in chosen} p_j (renormalised
        # softmax over the token's k choices, dropped ones included), so
        # dL/dl_j = w_j (g_j - sum_e g_e w_e) for j chosen, with g_e = dL/dw_e (0 if dropped)
        t = len(x)
        full_w = np.take_along_axis(gating.softmax(r.logits), r.chosen, axis=1)
        full_w = full_w / full_w.sum(axis=1, keepdims=True)
        g = np.zeros((t, self.n_experts), dtype=F32)
        g[r.token, r.expert] = dw
        g_chosen = np.take_along_axis(g, r.chosen, axis=1)
        s_tok = (g_chosen * full_w).sum(axis=1, keepdims=True)
        dlogits = np.zeros((t, self.n_experts), dtype=F32)
        np.put_along_axis(dlogits, r.chosen, (full_w * (g_chosen - s_tok)).astype(F32), axis=1)
        d_r = self.router.shape[0]
        grads["router"] = x[:, :d_r].T @ dlogits
        dx[:, :d_r] += dlogits @ self.router.T
        if self.shared is not None:
            sg, su, sd = self.shared
            g_s, u_s = c["shared"]
            h_s = silu(g_s) * u_s
            grads["shared_down"] = h_s.T @ dy
            dh = dy @ sd.T
            dg, du = dh * u_s * _silu_grad(g_s), dh * silu(g_s)
            grads["shared_gate"], grads["shared_up"] = x.T @ dg, x.T @ du
            dx += dg @ sg.T + du @ su.T
        grads["x"] = dx
        return grads


def make_layer(
    d_model: int,
    d_ff: int,
    n_experts: int,
    top_k: int,
    seed: int = 0,
    d_ff_shared: int = 0,
    router: np.ndarray | None = None,
    d_router: int = 64,
) -> MoELayer:
    """Deterministic float32 weights from ``seed`` (scaled so activations stay O(1))."""
    rng = np.random.default_rng(seed)

    def mat(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=F32) / F32(np.sqrt(shape[-2]))

    if router is None:
        d = min(d_model, d_router)
        router = rng.standard_normal((d, n_experts), dtype=F32) / F32(np.sqrt(d))
    shared = None
    if d_ff_shared:
        shared = (mat(d_model, d_ff_shared), mat(d_model, d_ff_shared), mat(d_ff_shared, d_model))
    return MoELayer(
        router.astype(F32),
        mat(n_experts, d_model, d_ff),
        mat(n_experts, d_model, d_ff),
        mat(n_experts, d_ff, d_model),
        shared,
        top_k,
    )
