"""Expert capacity and capacity-limited plans, shared by the Switch, GShard and expert-choice
routers.

A capacity router decides which assignments (t, j) each expert keeps, in a priority order, and
returns the same Plan as make_plan: rows grouped by expert, increasing flat id t*k + j within an
expert, slot -1 for what was not kept (it adds zero in combine).
"""
from __future__ import annotations

import math

import numpy as np

from .. import errors as chk
from ..kernels.cpu import dispatch as kd
from ..types import Plan
from . import _checks

PRIORITIES = ("position", "score")


def expert_capacity(num_tokens, num_experts, capacity_factor=1.0, k=1, min_capacity=4):
    """Tokens each expert may take: max(ceil((T / E) * (capacity_factor * k)), min_capacity).

    Computed in float64 in DeepSpeed's order (T / E first), so e.g. T=1000, E=10, factor 1.1
    gives ceil(110.00000000000001) = 111, as DeepSpeed does; Mesh TensorFlow (Switch, GShard)
    rounds down instead: min(T, int(T * factor / E)) then max with its min_expert_capacity 4;
    HF transformers' Switch takes a fixed `expert_capacity` (pass `capacity=` for that).
    """
    T = chk.check_int("num_tokens", num_tokens, 0, None, what="a non-negative integer")
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    cf = chk.check_real("capacity_factor", capacity_factor, positive=True)
    k = chk.check_int("k", k, 1, E, what=f"1..E = 1..{E}")
    mc = chk.check_int("min_capacity", min_capacity, 0, None, what="a non-negative integer")
    return max(int(math.ceil((T / E) * (cf * k))), mc)


def resolve_capacity(T, E, k, capacity, capacity_factor, min_capacity):
    """capacity given: that (>= 0); else from capacity_factor; both None: dropless (-1)."""
    if capacity is not None:
        return chk.check_int("capacity", capacity, 0, None, what="a non-negative integer")
    if capacity_factor is None:
        return -1
    return expert_capacity(T, E, capacity_factor, k, min_capacity)


def capacity_plan(experts, num_experts, capacity=None, order=None, skip=None):
    """experts: (T, k) ids -> Plan where assignments claim capacity in `order`.

    order: (T*k,) a permutation of the flat ids t*k + j giving the priority (None: flat id
    order, which is make_plan's); skip: (T*k,) bool, assignments never routed (random routing,
    expert choice's unchosen pairs). Each expert keeps its first `capacity` non-skipped
    assignments in priority order (None: all). `dropped` counts what an expert did not keep,
    skipped or over capacity; rows stay in increasing flat id within an expert.
    """
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    experts = chk.check_int_array("experts", _checks.host("experts", experts), ndim=2)
    experts = _checks.experts("experts", experts, experts.shape[0], E)
    n = experts.size
    cap = -1 if capacity is None else chk.check_int("capacity", capacity, 0, None,
                                                     what="a non-negative integer or None")
    if order is None:
        order = np.arange(n, dtype=np.int64)
    else:
        order = np.ascontiguousarray(chk.check_int_array("order", _checks.host("order", order),
                                                         shape=(n,)), dtype=np.int64)
        if n and not np.array_equal(np.sort(order), np.arange(n)):
            raise ValueError(f"order: expected a permutation of 0..T*k-1 = 0..{n - 1}")
    if skip is None:
        skip = np.zeros(n, np.bool_)
    else:
        skip = np.ascontiguousarray(chk.check_array("skip", _checks.host("skip", skip),
                                                    shape=(n,)), dtype=np.bool_)
    return plan_unchecked(experts, E, cap, order, skip)


def plan_unchecked(experts, E, cap, order, skip):
    """capacity_plan on validated arrays (cap -1: none)."""
    T, k = experts.shape
    rows, offsets, counts, slots, dropped = kd.plan_kernel(
        experts.reshape(-1), order, skip, E, cap)
    return Plan(rows=rows, offsets=offsets, counts=counts, slots=slots.reshape(T, k),
                dropped=dropped, capacity=None if cap < 0 else int(cap))


def token_priority(score, k, priority):
    """(T*k,) claim order: choice j = 0 of every token before any j = 1 ("all first choices
    first", GShard; the same as token order when k = 1), tokens in position order or, with
    priority="score", by descending score (equal scores: lower position first)."""
    T = score.shape[0]
    tokens = (np.arange(T, dtype=np.int64) if priority == "position"
              else np.argsort(-np.asarray(score, np.float64), kind="stable").astype(np.int64))
    return (tokens[None, :] * k + np.arange(k, dtype=np.int64)[:, None]).reshape(-1)
