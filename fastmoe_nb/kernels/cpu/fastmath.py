"""CPU-only elementwise maths that LLVM's loop vectorizer can turn into AVX2 code.

`math.exp` compiles to a scalar libm call (no SVML here), and the branchy scalar functions of
kernels/common.py keep loops over them scalar. This module has:

- `exp(x)` for float32 and float64: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a
  polynomial for e^r and 2^n built in the exponent bits, with no branch and no libm call;
  multiply-adds go through `fma` (fused on CPUs with FMA). float32: Cephes' expf polynomial
  (degree 7 with its 1 + r leading terms) in float32; max relative error 8.4e-8 against the
  float64 exp on a dense grid (~1.4 ulp; tests allow 3e-7). float64: the degree-13 Taylor
  polynomial (truncation < 2e-17 at |r| = ln2/2); max relative error 2.2e-16 against np.exp
  (tests allow 1e-15). Saturates: +inf above the largest finite result, 0 below half the
  smallest subnormal, subnormal results in between computed (2^n is applied as two factors,
  so neither overflows early); NaN stays NaN.
- branch-free scalar activations built on it (sigmoid, silu, gelu_tanh, relu and their
  derivatives), in the argument's float type, written so that a plain
  `for c in range(n): out[c] = silu(h[c])` vectorizes; and gelu (erf), which calls libm's erf
  and does not.

CUDA kernels keep math.exp (a fast hardware instruction there) and kernels/common.py.

Unsigned indices: loops that index arrays with an unsigned counter (`range(np.uint64(n))`)
skip numba's negative-index wraparound, which otherwise keeps the loop vectorizer from emitting
plain vector loads and stores.
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core.extending import intrinsic, overload

# --------------------------------------------------------------------------- bit casts


def _float_bits(ftype, itype):
    """f(x: ftype) -> itype, the same bits."""
    @intrinsic
    def bits(typingctx, x):
        if x != ftype:
            return None
        return itype(ftype), lambda ctx, builder, sig, args: builder.bitcast(
            args[0], ir.IntType(itype.bitwidth))
    return bits


def _bits_float(ftype):
    """f(i: any integer) -> ftype, whose bits are the low ftype.bitwidth bits of i."""
    @intrinsic
    def from_bits(typingctx, i):
        if not isinstance(i, types.Integer):
            return None

        def codegen(ctx, builder, sig, args):
            w = ftype.bitwidth
            v = args[0]
            if i.bitwidth > w:
                v = builder.trunc(v, ir.IntType(w))
            elif i.bitwidth < w:
                v = builder.sext(v, ir.IntType(w)) if i.signed else builder.zext(v, ir.IntType(w))
            return builder.bitcast(v, ctx.get_value_type(ftype))
        return ftype(i), codegen
    return from_bits


@intrinsic
def div(typingctx, a, b):
    """a / b for two floats of one type, as IEEE division: no ZeroDivisionError check (numba
    adds one to `/` under its default error model, and that branch stops vectorization)."""
    if not (isinstance(a, types.Float) and a == b):
        return None
    return a(a, b), lambda ctx, builder, sig, args: builder.fdiv(args[0], args[1])


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c for three floats of one type, fused where the CPU has FMA (llvm.fmuladd: one
    instruction and one rounding there, a multiply and an add elsewhere). Numba does not
    contract a * b + c by itself unless fastmath allows it."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(ctx, builder, sig, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fmuladd", [ty],
                                              ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(fn, args)
    return a(a, b, c), codegen


_f32_bits, _bits_f32 = _float_bits(types.float32, types.int32), _bits_float(types.float32)
_f64_bits, _bits_f64 = _float_bits(types.float64, types.int64), _bits_float(types.float64)

# --------------------------------------------------------------------------- exp

_f32, _i32, _i64 = np.float32, np.int32, np.int64

# float32: clamp to [-104, 89] (e^-104 < half the smallest subnormal, e^89 > FLT_MAX), then
# t = x log2(e) + 1.5 * 2^23 rounds x log2(e) to the integer n in t's low mantissa bits.
F32_LO, F32_HI = _f32(-104.0), _f32(89.0)
F32_LOG2E, F32_SHIFT = _f32(1.44269504088896341), _f32(12582912.0)
F32_SHIFT_BITS = _i32(0x4B400000)          # the bits of 1.5 * 2^23
F32_LN2_HI, F32_LN2_LO = _f32(0.693359375), _f32(-2.12194440e-4)  # ln2 = HI + LO, HI exact * n
F32_P0, F32_P1, F32_P2, F32_P3, F32_P4, F32_P5 = (_f32(c) for c in (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1))
_F32_ONE = _f32(1.0)

# float64: clamp to [-746, 710] (e^-746 < half the smallest subnormal, e^710 > DBL_MAX);
# shifter 1.5 * 2^52; fdlibm's ln2 split (HI's low 21 bits are zero, so n * HI is exact);
# Taylor coefficients 1/k!.
F64_LO, F64_HI = -746.0, 710.0
F64_LOG2E, F64_SHIFT = 1.4426950408889634, 6755399441055744.0
F64_SHIFT_BITS = _i64(0x4338000000000000)
F64_LN2_HI, F64_LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10
(F64_P13, F64_P12, F64_P11, F64_P10, F64_P9, F64_P8, F64_P7, F64_P6, F64_P5, F64_P4, F64_P3,
 F64_P2) = (1.0 / math.factorial(i) for i in range(13, 1, -1))


@njit(inline="always")
def _exp32(x):
    # x: float32 -> float32 e^x
    x = F32_HI if x > F32_HI else x           # NaN fails both tests and stays NaN
    x = F32_LO if x < F32_LO else x
    t = fma(x, F32_LOG2E, F32_SHIFT)
    nf = t - F32_SHIFT
    n = _f32_bits(t) - F32_SHIFT_BITS         # nf as an integer, from the bits (no fptosi)
    r = fma(nf, -F32_LN2_LO, fma(nf, -F32_LN2_HI, x))
    p = fma(fma(fma(fma(fma(F32_P0, r, F32_P1), r, F32_P2), r, F32_P3), r, F32_P4), r, F32_P5)
    p = fma(p, r * r, r) + _F32_ONE
    n1 = _f32_bits(fma(nf, _f32(0.5), F32_SHIFT)) - F32_SHIFT_BITS   # ~n/2 by the shifter
    s1 = _bits_f32((n1 + 127) << 23)
    s2 = _bits_f32((n - n1 + 127) << 23)
    return (p * s1) * s2


@njit(inline="always")
def _exp64(x):
    # x: float64 -> float64 e^x
    x = F64_HI if x > F64_HI else x
    x = F64_LO if x < F64_LO else x
    t = fma(x, F64_LOG2E, F64_SHIFT)
    nf = t - F64_SHIFT
    n = _f64_bits(t) - F64_SHIFT_BITS
    r = fma(nf, -F64_LN2_LO, fma(nf, -F64_LN2_HI, x))
    p = fma(F64_P13, r, F64_P12)
    for c in (F64_P11, F64_P10, F64_P9, F64_P8, F64_P7, F64_P6, F64_P5, F64_P4, F64_P3, F64_P2):
        p = fma(p, r, c)
    p = fma(p, r * r, r) + 1.0
    n1 = _f64_bits(fma(nf, 0.5, F64_SHIFT)) - F64_SHIFT_BITS   # ~n/2: AVX2 has no 64-bit >>
    s1 = _bits_f64((n1 + 1023) << 52)
    s2 = _bits_f64((n - n1 + 1023) << 52)
    return (p * s1) * s2


def exp(x):
    """e^x for a float32 or float64 scalar, branch-free and vectorizable (see the module)."""
    return math.exp(x)   # the Python fallback; inside @njit the overload below is used


@overload(exp)
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: _exp64(x)
    return None


def like(x, v):
    """The constant v in x's float type (keeps float32 maths in float32 inside @njit)."""
    return type(x)(v)


