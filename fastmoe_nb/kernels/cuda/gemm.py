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

Weights in a format (fastmoe_nb.formats: bf16, q8_0, q4_0) run in the same forward kernel: the
weight load is a device function chosen per format when the kernel is built (load_w(w, e, r, c)
is the value (r, c) of expert e's logical (R, C) matrix, blocks along C), which decodes the
element to float32 on its way into shared memory; the rest of the kernel — tile schedule,
products, accumulation, epilogue — is the float32 kernel's. Each decoder returns exactly the
float32 value formats.dequantize gives, so a weight in a format computes what the float32
kernel computes on its dequantized copy.

Every output element is summed by one thread in increasing K: deterministic.
"""
import numpy as np
from numba import boolean, cuda, float32, from_dtype, int32, int64, uint8, uint16, uint32, void

from ..common import act_scalar

Q = 32   # values per q8_0 / q4_0 block


# --------------------------------------------------------------------------- weight loads

@cuda.jit(device=True)
def _float_from_bits(u):
    # u: uint32 -> the float32 with those bits (a register move once compiled)
    t = cuda.local.array(1, uint32)
    t[0] = u
    return t.view(np.float32)[0]


@cuda.jit(device=True)
def _fp16_scale(w, e, r, o):
    # w: (E, R, row_bytes) uint8, o: a block's first byte -> its little-endian fp16 scale d
    # as float32 (exact)
    t = cuda.local.array(1, uint16)
    t[0] = uint16(int32(w[e, r, o]) | (int32(w[e, r, o + 1]) << 8))
    return float32(t.view(np.float16)[0])


@cuda.jit(device=True)
def load_float(w, e, r, c):
    # w: (E, R, C) float32 / float64 -> w[e, r, c]
    return w[e, r, c]


@cuda.jit(device=True)
def load_bf16(w, e, r, c):
    # w: (E, R, C) uint16 bf16 bits -> the float32 whose high half they are (exact widening)
    return _float_from_bits(uint32(w[e, r, c]) << 16)


@cuda.jit(device=True)
def load_q8_0(w, e, r, c):
    # w: (E, R, C/32*34) uint8 q8_0 blocks (fp16 d, 32 int8 q) -> d * q of value c, as float32
    o = (c // Q) * 34
    q = int32(w[e, r, o + 2 + c % Q])
    return _fp16_scale(w, e, r, o) * float32(q - ((q & 128) << 1))   # the byte as int8


@cuda.jit(device=True)
def load_q4_0(w, e, r, c):
    # w: (E, R, C/32*18) uint8 q4_0 blocks (fp16 d, 16 bytes: values j in the low nibbles,
    # j + 16 in the high ones) -> (q - 8) * d of value c, as float32
    o = (c // Q) * 18
    j = c % Q
    b = int32(w[e, r, o + 2 + j % 16])
    q = (b & 15) if j < 16 else (b >> 4)
    return float32(q - 8) * _fp16_scale(w, e, r, o)


# format -> (weight load, the blocks' element type); formats.py describes the layouts
LOADS = {"bf16": (load_bf16, uint16), "q8_0": (load_q8_0, uint8), "q4_0": (load_q4_0, uint8)}


def specs(dt, cfg):
    """{name: (kernel, signature)}: "gemm", "gemm_glu" (swiglu epilogue) and "gemm_dw"; for
    float32, also "gemm_<fmt>" and "gemm_glu_<fmt>" reading weights in each format of LOADS
    (they decode to float32, so they have no float64 version)."""
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

    def make_gemm(glu, load_w):
        P = 2 if glu else 1       # parts of a tile: swiglu's gate and up
        BNp = BN // P             # output columns per tile
        TNp = TN // P             # output columns per thread

        def gemm_kernel(a, w, trans_w, offsets, tiles, code, out):
            # a: (N, K), w: (E, K, M) or trans_w (E, M, K) (in a format: its blocks, read
            # through load_w), offsets, tiles: (E+1,) int64, code: activation (-1: none)
            # -> out: (N, M), swiglu: (N, M/2)
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
                                v = load_w(w, e, part * Mo + oc, k0 + kk)
                            else:
                                v = load_w(w, e, k0 + kk, part * Mo + oc)
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

    def sig(wt):
        return void(f[:, :], wt[:, :, :], boolean, int64[:], int64[:], int64, f[:, :])

    out = {
        "gemm": (make_gemm(False, load_float), sig(f)),
        "gemm_glu": (make_gemm(True, load_float), sig(f)),
        "gemm_dw": (gemm_dw_kernel, void(f[:, :], f[:, :], int64[:], f[:, :, :])),
    }
    if f == float32:
        for fmt, (load_w, wt) in LOADS.items():
            out[f"gemm_{fmt}"] = (make_gemm(False, load_w), sig(wt))
            out[f"gemm_glu_{fmt}"] = (make_gemm(True, load_w), sig(wt))
    return out


# the dtypes each kernel is launched with (tools/cuda_compile_check.py compiles them all):
# float32 and float64, but weights in a format with float32 only
LAUNCHED = {f"{g}_{fmt}": ("float32",) for fmt in LOADS for g in ("gemm", "gemm_glu")}
