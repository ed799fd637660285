"""CPU activation kernels.

The maths is the branch-free CPU versions of kernels/cpu/fastmath.py (a vectorizable exp), not
the scalar ones of kernels/common.py that CUDA uses: the activation code is dispatched once per
row, and each row is one unsigned-index loop over a scalar function, which LLVM turns into AVX2
code. gelu (erf) stays a libm call per element.

activate_rows / activate_backward_rows are serial (nogil) so that the expert pipeline's worker
threads can run them on one cache-warm block of rows; the parallel kernels split the rows over
numba's threads and call the same functions."""
import numpy as np
from numba import njit, prange

from ..common import GELU, GELU_TANH, RELU, SILU, SWIGLU
from .config import ROW_BLOCK
from .fastmath import (gelu, gelu_grad, gelu_tanh, gelu_tanh_grad, relu, relu_grad, silu,
                       silu_grad)



@njit(inline="always")
def act(x, code):
    """One element of the activation with the CPU's fast maths (SWIGLU: the silu of its gate),
    for the GEMM epilogues that produce one element at a time."""
    if code == RELU:
        return relu(x)
    if code == GELU:
        return gelu(x)
    if code == GELU_TANH:
        return gelu_tanh(x)
    return silu(x)


def _row_loop(f, times):
    """A compiled loop over one row: out = f(x) (times=False) or out = y * f(x) (times=True),
    for a scalar f of kernels/cpu/fastmath.py. One such loop per activation keeps the code
    dispatch out of the element loop (a closure over f: numba caches each one apart)."""
    if times:
        @njit(nogil=True, cache=True)
        def loop(x, y, out):
            # x: (n,), y: (n,), out: (n,) -> out = y * f(x)
            for c in range(np.uint64(0), np.uint64(out.shape[0])):
                out[c] = y[c] * f(x[c])
    else:
        @njit(nogil=True, cache=True)
        def loop(x, out):
            # x: (n,), out: (n,) -> out = f(x)
            for c in range(np.uint64(0), np.uint64(out.shape[0])):
                out[c] = f(x[c])
    return loop


_relu, _gelu, _gelu_tanh, _silu = (_row_loop(f, False) for f in (relu, gelu, gelu_tanh, silu))
_swiglu = _row_loop(silu, True)
_relu_bwd, _gelu_bwd, _gelu_tanh_bwd, _silu_bwd = (
    _row_loop(f, True) for f in (relu_grad, gelu_grad, gelu_tanh_grad, silu_grad))


@njit(nogil=True, cache=True)
def _swiglu_backward(dy, g, u, dg, du):
    # dy, g, u: (n,) -> dg = dy * u * silu'(g), du = dy * silu(g): (n,)
    for c in range(np.uint64(0), np.uint64(dy.shape[0])):
        x = g[c]   # loaded once (du may alias g): LLVM then computes e^-x once for both
        du[c] = dy[c] * silu(x)
        dg[c] = dy[c] * u[c] * silu_grad(x)


@njit(nogil=True, cache=True)
def activate_rows(h, code, out):
    # h: (n, H) -> out: (n, H); SWIGLU: h (n, 2H') = [gate | up] -> out (n, H')
    H = out.shape[1]
    for i in range(h.shape[0]):
        x, o = h[i], out[i]
        if code == SWIGLU:
            _swiglu(x[:H], x[H:], o)
        elif code == SILU:
            _silu(x, o)
        elif code == GELU_TANH:
            _gelu_tanh(x, o)
        elif code == GELU:
            _gelu(x, o)
        elif code == RELU:
            _relu(x, o)


@njit(nogil=True, cache=True)
def activate_backward_rows(dy, h, code, dh):
    # dy: (n, H), h: (n, H) pre-activation -> dh: (n, H) = dy * act'(h)
    # SWIGLU: h (n, 2H) = [gate | up] -> dh (n, 2H) = [dy * up * silu'(gate) | dy * silu(gate)]
    H = dy.shape[1]
    for i in range(h.shape[0]):
        x, g, d = h[i], dy[i], dh[i]
        if code == SWIGLU:
            _swiglu_backward(g, x[:H], x[H:], d[:H], d[H:])
        elif code == SILU:
            _silu_bwd(x, g, d)
        elif code == GELU_TANH:
            _gelu_tanh_bwd(x, g, d)
        elif code == GELU:
            _gelu_bwd(x, g, d)
        elif code == RELU:
            _relu_bwd(x, g, d)


@njit(parallel=True, cache=True)
def activate_kernel(h, code, out):
    # h: (N, H) -> out: (N, H'), as activate_rows, in blocks of ROW_BLOCK rows
    N = h.shape[0]
    for b in prange((N + ROW_BLOCK - 1) // ROW_BLOCK):
        lo, hi = b * ROW_BLOCK, min(N, b * ROW_BLOCK + ROW_BLOCK)
        activate_rows(h[lo:hi], code, out[lo:hi])


@njit(parallel=True, cache=True)
def activate_backward_kernel(dy, h, code, dh):
    # dy: (N, H'), h: (N, H) -> dh: (N, H), as activate_backward_rows, in blocks of ROW_BLOCK rows
    N = h.shape[0]
    for b in prange((N + ROW_BLOCK - 1) // ROW_BLOCK):
        lo, hi = b * ROW_BLOCK, min(N, b * ROW_BLOCK + ROW_BLOCK)
        activate_backward_rows(dy[lo:hi], h[lo:hi], code, dh[lo:hi])
