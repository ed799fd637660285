"""CUDA routing kernels: softmax, top-k, softmax_topk, sigmoid_topk, and a finiteness check.

One block of R = route_threads threads per token (grid-stride over tokens). Thread i scans
experts i, i+R, ... into its own descending top-k list (common.topk_insert, in increasing
expert order), then the R lists are merged pairwise in shared memory, log2(R) rounds, ordered
by (value descending, index ascending): the result is the stable top-k of the whole row, the
same as the CPU kernel's, for any R. Sums are fixed binary trees in shared memory. Maths in
float64 as on the CPU; no warp shuffles, so the simulator runs the same code.
"""
import math

import numpy as np
from numba import boolean, cuda, float64, from_dtype, int32, int64, void

from ..common import for_cuda, sigmoid, softmax_backward_row, topk_insert

_softmax_backward_row = for_cuda(softmax_backward_row)

PAD = 2147483647  # index of an empty list entry: after every real expert on equal values


def specs(dt, cfg):
    """{name: (kernel, signature)} for working dtype dt under launch config cfg."""
    R, KMAX = cfg["route_threads"], cfg["max_k"]
    f = from_dtype(np.dtype(dt))

    @cuda.jit(device=True)
    def block_topk(vals, ids, filled, k, sv, si, tid):
        # vals, ids: (KMAX,) this thread's top list with `filled` entries; sv, si: shared
        # (R, KMAX) -> sv[0, :k], si[0, :k] the block's top-k; returns after a syncthreads
        for j in range(k):
            sv[tid, j] = vals[j] if j < filled else -math.inf
            si[tid, j] = ids[j] if j < filled else PAD
        tv = cuda.local.array(KMAX, float64)
        ti = cuda.local.array(KMAX, int32)
        stride = R // 2
        while stride > 0:
            cuda.syncthreads()
            if tid < stride:
                o = tid + stride
                a = 0
                b = 0
                for j in range(k):  # a + b = j < k: both lists still have an entry
                    va = sv[tid, a]
                    vb = sv[o, b]
                    if va > vb or (va == vb and si[tid, a] < si[o, b]):
                        tv[j] = va
                        ti[j] = si[tid, a]
                        a += 1
                    else:
                        tv[j] = vb
                        ti[j] = si[o, b]
                        b += 1
                for j in range(k):
                    sv[tid, j] = tv[j]
                    si[tid, j] = ti[j]
            stride //= 2
        cuda.syncthreads()

    @cuda.jit(device=True)
    def block_sum(ss, v, tid):
        # ss: shared (R,) -> the sum of every thread's v, in a fixed tree order
        ss[tid] = v
        stride = R // 2
        while stride > 0:
            cuda.syncthreads()
            if tid < stride:
                ss[tid] += ss[tid + stride]
            stride //= 2
        cuda.syncthreads()
        s = ss[0]
        cuda.syncthreads()
        return s

    @cuda.jit(device=True)
    def row_topk(x, t, k, sv, si, tid):
        # x: (T, E) -> sv[0, :k], si[0, :k]: the top-k of row t (float64 values)
        vals = cuda.local.array(KMAX, float64)
        ids = cuda.local.array(KMAX, int32)
        filled = 0
        for e in range(tid, x.shape[1], R):
            filled = topk_insert(vals, ids, filled, k, float64(x[t, e]), e)
        block_topk(vals, ids, filled, k, sv, si, tid)

    def softmax_kernel(x, out):
        # x: (T, E) -> out: (T, E), exp(x - max) / sum per row
        sv = cuda.shared.array((R, KMAX), float64)
        si = cuda.shared.array((R, KMAX), int32)
        ss = cuda.shared.array(R, float64)
        tid = cuda.threadIdx.x
        for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            row_topk(x, t, 1, sv, si, tid)
            m = sv[0, 0]
            s = 0.0
            for e in range(tid, x.shape[1], R):
                s += math.exp(float64(x[t, e]) - m)
            s = block_sum(ss, s, tid)
            for e in range(tid, x.shape[1], R):
                out[t, e] = math.exp(float64(x[t, e]) - m) / s

    def topk_kernel(x, k, vals, idx):
        # x: (T, E) -> vals: (T, k) descending, idx: (T, k) int32
        sv = cuda.shared.array((R, KMAX), float64)
        si = cuda.shared.array((R, KMAX), int32)
        tid = cuda.threadIdx.x
        for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
            row_topk(x, t, k, sv, si, tid)
            for j in range(tid, k, R):
                vals[t, j] = sv[0, j]
                idx[t, j] = si[0, j]
            cuda.syncthreads()

    def softmax_topk_kernel(logits, k, renormalize, weights, experts):
        # logits: (T, E) -> weights: (T, k), experts: (T, k) int32
        sv = cuda.shared.array((R, KMAX), float64)
        si = cuda.shared.array((R, KMAX), int32)
        ss = cuda.shared.array(R, float64)
        tid = cuda.threadIdx.x
        for t in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            row_topk(logits, t, k, sv, si, tid)
            m = sv[0, 0]
            s = 0.0
            for e in range(tid, logits.shape[1], R):
                s += math.exp(float64(logits[t, e]) - m)
            s = block_sum(ss, s, tid)
            if tid == 0:
                kept = 0.0
                for j in range(k):
                    kept += math.exp(sv[0, j] - m)
                norm = kept if renormalize else s
                for j in range(k):
                    weights[t, j] = math.exp(sv[0, j] - m) / norm
                    experts[t, j] = si[0, j]
            cuda.syncthreads()

    def sigmoid_topk_kernel(logits, k, bias, has_bias, n_group, topk_group, renormalize,
                            scale, weights, experts):
        # logits: (T, E), bias: (E,) (unused unless has_bias) -> weights: (T, k),
        # experts: (T, k) int32
        sv = cuda.shared.array((R, KMAX), float64)
        si = cuda.shared.array((R, KMAX), int32)
        ss = cuda.shared.array(R, float64)
        tid = cuda.threadIdx.x
        E = logits.shape[1]
        G = E // n_group
        vals = cuda.local.array(KMAX, float64)
        ids = cuda.local.array(KMAX, int32)
        kept = cuda.local.array(KMAX, int32)
        for t in range(cuda.blockIdx.x, logits.shape[0], cuda.gridDim.x):
            if n_group > 1:  # groups scored by the sum of their two best biased scores
                filled = 0
                for g in range(tid, n_group, R):
                    b0 = -math.inf
                    b1 = -math.inf
                    for i in range(G):
                        c = sigmoid(float64(logits[t, g * G + i]))
                        if has_bias:
                            c += float64(bias[g * G + i])
                        if c > b0:
                            b1 = b0
                            b0 = c
                        elif c > b1:
                            b1 = c
                    filled = topk_insert(vals, ids, filled, topk_group,
                                         b0 + b1 if G > 1 else b0, g)
                block_topk(vals, ids, filled, topk_group, sv, si, tid)
                for j in range(topk_group):
                    kept[j] = si[0, j]
                cuda.syncthreads()
            filled = 0
            for e in range(tid, E, R):
                c = sigmoid(float64(logits[t, e]))
                if has_bias:
                    c += float64(bias[e])
                if n_group > 1:
                    keep = False
                    for j in range(topk_group):
                        keep = keep or kept[j] == e // G
                    if not keep:
                        c = -math.inf
                filled = topk_insert(vals, ids, filled, k, c, e)
            block_topk(vals, ids, filled, k, sv, si, tid)
            total = 0.0
            for j in range(k):
                total += sigmoid(float64(logits[t, si[0, j]]))
            denom = total + 1e-20 if renormalize else 1.0
            for j in range(tid, k, R):
                weights[t, j] = sigmoid(float64(logits[t, si[0, j]])) / denom * scale
                experts[t, j] = si[0, j]
            cuda.syncthreads()

    def nonfinite_kernel(x, flag):
        # x: (T, E) -> flag[0] = 1 if any entry is NaN or +-Inf (flag zeroed by the caller)
        T, E = x.shape
        for i in range(cuda.grid(1), T * E, cuda.gridsize(1)):
            if not math.isfinite(x[i // E, i % E]):
                flag[0] = 1

    def softmax_backward_kernel(dy, y, dx):
        # dy: (T, E), y: (T, E) softmax output -> dx: (T, E) = y * (dy - sum(dy * y)).
        # The backward kernels run one thread per token, sums in float64 as on the CPU; this
        # one's row is kernels/common.py's, the CPU kernel's too. softmax_topk's and
        # sigmoid_topk's compute each of the k weights again where it is used (a thread has no
        # array as long as any k), where the CPU keeps them in a scratch row
        for t in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
            _softmax_backward_row(dy, y, dx, t)

    def softmax_topk_backward_kernel(d_weights, logits, experts, renormalize, d_logits):
        # d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E)
        # renormalize: w = softmax over the k chosen logits -> d l[e_j] = w_j (dw_j - dot),
        #              dot = sum_i dw_i w_i, and 0 elsewhere
        # otherwise:   w_j = p[e_j] (softmax over E) -> d l = p * (g - dot), g the d_weights
        #              scattered to their experts
        T, E = logits.shape
        k = experts.shape[1]
        for t in range(cuda.grid(1), T, cuda.gridsize(1)):
            m = -math.inf
            for j in range(k):
                m = max(m, float64(logits[t, experts[t, j]]))
            norm = 0.0
            if renormalize:
                for j in range(k):
                    norm += math.exp(float64(logits[t, experts[t, j]]) - m)
            else:
                for e in range(E):
                    m = max(m, float64(logits[t, e]))
                for e in range(E):
                    norm += math.exp(float64(logits[t, e]) - m)
            dot = 0.0
            for j in range(k):
                dot += float64(d_weights[t, j]) * (
                    math.exp(float64(logits[t, experts[t, j]]) - m) / norm)
            for e in range(E):
                d_logits[t, e] = 0.0 if renormalize else -math.exp(
                    float64(logits[t, e]) - m) / norm * dot
            for j in range(k):
                w = math.exp(float64(logits[t, experts[t, j]]) - m) / norm
                d_logits[t, experts[t, j]] = w * (float64(d_weights[t, j]) - dot)

    def sigmoid_topk_backward_kernel(d_weights, logits, experts, renormalize, scale, d_logits):
        # d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E), zero off
        # the k. w_j = scale * s_j / D, s = sigmoid(logits[e_j]), D = sum_i s_i + 1e-20 (or
        # 1): d s_j = scale / D * (dw_j - sum_i dw_i s_i / D), d l[e_j] = d s_j s_j (1 - s_j)
        T, E = logits.shape
        k = experts.shape[1]
        for t in range(cuda.grid(1), T, cuda.gridsize(1)):
            total = 0.0
            dot = 0.0
            for j in range(k):
                sj = sigmoid(float64(logits[t, experts[t, j]]))
                total += sj
                dot += float64(d_weights[t, j]) * sj
            denom = total + 1e-20 if renormalize else 1.0
            dot = dot / denom if renormalize else 0.0
            for e in range(E):
                d_logits[t, e] = 0.0
            for j in range(k):
                sj = sigmoid(float64(logits[t, experts[t, j]]))
                ds = scale / denom * (float64(d_weights[t, j]) - dot)
                d_logits[t, experts[t, j]] = ds * sj * (1.0 - sj)

    return {
        "softmax_backward": (softmax_backward_kernel, void(f[:, :], f[:, :], f[:, :])),
        "softmax_topk_backward": (softmax_topk_backward_kernel,
                                  void(f[:, :], f[:, :], int32[:, :], boolean, f[:, :])),
        "sigmoid_topk_backward": (sigmoid_topk_backward_kernel,
                                  void(f[:, :], f[:, :], int32[:, :], boolean, float64,
                                       f[:, :])),
        "softmax": (softmax_kernel, void(f[:, :], f[:, :])),
        "topk": (topk_kernel, void(f[:, :], int64, f[:, :], int32[:, :])),
        "softmax_topk": (softmax_topk_kernel,
                         void(f[:, :], int64, boolean, f[:, :], int32[:, :])),
        "sigmoid_topk": (sigmoid_topk_kernel,
                         void(f[:, :], int64, f[:], boolean, int64, int64, boolean, float64,
                              f[:, :], int32[:, :])),
        "nonfinite": (nonfinite_kernel, void(f[:, :], int32[:])),
    }


# the dtypes each kernel is launched with (tools/cuda_compile_check.py compiles them all)
LAUNCHED = {}  # every kernel: float32 and float64
