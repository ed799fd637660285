"""Integer dot products on 8-bit activations for q8_0 / q4_0 / q4_k / q6_k weights in the
decoding GEMM's (M, K) layout (GGUF's and PyTorch's; blocks along the depth): AVX512_VNNI's
vpdpbusd where the CPU has it, the same integer sums in plain vector code elsewhere.

An opt-in (a weight's activations="q8_0", docs/formats.md), the way ggml computes these
formats: each row of activations is rounded to blocks of 32 int8 with a float32 scale
(quantize_rows: d = amax / 127, q = x * (1 / d) rounded half away from zero, ggml's q8_0
rounding with d kept in float32), so that a block's dot product is an exact integer:

    y[r, c] = sum over blocks b of  (dw[c, b] * dx[r, b]) * sum_{j<32} qw[c, 32b+j] qx[r, 32b+j]

vpdpbusd multiplies unsigned by signed bytes, four products into each int32 lane: the weights
enter as u = q + 128 (q8_0), as the nibble itself (q4_0, whose value is u - 8; q4_k) or as the
6-bit value (q6_k: u - 32), and a row's lanes start at -OFFSET * the sum of their four
activation bytes (xc, made once per row with the rounding), so that they end at the exact
signed sum. Two blocks at a time fill the 64 bytes of a zmm register: 16 lanes, 8 a block; the
lanes are converted to float32, multiplied by dw * dx (xs: dx repeated over its block's 8
lanes) and added into float32 accumulators. q4_k's groups of 32 (v = d sc q - dmin m) line up
with the activations' blocks: a pair is groups 2i and 2i + 1 of a super-block, the low and high
nibbles of the same 32 bytes, and its minima's term -dmin m * dx * sum(qx) is one more
multiply-add a pair (xm: dx times the lanes' sums, made with the rounding). q6_k's scales, one
per 16 values, cover four lanes each.

The integer sums are exact and every float32 operation runs in a fixed order, so results are
bitwise the same for any thread count, with vpdpbusd or the plain path (the same integers; the
row groups, and so the order of the float32 sums, follow the CPU's vector width as in quant.py).
The tasks, the row groups and their split are quant.py's cols_kernel's
(qstream_plan, COL_GROUPS): only the group function differs. A depth of an odd number of
blocks ends on half a pair, whose other half multiplies zero activations with zero scales.
"""
import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cache import cached
from .activations import activate_rows
from .config import COL_GROUPS, ISA, PREFETCH_BYTES, QSTREAM_ACC, QSTREAM_CT, host_features
from .gemm import _stack_empty, stream_plan
from .quant import (BLOCK_BYTES_Q4_0, BLOCK_BYTES_Q4_K, BLOCK_BYTES_Q6_K, BLOCK_BYTES_Q8_0,
                    FLAGS, Q4_0, Q4_K, Q6_K, Q8_0, QK, _c_array, new_super, prep_none,
                    prep_q4_k, prep_q6_k,
                    BLOCK_VALUES, _at, _splat, _vload, _vstore, prefetch, _make_cols_kernel,
                    _make_cols_task,
                    lanes_add, lanes_sum, qstream_plan, run_qstream as _run_qstream_f32)

# vpdpbusd on 512-bit registers; without it the plain path computes the same sums.
VNNI = bool(ISA == "avx512" and host_features().get("avx512vnni"))
FORMATS = (Q8_0, Q4_0, Q4_K, Q6_K)   # the weight formats this kernel multiplies
OFFSET = {Q8_0: 128, Q4_0: 8, Q4_K: 0, Q6_K: 32}   # u - OFFSET is the weight's integer value
PAIR = 2 * QK                    # values (bytes) of two blocks: one vpdpbusd
LANES = 16                       # int32 / float32 lanes of a pair (8 a block)

_I8V = ir.VectorType(ir.IntType(8), PAIR)
_I32L = ir.VectorType(ir.IntType(32), LANES)
_F32L = ir.VectorType(ir.FloatType(), LANES)


