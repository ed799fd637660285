"""CPU kernels of the routers of fastmoe_nb.routing and their balancing losses.

- expert_choice_kernel: each expert takes its C best tokens.
- noisy_topk_kernel / noisy_topk_backward_kernel: Shazeer et al. 2017, with the smooth load.
- balance_sums_kernel, balance_backward_kernel, z_loss_kernel, z_loss_backward_kernel,
  seq_balance_kernel, seq_balance_backward_kernel: the losses.

Sums over tokens run in token order in one thread (deterministic for any thread count); rows are
independent under prange. Exponentials and sums run in float64 whatever the working dtype.
"""
import math

import numpy as np
from numba import njit, prange

from ..common import sigmoid, topk_insert
from .config import TOKEN_BLOCK
from .routing import row_exp_sum, row_max, row_max_sumexp

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(parallel=True, cache=True)
def expert_choice_kernel(probs, capacity, chosen):
    # probs: (T, E) -> chosen: (T, E) bool, column e True at its `capacity` best tokens
    # (equal scores: lower token first). A small capacity keeps a running top-C list
    # (O(T + C^2 log(T/C)) on average); a large one sorts the column (stable).
    T, E = probs.shape
    for e in prange(E):
        for t in range(T):
            chosen[t, e] = False
        if capacity == 0:
            continue
        if capacity * 16 <= T:
            vals = np.empty(capacity, np.float64)
            idx = np.empty(capacity, np.int32)
            filled = 0
            for t in range(T):
                filled = topk_insert(vals, idx, filled, capacity, np.float64(probs[t, e]), t)
            for c in range(capacity):
                chosen[idx[c], e] = True
        else:
            col = np.empty(T, np.float64)
            for t in range(T):
                col[t] = -np.float64(probs[t, e])
            best = np.argsort(col, kind="mergesort")
            for c in range(capacity):
                chosen[best[c], e] = True


# --------------------------------------------------------------------------- noisy top-k

@njit(cache=True)
def _phi_cdf(z):
    return 0.5 * (1.0 + math.erf(z * _INV_SQRT_2))


@njit(cache=True)
def _noisy_row(clean, raw, noise, t, k, eps, train, h, sigma, vals, idx):
    # one token: h (E,) noisy logits, sigma (E,) noise scales, vals/idx (k+1,) the k+1 best
    E = clean.shape[1]
    for e in range(E):
        sigma[e] = 0.0
        h[e] = np.float64(clean[t, e])
        if train:
            r = np.float64(raw[t, e])
            sp = r + math.log1p(math.exp(-r)) if r > 0 else math.log1p(math.exp(r))
            sigma[e] = sp + eps
            h[e] += np.float64(noise[t, e]) * sigma[e]
    m = min(k + 1, E)
    filled = 0
    for e in range(E):
        filled = topk_insert(vals, idx, filled, m, h[e], e)


@njit(parallel=True, cache=True)
def noisy_topk_kernel(clean, raw, noise, k, eps, train, weights, experts, prob):
    # clean, raw, noise: (T, E) -> weights (T, k) = softmax of the k best noisy logits,
    # experts (T, k) int32, prob (T, E) = P(expert in the top k) (train and k < E only)
    T, E = clean.shape
    smooth = train and k < E
    for t in prange(T):
        h = np.empty(E, np.float64)
        sigma = np.empty(E, np.float64)
        vals = np.empty(k + 1, np.float64)
        idx = np.empty(k + 1, np.int32)
        _noisy_row(clean, raw, noise, t, k, eps, train, h, sigma, vals, idx)
        s = 0.0
        for j in range(k):
            s += math.exp(vals[j] - vals[0])
        for j in range(k):
            weights[t, j] = math.exp(vals[j] - vals[0]) / s
            experts[t, j] = idx[j]
        if smooth:
            for e in range(E):  # the threshold e must beat: the k-th best of the others
                thr = vals[k] if h[e] > vals[k] else vals[k - 1]
                prob[t, e] = _phi_cdf((np.float64(clean[t, e]) - thr) / sigma[e])


@njit(parallel=True, cache=True)
def noisy_topk_backward_kernel(d_weights, d_load, clean, raw, noise, k, eps, train,
                               d_clean, d_raw):
    # d_weights: (T, k), d_load: (E,), clean, raw, noise: (T, E) -> d_clean, d_raw: (T, E)
    # h = clean + noise * sigma, sigma = softplus(raw) + eps (train); weights = softmax of the
    # k best h; load[e] = sum_t Phi((clean[t, e] - h[t, m]) / sigma[t, e]), m the threshold
    T, E = clean.shape
    smooth = train and k < E
    for t in prange(T):
        h = np.empty(E, np.float64)
        sigma = np.empty(E, np.float64)
        vals = np.empty(k + 1, np.float64)
        idx = np.empty(k + 1, np.int32)
        _noisy_row(clean, raw, noise, t, k, eps, train, h, sigma, vals, idx)
        dh = np.zeros(E, np.float64)
        dsig = np.zeros(E, np.float64)
        dc = np.zeros(E, np.float64)
        w = np.empty(k, np.float64)
        s = 0.0
        for j in range(k):
            w[j] = math.exp(vals[j] - vals[0])
            s += w[j]
        dot = 0.0
        for j in range(k):
            w[j] /= s
            dot += np.float64(d_weights[t, j]) * w[j]
        for j in range(k):
            dh[idx[j]] += w[j] * (np.float64(d_weights[t, j]) - dot)
        if smooth:
            for e in range(E):
                m = idx[k] if h[e] > vals[k] else idx[k - 1]
                z = (np.float64(clean[t, e]) - h[m]) / sigma[e]
                g = np.float64(d_load[e]) * math.exp(-0.5 * z * z) * _INV_SQRT_2PI / sigma[e]
                dc[e] += g
                dh[m] -= g
                dsig[e] -= g * z
        for e in range(E):
            d_clean[t, e] = dc[e] + dh[e]
            if train:
                r = np.float64(raw[t, e])
                d_raw[t, e] = (dsig[e] + dh[e] * np.float64(noise[t, e])) * sigmoid(r)
            else:
                d_raw[t, e] = 0.0


