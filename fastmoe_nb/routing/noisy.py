"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks"), as in its
authors' tensor2tensor code.

Training: h = clean + n * sigma with n ~ N(0, 1) and sigma = softplus(noise_logits) + eps, the
noise scale trainable through noise_logits (= x @ W_noise); the gates are the softmax of the k
best h. The smooth load of expert e is sum_t Phi((clean[t, e] - thr) / sigma[t, e]), Phi the
normal CDF and thr the k-th best noisy logit among the other experts (the (k+1)-th best if e
is in the top k, else the k-th): the probability that e stays in the top k when its own noise
is redrawn. The balancing loss is cv^2(importance) + cv^2(load), importance the sum of gates.
Evaluation (train=False): no noise; load is the count of assignments (no gradient), also when
k = E.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..kernels.cpu import routers as kr
from ..types import Routing
from . import _checks


def _inputs(clean_logits, noise_logits, k, train, seed, noise, noise_epsilon, check_finite):
    clean = _checks.scores("clean_logits", clean_logits, check_finite)
    T, E = clean.shape
    k = chk.check_int("k", k, 1, E, what=f"1..E = 1..{E}")
    eps = chk.check_real("noise_epsilon", noise_epsilon)
    if eps < 0:
        raise ValueError(f"noise_epsilon: expected a non-negative number, got {eps}")
    seed = _checks.seed_value(seed)
    train = bool(train)
    if not train:
        dummy = np.zeros((1, 1), clean.dtype)
        return clean, dummy, dummy, k, eps, train
    if noise_logits is None:
        raise ValueError("noise_logits: required in training (train=True): the (T, E) "
                         "pre-softplus noise scales x @ W_noise")
    raw = chk.check_float("noise_logits", _checks.host("noise_logits", noise_logits),
                          shape=clean.shape, dtype=clean.dtype)
    if check_finite:
        chk.check_finite("noise_logits", raw)
    if noise is None:
        noise = np.random.default_rng(seed).standard_normal((T, E)).astype(clean.dtype)
    else:
        noise = chk.check_float("noise", _checks.host("noise", noise), shape=clean.shape,
                                dtype=clean.dtype)
    return clean, np.ascontiguousarray(raw), np.ascontiguousarray(noise), k, eps, train


def noisy_topk(clean_logits, noise_logits, k, train=True, seed=None, noise=None,
               noise_epsilon=1e-2, check_finite=True):
    """clean_logits, noise_logits: (T, E) -> (Routing(weights (T, k), experts (T, k) int32),
    load (E,)).

    noise: (T, E) standard normal draws; None: numpy's default_rng(seed).standard_normal((T, E))
    cast to the logits' dtype (pass the same seed or noise to the backward). noise_logits may be
    None when train=False.
    """
    clean, raw, noise, k, eps, train = _inputs(clean_logits, noise_logits, k, train, seed,
                                               noise, noise_epsilon, check_finite)
    T, E = clean.shape
    w = np.empty((T, k), clean.dtype)
    idx = np.empty((T, k), np.int32)
    smooth = train and k < E
    prob = np.empty((T, E) if smooth else (1, 1), np.float64)
    kr.noisy_topk_kernel(clean, raw, noise, k, eps, train, w, idx, prob)
    if smooth:
        load = prob.sum(axis=0)
    else:
        load = np.bincount(idx.reshape(-1), minlength=E).astype(np.float64)
    return Routing(w, idx), load.astype(clean.dtype)


