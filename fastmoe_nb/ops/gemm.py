"""Grouped GEMM: one matrix product per expert over its block of rows, and its backward.

On the CPU, by the sizes of the expert blocks (raw weights; PackedWeights always take the
last way):
- forward products: a way per expert (streamed). An expert with at most STREAM_ROWS rows is
  streamed: kernels/cpu/gemm.py's stream_kernel reads its raw weights once, unpacked, in
  blocks of depth rows (one contiguous run each), and stream_sum adds the blocks' partial
  products up in a fixed order; an expert with more rows goes to single-threaded BLAS per
  block of its rows on ops/pool.py's threads; and every expert does when the experts
  average large blocks (large_blocks: >= BLAS_MIN_ROWS rows);
- backward products: large blocks through BLAS as above (and dW per block of its columns);
- otherwise (the backward of small batches, and PackedWeights): kernels/cpu/gemm.py's
  grouped_gemm_kernel (packed panels, register-blocked micro-kernel, one parallel loop over
  the tiles of all experts). Raw weights are packed tile by tile inside the kernel (read once
  from memory, the packed copy stays in cache); pack_weights() packs them once per weight
  update instead, and the PackedWeights are passed in place of w.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numbers

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..kernels.cpu import gemm as kg
from . import pool


def check_offsets(offsets, E, N, name="offsets"):
    """offsets: (E+1,) integers, 0 = offsets[0] <= ... <= offsets[E] = N (host array)."""
    chk.check_int_array(name, offsets, shape=(E + 1,))
    o = np.asarray(offsets)
    if o[0] != 0 or o[-1] != N or (E and np.any(np.diff(o) < 0)):
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to N = {N} "
                         f"(E+1 = {E + 1} entries), got {o[0]}..{o[-1]}"
                         + ("" if E == 0 or not np.any(np.diff(o) < 0) else ", decreasing"))
    return np.ascontiguousarray(o, dtype=np.int64)


def check_gemm_args(a, w, offsets, trans_w):
    """Validate a grouped GEMM's operands; returns (a, w, offsets, M) on the host."""
    a = chk.check_float("a", as_host("a", a), ndim=2)
    w = chk.check_float("w", as_host("w", w), ndim=3, dtype=a.dtype)
    K = a.shape[1]
    if (w.shape[2] if trans_w else w.shape[1]) != K:
        lay = "(E, M, K)" if trans_w else "(E, K, M)"
        raise ValueError(f"w: expected shape {lay} with K = a.shape[1] = {K} "
                         f"(trans_w={trans_w}), got {tuple(w.shape)}")
    offsets = check_offsets(as_host("offsets", offsets), w.shape[0], a.shape[0])
    return a, w, offsets, (w.shape[1] if trans_w else w.shape[2])



@contextmanager
def vectorizer_flags():
    """The micro-kernel must be compiled with LLVM's SLP vectorizer on and its loop vectorizer
    off (with numba's defaults it runs 5-10x slower); numba reads these flags when a function
    compiles, so every call into kernels/cpu/gemm.py goes through here."""
    old = numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE
    numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE = 1, 0
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE = old


class PackedWeights:
    """Expert weights packed once into the kernel's panels: pass it instead of w.

    A snapshot, not a view: after an in-place update of w, call pack_weights again (nothing
    is cached behind the caller's back, so stale panels can never be served silently).
    panels: (E, P, K, NR); shape/trans_w: those of the w it was packed from; swiglu: panels
    interleave the [gate | up] halves so the activation can run in the GEMM's epilogue.
    """

    def __init__(self, panels, shape, trans_w, swiglu):
        self.panels, self.shape, self.trans_w, self.swiglu = panels, shape, trans_w, swiglu

    @property
    def dtype(self):
        return self.panels.dtype

    @property
    def num_experts(self):
        return self.shape[0]

    @property
    def in_features(self):
        """K, the depth of the product."""
        return self.shape[2] if self.trans_w else self.shape[1]

    @property
    def out_features(self):
        """M, the columns of the product."""
        return self.shape[1] if self.trans_w else self.shape[2]

    def __repr__(self):
        return (f"PackedWeights(E={self.num_experts}, K={self.in_features}, "
                f"M={self.out_features}, dtype={self.dtype}, trans_w={self.trans_w}, "
                f"swiglu={self.swiglu})")


