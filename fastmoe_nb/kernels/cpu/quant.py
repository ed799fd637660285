"""CPU kernels for quantized expert weights: block decoders, row dequantization (prefill), and
the decoding GEMM that reads each selected expert's blocks from memory once.

Formats (GGUF-compatible, weight-only: activations and accumulation stay float32):
    bf16  uint16 bits; value = the float32 with those bits in its high half
    q8_0  blocks of 32 values in 34 bytes: fp16 scale d (little-endian), 32 int8 q;
          v = float32(d) * q
    q4_0  blocks of 32 values in 18 bytes: fp16 d, 16 bytes; value j < 16 is byte[j] & 0xF,
          value j >= 16 is byte[j - 16] >> 4; v = (q - 8) * float32(d)
    q4_k  super-blocks of 256 values in 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit
          (scale, min) pairs, 128 bytes of nibbles; group g of 32 values is the low (g even)
          or high (g odd) nibbles of bytes 32 (g / 2)..; v = (d * sc_g) * q - dmin * m_g
    q6_k  super-blocks of 256 values in 210 bytes: 128 bytes of low nibbles, 64 of high 2-bit
          pairs, 16 int8 scales (one per 16 values), fp16 d; v = (d * sc) * (q - 32)
(formats.py's NumPy codec and docs/formats.md hold the full layouts.) A weight of logical
shape (E, R, C) is stored blocked along its last axis: uint8 (E, R, row_bytes(fmt, C)) (bf16:
uint16 (E, R, C), any C), C-contiguous. An expert's matrix is (K, M) (out = x @ W, blocks along
M) or, trans, (M, K) (out = x @ W.T, blocks along K: the PyTorch / GGUF layout).

Decoders work on chunks of 32 values (a q8_0 / q4_0 block, an eighth of a q4_k / q6_k
super-block), addressed by the flat element offset o of their row in the blocks array (bytes;
bf16: values) and the chunk's index b along the row: the row of expert e, row r starts at
o = (e * R + r) * blocks.shape[2]; chunk b starts at value 32 b. Block decoders:
    prep_<fmt>(blocks, o, b, sv, svo): sv[svo:svo+16] = the scales of the super-block holding
        chunk b (q4_k: d * sc_j, then dmin * m_j; q6_k: d * sc_g), read once for its eight
        chunks (a kernel calls it at its first chunk and at every chunk b % 8 == 0: new_super);
        nothing for bf16 / q8_0 / q4_0, whose chunks carry their own scale
    decode_<fmt>(blocks, o, b, sv, svo, dst, do): dst[do:do+32] = the chunk's dequantized
        values, exactly as formats.dequantize defines them, in its order of float32
        operations and without fused multiply-adds (the fp16 scales by half_to_f32: F16C's
        vcvtph2ps where the CPU has it, bit arithmetic elsewhere; no float16 type in a loop)
    values_<fmt>(blocks, o, b, sv, svo, dst, do) -> d: values whose product with d is the
        chunk's (q, q - 8, d; bf16 and the k-formats, whose chunks hold two scales or a min:
        the values themselves, d = 1), so that a kernel can fold d into a scalar once a chunk.
Their loops are whole-chunk LLVM vector operations (intrinsics below): with numba's scalar
loops LLVM's vectorizers left some of them scalar, depending on the code around them.

Decoding GEMM (stream; few rows an expert, bound by the weights' bytes): like gemm.py's
stream_kernel, a task reads one block of an expert's weights once, decodes it in registers
and multiplies it into all of the expert's rows:
    (K, M): task = STREAM_KC depth rows x a column block (a multiple of the format's block:
            32 columns, 256 for q4_k / q6_k): four depth rows at a time, each chunk of 32
            columns is decoded and multiply-added, x * d folded into one scalar a row and
            chunk, into the rows' partial products (L1/L2); gemm.stream_sum adds the depth
            blocks' partials in depth order.
    (M, K): task = QSTREAM_CT output columns x the whole depth: per column, each chunk is
            decoded once (the exact values) and multiplied into lane sums of a group of rows
            (registers): 32 lanes a row, in as many sets as keep eight vector chains going
            (chunk b goes to set b mod S); the sets and lanes are added in a fixed tree.
Tasks are cut from the shapes alone and every sum runs in a fixed order: results are bitwise
the same for any thread count. Each format has its own compiled kernels, made by the
factories below from its decoder (no loop branches on the format; cache.cached keeps them in
Numba's disk cache across processes); the entry points
qstream_rows / qstream_cols / dequant_rows / dequant take the format code.
"""
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cache import cached
from .config import (COL_GROUPS, ISA, PREFETCH_BYTES, QSTREAM_ACC, QSTREAM_CT,
                     host_features)
from .fastmath import _bits_f32
from .gemm import _stack_empty, slp_vectorized, stream_plan, stream_sum

