"""What the CPU (@njit) and CUDA (@cuda.jit) kernels share, written once:

- ACTIVATION_CODES, the activation codes of every kernel and op;
- topk_insert, the step of every top-k (CPU and CUDA routing, the CPU routers);
- the row bodies of the backward kernels of softmax and combine: the CPU kernel calls one from
  its prange loop, the CUDA kernel from its grid-stride loop (a thread per row). The backward
  rows of softmax_topk and sigmoid_topk differ per target and stay in its kernel file: the CPU
  keeps a row's k weights in a scratch row and makes them with kernels/cpu/fastmath.py's exp,
  CUDA computes them again (a thread has no array as long as any k) with math.exp;
- scalar maths in math.exp, branching on the sign and the activation code (sigmoid,
  act_scalar, act_grad_scalar): CUDA's per-element maths (activations, the GEMM epilogue,
  routing). On the CPU only kernels/cpu/routers.py calls them; the CPU's activations, GEMM
  epilogue and routing use kernels/cpu/fastmath.py's branch-free versions, whose bits differ.

Rows are @njit(inline="always"): numba inlines their IR into the caller, so a CPU kernel
compiles a row under its own options (parallel, fastmath) as if it were written in place, and
numba-cuda compiles the same Python for the device (the PTX is that of the body written in the
kernel). The simulator runs kernels as Python, on array stand-ins that @njit cannot type:
CUDA kernels take their rows through for_cuda.

Numba's cache checks only a kernel's own file: after editing this one, delete
fastmoe_nb/kernels/cpu/__pycache__/*.nb* (as after editing kernels/cpu/fastmath.py).
"""
import math

import numpy as np
from numba import config, njit

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


def for_cuda(row):
    """A row of this module as CUDA kernels call it: the @njit function itself (numba-cuda
    compiles it for the device), or in the simulator its Python function."""
    return row.py_func if config.ENABLE_CUDASIM else row


# --------------------------------------------------------------------------- backward rows
# Row t (a token) or i (a routed row) of a backward kernel; sums in float64 in a fixed order.


@njit(inline="always")
def softmax_backward_row(dy, y, dx, t):
    # dy: (T, E), y: (T, E) softmax output -> dx[t] = y[t] * (dy[t] - <dy[t], y[t]>)
    E = y.shape[1]
    dot = 0.0
    for e in range(E):
        dot += np.float64(dy[t, e]) * np.float64(y[t, e])
    for e in range(E):
        dx[t, e] = np.float64(y[t, e]) * (np.float64(dy[t, e]) - dot)


@njit(inline="always")
def combine_backward_row(dy, ys, rows, weights, d_ys, d_weights, i):
    # dy: (T, d), ys: (N, d), rows: (N,), weights: (T, k) -> d_ys[i], d_weights[t, j] for the
    # kept row i of assignment (t, j) = divmod(rows[i], k):
    #   d_ys[i] = weights[t, j] * dy[t],  d_weights[t, j] = <dy[t], ys[i]> (float64 sum)
    k = weights.shape[1]
    t = rows[i] // k
    j = rows[i] - t * k
    w = weights[t, j]
    dot = 0.0
    for c in range(dy.shape[1]):
        dot += np.float64(dy[t, c]) * np.float64(ys[i, c])
        d_ys[i, c] = w * dy[t, c]
    d_weights[t, j] = dot
