"""Switch Transformer routing (Fedus et al. 2021): top-1 with an expert capacity.

The gate is the softmax probability of the chosen expert (not renormalized); each expert keeps
at most `capacity` tokens, first come by position (HF transformers' SwitchTransformers,
Mesh TensorFlow) or, with priority="score", by descending router probability ("batch
prioritized routing", V-MoE / Tutel). A dropped token gets zero output: the residual
connection around the layer is the caller's.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..ops.routing import softmax_topk, softmax_topk_backward
from . import _checks
from .capacity import PRIORITIES, plan_unchecked, resolve_capacity, token_priority


def switch_top1(logits, capacity=None, capacity_factor=1.0, min_capacity=4,
                priority="position", check_finite=True):
    """logits: (T, E) -> (Routing(weights (T, 1), experts (T, 1) int32), Plan).

    capacity: tokens per expert; None: expert_capacity(T, E, capacity_factor, 1, min_capacity)
    = max(ceil(T / E * capacity_factor), min_capacity); capacity=None and capacity_factor=None:
    dropless. Dropped tokens keep their gate in Routing.weights; their Plan slot is -1.
    """
    logits = _checks.scores("logits", logits, check_finite)
    T, E = logits.shape
    chk.check_choice("priority", priority, PRIORITIES)
    cap = resolve_capacity(T, E, 1, capacity, capacity_factor, min_capacity)
    r = softmax_topk(logits, 1, renormalize=False, check_finite=False)
    order = token_priority(r.weights[:, 0], 1, priority)
    return r, plan_unchecked(r.experts, E, cap, order, np.zeros(T, np.bool_))


def switch_top1_backward(d_weights, logits, experts):
    """d_weights: (T, 1), logits: (T, E), experts: (T, 1) -> d_logits: (T, E), the gradient of
    the gate p[t, e_t] = softmax(logits[t])[e_t] (every logit gets one, through the softmax's
    normalizer). Dropped tokens get d_weights = 0 from combine_backward."""
    return softmax_topk_backward(d_weights, logits, experts, renormalize=False)
