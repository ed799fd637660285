"""CPU routing kernels: softmax, top-k, softmax_topk, sigmoid_topk.

One token (row) per loop iteration under prange; each row is independent, so results do not
depend on the thread count. Exponentials and sums run in float64 whatever the working dtype,
so the float32 results are the correctly-rounded ones and selections match the reference.
"""
import math

import numpy as np
from numba import njit, prange

from ..common import sigmoid, topk_insert


@njit(cache=True)
def row_max_sumexp(x, t):
    # x: (T, E), row t -> (m, s): the row's max and sum_e exp(x[t, e] - m), in float64
    m = -np.inf
    for e in range(x.shape[1]):
        m = max(m, np.float64(x[t, e]))
    s = 0.0
    for e in range(x.shape[1]):
        s += math.exp(np.float64(x[t, e]) - m)
    return m, s


@njit(parallel=True, cache=True)
def softmax_kernel(x, out):
    # x: (T, E) -> out: (T, E)
    T, E = x.shape
    for t in prange(T):
        m, s = row_max_sumexp(x, t)
        for e in range(E):
            out[t, e] = math.exp(np.float64(x[t, e]) - m) / s


@njit(parallel=True, cache=True)
def topk_kernel(x, k, vals, idx):
    # x: (T, E) -> vals: (T, k) descending, idx: (T, k) int32
    T, E = x.shape
    for t in prange(T):
        filled = 0
        for e in range(E):
            filled = topk_insert(vals[t], idx[t], filled, k, x[t, e], e)


@njit(parallel=True, cache=True)
def softmax_topk_kernel(logits, k, renormalize, weights, experts):
    # logits: (T, E) -> weights: (T, k), experts: (T, k) int32
    T, E = logits.shape
    for t in prange(T):
        top = np.empty(k, np.float64)
        filled = 0
        for e in range(E):
            filled = topk_insert(top, experts[t], filled, k, np.float64(logits[t, e]), e)
        m = top[0]
        s = 0.0
        for e in range(E):
            s += math.exp(np.float64(logits[t, e]) - m)
        kept = 0.0
        for j in range(k):
            top[j] = math.exp(top[j] - m)
            kept += top[j]
        norm = kept if renormalize else s
        for j in range(k):
            weights[t, j] = top[j] / norm


@njit(parallel=True, cache=True)
def sigmoid_topk_kernel(logits, k, bias, has_bias, n_group, topk_group, renormalize, scale,
                        weights, experts):
    # logits: (T, E), bias: (E,) -> weights: (T, k), experts: (T, k) int32
    T, E = logits.shape
    G = E // n_group
    for t in prange(T):
        choice = np.empty(E, np.float64)
        for e in range(E):
            choice[e] = sigmoid(np.float64(logits[t, e]))
            if has_bias:
                choice[e] += np.float64(bias[e])
        if n_group > 1:
            gscore = np.empty(n_group, np.float64)
            best = np.empty(2, np.float64)
            bidx = np.empty(2, np.int32)
            for g in range(n_group):
                filled = 0
                for i in range(G):
                    filled = topk_insert(best, bidx, filled, 2, choice[g * G + i], i)
                gscore[g] = best[0] + best[1] if filled == 2 else best[0]
            gv = np.empty(topk_group, np.float64)
            gi = np.empty(topk_group, np.int32)
            filled = 0
            for g in range(n_group):
                filled = topk_insert(gv, gi, filled, topk_group, gscore[g], g)
            keep = np.zeros(n_group, np.bool_)
            for j in range(topk_group):
                keep[gi[j]] = True
            for e in range(E):
                if not keep[e // G]:
                    choice[e] = -np.inf
        top = np.empty(k, np.float64)
        filled = 0
        for e in range(E):
            filled = topk_insert(top, experts[t], filled, k, choice[e], e)
        total = 0.0
        for j in range(k):
            top[j] = sigmoid(np.float64(logits[t, experts[t, j]]))
            total += top[j]
        denom = total + 1e-20 if renormalize else 1.0
        for j in range(k):
            weights[t, j] = top[j] / denom * scale


# --------------------------------------------------------------------------- backward
# Same one-row-per-iteration structure; sums run in float64 in a fixed order.


@njit(parallel=True, cache=True)
def softmax_backward_kernel(dy, y, dx):
    # dy: (T, E), y: (T, E) softmax output -> dx: (T, E) = y * (dy - sum(dy * y))
    T, E = y.shape
    for t in prange(T):
        dot = 0.0
        for e in range(E):
            dot += np.float64(dy[t, e]) * np.float64(y[t, e])
        for e in range(E):
            dx[t, e] = np.float64(y[t, e]) * (np.float64(dy[t, e]) - dot)


@njit(parallel=True, cache=True)
def softmax_topk_backward_kernel(d_weights, logits, experts, renormalize, d_logits):
    # d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E)
    # renormalize: w = softmax over the k chosen logits -> d l[e_j] = w_j (dw_j - dot),
    #              dot = sum_i dw_i w_i, and 0 elsewhere
    # otherwise:   w_j = p[e_j] (softmax over E)     -> d l = p * (g - dot),
    #              g the d_weights scattered to their experts
    T, E = logits.shape
    k = experts.shape[1]
    for t in prange(T):
        w = np.empty(k, np.float64)
        m = -np.inf
        for j in range(k):
            m = max(m, np.float64(logits[t, experts[t, j]]))
        norm = 0.0
        if renormalize:
            for j in range(k):
                norm += math.exp(np.float64(logits[t, experts[t, j]]) - m)
        else:
            for e in range(E):
                m = max(m, np.float64(logits[t, e]))
            for e in range(E):
                norm += math.exp(np.float64(logits[t, e]) - m)
        dot = 0.0
        for j in range(k):
            w[j] = math.exp(np.float64(logits[t, experts[t, j]]) - m) / norm
            dot += np.float64(d_weights[t, j]) * w[j]
        for e in range(E):  # experts not chosen: 0, or -p[e] * dot without renormalize
            d_logits[t, e] = 0.0 if renormalize else -math.exp(
                np.float64(logits[t, e]) - m) / norm * dot
        for j in range(k):  # chosen: w_j * (dw_j - dot) either way (p[e_j] = w_j without)
            d_logits[t, experts[t, j]] = w[j] * (np.float64(d_weights[t, j]) - dot)


@njit(parallel=True, cache=True)
def sigmoid_topk_backward_kernel(d_weights, logits, experts, renormalize, scale, d_logits):
    # d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E), zero off the k.
    # w_j = scale * s_j / D, s = sigmoid(logits[e_j]), D = sum_i s_i + 1e-20 (or 1):
    # d s_j = scale / D * (dw_j - sum_i dw_i s_i / D), d l[e_j] = d s_j * s_j * (1 - s_j)
    T, E = logits.shape
    k = experts.shape[1]
    for t in prange(T):
        s = np.empty(k, np.float64)
        total = 0.0
        for j in range(k):
            s[j] = sigmoid(np.float64(logits[t, experts[t, j]]))
            total += s[j]
        denom = total + 1e-20 if renormalize else 1.0
        dot = 0.0
        if renormalize:
            for j in range(k):
                dot += np.float64(d_weights[t, j]) * s[j]
            dot /= denom
        for e in range(E):
            d_logits[t, e] = 0.0
        for j in range(k):
            ds = scale / denom * (np.float64(d_weights[t, j]) - dot)
            d_logits[t, experts[t, j]] = ds * s[j] * (1.0 - s[j])
