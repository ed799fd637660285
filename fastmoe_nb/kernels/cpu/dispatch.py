"""CPU dispatch kernels: the plan (a stable counting sort by expert), permute and combine."""
import numpy as np
from numba import njit, prange

from ..common import combine_backward_row
from .config import PERMUTE_ROWS


@njit(cache=True)
def plan_kernel(flat, order, skip, num_experts, capacity):
    # flat: (T*k,) expert ids, order: (T*k,) flat ids in the order they claim capacity
    # (Switch / GShard / batch priority: their own; empty: token order, make_plan's), skip:
    # (T*k,) bool (never routed; empty: none), capacity < 0: none
    #   -> rows (N,) int32, offsets (E+1,) int64, counts (E,) int64, slots (T*k,) int32,
    #      dropped (E,) int64 (capacity drops and skipped assignments)
    n = flat.shape[0]
    keep = np.zeros(n, np.bool_)
    counts = np.zeros(num_experts, np.int64)
    wanted = np.zeros(num_experts, np.int64)
    for p in range(n):  # claim capacity in priority order
        i = order[p] if order.shape[0] else p
        e = flat[i]
        wanted[e] += 1
        if not (skip.shape[0] and skip[i]) and (capacity < 0 or counts[e] < capacity):
            keep[i] = True
            counts[e] += 1
    offsets = np.zeros(num_experts + 1, np.int64)
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + counts[e]
    rows = np.empty(offsets[num_experts], np.int32)
    slots = np.full(n, -1, np.int32)
    cursor = offsets[:num_experts].copy()
    for i in range(n):  # rows in increasing flat id within an expert: a stable sort
        if keep[i]:
            e = flat[i]
            rows[cursor[e]] = i
            slots[i] = cursor[e]
            cursor[e] += 1
    return rows, offsets, counts, slots, wanted - counts


# check_plan_kernel's findings: (code, index, value); code 0 = a consistent plan
PLAN_OK, PLAN_OFFSET0, PLAN_OFFSET_ORDER, PLAN_OFFSET_END, PLAN_COUNT, PLAN_DROPPED, \
    PLAN_ROW_RANGE, PLAN_SLOT_RANGE, PLAN_ROW_SLOT, PLAN_KEPT = range(10)


@njit(cache=True)
def check_plan_kernel(rows, offsets, counts, slots, dropped):
    # rows: (N,), offsets: (E+1,), counts: (E,), slots: (T*k,), dropped: (E,)
    #   -> (code, index, value): the first inconsistency that a kernel indexing with the plan
    #      would read or write out of bounds on, or compute garbage from
    N, E, n = rows.shape[0], counts.shape[0], slots.shape[0]
    if offsets[0] != 0:
        return PLAN_OFFSET0, 0, offsets[0]
    for e in range(E):
        if offsets[e + 1] < offsets[e]:
            return PLAN_OFFSET_ORDER, e + 1, offsets[e + 1]
        if counts[e] != offsets[e + 1] - offsets[e]:
            return PLAN_COUNT, e, counts[e]
        if dropped[e] < 0:
            return PLAN_DROPPED, e, dropped[e]
    if offsets[E] != N:
        return PLAN_OFFSET_END, E, offsets[E]
    kept = 0
    for i in range(n):
        s = slots[i]
        if s < -1 or s >= N:
            return PLAN_SLOT_RANGE, i, s
        if s >= 0:
            kept += 1
    if kept != N:
        return PLAN_KEPT, 0, kept
    for i in range(N):   # with kept == N, slots[rows[i]] == i makes rows and slots inverses
        r = rows[i]
        if r < 0 or r >= n:
            return PLAN_ROW_RANGE, i, r
        if slots[r] != i:
            return PLAN_ROW_SLOT, i, r
    return PLAN_OK, 0, 0




@njit(nogil=True, cache=True)
def permute_rows(x, rows, k, out):
    # x: (T, d), rows: (n,) -> out: (n, d), out[i] = x[rows[i] // k]; serial and nogil, for
    # the expert pipeline's worker threads. A loop: np.take(..., out=) copies through a buffer
    # (time both: python -m timeit -s "import numpy as np; from fastmoe_nb.kernels.cpu.dispatch
    # import permute_rows as p; x = np.ones((4096, 512), np.float32); r = np.arange(128,
    # dtype=np.int32) * 32; o = x[:128].copy(); p(x, r, 1, o)" "p(x, r, 1, o)", then the
    # same with "np.take(x, r, 0, out=o)")
    for i in range(rows.shape[0]):
        src, dst = x[rows[i] // k], out[i]
        for c in range(np.uint64(0), np.uint64(dst.shape[0])):   # unsigned: vector copies
            dst[c] = src[c]


@njit(parallel=True, cache=True)
def permute_kernel(x, rows, k, out):
    # x: (T, d), rows: (N,) -> out: (N, d), out[i] = x[rows[i] // k], in blocks of rows
    N = rows.shape[0]
    for b in prange((N + PERMUTE_ROWS - 1) // PERMUTE_ROWS):
        lo, hi = b * PERMUTE_ROWS, min(N, b * PERMUTE_ROWS + PERMUTE_ROWS)
        permute_rows(x, rows[lo:hi], k, out[lo:hi])


@njit(parallel=True, cache=True)
def combine_kernel(ys, slots, weights, out):
    # ys: (N, d), slots: (T, k), weights: (T, k) -> out: (T, d)
    # out[t] = sum_{j=0..k-1, slots[t,j] >= 0} weights[t, j] * ys[slots[t, j]], j in order
    T, k = slots.shape
    d = np.uint64(ys.shape[1])
    for t in prange(T):
        o = out[t]
        first = True
        for j in range(k):
            s = slots[t, j]
            if s >= 0:
                w, y = weights[t, j], ys[s]
                if first:   # the first kept term is stored, not added to zeros: one pass less
                    for c in range(np.uint64(0), d):
                        o[c] = w * y[c]
                    first = False
                else:
                    for c in range(np.uint64(0), d):
                        o[c] += w * y[c]
        if first:   # every assignment dropped
            for c in range(np.uint64(0), d):
                o[c] = 0.0


@njit(parallel=True, cache=True, fastmath={"reassoc"})
def combine_backward_kernel(dy, ys, rows, weights, d_ys, d_weights):
    # dy: (T, d), ys: (N, d), rows: (N,), weights: (T, k) -> d_ys: (N, d), d_weights: (T, k)
    # A permute-like gather over the kept rows i (kernels/common.py: combine_backward_row, the
    # CUDA kernel's too); the caller zeroes d_weights (dropped assignments stay 0).
    # reassoc, which the row compiles under when inlined here, lets its float64 dot run in
    # vector lanes: the order is fixed by the compiled code, one row per thread, so results
    # still do not depend on the thread count.
    for i in prange(rows.shape[0]):
        combine_backward_row(dy, ys, rows, weights, d_ys, d_weights, i)
