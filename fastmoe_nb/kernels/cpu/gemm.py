"""CPU grouped GEMM: packed weight panels, a register-blocked micro-kernel, and ONE parallel
loop over the tiles of all experts together (so many small experts keep every core busy).

    C[r, :] (+)= sum_p  A(r, p) * B_g[p, :]        for the rows r of each tile

One machinery serves the three products of an expert layer:
    forward  y_e  = a_e @ w_e          A = rows of a (optionally gathered: fused permute)
    dA       da_e = dy_e @ w_e^T       A = rows of dy, B = w_e^T packed
    dW       dw_e = a_e^T @ dy_e       A = a_e^T (a read transposed), B = dy packed; the sum
                                       over an expert's rows runs in one thread, in order
Every output element is produced by exactly one tile, in a fixed order: results are bitwise
the same for any thread count.

Blocking (AVX2/AVX-512 fp32): a micro-tile is MR rows x NR columns of C held in registers;
a tile is some MC-row blocks x NC columns; the depth is walked in KC chunks. A's rows are
packed per row block into (MC/MR, KC, MR) micro-panels (ridx can gather them: a fused
permute); B is either packed per tile and depth chunk into a cache-resident (NC/NR, KC, NR)
buffer (pack_block), or packed once per weight update into (G, P, L, NR) panels
(pack_panels, the public pack_weights).

The micro-kernel runs several times slower with Numba's default LLVM passes: it needs the
SLP vectorizer on and the loop vectorizer off (slp_vectorized wraps the entry points the host
calls), unsigned depth indices, and fastmath 'contract' (FMA only). Block sizes:
kernels/cpu/config.py.
"""
from functools import wraps

import numba
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import RequireLiteralValue
from numba.extending import intrinsic
from numba import carray

from ..common import SILU
from .activations import act
from .config import HN, KC, MC, MR, MR_NR, NC, NR, STREAM_ACC, STREAM_CT, STREAM_KC, STREAM_SUB

FLAGS = dict(cache=True, fastmath={"contract"})   # FMA contraction only: no reassociation


def slp_vectorized(kernel):
    """kernel, called with LLVM's SLP vectorizer on and its loop vectorizer off. Numba reads
    these two flags when it compiles a function (on the first call with new argument types);
    the micro-kernel vectorizes across its output columns only this way. The flags are put
    back after the call."""
    @wraps(kernel)
    def call(*args):
        old = numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE
        numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE = 1, 0
        try:
            return kernel(*args)
        finally:
            numba.config.SLP_VECTORIZE, numba.config.LOOP_VECTORIZE = old

    call.kernel = kernel
    return call


@intrinsic
def _stack_empty(typingctx, size, dtype):
    """A pointer to `size` (a literal) elements of `dtype` on the stack: LLVM promotes it to
    registers once the loops over it are unrolled."""
    if not isinstance(size, types.IntegerLiteral):
        raise RequireLiteralValue(size)

    def impl(context, builder, sig, args):
        ty = context.get_value_type(dtype.dtype)
        return cgutils.alloca_once(builder, ty, size=size.literal_value)

    return types.CPointer(dtype.dtype)(size, dtype), impl


@slp_vectorized
@njit(parallel=True, **FLAGS)
def pack_panels(w, trans, half, out):
    # w: (G, L, M) [trans: (G, M, L)] -> out: (G, P, L, NR), P = ceil(M' / NR), zero-padded:
    #   half == 0: out[g, q, p, j] = B_g[p, q*NR + j]
    #   half > 0 (swiglu [gate | up], M = 2*half): panel q holds gate columns q*HN.. and the
    #            matching up columns half + q*HN.., so one micro-tile sees both halves
    # where B_g = w[g] (trans: w[g].T). Tasks: (group, NC/NR panels), each by pack_block.
    G, P, L = out.shape[0], out.shape[1], out.shape[2]
    M = w.shape[1] if trans else w.shape[2]
    nq = NC // NR
    nb = (P + nq - 1) // nq
    for t in prange(G * nb):
        g = t // nb
        q0 = (t - g * nb) * nq
        q1 = min(P, q0 + nq)
        pack_block(w, trans, g, q0, q1, 0, L, half, M, out[g, q0:q1])


