"""CUDA grouped GEMM: shared-memory tiles, one tile scheduler over every expert's tiles, the
activation in the epilogue; and the weight-gradient product dW[e] = a[rows of e].T @ dy.

Forward: out[rows of e] = act(a[rows of e] @ w[e]) (w[e].T with trans_w). The expert's rows
are cut into BM-row tiles; tiles[e] = row tiles of experts before e (an exclusive scan of
ceil(count / BM)), so linear tile L = (row tile, column tile) finds its expert by a binary
search of tiles. A block of (BM/TM) * (BN/TN) threads loads a BK-deep slab of A and W into
shared memory, each thread accumulates a TM x TN register tile, and the epilogue applies the
activation. The swiglu variant (glu=True) gives each block BN/2 output columns and loads
their gate columns and their up columns (w columns c and H + c) side by side, so a thread
holds both halves of its outputs and writes silu(gate) * up: h_pre never reaches memory.

Every output element is summed by one thread in increasing K: deterministic.
"""
import numpy as np
from numba import boolean, cuda, from_dtype, int64, void

from ..common import act_scalar


def specs(dt, cfg):
    """{name: (kernel, signature)}: "gemm", "gemm_glu" (swiglu epilogue) and "gemm_dw"."""
    BM, BN, BK = cfg["gemm_bm"], cfg["gemm_bn"], cfg["gemm_bk"]
    TM, TN = cfg["gemm_tm"], cfg["gemm_tn"]
    NX = BN // TN                 # threads along the columns of a tile
    NT = (BM // TM) * NX          # threads per block
    TMN = TM * TN                 # register tile size (a constant for local.array)
    f = from_dtype(np.dtype(dt))

    @cuda.jit(device=True)
    def tile_mma(As, Bs, acc, ty, tx, TNp, BNp):
        # As: (BK, BM), Bs: (BK, BN) shared -> acc: (TM*TN,) += this thread's products;
        # the thread's columns are TNp-wide runs at tx*TNp of each BNp-wide part of the tile
        ra = cuda.local.array(TM, f)
        rb = cuda.local.array(TN, f)
        for kk in range(BK):
            for i in range(TM):
                ra[i] = As[kk, ty * TM + i]
            for j in range(TN):
                rb[j] = Bs[kk, (j // TNp) * BNp + tx * TNp + j % TNp]
            for i in range(TM):
                for j in range(TN):
                    acc[i * TN + j] += ra[i] * rb[j]

    def make_gemm(glu):
        P = 2 if glu else 1       # parts of a tile: swiglu's gate and up
        BNp = BN // P             # output columns per tile
        TNp = TN // P             # output columns per thread

        def gemm_kernel(a, w, trans_w, offsets, tiles, code, out):
            # a: (N, K), w: (E, K, M) or trans_w (E, M, K), offsets, tiles: (E+1,) int64,
            # code: activation (-1: none) -> out: (N, M), swiglu: (N, M/2)
            As = cuda.shared.array((BK, BM), f)
            Bs = cuda.shared.array((BK, BN), f)
            acc = cuda.local.array(TMN, f)
            tid = cuda.threadIdx.x
            tx = tid % NX
            ty = tid // NX
            E = offsets.shape[0] - 1
            K = a.shape[1]
            Mo = out.shape[1]
            ncol = (Mo + BNp - 1) // BNp
            for L in range(cuda.blockIdx.x, tiles[E] * ncol, cuda.gridDim.x):
                rt = L // ncol
                ct = L - rt * ncol
                lo = 0                # the expert: the last e with tiles[e] <= rt
                hi = E
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if tiles[mid] <= rt:
                        lo = mid
                    else:
                        hi = mid
                e = lo
                row0 = offsets[e] + (rt - tiles[e]) * BM
                rend = offsets[e + 1]
                for i in range(TM * TN):
                    acc[i] = 0
                for k0 in range(0, K, BK):
                    for q in range(tid, BM * BK, NT):
                        r = q // BK
                        kk = q - r * BK
                        v = f(0)
                        if row0 + r < rend and k0 + kk < K:
                            v = a[row0 + r, k0 + kk]
                        As[kk, r] = v
                    for q in range(tid, BK * BN, NT):
                        if trans_w:   # consecutive threads read consecutive k of w[e, col]
                            c = q // BK
                            kk = q - c * BK
                        else:         # consecutive threads read consecutive columns
                            kk = q // BN
                            c = q - kk * BN
                        part = c // BNp
                        oc = ct * BNp + c - part * BNp
                        v = f(0)
                        if oc < Mo and k0 + kk < K:
                            if trans_w:
                                v = w[e, part * Mo + oc, k0 + kk]
                            else:
                                v = w[e, k0 + kk, part * Mo + oc]
                        Bs[kk, c] = v
                    cuda.syncthreads()
                    tile_mma(As, Bs, acc, ty, tx, TNp, BNp)
                    cuda.syncthreads()
                for i in range(TM):
                    row = row0 + ty * TM + i
                    if row < rend:
                        for j in range(TNp):
                            oc = ct * BNp + tx * TNp + j
                            if oc < Mo:
                                v = acc[i * TN + j]
                                if glu:
                                    out[row, oc] = act_scalar(v, code) * acc[i * TN + j + TNp]
                                elif code >= 0:
                                    out[row, oc] = act_scalar(v, code)
                                else:
                                    out[row, oc] = v

        return gemm_kernel

    def gemm_dw_kernel(a, dy, offsets, dw):
        # a: (N, K), dy: (N, M), offsets: (E+1,) -> dw: (E, K, M), dw[e] = a[rows].T @ dy[rows]
        # (zero for an expert without rows); tiles of dw[e] over (K, M), reduction over rows
        As = cuda.shared.array((BK, BM), f)
        Bs = cuda.shared.array((BK, BN), f)
        acc = cuda.local.array(TMN, f)
        tid = cuda.threadIdx.x
        tx = tid % NX
        ty = tid // NX
        E, K, M = dw.shape
        nr = (K + BM - 1) // BM
        ncol = (M + BN - 1) // BN
        for L in range(cuda.blockIdx.x, E * nr * ncol, cuda.gridDim.x):
            e = L // (nr * ncol)
            rt = (L - e * nr * ncol) // ncol
            ct = L - e * nr * ncol - rt * ncol
            lo = offsets[e]
            hi = offsets[e + 1]
            for i in range(TM * TN):
                acc[i] = 0
            for r0 in range(lo, hi, BK):
                for q in range(tid, BM * BK, NT):
                    rr = q // BM          # consecutive threads read consecutive K of a row
                    kq = q - rr * BM
                    v = f(0)
                    if r0 + rr < hi and rt * BM + kq < K:
                        v = a[r0 + rr, rt * BM + kq]
                    As[rr, kq] = v
                for q in range(tid, BK * BN, NT):
                    rr = q // BN
                    c = q - rr * BN
                    v = f(0)
                    if r0 + rr < hi and ct * BN + c < M:
                        v = dy[r0 + rr, ct * BN + c]
                    Bs[rr, c] = v
                cuda.syncthreads()
                tile_mma(As, Bs, acc, ty, tx, TN, BN)
                cuda.syncthreads()
            for i in range(TM):
                kq = rt * BM + ty * TM + i
                if kq < K:
                    for j in range(TN):
                        c = ct * BN + tx * TN + j
                        if c < M:
                            dw[e, kq, c] = acc[i * TN + j]

    sig = void(f[:, :], f[:, :, :], boolean, int64[:], int64[:], int64, f[:, :])
    return {
        "gemm": (make_gemm(False), sig),
        "gemm_glu": (make_gemm(True), sig),
        "gemm_dw": (gemm_dw_kernel, void(f[:, :], f[:, :], int64[:], f[:, :, :])),
    }


# the dtypes each kernel is launched with (tools/cuda_compile_check.py compiles them all)
LAUNCHED = {}  # every kernel: float32 and float64
