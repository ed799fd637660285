"""Dispatch ops: make_plan (a stable counting sort of the T*k assignments by expert), permute
(tokens into expert order) and combine (expert outputs back to tokens, weighted)."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..kernels.cpu import dispatch as kd
from ..types import Plan


MAX_EXPERTS = 2**31 - 1


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
    E = chk.check_int("num_experts", num_experts, 1, MAX_EXPERTS,
                      what=f"an integer in 1..{MAX_EXPERTS} (expert ids are int32)")
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
    n = flat.shape[0]   # first come, first kept: capacity is claimed in token order
    rows, offsets, counts, slots, dropped = kd.plan_kernel(
        flat, np.arange(n, dtype=np.int64), np.zeros(n, np.bool_), E,
        -1 if capacity is None else min(capacity, n))   # above T*k it drops nothing
    return Plan(rows, offsets, counts, slots.reshape(experts.shape), dropped, capacity)


_PLAN_DTYPES = {"rows": np.int32, "offsets": np.int64, "counts": np.int64, "slots": np.int32,
                "dropped": np.int64}


def _plan_error(name, code, i, v, N, E, n):
    f = {kd.PLAN_OFFSET0: ("offsets", f"offsets[0] = 0, got {v}"),
         kd.PLAN_OFFSET_ORDER: ("offsets", f"non-decreasing offsets, but offsets[{i}] = {v} "
                                           f"is below offsets[{i - 1}]"),
         kd.PLAN_OFFSET_END: ("offsets", f"offsets[E] = N = {N} (the length of rows), got {v}"),
         kd.PLAN_COUNT: ("counts", f"counts[e] = offsets[e+1] - offsets[e], but counts[{i}] "
                                   f"= {v}"),
         kd.PLAN_DROPPED: ("dropped", f"non-negative counts, got dropped[{i}] = {v}"),
         kd.PLAN_ROW_RANGE: ("rows", f"assignment ids in 0..T*k-1 = 0..{n - 1}, got "
                                     f"rows[{i}] = {v}"),
         kd.PLAN_SLOT_RANGE: ("slots", f"slots in -1..N-1 = -1..{N - 1}, got {v} at flat "
                                       f"index {i}"),
         kd.PLAN_ROW_SLOT: ("rows", f"rows and slots to be inverses (slots[rows[i]] == i), "
                                    f"but rows[{i}] = {v} and slots there is not {i}"),
         kd.PLAN_KEPT: ("slots", f"N = {N} kept slots (one per row), found {v}")}[code]
    return ValueError(f"{name}.{f[0]}: expected {f[1]}; pass a Plan from make_plan, or keep "
                      f"its fields consistent")


def check_plan(plan, name="plan"):
    """A Plan whose every indexing field is consistent, checked before any kernel reads it:
    dtypes and shapes, offsets from 0 to N non-decreasing, counts their differences, rows in
    0..T*k-1 and slots in -1..N-1 inverse to each other. A Plan is a public NamedTuple that
    users may build or _replace; an inconsistent one would otherwise make the kernels read or
    write out of bounds. O(T*k) in one Numba pass (device plans are copied to the host for it)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"{name}: expected a Plan from make_plan, got {type(plan).__name__}")
    fields = {}
    for f, dt in _PLAN_DTYPES.items():
        a = getattr(plan, f)
        chk.check_array(f"{name}.{f}", a, ndim=2 if f == "slots" else 1)
        if chk.dtype_of(a) != np.dtype(dt):
            raise TypeError(f"{name}.{f}: expected dtype {np.dtype(dt)}, got {chk.dtype_of(a)}")
        fields[f] = a
    E = fields["counts"].shape[0]
    if E < 1:
        raise ValueError(f"{name}.counts: expected at least one expert, got shape (0,)")
    for f, want in (("offsets", E + 1), ("dropped", E)):
        if fields[f].shape[0] != want:
            raise ValueError(f"{name}.{f}: expected shape ({want},) (E = {E} from "
                             f"{name}.counts), got {tuple(fields[f].shape)}")
    if plan.capacity is not None:
        chk.check_int(f"{name}.capacity", plan.capacity, 0, None,
                      what="a non-negative integer or None")
    if backend_of(**fields) == CUDA:
        dev = cuda_module().dev
        fields = {f: dev(a).copy_to_host() for f, a in fields.items()}
    N = fields["rows"].shape[0]
    flat = np.ascontiguousarray(fields["slots"]).reshape(-1)
    code, i, v = kd.check_plan_kernel(np.ascontiguousarray(fields["rows"]),
                                      np.ascontiguousarray(fields["offsets"]),
                                      np.ascontiguousarray(fields["counts"]), flat,
                                      np.ascontiguousarray(fields["dropped"]))
    if code != kd.PLAN_OK:
        raise _plan_error(name, code, int(i), int(v), N, E, flat.shape[0])
    return plan


