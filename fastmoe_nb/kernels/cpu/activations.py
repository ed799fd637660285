"""CPU activation kernels (the maths is in kernels/common.py, shared with CUDA).

activate_rows / activate_backward_rows are serial (nogil) so that the expert pipeline's worker
threads can run them on one cache-warm block of rows; the parallel kernels split the rows over
numba's threads and call the same functions."""
from numba import njit, prange

from ..common import SWIGLU, act_grad_scalar, act_scalar

ROWS = 64      # rows a parallel task takes


@njit(nogil=True, cache=True)
def activate_rows(h, code, out):
    # h: (n, H) -> out: (n, H); SWIGLU: h (n, 2H') = [gate | up] -> out (n, H')
    H = out.shape[1]
    for i in range(h.shape[0]):
        if code == SWIGLU:
            for c in range(H):
                out[i, c] = act_scalar(h[i, c], code) * h[i, H + c]
        else:
            for c in range(H):
                out[i, c] = act_scalar(h[i, c], code)


@njit(nogil=True, cache=True)
def activate_backward_rows(dy, h, code, dh):
    # dy: (n, H), h: (n, H) pre-activation -> dh: (n, H) = dy * act'(h)
    # SWIGLU: h (n, 2H) = [gate | up] -> dh (n, 2H) = [dy * up * silu'(gate) | dy * silu(gate)]
    H = dy.shape[1]
    for i in range(h.shape[0]):
        if code == SWIGLU:
            for c in range(H):
                g = h[i, c]
                dh[i, c] = dy[i, c] * h[i, H + c] * act_grad_scalar(g, code)
                dh[i, H + c] = dy[i, c] * act_scalar(g, code)
        else:
            for c in range(H):
                dh[i, c] = dy[i, c] * act_grad_scalar(h[i, c], code)


@njit(parallel=True, cache=True)
def activate_kernel(h, code, out):
    # h: (N, H) -> out: (N, H'), as activate_rows, in blocks of ROWS rows
    N = h.shape[0]
    for b in prange((N + ROWS - 1) // ROWS):
        lo, hi = b * ROWS, min(N, b * ROWS + ROWS)
        activate_rows(h[lo:hi], code, out[lo:hi])


@njit(parallel=True, cache=True)
def activate_backward_kernel(dy, h, code, dh):
    # dy: (N, H'), h: (N, H) -> dh: (N, H), as activate_backward_rows, in blocks of ROWS rows
    N = h.shape[0]
    for b in prange((N + ROWS - 1) // ROWS):
        lo, hi = b * ROWS, min(N, b * ROWS + ROWS)
        activate_backward_rows(dy[lo:hi], h[lo:hi], code, dh[lo:hi])
