"""The whole MoE layer: route, plan, permute, expert MLPs (two grouped GEMMs and an
activation), combine, plus optional shared experts."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..types import MoEContext
from .activations import activate, activation_code, hidden_width
from .dispatch import combine, make_plan, permute
from .gemm import grouped_gemm
from .routing import check_sigmoid_options, sigmoid_topk, softmax_topk

ROUTERS = ("softmax_topk", "sigmoid_topk")


def _matmul(a, b):
    """Dense a @ b on the arrays' backend."""
    if backend_of(a=a) == CUDA:
        return cuda_module().matmul(a, b)
    return a @ b


def _check_layer(x, router_w, w1, w2, k, activation, trans_w, shared_w1, shared_w2,
                 shared_gate_w):
    """Validate the layer's arrays; returns (backend, the arrays on that side, E, h)."""
    be = backend_of(x=x, router_w=router_w, w1=w1, w2=w2, shared_w1=shared_w1,
                    shared_w2=shared_w2, shared_gate_w=shared_gate_w)
    host = (lambda n, a: a) if be == CUDA else as_host
    x = chk.check_float("x", host("x", x), ndim=2)
    T, d = x.shape
    dt = x.dtype
    router_w = chk.check_float("router_w", host("router_w", router_w), shape=(d, None), dtype=dt)
    E = router_w.shape[1]
    if E < 1:
        raise ValueError("router_w: expected at least one expert column, got shape "
                         f"{tuple(router_w.shape)}")
    k = chk.check_int("k", k, 1, E, what=f"1..E = 1..{E}")
    activation_code(activation)
    w1 = chk.check_float("w1", host("w1", w1), ndim=3, dtype=dt)
    H1 = w1.shape[1] if trans_w else w1.shape[2]
    chk.check_array("w1", w1, shape=(E, H1, d) if trans_w else (E, d, H1))
    h = hidden_width(H1, activation)
    w2 = chk.check_float("w2", host("w2", w2), shape=(E, d, h) if trans_w else (E, h, d),
                         dtype=dt)
    if (shared_w1 is None) != (shared_w2 is None):
        raise ValueError("shared_w1, shared_w2: expected both (a shared expert) or neither")
    if shared_gate_w is not None and shared_w1 is None:
        raise ValueError("shared_gate_w: given without shared_w1 / shared_w2")
    if shared_w1 is not None:
        shared_w1 = chk.check_float("shared_w1", host("shared_w1", shared_w1), shape=(d, None),
                                    dtype=dt)
        hs = hidden_width(shared_w1.shape[1], activation, "shared_w1")
        shared_w2 = chk.check_float("shared_w2", host("shared_w2", shared_w2), shape=(hs, d),
                                    dtype=dt)
    if shared_gate_w is not None:
        shared_gate_w = chk.check_float("shared_gate_w", host("shared_gate_w", shared_gate_w),
                                        dtype=dt)
        if tuple(shared_gate_w.shape) not in ((d,), (d, 1)):
            raise ValueError(f"shared_gate_w: expected shape ({d},) or ({d}, 1), got "
                             f"{tuple(shared_gate_w.shape)}")
        shared_gate_w = shared_gate_w.reshape(d, 1)
    return be, x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w, E, h


def experts_forward(xs, w1, w2, offsets, activation, trans_w=False, keep=False):
    """The expert MLPs on tokens in expert order.

    xs: (N, d), w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h, d), (E, d, h)]
    -> (h_pre (N, h|2h) or None, h_act (N, h), ys (N, d)); h_pre is kept only when keep.
    """
    h_pre = grouped_gemm(xs, w1, offsets, trans_w)
    h_act = activate(h_pre, activation)
    ys = grouped_gemm(h_act, w2, offsets, trans_w)
    return (h_pre if keep else None), h_act, ys


def shared_forward(x, w1, w2, gate_w, activation):
    """The shared (always-on) expert: x (T, d), w1 (d, hs|2hs), w2 (hs, d), gate_w (d, 1) or
    None -> (s (T, d), cache). Qwen2-MoE gates it with sigmoid(x @ gate_w); DeepSeek-V3 does
    not. Several shared experts are one with their hidden columns concatenated."""
    h_pre = _matmul(x, w1)
    h_act = activate(h_pre, activation)
    s = _matmul(h_act, w2)
    gate = None
    if gate_w is not None:
        z = _matmul(x, gate_w)
        gate = 1.0 / (1.0 + np.exp(-z)) if backend_of(z=z) != CUDA else cuda_module().sigmoid(z)
        s = s * gate
    return s, {"h_pre": h_pre, "h_act": h_act, "gate": gate}


def moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0, capacity=None,
                trans_w=False, shared_w1=None, shared_w2=None, shared_gate_w=None,
                check_finite=True, return_context=False):
    """The MoE layer. x: (T, d), router_w: (d, E), w1: (E, d, h) or (E, d, 2h) for swiglu
    ([gate | up]), w2: (E, h, d); with trans_w=True, w1: (E, h|2h, d) and w2: (E, d, h)
    (PyTorch Linear layout, no copy) -> y: (T, d), or (y, ctx) with return_context.

    router="softmax_topk" (Mixtral, Qwen-MoE; OLMoE with renormalize=False) or "sigmoid_topk"
    (DeepSeek-V3: bias, n_group, topk_group, renormalize, scale). capacity: per-expert limit
    (None: dropless). shared_w1 (d, hs|2hs) / shared_w2 (hs, d): a shared expert added to every
    token, gated by sigmoid(x @ shared_gate_w) when shared_gate_w (d,) is given (Qwen2-MoE).
    """
    trans_w = bool(trans_w)
    chk.check_choice("router", router, ROUTERS)
    be, x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w, E, h = _check_layer(
        x, router_w, w1, w2, k, activation, trans_w, shared_w1, shared_w2, shared_gate_w)
    if router == "sigmoid_topk":
        k, n_group, topk_group, scale = check_sigmoid_options(E, k, bias, n_group, topk_group,
                                                              scale, x.dtype)
    elif bias is not None or n_group != 1 or topk_group != 1 or scale != 1.0:
        raise ValueError("bias, n_group, topk_group, scale: only for router='sigmoid_topk'")
    if capacity is not None:
        capacity = chk.check_int("capacity", capacity, 0, None, what="a non-negative integer")
    if be != CUDA:
        x = np.ascontiguousarray(x)

    logits = _matmul(x, router_w)
    if router == "softmax_topk":
        r = softmax_topk(logits, k, renormalize, check_finite=check_finite)
    else:
        r = sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale,
                         check_finite=check_finite)
    plan = make_plan(r.experts, E, capacity)
    xs = permute(x, plan)
    h_pre, h_act, ys = experts_forward(xs, w1, w2, plan.offsets, activation, trans_w,
                                       keep=return_context)
    y = combine(ys, plan, r.weights)
    shared = None
    if shared_w1 is not None:
        s, shared = shared_forward(x, shared_w1, shared_w2, shared_gate_w, activation)
        y += s
    if not return_context:
        return y
    params = dict(router_w=router_w, w1=w1, w2=w2, k=k, activation=activation, router=router,
                  renormalize=bool(renormalize), bias=bias, n_group=n_group,
                  topk_group=topk_group, scale=scale, capacity=capacity, trans_w=trans_w,
                  shared_w1=shared_w1, shared_w2=shared_w2, shared_gate_w=shared_gate_w)
    return y, MoEContext(x=x, logits=logits, routing=r, plan=plan, xs=xs, h_pre=h_pre,
                         h_act=h_act, ys=ys, params=params, shared=shared)
