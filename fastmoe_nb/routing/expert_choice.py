"""Expert-choice routing (Zhou et al. 2022): each expert takes its C best tokens.

Scores are the softmax over experts of each token's logits; expert e keeps the C tokens with the
highest score in its column (equal scores: lower token first). A token may be taken by 0..E
experts, its gate for each being its score. The result is a Plan over the (T, E) grid of
assignments (t, e), k = E: slot -1 where expert e did not take token t.
"""
from __future__ import annotations

import numpy as np

from ..kernels.cpu import routers as kr
from ..ops.routing import softmax, softmax_backward
from ..types import Routing
from . import _checks
from .capacity import plan_unchecked, resolve_capacity


def _grid(T, E):
    """experts (T, E) int32: every row 0..E-1."""
    return np.ascontiguousarray(np.broadcast_to(np.arange(E, dtype=np.int32), (T, E)))


def expert_choice(logits, capacity=None, capacity_factor=1.0, min_capacity=4,
                  check_finite=True):
    """logits: (T, E) -> (Routing(weights (T, E), experts (T, E) int32), Plan).

    C = capacity, or min(T, max(ceil(T / E * capacity_factor), min_capacity)) (capacity_factor
    is the paper's c, the average experts per token); both None: C = T (every expert takes
    every token: dense). weights[t, e] = softmax(logits[t])[e] where expert e took token t,
    else 0; experts[t] = 0..E-1. Plan.dropped[e] = T - C (the tokens e did not take).
    """
    logits = _checks.scores("logits", logits, check_finite)
    T, E = logits.shape
    cap = resolve_capacity(T, E, 1, capacity, capacity_factor, min_capacity)
    C = T if cap < 0 else min(cap, T)
    probs = softmax(logits, check_finite=False)
    chosen = np.empty((T, E), np.bool_)
    kr.expert_choice_kernel(probs, C, chosen)
    weights = np.where(chosen, probs, np.zeros((), probs.dtype))
    experts = _grid(T, E)
    plan = plan_unchecked(experts, E, -1, np.arange(T * E, dtype=np.int64),
                          ~chosen.reshape(-1))
    return Routing(weights, experts), plan._replace(capacity=C)


def expert_choice_backward(d_weights, logits, plan):
    """d_weights: (T, E), logits: (T, E), plan from expert_choice -> d_logits: (T, E).

    The gates are softmax scores where an expert took the token and a constant 0 elsewhere, so
    only the taken entries pass their gradient (through the whole softmax)."""
    logits = _checks.scores("logits", logits, check_finite=False)
    T, E = logits.shape
    if tuple(plan.slots.shape) != (T, E):
        raise ValueError(f"plan: expected the expert-choice plan of these logits, slots of "
                         f"shape ({T}, {E}), got {tuple(plan.slots.shape)}")
    g = _checks.grad("d_weights", d_weights, (T, E), logits.dtype)
    g = np.where(plan.slots >= 0, g, np.zeros((), g.dtype))
    return softmax_backward(g, softmax(logits, check_finite=False))
