"""q8_0 / q4_0 decoding with 8-bit activations (activations="q8_0", kernels/cpu/int8dot.py)
against the same weights with float32 activations, through moe_forward.

    python bench/bench_int8.py [--presets decode-1,decode-8,decode-64,deepseek-decode-8,
                                fine-decode-8] [--formats q8_0,q4_0] [--repeat 9]
                               [--compare ggml]

Each preset's layer (its float32 weights in the trans_w layout, quantized) runs with both
settings in interleaved rounds, the caches flushed before every call (timer.timed_cold), beside
a read of a large array and a dense float32 matmul: the ceilings of `fastmoe-nb bench
--weights`' floor, max(selected experts' bytes / read bandwidth, FLOPs / matmul rate). Prints
the median ms of each, int8 / float32 activations, time over the floor, and the layer's error
against the float32 activations' (relative RMS). --compare ggml adds ggml's MoE on the same
weights quantized by ggml, with its own 8-bit activations (fastmoe_nb.benchmark.ggml: the
`ggml` extra or FASTMOE_NB_LIBGGML_DIR), in the same rounds, and ours / ggml.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# the checkout this script lies in, not an installed fastmoe_nb (a worktree has its own)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastmoe_nb as fm  # noqa: E402
from fastmoe_nb import baselines as B  # noqa: E402
from fastmoe_nb import formats as F  # noqa: E402
from fastmoe_nb import presets as P  # noqa: E402
from fastmoe_nb.benchmark.timer import timed_cold  # noqa: E402
from fastmoe_nb.benchmark.weights import FLUSH_BYTES, READ_BYTES, rel_rms  # noqa: E402


def layer(name, formats, ggml=None, threads=2):
    p = P.PRESETS[name]
    host = B.layer_inputs(p, dtype=np.float32, seed=0)
    kw = dict(B.layer_kwargs(p, host), trans_w=True)
    x, rw = host["x"], host["router_w"]
    w1 = np.ascontiguousarray(host.pop("w1").transpose(0, 2, 1))
    w2 = np.ascontiguousarray(host.pop("w2").transpose(0, 2, 1))
    _, ctx = fm.moe_forward(x, rw, w1, w2, return_context=True, **kw)
    used = np.flatnonzero(np.asarray(ctx.plan.counts) > 0)
    T, d, h, E, k = p.shape
    flops = 2.0 * (T * d * E + ctx.plan.num_rows * d * (p.h1 + h))
    runs, info = [], {}
    for f in formats:
        q1, q2 = F.quantize(w1, f), F.quantize(w2, f)
        nbytes = sum(q.nbytes // E * len(used) for q in (q1, q2))
        for act in ("f32", "q8_0"):
            a1, a2 = q1.with_activations(act), q2.with_activations(act)
            runs.append(((f, act), lambda a1=a1, a2=a2: fm.moe_forward(x, rw, a1, a2, **kw)))
        info[f] = (nbytes, rel_rms(runs[-1][1](), runs[-2][1]()))
        if ggml is not None:
            g = ggml.GgmlExperts(w1, w2, f, threads)
            experts, weights = np.asarray(ctx.routing.experts), np.asarray(ctx.routing.weights)
            runs.append(((f, "ggml"), lambda g=g, e=experts, w=weights: g(x, e, w)))
    return runs, info, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(P.DECODE_PRESETS))
    ap.add_argument("--formats", default="q8_0,q4_0")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--compare", choices=["ggml"])
    a = ap.parse_args()
    formats = a.formats.split(",")
    ggml = None
    if a.compare:
        from fastmoe_nb.benchmark import ggml
        if not ggml.available():
            sys.exit("--compare ggml: no ggml library (pip install 'fastmoe-nb[ggml]', or set "
                     "FASTMOE_NB_LIBGGML_DIR to a libggml build)")
    flush, _ = B.read_probe(FLUSH_BYTES)
    read, read_bytes = B.read_probe(READ_BYTES)
    m, K, n = B.MATMUL_SHAPE
    ma, mb = B.dense_operands(m, K, n)
    mc = np.empty((m, n), np.float32)
    print(f"{'preset':18} {'format':6} {'f32 act ms':>10} {'q8_0 act ms':>11} {'ratio':>6} "
          f"{'x floor':>8} {'err vs f32 act':>14}" + ("  ggml ms  q8_0 act / ggml" if ggml else ""))
    for name in a.presets.split(","):
        runs, info, flops = layer(name, formats, ggml)
        probes = [("read", read), ("matmul", lambda: np.matmul(ma, mb, out=mc))]
        times = dict(zip([w for w, _ in runs + probes],
                         [t for t, _ in timed_cold(runs + probes, a.repeat, flush)]))
        bw = read_bytes / np.median(times["read"])
        rate = 2.0 * m * K * n / np.median(times["matmul"])
        for f in formats:
            nbytes, err = info[f]
            t32, t8 = np.median(times[(f, "f32")]), np.median(times[(f, "q8_0")])
            floor = max(nbytes / bw, flops / rate)
            vs = ""
            if ggml is not None:
                tg = np.median(times[(f, "ggml")])
                vs = f"  {tg * 1e3:7.3f}  {t8 / tg:6.2f}"
            print(f"{name:18} {f:6} {t32 * 1e3:10.3f} {t8 * 1e3:11.3f} {t8 / t32:6.2f} "
                  f"{t8 / floor:8.2f} {err:14.2e}{vs}")
        print(f"{'':18} ceilings: read {bw / 1e9:.1f} GB/s, matmul {rate / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
