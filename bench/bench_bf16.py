"""bf16 expert weights in the prefill layer: float32 weights, bf16 weights with float32
activations (exact: the default) and bf16 weights with bf16 activations (native vdpbf16ps
dot products, kernels/cpu/bf16dot.py, where the CPU has AVX512_BF16).

    python bench/bench_bf16.py [--presets mixtral-mini,deepseek-mini,fine-128] [--rounds 3]
                               [--threads 2]

A preset may name its token count: mixtral-mini:64 is mixtral-mini's layer at T = 64.

Each preset's layer (moe_forward, swiglu, softmax top-k over random router weights, weights
in the transposed (E, M, K) layout: trans_w=True) runs once per variant per round, the
variants interleaved within a round, so that the ratios compare times taken under the same
load. Before timing, the bf16 layers are checked against the float32 layer on bf16-rounded
weights: the exact one within float32 rounding, the native one within the rounding of its
activations to bf16 (see docs/formats.md). Columns: median ms over the rounds, best ms, and the
median over the float32 layer's median ("x f32" < 1: faster); err: max |y - y_f32| over
max |y_f32|, y_f32 the float32 layer on the unrounded weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# the checkout this script lies in, not an installed fastmoe_nb (a worktree has its own)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numba

import fastmoe_nb as fm
from fastmoe_nb import formats
from fastmoe_nb.kernels.cpu import bf16dot
from fastmoe_nb.presets import get_preset


def layer_inputs(p, rng):
    """x (T, d), router_w (d, E), w1 (E, 2h, d), w2 (E, d, h) float32 (trans_w layout)."""
    x = rng.standard_normal((p.tokens, p.d), dtype=np.float32)
    router_w = rng.standard_normal((p.d, p.experts), dtype=np.float32) / np.float32(p.d ** 0.5)
    w1 = rng.standard_normal((p.experts, p.h1, p.d), dtype=np.float32) / np.float32(p.d ** 0.5)
    w2 = rng.standard_normal((p.experts, p.d, p.h), dtype=np.float32) / np.float32(p.h ** 0.5)
    return x, router_w, w1, w2


def check(name, y, want, tol):
    """max |y - want| / max |want| <= tol, or SystemExit naming the variant."""
    err = float(np.abs(y - want).max() / np.abs(want).max())
    if not err <= tol:
        raise SystemExit(f"{name}: relative error {err:.3g} above {tol:.3g}")
    return err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="mixtral-mini,deepseek-mini,fine-128")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    numba.set_num_threads(args.threads)
    print(f"native bf16 dot products (AVX512_BF16): {bf16dot.NATIVE}; threads {args.threads}")
    rng = np.random.default_rng(0)
    for name in args.presets.split(","):
        base_name, _, tokens = name.partition(":")
        p = get_preset(base_name)
        if tokens:
            p = p.replace(tokens=int(tokens), name=name)
        x, router_w, w1, w2 = layer_inputs(p, rng)
        q1, q2 = formats.quantize(w1, "bf16"), formats.quantize(w2, "bf16")
        variants = {"f32": (w1, w2), "bf16": (q1, q2),
                    "bf16 native": (q1.with_activations("bf16"), q2.with_activations("bf16"))}

        def run(v, variants=variants, p=p, x=x, router_w=router_w):
            a, b = variants[v]
            return fm.moe_forward(x, router_w, a, b, p.k, activation=p.activation,
                                  trans_w=True, **p.router_kwargs())

        y32 = run("f32")
        r1, r2 = formats.dequantize(q1), formats.dequantize(q2)
        y_rounded = fm.moe_forward(x, router_w, r1, r2, p.k, activation=p.activation,
                                   trans_w=True, **p.router_kwargs())
        del r1, r2
        err = {"f32": 0.0}
        err["bf16"] = check("bf16", run("bf16"), y_rounded, 1e-4)
        check("bf16 native", run("bf16 native"), y_rounded, 2e-2)
        err["bf16"] = check("bf16", run("bf16"), y32, 5e-2)
        err["bf16 native"] = check("bf16 native", run("bf16 native"), y32, 5e-2)
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                t = time.perf_counter()
                run(v)
                times[v].append(time.perf_counter() - t)
        base = np.median(times["f32"])
        print(f"\n{p.name} (T, d, h, E, k) = {p.shape}, {p.flops() / 1e9:.0f} GFLOP")
        print(f"  {'weights':<12} {'ms':>8} {'best ms':>8} {'x f32':>6} {'err':>8}")
        for v, ts in times.items():
            med = np.median(ts)
            print(f"  {v:<12} {med * 1e3:8.1f} {min(ts) * 1e3:8.1f} {med / base:6.2f} "
                  f"{err[v]:8.1e}")


if __name__ == "__main__":
    main()