@overload(like)
def _like_overload(x, v):
    if x == types.float32:
        return lambda x, v: np.float32(v)
    if x == types.float64:
        return lambda x, v: np.float64(v)
    return None


# --------------------------------------------------------------------------- activations
# Scalar, branch-free (selects only) and in the argument's float type. Large |x| is handled by
# exp saturating to 0 or inf, so sigmoid needs no sign test.

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(inline="always")
def sigmoid(x):
    """1 / (1 + e^-x): 0 for x below ~-88 (float32) / ~-745 (float64), 1 above ~17 / ~37."""
    one = like(x, 1.0)
    return div(one, one + exp(-x))


@njit(inline="always")
def silu(x):
    """x sigmoid(x)."""
    return x * sigmoid(x)


@njit(inline="always")
def sigmoid_pair(x):
    """(sigmoid(x), 1 - sigmoid(x)), both to a few ulp: 1 - s is e^-x s where s >= 1/2 (no
    cancellation), 1 - s where s < 1/2."""
    one = like(x, 1.0)
    e = exp(-x)
    s = div(one, one + e)
    return s, (e * s if e < one else one - s)


@njit(inline="always")
def silu_grad(x):
    """d silu / dx = s (1 + x (1 - s)), s = sigmoid(x)."""
    s, q = sigmoid_pair(x)
    return s * (like(x, 1.0) + x * q)


