"""CPU routing kernels: softmax, top-k, softmax_topk, sigmoid_topk.

Rows are independent (the forward kernels prange over blocks of ROW_BLOCK rows, each with its
scratch rows; the backward kernels over rows), so results do not depend on the thread count.
Exponentials and sums run in float64 whatever the working dtype, so the float32 results are the
reference's up to its rounding and selections match it. Exponentials come from
kernels/cpu/fastmath.py (a few ulp in float64); the forward kernels write a row's exponentials
into a scratch row in one vectorized loop, then sum it in vector lanes.
"""
import numpy as np
from numba import njit, prange

from ..common import softmax_backward_row, topk_insert
from .config import LANES, ROW_BLOCK
from .fastmath import div, exp, sigmoid


@njit(parallel=True, cache=True, fastmath={"contract"})
def logits_kernel(x, w, out):
    # x (T, d), w (d, E) -> out (T, E) = x @ w for a few tokens: each logit is one FMA chain
    # over d in increasing order from 0, the bits of the grouped GEMM kernel's (backends/cpu.py:
    # router_logits); vectorized across the experts, which leaves every chain as it is
    u0, E = np.uint64(0), np.uint64(w.shape[1])
    for t in prange(x.shape[0]):
        o, xt = out[t], x[t]
        o[:] = 0.0
        for p in range(x.shape[1]):
            xv, wp = xt[p], w[p]
            for e in range(u0, E):
                o[e] += xv * wp[e]


@njit(cache=True)
def row_max(x):
    # x: (E,) -> float64 max
    m = -np.inf
    for e in range(x.shape[0]):
        m = max(m, np.float64(x[e]))
    return m


@njit(inline="always")
def _at(p, i, n):
    # p[i], or 0.0 past the end: adding it leaves a lane's bits as they are
    return p[i] if i < n else 0.0


@njit(cache=True)
def sum_lanes(p):
    # p: (E,) float64 -> float64 sum: p[e] goes to lane e % LANES in increasing e, the lanes
    # then add in a fixed tree. The order depends on no compiler choice, E or thread count,
    # and zeros appended to p leave the bits unchanged (surgery's add_experts relies on it).
    n = np.uint64(p.shape[0])
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for e in range(np.uint64(0), n, np.uint64(LANES)):
        s0 += p[e]
        s1 += _at(p, e + np.uint64(1), n)
        s2 += _at(p, e + np.uint64(2), n)
        s3 += _at(p, e + np.uint64(3), n)
        s4 += _at(p, e + np.uint64(4), n)
        s5 += _at(p, e + np.uint64(5), n)
        s6 += _at(p, e + np.uint64(6), n)
        s7 += _at(p, e + np.uint64(7), n)
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True)
def row_exp_sum(x, m, p):
    # x: (E,), m: float64 -> p: (E,) float64 = exp(x - m) (vectorized), returns sum(p)
    for e in range(np.uint64(0), np.uint64(p.shape[0])):
        p[e] = exp(np.float64(x[e]) - m)
    return sum_lanes(p)


@njit(cache=True)
def row_max_sumexp(x, t):
    # x: (T, E), row t -> (m, s): the row's max and sum_e exp(x[t, e] - m), in float64
    m = row_max(x[t])
    return m, row_exp_sum(x[t], m, np.empty(x.shape[1], np.float64))


@njit(parallel=True, cache=True)
def softmax_kernel(x, out):
    # x: (T, E) -> out: (T, E)
    T, E = x.shape
    for b in prange((T + ROW_BLOCK - 1) // ROW_BLOCK):
        p = np.empty(E, np.float64)
        for t in range(b * ROW_BLOCK, min(T, b * ROW_BLOCK + ROW_BLOCK)):
            m = row_max(x[t])
            s = row_exp_sum(x[t], m, p)
            o = out[t]
            for e in range(np.uint64(0), np.uint64(E)):
                o[e] = div(p[e], s)


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
    for b in prange((T + ROW_BLOCK - 1) // ROW_BLOCK):
        top = np.empty(k, np.float64)
        p = np.empty(E, np.float64)
        for t in range(b * ROW_BLOCK, min(T, b * ROW_BLOCK + ROW_BLOCK)):
            filled = 0
            for e in range(E):
                filled = topk_insert(top, experts[t], filled, k, np.float64(logits[t, e]), e)
            s = row_exp_sum(logits[t], top[0], p)   # top[0]: the row's max
            kept = 0.0
            for j in range(k):
                top[j] = p[experts[t, j]]
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
    for b in prange((T + ROW_BLOCK - 1) // ROW_BLOCK):
        sig = np.empty(E, np.float64)
        choice = np.empty(E, np.float64)
        gscore = np.empty(n_group, np.float64)
        best = np.empty(2, np.float64)
        bidx = np.empty(2, np.int32)
        gv = np.empty(topk_group, np.float64)
        gi = np.empty(topk_group, np.int32)
        keep = np.empty(n_group, np.bool_)
        top = np.empty(k, np.float64)
        for t in range(b * ROW_BLOCK, min(T, b * ROW_BLOCK + ROW_BLOCK)):
            x = logits[t]
            for e in range(np.uint64(0), np.uint64(E)):   # vectorized
                sig[e] = sigmoid(np.float64(x[e]))
                choice[e] = sig[e] + (np.float64(bias[e]) if has_bias else 0.0)
            if n_group > 1:
                for g in range(n_group):
                    filled = 0
                    for i in range(G):
                        filled = topk_insert(best, bidx, filled, 2, choice[g * G + i], i)
                    gscore[g] = best[0] + best[1] if filled == 2 else best[0]
                filled = 0
                for g in range(n_group):
                    filled = topk_insert(gv, gi, filled, topk_group, gscore[g], g)
                keep[:] = False
                for j in range(topk_group):
                    keep[gi[j]] = True
                for e in range(E):
                    if not keep[e // G]:
                        choice[e] = -np.inf
            filled = 0
            for e in range(E):
                filled = topk_insert(top, experts[t], filled, k, choice[e], e)
            total = 0.0
            for j in range(k):
                top[j] = sig[experts[t, j]]
                total += top[j]
            denom = total + 1e-20 if renormalize else 1.0
            for j in range(k):
                weights[t, j] = top[j] / denom * scale


# --------------------------------------------------------------------------- backward
# One row per iteration, sums in float64 in a fixed order. softmax's row is kernels/common.py's,
# shared with the CUDA kernel. softmax_topk's and sigmoid_topk's keep a row's k weights / scores
# in a scratch row, made with fastmath's exp and sigmoid; their CUDA kernels compute them again
# (a thread there has no array as long as any k) with math.exp: the same maths, other bits.

@njit(parallel=True, cache=True)
def softmax_backward_kernel(dy, y, dx):
    # dy: (T, E), y: (T, E) softmax output -> dx: (T, E) = y * (dy - sum(dy * y))
    for t in prange(y.shape[0]):
        softmax_backward_row(dy, y, dx, t)


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
                norm += exp(np.float64(logits[t, experts[t, j]]) - m)
        else:
            for e in range(E):
                m = max(m, np.float64(logits[t, e]))
            for e in range(E):
                norm += exp(np.float64(logits[t, e]) - m)
        dot = 0.0
        for j in range(k):
            w[j] = exp(np.float64(logits[t, experts[t, j]]) - m) / norm
            dot += np.float64(d_weights[t, j]) * w[j]
        for e in range(E):  # experts not chosen: 0, or -p[e] * dot without renormalize
            d_logits[t, e] = 0.0 if renormalize else -exp(
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
