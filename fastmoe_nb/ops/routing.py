"""Routing ops: softmax, topk, softmax_topk (Mixtral, Qwen-MoE, OLMoE), sigmoid_topk
(DeepSeek-V3), the router's logits, and their backwards. All return Routing(weights (T, k),
experts (T, k) int32) but softmax / topk / router_logits."""
from __future__ import annotations

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import CUDA, as_host, backend_of
from ..checks import (check_experts, check_grad, check_k, check_scores,
                      check_sigmoid_options)


def softmax(x, check_finite=True):
    """x: (T, E) float -> (T, E), each row exp(x - max) / sum (sums in float64)."""
    x, be = check_scores("x", x, check_finite)
    return backends.get(be).softmax(x, check_finite)


def topk(x, k, check_finite=True):
    """x: (T, E) -> (values (T, k), indices (T, k) int32): descending; equal values, lower
    index first."""
    x, be = check_scores("x", x, check_finite)
    return backends.get(be).topk(x, check_k(k, x.shape[1]), check_finite)


def softmax_topk(logits, k, renormalize=True, check_finite=True):
    """logits: (T, E) -> Routing(weights (T, k), experts (T, k) int32).

    Softmax over all E experts, the k best kept (chosen by logit: the probabilities' order
    without their rounding ties), optionally renormalized over the k.
    Mixtral and Qwen-MoE use renormalize=True, OLMoE renormalize=False.
    """
    logits, be = check_scores("logits", logits, check_finite)
    k = check_k(k, logits.shape[1])
    return backends.get(be).softmax_topk(logits, k, bool(renormalize), check_finite)


def router_logits(x, router_w, router_b=None):
    """The router's logits of the layer. x: (T, d), router_w: (d, E), router_b: (E,) or None
    (validated by the caller) -> logits: (T, E) = x @ router_w [+ router_b], in x's dtype.

    Every logit is one FMA chain over d in increasing order, whatever T, E or the thread count
    (backends/cpu.py: router_logits; on CUDA a GEMM that does the same). BLAS rounds a column
    differently when the matrix is wider or taller or its thread count changes, and adding
    experts (surgery.add_experts) must leave the old experts' logits bit-identical, as must
    splitting tokens over ranks (fastmoe_nb.parallel)."""
    be = backend_of(x=x, router_w=router_w, router_b=router_b)
    if be != CUDA:
        x = np.ascontiguousarray(x)
    return backends.get(be).router_logits(x, router_w, router_b)


def sigmoid_topk(logits, k, bias=None, n_group=1, topk_group=1, renormalize=True, scale=1.0,
                 check_finite=True):
    """DeepSeek-V3 routing (its official inference code). logits: (T, E), bias: (E,) or None
    -> Routing(weights (T, k), experts (T, k) int32).

    scores = sigmoid(logits); the bias is added only to choose (weights come from the unbiased
    scores); with n_group > 1 the experts form n_group equal groups, each scored by the sum of
    its two best biased scores, and all but the topk_group best groups are masked with -inf;
    weights are renormalized over the k (sum + 1e-20) when renormalize, then times scale.
    """
    backend_of(logits=logits, bias=bias)  # host and device arrays do not mix
    logits, be = check_scores("logits", logits, check_finite)
    E = logits.shape[1]
    k, n_group, topk_group, scale = check_sigmoid_options(E, k, bias, n_group, topk_group, scale,
                                                          logits.dtype)
    if be != CUDA and bias is not None:
        bias = np.ascontiguousarray(as_host("bias", bias))
        if check_finite:
            chk.check_finite("bias", bias)
    return backends.get(be).sigmoid_topk(logits, k, bias, n_group, topk_group, bool(renormalize),
                                         scale, check_finite)


# --------------------------------------------------------------------------- backward

def softmax_backward(dy, y):
    """dy: (T, E) gradient of y = softmax(x), y: (T, E) -> dx: (T, E) = y * (dy - <dy, y>)
    row-wise (sums in float64)."""
    if backend_of(dy=dy, y=y) == CUDA:
        return backends.get(CUDA).softmax_backward(dy, y)
    y = np.ascontiguousarray(chk.check_float("y", as_host("y", y), ndim=2))
    return backends.cpu.softmax_backward(check_grad("dy", dy, y.shape, y.dtype), y)


def _router_grad_args(d_weights, logits, experts):
    """Host operands of a router's backward -> (d_weights, logits, experts int32)."""
    logits, _ = check_scores("logits", logits, check_finite=False)
    T, E = logits.shape
    experts = check_experts(experts, T, E)
    return check_grad("d_weights", d_weights, experts.shape, logits.dtype), logits, experts


def softmax_topk_backward(d_weights, logits, experts, renormalize=True):
    """The gradient of softmax_topk's weights w.r.t. its logits.

    d_weights: (T, k), logits: (T, E), experts: (T, k) the routing's chosen experts
    -> d_logits: (T, E). Selection is piecewise constant and gets no gradient. With renormalize
    the weights are a softmax over the k chosen logits, so experts not chosen get zero; without,
    every logit gets the softmax's gradient through the normalizer.
    """
    if backend_of(d_weights=d_weights, logits=logits, experts=experts) == CUDA:
        return backends.get(CUDA).softmax_topk_backward(d_weights, logits, experts, renormalize)
    return backends.cpu.softmax_topk_backward(*_router_grad_args(d_weights, logits, experts),
                                              bool(renormalize))


def sigmoid_topk_backward(d_weights, logits, experts, renormalize=True, scale=1.0):
    """The gradient of sigmoid_topk's weights w.r.t. its logits (DeepSeek-V3).

    d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E), nonzero only at
    the chosen experts. The gradient runs through the unbiased scores sigmoid(logits); the
    bias and the group mask only chose the experts and get none (the bias is trained by the
    auxiliary-loss-free update instead). renormalize and scale as in the forward.
    """
    if backend_of(d_weights=d_weights, logits=logits, experts=experts) == CUDA:
        return backends.get(CUDA).sigmoid_topk_backward(d_weights, logits, experts, renormalize,
                                                        scale)
    args = _router_grad_args(d_weights, logits, experts)
    return backends.cpu.sigmoid_topk_backward(*args, bool(renormalize),
                                              chk.check_real("scale", scale))


__all__ = ["check_experts", "check_sigmoid_options", "router_logits", "sigmoid_topk",
           "sigmoid_topk_backward", "softmax", "softmax_backward", "softmax_topk",
           "softmax_topk_backward", "topk"]
