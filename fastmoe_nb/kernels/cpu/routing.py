"""CPU routing kernels: softmax, top-k, softmax_topk, sigmoid_topk.

One token (row) per loop iteration under prange; each row is independent, so results do not
depend on the thread count. Exponentials and sums run in float64 whatever the working dtype,
so the float32 results are the correctly-rounded ones and selections match the reference.
"""
import math

import numpy as np
from numba import njit, prange

from ..common import sigmoid, topk_insert


@njit(parallel=True, cache=True)
def softmax_kernel(x, out):
    # x: (T, E) -> out: (T, E)
    T, E = x.shape
    for t in prange(T):
        m = -np.inf
        for e in range(E):
            m = max(m, np.float64(x[t, e]))
        s = 0.0
        for e in range(E):
            s += math.exp(np.float64(x[t, e]) - m)
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
