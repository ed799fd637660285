"""GShard top-2 routing (Lepikhin et al. 2020) with an expert capacity.

Gates: the two best softmax probabilities normalized by their sum, before any dropping (as
GShard / Mesh TensorFlow; DeepSpeed and fairseq normalize after dropping). Every first choice
claims capacity before any second choice, tokens in position order (or by descending top-1
probability with priority="score", as NLLB-MoE's batch-prioritized routing). With
random_routing the second expert is kept only when u < 2 * g2 (u uniform in [0, 1) from
numpy's default_rng(seed), one per token), so a weak second choice is often not routed; a
skipped second choice claims no capacity, the first keeps its gate g1.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..ops.routing import softmax_topk, softmax_topk_backward
from . import _checks
from .capacity import PRIORITIES, plan_unchecked, resolve_capacity, token_priority


def gshard_top2(logits, capacity=None, capacity_factor=1.0, min_capacity=4,
                priority="position", random_routing=False, seed=None, check_finite=True):
    """logits: (T, E), E >= 2 -> (Routing(weights (T, 2), experts (T, 2) int32), Plan).

    capacity: tokens per expert; None: expert_capacity(T, E, capacity_factor, 2, min_capacity)
    = max(ceil(T / E * 2 * capacity_factor), min_capacity); capacity=None and
    capacity_factor=None: dropless. Dropped or skipped assignments keep their gate in
    Routing.weights; their Plan slot is -1 and they count in Plan.dropped.
    """
    logits = _checks.scores("logits", logits, check_finite)
    T, E = logits.shape
    if E < 2:
        raise ValueError(f"logits: expected at least 2 expert columns for top-2 routing, got {E}")
    chk.check_choice("priority", priority, PRIORITIES)
    cap = resolve_capacity(T, E, 2, capacity, capacity_factor, min_capacity)
    seed = _checks.seed_value(seed)
    r = softmax_topk(logits, 2, renormalize=True, check_finite=False)
    score = None
    if priority == "score":
        score = softmax_topk(logits, 1, renormalize=False, check_finite=False).weights[:, 0]
    order = token_priority(score if score is not None else np.zeros(T), 2, priority)
    skip = np.zeros((T, 2), np.bool_)
    if random_routing:
        u = np.random.default_rng(seed).random(T)
        skip[:, 1] = ~(u < 2.0 * r.weights[:, 1].astype(np.float64))
    return r, plan_unchecked(r.experts, E, cap, order, skip.reshape(-1))


def gshard_top2_backward(d_weights, logits, experts):
    """d_weights: (T, 2), logits: (T, E), experts: (T, 2) -> d_logits: (T, E), the gradient of
    the normalized gates p_j / (p_1 + p_2), a softmax over the two chosen logits (zero
    elsewhere). Dropped assignments get d_weights = 0 from combine_backward."""
    return softmax_topk_backward(d_weights, logits, experts, renormalize=True)