@njit(cache=True)
def panel_col(q, j, half, M):
    # the column of B (and of C) held by column j of panel q, or -1 for padding
    if half == 0:
        c = q * NR + j
        return c if c < M else -1
    c = q * HN + (j if j < HN else j - HN)
    if c >= half:
        return -1
    return c if j < HN else half + c


@njit(**FLAGS)
def pack_rows(src, ridx, trans, r0, m, k0, k1, buf):
    # A operand rows r0..r0+m, depth k0..k1 -> buf: (ceil(m/MR), KC, MR); rows past m repeat
    # row m-1 (their products are never stored)
    #   not trans: A(i, p) = src[ridx[r0 + i], p]          (src (*, K): rows, maybe gathered)
    #   trans:     A(i, p) = src[ridx[p], r0 + i]          (src (N, *): read transposed)
    nb = (m + MR - 1) // MR
    kc = np.uint64(k1 - k0)
    if not trans:                    # a block's MR = 6 rows side by side (spelled out): one
        last = r0 + m - 1            # pass over each row, runs of six written (faster than
        for b in range(nb):          # a row at a time: docs/performance.md)
            i = r0 + b * MR
            a0, a1 = src[ridx[min(i, last)], k0:], src[ridx[min(i + 1, last)], k0:]
            a2, a3 = src[ridx[min(i + 2, last)], k0:], src[ridx[min(i + 3, last)], k0:]
            a4, a5 = src[ridx[min(i + 4, last)], k0:], src[ridx[min(i + 5, last)], k0:]
            bb = buf[b]
            for p in range(np.uint64(0), kc):
                bp = bb[p]
                bp[0], bp[1], bp[2] = a0[p], a1[p], a2[p]
                bp[3], bp[4], bp[5] = a3[p], a4[p], a5[p]
    else:
        for p in range(k1 - k0):
            row = src[ridx[k0 + p]]
            for b in range(nb):
                for ii in range(MR):
                    i = min(b * MR + ii, m - 1)
                    buf[b, p, ii] = row[r0 + i]


@njit(**FLAGS)
def micro_tile(ap, bp, kc, cbuf, ci, cj, first):
    # ap: (KC, MR) packed A, bp: (>=kc, NR) packed B panel; acc (MR, NR) in registers:
    # cbuf[ci:ci+MR, cj:cj+NR] = (first ? 0 : cbuf[ci:ci+MR, cj:cj+NR]) + ap[:kc]^T bp[:kc]
    # Unsigned column indices over whole rows of NR: acc's loads and stores vectorize (signed
    # ones ran element by element); the epilogue is apart (tile_epilogue), so that nothing
    # but the multiply-adds competes for acc's registers.
    acc = carray(_stack_empty(MR_NR, ap.dtype), (MR, NR))
    u0, unr, cju = np.uint64(0), np.uint64(NR), np.uint64(cj)
    if first:
        for i in range(MR):
            for j in range(NR):
                acc[i, j] = 0.0
    else:
        for i in range(MR):
            crow = cbuf[ci + i]
            for j in range(u0, unr):
                acc[i, j] = crow[cju + j]
    for p in range(np.uint64(0), np.uint64(kc)):
        for i in range(MR):
            av = ap[p, i]
            for j in range(NR):
                acc[i, j] += av * bp[p, j]
    for i in range(MR):
        crow = cbuf[ci + i]
        for j in range(u0, unr):
            crow[cju + j] = acc[i, j]


@njit(**FLAGS)
def tile_epilogue(cbuf, m, q0, q1, half, M, out, r_out, act_out, code, store_out):
    # cbuf[:m, :(q1-q0)*NR]: a finished tile (panels q0..q1-1) -> C rows r_out..r_out+m:
    #   out[r, col] = C (store_out), act_out[r, col] = act(C) (code >= 0); swiglu-interleaved
    #   panels (half > 0): gate and up columns back to their halves, act_out = silu(gate) * up
    u0 = np.uint64(0)
    if half == 0:
        c0 = q0 * NR
        nc = np.uint64(min(q1 * NR, M) - c0)
        for i in range(m):
            crow = cbuf[i]
            if store_out:
                orow = out[r_out + i, c0:]
                for j in range(u0, nc):
                    orow[j] = crow[j]
            if code >= 0:
                arow = act_out[r_out + i, c0:]
                for j in range(u0, nc):
                    arow[j] = act(crow[j], code)
        return
    for i in range(m):
        crow = cbuf[i]
        for q in range(q0, q1):
            c0 = q * HN
            nc = np.uint64(min(HN, half - c0))
            gate, up = crow[(q - q0) * NR:], crow[(q - q0) * NR + HN:]
            if store_out:
                og, ou = out[r_out + i, c0:], out[r_out + i, half + c0:]
                for j in range(u0, nc):
                    og[j] = gate[j]
                    ou[j] = up[j]
            if code >= 0:
                arow = act_out[r_out + i, c0:]
                for j in range(u0, nc):
                    arow[j] = act(gate[j], SILU) * up[j]


