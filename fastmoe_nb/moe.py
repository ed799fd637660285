"""The MoE layer, one pipeline: route, then the routed experts, then the shared expert.

    moe_forward     = router logits -> router (routing/registry.py) -> routed experts [+ shared]
    routed_experts  = make_plan -> permute -> w1 GEMM -> activation -> w2 GEMM -> combine

routed_experts is what frameworks that keep their own router call (HF transformers' experts
interface, through fastmoe_nb.interop); moe_forward runs the same function after routing, so
both get the fused fast path: on the CPU, when nothing is kept for a backward, permute runs
inside the experts' row loads and xs is never written. Backward is built from the forward's
kernels, scattermoe style: combine_backward (a gather and row-wise dots), two grouped GEMM
backwards and the activation's, permute_backward (a combine with unit weights), the router's.

Validation happens once, here (fastmoe_nb.checks: check_layer); below, the backend of the
arrays (backends/cpu.py or backends/cuda.py) trusts what it is given.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from . import backends
from . import errors as chk
from .backend import CUDA, as_host, backend_of
from .checks import (check_accumulator, check_capacity, check_layer, check_plan,
                     check_routing)
from .ops.dispatch import make_plan
from .routing.registry import ROUTER_NAMES, get_router
from .types import MoEContext

ROUTERS = ROUTER_NAMES


# --------------------------------------------------------------------------- the pipeline

def run_experts(x, plan, weights, layer, keep):
    """The routed experts on a validated layer and a plan just made: x (T, d) contiguous on
    the host (or a device array), weights (T, k) -> (y (T, d), xs, h_pre, h_act, ys); xs,
    h_pre, h_act are None unless keep."""
    B = backends.get(layer.backend)
    if layer.backend != CUDA and not keep:   # permute fused into the experts' row loads
        tokens = np.ascontiguousarray(plan.rows // plan.top_k, dtype=np.int64)
        xs = None
        _, _, ys = B.experts_forward(x, layer.w1, layer.w2, plan.offsets, layer.code, layer.h,
                                     layer.trans_w, False, tokens)
        h_pre = h_act = None
    else:
        xs = B.permute(x, plan)
        h_pre, h_act, ys = B.experts_forward(xs, layer.w1, layer.w2, plan.offsets, layer.code,
                                             layer.h, layer.trans_w, keep)
    return B.combine(ys, plan, weights), xs, h_pre, h_act, ys


def run_experts_backward(dy, plan, weights, xs, h_pre, h_act, ys, layer, into=None):
    """The gradients of run_experts -> (dx (T, d), d_weights (T, k), dw1, dw2); into: None or
    (dw1, dw2) host accumulators (either None) the weight gradients are added into."""
    B = backends.get(layer.backend)
    d_ys, d_weights = B.combine_backward(dy, ys, plan, weights)
    d_xs, dw1, dw2 = B.experts_backward(d_ys, xs, h_pre, h_act, layer.w1, layer.w2,
                                        plan.offsets, layer.code, layer.trans_w, into)
    return B.permute_backward(d_xs, plan), d_weights, dw1, dw2


# --------------------------------------------------------------------------- routed experts

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
    layer: Any = None   # checks.Layer


def routed_experts(x, experts, weights, w1, w2, activation="swiglu", trans_w=False,
                   return_context=False):
    """x: (T, d), experts: (T, k) int expert ids, weights: (T, k), w1: (E, d, h|2h),
    w2: (E, h, d) [trans_w=True: (E, h|2h, d), (E, d, h), the PyTorch Linear layout used
    without a copy] -> y: (T, d), or (y, ctx) with return_context.

    The experts' MLPs on a routing chosen elsewhere; swiglu's w1 holds [gate | up]:
    y[t] = sum over j of weights[t, j] * MLP_{experts[t, j]}(x[t])."""
    x, layer = check_layer(x, w1, w2, activation, trans_w,
                           backend_arrays=dict(experts=experts, weights=weights))
    experts, weights = check_routing(experts, weights, x.shape[0], x.dtype, layer.backend)
    if layer.backend != CUDA:
        weights = np.ascontiguousarray(weights)
    plan = make_plan(experts, layer.E)
    y, xs, h_pre, h_act, ys = run_experts(x, plan, weights, layer, return_context)
    if not return_context:
        return y
    return y, ExpertsContext(plan, xs, h_pre, h_act, ys, weights, layer.w1, layer.w2,
                             layer.activation, layer.trans_w, layer)


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
    if be != CUDA:
        dy = np.ascontiguousarray(dy)
    check_plan(ctx.plan)
    return run_experts_backward(dy, ctx.plan, ctx.weights, ctx.xs, ctx.h_pre, ctx.h_act,
                                ctx.ys, ctx.layer)


# --------------------------------------------------------------------------- the layer

def _route(x, layer, router, check_finite):
    """The router's logits and choice -> (logits, Routing, Plan, router state). The layer is
    validated and a registry router's expert ids lie in 0..E-1, so the backend's logits and
    plan are called directly (the public ops would check them again)."""
    B = backends.get(layer.backend)
    logits = B.router_logits(x, layer.router_w, layer.router_b)
    r, plan, state = router.forward(x, logits, layer.k, layer.capacity, layer.router_options,
                                    check_finite)
    if plan is None:
        plan = B.make_plan(r.experts, layer.E, layer.capacity)
    return logits, r, plan, state


def moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0, capacity=None,
                trans_w=False, shared_w1=None, shared_w2=None, shared_gate_w=None,
                check_finite=True, return_context=False, router_b=None, **router_options):
    """The MoE layer. x: (T, d), router_w: (d, E), w1: (E, d, h) or (E, d, 2h) for swiglu
    ([gate | up]), w2: (E, h, d); with trans_w=True, w1: (E, h|2h, d) and w2: (E, d, h)
    (PyTorch Linear layout, no copy) -> y: (T, d), or (y, ctx) with return_context.

    router_b: (E,) or None, a router bias: logits = x @ router_w + router_b, for every router;
    it moves both the choice and the weights and gets a gradient (grads["router_b"]). The
    sigmoid router's `bias` is another thing: added to the sigmoid scores only to choose
    experts, never to the weights, and without a gradient (DeepSeek-V3's balancing bias).

    router="softmax_topk" (Mixtral, Qwen-MoE; OLMoE with renormalize=False) or "sigmoid_topk"
    (DeepSeek-V3: bias, n_group, topk_group, renormalize, scale). capacity: per-expert limit
    (None: dropless). shared_w1 (d, hs|2hs) / shared_w2 (hs, d): a shared expert added to every
    token, gated by sigmoid(x @ shared_gate_w) when shared_gate_w (d,) is given (Qwen2-MoE).
    router may also name another router of the registry (fastmoe_nb.routing.registry), its
    options as keywords: switch_top1 (k=1), gshard_top2 (k=2), expert_choice and dense_gating
    (k=E), noisy_topk (noise_w (d, E), train, seed); capacity is theirs.
    """
    spec = get_router(router)
    x, layer = check_layer(x, w1, w2, activation, trans_w, router_w, k, router_b, shared_w1,
                           shared_w2, shared_gate_w)
    k, options = spec.check(layer.E, layer.k, capacity, dict(
        renormalize=renormalize, bias=bias, n_group=n_group, topk_group=topk_group,
        scale=scale, **router_options), x.dtype)
    layer = layer.with_router(router, k, options, check_capacity(
        capacity, what="a non-negative integer"))
    logits, r, plan, state = _route(x, layer, spec, check_finite)
    y, xs, h_pre, h_act, ys = run_experts(x, plan, r.weights, layer, return_context)
    shared = None
    B = backends.get(layer.backend)
    if layer.has_shared:
        s, shared = B.shared_forward(x, layer.shared_w1, layer.shared_w2, layer.shared_gate_w,
                                     layer.code)
        y = B.add_into(y, s)
    if not return_context:
        return y
    return y, MoEContext(x=x, logits=logits, routing=r, plan=plan, xs=xs, h_pre=h_pre,
                         h_act=h_act, ys=ys, layer=layer, router_state=state, shared=shared)


def _check_context(dy, ctx):
    if not isinstance(ctx, MoEContext):
        raise TypeError(f"ctx: expected the MoEContext of moe_forward(..., return_context=True), "
                        f"got {type(ctx).__name__}")
    if ctx.h_pre is None:
        raise ValueError("ctx: expected a context holding h_pre, from moe_forward(..., "
                         "return_context=True)")
    be = backend_of(dy=dy, x=ctx.x)
    dy = chk.check_float("dy", dy if be == CUDA else as_host("dy", dy),
                         shape=tuple(ctx.x.shape), dtype=ctx.x.dtype)
    check_plan(ctx.plan)
    return be, dy if be == CUDA else np.ascontiguousarray(dy)


def grad_shapes(ctx):
    """{name: shape} of the gradients moe_backward returns for ctx."""
    ly = ctx.layer
    names = ("router_w", "router_b", "shared_w1", "shared_w2") + (() if ly.quantized
                                                                  else ("w1", "w2"))
    shapes = {n: tuple(getattr(ly, n).shape) for n in names if getattr(ly, n) is not None}
    if ly.shared_gate_w is not None:
        shapes["shared_gate_w"] = ly.shared_gate_shape or tuple(ly.shared_gate_w.shape)
    if (ctx.router_state or {}).get("noise_w") is not None:
        shapes["noise_w"] = tuple(ctx.router_state["noise_w"].shape)
    return shapes


def _check_grads(grads, ctx, be):
    """grads of moe_backward: None or {name: accumulator of that gradient's shape and the
    layer's dtype}."""
    if grads is None:
        return None
    if not isinstance(grads, dict):
        raise TypeError(f"grads: expected None or a dict of arrays, got {type(grads).__name__}")
    shapes = grad_shapes(ctx)
    for name, a in grads.items():
        if name not in shapes:
            raise ValueError(f"grads: {name!r} is not a gradient of this layer (expected keys "
                             f"among {sorted(shapes)})")
        check_accumulator(f"grads[{name!r}]", a, shapes[name], ctx.x.dtype, be)
    return grads


def moe_backward(dy, ctx, grads=None):
    """The gradients of moe_forward. dy: (T, d) gradient of y, ctx: the MoEContext of
    moe_forward(..., return_context=True) -> (dx (T, d), grads).

    grads (argument): None, or a dict of NumPy arrays keyed as the returned dict (any subset)
    into which this call adds its gradients in place — gradient accumulation, as nn.MoE does
    with its Parameter.grad — and which the returned dict then holds. The expert weights'
    gradients are then added per expert while in cache, without new (E, ...) arrays.

    grads holds "router_w" (d, E), "w1", "w2" (in the forward's layout, trans_w too; not
    for experts in a format, fastmoe_nb.formats, which are frozen) and, when
    the forward had them, "router_b" (E,) (the logits' gradient summed over tokens),
    "shared_w1", "shared_w2", "shared_gate_w" (in its given shape), "noise_w" (noisy_topk in
    training). The sigmoid router's bias only chooses experts and gets no gradient; an
    assignment dropped by capacity contributes nothing.
    """
    be, dy = _check_context(dy, ctx)
    acc = _check_grads(grads, ctx, be)
    ly, r, plan = ctx.layer, ctx.routing, ctx.plan
    B = backends.get(be)
    into = None if acc is None else (acc.get("w1"), acc.get("w2"))
    dx, d_weights, dw1, dw2 = run_experts_backward(dy, plan, r.weights, ctx.xs, ctx.h_pre,
                                                   ctx.h_act, ctx.ys, ly, into)
    spec = get_router(ly.router)
    d_logits, dx_router, router_grads = spec.backward(d_weights, ctx.x, ctx.logits, r, plan,
                                                      ly.k, ly.router_options,
                                                      ctx.router_state)
    dx = B.add_into(dx, B.matmul(d_logits, ly.router_w.T))
    out = {"router_w": B.matmul(ctx.x.T, d_logits), **router_grads}
    if not ly.quantized:                 # weights in a format are frozen: no gradient
        out.update(w1=dw1, w2=dw2)
    if ly.router_b is not None:
        out["router_b"] = B.column_sums(d_logits)
    if dx_router is not None:
        dx = B.add_into(dx, dx_router)
    if ly.has_shared:
        dxs, out["shared_w1"], out["shared_w2"], dgate = B.shared_backward(
            dy, ctx.x, ly.shared_w1, ly.shared_w2, ly.shared_gate_w, ctx.shared, ly.code)
        dx = B.add_into(dx, dxs)
        if dgate is not None:
            out["shared_gate_w"] = dgate.reshape(ly.shared_gate_shape or dgate.shape)
    for name, a in (acc or {}).items():
        if out[name] is not a:                   # w1 / w2 were added into already
            a += out[name]
            out[name] = a
    return dx, out


__all__ = ["ExpertsContext", "ROUTERS", "moe_backward", "moe_forward", "routed_experts",
           "routed_experts_backward", "run_experts", "run_experts_backward"]
