"""Routing ops: softmax, topk, softmax_topk (Mixtral, Qwen-MoE, OLMoE), sigmoid_topk
(DeepSeek-V3). All return Routing(weights (T, k), experts (T, k) int32) but softmax/topk."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..kernels.cpu import routing as kr
from .gemm import expert_tiles, num_panels, run_gemm
from ..types import Routing


def _logits(name, x, check_finite):
    """Validate a (T, E) score matrix; returns it contiguous on the host (or as is on device)."""
    if backend_of(**{name: x}) == CUDA:
        chk.check_float(name, x, ndim=2)
        return x, CUDA
    x = chk.check_float(name, as_host(name, x), ndim=2)
    if check_finite:
        chk.check_finite(name, x)
    return np.ascontiguousarray(x), "cpu"


def _k(k, E, name="k"):
    return chk.check_int(name, k, 1, E, what=f"1..E = 1..{E}")


def softmax(x, check_finite=True):
    """x: (T, E) float -> (T, E), each row exp(x - max) / sum (sums in float64)."""
    x, be = _logits("x", x, check_finite)
    if be == CUDA:
        return cuda_module().softmax(x, check_finite)
    out = np.empty_like(x)
    kr.softmax_kernel(x, out)
    return out


def topk(x, k, check_finite=True):
    """x: (T, E) -> (values (T, k), indices (T, k) int32): descending; equal values, lower
    index first."""
    x, be = _logits("x", x, check_finite)
    k = _k(k, x.shape[1])
    if be == CUDA:
        return cuda_module().topk(x, k, check_finite)
    vals = np.empty((x.shape[0], k), x.dtype)
    idx = np.empty((x.shape[0], k), np.int32)
    kr.topk_kernel(x, k, vals, idx)
    return vals, idx


def softmax_topk(logits, k, renormalize=True, check_finite=True):
    """logits: (T, E) -> Routing(weights (T, k), experts (T, k) int32).

    Softmax over all E experts, the k best kept (chosen by logit: the probabilities' order
    without their rounding ties), optionally renormalized over the k.
    Mixtral and Qwen-MoE use renormalize=True, OLMoE renormalize=False.
    """
    logits, be = _logits("logits", logits, check_finite)
    k = _k(k, logits.shape[1])
    renormalize = bool(renormalize)
    if be == CUDA:
        return cuda_module().softmax_topk(logits, k, renormalize, check_finite)
    T = logits.shape[0]
    w = np.empty((T, k), logits.dtype)
    idx = np.empty((T, k), np.int32)
    kr.softmax_topk_kernel(logits, k, renormalize, w, idx)
    return Routing(w, idx)


LOGITS_LOOP_ROWS = 64   # up to this many tokens a plain loop: the grouped GEMM kernel's setup
                        # outweighs a few rows (`fastmoe-nb bench layer --preset decode-8`)


def router_logits(x, router_w, router_b=None):
    """The router's logits of the layer. x: (T, d), router_w: (d, E), router_b: (E,) or None
    (validated by the caller) -> logits: (T, E) = x @ router_w [+ router_b], in x's dtype.

    Every logit is one FMA chain over d in increasing order, whatever T, E or the thread count:
    on the CPU the product runs on the grouped GEMM kernel with one group (kernels/cpu/gemm.py
    sums each output element alone, depth chunks in order), or for a few tokens on a plain
    loop with the same chains (kernels/cpu/routing.py: logits_kernel), on CUDA on a GEMM that
    does the same. BLAS rounds a column differently when the matrix is wider or taller or its
    thread count changes, and adding experts (surgery.add_experts) must leave the old experts'
    logits bit-identical, as must splitting tokens over ranks (fastmoe_nb.parallel)."""
    if backend_of(x=x, router_w=router_w, router_b=router_b) == CUDA:
        kc = cuda_module()
        logits = kc.matmul(x, router_w)
        if router_b is None:
            return logits
        return kc.add_rows(logits, kc.dev(router_b).reshape(1, router_b.shape[0]))
    (T, d), E = x.shape, router_w.shape[1]
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(router_w, dtype=x.dtype)
    logits = np.empty((T, E), x.dtype)
    if T <= LOGITS_LOOP_ROWS:
        kr.logits_kernel(x, w, logits)
    else:
        run_gemm(x, np.arange(T, dtype=np.int64), False, w[None], False, E, 0,
                 expert_tiles(np.array([0, T], np.int64), num_panels(E, 0), d), logits)
    if router_b is not None:
        logits += router_b
    return logits


def check_sigmoid_options(E, k, bias, n_group, topk_group, scale, dtype):
    """Validate DeepSeek-V3 router options against E experts; returns (k, n_group, topk_group,
    scale)."""
    n_group = chk.check_int("n_group", n_group, 1, E, what=f"1..E = 1..{E}")
    if E % n_group:
        raise ValueError(f"n_group: expected a divisor of E = {E}, got {n_group}")
    topk_group = chk.check_int("topk_group", topk_group, 1, n_group,
                               what=f"1..n_group = 1..{n_group}")
    if n_group == 1:
        topk_group = 1
    avail = topk_group * (E // n_group)
    k = chk.check_int("k", k, 1, avail,
                      what=f"1..{avail} (the experts in the topk_group kept groups)")
    scale = chk.check_real("scale", scale)
    if bias is not None:
        chk.check_float("bias", bias, shape=(E,), dtype=dtype)
    return k, n_group, topk_group, scale


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
    logits, be = _logits("logits", logits, check_finite)
    E = logits.shape[1]
    k, n_group, topk_group, scale = check_sigmoid_options(E, k, bias, n_group, topk_group, scale,
                                                          logits.dtype)
    renormalize = bool(renormalize)
    if be == CUDA:
        return cuda_module().sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize,
                                          scale, check_finite)
    if bias is not None:
        bias = np.ascontiguousarray(as_host("bias", bias))
        if check_finite:
            chk.check_finite("bias", bias)
    T = logits.shape[0]
    w = np.empty((T, k), logits.dtype)
    idx = np.empty((T, k), np.int32)
    b = bias if bias is not None else np.zeros(1, logits.dtype)
    kr.sigmoid_topk_kernel(logits, k, b, bias is not None, n_group, topk_group, renormalize,
                           scale, w, idx)
    return Routing(w, idx)


# --------------------------------------------------------------------------- backward

def _grad(name, g, shape, dtype):
    """A host upstream gradient of the given shape and dtype, contiguous."""
    return np.ascontiguousarray(chk.check_float(name, as_host(name, g), shape=shape, dtype=dtype))


def check_experts(experts, T, E, name="experts"):
    """experts: (T, k) distinct expert ids per row in 0..E-1, as a router returns (host)."""
    experts = chk.check_int_array(name, as_host(name, experts), ndim=2)
    if experts.shape[0] != T:
        raise ValueError(f"{name}: expected shape ({T}, k) (one row per token of the logits), "
                         f"got {tuple(experts.shape)}")
    _k(experts.shape[1], E, f"{name}.shape[1]")
    if experts.size:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"{name}: expected expert ids in 0..E-1 = 0..{E - 1}, found "
                             f"{lo if lo < 0 else hi}")
        if experts.shape[1] > 1 and (np.diff(np.sort(experts, axis=1), axis=1) == 0).any():
            raise ValueError(f"{name}: expected distinct experts in each row, as a router "
                             "returns, found a repeated id")
    return np.ascontiguousarray(experts, dtype=np.int32)


def softmax_backward(dy, y):
    """dy: (T, E) gradient of y = softmax(x), y: (T, E) -> dx: (T, E) = y * (dy - <dy, y>)
    row-wise (sums in float64)."""
    if backend_of(dy=dy, y=y) == CUDA:
        return cuda_module().softmax_backward(dy, y)
    y = np.ascontiguousarray(chk.check_float("y", as_host("y", y), ndim=2))
    dy = _grad("dy", dy, y.shape, y.dtype)
    dx = np.empty_like(y)
    kr.softmax_backward_kernel(dy, y, dx)
    return dx


def softmax_topk_backward(d_weights, logits, experts, renormalize=True):
    """The gradient of softmax_topk's weights w.r.t. its logits.

    d_weights: (T, k), logits: (T, E), experts: (T, k) the routing's chosen experts
    -> d_logits: (T, E). Selection is piecewise constant and gets no gradient. With renormalize
    the weights are a softmax over the k chosen logits, so experts not chosen get zero; without,
    every logit gets the softmax's gradient through the normalizer.
    """
    if backend_of(d_weights=d_weights, logits=logits, experts=experts) == CUDA:
        return cuda_module().softmax_topk_backward(d_weights, logits, experts, renormalize)
    logits, _ = _logits("logits", logits, check_finite=False)
    T, E = logits.shape
    experts = check_experts(experts, T, E)
    d_weights = _grad("d_weights", d_weights, experts.shape, logits.dtype)
    d_logits = np.empty_like(logits)
    kr.softmax_topk_backward_kernel(d_weights, logits, experts, bool(renormalize), d_logits)
    return d_logits


def sigmoid_topk_backward(d_weights, logits, experts, renormalize=True, scale=1.0):
    """The gradient of sigmoid_topk's weights w.r.t. its logits (DeepSeek-V3).

    d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E), nonzero only at
    the chosen experts. The gradient runs through the unbiased scores sigmoid(logits); the
    bias and the group mask only chose the experts and get none (the bias is trained by the
    auxiliary-loss-free update instead). renormalize and scale as in the forward.
    """
    if backend_of(d_weights=d_weights, logits=logits, experts=experts) == CUDA:
        return cuda_module().sigmoid_topk_backward(d_weights, logits, experts, renormalize,
                                                   scale)
    logits, _ = _logits("logits", logits, check_finite=False)
    T, E = logits.shape
    experts = check_experts(experts, T, E)
    d_weights = _grad("d_weights", d_weights, experts.shape, logits.dtype)
    scale = chk.check_real("scale", scale)
    d_logits = np.empty_like(logits)
    kr.sigmoid_topk_backward_kernel(d_weights, logits, experts, bool(renormalize), scale,
                                    d_logits)
    return d_logits
