"""Dispatch ops: make_plan (a stable counting sort of the T*k assignments by expert), permute
(tokens into expert order) and combine (expert outputs back to tokens, weighted)."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..kernels.cpu import dispatch as kd
from ..types import Plan


def _capacity(capacity):
    if capacity is None:
        return None
    return chk.check_int("capacity", capacity, 0, None, what="a non-negative integer or None")


def make_plan(experts, num_experts, capacity=None):
    """experts: (T, k) int -> Plan(rows (N,) int32, offsets (E+1,) int64, counts (E,) int64,
    slots (T, k) int32, dropped (E,) int64, capacity).

    A stable counting sort (no argsort): rows holds the flat assignment ids t*k + j grouped by
    expert, increasing within an expert. With a capacity, each expert keeps its first
    `capacity` assignments in token order (then choice order); the rest are dropped (slot -1,
    they add zero in combine) and counted per expert in `dropped`.
    """
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    capacity = _capacity(capacity)
    if backend_of(experts=experts) == CUDA:
        chk.check_int_array("experts", experts, ndim=2)
        return cuda_module().make_plan(experts, E, capacity)
    experts = chk.check_int_array("experts", as_host("experts", experts), ndim=2)
    if experts.size:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"experts: expected expert ids in 0..num_experts-1 = 0..{E - 1}, "
                             f"found {lo if lo < 0 else hi}")
    flat = np.ascontiguousarray(experts, dtype=np.int32).reshape(-1)
    rows, offsets, counts, slots, dropped = kd.plan_kernel(flat, E, -1 if capacity is None
                                                           else capacity)
    return Plan(rows, offsets, counts, slots.reshape(experts.shape), dropped, capacity)


def check_plan(plan, name="plan"):
    if not isinstance(plan, Plan):
        raise TypeError(f"{name}: expected a Plan from make_plan, got {type(plan).__name__}")
    return plan


def permute(x, plan):
    """x: (T, d) -> xs: (N, d), the tokens in expert order: xs[i] = x[plan.rows[i] // k]."""
    check_plan(plan)
    if backend_of(x=x, rows=plan.rows) == CUDA:
        chk.check_float("x", x, shape=(plan.num_tokens, None))
        return cuda_module().permute(x, plan)
    x = chk.check_float("x", as_host("x", x), shape=(plan.num_tokens, None))
    out = np.empty((plan.num_rows, x.shape[1]), x.dtype)
    kd.permute_kernel(np.ascontiguousarray(x), plan.rows, plan.top_k, out)
    return out


def combine(ys, plan, weights=None):
    """ys: (N, d), weights: (T, k) or None (all ones) -> y: (T, d).

    y[t] = sum over j = 0..k-1 of weights[t, j] * ys[slot of (t, j)], dropped assignments
    adding zero. Each token is summed by one thread in that order, never with atomics: the
    result is bitwise the same for any thread count.
    """
    check_plan(plan)
    if backend_of(ys=ys, weights=weights, rows=plan.rows) == CUDA:
        chk.check_float("ys", ys, shape=(plan.num_rows, None))
        if weights is not None:
            chk.check_float("weights", weights, shape=plan.slots.shape, dtype=ys.dtype)
        return cuda_module().combine(ys, plan, weights)
    ys = chk.check_float("ys", as_host("ys", ys), shape=(plan.num_rows, None))
    if weights is None:
        weights = np.ones(plan.slots.shape, ys.dtype)
    weights = chk.check_float("weights", as_host("weights", weights), shape=plan.slots.shape,
                              dtype=ys.dtype)
    out = np.empty((plan.num_tokens, ys.shape[1]), ys.dtype)
    kd.combine_kernel(np.ascontiguousarray(ys), plan.slots, np.ascontiguousarray(weights), out)
    return out