@njit(inline="always")
def gelu_tanh(x):
    """0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x sigmoid(2u)."""
    u2 = like(x, 2.0 * _SQRT_2_OVER_PI) * (x + like(x, _GELU_C) * x * x * x)
    return x * sigmoid(u2)


GELU_TANH_CLAMP = 30.0   # |x| beyond which gelu_tanh's gradient is exactly 1 or 0


@njit(inline="always")
def gelu_tanh_grad(x):
    """d gelu_tanh / dx = s + x s (1 - s) 2u', s = sigmoid(2u), at x clamped to +-30: there
    |2u| ~ 1974, e^-1974 underflows in float32 and float64, so the gradient is exactly 1 or 0
    already, and x^3 cannot overflow (x * 0 * inf = NaN beyond ~1.9e19 in float32). The clamp
    is a select: NaN stays NaN."""
    lim = like(x, GELU_TANH_CLAMP)
    x = lim if x > lim else x
    x = -lim if x < -lim else x
    u2 = like(x, 2.0 * _SQRT_2_OVER_PI) * (x + like(x, _GELU_C) * x * x * x)
    du2 = like(x, 2.0 * _SQRT_2_OVER_PI) * (like(x, 1.0) + like(x, 3.0 * _GELU_C) * x * x)
    s, q = sigmoid_pair(u2)
    return s + x * s * q * du2


@njit(inline="always")
def relu(x):
    """max(x, 0); NaN stays NaN."""
    zero = like(x, 0.0)
    return zero if x <= zero else x


@njit(inline="always")
def relu_grad(x):
    """1 where x > 0, else 0."""
    return like(x, 1.0) if x > like(x, 0.0) else like(x, 0.0)


@njit(inline="always")
def gelu(x):
    """0.5 x (1 + erf(x / sqrt 2)); libm's erf, so loops over it stay scalar."""
    return like(x, 0.5) * x * (like(x, 1.0) + math.erf(x * like(x, _INV_SQRT_2)))


@njit(inline="always")
def gelu_grad(x):
    """d gelu / dx = Phi(x) + x phi(x)."""
    return like(x, 0.5) * (like(x, 1.0) + math.erf(x * like(x, _INV_SQRT_2))) + x * exp(
        like(x, -0.5) * x * x) * like(x, _INV_SQRT_2PI)
