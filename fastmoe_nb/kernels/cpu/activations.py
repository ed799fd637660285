"""CPU activation kernels (the maths is in kernels/common.py, shared with CUDA)."""
from numba import njit, prange

from ..common import SWIGLU, act_grad_scalar, act_scalar


@njit(parallel=True, cache=True)
def activate_kernel(h, code, out):
    # h: (N, H) -> out: (N, H); SWIGLU: h (N, 2H') = [gate | up] -> out (N, H')
    N = h.shape[0]
    H = out.shape[1]
    for i in prange(N):
        if code == SWIGLU:
            for c in range(H):
                out[i, c] = act_scalar(h[i, c], code) * h[i, H + c]
        else:
            for c in range(H):
                out[i, c] = act_scalar(h[i, c], code)


@njit(parallel=True, cache=True)
def activate_backward_kernel(dy, h, code, dh):
    # dy: (N, H), h: (N, H) pre-activation -> dh: (N, H) = dy * act'(h)
    # SWIGLU: h (N, 2H) = [gate | up] -> dh (N, 2H) = [dy * up * silu'(gate) | dy * silu(gate)]
    N = h.shape[0]
    H = dy.shape[1]
    for i in prange(N):
        if code == SWIGLU:
            for c in range(H):
                g = h[i, c]
                dh[i, c] = dy[i, c] * h[i, H + c] * act_grad_scalar(g, code)
                dh[i, H + c] = dy[i, c] * act_scalar(g, code)
        else:
            for c in range(H):
                dh[i, c] = dy[i, c] * act_grad_scalar(h[i, c], code)
