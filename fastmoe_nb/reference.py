"""The specification: every public op in plain NumPy, slow and obvious.

Same names and arguments as the fast ops. Arithmetic is done in float64 and results are cast
back to the input's dtype, so a float64 call is exact to rounding and a float32 call is the
correctly-rounded answer the kernels are compared with. Tests and the benchmarks check the
kernels against these functions; when a kernel and this file disagree, this file is right.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erf as _erf

from .types import Plan, Routing

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu")


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# --------------------------------------------------------------------------- routing

def softmax(x):
    """x: (T, E) -> (T, E), each row exp(x - max) / sum."""
    x64 = _f64(x)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True)) if x64.shape[-1] else x64
    return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def topk(x, k):
    """x: (T, E) -> values (T, k), indices (T, k) int32; descending, equal values: lower index
    first (a stable sort of -x)."""
    idx = np.argsort(-_f64(x), axis=-1, kind="stable")[:, :k].astype(np.int32)
    return np.take_along_axis(x, idx, axis=-1), idx


def softmax_topk(logits, k, renormalize=True):
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


def sigmoid_topk(logits, k, bias=None, n_group=1, topk_group=1, renormalize=True, scale=1.0):
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

def grouped_gemm(a, w, offsets, trans_w=False):
    """a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], offsets: (E+1,) -> (N, M);
    rows offsets[e]:offsets[e+1] of the result are a[those rows] @ w[e] (or @ w[e].T)."""
    E = w.shape[0]
    M = w.shape[1] if trans_w else w.shape[2]
    out = np.zeros((a.shape[0], M), dtype=np.float64)
    for e in range(E):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        we = _f64(w[e]).T if trans_w else _f64(w[e])
        out[lo:hi] = _f64(a[lo:hi]) @ we
    return out.astype(a.dtype)


def activate(h, activation):
    """h: (N, h) -> (N, h), or for swiglu h: (N, 2h) = [gate | up] -> silu(gate) * up (N, h)."""
    x = _f64(h)
    if activation == "relu":
        out = np.maximum(x, 0.0)
    elif activation == "gelu":
        out = 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))
    elif activation == "gelu_tanh":
        out = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
    elif activation == "silu":
        out = x / (1.0 + np.exp(-x))
    elif activation == "swiglu":
        half = x.shape[1] // 2
        g, u = x[:, :half], x[:, half:]
        out = g / (1.0 + np.exp(-g)) * u
    else:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return out.astype(h.dtype)


def expert_mlp(x, w1, w2, activation):
    """One dense MLP: x (T, d), w1 (d, h|2h), w2 (h, d) -> (T, d). The shared experts, and the
    E=1 MoE's twin."""
    return (_f64(activate(_f64(x) @ _f64(w1), activation)) @ _f64(w2)).astype(x.dtype)


def moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0,
                capacity=None, trans_w=False, shared_w1=None, shared_w2=None,
                shared_gate_w=None):
    """The whole layer, written per expert without plan/permute/combine.

    x: (T, d), router_w: (d, E), w1: (E, d, h|2h) [trans_w: (E, h|2h, d)],
    w2: (E, h, d) [trans_w: (E, d, h)] -> y: (T, d).
    y[t] = sum_j weight[t, j] * MLP_{expert[t, j]}(x[t]) over kept assignments
           + shared(x[t]) * [sigmoid(x[t] @ shared_gate_w) if shared_gate_w is given].
    """
    x64 = _f64(x)
    logits = x @ router_w      # in the working dtype, as every framework computes router logits
    if router == "softmax_topk":
        r = softmax_topk(logits, k, renormalize)
    else:
        r = sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale)
    E = router_w.shape[1]
    plan = make_plan(r.experts, E, capacity)
    y = np.zeros_like(x64)
    for e in range(E):
        t, j = np.nonzero((r.experts == e) & (plan.slots >= 0))
        if t.size == 0:
            continue
        w1e = _f64(w1[e]).T if trans_w else _f64(w1[e])
        w2e = _f64(w2[e]).T if trans_w else _f64(w2[e])
        h = activate(x64[t] @ w1e, activation)
        y_e = _f64(h) @ w2e
        np.add.at(y, t, _f64(r.weights)[t, j][:, None] * y_e)
    if shared_w1 is not None:
        s = _f64(expert_mlp(x64, shared_w1, shared_w2, activation))
        if shared_gate_w is not None:
            s = s / (1.0 + np.exp(-(x64 @ _f64(shared_gate_w).reshape(-1, 1))))
        y += s
    return y.astype(x.dtype)


# --- grouped gemm backward

def grouped_gemm_backward(dy, a, w, offsets, trans_w=False):
    """dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], offsets: (E+1,)
    -> da (N, K), dw (E, K, M) [trans_w: (E, M, K)], the gradients of grouped_gemm:
    da[rows of e] = dy[rows] @ w[e].T, dw[e] = a[rows].T @ dy[rows] (zero for an empty expert),
    dw in w's layout."""
    da = np.zeros(a.shape, dtype=np.float64)
    dw = np.zeros(w.shape, dtype=np.float64)
    for e in range(w.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        we = _f64(w[e]).T if trans_w else _f64(w[e])          # (K, M)
        da[lo:hi] = _f64(dy[lo:hi]) @ we.T
        g = _f64(a[lo:hi]).T @ _f64(dy[lo:hi])                # (K, M)
        dw[e] = g.T if trans_w else g
    return da.astype(a.dtype), dw.astype(w.dtype)
