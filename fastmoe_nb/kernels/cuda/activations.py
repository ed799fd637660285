"""CUDA elementwise kernels: activations (kernels/common.py's scalar maths; the CPU's are
kernels/cpu/fastmath.py's branch-free ones, whose bits differ), their backward, the sigmoid gate
of a shared expert and a gated row-sum. Grid-stride: a block per row, its threads over the
columns (coalesced, no index division per element); one thread per output element."""
import numpy as np
from numba import boolean, cuda, float64, from_dtype, int64, void

from ..common import SWIGLU, act_grad_scalar, act_scalar, sigmoid


def specs(dt, cfg):
    """{name: (kernel, signature)} for dtype dt."""
    f = from_dtype(np.dtype(dt))

    def activate_kernel(h, code, out):
        # h: (N, H) -> out: (N, H); SWIGLU: h (N, 2H') = [gate | up] -> out (N, H');
        # a block per row (grid-stride), its threads over the columns
        H = out.shape[1]
        for i in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            for c in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                if code == SWIGLU:
                    out[i, c] = act_scalar(h[i, c], code) * h[i, H + c]
                else:
                    out[i, c] = act_scalar(h[i, c], code)

    def activate_backward_kernel(dout, h, code, dh):
        # dout: (N, H), h: (N, H) [swiglu: (N, 2H)] -> dh: like h; a block per row
        H = dout.shape[1]
        for i in range(cuda.blockIdx.x, dout.shape[0], cuda.gridDim.x):
            for c in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                g = dout[i, c]
                if code == SWIGLU:
                    dh[i, c] = g * h[i, H + c] * act_grad_scalar(h[i, c], code)
                    dh[i, H + c] = g * act_scalar(h[i, c], code)
                else:
                    dh[i, c] = g * act_grad_scalar(h[i, c], code)

    def sigmoid_kernel(z, out):
        # z: (T, M) -> out: (T, M) = 1 / (1 + exp(-z))
        T, M = out.shape
        for q in range(cuda.grid(1), T * M, cuda.gridsize(1)):
            out[q // M, q % M] = sigmoid(z[q // M, q % M])

    def add_rows_kernel(y, has_y, s, gate, has_gate, out):
        # y: (T, d), s: (T, d) or (1, d) (every row adds s[0]), gate: (T, 1)
        # -> out: (T, d) = [y +] s [* gate]; a block per row
        for t in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            ts = t if s.shape[0] > 1 else 0
            for c in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
                v = s[ts, c] * gate[t, 0] if has_gate else s[ts, c]
                out[t, c] = y[t, c] + v if has_y else v

    def rowdot_gate_kernel(dh, h, gate, out):
        # dh, h: (T, H), gate: (T, 1) -> out: (T, 1) = <dh[t], h[t]> * gate (1 - gate), the
        # gradient of a sigmoid gate's logit; one thread per token, the dot in float64
        for t in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            dot = 0.0
            for c in range(h.shape[1]):
                dot += float64(dh[t, c]) * float64(h[t, c])
            g = gate[t, 0]
            out[t, 0] = dot * (g * (1.0 - g))

    return {
        "rowdot_gate": (rowdot_gate_kernel, void(f[:, :], f[:, :], f[:, :], f[:, :])),
        "activate": (activate_kernel, void(f[:, :], int64, f[:, :])),
        "activate_backward": (activate_backward_kernel,
                              void(f[:, :], f[:, :], int64, f[:, :])),
        "sigmoid": (sigmoid_kernel, void(f[:, :], f[:, :])),
        "add_rows": (add_rows_kernel, void(f[:, :], boolean, f[:, :], f[:, :], boolean,
                                           f[:, :])),
    }


# the dtypes each kernel is launched with (tools/cuda_compile_check.py compiles them all)
LAUNCHED = {}  # every kernel: float32 and float64
