"""The routed experts alone, the routing given: what a framework that keeps its own router
(HF transformers' experts interface) hands to fastmoe_nb.

    y[t] = sum over j of weights[t, j] * MLP_{experts[t, j]}(x[t])

Forward and backward are the moe_forward / moe_backward pipeline without the router:
make_plan, permute, grouped_gemm, activate, grouped_gemm, combine and their backwards. Arrays
are NumPy (CPU) or CUDA device arrays, as everywhere in fastmoe_nb; the PyTorch Function and
the HF glue wrap these two functions.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of
from ..ops.activations import activation_code, hidden_width
from ..ops.dispatch import (combine_backward, combine_planned, make_plan, permute_backward,
                            permute_planned)
from ..ops.moe import experts_backward, experts_forward


class ExpertsContext(NamedTuple):
    """What routed_experts(..., return_context=True) keeps for routed_experts_backward."""

    plan: Any        # Plan of the (T, k) experts
    xs: Any          # (N, d)       permuted tokens
    h_pre: Any       # (N, h | 2h)  first GEMM
    h_act: Any       # (N, h)       after the activation
    ys: Any          # (N, d)       expert outputs before the weights
    weights: Any     # (T, k)
    w1: Any
    w2: Any
    activation: str
    trans_w: bool


def check_experts_args(x, experts, weights, w1, w2, activation, trans_w):
    """Validate routed_experts' operands before any work; returns them on their backend's side
    (NumPy views for host arrays) with E."""
    be = backend_of(x=x, experts=experts, weights=weights, w1=w1, w2=w2)
    host = (lambda n, a: a) if be == CUDA else as_host
    x = chk.check_float("x", host("x", x), ndim=2)
    T, d = x.shape
    experts = chk.check_int_array("experts", host("experts", experts), shape=(T, None))
    k = experts.shape[1]
    weights = chk.check_float("weights", host("weights", weights), shape=(T, k), dtype=x.dtype)
    w1, w2 = host("w1", w1), host("w2", w2)
    E = check_expert_weights(w1, w2, d, x.dtype, activation, trans_w)
    return x, experts, weights, w1, w2, E


def check_expert_weights(w1, w2, d, dtype, activation, trans_w):
    """w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h, d), (E, d, h)] of the given dtype,
    E >= 1; returns E. Only shapes and dtypes are read (JAX tracers qualify)."""
    activation_code(activation)
    chk.check_float("w1", w1, ndim=3, dtype=dtype)
    E = int(w1.shape[0])
    H1 = int(w1.shape[1] if trans_w else w1.shape[2])
    chk.check_array("w1", w1, shape=(E, H1, d) if trans_w else (E, d, H1))
    h = hidden_width(H1, activation)
    chk.check_float("w2", w2, shape=(E, d, h) if trans_w else (E, h, d), dtype=dtype)
    if E < 1:
        raise ValueError(f"w1: expected at least one expert, got shape {tuple(w1.shape)}")
    return E


def routed_experts(x, experts, weights, w1, w2, activation="swiglu", trans_w=False,
                   return_context=False):
    """x: (T, d), experts: (T, k) int expert ids, weights: (T, k), w1: (E, d, h|2h),
    w2: (E, h, d) [trans_w=True: (E, h|2h, d), (E, d, h), the PyTorch Linear layout used
    without a copy] -> y: (T, d), or (y, ctx) with return_context.

    The experts' MLPs on a routing chosen elsewhere; swiglu's w1 holds [gate | up]."""
    trans_w = bool(trans_w)
    x, experts, weights, w1, w2, E = check_experts_args(x, experts, weights, w1, w2, activation,
                                                        trans_w)
    plan = make_plan(experts, E)
    xs = permute_planned(x, plan)
    h_pre, h_act, ys = experts_forward(xs, w1, w2, plan.offsets, activation, trans_w,
                                       keep=return_context)
    y = combine_planned(ys, plan, weights)
    if not return_context:
        return y
    return y, ExpertsContext(plan, xs, h_pre, h_act, ys, weights, w1, w2, activation, trans_w)


def routed_experts_backward(dy, ctx):
    """dy: (T, d) gradient of routed_experts' y, ctx: its ExpertsContext
    -> (dx (T, d), d_weights (T, k), dw1, dw2), dw1 / dw2 in the forward's layout."""
    if not isinstance(ctx, ExpertsContext):
        raise TypeError(f"ctx: expected the ExpertsContext of routed_experts(..., "
                        f"return_context=True), got {type(ctx).__name__}")
    T, d = ctx.plan.num_tokens, ctx.xs.shape[1]
    be = backend_of(dy=dy, ys=ctx.ys)
    dy = chk.check_float("dy", dy if be == CUDA else as_host("dy", dy), shape=(T, d),
                         dtype=ctx.ys.dtype)
    offsets = ctx.plan.offsets
    d_ys, d_weights = combine_backward(dy, ctx.ys, ctx.plan, ctx.weights)
    d_xs, dw1, dw2 = experts_backward(d_ys, ctx.xs, ctx.h_pre, ctx.h_act, ctx.w1, ctx.w2,
                                      offsets, ctx.activation, ctx.trans_w)
    return permute_backward(d_xs, ctx.plan), d_weights, dw1, dw2


__all__ = ["ExpertsContext", "check_expert_weights", "check_experts_args", "routed_experts",
           "routed_experts_backward"]