def _pack(w, trans, half):
    # w: (G, L, M) [trans: (G, M, L)] -> (G, P, L, NR) panels of B_g = w[g] (trans: w[g].T)
    M = w.shape[1] if trans else w.shape[2]
    L = w.shape[2] if trans else w.shape[1]
    P = -(-(half if half else M) // (kg.HN if half else kg.NR))
    out = np.empty((w.shape[0], P, L, kg.NR), w.dtype)
    with vectorizer_flags():
        kg.pack_panels(w, trans, half, out)
    return out


def pack_weights(w, trans_w=False, swiglu=False):
    """w: (E, K, M) [trans_w: (E, M, K)] -> PackedWeights, reused by grouped_gemm and
    experts_forward until the next weight update. swiglu=True (M even, [gate | up]) lays the
    halves side by side for the fused swiglu epilogue; grouped_gemm's result is unchanged.
    PackedWeights always run the Numba kernel; raw weights take faster ways on these machines
    (per-expert BLAS for larger blocks, streaming for a few rows an expert)."""
    w = chk.check_float("w", as_host("w", w), ndim=3)
    trans_w = bool(trans_w)
    M = w.shape[1] if trans_w else w.shape[2]
    if swiglu and M % 2:
        raise ValueError(f"w: swiglu expects an even number of output columns holding "
                         f"[gate | up] halves, got {M}")
    panels = _pack(np.ascontiguousarray(w), trans_w, M // 2 if swiglu else 0)
    return PackedWeights(panels, tuple(int(s) for s in w.shape), trans_w, bool(swiglu))


def _chunks(cost, n):
    """Split tiles 0..len(cost)-1 into n contiguous runs of about equal cost -> (n+1,)."""
    if len(cost) == 0:
        return np.zeros(n + 1, np.int64)
    cum = np.cumsum(cost, dtype=np.float64)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="left")
    return np.concatenate([[0], cuts, [len(cost)]]).astype(np.int64)


TILE_ROWS = 4 * kg.MC   # rows of A a tile takes at most: B's panels are packed once per tile


def make_tiles(rows, r0, r_out, g, k0, k1, P):
    """One job per entry (rows of C, their first A row, first C row, group, depth range) ->
    (tiles (n, 7) int64, bounds (nthreads+1,) int64, max rows of a tile) for
    grouped_gemm_kernel: jobs cut into TILE_ROWS-row and NC-column tiles, split by cost over
    numba's threads."""
    rows, r0, r_out, g, k0, k1 = (np.asarray(v, np.int64) for v in (rows, r0, r_out, g, k0, k1))
    keep = rows > 0
    rows, r0, r_out, g, k0, k1 = (v[keep] for v in (rows, r0, r_out, g, k0, k1))
    ncb = -(-P // (kg.NC // kg.NR))
    nrb = -(-rows // TILE_ROWS)
    job = np.repeat(np.arange(rows.shape[0]), nrb * ncb)
    within = np.arange(job.shape[0]) - np.repeat(np.cumsum(nrb * ncb) - nrb * ncb, nrb * ncb)
    rb, cb = within // ncb, within % ncb
    m = np.minimum(TILE_ROWS, rows[job] - rb * TILE_ROWS)
    tiles = np.stack([g[job], r0[job] + rb * TILE_ROWS, m, r_out[job] + rb * TILE_ROWS,
                      k0[job], k1[job], cb * (kg.NC // kg.NR)], axis=1).astype(np.int64)
    ncols = np.minimum(kg.NC // kg.NR, P - tiles[:, 6])
    cost = (-(-m // kg.MR) * kg.MR + kg.MR) * ncols * np.maximum(k1[job] - k0[job], 1)
    max_rows = int(m.max()) if m.size else 0
    return np.ascontiguousarray(tiles), _chunks(cost, numba.get_num_threads()), max_rows


def num_panels(M, half):
    """Panels of NR columns of a product with M columns (half > 0: swiglu-interleaved)."""
    return -(-half // kg.HN) if half else -(-M // kg.NR)


def run_gemm(src, ridx, trans, b, btrans, M, half, tiles, out, act_out=None, code=-1,
             store_out=True):
    """grouped_gemm_kernel with the vectorizer flags. b: a (G, L, M) [btrans: (G, M, L)]
    array, packed tile by tile, or PackedWeights' panels (a 4-D array)."""
    tiles, bounds, max_rows = tiles
    if act_out is None:
        act_out = np.empty((0, 0), out.dtype)
    if b.ndim == 4:
        panels, b = b, np.empty((1, 1, 1), b.dtype)
    else:
        panels = np.empty((0, num_panels(M, half), 0, kg.NR), b.dtype)
    with vectorizer_flags():
        kg.grouped_gemm_kernel(src, ridx, trans, panels, b, btrans, M, tiles, bounds, max_rows,
                               half, out, act_out, code, store_out)


# Forward products on raw weights take a way per expert: one with at most STREAM_ROWS rows is
# streamed (kernels/cpu/gemm.py's stream_kernel reads its weights from memory once; the
# activation runs apart, on the few rows), one with more goes to single-threaded BLAS on
# ops/pool.py's threads.
STREAM_ROWS = 12


def streamed(offsets):
    """(E,) bool: the experts whose rows a forward product streams, 1..STREAM_ROWS rows (host
    offsets), unless the experts average large blocks (then none); the others with rows go
    to per-expert BLAS."""
    counts = np.diff(offsets)
    return (counts > 0) & (counts <= STREAM_ROWS) & (not large_blocks(offsets))


def expert_runs(offsets, experts):
    """[(lo, hi)]: the rows of the experts in the (E,) bool mask, consecutive experts merged."""
    runs = []
    for e in np.flatnonzero(experts):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def run_stream(src, w, trans_w, offsets, out, experts, ridx=None):
    """out[rows of e] = src[rows] @ B_e for every expert with rows where the (E,) bool mask
    `experts` is True, each expert's weights streamed from memory once (stream_kernel, then
    stream_sum of the partial products). ridx (N,): the rows are src[ridx[rows]]."""
    tasks, groups, size = kg.stream_plan(offsets, experts, src.shape[1], out.shape[1],
                                         trans_w)
    part = np.empty(size, out.dtype)
    if ridx is None:
        ridx = np.arange(out.shape[0], dtype=np.int64)
    kg.stream_kernel(src, ridx, w, trans_w, offsets, tasks, part)
    kg.stream_sum(part, tasks, groups, offsets, out)


def expert_tiles(offsets, P, K):
    """Tiles of a forward-shaped product: expert e's rows offsets[e]..offsets[e+1] of A and C,
    group e, the whole depth K."""
    E = offsets.shape[0] - 1
    lo = offsets[:-1]
    return make_tiles(np.diff(offsets), lo, lo, np.arange(E), np.zeros(E), np.full(E, K), P)


def _check_packed(w, name):
    """PackedWeights' fields agree with each other (a user may build or edit one): panels a
    C-contiguous float (E, P, K, NR) array with P and NR those pack_weights makes for shape."""
    shape = w.shape
    if (not isinstance(shape, tuple) or len(shape) != 3
            or not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape)):
        raise ValueError(f"{name}.shape: expected the (E, K, M) tuple of the packed weights, "
                         f"got {shape!r}")
    if not isinstance(w.panels, np.ndarray):
        raise TypeError(f"{name}.panels: expected a NumPy array from pack_weights, got "
                        f"{type(w.panels).__name__}")
    chk.check_float(f"{name}.panels", w.panels, ndim=4)
    M, half = w.out_features, w.out_features // 2 if w.swiglu else 0
    if w.swiglu and M % 2:
        raise ValueError(f"{name}.swiglu: expected an even number of output columns, got {M}")
    P = -(-(half if half else M) // (kg.HN if half else kg.NR))
    want = (shape[0], P, w.in_features, kg.NR)
    if tuple(w.panels.shape) != want or not w.panels.flags.c_contiguous:
        raise ValueError(f"{name}.panels: expected a C-contiguous array of shape {want} for "
                         f"{w!r}, got shape {tuple(w.panels.shape)}; pack again with "
                         f"pack_weights")


def check_weights(w, a, offsets, trans_w, name="w"):
    """w: an array (validated like check_gemm_args) or PackedWeights -> (w, offsets, M)."""
    if isinstance(w, PackedWeights):
        _check_packed(w, name)
        if w.dtype != a.dtype:
            raise TypeError(f"{name}: expected dtype {a.dtype} (the dtype of a; mixed dtypes "
                            f"are not cast), got PackedWeights of {w.dtype}")
        if w.in_features != a.shape[1]:
            raise ValueError(f"{name}: expected PackedWeights with K = a.shape[1] = "
                             f"{a.shape[1]}, got {w!r}")
        offsets = check_offsets(as_host("offsets", offsets), w.num_experts, a.shape[0])
        return w, offsets, w.out_features
    _, w, offsets, M = check_gemm_args(a, w, offsets, trans_w)
    return w, offsets, M


# From this many rows an expert on average, per-expert OpenBLAS calls beat both the packed
# Numba kernel and streaming (which wins below STREAM_ROWS); re-derive with
# `python bench/compare.py` at 8-512 tokens (figures: docs/performance.md). BLAS runs on
# ops/pool.py's threads, one BLAS thread each, never inside a prange region.
BLAS_MIN_ROWS = 16


def large_blocks(offsets):
    """True when the non-empty experts average at least BLAS_MIN_ROWS rows (host offsets)."""
    counts = np.diff(offsets)
    busy = np.count_nonzero(counts)
    return busy > 0 and offsets[-1] >= BLAS_MIN_ROWS * busy


def weight(w, e, trans_w):
    """B_e, expert e's (K, M) operand: w[e], or w[e].T (a view) for the (E, M, K) layout."""
    return w[e].T if trans_w else w[e]


COLS = 512    # columns of dW a task takes (fixed by the shapes: bitwise the same results)


def weight_grad_tasks(offsets, ncols, tag=0, experts=None):
    """[(tag, e, c0, c1)]: the tasks of weight_grad_task for every expert with rows (of
    `experts`, when given)."""
    experts = range(offsets.shape[0] - 1) if experts is None else experts
    return [(tag, e, c0, min(c0 + COLS, ncols)) for e in experts
            if offsets[e + 1] > offsets[e] for c0 in range(0, ncols, COLS)]


def weight_grad(lhs_e, rhs_e, trans_w, out, scratch=None, name="dw"):
    """One expert's weight gradient (one BLAS call): lhs_e (n, K), rhs_e (n, M) its rows ->
    out = lhs_e^T @ rhs_e (K, M), or with trans_w out = rhs_e^T @ lhs_e (M, K). With a thread's
    scratch dict it is added into out instead (computed in the buffer `name`, added while in
    cache)."""
    if scratch is not None:
        g = pool.buffer(scratch, name, *out.shape, out.dtype)
        weight_grad(lhs_e, rhs_e, trans_w, g)
        out += g
    elif trans_w:
        np.matmul(rhs_e.T, lhs_e, out=out)
    else:
        np.matmul(lhs_e.T, rhs_e, out=out)


def weight_grad_task(lhs, rhs, offsets, trans_w, dw, e, c0, c1, scratch=None):
    """Columns c0..c1 of rhs (N, M) for expert e's weight gradient dw[e] (weight_grad of its
    rows offsets[e]..offsets[e+1] of lhs (N, K) and rhs); with a scratch dict, added into
    dw[e] instead of written."""
    lo, hi = offsets[e], offsets[e + 1]
    weight_grad(lhs[lo:hi], rhs[lo:hi, c0:c1], trans_w,
                dw[e, c0:c1] if trans_w else dw[e, :, c0:c1], scratch)


def blas_weight_grads(jobs, offsets, trans_w, experts=None):
    """jobs: [(lhs, rhs, dw, add)] -> each dw (E, ...) filled as weight_grad_task describes for
    every expert (of `experts`, when given), zero for experts without rows — or, with add,
    the gradients added into dw (experts without rows left as they are); all jobs' tasks on
    the pool in one go."""
    tasks = [t for i, (_, rhs, _, _) in enumerate(jobs)
             for t in weight_grad_tasks(offsets, rhs.shape[1], i, experts)]

    def task(t, scratch):
        lhs, rhs, dw, add = jobs[t[0]]
        weight_grad_task(lhs, rhs, offsets, trans_w, dw, *t[1:], scratch if add else None)

    pool.run_tasks(task, tasks)
    empty = offsets[1:] == offsets[:-1]
    for _, _, dw, add in jobs:
        if not add:
            dw[empty] = 0.0


def grouped_gemm(a, w, offsets, trans_w=False):
    """a: (N, K), w: (E, K, M) — or (E, M, K) with trans_w, the PyTorch Linear layout used
    without a copy —, or PackedWeights from pack_weights(w, trans_w); offsets: (E+1,)
    -> (N, M); rows offsets[e]:offsets[e+1] are a[rows] @ w[e] (or @ w[e].T)."""
    if not isinstance(w, PackedWeights) and backend_of(a=a, w=w) == CUDA:
        return cuda_module().grouped_gemm(a, w, offsets, trans_w)
    a = chk.check_float("a", as_host("a", a), ndim=2)
    w, offsets, M = check_weights(w, a, offsets, bool(trans_w))
    a = np.ascontiguousarray(a)
    out = np.empty((a.shape[0], M), a.dtype)
    trans_w = bool(trans_w)
    if isinstance(w, PackedWeights):
        half = M // 2 if w.swiglu else 0
        run_gemm(a, np.arange(a.shape[0], dtype=np.int64), False, w.panels, trans_w, M, half,
                 expert_tiles(offsets, num_panels(M, half), a.shape[1]), out)
        return out
    light = streamed(offsets)
    if light.any():                          # a few rows: the expert's weights streamed once
        run_stream(a, np.ascontiguousarray(w), trans_w, offsets, out, light)
    pool.run_tasks(lambda t, _: np.matmul(a[t[1]:t[2]], weight(w, t[0], trans_w),
                                          out=out[t[1]:t[2]]),
                   pool.row_tasks(offsets, experts=~light))    # BLAS per block of rows
    return out


def grouped_gemm_backward(dy, a, w, offsets, trans_w=False):
    """The gradients of grouped_gemm. dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)],
    offsets: (E+1,) -> da (N, K), dw (E, K, M) [trans_w: (E, M, K)], dw in w's layout.

    da[rows of e] = dy[rows] @ w[e].T; dw[e] = a[rows].T @ dy[rows], zero for an expert with
    no rows. dw's sum over an expert's rows runs in one thread in row order: deterministic."""
    if backend_of(dy=dy, a=a, w=w) == CUDA:
        return cuda_module().grouped_gemm_backward(dy, a, w, offsets, trans_w)
    trans_w = bool(trans_w)
    a, w, offsets, M = check_gemm_args(a, w, offsets, trans_w)
    dy = chk.check_float("dy", as_host("dy", dy), shape=(a.shape[0], M), dtype=a.dtype)
    a, dy, w = np.ascontiguousarray(a), np.ascontiguousarray(dy), np.ascontiguousarray(w)
    N, K = a.shape
    E = w.shape[0]
    if large_blocks(offsets):                # BLAS per block of rows, and of dW's columns
        da = np.empty((N, K), a.dtype)
        pool.run_tasks(lambda t, _: np.matmul(dy[t[1]:t[2]], weight(w, t[0], trans_w).T,
                                              out=da[t[1]:t[2]]), pool.row_tasks(offsets))
        dw = np.empty(w.shape, a.dtype)
        blas_weight_grads([(a, dy, dw, False)], offsets, trans_w)
        return da, dw
    ident = np.arange(N, dtype=np.int64)
    # da = dy @ B_e with B_e = w[e].T (M, K): w read transposed unless trans_w
    da = np.empty((N, K), a.dtype)
    run_gemm(dy, ident, False, w, not trans_w, K, 0, expert_tiles(offsets, num_panels(K, 0), M),
             da)
    # dw[e] (K, M) = a_e^T @ dy_e; trans_w: dw[e] (M, K) = dy_e^T @ a_e. The depth is the
    # expert's rows; C is dw viewed as (E*R, C) with R, C = dw[e]'s shape.
    lhs, rhs = (dy, a) if trans_w else (a, dy)
    R, C = lhs.shape[1], rhs.shape[1]
    dw = np.empty((E, R, C), a.dtype)
    lo, hi = offsets[:-1], offsets[1:]
    tiles = make_tiles(np.where(hi > lo, R, 0), np.zeros(E), np.arange(E) * R, np.zeros(E),
                       lo, hi, num_panels(C, 0))
    run_gemm(lhs, ident, True, rhs[None], False, C, 0, tiles, dw.reshape(E * R, C))
    dw[hi == lo] = 0.0
    return da, dw
