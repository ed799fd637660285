"""CUDA dispatch kernels: the plan (a stable counting sort by expert, without atomics),
permute and combine.

make_plan is the classic stable radix pass. The n = T*k assignments are cut into C chunks of
consecutive ids, one thread each:
  1. plan_count   hist[e*C + c] = how many assignments of chunk c go to expert e
  2. scan         exclusive prefix sum of hist, expert-major: where chunk c's assignments to
                  expert e start among all assignments to e (and to lower experts)
  3. plan_sizes   wanted / kept / dropped per expert; a scan of kept gives offsets
  4. plan_scatter each chunk walks its ids in order and writes rows / slots
Every position is a function of the input alone: the plan is the CPU's, bitwise.
"""
import numpy as np
from numba import cuda, from_dtype, int32, int64, void

from ..common import combine_backward_row, for_cuda

_combine_backward_row = for_cuda(combine_backward_row)


def specs(dt, cfg):
    """{name: (kernel, signature)}; dt is the float dtype of permute / combine, the integer
    dtype of the experts array for "flatten"; the plan kernels hold no dtype (float32 key)."""
    P = cfg["scan_threads"]
    f = from_dtype(np.dtype(dt))

    def flatten(experts, flat):
        # experts: (T, k) any integer dtype or layout -> flat: (T*k,) int32
        k = experts.shape[1]
        for i in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
            flat[i] = experts[i // k, i % k]

    def plan_count(flat, E, C, hist, bad):
        # flat: (n,) expert ids -> hist: (E*C,) per (expert, chunk) counts,
        # bad: (C,) the first id of chunk c outside 0..E-1, or 0 when there is none
        n = flat.shape[0]
        size = (n + C - 1) // C
        for c in range(cuda.grid(1), C, cuda.gridsize(1)):
            for e in range(E):
                hist[e * C + c] = 0
            bad[c] = 0
            for i in range(c * size, min(n, (c + 1) * size)):
                e = flat[i]
                if 0 <= e < E:
                    hist[e * C + c] += 1
                elif bad[c] == 0:
                    bad[c] = e

    def scan(a, n):
        # a: (n+1,) int64 -> in place, a[i] = sum of the old a[:i] (a[n] = the total);
        # one block of P threads, each summing a contiguous segment
        part = cuda.shared.array(P, int64)
        tid = cuda.threadIdx.x
        size = (n + P - 1) // P
        lo = min(n, tid * size)
        hi = min(n, lo + size)
        s = 0
        for i in range(lo, hi):
            s += a[i]
        part[tid] = s
        cuda.syncthreads()
        if tid == 0:
            run = 0
            for j in range(P):
                v = part[j]
                part[j] = run
                run += v
            a[n] = run
        cuda.syncthreads()
        run = part[tid]
        for i in range(lo, hi):
            v = a[i]
            a[i] = run
            run += v

    def plan_sizes(start, C, capacity, first, counts, dropped):
        # start: (E*C+1,) scanned hist -> first: (E,) where expert e's assignments start,
        # counts: (E+1,) kept per expert (counts[E] = 0, room for the scan into offsets),
        # dropped: (E,); capacity < 0: none
        E = first.shape[0]
        for e in range(cuda.grid(1), E + 1, cuda.gridsize(1)):
            if e == E:
                counts[E] = 0
                continue
            wanted = start[(e + 1) * C] - start[e * C]
            kept = wanted if capacity < 0 else min(wanted, capacity)
            first[e] = start[e * C]
            counts[e] = kept
            dropped[e] = wanted - kept

    def plan_scatter(flat, C, capacity, start, first, offsets, rows, slots):
        # flat: (n,), start: (E*C+1,) cursors (advanced in place), first: (E,),
        # offsets: (E+1,) -> rows: (N,) int32, slots: (n,) int32 (-1: dropped)
        n = flat.shape[0]
        size = (n + C - 1) // C
        for c in range(cuda.grid(1), C, cuda.gridsize(1)):
            for i in range(c * size, min(n, (c + 1) * size)):
                e = flat[i]
                p = start[e * C + c]
                start[e * C + c] = p + 1
                rank = p - first[e]
                if capacity < 0 or rank < capacity:
                    s = offsets[e] + rank
                    rows[s] = i
                    slots[i] = s
                else:
                    slots[i] = -1

    def permute_kernel(x, rows, k, out):
        # x: (T, d), rows: (N,) -> out: (N, d), out[i] = x[rows[i] // k]; a block per row
        # (grid-stride), its threads over the columns: coalesced, no division per element
        for i in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            t = rows[i] // k
            for c in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
                out[i, c] = x[t, c]

    def combine_kernel(ys, slots, weights, out):
        # ys: (N, d), slots: (T, k), weights: (T, k) -> out: (T, d); a block per token, each
        # element summed by one thread over j = 0..k-1 in order, dropped assignments (slot -1)
        # adding nothing
        for t in range(cuda.blockIdx.x, out.shape[0], cuda.gridDim.x):
            for c in range(cuda.threadIdx.x, out.shape[1], cuda.blockDim.x):
                acc = f(0.0)
                for j in range(slots.shape[1]):
                    s = slots[t, j]
                    if s >= 0:
                        acc += weights[t, j] * ys[s, c]
                out[t, c] = acc

    def combine_backward_kernel(dy, ys, rows, weights, d_ys, d_weights):
        # dy: (T, d), ys: (N, d), rows: (N,), weights: (T, k) -> d_ys: (N, d),
        # d_weights: (T, k); one thread per kept row (kernels/common.py: combine_backward_row,
        # the CPU kernel's too); the caller zeroes d_weights (dropped assignments stay 0)
        for i in range(cuda.grid(1), rows.shape[0], cuda.gridsize(1)):
            _combine_backward_row(dy, ys, rows, weights, d_ys, d_weights, i)

    return {
        "combine_backward": (combine_backward_kernel,
                             void(f[:, :], f[:, :], int32[:], f[:, :], f[:, :], f[:, :])),
        "flatten": (flatten, void(f[:, :], int32[:])),
        "plan_count": (plan_count, void(int32[:], int64, int64, int64[:], int64[:])),
        "scan": (scan, void(int64[:], int64)),
        "plan_sizes": (plan_sizes, void(int64[:], int64, int64, int64[:], int64[:], int64[:])),
        "plan_scatter": (plan_scatter, void(int32[:], int64, int64, int64[:], int64[:],
                                            int64[:], int32[:], int32[:])),
        "permute": (permute_kernel, void(f[:, :], int32[:], int64, f[:, :])),
        "combine": (combine_kernel, void(f[:, :], int32[:, :], f[:, :], f[:, :])),
    }


# the dtypes each kernel is launched with (tools/cuda_compile_check.py compiles them all)
LAUNCHED = {"flatten": ("int32", "int64"), "plan_count": ("float32",), "scan": ("float32",),
            "plan_sizes": ("float32",), "plan_scatter": ("float32",),
            "permute": ("float32", "float64"), "combine": ("float32", "float64"),
            "combine_backward": ("float32", "float64")}
