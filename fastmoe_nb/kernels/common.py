"""Per-element maths written once and called from both the CPU (@njit) and CUDA (@cuda.jit)
kernels: activations and their derivatives, a stable sigmoid, the top-k insertion step.

Everything here is a scalar (or tiny local-array) function; loops over arrays live in the
target's own kernel files. These use math.exp and branch on the sign and the activation code:
right for CUDA (a hardware exp; one thread per element), but scalar code on the CPU. The CPU's
hot elementwise loops (activations, routing) use the branch-free, vectorizable versions of
kernels/cpu/fastmath.py instead; kernels/cpu/gemm.py's fused epilogue and kernels/cpu/routers.py
still call these.
"""
import math

from numba import njit

# Activation codes shared by every kernel (ops map names to these).
RELU, GELU, GELU_TANH, SILU, SWIGLU = 0, 1, 2, 3, 4
ACTIVATION_CODES = {"relu": RELU, "gelu": GELU, "gelu_tanh": GELU_TANH, "silu": SILU,
                    "swiglu": SWIGLU}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_GELU_TANH_CLAMP = 30.0


@njit(cache=True)
def sigmoid(x):
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@njit(cache=True)
def act_scalar(x, code):
    """The elementwise activation (SWIGLU: the silu of its gate half)."""
    if code == RELU:
        return x if x > 0 else 0.0 * x
    if code == GELU:
        return 0.5 * x * (1.0 + math.erf(x * _INV_SQRT_2))
    if code == GELU_TANH:
        return 0.5 * x * (1.0 + math.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    return x * sigmoid(x)  # SILU, and the gate of SWIGLU


@njit(cache=True)
def act_grad_scalar(x, code):
    """d act_scalar(x, code) / dx."""
    if code == RELU:
        return 1.0 if x > 0 else 0.0
    if code == GELU:
        return 0.5 * (1.0 + math.erf(x * _INV_SQRT_2)) + x * math.exp(-0.5 * x * x) * (
            _INV_SQRT_2 / math.sqrt(math.pi))
    if code == GELU_TANH:
        # clamped like kernels/cpu/fastmath.py's gelu_tanh_grad: exactly 1 or 0 beyond +-30,
        # where x^3 would overflow further out (x * 0 * inf = NaN)
        x = _GELU_TANH_CLAMP if x > _GELU_TANH_CLAMP else x
        x = -_GELU_TANH_CLAMP if x < -_GELU_TANH_CLAMP else x
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        th = math.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@njit(cache=True)
def topk_insert(vals, idx, filled, k, v, e):
    """Insert value v of item e into the descending list vals[:filled] / idx[:filled] that keeps
    at most k entries; returns the new fill. Equal values keep the earlier-inserted item first,
    so scanning items in increasing index gives "equal values: lower index first"."""
    if filled < k:
        p = filled
        filled += 1
    elif v > vals[k - 1]:
        p = k - 1
    else:
        return filled
    while p > 0 and vals[p - 1] < v:
        vals[p] = vals[p - 1]
        idx[p] = idx[p - 1]
        p -= 1
    vals[p] = v
    idx[p] = e
    return filled