# --------------------------------------------------------------------------- losses



@njit(parallel=True, cache=True)
def balance_sums_kernel(logits, experts, use, mask, has_mask):
    # logits: (T, E), experts: (T, k), mask: (T,) -> (psum (E,), count (E,), total) float64:
    # psum[e] = sum_t m_t softmax(logits[t])[e], count[e] = sum_t m_t #{j < use: experts[t,j]=e}
    # Blocks of TOKEN_BLOCK tokens are summed in parallel, then the blocks in order.
    T, E = logits.shape
    nb = (T + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    part = np.zeros((nb, E), np.float64)
    cpart = np.zeros((nb, E), np.float64)
    tpart = np.zeros(nb, np.float64)
    for b in prange(nb):
        p = np.empty(E, np.float64)
        for t in range(b * TOKEN_BLOCK, min(T, (b + 1) * TOKEN_BLOCK)):
            mt = np.float64(mask[t]) if has_mask else 1.0
            if mt == 0.0:
                continue
            tpart[b] += mt
            s = row_exp_sum(logits[t], row_max(logits[t]), p)
            for e in range(E):
                part[b, e] += mt * p[e] / s
            for j in range(use):
                cpart[b, experts[t, j]] += mt
    psum = np.zeros(E, np.float64)
    count = np.zeros(E, np.float64)
    total = 0.0
    for b in range(nb):
        total += tpart[b]
        for e in range(E):
            psum[e] += part[b, e]
            count[e] += cpart[b, e]
    return psum, count, total


@njit(parallel=True, cache=True)
def balance_backward_kernel(logits, g, mask, has_mask, d_logits):
    # logits: (T, E), g: (E,) = dL/dp[t, e] for a unit mask -> d_logits: (T, E)
    # d_logits[t] = m_t * p_t * (g - <g, p_t>)  (softmax backward, row by row)
    T, E = logits.shape
    for t in prange(T):
        mt = np.float64(mask[t]) if has_mask else 1.0
        p = np.empty(E, np.float64)
        s = row_exp_sum(logits[t], row_max(logits[t]), p)
        dot = 0.0
        for e in range(E):
            p[e] /= s
            dot += g[e] * p[e]
        for e in range(E):
            d_logits[t, e] = mt * p[e] * (g[e] - dot)


@njit(parallel=True, cache=True)
def logsumexp_kernel(logits, out):
    # logits: (T, E) -> out: (T,) float64 log sum_e exp(logits[t, e])
    for t in prange(logits.shape[0]):
        m, s = row_max_sumexp(logits, t)
        out[t] = m + math.log(s)


@njit(parallel=True, cache=True)
def z_loss_backward_kernel(logits, scale, mask, has_mask, d_logits):
    # logits: (T, E) -> d_logits[t] = scale * m_t * 2 lse_t * softmax(logits[t]),
    # lse_t = logsumexp(logits[t]); one exp per element
    T, E = logits.shape
    for t in prange(T):
        p = np.empty(E, np.float64)
        m = row_max(logits[t])
        s = row_exp_sum(logits[t], m, p)
        lse_s = (m + math.log(s)) / s
        c = scale * 2.0 * (np.float64(mask[t]) if has_mask else 1.0)
        for e in range(E):   # lse first: 2 lse alone may overflow where p[e] = 0 (inf * 0)
            d_logits[t, e] = (lse_s * p[e]) * c


@njit(cache=True)
def seq_balance_kernel(logits, experts, seq_len):
    # logits: (T, E), experts: (T, k), T = B * seq_len -> (f (B, E), P (B, E)) float64 with
    # f[b, e] = E / (k S) #{t in b, j: experts[t, j] = e}, P[b, e] = mean_t s'[t, e],
    # s' = sigmoid(logits) / sum_e sigmoid(logits)
    T, E = logits.shape
    k = experts.shape[1]
    B = T // seq_len
    f = np.zeros((B, E), np.float64)
    P = np.zeros((B, E), np.float64)
    s = np.empty(E, np.float64)
    for t in range(T):  # token order: deterministic
        b = t // seq_len
        tot = 0.0
        for e in range(E):
            s[e] = sigmoid(np.float64(logits[t, e]))
            tot += s[e]
        for e in range(E):
            P[b, e] += s[e] / tot / seq_len
        for j in range(k):
            f[b, experts[t, j]] += E / (k * seq_len)
    return f, P


@njit(parallel=True, cache=True)
def seq_balance_backward_kernel(logits, g, seq_len, d_logits):
    # logits: (T, E), g: (B, E) = dL/dP -> d_logits: (T, E) through s' = s / sum s, s = sigmoid
    T, E = logits.shape
    for t in prange(T):
        b = t // seq_len
        s = np.empty(E, np.float64)
        tot = 0.0
        for e in range(E):
            s[e] = sigmoid(np.float64(logits[t, e]))
            tot += s[e]
        dot = 0.0
        for e in range(E):
            dot += g[b, e] * s[e]
        dot /= tot * tot
        for e in range(E):  # d s'_e/d s_i = (delta - s'_e) / tot
            ds = (g[b, e] / tot - dot) / seq_len
            d_logits[t, e] = ds * s[e] * (1.0 - s[e])
