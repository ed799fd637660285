"""Dispatch ops: make_plan (a stable counting sort of the T*k assignments by expert), permute
(tokens into expert order) and combine (expert outputs back to tokens, weighted), and their
backwards. A Plan handed in from outside is checked (checks.check_plan) before any kernel
indexes with it; the *_planned forms take a plan the caller just made."""
from __future__ import annotations

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import CUDA, as_host, backend_of
from ..checks import (MAX_EXPERTS, check_capacity, check_expert_ids, check_num_experts,
                      check_plan)


def make_plan(experts, num_experts, capacity=None):
    """experts: (T, k) int -> Plan(rows (N,) int32, offsets (E+1,) int64, counts (E,) int64,
    slots (T, k) int32, dropped (E,) int64, capacity).

    A stable counting sort (no argsort): rows holds the flat assignment ids t*k + j grouped by
    expert, increasing within an expert. With a capacity, each expert keeps its first
    `capacity` assignments in token order (then choice order); the rest are dropped (slot -1,
    they add zero in combine) and counted per expert in `dropped`.
    """
    E = check_num_experts(num_experts)
    capacity = check_capacity(capacity)
    if backend_of(experts=experts) == CUDA:
        chk.check_int_array("experts", experts, ndim=2)
        return backends.get(CUDA).make_plan(experts, E, capacity)
    return backends.cpu.make_plan(check_expert_ids(experts, E), E, capacity)


def permute(x, plan):
    """x: (T, d) -> xs: (N, d), the tokens in expert order: xs[i] = x[plan.rows[i] // k]."""
    return permute_planned(x, check_plan(plan))


def permute_planned(x, plan):
    """permute with a plan the caller made with make_plan (not checked again)."""
    be = backend_of(x=x, rows=plan.rows)
    if be == CUDA:
        chk.check_float("x", x, shape=(plan.num_tokens, None))
        return backends.get(CUDA).permute(x, plan)
    x = chk.check_float("x", as_host("x", x), shape=(plan.num_tokens, None))
    return backends.cpu.permute(np.ascontiguousarray(x), plan)


def combine(ys, plan, weights=None):
    """ys: (N, d), weights: (T, k) or None (all ones) -> y: (T, d).

    y[t] = sum over j = 0..k-1 of weights[t, j] * ys[slot of (t, j)], dropped assignments
    adding zero. Each token is summed by one thread in that order, never with atomics: the
    result is bitwise the same for any thread count.
    """
    return combine_planned(ys, check_plan(plan), weights)


def _host_weights(weights, plan, dtype):
    if weights is None:
        return None
    return np.ascontiguousarray(chk.check_float("weights", as_host("weights", weights),
                                                shape=plan.slots.shape, dtype=dtype))


def combine_planned(ys, plan, weights=None):
    """combine with a plan the caller made with make_plan (not checked again)."""
    if backend_of(ys=ys, weights=weights, rows=plan.rows) == CUDA:
        chk.check_float("ys", ys, shape=(plan.num_rows, None))
        if weights is not None:
            chk.check_float("weights", weights, shape=plan.slots.shape, dtype=ys.dtype)
        return backends.get(CUDA).combine(ys, plan, weights)
    ys = chk.check_float("ys", as_host("ys", ys), shape=(plan.num_rows, None))
    return backends.cpu.combine(np.ascontiguousarray(ys), plan,
                                _host_weights(weights, plan, ys.dtype))


# --------------------------------------------------------------------------- backward

def permute_backward(d_xs, plan):
    """d_xs: (N, d) gradient of xs = permute(x, plan) -> dx: (T, d).

    permute's adjoint is a combine with unit weights: each token sums the gradients of its
    kept copies in choice order j = 0..k-1; a token with every assignment dropped gets 0."""
    return permute_backward_planned(d_xs, check_plan(plan))


def permute_backward_planned(d_xs, plan):
    """permute_backward with a plan the caller made with make_plan (not checked again)."""
    if backend_of(d_xs=d_xs, rows=plan.rows) == CUDA:
        chk.check_float("d_xs", d_xs, shape=(plan.num_rows, None))
        return backends.get(CUDA).permute_backward(d_xs, plan)
    d_xs = chk.check_float("d_xs", as_host("d_xs", d_xs), shape=(plan.num_rows, None))
    return backends.cpu.permute_backward(np.ascontiguousarray(d_xs), plan)


def combine_backward(dy, ys, plan, weights=None):
    """dy: (T, d) gradient of y = combine(ys, plan, weights), ys: (N, d), weights: (T, k) or
    None (ones) -> (d_ys (N, d), d_weights (T, k)).

    d_ys[i] = weights[t, j] * dy[t] for the row i of assignment (t, j) (a permute-like gather),
    d_weights[t, j] = <dy[t], ys[i]> (a row-wise dot, summed in float64); a dropped
    assignment's d_weights is 0."""
    return combine_backward_planned(dy, ys, check_plan(plan), weights)


def combine_backward_planned(dy, ys, plan, weights=None):
    """combine_backward with a plan the caller made with make_plan (not checked again)."""
    if backend_of(dy=dy, ys=ys, weights=weights, rows=plan.rows) == CUDA:
        chk.check_float("ys", ys, shape=(plan.num_rows, None))
        chk.check_float("dy", dy, shape=(plan.num_tokens, ys.shape[1]), dtype=ys.dtype)
        return backends.get(CUDA).combine_backward(dy, ys, plan, weights)
    ys = chk.check_float("ys", as_host("ys", ys), shape=(plan.num_rows, None))
    dy = chk.check_float("dy", as_host("dy", dy), shape=(plan.num_tokens, ys.shape[1]),
                         dtype=ys.dtype)
    return backends.cpu.combine_backward(np.ascontiguousarray(dy), np.ascontiguousarray(ys),
                                         plan, _host_weights(weights, plan, ys.dtype))


__all__ = ["MAX_EXPERTS", "check_plan", "combine", "combine_backward", "make_plan", "permute",
           "permute_backward"]