def noisy_topk_backward(d_weights, d_load, clean_logits, noise_logits, k, train=True, seed=None,
                        noise=None, noise_epsilon=1e-2):
    """d_weights: (T, k) or None, d_load: (E,) or None -> (d_clean_logits (T, E),
    d_noise_logits (T, E)), with the forward's inputs (the same seed or noise).

    The gradient runs through the gates (softmax of the k best noisy logits) and, in training,
    through the smooth load (the clean logit, the noise scale and the threshold expert's noisy
    logit). The selection itself is piecewise constant and gets none."""
    clean, raw, noise, k, eps, train = _inputs(clean_logits, noise_logits, k, train, seed,
                                               noise, noise_epsilon, False)
    T, E = clean.shape
    dw = (np.zeros((T, k), clean.dtype) if d_weights is None
          else _checks.grad("d_weights", d_weights, (T, k), clean.dtype))
    dl = (np.zeros(E, clean.dtype) if d_load is None
          else _checks.grad("d_load", d_load, (E,), clean.dtype))
    d_clean = np.empty((T, E), clean.dtype)
    d_raw = np.empty((T, E), clean.dtype)
    kr.noisy_topk_backward_kernel(dw, dl, clean, raw, noise, k, eps, train, d_clean, d_raw)
    return d_clean, d_raw


def cv_squared(x):
    """x: (E,) -> the squared coefficient of variation var / (mean^2 + 1e-10), population
    variance over size + 1e-10 as tensor2tensor does (the popular PyTorch port uses the unbiased
    variance); the t2t eps makes a zero vector give 0."""
    x = np.asarray(chk.check_float("x", _checks.host("x", x), ndim=1), np.float64)
    n = x.shape[0] + 1e-10
    mean = x.sum() / n
    var = ((x - mean) ** 2).sum() / n
    return float(var / (mean * mean + 1e-10))


def cv_squared_backward(d_loss, x):
    """d_loss: scalar, x: (E,) -> d_x: (E,) in x's dtype."""
    xx = chk.check_float("x", _checks.host("x", x), ndim=1)
    d = chk.check_real("d_loss", d_loss)
    x64 = np.asarray(xx, np.float64)
    n = x64.shape[0] + 1e-10
    mean = x64.sum() / n
    dev = x64 - mean
    var = (dev ** 2).sum() / n
    den = mean * mean + 1e-10
    d_var = 2.0 / n * dev - 2.0 / (n * n) * dev.sum()
    return (d * (d_var / den - var * 2.0 * mean / n / (den * den))).astype(xx.dtype)


def expert_importance(weights, experts, num_experts):
    """weights, experts: (T, k) -> (E,) the sum of each expert's gates (in token order)."""
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    weights = chk.check_float("weights", _checks.host("weights", weights), ndim=2)
    experts = _checks.experts("experts", experts, weights.shape[0], E)
    if experts.shape != weights.shape:
        raise ValueError(f"experts: expected the shape of weights {tuple(weights.shape)}, got "
                         f"{tuple(experts.shape)}")
    imp = np.zeros(E, np.float64)
    np.add.at(imp, experts.reshape(-1), np.asarray(weights, np.float64).reshape(-1))
    return imp.astype(weights.dtype)


def noisy_topk_loss(routing, load, num_experts, importance_weight=1.0, load_weight=1.0):
    """Shazeer et al.'s balancing loss: importance_weight * cv^2(importance) + load_weight *
    cv^2(load), importance = expert_importance(routing.weights, routing.experts, E)."""
    imp = expert_importance(routing.weights, routing.experts, num_experts)
    wi = chk.check_real("importance_weight", importance_weight)
    wl = chk.check_real("load_weight", load_weight)
    chk.check_float("load", _checks.host("load", load), shape=(imp.shape[0],))
    return wi * cv_squared(imp) + wl * cv_squared(load)


def noisy_topk_loss_backward(d_loss, routing, load, num_experts, importance_weight=1.0,
                             load_weight=1.0):
    """-> (d_weights (T, k), d_load (E,)) of noisy_topk_loss, to pass to noisy_topk_backward."""
    imp = expert_importance(routing.weights, routing.experts, num_experts)
    d = chk.check_real("d_loss", d_loss)
    wi = chk.check_real("importance_weight", importance_weight)
    wl = chk.check_real("load_weight", load_weight)
    load = chk.check_float("load", _checks.host("load", load), shape=(imp.shape[0],))
    d_imp = cv_squared_backward(d * wi, imp)
    d_weights = np.ascontiguousarray(d_imp[np.asarray(routing.experts)])
    return d_weights, cv_squared_backward(d * wl, load)
