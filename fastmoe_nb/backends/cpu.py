"""The CPU backend: the host side of every op over the kernels of kernels/cpu/.

Inputs are validated by the ops (fastmoe_nb.ops, fastmoe_nb.checks): host arrays of one float
dtype, contiguous where a kernel reads them raw, shapes consistent, offsets in order. Nothing
here checks again.

A grouped product over expert blocks runs one of three ways, and route() alone decides which,
from the sizes of the blocks (constants: kernels/cpu/config.py):
- stream: an expert with a few rows has its raw weights read once, unpacked, in blocks of
  depth rows (kernels/cpu/gemm.py: stream_kernel), the partial products added in a fixed
  order (stream_sum). Decoding is bound by that read.
- BLAS: an expert with more rows goes to single-threaded BLAS per block of its rows on the
  pool's threads (backends/pool.py), and every expert does when the experts average large
  blocks; an expert's activation runs on its rows while they are in cache.
- kernel: the packed, register-blocked Numba kernel (grouped_gemm_kernel), one parallel loop
  over the tiles of all experts; PackedWeights always take it, and so does the backward of
  small batches. Raw weights are packed tile by tile inside it (read once from memory, the
  packed copy stays in cache).
Weights in a format (fastmoe_nb.formats: bf16, q8_0, q4_0, ...) are decoded a panel of columns
at a time into a task's scratch, each value once per product, and multiplied by BLAS
(quantized_gemm); they are frozen, so their backward gives the inputs' gradient only. bf16
weights that ask for bf16 activations (QuantizedWeights.activations) run kernels/cpu/bf16dot.py's
native bf16 dot products instead where the CPU has AVX512_BF16 (_native_bf16); weights in a
GGUF block format that ask for q8_0 activations have their streamed experts' (M, K) products made
by kernels/cpu/int8dot.py's integer dot products.
Every way cuts its work from the shapes alone: results are bitwise the same for any thread
count.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from ..kernels.common import SWIGLU
from ..kernels.cpu import activations as ka
from ..kernels.cpu import bf16dot as kb
from ..kernels.cpu import dispatch as kd
from ..kernels.cpu import gemm as kg
from ..kernels.cpu import int8dot as ki
from ..kernels.cpu import quant as kq
from ..kernels.cpu import routing as kr
from ..formats import QuantizedWeights, dequantize_rows
from ..kernels.cpu.config import (BLAS_MIN_ROWS, FUSED_MAX_ROWS, HN, LOGITS_LOOP_ROWS, MR, NC, NR,
                                  QSTREAM_ROWS, QUANT_COLS, STREAM_ROWS, TASK_COLS, TILE_ROWS)
from ..types import PackedWeights, Plan, Routing
from . import pool

# --------------------------------------------------------------------------- the route


class Route(NamedTuple):
    """How one grouped product over the expert blocks of `offsets` runs (route())."""

    kernel: bool          # the packed Numba kernel, every expert in one parallel loop
    stream: np.ndarray    # (E,) bool: experts whose weights are streamed (forward only)
    blas: np.ndarray      # (E,) bool: experts through single-threaded BLAS per block of rows


def large_blocks(offsets):
    """True when the non-empty experts average at least BLAS_MIN_ROWS rows (host offsets)."""
    return kg.route_masks(offsets, STREAM_ROWS, BLAS_MIN_ROWS)[4]


def route(offsets, packed=False, backward=False, quantized=False):
    """The way a grouped product runs on the CPU, from its (E+1,) host offsets alone.

    packed weights: the kernel. Forward on raw weights: experts with 1..STREAM_ROWS rows
    streamed, the others with rows through BLAS, unless the experts average large blocks
    (large_blocks): then all through BLAS. Backward: BLAS when the blocks are large, else the
    kernel (streaming serves the forward's few rows only). Weights in a format (quantized,
    forward and the frozen backward's dx alike): experts with 1..QSTREAM_ROWS rows streamed
    by the decoding GEMM, each other one decoded a panel at a time for BLAS (an expert's choice
    does not depend on the others': both ways decode its weights once)."""
    few, more, busy, none, large = kg.route_masks(
        offsets, QSTREAM_ROWS if quantized else STREAM_ROWS, BLAS_MIN_ROWS)
    if packed:
        return Route(True, none, none)
    if quantized:
        return Route(False, few, more)
    if backward:
        return Route(not large, none, busy if large else none)
    return Route(False, none, busy) if large else Route(False, few, more)


# --------------------------------------------------------------------------- the kernel way

def num_panels(M, half):
    """Panels of NR columns of a product with M columns (half > 0: swiglu-interleaved)."""
    return -(-half // HN) if half else -(-M // NR)


def _chunks(cost, n):
    """Split tiles 0..len(cost)-1 into n contiguous runs of about equal cost -> (n+1,)."""
    if len(cost) == 0:
        return np.zeros(n + 1, np.int64)
    cum = np.cumsum(cost, dtype=np.float64)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="left")
    return np.concatenate([[0], cuts, [len(cost)]]).astype(np.int64)


def make_tiles(rows, r0, r_out, g, k0, k1, P):
    """One job per entry (rows of C, their first A row, first C row, group, depth range) ->
    (tiles (n, 7) int64, bounds (nthreads+1,) int64, max rows of a tile) for
    grouped_gemm_kernel: jobs cut into TILE_ROWS-row and NC-column tiles, split by cost over
    numba's threads."""
    rows, r0, r_out, g, k0, k1 = (np.asarray(v, np.int64) for v in (rows, r0, r_out, g, k0, k1))
    keep = rows > 0
    rows, r0, r_out, g, k0, k1 = (v[keep] for v in (rows, r0, r_out, g, k0, k1))
    ncb = -(-P // (NC // NR))
    nrb = -(-rows // TILE_ROWS)
    job = np.repeat(np.arange(rows.shape[0]), nrb * ncb)
    within = np.arange(job.shape[0]) - np.repeat(np.cumsum(nrb * ncb) - nrb * ncb, nrb * ncb)
    rb, cb = within // ncb, within % ncb
    m = np.minimum(TILE_ROWS, rows[job] - rb * TILE_ROWS)
    tiles = np.stack([g[job], r0[job] + rb * TILE_ROWS, m, r_out[job] + rb * TILE_ROWS,
                      k0[job], k1[job], cb * (NC // NR)], axis=1).astype(np.int64)
    ncols = np.minimum(NC // NR, P - tiles[:, 6])
    cost = (-(-m // MR) * MR + MR) * ncols * np.maximum(k1[job] - k0[job], 1)
    max_rows = int(m.max()) if m.size else 0
    return np.ascontiguousarray(tiles), _chunks(cost, numba.get_num_threads()), max_rows


def expert_tiles(offsets, P, K):
    """Tiles of a forward-shaped product: expert e's rows offsets[e]..offsets[e+1] of A and C,
    group e, the whole depth K."""
    E = offsets.shape[0] - 1
    lo = offsets[:-1]
    return make_tiles(np.diff(offsets), lo, lo, np.arange(E), np.zeros(E), np.full(E, K), P)


def run_gemm(src, ridx, trans, b, btrans, M, half, tiles, out, act_out=None, code=-1,
             store_out=True):
    """grouped_gemm_kernel. b: a (G, L, M) [btrans: (G, M, L)] array, packed tile by tile, or
    PackedWeights' panels (a 4-D array)."""
    tiles, bounds, max_rows = tiles
    if act_out is None:
        act_out = np.empty((0, 0), out.dtype)
    if b.ndim == 4:
        panels, b = b, np.empty((1, 1, 1), b.dtype)
    else:
        panels = np.empty((0, num_panels(M, half), 0, NR), b.dtype)
    kg.grouped_gemm_kernel(src, ridx, trans, panels, b, btrans, M, tiles, bounds, max_rows,
                           half, out, act_out, code, store_out)


def pack_weights(w, trans_w, swiglu):
    """w: (E, K, M) [trans_w: (E, M, K)] contiguous -> PackedWeights (swiglu: M even)."""
    M = w.shape[1] if trans_w else w.shape[2]
    half = M // 2 if swiglu else 0
    L = w.shape[2] if trans_w else w.shape[1]
    out = np.empty((w.shape[0], num_panels(M, half), L, NR), w.dtype)
    kg.pack_panels(w, trans_w, half, out)
    return PackedWeights(out, tuple(int(s) for s in w.shape), trans_w, bool(swiglu))


def _gemm_kernel(a, ridx, b, offsets, trans_w, M, half, out, act_out=None, code=-1,
                 store_out=True):
    """The forward-shaped product on the kernel: rows of expert e of a[ridx] times B_e."""
    run_gemm(a, ridx, False, b, trans_w, M, half,
             expert_tiles(offsets, num_panels(M, half), a.shape[1]), out, act_out, code,
             store_out)


# --------------------------------------------------------------------------- stream and BLAS

def weight(w, e, trans_w):
    """B_e, expert e's (K, M) operand: w[e], or w[e].T (a view) for the (E, M, K) layout."""
    return w[e].T if trans_w else w[e]


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
    """out[rows of e] = src[rows] @ B_e for every expert where the (E,) bool mask `experts` is
    True, each expert's weights streamed from memory once (stream_kernel, then stream_sum of
    the partial products). ridx (N,): the rows are src[ridx[rows]]."""
    tasks, groups, size = kg.stream_plan(offsets, experts, src.shape[1], out.shape[1],
                                         trans_w)
    part = np.empty(size, out.dtype)
    if ridx is None:
        ridx = np.arange(out.shape[0], dtype=np.int64)
    kg.stream_kernel(src, ridx, w, trans_w, offsets, tasks, part)
    kg.stream_sum(part, tasks, groups, offsets, out)


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


def weight_grad_tasks(offsets, ncols, tag=0, experts=None):
    """[(tag, e, c0, c1)]: an expert's weight gradient cut into blocks of TASK_COLS columns,
    for every expert with rows (of `experts`, when given)."""
    experts = range(offsets.shape[0] - 1) if experts is None else experts
    return [(tag, e, c0, min(c0 + TASK_COLS, ncols)) for e in experts
            if offsets[e + 1] > offsets[e] for c0 in range(0, ncols, TASK_COLS)]


def blas_weight_grads(jobs, offsets, trans_w, experts=None):
    """jobs: [(lhs (N, K), rhs (N, M), dw (E, ...), add)] -> each dw[e] = the weight gradient
    of expert e's rows (weight_grad), per block of columns, for every expert (of `experts`,
    when given), zero for experts without rows — or, with add, added into dw (experts without
    rows left as they are); all jobs' tasks on the pool in one go."""
    tasks = [t for i, (_, rhs, _, _) in enumerate(jobs)
             for t in weight_grad_tasks(offsets, rhs.shape[1], i, experts)]

    def task(t, scratch):
        lhs, rhs, dw, add = jobs[t[0]]
        _, e, c0, c1 = t
        lo, hi = offsets[e], offsets[e + 1]
        weight_grad(lhs[lo:hi], rhs[lo:hi, c0:c1], trans_w,
                    dw[e, c0:c1] if trans_w else dw[e, :, c0:c1], scratch if add else None)

    pool.run_tasks(task, tasks)
    empty = offsets[1:] == offsets[:-1]
    for _, _, dw, add in jobs:
        if not add:
            dw[empty] = 0.0


# --------------------------------------------------------------------------- grouped GEMM

def grouped_gemm(a, w, offsets, trans_w):
    # a: (N, K) contiguous, w: (E, K, M) [trans_w: (E, M, K)], PackedWeights or
    # QuantizedWeights -> (N, M)
    if isinstance(w, QuantizedWeights):
        return quantized_gemm(a, w, offsets, trans_w)
    r = route(offsets, packed=isinstance(w, PackedWeights))
    if r.kernel:
        M = w.out_features
        out = np.empty((a.shape[0], M), a.dtype)
        _gemm_kernel(a, np.arange(a.shape[0], dtype=np.int64), w.panels, offsets, trans_w, M,
                     M // 2 if w.swiglu else 0, out)
        return out
    out = np.empty((a.shape[0], w.shape[1] if trans_w else w.shape[2]), a.dtype)
    if r.stream.any():
        run_stream(a, np.ascontiguousarray(w), trans_w, offsets, out, r.stream)
    pool.run_tasks(lambda t, _: np.matmul(a[t[1]:t[2]], weight(w, t[0], trans_w),
                                          out=out[t[1]:t[2]]),
                   pool.row_tasks(offsets, experts=r.blas))
    return out


def grouped_gemm_backward(dy, a, w, offsets, trans_w):
    # dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], all contiguous
    # -> da (N, K), dw in w's layout
    N, K = a.shape
    E = w.shape[0]
    da = np.empty((N, K), a.dtype)
    if not route(offsets, backward=True).kernel:      # BLAS per block of rows and of columns
        pool.run_tasks(lambda t, _: np.matmul(dy[t[1]:t[2]], weight(w, t[0], trans_w).T,
                                              out=da[t[1]:t[2]]), pool.row_tasks(offsets))
        dw = np.empty(w.shape, a.dtype)
        blas_weight_grads([(a, dy, dw, False)], offsets, trans_w)
        return da, dw
    ident = np.arange(N, dtype=np.int64)
    # da = dy @ B_e with B_e = w[e].T (M, K): w read transposed unless trans_w
    run_gemm(dy, ident, False, w, not trans_w, K, 0,
             expert_tiles(offsets, num_panels(K, 0), dy.shape[1]), da)
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


# --------------------------------------------------------------------------- expert MLPs

def activate(h, code):
    # h: (N, H) contiguous -> (N, H); swiglu: h (N, 2H) -> (N, H)
    out = np.empty((h.shape[0], h.shape[1] // 2 if code == SWIGLU else h.shape[1]), h.dtype)
    ka.activate_kernel(h, code, out)
    return out


def activate_backward(dy, h, code):
    # dy: (N, H), h: (N, H1), both contiguous -> dh: (N, H1)
    dh = np.empty_like(h)
    ka.activate_backward_kernel(dy, h, code, dh)
    return dh


def experts_forward(xs, w1, w2, offsets, code, h, trans_w, keep, tokens=None):
    """The expert MLPs on tokens in expert order. xs: (N, d) contiguous — or, with tokens
    (N,) int64, x (T, d) whose rows xs[i] = x[tokens[i]] are gathered as they are loaded
    (permute fused: xs is never written) —, w1: (E, d, H1), w2: (E, h, d) [trans_w:
    transposed], either may be PackedWeights (then tokens is None)
    -> (h_pre (N, H1) or None, h_act (N, h) or None, ys (N, d)); h_pre only when keep, h_act
    None only when tokens are given and not keep (it stayed in the threads' scratch)."""
    if isinstance(w1, PackedWeights) or isinstance(w2, PackedWeights):
        return _experts_forward_packed(xs, w1, w2, offsets, code, h, trans_w, keep)
    if isinstance(w1, QuantizedWeights) or isinstance(w2, QuantizedWeights):
        return _experts_forward_quantized(xs, w1, w2, offsets, code, trans_w, keep, tokens)
    N, H1 = offsets[-1], w1.shape[1] if trans_w else w1.shape[2]
    h_pre = np.empty((N, H1), xs.dtype) if keep else None
    h_act = np.empty((N, h), xs.dtype) if keep or tokens is None else None
    ys = np.empty((N, w2.shape[1] if trans_w else w2.shape[2]), xs.dtype)
    r = route(offsets)
    if r.stream.any():                 # both products streamed, the activation apart
        hp = h_pre if keep else np.empty((N, H1), xs.dtype)     # only light rows touched
        ha = np.empty((N, h), xs.dtype) if h_act is None else h_act
        run_stream(xs, np.ascontiguousarray(w1), trans_w, offsets, hp, r.stream, tokens)
        for lo, hi in expert_runs(offsets, r.stream):
            ka.activate_rows(hp[lo:hi], code, ha[lo:hi])
        run_stream(ha, np.ascontiguousarray(w2), trans_w, offsets, ys, r.stream)

    def task(t, scratch):
        # one block of an expert's rows: h_pre = xs_b @ B1_e (BLAS), h_act = act(h_pre) while
        # the block is in cache, ys_b = h_act @ B2_e (BLAS); h_pre (unless kept), the
        # gathered rows and h_act (not kept, tokens given) in the thread's scratch
        e, lo, hi = t
        if tokens is None:
            xb = xs[lo:hi]
        else:
            xb = pool.buffer(scratch, "xs", hi - lo, xs.shape[1], xs.dtype)
            kd.permute_rows(xs, tokens[lo:hi], 1, xb)
        hp = h_pre[lo:hi] if keep else pool.buffer(scratch, "h_pre", hi - lo, H1, xs.dtype)
        np.matmul(xb, weight(w1, e, trans_w), out=hp)
        ha = pool.buffer(scratch, "h_act", hi - lo, h, xs.dtype) if h_act is None \
            else h_act[lo:hi]
        ka.activate_rows(hp, code, ha)
        np.matmul(ha, weight(w2, e, trans_w), out=ys[lo:hi])

    pool.run_tasks(task, pool.row_tasks(offsets, experts=r.blas))
    return h_pre, h_act, ys


def _experts_forward_packed(xs, w1, w2, offsets, code, h, trans_w, keep):
    # experts_forward with w1 and / or w2 packed: the kernel for the packed product(s); the
    # activation in w1's epilogue when its panels were packed for it (swiglu or not)
    N = xs.shape[0]
    swiglu = code == SWIGLU
    if isinstance(w1, PackedWeights) and w1.swiglu == swiglu:
        H1 = w1.out_features
        h_pre = np.empty((N, H1), xs.dtype) if keep else np.empty((0, 0), xs.dtype)
        h_act = np.empty((N, h), xs.dtype)
        _gemm_kernel(xs, np.arange(N, dtype=np.int64), w1.panels, offsets, trans_w, H1,
                     H1 // 2 if swiglu else 0, h_pre, h_act, code, keep)
    else:                            # w2 packed only, or w1 packed for the other activation
        h_pre = grouped_gemm(xs, w1, offsets, trans_w)
        h_act = activate(h_pre, code)
    ys = grouped_gemm(h_act, w2, offsets, trans_w)
    return (h_pre if keep else None), h_act, ys


def experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets, code, trans_w, into=None):
    """The gradients of experts_forward (raw weights, every operand contiguous) -> (d_xs,
    dw1, dw2). into: None or (dw1, dw2) accumulators (either None) the weight gradients are
    added into, returned in their place. Weights in a format are frozen: dw1 = dw2 = None."""
    if isinstance(w1, QuantizedWeights) or isinstance(w2, QuantizedWeights):
        d_h_act = grouped_gemm(d_ys, _raw(w2), offsets, not trans_w)
        d_h_pre = activate_backward(d_h_act, h_pre, code)
        return grouped_gemm(d_h_pre, _raw(w1), offsets, not trans_w), None, None
    if not route(offsets, backward=True).kernel:
        return _experts_backward_blas(d_ys, xs, h_pre, h_act, w1, w2, offsets, code, trans_w,
                                      into)
    w1, w2 = np.ascontiguousarray(w1), np.ascontiguousarray(w2)     # the kernel reads them raw
    d_h_act, dw2 = grouped_gemm_backward(d_ys, h_act, w2, offsets, trans_w)
    d_h_pre = activate_backward(d_h_act, h_pre, code)
    d_xs, dw1 = grouped_gemm_backward(d_h_pre, xs, w1, offsets, trans_w)
    if into is not None:
        dw1, dw2 = (g if a is None else add_into(a, g) for a, g in zip(into, (dw1, dw2)))
    return d_xs, dw1, dw2


def _experts_forward_quantized(xs, w1, w2, offsets, code, trans_w, keep, tokens):
    # experts_forward with w1 and / or w2 in a format: each product through grouped_gemm
    # (quantized_gemm for a weight in a format), the activation between on the whole block;
    # a prefill with w1 on native bf16 dot products has the gather and the activation fused
    # into w1's product instead
    if _native_bf16(w1) and not route(offsets).stream.any():
        h_pre, h_act = _native_first(xs, w1, offsets, code, trans_w, keep, tokens)
        ys = grouped_gemm(h_act, _raw(w2), offsets, trans_w)
        return h_pre, h_act, ys
    if _int8_mlp(w1, w2, trans_w):
        r = route(offsets, quantized=True)
        if not r.blas.any():                 # a decoding step: every expert streamed
            parts1 = w1.blocks if w1.stacked else (w1.blocks,)
            h_pre, h_act, ys = ki.run_mlp(xs, tokens, offsets, r.stream, parts1, w2.blocks,
                                          _kernel_format(w1), _kernel_format(w2), code,
                                          w2.shape[2])
            return (h_pre if keep else None), h_act, ys
    if tokens is not None:
        x, xs = xs, np.empty((tokens.shape[0], xs.shape[1]), xs.dtype)
        kd.permute_kernel(x, tokens, 1, xs)
    h_pre = grouped_gemm(xs, _raw(w1), offsets, trans_w)
    h_act = activate(h_pre, code)
    ys = grouped_gemm(h_act, _raw(w2), offsets, trans_w)
    return (h_pre if keep else None), (h_act if keep or tokens is None else None), ys


def _int8_mlp(w1, w2, trans_w):
    """True when a decoding step's expert MLP runs as one call of int8dot.run_mlp: both weights
    in a GGUF block format asking for q8_0 activations, in the (M, K) layout, w2 one blocks
    array and w1 one or two (stack(gate, up))."""
    return (trans_w and all(isinstance(w, QuantizedWeights) and w.activations == "q8_0"
                            and _kernel_format(w) in ki.FORMATS for w in (w1, w2))
            and (not w1.stacked or len(w1.blocks) == 2) and not w2.stacked)


def _native_bf16(w):
    """True when w's products run on kernels/cpu/bf16dot.py: a bf16 weight (one blocks array,
    not stacked parts) asking for bf16 activations, on a CPU with AVX512_BF16 (otherwise the
    exact float32 path)."""
    return (isinstance(w, QuantizedWeights) and w.activations == "bf16" and kb.NATIVE
            and not w.stacked and _kernel_format(w) is not None)


def _native_first(x, w1, offsets, code, trans_w, keep, tokens):
    # w1's product on the native bf16 kernel with the activation in its epilogue, the rows
    # x[tokens] gathered as they are packed (tokens None: x's rows) -> (h_pre or None, h_act)
    H1 = w1.shape[1] if trans_w else w1.shape[2]
    half = H1 // 2 if code == SWIGLU else 0
    N = int(offsets[-1])
    h_pre = np.empty((N, H1) if keep else (0, 0), np.float32)
    h_act = np.empty((N, half or H1), np.float32)
    ridx = np.arange(N, dtype=np.int64) if tokens is None else tokens
    kb.run(x, w1.blocks, trans_w, H1, expert_tiles(offsets, num_panels(H1, half),
                                                   kb.pairs(x.shape[1])),
           h_pre, ridx, half, h_act, code, keep)
    return (h_pre if keep else None), h_act


def _raw(w):
    """A weight in a format as it is; a float array contiguous (the kernel reads it raw)."""
    return w if isinstance(w, QuantizedWeights) else np.ascontiguousarray(w)


def _experts_backward_blas(d_ys, xs, h_pre, h_act, w1, w2, offsets, code, trans_w, into):
    # An expert with <= FUSED_MAX_ROWS rows is one task: d_h_act = d_ys_e @ B2_e^T,
    # d_h_pre = act'(...), d_xs_e = d_h_pre @ B1_e^T and its weight gradients while its rows
    # are in cache (d_h_pre in the thread's scratch). A larger expert runs per block of rows
    # (d_h_pre kept), then its weight gradients per block of columns (blas_weight_grads), so
    # that it alone still keeps every thread busy. Which way an expert goes depends on its
    # row count only: results do not depend on threads. Weight gradients added into `into`
    # are computed in scratch and added while in cache (no fresh arrays, no second pass).
    N, d = xs.shape
    H1 = h_pre.shape[1]
    counts = np.diff(offsets)
    big = np.flatnonzero(counts > FUSED_MAX_ROWS)
    d_h_pre = np.empty(h_pre.shape, xs.dtype) if big.size else None
    d_xs = np.empty((N, d), xs.dtype)
    add1, add2 = (False, False) if into is None else (into[0] is not None, into[1] is not None)
    dw1 = into[0] if add1 else np.empty(w1.shape, xs.dtype)
    dw2 = into[1] if add2 else np.empty(w2.shape, xs.dtype)

    def rows(e, lo, hi, dhp, scratch):           # d_h_pre -> dhp, d_xs of rows lo..hi of e
        dha = pool.buffer(scratch, "d_h_act", hi - lo, h_act.shape[1], xs.dtype)
        np.matmul(d_ys[lo:hi], weight(w2, e, trans_w).T, out=dha)
        ka.activate_backward_rows(dha, h_pre[lo:hi], code, dhp)
        np.matmul(dhp, weight(w1, e, trans_w).T, out=d_xs[lo:hi])

    def task(t, scratch):
        e, lo, hi = t
        if counts[e] > FUSED_MAX_ROWS:
            rows(e, lo, hi, d_h_pre[lo:hi], scratch)
            return
        dhp = pool.buffer(scratch, "d_h_pre", hi - lo, H1, xs.dtype)
        rows(e, lo, hi, dhp, scratch)
        weight_grad(xs[lo:hi], dhp, trans_w, dw1[e], scratch if add1 else None, "dw1")
        weight_grad(h_act[lo:hi], d_ys[lo:hi], trans_w, dw2[e], scratch if add2 else None,
                    "dw2")

    tasks = [t for t in pool.row_tasks(offsets) if counts[t[0]] > FUSED_MAX_ROWS]
    tasks += [(e, int(offsets[e]), int(offsets[e + 1])) for e in range(counts.shape[0])
              if 0 < counts[e] <= FUSED_MAX_ROWS]
    tasks.sort(key=lambda t: t[1] - t[2])            # larger first: the threads end together
    pool.run_tasks(task, tasks)
    if big.size:
        blas_weight_grads([(xs, d_h_pre, dw1, add1), (h_act, d_ys, dw2, add2)], offsets,
                          trans_w, big)
    for dw, add in ((dw1, add1), (dw2, add2)):
        if not add:
            dw[counts == 0] = 0.0
    return d_xs, dw1, dw2


# --------------------------------------------------------------------------- weights in a format

def _columns(qw, c):
    """Where column c of a row of qw's blocks starts (in the storage's own units)."""
    return c // qw.block * qw.block_bytes if qw.spec.storage == np.uint8 else c


def _kernel_format(qw):
    """The format code kernels/cpu/quant.py decodes qw's blocks with, or None (a format it
    lacks, or a part whose blocks are not C-contiguous: the NumPy codec of formats.py then)."""
    ok = all(b.flags.c_contiguous for b in (qw.blocks if qw.stacked else (qw.blocks,)))
    return kq.FORMATS.get(qw.format) if ok else None


def _decode_rows(qw, code, b, e, r0, r1, c0, c1, out):
    # b: one part's (E, R_i, row) blocks; rows r0..r1, columns c0..c1 of expert e
    # -> out (r1 - r0, c1 - c0) of qw's dtype, rows C-contiguous
    if code is not None:
        kq.dequant_rows(b, code, e, r0, r1, c0, c1, out)
    else:                                                    # the NumPy codec of formats.py
        out[:] = dequantize_rows(b[e, r0:r1, _columns(qw, c0):_columns(qw, c1)], qw.format)


def decode_panel(qw, e, rows, c0, c1, scratch):
    """Columns c0..c1 of expert e's product operand B_e, decoded into the thread's scratch:
    (K, c1 - c0) of qw's dtype. rows=False: B_e = W_e, qw holding (E, K, M), the columns along its
    blocked last axis; rows=True: B_e = W_e^T, qw holding (E, M, K): the columns are rows
    c0..c1 of W_e (a transposed view of their decoding). A stacked weight's parts fill their
    own rows of W_e, so a panel may span parts."""
    E, R, C = qw.shape
    code = _kernel_format(qw)
    if rows:
        out = pool.buffer(scratch, "panel", c1 - c0, C, qw.dtype)
        for p0, b in qw.parts:
            s0, s1 = max(c0, p0), min(c1, p0 + b.shape[1])
            if s0 < s1:
                _decode_rows(qw, code, b, e, s0 - p0, s1 - p0, 0, C, out[s0 - c0:s1 - c0])
        return out.T
    out = pool.buffer(scratch, "panel", R, c1 - c0, qw.dtype)
    for p0, b in qw.parts:
        _decode_rows(qw, code, b, e, 0, b.shape[1], c0, c1, out[p0:p0 + b.shape[1]])
    return out


def _stream_parts(a, qw, code, trans, offsets, out, stream):
    # out[rows of the streamed experts] = a[rows] @ B_e, each part's blocks read once by the
    # decoding GEMM (it takes one contiguous blocks array; kernels/cpu/int8dot.py's for a
    # weight asking for q8_0 activations). trans: a part is a block of output
    # columns, decoded into its own (N, R_i) array and copied in; else a block of depth rows
    # (a's columns p0..p1, gathered for the streamed rows only) whose products are added in
    # part order.
    run_qstream = ki.run_qstream if qw.activations == "q8_0" else kq.run_qstream
    parts = qw.parts
    if len(parts) == 1:
        run_qstream(a, qw.blocks, code, trans, offsets, out, stream)
        return
    runs = expert_runs(offsets, stream)
    N = a.shape[0]
    if not trans:
        rows = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in runs]
                              + [np.zeros(0, np.int64)])
        ridx = np.zeros(N, np.int64)
        ridx[rows] = np.arange(rows.shape[0])
    for i, (p0, b) in enumerate(parts):
        p1 = p0 + b.shape[1]
        if trans:
            part = np.empty((N, p1 - p0), a.dtype)
            run_qstream(a, b, code, True, offsets, part, stream)
            for lo, hi in runs:
                out[lo:hi, p0:p1] = part[lo:hi]
            continue
        src = np.ascontiguousarray(a[rows, p0:p1])
        part = out if i == 0 else np.empty(out.shape, a.dtype)
        run_qstream(src, b, code, False, offsets, part, stream, ridx)
        if i:
            for lo, hi in runs:
                out[lo:hi] += part[lo:hi]


def quantized_gemm(a, qw, offsets, trans):
    """a: (N, K) contiguous, qw: QuantizedWeights (E, K, M) [trans: (E, M, K)] -> (N, M):
    rows of expert e times B_e = W_e [trans: W_e^T]. The route's streamed experts (a few rows)
    have their blocks read once and decoded in registers (kernels/cpu/quant.py, for the
    formats it has; a stacked weight part by part); for the others a task is one expert's
    block of QUANT_COLS output columns: its panel decoded once into scratch, then one BLAS
    call for all the expert's rows. Shape-fixed cuts: the same bits for any thread count."""
    E, R, C = qw.shape
    M = R if trans else C
    out = np.empty((a.shape[0], M), a.dtype)
    code = _kernel_format(qw)
    r = route(offsets, quantized=True)
    stream, rest = r.stream, r.blas
    if code is None:                         # no decoding GEMM: every busy expert on panels
        stream, rest = np.zeros(E, np.bool_), r.stream | r.blas
    if stream.any():
        _stream_parts(a, qw, code, trans, offsets, out, stream)
    if _native_bf16(qw):                     # opt-in: bf16 activations, vdpbf16ps
        rows = np.where(stream, 0, np.diff(offsets))
        kb.run(a, qw.blocks, trans, M, make_tiles(rows, offsets[:-1], offsets[:-1], np.arange(E),
                                                  np.zeros(E), np.full(E, kb.pairs(a.shape[1])),
                                                  num_panels(M, 0)), out)
        return out
    if not rest.any():
        return out
    tasks = [(e, c0, min(c0 + QUANT_COLS, M)) for e in np.flatnonzero(rest)
             for c0 in range(0, M, QUANT_COLS)]

    def task(t, scratch):
        e, c0, c1 = t
        lo, hi = offsets[e], offsets[e + 1]
        np.matmul(a[lo:hi], decode_panel(qw, e, trans, c0, c1, scratch),
                  out=out[lo:hi, c0:c1])

    pool.run_tasks(task, tasks)
    return out


# --------------------------------------------------------------------------- dense helpers

def matmul(a, b):
    """Dense a @ b, BLAS at one thread a block on the pool (no BLAS threads left spinning)."""
    return pool.matmul(a, b)


def add_into(y, s):
    """y += s in place; returns y."""
    y += s
    return y


def column_sums(a):
    """(T, M) -> (M,): a bias's gradient."""
    return a.sum(axis=0)


def shared_forward(x, w1, w2, gate_w, code):
    """The shared expert: x (T, d), w1 (d, hs|2hs), w2 (hs, d), gate_w (d, 1) or None
    -> (s (T, d), cache)."""
    h_pre = matmul(x, w1)
    h_act = activate(h_pre, code)
    s = matmul(h_act, w2)
    gate = None
    if gate_w is not None:
        gate = 1.0 / (1.0 + np.exp(-matmul(x, gate_w)))
        s = s * gate
    return s, {"h_pre": h_pre, "h_act": h_act, "gate": gate}


def shared_backward(ds, x, w1, w2, gate_w, cache, code):
    """The gradients of shared_forward -> (dx, dw1, dw2, dgate_w (d, 1) or None). The gate's
    gradient <ds, m> per token is taken as <ds @ w2.T, h_act>: m is never recomputed."""
    h_pre, h_act, gate = cache["h_pre"], cache["h_act"], cache["gate"]
    dh_act = matmul(ds, w2.T)                                      # (T, hs)
    dgate_w = dx_gate = None
    if gate_w is not None:
        dz = np.einsum("th,th->t", dh_act, h_act)[:, None] * (gate * (1.0 - gate))  # (T, 1)
        dz = dz.astype(x.dtype)
        dgate_w = matmul(x.T, dz)
        dx_gate = matmul(dz, gate_w.T)
        dh_act *= gate
        ds = ds * gate
    dw2 = matmul(h_act.T, ds)
    dh_pre = activate_backward(np.ascontiguousarray(dh_act), h_pre, code)
    dw1 = matmul(x.T, dh_pre)
    dx = matmul(dh_pre, w1.T)
    if dx_gate is not None:
        dx += dx_gate
    return dx, dw1, dw2, dgate_w


# --------------------------------------------------------------------------- routing

def router_logits(x, router_w, router_b=None):
    """x: (T, d) contiguous, router_w: (d, E), router_b: (E,) or None -> (T, E). Every logit is
    one FMA chain over d in increasing order: a plain loop for a few tokens, else the kernel
    with one group (which sums each output element alone, depth chunks in order)."""
    (T, d), E = x.shape, router_w.shape[1]
    w = np.ascontiguousarray(router_w, dtype=x.dtype)
    logits = np.empty((T, E), x.dtype)
    if T <= LOGITS_LOOP_ROWS:
        kr.logits_kernel(x, w, logits)
    else:
        run_gemm(x, np.arange(T, dtype=np.int64), False, w[None], False, E, 0,
                 expert_tiles(np.array([0, T], np.int64), num_panels(E, 0), d), logits)
    if router_b is not None:
        logits += router_b
    return logits


def softmax(x, check_finite=True):
    out = np.empty_like(x)
    kr.softmax_kernel(x, out)
    return out


def topk(x, k, check_finite=True):
    vals = np.empty((x.shape[0], k), x.dtype)
    idx = np.empty((x.shape[0], k), np.int32)
    kr.topk_kernel(x, k, vals, idx)
    return vals, idx


def softmax_topk(logits, k, renormalize=True, check_finite=True):
    T = logits.shape[0]
    w = np.empty((T, k), logits.dtype)
    idx = np.empty((T, k), np.int32)
    kr.softmax_topk_kernel(logits, k, renormalize, w, idx)
    return Routing(w, idx)


def sigmoid_topk(logits, k, bias=None, n_group=1, topk_group=1, renormalize=True, scale=1.0,
                 check_finite=True):
    T = logits.shape[0]
    w = np.empty((T, k), logits.dtype)
    idx = np.empty((T, k), np.int32)
    b = bias if bias is not None else np.zeros(1, logits.dtype)
    kr.sigmoid_topk_kernel(logits, k, b, bias is not None, n_group, topk_group, renormalize,
                           scale, w, idx)
    return Routing(w, idx)


def softmax_backward(dy, y):
    dx = np.empty_like(y)
    kr.softmax_backward_kernel(dy, y, dx)
    return dx


def softmax_topk_backward(d_weights, logits, experts, renormalize=True):
    d_logits = np.empty_like(logits)
    kr.softmax_topk_backward_kernel(d_weights, logits, experts, renormalize, d_logits)
    return d_logits


def sigmoid_topk_backward(d_weights, logits, experts, renormalize=True, scale=1.0):
    d_logits = np.empty_like(logits)
    kr.sigmoid_topk_backward_kernel(d_weights, logits, experts, renormalize, scale, d_logits)
    return d_logits


# --------------------------------------------------------------------------- dispatch

_NO_ORDER, _NO_SKIP = np.zeros(0, np.int64), np.zeros(0, np.bool_)   # token order, no skips


def make_plan(experts, E, capacity=None):
    # experts: (T, k) ids in 0..E-1 -> Plan
    flat = np.ascontiguousarray(experts, dtype=np.int32).reshape(-1)
    n = flat.shape[0]   # first come, first kept: capacity is claimed in token order
    rows, offsets, counts, slots, dropped = kd.plan_kernel(
        flat, _NO_ORDER, _NO_SKIP, E,
        -1 if capacity is None else min(capacity, n))   # above T*k it drops nothing
    return Plan(rows, offsets, counts, slots.reshape(experts.shape), dropped, capacity)


def permute(x, plan):
    # x: (T, d) contiguous -> xs: (N, d)
    out = np.empty((plan.num_rows, x.shape[1]), x.dtype)
    kd.permute_kernel(x, plan.rows, plan.top_k, out)
    return out


def combine(ys, plan, weights=None):
    # ys: (N, d), weights: (T, k) or None (ones), contiguous -> y: (T, d)
    if weights is None:
        weights = np.ones(plan.slots.shape, ys.dtype)
    out = np.empty((plan.num_tokens, ys.shape[1]), ys.dtype)
    kd.combine_kernel(ys, plan.slots, weights, out)
    return out


def permute_backward(d_xs, plan):
    # d_xs: (N, d) -> dx: (T, d), a combine with unit weights
    return combine(d_xs, plan, None)


def combine_backward(dy, ys, plan, weights=None):
    # dy: (T, d), ys: (N, d), weights: (T, k) or None, contiguous -> (d_ys, d_weights)
    if weights is None:
        weights = np.ones(plan.slots.shape, ys.dtype)
    d_ys = np.empty(ys.shape, ys.dtype)
    d_weights = np.zeros(plan.slots.shape, ys.dtype)
    kd.combine_backward_kernel(dy, ys, plan.rows, weights, d_ys, d_weights)
    return d_ys, d_weights
