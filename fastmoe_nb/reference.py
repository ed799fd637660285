"""The specification: every public op in plain NumPy, slow and obvious.

Same names and arguments as the fast ops. Arithmetic is done in float64 and results are cast
back to the input's dtype, so a float64 call is exact to rounding and a float32 call is the
correctly-rounded answer the kernels are compared with. Tests and the benchmarks check the
kernels against these functions; when a kernel and this file disagree, this file is right.
"""
from __future__ import annotations

import numpy as np
from scipy.special import erfc as _erfc
from scipy.special import expit as _sigmoid

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


def router_logits(x, router_w, router_b=None):
    """x: (T, d), router_w: (d, E), router_b: (E,) or None -> (T, E) = x @ router_w [+ router_b]
    in the working dtype, as the library computes them (fastmoe_nb.ops.routing.router_logits:
    one FMA chain per logit over d in order), so that the reference routes near-ties the same
    way; tests check those logits against a float64 x @ router_w on their own."""
    from .ops.routing import router_logits as logits_of   # noqa: PLC0415 (lazily: no cycle)
    return logits_of(x, router_w, router_b)


def _route(x, router_w, k, router, renormalize, bias, n_group, topk_group, scale, capacity,
           router_b=None):
    """The layer's routing and plan -> (logits, Routing, Plan)."""
    logits = router_logits(x, router_w, router_b)
    if router == "softmax_topk":
        r = softmax_topk(logits, k, renormalize)
    else:
        r = sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale)
    return logits, r, make_plan(r.experts, router_w.shape[1], capacity)


def moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0,
                capacity=None, trans_w=False, shared_w1=None, shared_w2=None,
                shared_gate_w=None, router_b=None):
    """The whole layer, written per expert without plan/permute/combine.

    x: (T, d), router_w: (d, E), w1: (E, d, h|2h) [trans_w: (E, h|2h, d)],
    w2: (E, h, d) [trans_w: (E, d, h)], router_b: (E,) or None (logits x @ router_w +
    router_b) -> y: (T, d).
    y[t] = sum_j weight[t, j] * MLP_{expert[t, j]}(x[t]) over kept assignments
           + shared(x[t]) * [sigmoid(x[t] @ shared_gate_w) if shared_gate_w is given].
    """
    x64 = _f64(x)
    _, r, plan = _route(x, router_w, k, router, renormalize, bias, n_group, topk_group, scale,
                        capacity, router_b)
    E = router_w.shape[1]
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


def shared_backward(ds, x, w1, w2, gate_w, activation):
    """The shared expert s = act(x @ w1) @ w2 [* sigmoid(x @ gate_w)].
    ds: (T, d), x: (T, d), w1: (d, hs|2hs), w2: (hs, d), gate_w: (d,) / (d, 1) or None
    -> (dx (T, d), dw1, dw2, dgate_w in gate_w's shape or None)."""
    x64, w1_, w2_, g = _f64(x), _f64(w1), _f64(w2), _f64(ds)
    dgate = None
    dx = np.zeros_like(x64)
    if gate_w is not None:
        gw = _f64(gate_w).reshape(-1, 1)
        sig = 1.0 / (1.0 + np.exp(-(x64 @ gw)))                        # (T, 1)
        s0 = activate(x64 @ w1_, activation) @ w2_
        dz = (g * s0).sum(axis=1, keepdims=True) * sig * (1.0 - sig)   # (T, 1)
        dgate = (x64.T @ dz).reshape(np.shape(gate_w)).astype(x.dtype)
        dx += dz @ gw.T
        g = g * sig
    dxm, dw1, dw2 = _mlp_backward(g, x64, w1_, w2_, activation)
    return (dx + dxm).astype(x.dtype), dw1.astype(x.dtype), dw2.astype(x.dtype), dgate


def moe_backward(dy, x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                 renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0,
                 capacity=None, trans_w=False, shared_w1=None, shared_w2=None,
                 shared_gate_w=None, router_b=None):
    """The gradients of moe_forward (same arguments, dy: (T, d) first), written per expert.
    -> (dx (T, d), grads) with grads "router_w", "w1", "w2" in the forward's layouts, plus
    "router_b" (sum over tokens of d logits), "shared_w1", "shared_w2" and "shared_gate_w"
    when given. The sigmoid router's choice bias gets none."""
    x64, dy64 = _f64(x), _f64(dy)
    logits, r, plan = _route(x, router_w, k, router, renormalize, bias, n_group, topk_group,
                             scale, capacity, router_b)
    E = router_w.shape[1]
    dx = np.zeros_like(x64)
    dw1, dw2 = np.zeros(w1.shape), np.zeros(w2.shape)
    d_weights = np.zeros(r.weights.shape)
    for e in range(E):
        t, j = np.nonzero((r.experts == e) & (plan.slots >= 0))
        w1e = _f64(w1[e]).T if trans_w else _f64(w1[e])               # (d, H1)
        w2e = _f64(w2[e]).T if trans_w else _f64(w2[e])               # (h, d)
        h_pre = x64[t] @ w1e
        a = activate(h_pre, activation)
        d_weights[t, j] = (dy64[t] * (a @ w2e)).sum(axis=1)
        d_ye = _f64(r.weights)[t, j][:, None] * dy64[t]
        dxe, g1, g2 = _mlp_backward(d_ye, x64[t], w1e, w2e, activation)
        np.add.at(dx, t, dxe)
        dw1[e] = g1.T if trans_w else g1
        dw2[e] = g2.T if trans_w else g2
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
        dxs, dw1s, dw2s, dgate = shared_backward(dy64, x64, shared_w1, shared_w2,
                                                 shared_gate_w, activation)
        grads["shared_w1"], grads["shared_w2"] = dw1s.astype(dt), dw2s.astype(dt)
        dx += dxs
        if dgate is not None:
            grads["shared_gate_w"] = dgate.astype(dt)
    return dx.astype(dt), grads
