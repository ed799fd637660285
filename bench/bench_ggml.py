"""fastmoe_nb's routed experts against ggml's (llama.cpp's mul_mat_id MoE graph) on the same
weights, per format: the layer's error against the float32 layer, then the time, interleaved.

    python bench/bench_ggml.py [--presets decode-1,decode-8,decode-64] [--formats f32,bf16,q8_0,q4_0]
                               [--repeat 5] [--threads 2] [--accuracy-only | --no-accuracy]

Needs a ggml library (fastmoe_nb.benchmark.ggml: ggml-python, or FASTMOE_NB_LIBGGML_DIR).
Shape of every preset: d = 1024, h = 3584, E = 8, k = 2 (decode-1 / decode-8 / decode-64 /
mixtral-mini: T = 1 / 8 / 64 / 2048); w1 (E, 2h, d) and w2 (E, d, h) N(0, 1/d) and N(0, 1/h)
float32 (trans_w layout, GGUF's), x N(0, 1), uniform top-2 routing (two distinct experts drawn
uniformly per token, weights summing to 1).

fastmoe_nb: fm.routed_experts(x, experts, weights, formats.quantize(w1, fmt), ...,
trans_w=True) (float32 activations); ggml: GgmlExperts(w1, w2, fmt) (weights quantized by
ggml, activations rounded by its kernels). Both are bit-compatible with llama.cpp's
quantizers for f32 / bf16 / q8_0 / q4_0, so they run on the same weights.

Accuracy (decode-64's shape): relative Frobenius error ||y - y32|| / ||y32||, y32 the float32
layer (reference.routed_experts, float64 arithmetic, on w1 / w2 as given). Time: the
harness's interleaved timer (benchmark.timed: rounds of one sample of every implementation
and format in turn), "median (min) ms" of --repeat rounds, numba and ggml at --threads threads;
the weights stay in whatever cache holds them between calls, for both alike.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

# the checkout this script lies in, not an installed fastmoe_nb (a worktree has its own)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import fastmoe_nb as fm
from fastmoe_nb import formats, reference
from fastmoe_nb.benchmark import ggml, machine_info, timed
from fastmoe_nb.benchmark.timer import no_sync

D, H, E, TOP_K = 1024, 3584, 8, 2
TOKENS = {"decode-1": 1, "decode-8": 8, "decode-64": 64, "mixtral-mini": 2048}


def make_layer(rng, T):
    """(w1 (E, 2h, d), w2 (E, d, h), x (T, d), experts (T, k) int32, weights (T, k))."""
    w1 = (rng.standard_normal((E, 2 * H, D), dtype=np.float32) / np.float32(np.sqrt(D)))
    w2 = (rng.standard_normal((E, D, H), dtype=np.float32) / np.float32(np.sqrt(H)))
    x = rng.standard_normal((T, D), dtype=np.float32)
    experts = np.argsort(rng.random((T, E)), axis=1)[:, :TOP_K].astype(np.int32)
    weights = rng.random((T, TOP_K)).astype(np.float32) + np.float32(0.5)
    weights /= weights.sum(axis=1, keepdims=True)
    return w1, w2, x, experts, weights


def fastmoe_weights(w, fmt):
    return w if fmt == "f32" else formats.quantize(w, fmt)


def rel_err(y, ref):
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def accuracy(fmts, threads):
    """The layer's error per format, fastmoe_nb's and ggml's, on decode-64's shape."""
    w1, w2, x, experts, weights = make_layer(np.random.default_rng(0), TOKENS["decode-64"])
    y32 = reference.routed_experts(x.astype(np.float64), experts, weights.astype(np.float64),
                                   w1.astype(np.float64), w2.astype(np.float64), trans_w=True)
    print("| format | fastmoe_nb error | ggml error | ggml / fastmoe_nb |")
    print("|---|---|---|---|")
    for fmt in fmts:
        y_fm = fm.routed_experts(x, experts, weights, fastmoe_weights(w1, fmt),
                                 fastmoe_weights(w2, fmt), "swiglu", trans_w=True)
        layer = ggml.GgmlExperts(w1, w2, fmt, threads)
        e_fm, e_gg = rel_err(y_fm, y32), rel_err(layer(x, experts, weights), y32)
        layer.close()
        print(f"| {fmt} | {e_fm:.2e} | {e_gg:.2e} | {e_gg / e_fm:.1f} |", flush=True)


def timing(presets, fmts, threads, repeat):
    """Per preset: every format's fastmoe_nb and ggml call in the same interleaved rounds."""
    print("| preset (T, d, h, E, k) | " + " | ".join(
        f"fastmoe_nb {f} | ggml {f}" for f in fmts) + " |")
    print("|---|" + "---|---|" * len(fmts))
    for name in presets:
        T = TOKENS[name]
        w1, w2, x, experts, weights = make_layer(np.random.default_rng(1), T)
        runs, layers = [], []
        for fmt in fmts:
            q1, q2 = fastmoe_weights(w1, fmt), fastmoe_weights(w2, fmt)
            layer = ggml.GgmlExperts(w1, w2, fmt, threads)
            layers.append(layer)
            y_gg = layer(x, experts, weights)
            y_fm = fm.routed_experts(x, experts, weights, q1, q2, "swiglu", trans_w=True)
            # the two run the same weights: they differ by ggml's activation rounding only
            if rel_err(y_gg, y_fm.astype(np.float64)) > 0.05:
                raise SystemExit(f"{name} {fmt}: ggml and fastmoe_nb disagree")
            args = (x, experts, weights)
            runs.append((f"fastmoe_nb {fmt}", lambda a=args, q1=q1, q2=q2: fm.routed_experts(
                *a, q1, q2, "swiglu", trans_w=True), no_sync))
            runs.append((f"ggml {fmt}", lambda a=args, layer=layer: layer(*a), no_sync))
        times = [t for t, _ in timed(runs, repeat)]
        for layer in layers:
            layer.close()
        cells = " | ".join(f"{1e3 * np.median(t):.3g} ({1e3 * np.min(t):.3g}) ms" for t in times)
        print(f"| {name} ({T}, {D}, {H}, {E}, {TOP_K}) | {cells} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="decode-1,decode-8,decode-64")
    p.add_argument("--formats", default="f32,bf16,q8_0,q4_0")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--accuracy-only", action="store_true")
    g.add_argument("--no-accuracy", action="store_true")
    a = p.parse_args(argv)
    presets = [s for s in a.presets.split(",") if s]
    fmts = [s for s in a.formats.split(",") if s]
    for s in presets:
        if s not in TOKENS:
            p.error(f"--presets: expected names among {', '.join(TOKENS)}, got {s!r}")
    for s in fmts:
        if s not in ggml.FORMATS:
            p.error(f"--formats: expected names among {', '.join(ggml.FORMATS)}, got {s!r}")
    if not ggml.available():
        p.error("ggml is not available: pip install fastmoe-nb[ggml], or set "
                f"{ggml.ENV_DIR} to a libggml build")
    import numba
    numba.set_num_threads(a.threads)
    cpu = machine_info().get("cpu", {})
    print(f"cpu: {cpu.get('name')}, {cpu.get('logical_cores')} logical cores, "
          f"simd {cpu.get('simd')}; ggml: {ggml.library()}; threads {a.threads}")
    if not a.no_accuracy:
        accuracy(fmts, a.threads)
    if not a.accuracy_only:
        timing(presets, fmts, a.threads, a.repeat)


if __name__ == "__main__":
    main()