# Format codes the kernels take (the weight type's `format` name -> code).
BF16, Q8_0, Q4_0, Q4_K, Q6_K = 1, 2, 3, 4, 5
FORMATS = {"bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_k": Q4_K, "q6_k": Q6_K}
QK = 32                                    # values a decoder call gives (a chunk)
QK_K = 256                                 # values per q4_k / q6_k super-block
BLOCK_VALUES = {BF16: QK, Q8_0: QK, Q4_0: QK, Q4_K: QK_K, Q6_K: QK_K}   # bf16: a chunk
BLOCK_BYTES = {BF16: 2 * QK, Q8_0: 2 + QK, Q4_0: 2 + QK // 2, Q4_K: 144, Q6_K: 210}
BLOCK_BYTES_Q8_0, BLOCK_BYTES_Q4_0, BLOCK_BYTES_Q4_K, BLOCK_BYTES_Q6_K = (
    BLOCK_BYTES[f] for f in (Q8_0, Q4_0, Q4_K, Q6_K))        # the decoders' literals
ITEMSIZE = {f: 2 if f == BF16 else 1 for f in FORMATS.values()}   # bytes of an element
# the blocks' elements 256 values of a row take: chunk b of a row starts near element
# b * SPAN[fmt] / 8 (for prefetches only: q6_k's chunks are no whole number of bytes)
SPAN = {f: QK_K // BLOCK_VALUES[f] * BLOCK_BYTES[f] // ITEMSIZE[f] for f in FORMATS.values()}

_W4 = 4 * QK          # stack buffer sizes (literals)
_SV = 16              # a super-block's prepared scales (q4_k: 8 + 8 mins, q6_k: 16)
_SV4 = 4 * _SV

FLAGS = {"cache": True, "fastmath": {"contract"}}   # FMA contraction only: no reassociation

_F32 = np.float32
_TWO_M24 = np.float32(2.0 ** -24)          # fp16's subnormal step


def row_bytes(fmt, C):
    """Elements (uint8 bytes; bf16: uint16 values) one row of C values takes in format fmt."""
    return C if fmt == BF16 else (C // BLOCK_VALUES[fmt]) * BLOCK_BYTES[fmt]


# --------------------------------------------------------------------------- block vectors

# A block's 32 values are one LLVM vector (<32 x float>: two AVX-512 or four AVX2 registers,
# whatever the target has); an operation on a stack buffer is promoted to registers.

_F32V = ir.VectorType(ir.FloatType(), QK)
_I32V = ir.VectorType(ir.IntType(32), QK)
_I64 = ir.IntType(64)
# q4_0 on AVX-512: a nibble picks its value from a 16-entry table (vpermps reads the low four
# bits of each index), which replaces the mask, the subtraction and the conversion, and the
# table times d gives the scaled values at the cost of one multiply a block.
_Q4_TABLE = ISA == "avx512"


def _at(ctx, builder, aryty, ary, idx, vty):
    # a pointer to vty at flat element idx of a C-contiguous array
    data = ctx.make_array(aryty)(ctx, builder, ary).data
    return builder.bitcast(builder.gep(data, [idx]), vty.as_pointer())


def _vload(ctx, builder, aryty, ary, idx, vty=_F32V, align=4):
    return builder.load(_at(ctx, builder, aryty, ary, idx, vty), align=align)


def _vstore(ctx, builder, aryty, ary, idx, v, align=4):
    builder.store(v, _at(ctx, builder, aryty, ary, idx, v.type), align=align)


def _splat(builder, x, n=QK):
    vty = ir.VectorType(x.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _fmuladd(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32V, [_F32V] * 3),
                                        f"llvm.fmuladd.v{QK}f32")
    return builder.call(fn, [a, b, c])


def _c_array(a, dtype):
    return isinstance(a, types.Array) and a.dtype == dtype and a.layout == "C"


def _ok(*checks):
    return all(checks)


@intrinsic
def vq8(typingctx, src, off, d, dst, doff):
    """dst[doff:doff+32] = d * float32(int8(src[off:off+32])) (flat offsets; d == 1 folds)."""
    if not _ok(_c_array(src, types.uint8), _c_array(dst, types.float32), d == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        q = _vload(ctx, builder, sig.args[0], args[0], args[1],
                   ir.VectorType(ir.IntType(8), QK), 1)
        v = builder.fmul(_splat(builder, args[2]), builder.sitofp(q, _F32V))
        _vstore(ctx, builder, sig.args[3], args[3], args[4], v)
        return ctx.get_dummy_value()
    return types.void(src, off, d, dst, doff), codegen


@intrinsic
def vq4(typingctx, src, off, d, dst, doff):
    """dst[doff:doff+32] = (nibbles of src[off:off+16] - 8) * d: the 16 low nibbles, then the
    16 high ones (flat offsets; d == 1 folds)."""
    if not _ok(_c_array(src, types.uint8), _c_array(dst, types.float32), d == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        h = QK // 2
        i32h = ir.VectorType(ir.IntType(32), h)
        f32h = ir.VectorType(ir.FloatType(), h)
        q = builder.zext(_vload(ctx, builder, sig.args[0], args[0], args[1],
                                ir.VectorType(ir.IntType(8), h), 1), i32h)
        hi = builder.lshr(q, ir.Constant(i32h, [4] * h))
        cat = ir.Constant(_I32V, list(range(QK)))
        if _Q4_TABLE:
            table = builder.fmul(ir.Constant(f32h, [float(i - 8) for i in range(h)]),
                                 _splat(builder, args[2], h))
            v = builder.shuffle_vector(_permps(builder, table, q), _permps(builder, table, hi),
                                       cat)
        else:
            lo = builder.and_(q, ir.Constant(i32h, [15] * h))
            v = builder.sub(builder.shuffle_vector(lo, hi, cat), ir.Constant(_I32V, [8] * QK))
            v = builder.fmul(builder.sitofp(v, _F32V), _splat(builder, args[2]))
        _vstore(ctx, builder, sig.args[3], args[3], args[4], v)
        return ctx.get_dummy_value()
    return types.void(src, off, d, dst, doff), codegen


def _permps(builder, table, idx):
    # table <16 x float>, idx <16 x i32> -> table[idx & 15] (vpermps; AVX-512 only)
    f32h, i32h = table.type, idx.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32h, [f32h, i32h]),
                                        "llvm.x86.avx512.permvar.sf.512")
    return builder.call(fn, [table, idx])


def _halves(builder, v):
    # <32 x T> -> its lanes 0..15 and 16..31
    h = QK // 2
    return [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                     list(range(k, k + h)))) for k in (0, h)]


def _bytes_shifted(ctx, builder, sig, args, i, j):
    # the 32 bytes at flat offset args[i] of array args[0], shifted right by args[j] bits
    i8v = ir.VectorType(ir.IntType(8), QK)
    q = _vload(ctx, builder, sig.args[0], args[0], args[i], i8v, 1)
    sh = builder.trunc(args[j], ir.IntType(8))
    return builder.lshr(q, _splat(builder, sh))


@intrinsic
def vq4k(typingctx, src, off, shift, ds, dm, dst, doff):
    """dst[doff:doff+32] = ds * q - dm, q = (src[off:off+32] >> shift) & 15 (shift 0: the low
    nibbles, 4: the high ones); the product rounded, then the difference: no fused
    multiply-add, as formats.dequantize computes it."""
    if not _ok(_c_array(src, types.uint8), _c_array(dst, types.float32),
               isinstance(shift, types.Integer), ds == types.float32, dm == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        q = _bytes_shifted(ctx, builder, sig, args, 1, 2)
        if _Q4_TABLE:          # a nibble picks ds * q - dm from a 16-entry table
            h = QK // 2
            f32h = ir.VectorType(ir.FloatType(), h)
            table = builder.fsub(builder.fmul(ir.Constant(f32h, [float(i) for i in range(h)]),
                                              _splat(builder, args[3], h)),
                                 _splat(builder, args[4], h))
            lo, hi = _halves(builder, builder.zext(q, _I32V))     # permps reads 4 bits
            v = builder.shuffle_vector(_permps(builder, table, lo), _permps(builder, table, hi),
                                       ir.Constant(_I32V, list(range(QK))))
        else:
            q = builder.and_(q, ir.Constant(q.type, [15] * QK))
            v = builder.fsub(builder.fmul(_splat(builder, args[3]), builder.uitofp(q, _F32V)),
                             _splat(builder, args[4]))
        _vstore(ctx, builder, sig.args[5], args[5], args[6], v)
        return ctx.get_dummy_value()
    return types.void(src, off, shift, ds, dm, dst, doff), codegen


@intrinsic
def vq6k(typingctx, src, lo_off, lo_shift, hi_off, hi_shift, ds0, ds1, dst, doff):
    """dst[doff:doff+32] = ds * (q - 32), q = ((src[lo_off:+32] >> lo_shift) & 15) |
    ((src[hi_off:+32] >> hi_shift) & 3) << 4, ds = ds0 for the first 16 values, ds1 for the
    last 16 (one rounding a value)."""
    if not _ok(_c_array(src, types.uint8), _c_array(dst, types.float32),
               isinstance(lo_shift, types.Integer), isinstance(hi_shift, types.Integer),
               ds0 == types.float32, ds1 == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        i8v = ir.VectorType(ir.IntType(8), QK)
        lo = builder.and_(_bytes_shifted(ctx, builder, sig, args, 1, 2),
                          ir.Constant(i8v, [15] * QK))
        hi = builder.and_(_bytes_shifted(ctx, builder, sig, args, 3, 4),
                          ir.Constant(i8v, [3] * QK))
        q = builder.sub(builder.or_(lo, builder.shl(hi, ir.Constant(i8v, [4] * QK))),
                        ir.Constant(i8v, [32] * QK))
        pair = ir.Constant(ir.VectorType(ir.FloatType(), 2), ir.Undefined)
        pair = builder.insert_element(pair, args[5], ir.Constant(ir.IntType(32), 0))
        pair = builder.insert_element(pair, args[6], ir.Constant(ir.IntType(32), 1))
        ds = builder.shuffle_vector(pair, pair,
                                    ir.Constant(_I32V, [0] * (QK // 2) + [1] * (QK // 2)))
        _vstore(ctx, builder, sig.args[7], args[7], args[8],
                builder.fmul(ds, builder.sitofp(q, _F32V)))
        return ctx.get_dummy_value()
    return types.void(src, lo_off, lo_shift, hi_off, hi_shift, ds0, ds1, dst, doff), codegen


@intrinsic
def vq4k_scales(typingctx, src, off, d, dmin, sv, svo):
    """sv[svo:svo+8] = d * sc, sv[svo+8:svo+16] = dmin * m: the eight 6-bit (sc, m) codes of
    the 12 bytes src[off:off+12] (groups 0-3: the low six bits of bytes 0-3 / 4-7; groups
    4-7: the nibbles of bytes 8-11 with bits 6-7 of bytes 0-3 / 4-7 on top)."""
    if not _ok(_c_array(src, types.uint8), _c_array(sv, types.float32), d == types.float32,
               dmin == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        i32x4 = ir.VectorType(ir.IntType(32), 4)

        def four(k):          # bytes 4k..4k+3 as <4 x i32>
            q = _vload(ctx, builder, sig.args[0], args[0],
                       builder.add(args[1], ir.Constant(args[1].type, 4 * k)),
                       ir.VectorType(ir.IntType(8), 4), 1)
            return builder.zext(q, i32x4)

        def c(v):
            return ir.Constant(i32x4, [v] * 4)
        a, b, cc = four(0), four(1), four(2)
        cat = ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8)))
        top = [builder.shl(builder.lshr(x, c(6)), c(4)) for x in (a, b)]
        sc = builder.shuffle_vector(builder.and_(a, c(63)),
                                    builder.or_(builder.and_(cc, c(15)), top[0]), cat)
        m = builder.shuffle_vector(builder.and_(b, c(63)),
                                   builder.or_(builder.lshr(cc, c(4)), top[1]), cat)
        f8 = ir.VectorType(ir.FloatType(), 8)
        ds = builder.fmul(_splat(builder, args[2], 8), builder.uitofp(sc, f8))
        dm = builder.fmul(_splat(builder, args[3], 8), builder.uitofp(m, f8))
        v = builder.shuffle_vector(ds, dm, ir.Constant(ir.VectorType(ir.IntType(32), 16),
                                                       list(range(16))))
        _vstore(ctx, builder, sig.args[4], args[4], args[5], v)
        return ctx.get_dummy_value()
    return types.void(src, off, d, dmin, sv, svo), codegen


@intrinsic
def vq6k_scales(typingctx, src, off, d, sv, svo):
    """sv[svo:svo+16] = d * float32(int8(src[off:off+16])) (one rounding a value)."""
    if not _ok(_c_array(src, types.uint8), _c_array(sv, types.float32), d == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        q = _vload(ctx, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(8), 16),
                   1)
        v = builder.fmul(_splat(builder, args[2], 16),
                         builder.sitofp(q, ir.VectorType(ir.FloatType(), 16)))
        _vstore(ctx, builder, sig.args[3], args[3], args[4], v)
        return ctx.get_dummy_value()
    return types.void(src, off, d, sv, svo), codegen


@intrinsic
def vbf16(typingctx, src, off, dst, doff):
    """dst[doff:doff+32] = the float32 values of the bf16 bits src[off:off+32] (uint16)."""
    if not _ok(_c_array(src, types.uint16), _c_array(dst, types.float32)):
        return None

    def codegen(ctx, builder, sig, args):
        u = _vload(ctx, builder, sig.args[0], args[0], args[1],
                   ir.VectorType(ir.IntType(16), QK), 2)
        v = builder.shl(builder.zext(u, _I32V), ir.Constant(_I32V, [16] * QK))
        _vstore(ctx, builder, sig.args[2], args[2], args[3], builder.bitcast(v, _F32V))
        return ctx.get_dummy_value()
    return types.void(src, off, dst, doff), codegen


@intrinsic
def vaxpy4(typingctx, acc, off, w, a0, a1, a2, a3):
    """acc[off:off+32] += a0 w[0:32] + a1 w[32:64] + a2 w[64:96] + a3 w[96:128], the
    multiply-adds in that order."""
    if not _ok(_c_array(acc, types.float32), _c_array(w, types.float32),
               *(a == types.float32 for a in (a0, a1, a2, a3))):
        return None

    def codegen(ctx, builder, sig, args):
        v = _vload(ctx, builder, sig.args[0], args[0], args[1])
        for k in range(4):
            wk = _vload(ctx, builder, sig.args[2], args[2], ir.Constant(_I64, k * QK))
            v = _fmuladd(builder, _splat(builder, args[3 + k]), wk, v)
        _vstore(ctx, builder, sig.args[0], args[0], args[1], v)
        return ctx.get_dummy_value()
    return types.void(acc, off, w, a0, a1, a2, a3), codegen


@intrinsic
def vaxpy1(typingctx, acc, off, w, a0):
    """acc[off:off+32] += a0 w[0:32]."""
    if not _ok(_c_array(acc, types.float32), _c_array(w, types.float32), a0 == types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        v = _vload(ctx, builder, sig.args[0], args[0], args[1])
        wk = _vload(ctx, builder, sig.args[2], args[2], ir.Constant(_I64, 0))
        _vstore(ctx, builder, sig.args[0], args[0], args[1],
                _fmuladd(builder, _splat(builder, args[3]), wk, v))
        return ctx.get_dummy_value()
    return types.void(acc, off, w, a0), codegen


@intrinsic
def vdot(typingctx, lanes, lo, x, xo, w):
    """lanes[lo:lo+32] += x[xo:xo+32] * w[0:32], lane by lane (flat offsets)."""
    if not _ok(_c_array(lanes, types.float32), _c_array(x, types.float32),
               _c_array(w, types.float32)):
        return None

    def codegen(ctx, builder, sig, args):
        v = _vload(ctx, builder, sig.args[0], args[0], args[1])
        xv = _vload(ctx, builder, sig.args[2], args[2], args[3])
        wv = _vload(ctx, builder, sig.args[4], args[4], ir.Constant(_I64, 0))
        _vstore(ctx, builder, sig.args[0], args[0], args[1], _fmuladd(builder, xv, wv, v))
        return ctx.get_dummy_value()
    return types.void(lanes, lo, x, xo, w), codegen


def lanes_add(n):
    """An intrinsic f(a, ao, b, bo): a[ao:ao+n] += b[bo:bo+n] (float32, flat offsets)."""
    vty = ir.VectorType(ir.FloatType(), n)

    @intrinsic
    def vadd(typingctx, a, ao, b, bo):
        if not _ok(_c_array(a, types.float32), _c_array(b, types.float32)):
            return None

        def codegen(ctx, builder, sig, args):
            v = builder.fadd(_vload(ctx, builder, sig.args[0], args[0], args[1], vty),
                             _vload(ctx, builder, sig.args[2], args[2], args[3], vty))
            _vstore(ctx, builder, sig.args[0], args[0], args[1], v)
            return ctx.get_dummy_value()
        return types.void(a, ao, b, bo), codegen
    return vadd


def lanes_sum(n):
    """An intrinsic f(a, off) -> sum(a[off:off+n]) (float32, n a power of 2) in a fixed tree:
    the two halves added lane by lane, again and again down to one lane."""
    vty = ir.VectorType(ir.FloatType(), n)

    @intrinsic
    def vsum(typingctx, a, off):
        if not _c_array(a, types.float32):
            return None

        def codegen(ctx, builder, sig, args):
            v = _vload(ctx, builder, sig.args[0], args[0], args[1], vty)
            m = n
            while m > 1:
                m //= 2
                mask = ir.VectorType(ir.IntType(32), m)
                v = builder.fadd(
                    builder.shuffle_vector(v, v, ir.Constant(mask, list(range(m)))),
                    builder.shuffle_vector(v, v, ir.Constant(mask, list(range(m, 2 * m)))))
            return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
        return types.float32(a, off), codegen
    return vsum


vadd, vsum = lanes_add(QK), lanes_sum(QK)    # a chunk's 32 lanes


@intrinsic
def vzero(typingctx, a, off):
    """a[off:off+32] = 0."""
    if not _c_array(a, types.float32):
        return None

    def codegen(ctx, builder, sig, args):
        _vstore(ctx, builder, sig.args[0], args[0], args[1], ir.Constant(_F32V, [0.0] * QK))
        return ctx.get_dummy_value()
    return types.void(a, off), codegen


@intrinsic
def prefetch(typingctx, a, off):
    """Ask for the cache line of flat element off of array a (never faults, any offset)."""
    if not (isinstance(a, types.Array) and a.layout == "C"):
        return None

    def codegen(ctx, builder, sig, args):
        i32 = ir.IntType(32)
        p = _at(ctx, builder, sig.args[0], args[0], args[1], ir.IntType(8))
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [p.type, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return ctx.get_dummy_value()
    return types.void(a, off), codegen


@intrinsic
def _u16_at(typingctx, a, off):
    """The little-endian uint16 at byte offset off of a uint8 array, as uint32."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(ctx, builder, sig, args):
        h = builder.load(_at(ctx, builder, sig.args[0], args[0], args[1], ir.IntType(16)),
                         align=1)
        return builder.zext(h, ir.IntType(32))
    return types.uint32(a, off), codegen


@intrinsic
def _half_fpext(typingctx, h):
    """fp16 bits h (an integer) -> float32 by F16C's vcvtph2ps, from a register written whole
    (vmovd): LLVM's own lowering of a half -> float extension inserted the bits into
    whatever vector register was at hand (vpinsrw), which made each block's scale wait for
    an accumulator's multiply-adds."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(ctx, builder, sig, args):
        i32 = ir.IntType(32)
        v = builder.trunc(args[0], i32) if h.bitwidth > 32 else builder.zext(args[0], i32) \
            if h.bitwidth < 32 else args[0]
        asm = ir.InlineAsm(ir.FunctionType(ir.FloatType(), [i32]),
                           "vmovd $1, $0\n\tvcvtph2ps $0, $0", "=x,r")
        return builder.call(asm, [v], attrs=("nounwind", "readnone"))   # lets loads move
    return types.float32(h), codegen


# --------------------------------------------------------------------------- fp16 scales

@njit(inline="always", cache=True)
def half_to_f32_bits(h):
    # h: fp16 bits (an integer < 65536) -> its float32 value (exact, NaN payloads kept), by
    # integer arithmetic alone
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    em = h & np.uint32(0x7FFF)
    if em >= np.uint32(0x7C00):                      # inf / nan
        return _bits_f32(sign | np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << 13))
    if em >= np.uint32(0x0400):                      # normal: rebias the exponent by 112
        return _bits_f32(sign | ((em << np.uint32(13)) + np.uint32(0x38000000)))
    f = _F32(em) * _TWO_M24                          # subnormal or zero: exact in float32
    return -f if sign else f


@njit(inline="always", cache=True)
def half_to_f32_fpext(h):
    # h: fp16 bits -> float32 (one instruction with F16C; NaNs come out quiet)
    return _half_fpext(h)


# The inline assembly needs LLVM's assembly parser, which numba does not set up itself.
if host_features().get("f16c"):
    llvm.initialize_native_asmparser()

# F16C has converted fp16 in hardware since 2012 (every AVX2 CPU); without it LLVM would call
# a runtime helper the JIT may not provide, so the bit arithmetic is used instead.
half_to_f32 = half_to_f32_fpext if host_features().get("f16c") else half_to_f32_bits


# --------------------------------------------------------------------------- decoders
# o: the row's offset in the blocks' flat elements, b: the chunk of 32 values along the row;
# sv[svo:svo+16]: the scales prep_<fmt> read for the super-block holding chunk b.

@njit(inline="always", cache=True)
def prep_none(blocks, o, b, sv, svo):
    # bf16 / q8_0 / q4_0: each chunk carries its own scale, nothing to prepare
    return


@njit(inline="always", cache=True)
def values_q8_0(blocks, o, b, sv, svo, dst, do):
    # blocks: uint8 (flat offsets) -> dst[do:do+32] = q of chunk b; returns d
    ob = o + b * BLOCK_BYTES_Q8_0
    vq8(blocks, ob + 2, _F32(1.0), dst, do)
    return half_to_f32(_u16_at(blocks, ob))


@njit(inline="always", cache=True)
def values_q4_0(blocks, o, b, sv, svo, dst, do):
    # blocks: uint8 (flat offsets) -> dst[do:do+32] = q - 8 of chunk b; returns d
    ob = o + b * BLOCK_BYTES_Q4_0
    vq4(blocks, ob + 2, _F32(1.0), dst, do)
    return half_to_f32(_u16_at(blocks, ob))


@njit(inline="always", cache=True)
def values_bf16(blocks, o, b, sv, svo, dst, do):
    # blocks: uint16 bf16 bits -> dst[do:do+32] = values 32b..32b+31 of the row; returns 1
    vbf16(blocks, o + b * QK, dst, do)
    return _F32(1.0)


@njit(inline="always", cache=True)
def decode_q8_0(blocks, o, b, sv, svo, dst, do):
    # blocks: uint8 (flat offsets) -> dst[do:do+32] = float32(d) * q of chunk b
    ob = o + b * BLOCK_BYTES_Q8_0
    vq8(blocks, ob + 2, half_to_f32(_u16_at(blocks, ob)), dst, do)


@njit(inline="always", cache=True)
def decode_q4_0(blocks, o, b, sv, svo, dst, do):
    # blocks: uint8 (flat offsets) -> dst[do:do+32] = (q - 8) * d of chunk b
    ob = o + b * BLOCK_BYTES_Q4_0
    vq4(blocks, ob + 2, half_to_f32(_u16_at(blocks, ob)), dst, do)


@njit(inline="always", cache=True)
def decode_bf16(blocks, o, b, sv, svo, dst, do):
    # blocks: uint16 bf16 bits -> dst[do:do+32] float32, values 32b..32b+31 of the row
    vbf16(blocks, o + b * QK, dst, do)


@njit(inline="always", cache=True)
def prep_q4_k(blocks, o, b, sv, svo):
    # the super-block of chunk b -> sv[svo + j] = d * sc_j, sv[svo + 8 + j] = dmin * m_j
    h = o + (b >> 3) * BLOCK_BYTES_Q4_K
    vq4k_scales(blocks, h + 4, half_to_f32(_u16_at(blocks, h)),
                half_to_f32(_u16_at(blocks, h + 2)), sv, svo)


@njit(inline="always", cache=True)
def decode_q4_k(blocks, o, b, sv, svo, dst, do):
    # blocks: uint8 (flat offsets) -> dst[do:do+32] = (d * sc) * q - dmin * m of chunk b (group
    # j = b % 8 of super-block b // 8: the low or high nibbles of its bytes 16 + 32 (j // 2)..)
    j = b & 7
    vq4k(blocks, o + (b >> 3) * BLOCK_BYTES_Q4_K + 16 + (j >> 1) * QK, (j & 1) * 4,
         sv[svo + j], sv[svo + 8 + j], dst, do)


@njit(inline="always", cache=True)
def values_q4_k(blocks, o, b, sv, svo, dst, do):
    # the decoded values (a min to subtract: no single scale to fold); returns 1
    decode_q4_k(blocks, o, b, sv, svo, dst, do)
    return _F32(1.0)


@njit(inline="always", cache=True)
def prep_q6_k(blocks, o, b, sv, svo):
    # the super-block of chunk b -> sv[svo + g] = d * sc_g, its 16 group scales
    h = o + (b >> 3) * BLOCK_BYTES_Q6_K
    vq6k_scales(blocks, h + 192, half_to_f32(_u16_at(blocks, h + 208)), sv, svo)


@njit(inline="always", cache=True)
def decode_q6_k(blocks, o, b, sv, svo, dst, do):
    # blocks: uint8 (flat offsets) -> dst[do:do+32] = (d * sc) * (q - 32) of chunk b (values
    # 32j.. of super-block b // 8, j = b % 8: half i = j // 4, quarter l = j % 4 of it; the low
    # nibbles in byte 64i + 32 (l % 2).. shifted by 4 (l // 2), the high pairs in byte
    # 128 + 32i.. shifted by 2l; scales 2j and 2j + 1)
    h = o + (b >> 3) * BLOCK_BYTES_Q6_K
    j = b & 7
    i, l = j >> 2, j & 3
    vq6k(blocks, h + 64 * i + (l & 1) * QK, (l >> 1) * 4, h + 128 + QK * i, 2 * l,
         sv[svo + 2 * j], sv[svo + 2 * j + 1], dst, do)


@njit(inline="always", cache=True)
def values_q6_k(blocks, o, b, sv, svo, dst, do):
    # the decoded values (two scales a chunk: none to fold); returns 1
    decode_q6_k(blocks, o, b, sv, svo, dst, do)
    return _F32(1.0)


@njit(inline="always", cache=True)
def tail_bf16(blocks, o, b, n, dst):
    # the last, partial chunk b of a bf16 row: n < 32 values -> dst[:n]
    for j in range(n):
        dst[j] = _bits_f32(np.uint32(blocks.flat[o + b * QK + j]) << np.uint32(16))


@njit(inline="always", cache=True)
def _no_tail(blocks, o, b, n, dst):
    # rows of the block formats hold whole blocks: never called
    return


@njit(inline="always", cache=True)
def new_super(b, b0):
    # whether chunk b (of a loop from chunk b0) needs its super-block's scales prepared
    return b == b0 or (b & 7) == 0


# format code -> (prep, values, decode, tail)
_DECODERS = {BF16: (prep_none, values_bf16, decode_bf16, tail_bf16),
             Q8_0: (prep_none, values_q8_0, decode_q8_0, _no_tail),
             Q4_0: (prep_none, values_q4_0, decode_q4_0, _no_tail),
             Q4_K: (prep_q4_k, values_q4_k, decode_q4_k, _no_tail),
             Q6_K: (prep_q6_k, values_q6_k, decode_q6_k, _no_tail)}


# --------------------------------------------------------------------------- dequantization

def _make_dequant_rows(prep, decode, tail):
    @njit(**FLAGS)
    def dequant_rows(blocks, e, r0, r1, c0, c1, out):
        # blocks: (E, R, row_bytes) uint8 [bf16: (E, R, C) uint16]; rows r0..r1 of expert e,
        # columns c0..c1 (c0 a multiple of 32; c1 too, or C) -> out: (r1-r0, c1-c0) float32
        # (rows C-contiguous), the dequantized values. Serial: the prefill path calls it
        # inside its own parallel tasks, one panel at a time.
        buf = carray(_stack_empty(QK, np.float32), (QK,))
        sv = carray(_stack_empty(_SV, np.float32), (_SV,))
        rb = blocks.shape[2]
        b0, bf = c0 // QK, c1 // QK
        for r in range(r0, r1):
            o = (e * blocks.shape[1] + r) * rb
            orow = out[r - r0]
            for b in range(b0, bf):
                if new_super(b, b0):
                    prep(blocks, o, b, sv, 0)
                decode(blocks, o, b, sv, 0, orow, b * QK - c0)
            if bf * QK < c1:                         # bf16's last, partial chunk
                tail(blocks, o, bf, c1 - bf * QK, buf)
                for j in range(c1 - bf * QK):
                    orow[bf * QK - c0 + j] = buf[j]
    return cached(dequant_rows)


def _make_dequant_all(rows):
    @njit(parallel=True, **FLAGS)
    def dequant_all(blocks, out):
        # blocks: (E, R, row_bytes) uint8 [bf16: (E, R, C) uint16] -> out (E, R, C) float32,
        # rows in parallel
        E, R, C = out.shape
        for t in prange(E * R):
            e = t // R
            rows(blocks, e, t - e * R, t - e * R + 1, 0, C, out[e, t - e * R:])
    return cached(dequant_all)


_DEQUANT_ROWS = {f: _make_dequant_rows(prep, dec, tail)
                 for f, (prep, _, dec, tail) in _DECODERS.items()}
_DEQUANT_ALL = {f: _make_dequant_all(_DEQUANT_ROWS[f]) for f in _DECODERS}


def dequant_rows(blocks, fmt, e, r0, r1, c0, c1, out):
    """Rows r0..r1, columns c0..c1 (c0 a multiple of 32; c1 too, or C) of expert e of
    `blocks` in format code fmt -> out (r1-r0, c1-c0) float32, rows C-contiguous (serial, for
    a prefill panel; @njit code calls DEQUANT_ROWS[fmt] directly)."""
    _DEQUANT_ROWS[fmt](blocks, e, r0, r1, c0, c1, out)


def dequant(blocks, fmt, out):
    """blocks (E, R, row_bytes(fmt, C)) -> out (E, R, C) float32, rows in parallel."""
    _DEQUANT_ALL[fmt](blocks, out)


DEQUANT_ROWS = _DEQUANT_ROWS


# --------------------------------------------------------------------------- decoding GEMM

def qstream_plan(offsets, experts, K, M, trans, acc=QSTREAM_ACC, fmt=Q8_0):
    """The decoding GEMM's tasks for format code fmt, gemm.stream_plan's cut (so that
    gemm.stream_sum adds the partials up): (K, M): STREAM_KC depth rows x columns in
    multiples of the format's block (32; 256 for q4_k / q6_k, so that a task reads whole
    super-blocks) while rows x columns <= acc (at least 256); trans: QSTREAM_CT columns x the
    whole depth, written straight to out (no partials)."""
    return stream_plan(offsets, experts, K, M, trans, QSTREAM_CT, acc, BLOCK_VALUES[fmt], True)


def _make_rows_kernel(prep, values, tail, span, pf_every):
    @njit(parallel=True, **FLAGS)
    def rows_kernel(src, ridx, blocks, offsets, tasks, part):
        # (K, M) layout. src (*, K) float32, ridx (N,) int64: the rows src[ridx[r]] in expert
        # order; blocks (E, K, row_bytes(M)) uint8 [bf16: (E, K, M) uint16]; offsets (E+1,);
        # tasks (n, 6) (e, p0, p1, c0, c1, base) from qstream_plan -> part[base : base +
        # m*(c1-c0)] as (m, c1-c0) = src[rows of e, p0:p1] @ W_e[p0:p1, c0:c1].
        # Four depth rows at a time: per chunk of 32 columns their values in w (registers),
        # a_k = x[r, p+k] * d_k per row, acc[r] += a0 w0 + a1 w1 + a2 w2 + a3 w3 in that order;
        # the next four depth rows' lines are requested meanwhile (every pf_every chunks; chunk
        # b lies near element b * span / 8 of its row).
        K, rb = blocks.shape[1], blocks.shape[2]
        for t in prange(tasks.shape[0]):
            e, p0, p1, c0, c1, base = (tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3],
                                       tasks[t, 4], tasks[t, 5])
            lo, m = offsets[e], offsets[e + 1] - offsets[e]
            nc = c1 - c0
            acc = part[base:base + m * nc]
            acc[:] = 0.0
            xa = np.empty((m, 4), np.float32)        # the rows' x at the four depth rows
            w = carray(_stack_empty(_W4, np.float32), (_W4,))
            sv = carray(_stack_empty(_SV4, np.float32), (_SV4,))   # four depth rows
            b0, bf = c0 // QK, c1 // QK              # whole chunks b0..bf-1, then a tail
            nt = c1 - bf * QK
            p = p0
            while p < p1:
                q = 4 if p1 - p >= 4 else 1
                for i in range(m):
                    xi = src[ridx[lo + i]]
                    for k in range(q):
                        xa[i, k] = xi[p + k]
                o = (e * K + p) * rb                 # depth row p's first block
                if q == 4:
                    for b in range(b0, bf):
                        if pf_every == 1 or (b - b0) % pf_every == 0:
                            ob = o + ((b * span) >> 3)
                            for k in range(4, 8):    # the next four depth rows
                                prefetch(blocks, ob + k * rb)
                        if new_super(b, b0):
                            for k in range(4):
                                prep(blocks, o + k * rb, b, sv, k * _SV)
                        d0 = values(blocks, o, b, sv, 0, w, 0)
                        d1 = values(blocks, o + rb, b, sv, _SV, w, QK)
                        d2 = values(blocks, o + 2 * rb, b, sv, 2 * _SV, w, 2 * QK)
                        d3 = values(blocks, o + 3 * rb, b, sv, 3 * _SV, w, 3 * QK)
                        off = b * QK - c0
                        for i in range(m):
                            vaxpy4(acc, off + i * nc, w, xa[i, 0] * d0, xa[i, 1] * d1,
                                   xa[i, 2] * d2, xa[i, 3] * d3)
                    if nt > 0:                       # bf16's partial last chunk
                        for k in range(4):
                            tail(blocks, o + k * rb, bf, nt, w[k * QK:])
                        for i in range(m):
                            for j in range(nt):
                                acc[i * nc + bf * QK - c0 + j] += (
                                    xa[i, 0] * w[j] + xa[i, 1] * w[QK + j]
                                    + xa[i, 2] * w[2 * QK + j] + xa[i, 3] * w[3 * QK + j])
                else:                                # one depth row
                    for b in range(b0, bf):
                        if new_super(b, b0):
                            prep(blocks, o, b, sv, 0)
                        d0 = values(blocks, o, b, sv, 0, w, 0)
                        off = b * QK - c0
                        for i in range(m):
                            vaxpy1(acc, off + i * nc, w, xa[i, 0] * d0)
                    if nt > 0:
                        tail(blocks, o, bf, nt, w)
                        for i in range(m):
                            for j in range(nt):
                                acc[i * nc + bf * QK - c0 + j] += xa[i, 0] * w[j]
                p += q
    return cached(rows_kernel)


def _make_cols_group(prep, decode, tail, span, itemsize, R, S, pf_bytes=PREFETCH_BYTES):
    # span: SPAN[fmt], itemsize: bytes of the blocks' elements (2 for bf16, else 1)
    size, RS = R * S * QK, R * S
    pf = pf_bytes // itemsize                            # in the blocks' elements
    use_pf = pf > 0

    @njit(**FLAGS)
    def cols_group(src, ridx, r0, blocks, e, c0, c1, K, out):
        # R rows src[ridx[r0 + i]] (*, K) and the weight rows c0..c1 of expert e (blocks
        # along K) -> out[r0 + i, c0:c1] = their dot products. Lanes (S, R, 32): chunk b's
        # products go to set b mod S (the last nb mod S chunks to set 0); then the sets are
        # added in order, the 32 lanes in vsum's tree, and bf16's partial chunk after, in
        # depth order. (One call a task and group: a call per column cost as much as its
        # dot products, in reference counting of the arguments.)
        lanes = carray(_stack_empty(size, np.float32), (size,))
        w = carray(_stack_empty(QK, np.float32), (QK,))
        sv = carray(_stack_empty(_SV, np.float32), (_SV,))
        xo = carray(_stack_empty(R, np.int64), (R,))     # the rows' offsets in src
        for i in range(R):
            xo[i] = ridx[r0 + i] * K
        rbytes = blocks.shape[2]
        nb = K // QK
        ns = nb - nb % S
        n = K - nb * QK
        for c in range(c0, c1):
            o = (e * blocks.shape[1] + c) * rbytes
            for i in range(RS):
                vzero(lanes, i * QK)
            for b0 in range(0, ns, S):
                for s in range(S):
                    b = b0 + s
                    if use_pf and s == 0:
                        prefetch(blocks, o + ((b * span) >> 3) + pf)
                    if new_super(b, 0):
                        prep(blocks, o, b, sv, 0)
                    decode(blocks, o, b, sv, 0, w, 0)
                    for i in range(R):
                        vdot(lanes, (s * R + i) * QK, src, xo[i] + b * QK, w)
            for b in range(ns, nb):
                if new_super(b, 0):
                    prep(blocks, o, b, sv, 0)
                decode(blocks, o, b, sv, 0, w, 0)
                for i in range(R):
                    vdot(lanes, i * QK, src, xo[i] + b * QK, w)
            for s in range(1, S):
                for i in range(R):
                    vadd(lanes, i * QK, lanes, (s * R + i) * QK)
            if n > 0:                                # bf16's partial last chunk
                tail(blocks, o, nb, n, w)
            for i in range(R):
                acc = vsum(lanes, i * QK)
                for j in range(n):
                    acc += src.flat[xo[i] + nb * QK + j] * w[j]
                out[r0 + i, c] = acc
    return cached(cols_group)


def _make_cols_task(groups):
    """cols_task(src, ridx, blocks, offsets, tasks, t, out): task t of qstream_plan(trans=True)
    with the given groups ((rows, group function), largest first), inlined into its caller:
    cols_kernel's loop, or int8dot.py's fused decoding MLP."""
    g_a, g_b, g_c = (groups + (groups[-1],) * 3)[:3]     # rows: a >= b >= c (c = 1)
    ra, rb_, rc = g_a[0], g_b[0], g_c[0]
    ga, gb, gc = g_a[1], g_b[1], g_c[1]

    @njit(inline="always", cache=True)
    def cols_task(src, ridx, blocks, offsets, tasks, t, out):
        # (M, K) layout. src (*, K) float32 C-contiguous (int8dot: its rounded rows), ridx
        # (N,) int64; blocks (E, M, row_bytes(K)) uint8 [bf16: (E, M, K) uint16]; tasks (n, 6)
        # (e, 0, K, c0, c1, _) -> out[rows of e, c0:c1] = src[rows of e] @ W_e[c0:c1].T. The
        # expert's rows go in the groups, largest first (the split depends on the row count
        # alone), each over the task's columns.
        e, K, c0, c1 = tasks[t, 0], tasks[t, 2], tasks[t, 3], tasks[t, 4]
        lo, m = offsets[e], offsets[e + 1] - offsets[e]
        g = 0
        while m - g >= ra:
            ga(src, ridx, lo + g, blocks, e, c0, c1, K, out)
            g += ra
        while m - g >= rb_:
            gb(src, ridx, lo + g, blocks, e, c0, c1, K, out)
            g += rb_
        while m - g >= rc:
            gc(src, ridx, lo + g, blocks, e, c0, c1, K, out)
            g += rc
    return cached(cols_task)


def _make_cols_kernel(cols_task):
    @njit(parallel=True, **FLAGS)
    def cols_kernel(src, ridx, blocks, offsets, tasks, out):
        # every task of qstream_plan(trans=True), in parallel (cols_task)
        for t in prange(tasks.shape[0]):
            cols_task(src, ridx, blocks, offsets, tasks, t, out)
    return cached(cols_kernel)


# (K, M) layout: the next depth rows are requested once a cache line (every chunk of q8_0
# and bf16, every second of q6_k, every third of q4_0 / q4_k): once a row left the kernel at
# about half the memory's speed.
_ROWS_KERNELS = {f: slp_vectorized(_make_rows_kernel(p, v, t, SPAN[f],
                                                     max(1, 512 // (SPAN[f] * ITEMSIZE[f]))))
                 for f, (p, v, _, t) in _DECODERS.items()}
_COLS_KERNELS = {f: slp_vectorized(_make_cols_kernel(_make_cols_task(tuple(
    (r, _make_cols_group(p, d, t, SPAN[f], ITEMSIZE[f], r, s)) for r, s in COL_GROUPS))))
    for f, (p, _, d, t) in _DECODERS.items()}


def qstream_rows(src, ridx, blocks, fmt, offsets, tasks, part):
    """The (K, M) decoding kernel for format code fmt (see rows_kernel's comment)."""
    _ROWS_KERNELS[fmt](src, ridx, blocks, offsets, tasks, part)


def qstream_cols(src, ridx, blocks, fmt, offsets, tasks, out):
    """The (M, K) decoding kernel for format code fmt (see cols_task's comment)."""
    _COLS_KERNELS[fmt](src, ridx, blocks, offsets, tasks, out)


def run_qstream(src, blocks, fmt, trans_w, offsets, out, experts, ridx=None):
    """The host sequence of a decoding product (what backends/cpu.py's run_stream does for
    float32): out[rows of e] = src[rows] @ W_e for every expert where the (E,) bool mask
    `experts` is True, W_e decoded from `blocks` (format code fmt, (K, M) or trans_w (M, K)
    layout), each expert's blocks read once. ridx (N,) int64: the rows are src[ridx[rows]].
    src (*, K) float32, blocks and out C-contiguous."""
    tasks, groups, size = qstream_plan(offsets, experts, src.shape[1], out.shape[1],
                                       trans_w, fmt=fmt)
    if ridx is None:
        ridx = np.arange(out.shape[0], dtype=np.int64)
    if trans_w:
        qstream_cols(src, ridx, blocks, fmt, offsets, tasks, out)
        return
    part = np.empty(size, out.dtype)
    qstream_rows(src, ridx, blocks, fmt, offsets, tasks, part)
    stream_sum(part, tasks, groups, offsets, out)
