"""CPU activation kernels (the maths is in kernels/common.py, shared with CUDA)."""
from numba import njit, prange

from ..common import SWIGLU, act_scalar


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
