"""The decoding GEMM on quantized expert weights (kernels/cpu/quant.py) against today's float32
stream kernel (backends/cpu.py run_stream), on decoding batches of the Mixtral-like shape.

    python bench/bench_quant.py [--tokens 1,8,64] [--layouts km,mk]
                                [--formats f32,bf16,q8_0,q4_0,q4_k,q6_k] [--repeat 5]
                                [--threads 2] [--moe]

Shape: d = 1024, h = 3584, E = 8, k = 2, uniform top-2 routing; w1 (E, d, 2h) (swiglu) and w2
(E, h, d), in the (K, M) layout ("km": out = x @ W, blocks along M) or the transposed one
("mk": (M, K), out = x @ W.T, blocks along K). A case is the expert products of one layer:
h1 = xs @ w1 over the experts with rows (xs gathered from x: the fused permute), and
ys = ha @ w2 with ha (N, h) a fixed array (the activation between them is left out: it is the
same for every format).

Every format's result is checked first against float64 products with the NumPy decoding of the
same bytes (blocks are random bytes with sane fp16 scales: the kernels decode any valid block;
q4_k / q6_k decoded by formats.py). Then all formats, a read of 512 MiB (the read bandwidth)
and a dense float32 matmul (the FLOP rate, BLAS at --threads) are timed in the same rounds;
before each timed call the last-level cache is flushed by a read of 96 MiB, so that the
weights come from memory as in a real model (q4_0 decode-1 weights would fit in L3).

Columns: ms (median of the rounds) and best ms (their minimum), MB (the selected experts'
weight bytes, scales included), fraction of read bw (their bytes / time over the read
bandwidth), floor = max(MB / read bandwidth, FLOPs / matmul rate) from the medians, x floor
(time over floor; the issue's target is <= 1.2) and the same from the best times, bandwidth
and rate (on a shared machine the medians carry the other tenants' load).

--moe times the whole layer instead, fm.moe_forward (softmax top-2 router, swiglu) with the
weights in each format, and for the formats the kernels decode also the NumPy path of
formats.py (the kernel-format table without that format: what backends/cpu.py did before
the kernels had it), in the same interleaved rounds, weights flushed from the caches before
each timed call; it reports each one's median and best ms and the speedup of the kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

# the checkout this script lies in, not an installed fastmoe_nb (a worktree has its own)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastmoe_nb as fm
from fastmoe_nb import baselines as bl
from fastmoe_nb import formats as F
from fastmoe_nb.backends import cpu as be
from fastmoe_nb.kernels.cpu import quant as kq

D, H, E, TOP_K = 1024, 3584, 8, 2
FLUSH_BYTES = 96 << 20
BW_BYTES = 512 << 20


# --------------------------------------------------------------------------- weights

# where a block's fp16 scales lie, and a divisor for them (q4_k: 6-bit codes times 16 levels
# of the scale and of the min; q6_k: int8 scales times 64 levels), so the values stay sane
SCALES = {"q8_0": ((0,), 1), "q4_0": ((0,), 1), "q4_k": ((0, 2), 64 * 8),
          "q6_k": ((208,), 64 * 32)}


def random_blocks(rng, fmt, E_, R, C):
    """Random valid weights of logical shape (E_, R, C) in format fmt: bf16 bits of N(0, 1/R)
    values; the block formats random q bytes with fp16 scales of size ~1/(16 sqrt(R)) (over
    SCALES' divisor)."""
    if fmt == "bf16":
        w = rng.standard_normal((E_, R, C), dtype=np.float32) / np.float32(np.sqrt(R))
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    nb = C // F.BLOCK[fmt]
    blocks = rng.integers(0, 256, (E_, R, nb, F.BLOCK_BYTES[fmt]), dtype=np.uint8)
    at, size = SCALES[fmt]
    for a in at:
        d = (rng.uniform(0.5, 1.5, (E_, R, nb)) / (16 * size * np.sqrt(R))).astype(np.float16)
        blocks[..., a:a + 2] = d.view(np.uint8).reshape(E_, R, nb, 2)
    return blocks.reshape(E_, R, -1)


def numpy_decode(blocks, fmt, C):
    """blocks of one expert (R, row bytes) -> (R, C) float64, by NumPy (formats.py's codec for
    the k-formats)."""
    if fmt == "bf16":
        return (blocks.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if fmt in ("q4_k", "q6_k"):
        return F.dequantize_rows(blocks, fmt).astype(np.float64)
    R = blocks.shape[0]
    b = blocks.reshape(R, C // kq.QK, -1)
    d = b[..., :2].copy().view(np.float16).astype(np.float64)
    if fmt == "q8_0":
        q = b[..., 2:].view(np.int8).astype(np.float64)
    else:
        q = np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], -1).astype(np.float64) - 8
    return (d * q).reshape(R, C)


def make_weights(rng, fmt, layout):
    """(w1, w2) in format fmt ('f32' or a quant format) and layout ('km' or 'mk')."""
    shapes = [(D, 2 * H), (H, D)]                    # (K, M) of the two products
    out = []
    for K, M in shapes:
        R, C = (M, K) if layout == "mk" else (K, M)
        if fmt == "f32":
            out.append(rng.standard_normal((E, R, C), dtype=np.float32) / np.float32(
                np.sqrt(K)))
        else:
            out.append(random_blocks(rng, fmt, E, R, C))
    return out


def nbytes_selected(w, used):
    return int(sum(w[e].nbytes for e in np.flatnonzero(used)))


# --------------------------------------------------------------------------- cases

def routing(rng, T):
    """Uniform top-2: -> (ridx (N,) int64 token of each row in expert order, offsets)."""
    experts = np.argsort(rng.random((T, E)), axis=1)[:, :TOP_K]
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return (order // TOP_K).astype(np.int64), offsets


def case(fmt, w1, w2, x, ha, ridx, offsets, trans):
    """fn() running both expert products -> ys (N, d); and h1 (N, 2h) it writes."""
    N = int(offsets[-1])
    used = np.diff(offsets) > 0
    h1 = np.empty((N, 2 * H), np.float32)
    ys = np.empty((N, D), np.float32)
    code = kq.FORMATS.get(fmt)

    def fn():
        if fmt == "f32":
            be.run_stream(x, w1, trans, offsets, h1, used, ridx)
            be.run_stream(ha, w2, trans, offsets, ys, used)
        else:
            kq.run_qstream(x, w1, code, trans, offsets, h1, used, ridx)
            kq.run_qstream(ha, w2, code, trans, offsets, ys, used)
        return ys
    return fn, h1


def check(fmt, fn, h1, w1, w2, x, ha, ridx, offsets, trans):
    """Max error of fn()'s products against float64 ones, relative to sum |terms|."""
    ys = fn()
    worst = 0.0
    for e in np.flatnonzero(np.diff(offsets)):
        lo, hi = offsets[e], offsets[e + 1]
        for w, a, got, (K, M) in ((w1, x[ridx[lo:hi]], h1[lo:hi], (D, 2 * H)),
                                  (w2, ha[lo:hi], ys[lo:hi], (H, D))):
            if fmt == "f32":
                we = w[e].astype(np.float64)
            else:
                we = numpy_decode(w[e], fmt, K if trans else M)
            B = we.T if trans else we                 # (K, M)
            a64 = a.astype(np.float64)
            want = a64 @ B
            scale = np.abs(a64) @ np.abs(B)
            worst = max(worst, float((np.abs(got - want) / np.maximum(scale, 1e-30)).max()))
    return worst


# --------------------------------------------------------------------------- the layer

def layer_weights(rng, fmt, layout):
    """(w1, w2) for fm.moe_forward: float32 arrays (f32) or QuantizedWeights."""
    trans = layout == "mk"
    out = []
    for K, M in ((D, 2 * H), (H, D)):
        shape = (E, M, K) if trans else (E, K, M)
        if fmt == "f32":
            out.append(rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(K)))
        else:
            out.append(F.from_blocks(random_blocks(rng, fmt, *shape), fmt, shape))
    return out


class numpy_path:
    """Within it, backends/cpu.py finds no kernel for `fmt` and decodes with formats.py's
    NumPy codec (what it did before quant.py had the format)."""

    def __init__(self, fmt):
        self.fmt, self.code = fmt, None

    def __enter__(self):
        self.code = kq.FORMATS.pop(self.fmt)

    def __exit__(self, *exc):
        kq.FORMATS[self.fmt] = self.code


def layer_call(x, router_w, w1, w2, trans, ctx):
    """fn() -> fm.moe_forward's y, run within the context ctx."""
    def fn():
        with ctx:
            return fm.moe_forward(x, router_w, w1, w2, TOP_K, trans_w=trans)
    return fn


def moe_main(args, formats, flush):
    """--moe: fm.moe_forward per format, kernels and (for their formats) the NumPy path."""
    rng = np.random.default_rng(1)
    print("| layout | T | format | path | ms | best ms | kernels' speedup (median, best) |")
    print("|---|---|---|---|---|---|---|")
    for layout in args.layouts.split(","):
        trans = layout == "mk"
        weights = {f: layer_weights(rng, f, layout) for f in formats}
        router_w = rng.standard_normal((D, E), dtype=np.float32) / np.float32(np.sqrt(D))
        for T in (int(t) for t in args.tokens.split(",")):
            x = rng.standard_normal((T, D), dtype=np.float32)
            cases = []
            for f in formats:
                paths = ["kernels"] + (["numpy"] if f in kq.FORMATS else [])
                for path in paths:
                    ctx = numpy_path(f) if path == "numpy" else contextlib.nullcontext()
                    cases.append((f, path, layer_call(x, router_w, *weights[f], trans, ctx)))
            ys = {(f, p): fn() for f, p, fn in cases}      # compile, and agree
            for f, p, _ in cases:
                if p == "numpy" and not np.allclose(ys[(f, p)], ys[(f, "kernels")],
                                                    rtol=1e-4, atol=1e-5):
                    print(f"CHECK FAILED {layout} T={T} {f}: kernels and NumPy path differ")
                    sys.exit(1)
            times = {(f, p): [] for f, p, _ in cases}
            bl.settle()
            for _ in range(args.repeat):
                for f, p, fn in cases:
                    fn()
                    flush()
                    t0 = time.perf_counter()
                    fn()
                    times[(f, p)].append(time.perf_counter() - t0)
            for f, p, _ in cases:
                t = times[(f, p)]
                extra = ""
                if p == "numpy":
                    k = times[(f, "kernels")]
                    extra = f"{np.median(t) / np.median(k):.1f}x, {np.min(t) / np.min(k):.1f}x"
                print(f"| {layout} | {T} | {f} | {p} | {np.median(t) * 1e3:.2f} | "
                      f"{np.min(t) * 1e3:.2f} | {extra} |", flush=True)


# --------------------------------------------------------------------------- timing

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--layouts", default="km,mk")
    ap.add_argument("--formats", default="f32,bf16,q8_0,q4_0")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--moe", action="store_true",
                    help="time fm.moe_forward, the kernels against formats.py's NumPy path")
    args = ap.parse_args()
    formats = args.formats.split(",")
    rng = np.random.default_rng(0)
    flush, _ = bl.read_probe(FLUSH_BYTES)
    if args.moe:
        with bl.thread_limits(args.threads):
            moe_main(args, formats, flush)
        return
    bw_fn, bw_bytes = bl.read_probe(BW_BYTES)
    ma, mb = bl.dense_operands(bl.MATMUL_SHAPE[0], bl.MATMUL_SHAPE[1], bl.MATMUL_SHAPE[2])
    mc = np.empty((ma.shape[0], mb.shape[1]), np.float32)
    mm_flops = 2.0 * ma.shape[0] * ma.shape[1] * mb.shape[1]

    rows = []
    with bl.thread_limits(args.threads):
        for layout in args.layouts.split(","):
            trans = layout == "mk"
            weights = {f: make_weights(rng, f, layout) for f in formats}
            for T in (int(t) for t in args.tokens.split(",")):
                x = rng.standard_normal((T, D), dtype=np.float32)
                ridx, offsets = routing(rng, T)
                ha = rng.standard_normal((int(offsets[-1]), H), dtype=np.float32)
                used = np.diff(offsets) > 0
                N = int(offsets[-1])
                flops = 2.0 * N * (D * 2 * H + H * D)
                fns, info = [], []
                for f in formats:
                    w1, w2 = weights[f]
                    fn, h1 = case(f, w1, w2, x, ha, ridx, offsets, trans)
                    t0 = time.perf_counter()
                    err = check(f, fn, h1, w1, w2, x, ha, ridx, offsets, trans)
                    first = time.perf_counter() - t0
                    if err > 1e-5:
                        print(f"CHECK FAILED {layout} T={T} {f}: error {err:.2e}")
                        sys.exit(1)
                    fns.append(fn)
                    info.append((f, nbytes_selected(w1, used) + nbytes_selected(w2, used),
                                 err, first))
                times = {j: [] for j in range(len(fns))}
                bw_t, mm_t = [], []
                for _ in range(args.repeat):
                    for j, fn in enumerate(fns):
                        bl.settle()                  # BLAS threads asleep (baselines.py)
                        fn()                         # wake numba's threads
                        flush()                      # weights out of the caches
                        t0 = time.perf_counter()
                        fn()
                        times[j].append(time.perf_counter() - t0)
                    bw_fn()
                    t0 = time.perf_counter()
                    bw_fn()
                    bw_t.append(time.perf_counter() - t0)
                    np.matmul(ma, mb, out=mc)
                    t0 = time.perf_counter()
                    np.matmul(ma, mb, out=mc)
                    mm_t.append(time.perf_counter() - t0)
                    bl.settle()                      # BLAS threads back to sleep
                bw, bw_best = bw_bytes / np.median(bw_t), bw_bytes / np.min(bw_t)
                rate, rate_best = mm_flops / np.median(mm_t), mm_flops / np.min(mm_t)
                for j, (f, nbytes, err, first) in enumerate(info):
                    t, t_best = float(np.median(times[j])), float(np.min(times[j]))
                    floor = max(nbytes / bw, flops / rate)
                    floor_best = max(nbytes / bw_best, flops / rate_best)
                    rows.append({"layout": layout, "T": T, "N": N, "fmt": f, "ms": t * 1e3,
                                 "best": t_best * 1e3, "mb": nbytes / 1e6,
                                 "frac": nbytes / t / bw, "floor": floor * 1e3,
                                 "x": t / floor, "x_best": t_best / floor_best,
                                 "bw": bw / 1e9, "rate": rate / 1e9})
                    print(f"{layout} T={T:3d} N={N:3d} {f:5s} {t * 1e3:8.3f} ms (best "
                          f"{t_best * 1e3:7.3f})  {nbytes / 1e6:6.1f} MB  bw "
                          f"{nbytes / t / bw:4.2f}  floor {floor * 1e3:7.3f} ms  x floor "
                          f"{t / floor:5.2f} (best {t_best / floor_best:5.2f})  err {err:.1e}  "
                          f"(read {bw / 1e9:.1f} GB/s, matmul {rate / 1e9:.0f} GFLOP/s, "
                          f"first call {first:.1f} s)", flush=True)

    print("\n| layout | T | format | ms | best ms | MB | fraction of read bw | floor ms "
          "| x floor | x floor (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['T']} | {r['fmt']} | {r['ms']:.2f} | {r['best']:.2f} | "
              f"{r['mb']:.1f} | {r['frac']:.2f} | {r['floor']:.2f} | {r['x']:.2f} | "
              f"{r['x_best']:.2f} |")
    print(f"read bandwidth {np.median([r['bw'] for r in rows]):.1f} GB/s, dense matmul "
          f"{np.median([r['rate'] for r in rows]):.0f} GFLOP/s ({args.threads} threads; "
          "medians of the rounds)")


if __name__ == "__main__":
    main()
