"""Native bf16 dot products (AVX512_BF16 `vdpbf16ps`) for the packed grouped GEMM: bf16 weights
times activations rounded to bf16, accumulated in float32.

    C[r, :] (+)= sum_p  bf16(A(r, 2p)) * B[2p, :] + bf16(A(r, 2p+1)) * B[2p+1, :]

An opt-in (a weight's `activations="bf16"`, docs/formats.md): the default path multiplies bf16
weights by the float32 activations exactly; this one rounds the activations to bf16 first
(round to nearest even, once per product: each value's relative error <= 2^-9), which lets one
instruction do 32 multiply-adds. Products of two bf16 values are exact in float32, so a result
differs from the float32 product of the rounded operands only by float32 accumulation.

Operands are pairs along the depth, one uint32 per pair (the even element in the low half, as
vdpbf16ps reads them; an odd depth's last pair has a zero high half):
    A: round_pairs turns a (N, K) float32 into (N, ceil(K/2)) uint32 once per product; the
       micro-kernel broadcasts each pair from those rows in place (MR rows, by index: a fused
       gather), so there is no packed copy and every column tile reads the same rows.
    B: pack_pairs packs the bf16 bits of B_g = W_g (or W_g^T) per tile and depth chunk into
       (NC/NR, KCP, NR) uint32 panels, the float32 kernel's panel layout (swiglu interleaving
       included) with pairs for values.
The tiles, their split over threads, the depth chunks (KCP pairs) and the epilogue
(gemm.tile_epilogue) are the float32 kernel's: every output element is made by one tile in a
fixed order, so results are bitwise the same for any thread count. The micro-kernel holds
MR x 2NR float32 accumulators (two panels side by side: MR * 2 zmm registers, enough
independent chains to cover the instruction's latency).

The instruction flushes bf16 subnormal inputs and float32 subnormal results to zero (DAZ /
FTZ). Only hosts whose LLVM target has avx512bf16 compile the micro-kernel (NATIVE); elsewhere
the backend keeps the exact float32 path.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .config import HN, ISA, KC, MC, MR, NC, NR, ROW_BLOCK, host_features
from .gemm import panel_col, slp_vectorized, tile_epilogue

FLAGS = {"cache": True, "fastmath": {"contract"}}

# vdpbf16ps on 512-bit registers: 16 float32 lanes, each fed by a pair of bf16 values.
NATIVE = bool(ISA == "avx512" and NR == 16 and host_features().get("avx512bf16"))
# Depth chunk in pairs: two B panels of KCP x NR pairs and an A micro-panel stay in L1.
KCP = KC // 2


def pairs(K):
    """Pairs along a depth of K values (the last one half empty when K is odd)."""
    return (K + 1) // 2


# --------------------------------------------------------------------------- LLVM helpers

class _BFloat(ir.Type):
    """LLVM's bfloat (llvmlite's IR builder has no type for it): the operand element type of
    llvm.x86.avx512bf16.dpbf16ps.512 since LLVM 17. Values of it are only ever bitcast from
    <16 x i32> here."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_I32 = ir.IntType(32)
_F32X16 = ir.VectorType(ir.FloatType(), NR)
_I32X16 = ir.VectorType(_I32, NR)
_BF16X32 = ir.VectorType(_BFloat(), 2 * NR)


def _ptr(ctx, builder, aryty, ary, idx, ty):
    # a pointer to ty at flat element idx of a C-contiguous array
    data = ctx.make_array(aryty)(ctx, builder, ary).data
    return builder.bitcast(builder.gep(data, [idx]), ty.as_pointer())


def _c_array(a, dtype):
    return isinstance(a, types.Array) and a.dtype == dtype and a.layout == "C"


# --------------------------------------------------------------------------- activations

@njit(inline="always", cache=True)
def round_bf16(bits):
    # bits: float32 bits (uint32) -> the bf16 bits (uint32 < 2^16) of the nearest bf16, ties to
    # even; NaN stays a (quiet) NaN, +-Inf stays Inf, values past bf16's largest round to Inf
    # (both values computed and one selected: no branch, so that the row loop vectorizes)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x40)
    near = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return quiet if nan else near


_V32 = ir.VectorType(_I32, 32)


