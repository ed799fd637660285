"""The specification: every public op in plain NumPy, slow and obvious.

Same names and arguments as the fast ops (fastmoe_nb.__all__, and routed_experts /
routed_experts_backward of fastmoe_nb.interop). Arithmetic is done in float64 and results are
cast back to the input's dtype, so a float64 call is exact to rounding and a float32 call is the
correctly-rounded answer the kernels are compared with. Tests and the benchmarks check the
kernels against these functions; when a kernel and this file disagree, this file is right.

The one exception to "float64, then round" is router_logits: the logits are part of the
contract bit for bit (every logit one fused multiply-add chain over d in order, whatever T, E
or the thread count), because near-ties between experts are routed by those bits; the reference
writes that chain out, so that its routing is the library's.

Nothing here validates (the ops do: tests/test_validation.py), and nothing is imported from
the implementation (ops/, backends/, kernels/). The references of the routers of
fastmoe_nb.routing (Switch, GShard, expert choice, ...) and of the balancing losses are in
fastmoe_nb/routing/reference.py, built on this file.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy.special import erfc as _erfc
from scipy.special import expit as _sigmoid

from .types import Plan, Routing

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu")
ROUTERS = ("softmax_topk", "sigmoid_topk")   # the routers moe_forward's reference runs


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------- routing
# check_finite: accepted for the library's arguments; the reference never validates.

def softmax(x, check_finite=True):
    """x: (T, E) -> (T, E), each row exp(x - max) / sum."""
    x64 = _f64(x)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True)) if x64.shape[-1] else x64
    return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def topk(x, k, check_finite=True):
    """x: (T, E) -> values (T, k), indices (T, k) int32; descending, equal values: lower index
    first (a stable sort of -x)."""
    idx = np.argsort(-_f64(x), axis=-1, kind="stable")[:, :k].astype(np.int32)
    return np.take_along_axis(x, idx, axis=-1), idx


def softmax_topk(logits, k, renormalize=True, check_finite=True):
    """logits: (T, E) -> Routing(weights (T, k), experts (T, k) int32).

    The k best experts by logit (softmax is monotone, so this is the order of the
    probabilities without their rounding ties); weights are the softmax over all E experts,
    renormalized over the chosen k when renormalize (Mixtral, Qwen-MoE; OLMoE does not).
    """
    p = softmax(_f64(logits))
    _, idx = topk(logits, k)
    w = np.take_along_axis(p, idx, axis=-1)
    if renormalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return Routing(w.astype(logits.dtype), idx)


def _group_mask(choice, n_group, topk_group):
    """(T, E) biased scores -> (T, E) bool, True where the expert's group was kept.

    A group's score is the sum of its two best biased scores (its one score when groups hold a
    single expert); the topk_group best groups are kept, ties to the lower group index."""
    T, E = choice.shape
    g = choice.reshape(T, n_group, E // n_group)
    best = -np.sort(-g, axis=-1)[..., :2]
    gscore = best.sum(axis=-1)
    _, gidx = topk(gscore, topk_group)
    keep = np.zeros((T, n_group), dtype=bool)
    np.put_along_axis(keep, gidx.astype(np.int64), True, axis=-1)
    return np.repeat(keep, E // n_group, axis=-1)


def sigmoid_topk(logits, k, bias=None, n_group=1, topk_group=1, renormalize=True, scale=1.0,
                 check_finite=True):
    """DeepSeek-V3 routing. logits: (T, E), bias: (E,) or None -> Routing.

    scores = sigmoid(logits); choice = scores + bias (the bias only chooses); with n_group > 1
    the experts form n_group equal groups, each scored by the sum of its two best choice
    values, and all but the topk_group best groups are masked with -inf; the k best unmasked
    experts by choice value are kept; their weights are the unbiased scores, divided by their
    sum when renormalize (plus 1e-20, as HF transformers does, so all-underflowed scores give
    0 instead of NaN), times scale.
    """
    x = _f64(logits)
    s = 1.0 / (1.0 + np.exp(-x))
    choice = s + (_f64(bias)[None, :] if bias is not None else 0.0)
    if n_group > 1:
        choice = np.where(_group_mask(choice, n_group, topk_group), choice, -np.inf)
    _, idx = topk(choice, k)
    w = np.take_along_axis(s, idx, axis=-1)
    if renormalize:
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-20)
    return Routing((w * scale).astype(logits.dtype), idx)


def _two_sum(a, b):
    """a + b = s + e exactly (Knuth's TwoSum), elementwise in a's dtype."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_product(a, b):
    """a * b = p + e exactly, elementwise (float32: through float64, where the product of two
    float32 is exact; float64: Dekker's split, exact away from overflow and underflow)."""
    if a.dtype == np.float32:
        p64 = a.astype(np.float64) * b.astype(np.float64)
        p = p64.astype(np.float32)
        return p, (p64 - p).astype(np.float32)       # the remainder fits in 24 bits
    p = a * b
    split = 134217729.0                              # 2**27 + 1

    def halves(v):
        c = split * v
        hi = c - (c - v)
        return hi, v - hi

    ah, al = halves(a)
    bh, bl = halves(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _add_round_to_odd(a, b):
    """a + b rounded to odd: the nearest value when exact, else the one of the two neighbours
    with an odd last bit."""
    s, e = _two_sum(a, b)
    ints = np.int32 if s.dtype == np.float32 else np.int64
    even = (s.view(ints) & 1) == 0
    away = np.nextafter(s, np.where(e > 0, np.inf, -np.inf).astype(s.dtype))
    return np.where((e != 0) & even, away, s)


def fma(a, b, c):
    """a * b + c with one rounding, elementwise, as the CPU's fused multiply-add computes it
    (float32 or float64 arrays of one dtype). Boldo and Melquiond, "Emulation of a FMA and
    correctly-rounded sums: proved algorithms using rounding to odd", IEEE TC 57(4), 2008:
    the exact product as a pair, its high part added to c exactly, the two low parts added
    with rounding to odd, then one rounding to nearest."""
    uh, ul = _two_product(a, b)
    th, tl = _two_sum(c, uh)
    return th + _add_round_to_odd(tl, ul)


def router_logits(x, router_w, router_b=None):
    """x: (T, d), router_w: (d, E), router_b: (E,) or None -> logits (T, E) = x @ router_w
    [+ router_b] in x's dtype, every logit one fused multiply-add chain over d from 0 in
    increasing order (then + router_b, one rounding): the library's logits bit for bit, so
    that near-ties route the same way (DESIGN.md; surgery and expert parallelism rely on
    these bits too)."""
    x = np.asarray(x)
    w = np.asarray(router_w, dtype=x.dtype)
    acc = np.zeros((x.shape[0], w.shape[1]), x.dtype)
    for p in range(x.shape[1]):
        acc = fma(np.broadcast_to(x[:, p:p + 1], acc.shape), np.broadcast_to(w[p], acc.shape),
                  acc)
    if router_b is not None:
        acc = acc + np.asarray(router_b, dtype=x.dtype)
    return acc


# --------------------------------------------------------------------------- dispatch

def make_plan(experts, num_experts, capacity=None):
    """experts: (T, k) ints -> Plan: the T*k assignments sorted stably by expert.

    With a capacity, each expert keeps its first `capacity` assignments in flat-id order
    (token order, then choice order) and drops the rest."""
    T, k = experts.shape
    flat = np.asarray(experts, dtype=np.int64).ravel()
    order = np.argsort(flat, kind="stable")
    counts_all = np.bincount(flat, minlength=num_experts)
    starts = np.concatenate([[0], np.cumsum(counts_all)[:-1]])
    rank = np.empty(T * k, dtype=np.int64)
    rank[order] = np.arange(T * k) - starts[flat[order]]
    keep = np.ones(T * k, dtype=bool) if capacity is None else rank < capacity
    counts = np.bincount(flat[keep], minlength=num_experts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = order[keep[order]].astype(np.int32)
    slots = np.full(T * k, -1, dtype=np.int32)
    slots[rows] = np.arange(rows.shape[0], dtype=np.int32)
    return Plan(rows=rows, offsets=offsets, counts=counts, slots=slots.reshape(T, k),
                dropped=(counts_all - counts).astype(np.int64), capacity=capacity)


def permute(x, plan):
    """x: (T, d) -> xs: (N, d), xs[i] = x[rows[i] // k]."""
    return x[plan.rows // plan.top_k]


def combine(ys, plan, weights=None):
    """ys: (N, d), weights: (T, k) or None (ones) -> y: (T, d);
    y[t] = sum over kept j of weights[t, j] * ys[slots[t, j]]; dropped assignments add 0."""
    T, k = plan.slots.shape
    y = np.zeros((T, ys.shape[1]), dtype=np.float64)
    for j in range(k):
        s = plan.slots[:, j]
        kept = s >= 0
        w = np.ones(T) if weights is None else _f64(weights)[:, j]
        y[kept] += w[kept, None] * _f64(ys)[s[kept]]
    return y.astype(ys.dtype)


# --------------------------------------------------------------------------- experts

def _expert(w, e, trans_w):
    """Expert e's matrix of w: (E, K, M) [trans_w: (E, M, K)] -> (K, M) float64."""
    return _f64(w[e]).T if trans_w else _f64(w[e])


def grouped_gemm(a, w, offsets, trans_w=False):
    """a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], offsets: (E+1,) -> (N, M);
    rows offsets[e]:offsets[e+1] of the result are a[those rows] @ w[e] (or @ w[e].T)."""
    E = w.shape[0]
    M = w.shape[1] if trans_w else w.shape[2]
    out = np.zeros((a.shape[0], M), dtype=np.float64)
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        out[lo:hi] = _f64(a[lo:hi]) @ _expert(w, e, trans_w)
    return out.astype(a.dtype)


def q8_0_activations(x):
    """x: (..., K) float32, K a multiple of 32 -> (q (..., K) int8, d (..., K // 32) float32):
    activations rounded as weights asking for activations="q8_0" multiply them (their integer
    dot products): per block of 32 values, in float32, d = amax / 127 and q = x * (1 / d)
    rounded half away from zero (ggml's q8_0 rounding, with d kept in float32); a block whose
    1 / d overflows float32 (zeros, or |x| below about 2^-121) has q = 0 and d = 0, one holding
    a NaN or an Inf q = 0 and d = NaN. They stand for q * d."""
    x = np.asarray(x, np.float32)
    xb = x.reshape(x.shape[:-1] + (x.shape[-1] // 32, 32))
    finite = np.isfinite(xb).all(-1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(xb), xb, 0)).max(-1), 0)
    d = (amax.astype(np.float32) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = (np.float32(1) / d).astype(np.float32)
    use = finite & (inv < np.inf)            # a zero block, or 1 / d past float32: q = 0, d = 0
    inv = np.where(use, inv, np.float32(0)).astype(np.float32)
    v = np.where(use[..., None], xb, 0) * inv[..., None]              # float32 products
    t = np.trunc(v)
    f = v - t                                                        # exact in float32
    q = t + (f >= 0.5) - (f <= -0.5)
    d = np.where(finite, np.where(use, d, np.float32(0)), np.float32(np.nan)).astype(np.float32)
    return q.astype(np.int8).reshape(x.shape), d


def pack_weights(w, trans_w=False, swiglu=False):
    """w: (E, K, M) [trans_w: (E, M, K)] -> what grouped_gemm and experts_forward take in its
    place. Packing is a memory layout, not maths: the reference's packed weights are a copy of
    w (a snapshot: later in-place updates of w do not reach it), used with the same trans_w."""
    return np.array(w, copy=True)


def _phi(x):
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)), as 0.5 erfc(-x / sqrt 2): accurate for x < 0 too."""
    return 0.5 * _erfc(-x / np.sqrt(2.0))


def _gelu_tanh_2u(x):
    """2u = 2 sqrt(2/pi) (x + 0.044715 x^3); +-inf where x^3 overflows (sigmoid(+-inf) is
    exactly 1 / 0 there, which is the true value to rounding)."""
    with np.errstate(over="ignore"):
        return 2.0 * np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)


# gelu_tanh' = s + x s(2u) s(-2u) 2u': for |x| >= 30, |2u| > 1974, so s(2u) is exactly 1 or 0
# and the second term underflows to 0 in float64; clamping x there keeps x^2 (which overflows
# near 1.3e154) out of 0 * inf = NaN without changing any result.
_GELU_TANH_CLAMP = 30.0


def activate(h, activation):
    """h: (N, h) -> (N, h), or for swiglu h: (N, 2h) = [gate | up] -> silu(gate) * up (N, h)."""
    x = _f64(h)
    if activation == "relu":
        out = np.maximum(x, 0.0)
    elif activation == "gelu":
        out = x * _phi(x)
    elif activation == "gelu_tanh":
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u): no 1 + tanh(u) cancellation for x < 0
        out = x * _sigmoid(_gelu_tanh_2u(x))
    elif activation == "silu":
        out = x * _sigmoid(x)
    elif activation == "swiglu":
        half = x.shape[1] // 2
        g, u = x[:, :half], x[:, half:]
        out = g * _sigmoid(g) * u
    else:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return out.astype(h.dtype)


def expert_mlp(x, w1, w2, activation):
    """One dense MLP: x (T, d), w1 (d, h|2h), w2 (h, d) -> (T, d). The shared experts, and the
    E=1 MoE's twin."""
    return (_f64(activate(_f64(x) @ _f64(w1), activation)) @ _f64(w2)).astype(x.dtype)


def experts_forward(xs, w1, w2, offsets, activation, trans_w=False, keep=False):
    """The expert MLPs on tokens in expert order: xs: (N, d), w1: (E, d, h|2h), w2: (E, h, d)
    [trans_w: (E, h|2h, d), (E, d, h)] -> (h_pre (N, h|2h) or None, h_act (N, h), ys (N, d)):
    h_pre = grouped_gemm(xs, w1), h_act = activate(h_pre), ys = grouped_gemm(h_act, w2), each
    rounded to xs's dtype as the library keeps them; h_pre is returned only when keep."""
    h_pre = grouped_gemm(xs, w1, offsets, trans_w)
    h_act = activate(h_pre, activation)
    ys = grouped_gemm(h_act, w2, offsets, trans_w)
    return (h_pre if keep else None), h_act, ys


def _experts_sum(x, experts, weights, kept, w1, w2, activation, trans_w):
    """y[t] = sum over kept (t, j) of weights[t, j] * MLP_{experts[t, j]}(x[t]), float64,
    written per expert: x (T, d), experts / weights / kept (T, k)."""
    x64 = _f64(x)
    y = np.zeros_like(x64)
    for e in range(w1.shape[0]):
        t, j = np.nonzero((np.asarray(experts) == e) & kept)
        if t.size:
            h = _f64(activate(x64[t] @ _expert(w1, e, trans_w), activation))
            np.add.at(y, t, _f64(weights)[t, j][:, None] * (h @ _expert(w2, e, trans_w)))
    return y


# --- grouped gemm and expert backward

def grouped_gemm_backward(dy, a, w, offsets, trans_w=False):
    """dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], offsets: (E+1,)
    -> da (N, K), dw (E, K, M) [trans_w: (E, M, K)], the gradients of grouped_gemm:
    da[rows of e] = dy[rows] @ w[e].T, dw[e] = a[rows].T @ dy[rows] (zero for an empty expert),
    dw in w's layout."""
    da = np.zeros(a.shape, dtype=np.float64)
    dw = np.zeros(w.shape, dtype=np.float64)
    for e in range(w.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        da[lo:hi] = _f64(dy[lo:hi]) @ _expert(w, e, trans_w).T
        g = _f64(a[lo:hi]).T @ _f64(dy[lo:hi])                # (K, M)
        dw[e] = g.T if trans_w else g
    return da.astype(a.dtype), dw.astype(w.dtype)


def _add_into(acc, g):
    """acc += g in acc's dtype, in place; returns acc (gradient accumulation)."""
    acc += np.asarray(g, dtype=acc.dtype)
    return acc


def experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets, activation, trans_w=False,
                     into=None):
    """The gradients of experts_forward from its kept h_pre, h_act: d_ys: (N, d) -> (d_xs
    (N, d), dw1, dw2), dw1 / dw2 in the forward's layout:
    d_h_act, dw2 = grouped_gemm_backward(d_ys, h_act, w2); d_h_pre = activate_backward(d_h_act,
    h_pre); d_xs, dw1 = grouped_gemm_backward(d_h_pre, xs, w1). into: None, or (dw1, dw2),
    either None, arrays the weight gradients are added into in place and returned instead."""
    d_h_act, dw2 = grouped_gemm_backward(d_ys, h_act, w2, offsets, trans_w)
    d_h_pre = activate_backward(d_h_act, h_pre, activation)
    d_xs, dw1 = grouped_gemm_backward(d_h_pre, xs, w1, offsets, trans_w)
    if into is not None:
        dw1, dw2 = (g if a is None else _add_into(a, g) for a, g in zip(into, (dw1, dw2)))
    return d_xs, dw1, dw2


# --- backward of every op (training): float64 chain rule, Jacobians written out

def softmax_backward(dy, y):
    """dy: (T, E) gradient of y = softmax(x), y: (T, E) -> dx: (T, E) = J^T dy per row, with
    the softmax Jacobian J = diag(y) - y y^T."""
    y64 = _f64(y)
    J = np.einsum("te,ef->tef", y64, np.eye(y64.shape[1])) - y64[:, :, None] * y64[:, None, :]
    return np.einsum("tef,te->tf", J, _f64(dy)).astype(y.dtype)


def _topk_weight_jacobian(J_sel, s_sel, renormalize, eps):
    """J_sel: (T, k, E) d s_sel / d logits of the k chosen scores s_sel: (T, k) -> the
    Jacobian (T, k, E) of w = s_sel / (sum(s_sel) + eps) when renormalize, else of w = s_sel."""
    if not renormalize:
        return J_sel
    D = s_sel.sum(axis=1) + eps                                      # (T,)
    return J_sel / D[:, None, None] - (s_sel / D[:, None] ** 2)[:, :, None] * J_sel.sum(
        axis=1, keepdims=True)


def softmax_topk_backward(d_weights, logits, experts, renormalize=True):
    """d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E) = J^T d_weights,
    J (T, k, E) the Jacobian of softmax_topk's weights (the choice held fixed)."""
    p = softmax(_f64(logits))
    E = p.shape[1]
    Jp = np.einsum("te,ef->tef", p, np.eye(E)) - p[:, :, None] * p[:, None, :]  # dp_e/dl_f
    idx = np.asarray(experts, dtype=np.int64)
    J_sel = np.take_along_axis(Jp, idx[:, :, None], axis=1)                     # (T, k, E)
    J = _topk_weight_jacobian(J_sel, np.take_along_axis(p, idx, axis=1), renormalize, 0.0)
    return np.einsum("tjf,tj->tf", J, _f64(d_weights)).astype(logits.dtype)


def sigmoid_topk_backward(d_weights, logits, experts, renormalize=True, scale=1.0):
    """d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E) = J^T d_weights,
    J the Jacobian of sigmoid_topk's weights scale * s_j / (sum s + 1e-20), s the unbiased
    sigmoid scores of the chosen experts (the bias and groups only choose)."""
    x = _f64(logits)
    s = 1.0 / (1.0 + np.exp(-x))
    E = s.shape[1]
    Js = np.einsum("te,ef->tef", s * (1.0 - s), np.eye(E))                      # ds_e/dl_f
    idx = np.asarray(experts, dtype=np.int64)
    J_sel = np.take_along_axis(Js, idx[:, :, None], axis=1)
    J = scale * _topk_weight_jacobian(J_sel, np.take_along_axis(s, idx, axis=1), renormalize,
                                      1e-20)
    return np.einsum("tjf,tj->tf", J, _f64(d_weights)).astype(logits.dtype)


def permute_backward(d_xs, plan):
    """d_xs: (N, d) -> dx: (T, d), dx[t] = sum of d_xs[i] over the rows i holding token t."""
    dx = np.zeros((plan.num_tokens, d_xs.shape[1]), dtype=np.float64)
    np.add.at(dx, np.asarray(plan.rows, dtype=np.int64) // plan.top_k, _f64(d_xs))
    return dx.astype(d_xs.dtype)


def combine_backward(dy, ys, plan, weights=None):
    """dy: (T, d), ys: (N, d), weights: (T, k) or None -> d_ys (N, d), d_weights (T, k):
    d_ys[i] = w[t, j] dy[t] and d_weights[t, j] = <dy[t], ys[i]> for the row i of (t, j);
    dropped assignments get d_weights 0."""
    T, k = plan.slots.shape
    w = np.ones(T * k) if weights is None else _f64(weights).ravel()
    rows = np.asarray(plan.rows, dtype=np.int64)
    dy_rows = _f64(dy)[rows // k]
    d_ys = w[rows, None] * dy_rows
    d_weights = np.zeros(T * k)
    d_weights[rows] = (dy_rows * _f64(ys)).sum(axis=1)
    return d_ys.astype(ys.dtype), d_weights.reshape(T, k).astype(ys.dtype)


def activate_backward(dy, h, activation):
    """dy: (N, H), h: (N, H) pre-activation [swiglu: (N, 2H)] -> dh like h."""
    x = _f64(h)
    g = _f64(dy)

    def silu_grad(v):
        # s + v s (1 - s), with 1 - s = s(-v) computed directly (no cancellation)
        s = _sigmoid(v)
        return s + v * s * _sigmoid(-v)

    if activation == "relu":
        dh = g * (x > 0)
    elif activation == "gelu":
        with np.errstate(over="ignore"):      # x^2 -> inf: exp(-inf) = 0, exact
            xphi = x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
        dh = g * (_phi(x) + xphi)
    elif activation == "gelu_tanh":
        xc = np.clip(x, -_GELU_TANH_CLAMP, _GELU_TANH_CLAMP)
        u2 = _gelu_tanh_2u(xc)
        du2 = 2.0 * np.sqrt(2.0 / np.pi) * (1.0 + 3 * 0.044715 * xc ** 2)
        s = _sigmoid(u2)
        dh = g * (s + xc * s * _sigmoid(-u2) * du2)
    elif activation == "silu":
        dh = g * silu_grad(x)
    elif activation == "swiglu":
        half = x.shape[1] // 2
        gate, up = x[:, :half], x[:, half:]
        dh = np.concatenate([g * up * silu_grad(gate), g * gate * _sigmoid(gate)], axis=1)
    else:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return dh.astype(h.dtype)


def _mlp_backward(dy, x, w1, w2, activation):
    """float64 dense MLP act(x @ w1) @ w2: -> (dx, dw1, dw2)."""
    h_pre = x @ w1
    a = activate(h_pre, activation)
    dh = activate_backward(dy @ w2.T, h_pre, activation)
    return dh @ w1.T, x.T @ dh, a.T @ dy


def _experts_sum_backward(dy, x, experts, weights, kept, w1, w2, activation, trans_w):
    """The gradients of _experts_sum, float64, per expert -> (dx (T, d), d_weights (T, k),
    dw1, dw2 in w1's / w2's layout); an assignment not kept gets d_weights 0."""
    x64, dy64 = _f64(x), _f64(dy)
    dx = np.zeros_like(x64)
    dw1, dw2 = np.zeros(w1.shape), np.zeros(w2.shape)
    d_weights = np.zeros(np.shape(weights))
    for e in range(w1.shape[0]):
        t, j = np.nonzero((np.asarray(experts) == e) & kept)
        w1e, w2e = _expert(w1, e, trans_w), _expert(w2, e, trans_w)   # (d, H1), (h, d)
        a = activate(x64[t] @ w1e, activation)
        d_weights[t, j] = (dy64[t] * (a @ w2e)).sum(axis=1)
        dxe, g1, g2 = _mlp_backward(_f64(weights)[t, j][:, None] * dy64[t], x64[t], w1e, w2e,
                                    activation)
        np.add.at(dx, t, dxe)
        dw1[e] = g1.T if trans_w else g1
        dw2[e] = g2.T if trans_w else g2
    return dx, d_weights, dw1, dw2


# --------------------------------------------------------------------------- shared expert

def _gate_of(x64, gate_w):
    """sigmoid(x @ gate_w): (T, 1) float64, gate_w (d,) or (d, 1)."""
    return 1.0 / (1.0 + np.exp(-(x64 @ _f64(gate_w).reshape(-1, 1))))


def shared_forward(x, w1, w2, gate_w, activation):
    """The shared (always-on) expert: x (T, d), w1 (d, hs|2hs), w2 (hs, d), gate_w (d, 1),
    (d,) or None -> (s (T, d), cache): s = act(x @ w1) @ w2 [* sigmoid(x @ gate_w)]; cache
    holds "h_pre", "h_act" and "gate" ((T, 1) or None) in x's dtype, as the library's."""
    dt = x.dtype
    x64 = _f64(x)
    h_pre = x64 @ _f64(w1)
    h_act = _f64(activate(h_pre, activation))
    s = h_act @ _f64(w2)
    gate = None
    if gate_w is not None:
        gate = _gate_of(x64, gate_w)
        s = s * gate
    return s.astype(dt), {"h_pre": h_pre.astype(dt), "h_act": h_act.astype(dt),
                          "gate": None if gate is None else gate.astype(dt)}


def shared_backward(ds, x, w1, w2, gate_w, cache, activation):
    """The gradients of shared_forward. ds: (T, d), x: (T, d), w1: (d, hs|2hs), w2: (hs, d),
    gate_w: (d, 1), (d,) or None; cache: shared_forward's (accepted for the library's
    arguments and not read: the reference recomputes in float64)
    -> (dx (T, d), dw1, dw2, dgate_w in gate_w's shape or None)."""
    x64, w1_, w2_, g = _f64(x), _f64(w1), _f64(w2), _f64(ds)
    dgate = None
    dx = np.zeros_like(x64)
    if gate_w is not None:
        gw = _f64(gate_w).reshape(-1, 1)
        sig = _gate_of(x64, gate_w)                                    # (T, 1)
        s0 = activate(x64 @ w1_, activation) @ w2_
        dz = (g * s0).sum(axis=1, keepdims=True) * sig * (1.0 - sig)   # (T, 1)
        dgate = (x64.T @ dz).reshape(np.shape(gate_w)).astype(x.dtype)
        dx += dz @ gw.T
        g = g * sig
    dxm, dw1, dw2 = _mlp_backward(g, x64, w1_, w2_, activation)
    return (dx + dxm).astype(x.dtype), dw1.astype(x.dtype), dw2.astype(x.dtype), dgate


# --------------------------------------------------------------------------- routed experts

class ExpertsCall(NamedTuple):
    """reference.routed_experts(..., return_context=True)'s context: the call itself (the
    reference's backward recomputes everything from it)."""

    x: Any
    experts: Any
    weights: Any
    w1: Any
    w2: Any
    activation: str
    trans_w: bool


def routed_experts(x, experts, weights, w1, w2, activation="swiglu", trans_w=False,
                   return_context=False):
    """The experts alone, the routing given (fastmoe_nb.interop.routed_experts): x: (T, d),
    experts: (T, k) ids, weights: (T, k), w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h,
    d), (E, d, h)] -> y (T, d) = sum_j weights[t, j] * MLP_{experts[t, j]}(x[t]); or
    (y, ctx) with return_context."""
    kept = np.ones(np.shape(experts), dtype=bool)
    y = _experts_sum(x, experts, weights, kept, w1, w2, activation, trans_w).astype(x.dtype)
    if not return_context:
        return y
    return y, ExpertsCall(x, experts, weights, w1, w2, activation, bool(trans_w))


def routed_experts_backward(dy, ctx):
    """dy: (T, d) gradient of routed_experts' y, ctx: reference.routed_experts' context
    -> (dx (T, d), d_weights (T, k), dw1, dw2), dw1 / dw2 in the forward's layout."""
    x, experts, weights, w1, w2, activation, trans_w = ctx
    kept = np.ones(np.shape(experts), dtype=bool)
    dx, d_weights, dw1, dw2 = _experts_sum_backward(dy, x, experts, weights, kept, w1, w2,
                                                    activation, trans_w)
    dt = x.dtype
    return dx.astype(dt), d_weights.astype(dt), dw1.astype(dt), dw2.astype(dt)


# --------------------------------------------------------------------------- the layer

class MoECall(NamedTuple):
    """reference.moe_forward(..., return_context=True)'s context: the call itself (the
    reference's backward recomputes everything from it)."""

    x: Any
    router_w: Any
    w1: Any
    w2: Any
    k: int
    options: dict


def _route(x, router_w, k, router, renormalize, bias, n_group, topk_group, scale, capacity,
           router_b=None):
    """The layer's routing and plan -> (logits, Routing, Plan)."""
    logits = router_logits(x, router_w, router_b)
    if router == "softmax_topk":
        r = softmax_topk(logits, k, renormalize)
    elif router == "sigmoid_topk":
        r = sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale)
    else:
        raise ValueError(f"router: the reference layer runs {ROUTERS}, got {router!r}; the "
                         "routers of fastmoe_nb.routing have their references in "
                         "fastmoe_nb.routing.reference (route, make_plan, routed_experts)")
    return logits, r, make_plan(r.experts, router_w.shape[1], capacity)


def moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0,
                capacity=None, trans_w=False, shared_w1=None, shared_w2=None,
                shared_gate_w=None, check_finite=True, return_context=False, router_b=None):
    """The whole layer, written per expert without plan/permute/combine.

    x: (T, d), router_w: (d, E), w1: (E, d, h|2h) [trans_w: (E, h|2h, d)],
    w2: (E, h, d) [trans_w: (E, d, h)], router_b: (E,) or None (logits x @ router_w +
    router_b) -> y: (T, d), or (y, ctx) with return_context (ctx: the call, for
    reference.moe_backward).
    y[t] = sum_j weight[t, j] * MLP_{expert[t, j]}(x[t]) over kept assignments
           + shared(x[t]) * [sigmoid(x[t] @ shared_gate_w) if shared_gate_w is given].
    """
    _, r, plan = _route(x, router_w, k, router, renormalize, bias, n_group, topk_group, scale,
                        capacity, router_b)
    y = _experts_sum(x, r.experts, r.weights, plan.slots >= 0, w1, w2, activation, trans_w)
    if shared_w1 is not None:
        y += _f64(shared_forward(_f64(x), shared_w1, shared_w2, shared_gate_w, activation)[0])
    y = y.astype(x.dtype)
    if not return_context:
        return y
    options = dict(activation=activation, router=router, renormalize=renormalize, bias=bias,
                   n_group=n_group, topk_group=topk_group, scale=scale, capacity=capacity,
                   trans_w=trans_w, shared_w1=shared_w1, shared_w2=shared_w2,
                   shared_gate_w=shared_gate_w, router_b=router_b)
    return y, MoECall(x, router_w, w1, w2, k, options)


def moe_backward(dy, ctx, *args, grads=None, **options):
    """The gradients of moe_forward, written per expert.

    moe_backward(dy, ctx[, grads]), ctx the context of reference.moe_forward(...,
    return_context=True) — the library's call — or moe_backward(dy, x, router_w, w1, w2, k,
    **options), the same call written out with moe_forward's arguments.
    -> (dx (T, d), grads) with grads "router_w", "w1", "w2" in the forward's layouts, plus
    "router_b" (sum over tokens of d logits), "shared_w1", "shared_w2" and "shared_gate_w"
    (in its given shape) when given. The sigmoid router's choice bias gets none. grads
    (argument): None, or a dict of arrays (any subset of those keys) this call's gradients are
    added into in place and returned in place of fresh ones (gradient accumulation)."""
    if isinstance(ctx, MoECall):
        if len(args) > 1 or options or (args and grads is not None):
            raise TypeError("moe_backward(dy, ctx, grads=None): nothing else with a context")
        grads = args[0] if args else grads
        dx, out = _layer_backward(dy, *ctx[:5], **ctx.options)
    else:
        dx, out = _layer_backward(dy, ctx, *args, **options)
    for name, a in (grads or {}).items():
        out[name] = _add_into(a, out[name])
    return dx, out


def _layer_backward(dy, x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                    renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0,
                    capacity=None, trans_w=False, shared_w1=None, shared_w2=None,
                    shared_gate_w=None, check_finite=True, router_b=None):
    x64 = _f64(x)
    logits, r, plan = _route(x, router_w, k, router, renormalize, bias, n_group, topk_group,
                             scale, capacity, router_b)
    dx, d_weights, dw1, dw2 = _experts_sum_backward(dy, x, r.experts, r.weights,
                                                    plan.slots >= 0, w1, w2, activation,
                                                    trans_w)
    if router == "softmax_topk":
        d_logits = softmax_topk_backward(d_weights, _f64(logits), r.experts, renormalize)
    else:
        d_logits = sigmoid_topk_backward(d_weights, _f64(logits), r.experts, renormalize, scale)
    dx += d_logits @ _f64(router_w).T
    dt = x.dtype
    grads = {"router_w": (x64.T @ d_logits).astype(dt), "w1": dw1.astype(dt),
             "w2": dw2.astype(dt)}
    if router_b is not None:
        grads["router_b"] = d_logits.sum(axis=0).astype(dt)
    if shared_w1 is not None:
        dxs, dw1s, dw2s, dgate = shared_backward(_f64(dy), x64, shared_w1, shared_w2,
                                                 shared_gate_w, None, activation)
        grads["shared_w1"], grads["shared_w2"] = dw1s.astype(dt), dw2s.astype(dt)
        dx += dxs
        if dgate is not None:
            grads["shared_gate_w"] = dgate.astype(dt)
    return dx.astype(dt), grads