@njit(**FLAGS)
def pack_block(w, trans, g, q0, q1, k0, k1, half, M, buf):
    # panels q0..q1-1, depth k0..k1 of B_g = w[g] (trans: w[g].T), laid out as pack_panels
    # describes -> buf: (>= q1-q0, >= k1-k0, NR). The kernel calls it per tile and depth
    # chunk, so B is read once from memory and the packed copy stays in cache.
    if trans:                        # w[g, c, :] is contiguous: walk it along p
        for q in range(q0, q1):
            for j in range(NR):
                c = panel_col(q, j, half, M)
                for p in range(k0, k1):
                    buf[q - q0, p - k0, j] = w[g, c, p] if c >= 0 else 0.0
        return
    u0 = np.uint64(0)                # unsigned column indices: no wraparound checks, so
    for p in range(k0, k1):          # the copies vectorize; w[g, p, :] is contiguous
        for q in range(q0, q1):
            bq = buf[q - q0, p - k0]
            wp = w[g, p]
            if half == 0 and (q + 1) * NR <= M:          # a whole plain panel
                c0 = np.uint64(q * NR)
                for j in range(u0, np.uint64(NR)):
                    bq[j] = wp[c0 + j]
            elif half > 0 and (q + 1) * HN <= half:      # whole gate and up halves
                c0 = np.uint64(q * HN)
                c1 = np.uint64(half + q * HN)
                for j in range(u0, np.uint64(HN)):
                    bq[j] = wp[c0 + j]
                    bq[np.uint64(HN) + j] = wp[c1 + j]
            else:                                        # the last, partial panel
                for j in range(NR):
                    c = panel_col(q, j, half, M)
                    buf[q - q0, p - k0, j] = w[g, p, c] if c >= 0 else 0.0