@intrinsic
def _vround32(typingctx, a, ao, out, oo):
    """out[oo:oo+16] = the bf16 bits of a[ao:ao+32] (float32 bits, uint32) as 16 pairs: round_bf16
    on 32 values at once (the same integer steps as vectors; flat offsets)."""
    if not (_c_array(a, types.uint32) and _c_array(out, types.uint32)):
        return None

    def codegen(ctx, builder, sig, args):
        def c(v):
            return ir.Constant(_V32, [v] * 32)
        x = builder.load(_ptr(ctx, builder, sig.args[0], args[0], args[1], _V32), align=4)
        near = builder.lshr(builder.add(builder.add(x, c(0x7FFF)),
                                        builder.and_(builder.lshr(x, c(16)), c(1))), c(16))
        quiet = builder.or_(builder.lshr(x, c(16)), c(0x40))
        nan = builder.icmp_unsigned(">", builder.and_(x, c(0x7FFFFFFF)), c(0x7F800000))
        h = builder.trunc(builder.select(nan, quiet, near), ir.VectorType(ir.IntType(16), 32))
        builder.store(builder.bitcast(h, _I32X16),
                      _ptr(ctx, builder, sig.args[2], args[2], args[3], _I32X16), align=4)
        return ctx.get_dummy_value()
    return types.void(a, ao, out, oo), codegen


