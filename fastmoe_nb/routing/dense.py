"""Dense gating, the classic mixture of experts (Jacobs et al. 1991): every token uses every
expert, weighted by the softmax of its logits (k = E, nothing dropped)."""
from __future__ import annotations

from ..ops.routing import softmax, softmax_backward
from ..types import Routing
from . import _checks
from .expert_choice import _grid


def dense_gating(logits, check_finite=True):
    """logits: (T, E) -> Routing(weights (T, E) = softmax(logits), experts (T, E) = 0..E-1 in
    every row, in expert order)."""
    logits = _checks.scores("logits", logits, check_finite)
    T, E = logits.shape
    return Routing(softmax(logits, check_finite=False), _grid(T, E))


def dense_gating_backward(d_weights, logits):
    """d_weights: (T, E), logits: (T, E) -> d_logits: (T, E) (the softmax's backward)."""
    logits = _checks.scores("logits", logits, check_finite=False)
    d_weights = _checks.grad("d_weights", d_weights, logits.shape, logits.dtype)
    return softmax_backward(d_weights, softmax(logits, check_finite=False))