@slp_vectorized
@njit(parallel=True, **FLAGS)
def grouped_gemm_kernel(src, ridx, trans, bp, w, wtrans, M, tiles, bounds, max_rows, half,
                        out, act_out, code, store_out):
    # src: A's source (see pack_rows), ridx: (*,) int64 row indices into src,
    # bp: (G, P, L, NR) B packed once (pack_panels), or (0, P, 0, NR): then B_g = w[g]
    #   (wtrans: w[g].T, M columns) is packed per tile and depth chunk (pack_block),
    # tiles: (n, 7) int64 rows (g, r0, m, r_out, k0, k1, q0): panels q0..q1-1 (q1 = q0 + NC/NR
    #   clipped to P) of group g, A rows r0..r0+m, depth k0..k1 -> C rows r_out..r_out+m;
    #   max_rows >= every m,
    # bounds: (nchunks+1,) tiles bounds[c]..bounds[c+1]-1 run in chunk c, in order.
    # out: (*, M) C (or h_pre for the activation epilogue), act_out: (*, M') or (0, 0)
    # Per tile: for each depth chunk, B's panels once, then every MC-row block of A packed
    # and multiplied; partial sums over the depth chunks wait in cbuf, and the finished
    # tile goes from cbuf to out / act_out (tile_epilogue).
    P = bp.shape[1]
    packed = bp.shape[0] > 0
    nchunks = bounds.shape[0] - 1
    for c in prange(nchunks):
        abuf = np.empty((MC // MR, KC, MR), bp.dtype)
        bbuf = np.empty((NC // NR, KC, NR), bp.dtype)
        cbuf = np.empty((max_rows + MR, NC), bp.dtype)
        for t in range(bounds[c], bounds[c + 1]):
            g, r0, m, r_out, k0, k1, q0 = (tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3],
                                           tiles[t, 4], tiles[t, 5], tiles[t, 6])
            q1 = min(P, q0 + NC // NR)
            for kk in range(k0, k1, KC):
                ke = min(k1, kk + KC)
                if not packed:
                    pack_block(w, wtrans, g, q0, q1, kk, ke, half, M, bbuf)
                for rb in range(0, m, MC):
                    mb = min(MC, m - rb)
                    pack_rows(src, ridx, trans, r0 + rb, mb, kk, ke, abuf)
                    for q in range(q0, q1):
                        bq = bp[g, q, kk:ke] if packed else bbuf[q - q0, :ke - kk]
                        for b in range((mb + MR - 1) // MR):
                            micro_tile(abuf[b], bq, ke - kk, cbuf, rb + b * MR, (q - q0) * NR,
                                       kk == k0)
            tile_epilogue(cbuf, m, q0, q1, half, M, out, r_out, act_out, code, store_out)


# --------------------------------------------------------------------------- decoding

# A streaming task reads a block of one expert's weights straight from memory, unpacked, and
# keeps its products in an accumulator of at most STREAM_ACC elements (rows x columns, in L2).
# Row layout (w (E, K, M)): the task takes depth rows p0..p1 of w (STREAM_KC of them) across
# as many columns as the accumulator allows, so that it reads one contiguous run per depth row
# (whole rows while rows x M <= STREAM_ACC), not a page-sized run per column block
# (docs/performance.md has the comparison). Transposed (w (E, M, K)): a task takes a block of
# STREAM_CT columns over the whole depth, which is one contiguous run.


@njit(parallel=True, cache=True, fastmath={"contract", "reassoc"})
def stream_kernel(src, ridx, w, trans, offsets, tasks, part):
    # Few rows an expert (decoding): each selected expert's weights are read once.
    # src (*, K), ridx (N,): A's rows src[ridx[r]] in expert order (a fused permute, or
    # arange); w (E, K, M) [trans: (E, M, K)]; offsets (E+1,);
    # tasks (n, 6): (e, p0, p1, c0, c1, base) -> part[base : base + m*(c1-c0)], as (m, c1-c0):
    #   the partial product src[rows of e, p0:p1] @ B_e[p0:p1, c0:c1] (m: e's rows);
    # stream_sum adds a column block's partials up in depth order.
    # Compiled with numba's default vectorizer flags (the loop vectorizer on) and fastmath
    # 'reassoc' so that the dot products vectorize: their lanes of partial sums are fixed at
    # compile time, the same in every thread (results do not depend on the thread count).
    u0 = np.uint64(0)
    for t in prange(tasks.shape[0]):
        e, p0, p1, c0, c1, base = (tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3],
                                   tasks[t, 4], tasks[t, 5])
        lo, m = offsets[e], offsets[e + 1] - offsets[e]
        nc = c1 - c0
        acc = part[base:base + m * nc].reshape((m, nc))
        if trans:                      # rows w[e, c, p0:p1]: dot products
            for j in range(nc):
                wc = w[e, c0 + j]
                for i in range(m):
                    xi = src[ridx[lo + i]]
                    s = part.dtype.type(0.0)
                    for p in range(np.uint64(p0), np.uint64(p1)):   # unsigned: vectorized
                        s += xi[p] * wc[p]
                    acc[i, j] = s
            continue
        acc[:] = 0.0
        b = w[e]
        p = p0
        while p < p1:                  # depth rows of B_e, four at a time, swept in pieces
            q = min(4, p1 - p)         # of STREAM_SUB columns (they stay in L1 for the rows)
            for s0 in range(c0, c1, STREAM_SUB):
                s1 = min(s0 + STREAM_SUB, c1)
                ns = np.uint64(s1 - s0)
                b_0 = b[p, s0:s1]
                b_1, b_2, b_3 = (b[p + 1, s0:s1], b[p + 2, s0:s1], b[p + 3, s0:s1]) \
                    if q == 4 else (b_0, b_0, b_0)
                for i in range(m):     # scalars a0..a3: not reloaded in the loop
                    xi = src[ridx[lo + i]]
                    ai = acc[i, s0 - c0:s1 - c0]
                    a0 = xi[p]
                    if q == 4:
                        a1, a2, a3 = xi[p + 1], xi[p + 2], xi[p + 3]
                        for j in range(u0, ns):
                            ai[j] += a0 * b_0[j] + a1 * b_1[j] + a2 * b_2[j] + a3 * b_3[j]
                    else:
                        for j in range(u0, ns):
                            ai[j] += a0 * b_0[j]
            p += 4 if q == 4 else 1


@njit(cache=True)
def route_masks(offsets, limit, min_rows):
    # (E+1,) host offsets -> (few, more, busy, none, large): (E,) bool masks of the experts
    # with 1..limit rows, with more than limit, with any rows, of none, and whether the busy
    # experts average at least min_rows rows. One compiled call: backends/cpu.py's route()
    # runs before every product, and on cold caches (a layer between others) each NumPy call
    # costs more than this whole loop (docs/performance.md).
    E = offsets.shape[0] - 1
    few, more = np.zeros(E, np.bool_), np.zeros(E, np.bool_)
    busy, none = np.zeros(E, np.bool_), np.zeros(E, np.bool_)
    nbusy = 0
    for e in range(E):
        n = offsets[e + 1] - offsets[e]
        busy[e] = n > 0
        few[e] = 0 < n <= limit
        more[e] = n > limit
        nbusy += n > 0
    return few, more, busy, none, nbusy > 0 and offsets[E] >= min_rows * nbusy


@njit(cache=True)
def stream_plan(offsets, experts, K, M, trans, ct=STREAM_CT, acc=STREAM_ACC, align=1,
                direct=False):
    # The tasks of stream_kernel (and of quant.py's decoding GEMM) for every expert e with
    # rows and experts[e] (cut from the shapes alone): row layout, STREAM_KC depth rows x as
    # many columns (a multiple of align) as acc partial products allow (at least 256);
    # trans, ct columns x the whole depth, with partials (direct=False) or written straight
    # to the output (direct=True: no partials for trans tasks)
    # -> tasks (n, 6) (e, p0, p1, c0, c1, base), groups (g, 2) [t0, t1): one column block's
    #    tasks in depth order, and the partials' size
    n, g, _ = _stream_blocks(offsets, experts, K, M, trans, ct, acc, align, direct,
                             np.empty((0, 6), np.int64), np.empty((0, 2), np.int64))
    tasks, groups = np.empty((n, 6), np.int64), np.empty((g, 2), np.int64)
    size = _stream_blocks(offsets, experts, K, M, trans, ct, acc, align, direct, tasks,
                          groups)[2]
    return tasks, groups, size


@njit(cache=True)
def _stream_blocks(offsets, experts, K, M, trans, ct, acc, align, direct, tasks, groups):
    # stream_plan's loop: counts (n, g, size), and fills tasks / groups when they have room
    fill = tasks.shape[0] > 0
    n, g, size = 0, 0, 0
    for e in range(offsets.shape[0] - 1):
        m = offsets[e + 1] - offsets[e]
        if m == 0 or not experts[e]:
            continue
        kc = K if trans else STREAM_KC
        cw = ct if trans else max(acc // m // align * align, 256)
        for c0 in range(0, M, cw):
            c1 = min(c0 + cw, M)
            if fill:
                groups[g, 0], groups[g, 1] = n, n + (K + kc - 1) // kc
            g += 1
            for p0 in range(0, K, kc):
                if fill:
                    tasks[n, 0], tasks[n, 1], tasks[n, 2] = e, p0, min(p0 + kc, K)
                    tasks[n, 3], tasks[n, 4], tasks[n, 5] = c0, c1, size
                n += 1
                if not (trans and direct):
                    size += m * (c1 - c0)
    return n, g, size


@njit(parallel=True, cache=True)
def stream_sum(part, tasks, groups, offsets, out):
    # groups (g, 2): [t0, t1) the tasks of one expert's column block, in depth order
    # -> out[rows of e, c0:c1] = their partials summed in that order (deterministic).
    u0 = np.uint64(0)
    for g in prange(groups.shape[0]):
        t0, t1 = groups[g, 0], groups[g, 1]
        e, c0, c1 = tasks[t0, 0], tasks[t0, 3], tasks[t0, 4]
        lo, m, nc = offsets[e], offsets[e + 1] - offsets[e], c1 - c0
        for i in range(m):
            o = out[lo + i, c0:c1]
            b = tasks[t0, 5] + i * nc
            o[:] = part[b:b + nc]
            for t in range(t0 + 1, t1):
                b = tasks[t, 5] + i * nc
                pt = part[b:b + nc]
                for j in range(u0, np.uint64(nc)):    # unsigned: vectorized
                    o[j] += pt[j]