@njit(parallel=True, **FLAGS)
def round_pairs(a, out):
    # a: (N, K) float32 C-contiguous -> out: (N, ceil(K/2)) uint32, out[r, p] = bf16(a[r, 2p])
    # | bf16(a[r, 2p+1]) << 16 (0 in the high half past K); rows in parallel, 32 values at a
    # time by vectors, the rest one by one
    N, K = a.shape
    bits = a.view(np.uint32)
    flat, oflat = bits.reshape(bits.size), out.reshape(out.size)
    kp, P = K // 2, out.shape[1]
    kv = K // 32 * 32
    for t in prange((N + ROW_BLOCK - 1) // ROW_BLOCK):
        for r in range(t * ROW_BLOCK, min(N, (t + 1) * ROW_BLOCK)):
            for k in range(0, kv, 32):
                _vround32(flat, r * K + k, oflat, r * P + k // 2)
            src, dst = bits[r], out[r]
            for p in range(kv // 2, kp):
                dst[p] = round_bf16(src[2 * p]) | (round_bf16(src[2 * p + 1]) << np.uint32(16))
            if K % 2:
                dst[kp] = round_bf16(src[K - 1])


# --------------------------------------------------------------------------- weights

_I16X16 = ir.VectorType(ir.IntType(16), 16)


def _make_vpairs(n):
    vin = ir.VectorType(ir.IntType(16), n)
    vout = ir.VectorType(_I32, n)

    @intrinsic
    def vpairs(typingctx, w, o0, o1, buf, bo):
        # buf[bo:bo+n] = w.flat[o0+j] | w.flat[o1+j] << 16 for j < n (uint16 -> uint32 pairs:
        # two depth rows' values interleaved; flat offsets)
        if not (_c_array(w, types.uint16) and _c_array(buf, types.uint32)):
            return None

        def codegen(ctx, builder, sig, args):
            r0 = builder.load(_ptr(ctx, builder, sig.args[0], args[0], args[1], vin), align=2)
            r1 = builder.load(_ptr(ctx, builder, sig.args[0], args[0], args[2], vin), align=2)
            v = builder.or_(builder.zext(r0, vout), builder.shl(builder.zext(r1, vout),
                                                               ir.Constant(vout, [16] * n)))
            builder.store(v,
                          _ptr(ctx, builder, sig.args[3], args[3], args[4], vout), align=4)
            return ctx.get_dummy_value()
        return types.void(w, o0, o1, buf, bo), codegen
    return vpairs


_vpairs16, _vpairs8 = _make_vpairs(NR), _make_vpairs(HN)


@intrinsic
def _vtranspose16(typingctx, w, offs, buf, bo):
    """buf[bo + 16 i + j] = w.flat[offs[j] + i] for i, j < 16: sixteen runs of 16 uint32 (a
    panel's weight rows, along the depth) transposed into 16 depth rows of the panel, in
    registers (four butterfly stages of two-vector shuffles)."""
    if not (_c_array(w, types.uint32) and _c_array(offs, types.int64)
            and _c_array(buf, types.uint32)):
        return None

    def codegen(ctx, builder, sig, args):
        w_, offs_, buf_, bo_ = args
        optr = ctx.make_array(sig.args[1])(ctx, builder, offs_).data
        rows = [builder.load(_ptr(ctx, builder, sig.args[0], w_, builder.load(
            builder.gep(optr, [ir.Constant(_I32, j)])), _I32X16), align=4) for j in range(16)]
        b = 1
        while b < 16:              # swap bit b of the row and of the column index
            mi = [k if not k & b else 16 + (k ^ b) for k in range(16)]
            mj = [k ^ b if not k & b else 16 + k for k in range(16)]
            new = list(rows)
            for i in range(16):
                if not i & b:
                    new[i] = builder.shuffle_vector(rows[i], rows[i | b], ir.Constant(_I32X16, mi))
                    new[i | b] = builder.shuffle_vector(rows[i], rows[i | b],
                                                        ir.Constant(_I32X16, mj))
            rows, b = new, 2 * b
        bo64 = ctx.cast(builder, bo_, sig.args[3], types.int64)
        for i in range(16):
            builder.store(rows[i], _ptr(ctx, builder, sig.args[2], buf_,
                                        builder.add(bo64, ir.Constant(bo64.type, 16 * i)),
                                        _I32X16), align=4)
        return ctx.get_dummy_value()
    return types.void(w, offs, buf, bo), codegen


@njit(inline="always", cache=True)
def _pair(lo, hi, mask):
    # two bf16 bit patterns -> one uint32 pair; mask 0 empties the high half (an odd depth)
    return np.uint32(lo) | ((np.uint32(hi) & mask) << np.uint32(16))


@njit(**FLAGS)
def pack_pairs(w, w32, trans, g, q0, q1, p0, p1, half, M, K, buf):
    # w: (G, K, M) uint16 bf16 bits [trans: (G, M, K)], w32: trans with K even, w viewed as
    # (G, M, K/2) uint32 pairs, else (0, 0, 0); panels q0..q1-1, depth pairs p0..p1 of
    # B_g = w[g] (trans: w[g].T) -> buf: (>= q1-q0, >= p1-p0, NR) uint32,
    #   buf[q-q0, p-p0, j] = B_g[2p, c] | B_g[2p+1, c] << 16, c = panel_col(q, j, half, M)
    # (0 for padding columns; the high half 0 where 2p+1 = K). Whole panels go by vectors:
    # trans, 16 x 16 blocks of pairs transposed in registers; else two depth rows
    # interleaved, 16 columns at a time.
    full = np.uint32(0xFFFF)
    nk = buf.shape[1] * NR                          # one panel of buf, in pairs
    if trans:
        base, offs = np.empty(NR, np.int64), np.empty(NR, np.int64)
        vec_end = p0 + (p1 - p0) // 16 * 16 if w32.shape[0] > 0 else p0
        for q in range(q0, q1):
            whole = True
            for j in range(NR):
                c = panel_col(q, j, half, M)
                whole = whole and c >= 0
                base[j] = (g * M + max(c, 0)) * (K // 2)
            if whole:                                # rows w32[g, c_j], 16 pairs at a time
                for p in range(p0, vec_end, 16):
                    for j in range(NR):
                        offs[j] = base[j] + p
                    _vtranspose16(w32, offs, buf, (q - q0) * nk + (p - p0) * NR)
            for j in range(NR):                      # the rest, one pair at a time
                c = panel_col(q, j, half, M)
                start = vec_end if whole else p0
                if c < 0:
                    for p in range(start, p1):
                        buf[q - q0, p - p0, j] = 0
                    continue
                row = w[g, c]
                for p in range(start, p1):
                    hi = 2 * p + 1
                    buf[q - q0, p - p0, j] = _pair(row[2 * p], row[min(hi, K - 1)],
                                                   full if hi < K else np.uint32(0))
        return
    for p in range(p0, p1):          # rows 2p and 2p+1 of w[g] are contiguous
        hi = 2 * p + 1
        o0 = (g * K + 2 * p) * M
        o1 = o0 + M
        for q in range(q0, q1):
            bo = (q - q0) * nk + (p - p0) * NR
            if hi < K and half == 0 and (q + 1) * NR <= M:          # a whole plain panel
                _vpairs16(w, o0 + q * NR, o1 + q * NR, buf, bo)
            elif hi < K and half > 0 and (q + 1) * HN <= half:      # whole gate, up halves
                _vpairs8(w, o0 + q * HN, o1 + q * HN, buf, bo)
                _vpairs8(w, o0 + half + q * HN, o1 + half + q * HN, buf, bo + HN)
            else:                                # the last, partial panel, or an odd depth
                mask = full if hi < K else np.uint32(0)
                r0, r1 = w[g, 2 * p], w[g, min(hi, K - 1)]
                for j in range(NR):
                    c = panel_col(q, j, half, M)
                    buf[q - q0, p - p0, j] = _pair(r0[c], r1[c], mask) if c >= 0 \
                        else np.uint32(0)


# --------------------------------------------------------------------------- micro-kernel

def _make_tile(npan):
    """The micro-kernel over npan (1 or 2) panels side by side, as an intrinsic."""
    w = npan * NR

    @intrinsic
    def dot_tile(typingctx, ap, ao, bp, bo, bs, kp, cbuf, ci, cj, first):
        # ap: uint32 A pairs, flat; ao: (>= MR,) int64, row i's kp pairs at ap[ao[i]:];
        # bp: uint32 B panels at bo, bo + bs, each (kp, NR) pairs; cbuf: (*, ld) float32 ->
        # cbuf[ci:ci+MR, cj:cj+npan*NR] = (first ? 0 : itself) + the pairs' dot products
        if not (_c_array(ap, types.uint32) and _c_array(bp, types.uint32)
                and _c_array(ao, types.int64) and _c_array(cbuf, types.float32)
                and cbuf.ndim == 2):
            return None

        def codegen(ctx, builder, sig, args):
            ap_, ao_, bp_, bo_, bs_, kp_, cb_, ci_, cj_, first_ = args
            i64 = ir.IntType(64)
            bo_, bs_, kp_, ci_, cj_ = (ctx.cast(builder, v, t, types.int64) for v, t in
                                       zip((bo_, bs_, kp_, ci_, cj_),
                                           (sig.args[3], sig.args[4], sig.args[5], sig.args[7],
                                            sig.args[8])))
            optr = ctx.make_array(sig.args[1])(ctx, builder, ao_).data
            arow = [builder.load(builder.gep(optr, [ir.Constant(_I32, i)])) for i in range(MR)]
            carr = ctx.make_array(sig.args[6])(ctx, builder, cb_)
            ld = cgutils.unpack_tuple(builder, carr.shape, 2)[1]
            cptr = [[_ptr(ctx, builder, sig.args[6], cb_,
                          builder.add(builder.mul(builder.add(ci_, ir.Constant(i64, i)), ld),
                                      builder.add(cj_, ir.Constant(i64, n * NR))), _F32X16)
                     for n in range(npan)] for i in range(MR)]
            acc = [[cgutils.alloca_once(builder, _F32X16) for n in range(npan)]
                   for i in range(MR)]
            zero = ir.Constant(_F32X16, [0.0] * NR)
            is_first = ctx.cast(builder, first_, sig.args[9], types.boolean)
            with builder.if_else(is_first) as (then, other):
                with then:
                    for row in acc:
                        for a in row:
                            builder.store(zero, a)
                with other:
                    for row, prow in zip(acc, cptr):
                        for a, p in zip(row, prow):
                            builder.store(builder.load(p, align=4), a)
            dp = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_F32X16, [_F32X16, _BF16X32, _BF16X32]),
                "llvm.x86.avx512bf16.dpbf16ps.512")
            splat = ir.Constant(_I32X16, [0] * NR)
            with cgutils.for_range(builder, kp_) as loop:
                p = loop.index
                bv = [builder.bitcast(builder.load(_ptr(
                    ctx, builder, sig.args[2], bp_,
                    builder.add(builder.add(bo_, builder.mul(bs_, ir.Constant(i64, n))),
                                builder.mul(p, ir.Constant(i64, NR))), _I32X16), align=4),
                    _BF16X32) for n in range(npan)]
                for i in range(MR):
                    x = builder.load(_ptr(ctx, builder, sig.args[0], ap_,
                                          builder.add(arow[i], p), _I32), align=4)
                    v = builder.insert_element(ir.Constant(_I32X16, ir.Undefined), x,
                                               ir.Constant(_I32, 0))
                    av = builder.bitcast(builder.shuffle_vector(v, v, splat), _BF16X32)
                    for n in range(npan):
                        builder.store(builder.call(dp, [builder.load(acc[i][n]), av, bv[n]]),
                                      acc[i][n])
            for row, prow in zip(acc, cptr):
                for a, p in zip(row, prow):
                    builder.store(builder.load(a), p, align=4)
            return ctx.get_dummy_value()

        return types.void(ap, ao, bp, bo, bs, kp, cbuf, ci, cj, first), codegen

    dot_tile.__doc__ = f"The {MR} x {w} bf16 micro-kernel (vdpbf16ps)."
    return dot_tile


dot_tile2 = _make_tile(2)
dot_tile1 = _make_tile(1)


# --------------------------------------------------------------------------- the kernel

@slp_vectorized
@njit(parallel=True, **FLAGS)
def bf16_gemm_kernel(src, ridx, w, w32, wtrans, K, M, tiles, bounds, max_rows, half, out,
                     act_out, code, store_out):
    # src: (*, ceil(K/2)) uint32 activation pairs (round_pairs), ridx: (*,) int64: A's row r
    #   is src[ridx[r]] (a fused gather), read in place by the micro-kernel (no packed copy);
    # w: (G, K, M) uint16 bf16 bits [wtrans: (G, M, K)], M columns of B_g; w32: w viewed as
    #   (G, M, K/2) uint32 pairs when wtrans and K is even, else (0, 0, 0);
    # tiles (n, 7) int64 (g, r0, m, r_out, k0, k1, q0) as gemm.grouped_gemm_kernel's, k0..k1
    #   in pairs; bounds (nchunks+1,): tiles bounds[c]..bounds[c+1]-1 run in chunk c, in order;
    # out (*, M) float32 (or h_pre), act_out (*, M') or (0, 0): as grouped_gemm_kernel's.
    # Per tile: for each depth chunk of KCP pairs, B's panels packed once (pack_pairs), then
    # each MC-row block of A multiplied with them two panels at a time; rows past the tile's
    # last repeat it (their products are never stored).
    P = (half + HN - 1) // HN if half > 0 else (M + NR - 1) // NR
    bs = KCP * NR                                   # one packed panel, in pairs
    kp2 = src.shape[1]
    flat = src.reshape(src.size)
    nchunks = bounds.shape[0] - 1
    for c in prange(nchunks):
        bbuf = np.empty((NC // NR, KCP, NR), np.uint32)
        cbuf = np.empty((max_rows + MR, NC), np.float32)
        rows = np.empty(MC + MR, np.int64)           # flat offsets of A's rows at the chunk
        for t in range(bounds[c], bounds[c + 1]):
            g, r0, m, r_out, k0, k1, q0 = (tiles[t, 0], tiles[t, 1], tiles[t, 2], tiles[t, 3],
                                           tiles[t, 4], tiles[t, 5], tiles[t, 6])
            q1 = min(P, q0 + NC // NR)
            for kk in range(k0, k1, KCP):
                ke = min(k1, kk + KCP)
                pack_pairs(w, w32, wtrans, g, q0, q1, kk, ke, half, M, K, bbuf)
                for rb in range(0, m, MC):
                    nb = (min(MC, m - rb) + MR - 1) // MR
                    for i in range(nb * MR):
                        rows[i] = ridx[r0 + min(rb + i, m - 1)] * kp2 + kk
                    for q in range(q0, q1, 2):
                        bo = (q - q0) * bs
                        for b in range(nb):
                            ao = rows[b * MR:]
                            if q + 1 < q1:
                                dot_tile2(flat, ao, bbuf, bo, bs, ke - kk, cbuf, rb + b * MR,
                                          (q - q0) * NR, kk == k0)
                            else:
                                dot_tile1(flat, ao, bbuf, bo, bs, ke - kk, cbuf, rb + b * MR,
                                          (q - q0) * NR, kk == k0)
            tile_epilogue(cbuf, m, q0, q1, half, M, out, r_out, act_out, code, store_out)


def run(a, blocks, trans, M, tiles, out, ridx=None, half=0, act_out=None, code=-1,
        store_out=True):
    """The host sequence of a native bf16 product: a (*, K) float32 rounded to bf16 pairs once,
    then bf16_gemm_kernel (A's rows a[ridx[r]]; ridx None: a's own) over `tiles` ((tiles (n, 7), bounds, max_rows) as backends/cpu.py's
    make_tiles cuts them, depth in pairs(K)) with B_g the bf16 bits `blocks` (G, K, M) [trans: (G, M, K)] uint16 C-contiguous
    -> out (and act_out, as gemm.grouped_gemm_kernel's epilogue). Only on NATIVE hosts."""
    if not NATIVE:
        raise RuntimeError("bf16dot.run: this CPU has no AVX512_BF16 (vdpbf16ps); the caller "
                           "must take the float32 path")
    a = np.ascontiguousarray(a, dtype=np.float32)
    K = a.shape[1]
    src = np.empty((a.shape[0], pairs(K)), np.uint32)
    round_pairs(a, src)
    if ridx is None:
        ridx = np.arange(a.shape[0], dtype=np.int64)
    if act_out is None:
        act_out = np.empty((0, 0), np.float32)
    t, bounds, max_rows = tiles
    w32 = blocks.view(np.uint32) if trans and K % 2 == 0 else np.empty((0, 0, 0), np.uint32)
    bf16_gemm_kernel(src, ridx, blocks, w32, trans, K, M, t, bounds, max_rows, half, out,
                     act_out, code, store_out)
