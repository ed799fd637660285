"""The routers' specification: plain NumPy, float64 arithmetic, slow and obvious.

Same names and arguments as fastmoe_nb.routing; results are cast back to the logits' dtype.
Tests check the kernels against these functions; when they disagree, this file is right.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from .. import reference as ref
from ..types import Plan, Routing


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _softmax64(x):
    x = _f64(x)
    if x.shape[-1] == 0 or x.size == 0:
        return x.copy()
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- capacity

def expert_capacity(num_tokens, num_experts, capacity_factor=1.0, k=1, min_capacity=4):
    """max(ceil((T / E) * (capacity_factor * k)), min_capacity), float64 (DeepSpeed's order)."""
    return max(int(math.ceil((num_tokens / num_experts) * (capacity_factor * k))), min_capacity)


def capacity_plan(experts, num_experts, capacity=None, order=None, skip=None):
    """Assignments claim capacity one by one in `order` (default: flat id order); skipped ones
    never claim; rows sorted by expert, then flat id."""
    T, k = experts.shape
    flat = np.asarray(experts, np.int64).reshape(-1)
    n = flat.size
    order = np.arange(n) if order is None else np.asarray(order)
    skip = np.zeros(n, bool) if skip is None else np.asarray(skip, bool).reshape(-1)
    used = [0] * num_experts
    keep = np.zeros(n, bool)
    for i in order:
        e = flat[i]
        if not skip[i] and (capacity is None or used[e] < capacity):
            keep[i] = True
            used[e] += 1
    rows = [i for e in range(num_experts) for i in range(n) if flat[i] == e and keep[i]]
    rows = np.array(rows, dtype=np.int32)
    counts = np.bincount(flat[keep], minlength=num_experts).astype(np.int64)
    wanted = np.bincount(flat, minlength=num_experts).astype(np.int64)
    slots = np.full(n, -1, np.int32)
    slots[rows] = np.arange(rows.size, dtype=np.int32)
    return Plan(rows=rows, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                counts=counts, slots=slots.reshape(T, k), dropped=wanted - counts,
                capacity=capacity)


def _cap(T, E, k, capacity, capacity_factor, min_capacity):
    if capacity is not None:
        return capacity
    if capacity_factor is None:
        return None
    return expert_capacity(T, E, capacity_factor, k, min_capacity)


def _priority(score, k, priority):
    """All choices j = 0 first, then j = 1, ...; tokens by position or descending score."""
    T = len(score)
    tokens = list(range(T)) if priority == "position" else sorted(
        range(T), key=lambda t: (-float(score[t]), t))
    return [t * k + j for j in range(k) for t in tokens]


# --------------------------------------------------------------------------- routers

def switch_top1(logits, capacity=None, capacity_factor=1.0, min_capacity=4,
                priority="position"):
    """Top-1 by logit (lower index on ties); gate = softmax probability of that expert."""
    T, E = logits.shape
    r = ref.softmax_topk(logits, 1, renormalize=False)
    cap = _cap(T, E, 1, capacity, capacity_factor, min_capacity)
    order = _priority(r.weights[:, 0], 1, priority)
    return r, capacity_plan(r.experts, E, cap, order)


def gshard_top2(logits, capacity=None, capacity_factor=1.0, min_capacity=4,
                priority="position", random_routing=False, seed=None):
    """Top-2, gates p_j / (p_1 + p_2); first choices claim capacity before second choices;
    random routing keeps the second iff u_t < 2 * g2 with u = default_rng(seed).random(T)."""
    T, E = logits.shape
    r = ref.softmax_topk(logits, 2, renormalize=True)
    cap = _cap(T, E, 2, capacity, capacity_factor, min_capacity)
    order = _priority(ref.softmax(logits).max(axis=1) if T else np.zeros(0), 2, priority)
    skip = np.zeros((T, 2), bool)
    if random_routing:
        u = np.random.default_rng(seed).random(T)
        for t in range(T):
            skip[t, 1] = not (u[t] < 2.0 * float(r.weights[t, 1]))
    return r, capacity_plan(r.experts, E, cap, order, skip)


def expert_choice(logits, capacity=None, capacity_factor=1.0, min_capacity=4):
    """Each expert takes its C best tokens by softmax score (in the logits' dtype)."""
    T, E = logits.shape
    cap = _cap(T, E, 1, capacity, capacity_factor, min_capacity)
    C = T if cap is None else min(cap, T)
    probs = ref.softmax(logits)
    chosen = np.zeros((T, E), bool)
    for e in range(E):
        best = sorted(range(T), key=lambda t: (-float(probs[t, e]), t))[:C]
        chosen[best, e] = True
    experts = np.tile(np.arange(E, dtype=np.int32), (T, 1))
    plan = capacity_plan(experts, E, None, None, ~chosen)
    return Routing(np.where(chosen, probs, 0).astype(logits.dtype), experts), plan._replace(
        capacity=C)


def dense_gating(logits):
    T, E = logits.shape
    return Routing(ref.softmax(logits), np.tile(np.arange(E, dtype=np.int32), (T, 1)))


def hash_routing(token_ids, table, num_experts, dtype=np.float32):
    tab = np.asarray(table).reshape(len(table), -1)
    k = tab.shape[1]
    return Routing(np.full((len(token_ids), k), 1.0 / k, dtype),
                   tab[np.asarray(token_ids, np.int64)].astype(np.int32))


def _noisy_parts(clean, raw, noise, train, eps):
    c = _f64(clean)
    if not train:
        return c, c, np.zeros_like(c)
    r = _f64(raw)
    sigma = np.logaddexp(0.0, r) + eps             # softplus + eps
    return c, c + _f64(noise) * sigma, sigma


def noisy_topk(clean_logits, noise_logits, k, train=True, seed=None, noise=None,
               noise_epsilon=1e-2):
    """Gates: softmax of the k best noisy logits. Load: sum over tokens of
    Phi((clean - thr) / sigma), thr the (k+1)-th best noisy logit if the expert is in the top k,
    else the k-th (train and k < E); the assignment counts otherwise."""
    T, E = clean_logits.shape
    if train and noise is None:
        noise = np.random.default_rng(seed).standard_normal((T, E)).astype(clean_logits.dtype)
    c, h, sigma = _noisy_parts(clean_logits, noise_logits, noise, train, noise_epsilon)
    _, idx = ref.topk(h, min(k + 1, E))
    top = np.take_along_axis(h, idx.astype(np.int64), axis=1)
    w = _softmax64(top[:, :k])
    if train and k < E:
        thr = np.where(h > top[:, k:k + 1], top[:, k:k + 1], top[:, k - 1:k])
        z = (c - thr) / sigma
        load = (0.5 * (1.0 + erf(z / np.sqrt(2.0)))).sum(axis=0)
    else:
        load = np.bincount(idx[:, :k].reshape(-1), minlength=E).astype(np.float64)
    dt = clean_logits.dtype
    return Routing(w.astype(dt), idx[:, :k].copy()), load.astype(dt)


def cv_squared(x):
    x = _f64(x)
    n = x.size + 1e-10
    mean = x.sum() / n
    return float(((x - mean) ** 2).sum() / n / (mean ** 2 + 1e-10))


def expert_importance(weights, experts, num_experts):
    imp = np.zeros(num_experts)
    for t in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            imp[experts[t, j]] += float(weights[t, j])
    return imp.astype(weights.dtype)


def noisy_topk_loss(routing, load, num_experts, importance_weight=1.0, load_weight=1.0):
    imp = expert_importance(routing.weights, routing.experts, num_experts)
    return importance_weight * cv_squared(imp) + load_weight * cv_squared(load)


def soft_moe_weights(logits, seq_len=None):
    """dispatch: softmax over each sequence's tokens; combine: softmax over slots."""
    T, S = logits.shape
    m = T if seq_len is None else seq_len
    x = _f64(logits)
    dispatch = np.empty_like(x)
    for b in range(T // m if m else 0):
        dispatch[b * m:(b + 1) * m] = _softmax64(x[b * m:(b + 1) * m].T).T
    return dispatch.astype(logits.dtype), _softmax64(x).astype(logits.dtype)


def soft_moe(x, phi, w1, w2, slots_per_expert=1, activation="gelu", seq_len=None,
             trans_w=False):
    """Per sequence: slot inputs D^T x, expert e on its p slots, output C @ slot outputs."""
    T, d = x.shape
    E, p = w1.shape[0], slots_per_expert
    m = T if seq_len is None else seq_len
    x64 = _f64(x)
    logits = x64 @ _f64(phi)
    y = np.zeros((T, d))
    for b in range(T // m if m else 0):
        xb = x64[b * m:(b + 1) * m]
        lb = logits[b * m:(b + 1) * m]
        D = _softmax64(lb.T).T
        C = _softmax64(lb)
        xs = D.T @ xb
        ys = np.empty_like(xs)
        for s in range(E * p):
            e = s // p
            w1e = _f64(w1[e]).T if trans_w else _f64(w1[e])
            w2e = _f64(w2[e]).T if trans_w else _f64(w2[e])
            ys[s] = ref.activate(xs[s:s + 1] @ w1e, activation)[0] @ w2e
        y[b * m:(b + 1) * m] = C @ ys
    return y.astype(x.dtype)


# --------------------------------------------------------------------------- losses

def load_balancing_loss(logits, experts, normalization="mixtral", mask=None):
    """c * sum_e f_e P_e over unmasked tokens; f counts experts[:, 0] ("switch", "gshard") or
    all k; c = E ("switch", "gshard", "mixtral") or E / k ("megablocks"); "deepspeed":
    E^2 / k * mean_e(f_e P_e)."""
    T, E = logits.shape
    k = experts.shape[1]
    m = np.ones(T) if mask is None else _f64(mask)
    M = m.sum()
    if M == 0:
        return 0.0
    P = (_softmax64(logits) * m[:, None]).sum(axis=0) / M
    use = 1 if normalization in ("switch", "gshard") else k
    f = np.zeros(E)
    for t in range(T):
        for j in range(use):
            f[experts[t, j]] += m[t]
    f /= M
    if normalization == "deepspeed":
        return float(E * E / k * np.mean(f * P))
    c = E / k if normalization == "megablocks" else E
    return float(c * np.sum(f * P))


def load_balancing_loss_backward(d_loss, logits, experts, normalization="mixtral", mask=None):
    T, E = logits.shape
    k = experts.shape[1]
    m = np.ones(T) if mask is None else _f64(mask)
    M = m.sum()
    if M == 0:
        return np.zeros_like(logits)
    p = _softmax64(logits)
    use = 1 if normalization in ("switch", "gshard") else k
    f = np.zeros(E)
    for t in range(T):
        for j in range(use):
            f[experts[t, j]] += m[t]
    f /= M
    c = E if normalization in ("switch", "gshard", "mixtral") else E / k
    g = d_loss * c * f / M                                 # dL/dp[t, e] for m_t = 1
    d = m[:, None] * p * (g[None, :] - (p * g).sum(axis=1, keepdims=True))
    return d.astype(logits.dtype)


def z_loss(logits, mask=None):
    """mean over unmasked tokens of logsumexp(logits[t])^2."""
    T = logits.shape[0]
    m = np.ones(T) if mask is None else _f64(mask)
    if m.sum() == 0:
        return 0.0
    x = _f64(logits)
    mx = x.max(axis=1)
    lse = mx + np.log(np.exp(x - mx[:, None]).sum(axis=1))
    return float((lse ** 2 * m).sum() / m.sum())


def sequence_balance_loss(logits, experts, seq_len=None):
    """DeepSeek-V3: mean over sequences of sum_e f_e P_e, f_e = E/(k S) * count, P = mean s'."""
    T, E = logits.shape
    k = experts.shape[1]
    S = T if seq_len is None else seq_len
    if T == 0:
        return 0.0
    s = 1.0 / (1.0 + np.exp(-_f64(logits)))
    s = s / s.sum(axis=1, keepdims=True)
    total = 0.0
    B = T // S
    for b in range(B):
        f = np.bincount(np.asarray(experts[b * S:(b + 1) * S]).reshape(-1),
                        minlength=E) * E / (k * S)
        P = s[b * S:(b + 1) * S].mean(axis=0)
        total += float((f * P).sum())
    return total / B


def update_bias(bias, load, gamma=1e-3):
    lf = _f64(load)
    return (_f64(bias) + gamma * np.sign(lf.mean() - lf)).astype(bias.dtype)