@njit(inline="always", cache=True)
def padded(K):
    """Bytes of a row of rounded activations: K values padded to whole pairs of blocks."""
    return -(-K // PAIR) * PAIR


# --------------------------------------------------------------------------- activations

@intrinsic
def vround(typingctx, x, xo, offset, xq, qo, xc, xs, xm, so):
    """One block: x[xo:xo+32] (float32) -> xq[qo:qo+32] = its int8 values' bytes, xc[so:so+8]
    = -offset * the sums of each four of them, xs[so:so+8] = d, xm[so:so+8] = d * those sums
    (flat offsets). d = amax /
    127, q = x * (1 / d) rounded half away from zero (the truncation and the remainder are
    exact in float32); amax by the bits of |x| (an integer max: NaN and Inf have the largest
    bits of all, and such a block gets q = 0 and d = NaN); a block whose 1 / d overflows
    (all zeros, or |x| below about 2^-121) gets q = 0 and d = 0."""
    if not (_c_array(x, types.float32) and _c_array(xq, types.uint8)
            and _c_array(xc, types.int32) and _c_array(xs, types.float32)
            and _c_array(xm, types.float32) and offset == types.int32):
        return None

    def codegen(ctx, builder, sig, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        i32v, f32v = ir.VectorType(i32, QK), ir.VectorType(f32, QK)

        def c(ty, v, n=QK):
            return ir.Constant(ir.VectorType(ty, n), [v] * n)
        v = _vload(ctx, builder, sig.args[0], args[0], args[1])
        bits = builder.and_(builder.bitcast(v, i32v), c(i32, 0x7FFFFFFF))
        umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32v]),
                                              f"llvm.vector.reduce.umax.v{QK}i32")
        top = builder.call(umax, [bits])
        bad = builder.icmp_unsigned(">=", top, ir.Constant(i32, 0x7F800000))
        d = builder.fdiv(builder.bitcast(top, f32), ir.Constant(f32, 127.0))
        inv = builder.fdiv(ir.Constant(f32, 1.0), d)
        use = builder.and_(builder.fcmp_ordered("<", inv, ir.Constant(f32, float("inf"))),
                           builder.not_(bad))          # d = 0 or below 2^-128: q = 0, d = 0
        y = builder.select(use, builder.fmul(v, _splat(builder, inv)), c(f32, 0.0))
        t = builder.fptosi(y, i32v)
        r = builder.fsub(y, builder.sitofp(t, f32v))
        q = builder.sub(builder.add(t, builder.zext(builder.fcmp_ordered(">=", r, c(f32, 0.5)),
                                                    i32v)),
                        builder.zext(builder.fcmp_ordered("<=", r, c(f32, -0.5)), i32v))
        _vstore(ctx, builder, sig.args[3], args[3], args[4],
                builder.trunc(q, ir.VectorType(ir.IntType(8), QK)), 1)
        lane = ir.VectorType(i32, 8)
        sums = None
        for k in range(4):
            part = builder.shuffle_vector(q, q, ir.Constant(lane, [4 * j + k for j in range(8)]))
            sums = part if sums is None else builder.add(sums, part)
        _vstore(ctx, builder, sig.args[5], args[5], args[8],
                builder.mul(sums, _splat(builder, builder.neg(args[2]), 8)))
        dd = _splat(builder, builder.select(bad, ir.Constant(f32, float("nan")),
                                            builder.select(use, d, ir.Constant(f32, 0.0))), 8)
        _vstore(ctx, builder, sig.args[6], args[6], args[8], dd)
        _vstore(ctx, builder, sig.args[7], args[7], args[8],
                builder.fmul(dd, builder.sitofp(sums, ir.VectorType(f32, 8))))
        return ctx.get_dummy_value()
    return types.void(x, xo, offset, xq, qo, xc, xs, xm, so), codegen


