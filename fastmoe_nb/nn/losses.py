"""Losses, each returning (loss, gradient of the loss with respect to its first argument).

The loss is a Python float (computed in float64); the gradient has the input's dtype.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk


def cross_entropy(logits, targets):
    """Softmax cross-entropy, mean over tokens.

    logits: (T, V) float, targets: (T,) ints in 0..V-1 -> (loss, dlogits (T, V)).
    loss = mean_t [logsumexp(logits[t]) - logits[t, targets[t]]];
    dlogits = (softmax(logits) - onehot(targets)) / T. T = 0 gives (0.0, an empty gradient).
    """
    logits = chk.check_float("logits", np.asarray(logits), ndim=2)
    T, V = logits.shape
    targets = chk.check_int_array("targets", np.asarray(targets), shape=(T,))
    if T and (targets.min() < 0 or targets.max() >= V):
        raise ValueError(f"targets: expected class ids in 0..{V - 1}, found "
                         f"{targets.min() if targets.min() < 0 else targets.max()}")
    if T == 0:
        return 0.0, np.zeros_like(logits)
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(T)
    loss = float(np.mean(np.log(s[:, 0]) - z[rows, targets]))
    grad = e / s
    grad[rows, targets] -= 1.0
    return loss, (grad / T).astype(logits.dtype)


def mse(pred, target):
    """Mean squared error over all elements.

    pred, target: same shape and dtype -> (loss, dpred); loss = mean((pred - target)^2),
    dpred = 2 (pred - target) / pred.size."""
    pred = chk.check_float("pred", np.asarray(pred))
    target = chk.check_float("target", np.asarray(target), dtype=pred.dtype)
    if target.shape != pred.shape:
        raise ValueError(f"target: expected the shape of pred {pred.shape}, got {target.shape}")
    if pred.size == 0:
        return 0.0, np.zeros_like(pred)
    diff = pred.astype(np.float64) - target
    return float(np.mean(diff * diff)), (2.0 * diff / pred.size).astype(pred.dtype)
