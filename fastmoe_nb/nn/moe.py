"""The MoE layer as a Module: router + routed experts + optional shared expert, over
fm.moe_forward / fm.moe_backward, with router jitter, balancing and z-losses, and routing
statistics recorded at every forward."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..checks import activation_code
from ..moe import ROUTERS, moe_backward, moe_forward
from ..routing.losses import (NORMALIZATIONS, load_balancing_loss,
                              load_balancing_loss_backward, update_bias, z_loss, z_loss_backward)
from ..routing.stats import RoutingMonitor, routing_stats
from .layers import as_rng, check_input, normal
from .module import Module, Parameter

# names of moe_forward's weight arguments, which are also moe_backward's gradient keys
WEIGHTS = ("router_w", "router_b", "w1", "w2", "shared_w1", "shared_w2", "shared_gate_w")


def router_probs(logits, router):
    """(T, E) router logits -> (T, E) probabilities: the softmax, or for the sigmoid router
    its scores normalized to sum to 1 (what the entropy statistic reads)."""
    z = logits.astype(np.float64)
    if router == "sigmoid_topk":
        p = 1.0 / (1.0 + np.exp(-z))
    else:
        p = np.exp(z - z.max(axis=1, keepdims=True)) if z.size else z
    return p / p.sum(axis=1, keepdims=True)


class MoE(Module):
    """A Mixture-of-Experts layer. x: (T, d) -> y: (T, d).

    Parameters: router_w (d, E); with router_bias=True a router bias router_b (E,), zeros at
    first, trained (logits = x @ router_w + router_b; surgery.add_experts uses it to keep the
    old routing exact); w1 (E, d, h) or (E, d, 2h) for swiglu ([gate | up]);
    w2 (E, h, d); with shared_h > 0 a shared expert shared_w1 (d, shared_h | 2 shared_h),
    shared_w2 (shared_h, d), and with shared_gate its sigmoid gate shared_gate_w (d, 1); with
    router="sigmoid_topk" a routing bias (E,) that chooses experts but gets no gradient
    (frozen; DeepSeek-V3's auxiliary-loss-free balancing updates it, see update_bias).

    router: "softmax_topk", "sigmoid_topk" or any other name fm.moe_forward accepts
    (switch_top1, gshard_top2, expert_choice, dense_gating), with its router_options passed
    through. (noisy_topk is not offered: its noise weights would need a Parameter of their
    own; use jitter for router noise.)

    Training extras:
    - jitter: in train mode the layer input is multiplied by U(1 - jitter, 1 + jitter) noise,
      as HF transformers' Mixtral block does (eval mode: no noise);
    - aux_loss_coef / z_loss_coef: the balancing loss (fastmoe_nb.routing.load_balancing_loss
      with `balance` as its normalization) and the router z-loss are added, times these
      coefficients, to the training loss: backward adds their gradients to router_w and x.
      Their values at the last forward are in `aux_loss` and `z_loss`.
    - stats: the RoutingStats of the last forward; monitor: a RoutingMonitor fed in train mode
      (collapse detection over `window` steps).
    """

    def __init__(self, d, h, num_experts, k, activation="swiglu", router="softmax_topk",
                 renormalize=True, capacity=None, shared_h=0, shared_gate=False, jitter=0.0,
                 aux_loss_coef=0.0, z_loss_coef=0.0, balance="mixtral", n_group=1,
                 topk_group=1, scale=1.0, window=50, dtype=np.float32, rng=None,
                 router_bias=False, **router_options):
        d = chk.check_int("d", d, 1)
        h = chk.check_int("h", h, 1)
        E = chk.check_int("num_experts", num_experts, 1)
        self.k = chk.check_int("k", k, 1, E, what=f"1..num_experts = 1..{E}")
        activation_code(activation)
        chk.check_choice("router", router, tuple(r for r in ROUTERS if r != "noisy_topk"))
        shared_h = chk.check_int("shared_h", shared_h, 0)
        self.jitter = chk.check_real("jitter", jitter)
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter: expected a number in [0, 1), got {jitter}")
        self.aux_loss_coef = chk.check_real("aux_loss_coef", aux_loss_coef)
        self.z_loss_coef = chk.check_real("z_loss_coef", z_loss_coef)
        for name, v in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
            if v < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v}")
        self.balance = chk.check_choice("balance", balance, NORMALIZATIONS)
        self.activation, self.router, self.renormalize = activation, router, bool(renormalize)
        self.capacity = None if capacity is None else chk.check_int(
            "capacity", capacity, 0, None, what="a non-negative integer or None")
        self.options = dict(router_options)
        if router == "sigmoid_topk":
            self.options.update(n_group=n_group, topk_group=topk_group, scale=scale)
        self.rng = as_rng(rng)
        H1 = 2 * h if activation == "swiglu" else h
        self.router_w = Parameter(normal(self.rng, (d, E), d ** -0.5, dtype, "router_w"))
        if router_bias:
            self.router_b = Parameter(np.zeros(E, dtype), decay=False)
        self.w1 = Parameter(normal(self.rng, (E, d, H1), d ** -0.5, dtype, "w1"))
        self.w2 = Parameter(normal(self.rng, (E, h, d), h ** -0.5, dtype, "w2"))
        if shared_h:
            S1 = 2 * shared_h if activation == "swiglu" else shared_h
            self.shared_w1 = Parameter(normal(self.rng, (d, S1), d ** -0.5, dtype, "shared_w1"))
            self.shared_w2 = Parameter(normal(self.rng, (shared_h, d), shared_h ** -0.5, dtype,
                                              "shared_w2"))
            if shared_gate:
                self.shared_gate_w = Parameter(normal(self.rng, (d, 1), d ** -0.5, dtype,
                                                      "shared_gate_w"))
        if router == "sigmoid_topk":
            self.bias = Parameter(np.zeros(E, dtype), requires_grad=False, decay=False)
        self.monitor = RoutingMonitor(E, window=window)
        self.stats = None
        self.aux_loss = self.z_loss = 0.0

    @property
    def num_experts(self):
        return self.router_w.shape[1]

    def _weights(self):
        return {n: getattr(self, n).value for n in WEIGHTS if hasattr(self, n)}

    def update_bias(self, gamma=1e-3):
        """DeepSeek-V3's auxiliary-loss-free balancing, after an optimizer step (sigmoid_topk
        router only): bias += gamma * sign(mean load - load), the load of the last forward."""
        if self.router != "sigmoid_topk":
            raise ValueError("update_bias: only for router='sigmoid_topk' (it has the bias)")
        if self.stats is None:
            raise ValueError("update_bias: call forward first (the load comes from it)")
        self.bias.value[...] = update_bias(self.bias.value, self.stats.tokens_per_expert, gamma)

    def forward(self, x):
        # x: (T, d) -> y: (T, d); keeps the jitter noise and moe_forward's context
        x = check_input("x", x, self.router_w.shape[0], self.router_w.dtype)
        self.noise = None
        if self.training and self.jitter:
            self.noise = self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter,
                                          x.shape).astype(x.dtype)
            x = x * self.noise
        bias = self.bias.value if self.router == "sigmoid_topk" else None
        y, self.ctx = moe_forward(x, k=self.k, activation=self.activation, router=self.router,
                                  renormalize=self.renormalize, capacity=self.capacity,
                                  bias=bias, return_context=True, **self.options,
                                  **self._weights())
        r, logits = self.ctx.routing, self.ctx.logits
        self.stats = routing_stats(r.experts, self.num_experts,
                                   router_probs(logits, self.router), self.ctx.plan.dropped)
        if self.training:
            self.monitor.update(self.stats)
        if self.aux_loss_coef or self.z_loss_coef:
            self.aux_loss = load_balancing_loss(logits, r.experts, self.balance,
                                                check_finite=False)
            self.z_loss = z_loss(logits, check_finite=False)
        return y

    def backward(self, dy):
        # dy: (T, d) -> dx: (T, d); accumulates the gradient of every trainable weight
        ctx = self._saved("ctx")
        into = {n: getattr(self, n).grad for n in ("w1", "w2")   # added into per expert, in
                if getattr(self, n).requires_grad}               # cache (no (E, ...) arrays)
        dx, grads = moe_backward(dy, ctx, grads=into)
        if self.aux_loss_coef or self.z_loss_coef:
            dlogits = np.zeros_like(ctx.logits)
            if self.aux_loss_coef:
                dlogits += load_balancing_loss_backward(self.aux_loss_coef, ctx.logits,
                                                        ctx.routing.experts, self.balance)
            if self.z_loss_coef:
                dlogits += z_loss_backward(self.z_loss_coef, ctx.logits)
            grads["router_w"] = grads["router_w"] + ctx.x.T @ dlogits
            if "router_b" in grads:
                grads["router_b"] = grads["router_b"] + dlogits.sum(axis=0)
            dx = dx + dlogits @ self.router_w.value.T
        for n in WEIGHTS:
            if hasattr(self, n) and n not in into:
                getattr(self, n).accumulate(grads[n])
        return dx * self.noise if self.noise is not None else dx