@njit(**FLAGS)
def quantize_rows(x, ridx, offsets, experts, offset):
    # x (*, K) float32 C-contiguous, ridx (N,) int64: the rows x[ridx[r]] in expert order (an
    # empty ridx: x's own rows), offsets (E+1,), experts (E,) bool -> the rows of the experts
    # marked, rounded (n of them, in order): xq (n, KP) uint8: the int8 values' bytes (zeros
    # past K; KP = padded(K)), xc (n, KP/4) int32: -offset * the sum of each four bytes'
    # values, xs (n, KP/4) float32: each block's d over its 8 lanes (zeros past K), xm (same):
    # d * each four values' sum (the weights' minima multiply it: q4_k), and
    # qidx (N,) int64: row r's row in them. Blocks by vround (a NaN or an Inf: q = 0 and
    # d = NaN, so that its products are NaN, as float32 ones would be). Serial: a decoding
    # step rounds a few rows.
    K = x.shape[1]
    N = offsets[-1]
    nb, KP = K // QK, padded(K)
    qidx = np.zeros(N, np.int64)
    n = 0
    for e in range(experts.shape[0]):
        if experts[e]:
            for r in range(offsets[e], offsets[e + 1]):
                qidx[r] = n
                n += 1
    xq = np.zeros((n, KP), np.uint8)
    xc = np.zeros((n, KP // 4), np.int32)
    xs = np.zeros((n, KP // 4), np.float32)
    xm = np.zeros((n, KP // 4), np.float32)
    for e in range(experts.shape[0]):
        if not experts[e]:
            continue
        for r in range(offsets[e], offsets[e + 1]):
            i = qidx[r]
            xo = (ridx[r] if ridx.shape[0] else r) * K
            for b in range(nb):
                vround(x, xo + b * QK, offset, xq, i * KP + b * QK, xc, xs, xm,
                       i * (KP // 4) + b * 8)
    return xq, xc, xs, xm, qidx


# --------------------------------------------------------------------------- vector steps

def _load_bytes(ctx, builder, sig, args, i, j, n):
    # the n bytes at flat offset args[j] of uint8 array args[i]
    return _vload(ctx, builder, sig.args[i], args[i], args[j], ir.VectorType(ir.IntType(8), n), 1)


def _two_blocks(values):
    """An intrinsic f(src, o0, o1, wq): wq[0:64] = values(builder, load), the 64 unsigned
    bytes of two blocks whose bytes start at o0 and o1 of src (uint8 arrays; load(k, n): the
    n bytes at o0 (k = 0) or o1 (k = 1))."""
    @intrinsic
    def two_blocks(typingctx, src, o0, o1, wq):
        if not (_c_array(src, types.uint8) and _c_array(wq, types.uint8)):
            return None

        def codegen(ctx, builder, sig, args):
            def load(k, n):
                return _load_bytes(ctx, builder, sig, args, 0, 1 + k, n)
            _vstore(ctx, builder, sig.args[3], args[3], ir.Constant(ir.IntType(64), 0),
                    values(builder, load), 1)
            return ctx.get_dummy_value()
        return types.void(src, o0, o1, wq), codegen
    return two_blocks


def _q8_values(builder, load):
    # the 32 int8 values of each block, + 128 (vpdpbusd's unsigned operand: u = q + 128)
    cat = ir.Constant(ir.VectorType(ir.IntType(32), PAIR), list(range(PAIR)))
    v = builder.shuffle_vector(load(0, QK), load(1, QK), cat)
    return builder.xor(v, ir.Constant(_I8V, [0x80] * PAIR))


def _q4_values(builder, load):
    # the nibbles of each block's 16 bytes, low ones then high ones (a q4_0 block's values
    # 0..31 in order), one a byte: [a, a, b, b] >> [0, 4, 0, 4] (16 bytes each) & 15, shifted
    # as 16-bit lanes (x86 has no byte shifts; the mask keeps each byte's own bits)
    h = QK // 2
    twice = ir.Constant(ir.VectorType(ir.IntType(32), PAIR),
                        [i % h + (h if i >= QK else 0) for i in range(PAIR)])
    v = builder.shuffle_vector(load(0, h), load(1, h), twice)
    i16v = ir.VectorType(ir.IntType(16), PAIR // 2)
    shift = ir.Constant(i16v, [4 * ((i // (h // 2)) % 2) for i in range(PAIR // 2)])
    v = builder.bitcast(builder.lshr(builder.bitcast(v, i16v), shift), _I8V)
    return builder.and_(v, ir.Constant(_I8V, [15] * PAIR))


vbytes_q8, vbytes_q4 = _two_blocks(_q8_values), _two_blocks(_q4_values)


@intrinsic
def vscales(typingctx, src, o0, o1, sw):
    """sw[0:8] = the fp16 scale at byte o0 of src, sw[8:16] = the one at byte o1 (both
    converted in one vector instruction: vcvtph2ps where the CPU has F16C)."""
    if not (_c_array(src, types.uint8) and _c_array(sw, types.float32)):
        return None

    def codegen(ctx, builder, sig, args):
        i16 = ir.IntType(16)
        pair = ir.Constant(ir.VectorType(i16, 2), ir.Undefined)
        for k in (0, 1):
            h = builder.load(_at(ctx, builder, sig.args[0], args[0], args[1 + k], i16), align=1)
            pair = builder.insert_element(pair, h, ir.Constant(ir.IntType(32), k))
        f = builder.fpext(builder.bitcast(pair, ir.VectorType(ir.HalfType(), 2)),
                          ir.VectorType(ir.FloatType(), 2))
        v = builder.shuffle_vector(f, f, ir.Constant(_I32L, [0] * 8 + [1] * 8))
        _vstore(ctx, builder, sig.args[3], args[3], ir.Constant(ir.IntType(64), 0), v)
        return ctx.get_dummy_value()
    return types.void(src, o0, o1, sw), codegen


@intrinsic
def vnibbles(typingctx, src, off, wq):
    """wq[0:32] = the low nibbles of src[off:off+32], wq[32:64] = their high nibbles (a q4_k
    super-block's groups 2i and 2i + 1, one a byte)."""
    if not (_c_array(src, types.uint8) and _c_array(wq, types.uint8)):
        return None

    def codegen(ctx, builder, sig, args):
        v = _load_bytes(ctx, builder, sig, args, 0, 1, QK)
        cat = ir.Constant(ir.VectorType(ir.IntType(32), PAIR), list(range(PAIR)))
        i8 = ir.VectorType(ir.IntType(8), QK)
        lo = builder.and_(v, ir.Constant(i8, [15] * QK))
        hi = builder.lshr(v, ir.Constant(i8, [4] * QK))
        _vstore(ctx, builder, sig.args[2], args[2], ir.Constant(ir.IntType(64), 0),
                builder.shuffle_vector(lo, hi, cat), 1)
        return ctx.get_dummy_value()
    return types.void(src, off, wq), codegen


@intrinsic
def vbytes_q6(typingctx, src, lo, lo_shift, hi, hi_shift, wq):
    """wq[0:64] = q6_k's 6-bit values of two chunks side by side: ((src[lo:lo+64] >> lo_shift)
    & 15) | ((src[hi:hi+32] >> hi_shift, then hi_shift + 2, for the second chunk) & 3) << 4."""
    if not (_c_array(src, types.uint8) and _c_array(wq, types.uint8)
            and isinstance(lo_shift, types.Integer) and isinstance(hi_shift, types.Integer)):
        return None

    def codegen(ctx, builder, sig, args):
        i16v = ir.VectorType(ir.IntType(16), PAIR // 2)

        def shifted(v, amounts):       # bytes shifted right as 16-bit lanes (no byte shifts)
            return builder.bitcast(builder.lshr(builder.bitcast(v, i16v), amounts), _I8V)

        def c8(v):
            return ir.Constant(_I8V, [v] * PAIR)
        s_lo = builder.trunc(args[2], ir.IntType(16))
        low = builder.and_(shifted(_load_bytes(ctx, builder, sig, args, 0, 1, PAIR),
                                   _splat(builder, s_lo, PAIR // 2)), c8(15))
        h = _load_bytes(ctx, builder, sig, args, 0, 3, QK)
        twice = builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(ir.IntType(32), PAIR),
                                                         list(range(QK)) * 2))
        s_hi = builder.trunc(args[4], ir.IntType(16))
        amounts = builder.shuffle_vector(
            _splat(builder, s_hi, PAIR // 2),
            _splat(builder, builder.add(s_hi, ir.Constant(ir.IntType(16), 2)), PAIR // 2),
            ir.Constant(ir.VectorType(ir.IntType(32), PAIR // 2),
                        list(range(QK // 2)) + list(range(PAIR // 2 + QK // 2, PAIR))))
        high = builder.shl(builder.and_(shifted(twice, amounts), c8(3)), c8(4))
        _vstore(ctx, builder, sig.args[5], args[5], ir.Constant(ir.IntType(64), 0),
                builder.or_(low, high), 1)
        return ctx.get_dummy_value()
    return types.void(src, lo, lo_shift, hi, hi_shift, wq), codegen


@intrinsic
def vquad(typingctx, sv, so, out):
    """out[0:16] = sv[so], sv[so+1], sv[so+2], sv[so+3], each over 4 lanes (q6_k: a pair's
    four scales, one per 16 values)."""
    if not (_c_array(sv, types.float32) and _c_array(out, types.float32)):
        return None

    def codegen(ctx, builder, sig, args):
        f4 = ir.VectorType(ir.FloatType(), 4)
        v = _vload(ctx, builder, sig.args[0], args[0], args[1], f4)
        v = builder.shuffle_vector(v, v, ir.Constant(_I32L, [i // 4 for i in range(LANES)]))
        _vstore(ctx, builder, sig.args[2], args[2], ir.Constant(ir.IntType(64), 0), v)
        return ctx.get_dummy_value()
    return types.void(sv, so, out), codegen


@intrinsic
def vpair(typingctx, d0, d1, out):
    """out[0:8] = d0, out[8:16] = d1: a pair's two scales (or minima) over its lanes."""
    if not (_c_array(out, types.float32) and d0 == types.float32 and d1 == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        two = ir.Constant(ir.VectorType(ir.FloatType(), 2), ir.Undefined)
        for k in (0, 1):
            two = builder.insert_element(two, args[k], ir.Constant(ir.IntType(32), k))
        v = builder.shuffle_vector(two, two, ir.Constant(_I32L, [0] * 8 + [1] * 8))
        _vstore(ctx, builder, sig.args[2], args[2], ir.Constant(ir.IntType(64), 0), v)
        return ctx.get_dummy_value()
    return types.void(d0, d1, out), codegen


@intrinsic
def vmin(typingctx, acc, ao, xm, so, mw):
    """acc[ao:ao+16] -= mw[0:16] * xm[so:so+16] (one fused multiply-add): the minima's term."""
    if not (_c_array(acc, types.float32) and _c_array(xm, types.float32)
            and _c_array(mw, types.float32)):
        return None

    def codegen(ctx, builder, sig, args):
        zero = ir.Constant(ir.IntType(64), 0)
        m = builder.fneg(_vload(ctx, builder, sig.args[4], args[4], zero, _F32L))
        a = _vload(ctx, builder, sig.args[0], args[0], args[1], _F32L)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32L, [_F32L] * 3),
                                            f"llvm.fmuladd.v{LANES}f32")
        v = builder.call(fn, [m, _vload(ctx, builder, sig.args[2], args[2], args[3], _F32L), a])
        _vstore(ctx, builder, sig.args[0], args[0], args[1], v)
        return ctx.get_dummy_value()
    return types.void(acc, ao, xm, so, mw), codegen


def _dpbusd(builder, acc, u, s, vnni):
    # acc <16 x i32> + per lane the four products of unsigned bytes u and signed bytes s
    # (<16 x i32> each, four bytes a lane): vpdpbusd, or the same sum in plain vector code
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32L, [_I32L] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, u, s])
    i32v = ir.VectorType(ir.IntType(32), PAIR)
    p = builder.mul(builder.zext(builder.bitcast(u, _I8V), i32v),
                    builder.sext(builder.bitcast(s, _I8V), i32v))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(
            p, p, ir.Constant(_I32L, [4 * lane + k for lane in range(LANES)])))
    return acc


def _make_vdot(vnni):
    @intrinsic
    def vdot_i8(typingctx, acc, ao, xq, xo, xc, xs, so, wq, sw):
        """acc[ao:ao+16] += float32(xc[so:so+16] + the lanes' products of wq[0:64]
        (unsigned) with xq[xo:xo+64] (signed)) * (sw[0:16] * xs[so:so+16]) (flat offsets;
        one rounding for the scale product, one fused multiply-add)."""
        if not (_c_array(acc, types.float32) and _c_array(xq, types.uint8)
                and _c_array(xc, types.int32) and _c_array(xs, types.float32)
                and _c_array(wq, types.uint8) and _c_array(sw, types.float32)):
            return None

        def codegen(ctx, builder, sig, args):
            zero = ir.Constant(ir.IntType(64), 0)
            lanes = _vload(ctx, builder, sig.args[4], args[4], args[6], _I32L)
            u = _vload(ctx, builder, sig.args[7], args[7], zero, _I32L, 1)
            s = _vload(ctx, builder, sig.args[2], args[2], args[3], _I32L, 1)
            f = builder.sitofp(_dpbusd(builder, lanes, u, s, vnni), _F32L)
            scale = builder.fmul(_vload(ctx, builder, sig.args[8], args[8], zero, _F32L),
                                 _vload(ctx, builder, sig.args[5], args[5], args[6], _F32L))
            a = _vload(ctx, builder, sig.args[0], args[0], args[1], _F32L)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_F32L, [_F32L] * 3), f"llvm.fmuladd.v{LANES}f32")
            _vstore(ctx, builder, sig.args[0], args[0], args[1], builder.call(fn, [f, scale, a]))
            return ctx.get_dummy_value()
        return types.void(acc, ao, xq, xo, xc, xs, so, wq, sw), codegen
    return vdot_i8


# the dot step with vpdpbusd (AVX512_VNNI hosts only) and with plain vector code: the same sums
vdot_vnni, vdot_plain = _make_vdot(True), _make_vdot(False)


vadd16, vsum16 = lanes_add(LANES), lanes_sum(LANES)    # a pair's 16 lanes


# --------------------------------------------------------------------------- weight pairs
# blocks b0 = 2p and b1 (2p + 1, or 2p again for half a pair) of the row at byte o -> wq (the
# unsigned bytes), sw (the scales over the lanes), mw (q4_k: the minima; untouched otherwise);
# sv: the super-block's scales quant.prep_<fmt> read (q4_k)

@njit(inline="always", cache=True)
def pair_q8_0(blocks, o, b0, b1, wq, sw, mw, sv):
    o0, o1 = o + b0 * BLOCK_BYTES_Q8_0, o + b1 * BLOCK_BYTES_Q8_0
    vbytes_q8(blocks, o0 + 2, o1 + 2, wq)
    vscales(blocks, o0, o1, sw)


@njit(inline="always", cache=True)
def pair_q4_0(blocks, o, b0, b1, wq, sw, mw, sv):
    o0, o1 = o + b0 * BLOCK_BYTES_Q4_0, o + b1 * BLOCK_BYTES_Q4_0
    vbytes_q4(blocks, o0 + 2, o1 + 2, wq)
    vscales(blocks, o0, o1, sw)


@njit(inline="always", cache=True)
def pair_q4_k(blocks, o, b0, b1, wq, sw, mw, sv):
    # groups j = b0 % 8 (even) and j + 1 of super-block b0 // 8: the low and the high nibbles
    # of its bytes 16 + 32 (j / 2)..; v = (d sc_j) q - dmin m_j (sv: d sc, then dmin m)
    j = b0 & 7
    vnibbles(blocks, o + (b0 >> 3) * BLOCK_BYTES_Q4_K + 16 + (j >> 1) * QK, wq)
    vpair(sv[j], sv[j + 1], sw)
    vpair(sv[8 + j], sv[9 + j], mw)


@njit(inline="always", cache=True)
def pair_q6_k(blocks, o, b0, b1, wq, sw, mw, sv):
    # chunks j = b0 % 8 (even) and j + 1 of super-block b0 // 8, half i = j // 4, quarter
    # l = j % 4 (0 or 2): their low nibbles are the 64 bytes 64i.. shifted by 4 (l / 2), their
    # high pairs the 32 bytes 128 + 32i.. shifted by 2l and 2l + 2; v = (d sc_g) (q - 32),
    # one scale per 16 values (sv: the 16 of the super-block)
    h = o + (b0 >> 3) * BLOCK_BYTES_Q6_K
    j = b0 & 7
    i, l = j >> 2, j & 3
    vbytes_q6(blocks, h + 64 * i, (l >> 1) * 4, h + 128 + QK * i, 2 * l, wq)
    vquad(sv, 2 * j, sw)


# format code -> (pair, prep, bytes of a pair of blocks, whether it has minima)
_PAIRS = {Q8_0: (pair_q8_0, prep_none, 2 * BLOCK_BYTES_Q8_0, False),
          Q4_0: (pair_q4_0, prep_none, 2 * BLOCK_BYTES_Q4_0, False),
          Q4_K: (pair_q4_k, prep_q4_k, BLOCK_BYTES_Q4_K // 4, True),
          Q6_K: (pair_q6_k, prep_q6_k, BLOCK_BYTES_Q6_K // 4, False)}


# --------------------------------------------------------------------------- the kernel

def _make_group(pair, prep, pair_bytes, mins, R, S, vnni=VNNI, pf_bytes=PREFETCH_BYTES):
    size = R * S * LANES
    use_pf = pf_bytes > 0
    # every line a step of S pairs reads is asked for (some twice: a step is not whole lines);
    # one request a step left lines to the hardware prefetcher, which fell behind on these
    # short compute-light steps (bench/bench_int8.py --presets decode-1,decode-8)
    n_pf = -(-S * pair_bytes // 64)
    dot = vdot_vnni if vnni else vdot_plain

    @njit(inline="always", cache=True)
    def rows(acc, base, p, xq, xc, xs, xm, xo, KP, KL, wq, sw, mw):
        # pair p (its weights in wq, sw, mw) times the R rows into lanes base.. of acc: the
        # products, then the minima's term (mins)
        for i in range(R):
            ao, so = base + i * LANES, xo[i] * KL + LANES * p
            dot(acc, ao, xq, xo[i] * KP + PAIR * p, xc, xs, so, wq, sw)
            if mins:
                vmin(acc, ao, xm, so, mw)

    @njit(**FLAGS)
    def cols_group(src, ridx, r0, blocks, e, c0, c1, K, out):
        # src = (xq, xc, xs, xm) from quantize_rows, R rows xq[ridx[r0 + i]] and the weight
        # rows c0..c1 of expert e (blocks along K) -> out[r0 + i, c0:c1] = their dot products.
        # Lanes (S, R, 16): pair p's go to set p mod S (the last npair mod S pairs, half a
        # pair included, to set 0); the sets are added in order, the lanes in vsum16's tree.
        xq, xc, xs, xm = src
        acc = carray(_stack_empty(size, np.float32), (size,))
        wq = carray(_stack_empty(PAIR, np.uint8), (PAIR,))
        sw = carray(_stack_empty(LANES, np.float32), (LANES,))
        mw = carray(_stack_empty(LANES, np.float32), (LANES,))
        sv = carray(_stack_empty(LANES, np.float32), (LANES,))
        xo = carray(_stack_empty(R, np.int64), (R,))
        for i in range(R):
            xo[i] = ridx[r0 + i]
        KP, KL = xq.shape[1], xc.shape[1]
        rbytes = blocks.shape[2]
        nb = K // QK
        npair = (nb + 1) // 2
        full = nb // 2
        ns = full - full % S
        for c in range(c0, c1):
            o = (e * blocks.shape[1] + c) * rbytes
            for j in range(size):
                acc[j] = 0.0
            for p0 in range(0, ns, S):
                for s in range(S):
                    p = p0 + s
                    if use_pf and s == 0:
                        for q in range(n_pf):
                            prefetch(blocks, o + p * pair_bytes + pf_bytes + 64 * q)
                    if new_super(2 * p, 0):
                        prep(blocks, o, 2 * p, sv, 0)
                    pair(blocks, o, 2 * p, 2 * p + 1, wq, sw, mw, sv)
                    rows(acc, s * R * LANES, p, xq, xc, xs, xm, xo, KP, KL, wq, sw, mw)
            for p in range(ns, npair):
                b1 = 2 * p + 1 if 2 * p + 1 < nb else 2 * p
                if new_super(2 * p, 0):
                    prep(blocks, o, 2 * p, sv, 0)
                pair(blocks, o, 2 * p, b1, wq, sw, mw, sv)
                if b1 == 2 * p:                # half a pair (q8_0 / q4_0): no second block
                    for j in range(LANES // 2, LANES):
                        sw[j] = 0.0
                rows(acc, 0, p, xq, xc, xs, xm, xo, KP, KL, wq, sw, mw)
            for s in range(1, S):
                for i in range(R):
                    vadd16(acc, i * LANES, acc, (s * R + i) * LANES)
            for i in range(R):
                out[r0 + i, c] = vsum16(acc, i * LANES)
    return cached(cols_group)


# the group functions are explicit vector steps: they need neither LLVM's SLP nor its loop
# vectorizer (quant.py's float32 groups take slp_vectorized), so one compile serves the
# kernel below and the fused decoding MLP
_COLS_TASKS = {f: _make_cols_task(tuple((r, _make_group(*spec, r, s)) for r, s in COL_GROUPS))
               for f, spec in _PAIRS.items()}
_COLS_KERNELS = {f: _make_cols_kernel(task) for f, task in _COLS_TASKS.items()}


_NO_ROWS = np.zeros(0, np.int64)


def run_qstream(src, blocks, fmt, trans_w, offsets, out, experts, ridx=None):
    """quant.run_qstream with the activations rounded to 8 bits for the integer dot products
    (same arguments; fmt Q8_0 or Q4_0). The (M, K) layout only: the (K, M) one, whose blocks
    run along the output columns, keeps quant.py's float32 kernel. Only the streamed
    experts' rows are rounded."""
    if not trans_w:
        _run_qstream_f32(src, blocks, fmt, trans_w, offsets, out, experts, ridx)
        return
    tasks, _, _ = qstream_plan(offsets, experts, src.shape[1], out.shape[1], True, fmt=fmt)
    xq, xc, xs, xm, qidx = quantize_rows(src, _NO_ROWS if ridx is None else ridx, offsets,
                                         experts, np.int32(OFFSET[fmt]))
    _COLS_KERNELS[fmt]((xq, xc, xs, xm), qidx, blocks, offsets, tasks, out)


# --------------------------------------------------------------------------- the decoding MLP

def _make_mlp_kernel(f1, f2):
    task1, task2 = _COLS_TASKS[f1], _COLS_TASKS[f2]
    off1, off2 = np.int32(OFFSET[f1]), np.int32(OFFSET[f2])
    align1, align2 = BLOCK_VALUES[f1], BLOCK_VALUES[f2]

    @njit(parallel=True, **FLAGS)
    def mlp_kernel(x, tokens, offsets, experts, w1a, w1b, w2, code, h):
        # x (*, d) float32 C-contiguous, tokens (N,) int64: row i of the batch is x[tokens[i]]
        # (empty: x's own rows), in expert order by offsets (E+1,); experts (E,) bool: the
        # experts run here. w1 = [w1a | w1b] along its output columns (w1a (E, s, row_bytes(d))
        # in format f1, w1b (E, H1 - s, row_bytes(d)): a stacked weight's second part, or
        # empty), w2 (E, D, row_bytes(h)) in format f2 -> new h_pre (N, H1), h_act (N, h), ys
        # (N, D), set on those experts' rows: run_qstream(w1), the activation, run_qstream(w2)
        # (the same tasks, roundings and sums: the same bits) in one compiled call instead of
        # about ten host calls, each costing as much as a small expert's work on cold caches.
        N, d, s = offsets[-1], x.shape[1], w1a.shape[1]
        H1 = s + w1b.shape[1]
        h_pre = np.empty((N, H1), np.float32)
        h_act = np.empty((N, h), np.float32)
        ys = np.empty((N, w2.shape[1]), np.float32)
        src = quantize_rows(x, tokens, offsets, experts, off1)
        ta = stream_plan(offsets, experts, d, s, True, QSTREAM_CT, QSTREAM_ACC, align1, True)[0]
        tb = stream_plan(offsets, experts, d, H1 - s, True, QSTREAM_CT, QSTREAM_ACC, align1,
                         True)[0]
        ha, hb, na = h_pre[:, :s], h_pre[:, s:], ta.shape[0]
        for t in prange(na + tb.shape[0]):
            if t < na:
                task1(src[:4], src[4], w1a, offsets, ta, t, ha)
            else:
                task1(src[:4], src[4], w1b, offsets, tb, t - na, hb)
        rows = np.empty(N, np.int64)
        n = 0
        for e in range(experts.shape[0]):
            if experts[e]:
                for r in range(offsets[e], offsets[e + 1]):
                    rows[n] = r
                    n += 1
        for i in prange(n):
            r = rows[i]
            activate_rows(h_pre[r:r + 1], code, h_act[r:r + 1])
        src = quantize_rows(h_act, np.zeros(0, np.int64), offsets, experts, off2)
        t2 = stream_plan(offsets, experts, h_act.shape[1], ys.shape[1], True, QSTREAM_CT,
                         QSTREAM_ACC, align2, True)[0]
        for t in prange(t2.shape[0]):
            task2(src[:4], src[4], w2, offsets, t2, t, ys)
        return h_pre, h_act, ys
    return cached(mlp_kernel)


_MLP_KERNELS = {}


def run_mlp(x, tokens, offsets, experts, w1_parts, w2, f1, f2, code, h):
    """The streamed experts' whole MLP on q8_0 activations, in the (M, K) layout -> (h_pre
    (N, H1) = x[tokens] @ W1_e^T (tokens None: x's rows), h_act (N, h) = act(h_pre)
    (activation code), ys (N, D) = h_act @ W2_e^T), set on the rows of every expert where
    the (E,) bool mask `experts` is True: what run_qstream(w1), the activation and
    run_qstream(w2) give, bit for bit. w1_parts: w1's one or two blocks arrays along its
    output rows (a stacked weight's parts), format code f1; w2: its blocks, format f2. x and
    the blocks C-contiguous."""
    if (f1, f2) not in _MLP_KERNELS:
        _MLP_KERNELS[f1, f2] = _make_mlp_kernel(f1, f2)
    w1a = w1_parts[0]
    w1b = w1_parts[1] if len(w1_parts) > 1 else w1a[:, :0]     # empty: C-contiguous
    return _MLP_KERNELS[f1, f2](x, _NO_ROWS if tokens is None else tokens, offsets, experts,
                                w1a, w1b, w2, code, h)