def permute(x, plan):
    """x: (T, d) -> xs: (N, d), the tokens in expert order: xs[i] = x[plan.rows[i] // k]."""
    return permute_planned(x, check_plan(plan))


def permute_planned(x, plan):
    """permute with a plan the caller made with make_plan (not checked again)."""
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
    return combine_planned(ys, check_plan(plan), weights)


def combine_planned(ys, plan, weights=None):
    """combine with a plan the caller made with make_plan (not checked again)."""
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


# --------------------------------------------------------------------------- backward

def permute_backward(d_xs, plan):
    """d_xs: (N, d) gradient of xs = permute(x, plan) -> dx: (T, d).

    permute's adjoint is a combine with unit weights: each token sums the gradients of its
    kept copies in choice order j = 0..k-1; a token with every assignment dropped gets 0."""
    check_plan(plan)
    if backend_of(d_xs=d_xs, rows=plan.rows) == CUDA:
        chk.check_float("d_xs", d_xs, shape=(plan.num_rows, None))
        return cuda_module().permute_backward(d_xs, plan)
    d_xs = chk.check_float("d_xs", as_host("d_xs", d_xs), shape=(plan.num_rows, None))
    out = np.empty((plan.num_tokens, d_xs.shape[1]), d_xs.dtype)
    kd.combine_kernel(np.ascontiguousarray(d_xs), plan.slots,
                      np.ones(plan.slots.shape, d_xs.dtype), out)
    return out


def combine_backward(dy, ys, plan, weights=None):
    """dy: (T, d) gradient of y = combine(ys, plan, weights), ys: (N, d), weights: (T, k) or
    None (ones) -> (d_ys (N, d), d_weights (T, k)).

    d_ys[i] = weights[t, j] * dy[t] for the row i of assignment (t, j) (a permute-like gather),
    d_weights[t, j] = <dy[t], ys[i]> (a row-wise dot, summed in float64); a dropped
    assignment's d_weights is 0."""
    check_plan(plan)
    if backend_of(dy=dy, ys=ys, weights=weights, rows=plan.rows) == CUDA:
        chk.check_float("ys", ys, shape=(plan.num_rows, None))
        chk.check_float("dy", dy, shape=(plan.num_tokens, ys.shape[1]), dtype=ys.dtype)
        return cuda_module().combine_backward(dy, ys, plan, weights)
    ys = chk.check_float("ys", as_host("ys", ys), shape=(plan.num_rows, None))
    dy = chk.check_float("dy", as_host("dy", dy), shape=(plan.num_tokens, ys.shape[1]),
                         dtype=ys.dtype)
    if weights is None:
        weights = np.ones(plan.slots.shape, ys.dtype)
    weights = chk.check_float("weights", as_host("weights", weights), shape=plan.slots.shape,
                              dtype=ys.dtype)
    d_ys = np.empty(ys.shape, ys.dtype)
    d_weights = np.zeros(plan.slots.shape, ys.dtype)
    kd.combine_backward_kernel(np.ascontiguousarray(dy), np.ascontiguousarray(ys), plan.rows,
                               np.ascontiguousarray(weights), d_ys, d_weights)
    return d_ys, d_weights
