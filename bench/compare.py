"""fastmoe_nb against its alternatives, side by side, from one run.

    python bench/compare.py [--threads 2] [--repeat 3] [--presets mixtral-mini,...] [--no-hf]
                            [--no-zipf] [--train]

Per preset (the CPU-performance presets of fastmoe_nb.presets, and Zipf-skewed routing for the
first three), on the same weights and tokens:

  grouped GEMM (the first expert GEMM, xs (N, d) @ w1 (E, d, 2h)): fastmoe_nb on raw weights
      (what moe_forward does: per-expert BLAS on the pool for large blocks, else the Numba
      kernel), the Numba kernel alone with weights packed once, a NumPy per-expert loop, a
      dense np.matmul of equal FLOPs -> GFLOP/s
  MoE layer (moe_forward, raw weights, so the per-call weight packing is included; and
      experts_forward alone with weights packed once):
      fastmoe_nb, a NumPy per-expert loop, a dense np.matmul of the layer's FLOPs, and HF
      transformers' Mixtral experts block ('eager', 'grouped_mm') when torch and
      transformers are installed (pip install 'fastmoe-nb[bench]') -> seconds
  decode: the bytes of the selected experts' weights over the read bandwidth (timed along
      with the layer).
  train (--train): forward + backward of the layer (moe_forward with return_context, then
      moe_backward with a random dy) against HF's block with 'grouped_mm' (forward, and
      backward of the sum) and a dense np.matmul of 3x the forward FLOPs -> seconds.

Timings are medians of --repeat calls. fastmoe_nb and the baselines it is divided by (dense
matmul, NumPy loop, read bandwidth) are timed interleaved, one call of each per round, each
after a pause and an untimed call (baselines.time_interleaved), so that the machine's drift
hits both sides of a ratio alike; HF's blocks after one warm-up, in a run of their own. The
first call of each kernel (compilation, or loading numba's cache) is reported apart, as is
the peak extra memory of moe_forward (tracemalloc) against the unavoidable activations
N*2h + N*d plus packed weights.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np

import fastmoe_nb as fm
from fastmoe_nb import baselines as bl
from fastmoe_nb.presets import CPU_PERF_PRESETS, get_preset

ZIPF_A = 1.2          # skew of the Zipf-routed variants (expert e gets ~ 1/(e+1)^1.2)


def med(fn, repeat):
    return float(np.median(bl.time_calls(fn, repeat)))


def meds(fns, repeat):
    """Medians of fns timed interleaved (baselines.time_interleaved) -> list of seconds."""
    return [float(t) for t in np.median(bl.time_interleaved(fns, repeat), axis=1)]


def first_layer_seconds():
    """Import fastmoe_nb and run a first small layer in a fresh process (numba cache warm
    after this process's calls) -> seconds."""
    code = ("import time; t = time.perf_counter(); import numpy as np, fastmoe_nb as fm; "
            "r = np.random.default_rng(0); x = r.standard_normal((64, 32), dtype=np.float32); "
            "fm.moe_forward(x, r.standard_normal((32, 4), dtype=np.float32), "
            "r.standard_normal((4, 32, 48), dtype=np.float32), "
            "r.standard_normal((4, 24, 32), dtype=np.float32), k=2); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    return float(out.stdout.strip().splitlines()[-1])


def run_preset(p, zipf, repeat, with_hf, train):
    T, d, h, E, k = p.shape
    inp = bl.layer_inputs(p, zipf=zipf)
    x, router_w, w1, w2 = inp["x"], inp["router_w"], inp["w1"], inp["w2"]
    kw = bl.layer_kwargs(p, inp)
    r = fm.softmax_topk(x @ router_w, k)
    plan = fm.make_plan(r.experts, E)
    xs = fm.permute(x, plan)
    N, off = plan.num_rows, plan.offsets
    row = {"preset": p.name + (f" zipf{ZIPF_A}" if zipf else ""), "N": N,
           "max/mean rows": float(plan.counts.max() / max(plan.counts.mean(), 1e-9))}

    # grouped GEMM: xs (N, d) @ w1 (E, d, 2h)
    t0 = time.perf_counter()
    pw1 = fm.pack_weights(w1, swiglu=True)
    row["pack s"] = time.perf_counter() - t0
    gflop = 2.0 * N * d * p.h1 / 1e9
    a_dense, b_dense = bl.dense_operands(N, d, p.h1)
    times = meds([lambda: fm.grouped_gemm(xs, w1, off), lambda: fm.grouped_gemm(xs, pw1, off),
                  lambda: bl.numpy_grouped_gemm(xs, w1, off), lambda: a_dense @ b_dense], repeat)
    for name, t in zip(("fm", "numba packed", "numpy", "dense"), times):
        row[f"gemm {name} GF/s"] = gflop / t
    row["gemm fm/dense"] = row["gemm fm GF/s"] / row["gemm dense GF/s"]
    del a_dense, b_dense

    # the layer
    layer = lambda: fm.moe_forward(x, router_w, w1, w2, **kw)   # noqa: E731
    a_dense, b_dense = bl.dense_operands(N, d, p.h1 + h)
    pw2 = fm.pack_weights(w2) if T > 64 else w2
    fns = [layer, lambda: bl.numpy_moe_forward(x, router_w, w1, w2, **kw),
           lambda: a_dense @ b_dense,
           lambda: fm.experts_forward(xs, pw1, pw2, off, p.activation)]
    if T <= 64:                      # decoding: the read bandwidth timed along with it
        probe, nbytes = bl.read_probe()
        fns.append(probe)
    times = meds(fns, repeat)
    for name, t in zip(("moe fm s", "moe numpy s", "moe dense s", "experts packed s"), times):
        row[name] = t
    read_s = times[4] if T <= 64 else None           # the probe's, after the four above
    del a_dense, b_dense, pw2
    row["moe fm/dense rate"] = row["moe dense s"] / row["moe fm s"]
    tracemalloc.start()
    layer()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    unavoidable = 4.0 * (N * p.h1 + N * d)
    packed = 4.0 * (pw1.panels.size + E * h * d)
    row["moe peak MiB"] = peak / 2**20
    row["peak/limit"] = peak / (1.2 * unavoidable + packed)     # target: <= 1
    if with_hf and bl.hf_supports(p) is None:
        for impl in bl.HF_IMPLEMENTATIONS:
            fwd, _ = bl.hf_mixtral_block(inp, k, impl)
            row[f"hf {impl} s"] = med(fwd, repeat)
        best = min(row["hf eager s"], row["hf grouped_mm s"])
        row["fm vs best hf"] = best / row["moe fm s"]
    if train:
        dy = np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype)

        def step():
            _, ctx = fm.moe_forward(x, router_w, w1, w2, return_context=True, **kw)
            return fm.moe_backward(dy, ctx)
        a_dense, b_dense = bl.dense_operands(N, d, 3 * (p.h1 + h))
        row["train fm s"], row["train dense s"] = meds([step, lambda: a_dense @ b_dense],
                                                      repeat)
        del a_dense, b_dense
        row["train fm/dense rate"] = row["train dense s"] / row["train fm s"]
        if with_hf and bl.hf_supports(p) is None:
            _, hf_step = bl.hf_mixtral_block(inp, k, "grouped_mm")
            row["train hf grouped_mm s"] = med(hf_step, repeat)
            row["train hf/fm"] = row["train hf grouped_mm s"] / row["train fm s"]
    if T <= 64:
        selected = np.unique(r.experts).size
        row["read GB/s"] = nbytes / read_s / 1e9
        floor = 4.0 * selected * d * (p.h1 + h) / (row["read GB/s"] * 1e9)
        row["decode floor s"] = floor
        row["decode fm/floor"] = row["moe fm s"] / floor
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--presets", default=",".join(CPU_PERF_PRESETS))
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-zipf", action="store_true", help="uniform routing only")
    ap.add_argument("--train", action="store_true",
                    help="also time forward + backward (issue #4's targets)")
    args = ap.parse_args(argv)
    ok, why = bl.hf_status()
    with_hf = ok and not args.no_hf
    print(f"threads {args.threads}; HF: {why if ok else 'skipped: ' + why}")
    with bl.thread_limits(args.threads):
        t0 = time.perf_counter()
        tiny = get_preset("mixtral-mini").replace(tokens=16, d=32, h=24, experts=4, k=2)
        ti = bl.layer_inputs(tiny)
        fm.moe_forward(ti["x"], ti["router_w"], ti["w1"], ti["w2"], k=2)
        fm.grouped_gemm_backward(ti["x"], ti["x"], ti["w1"][:, :, :32],
                                 np.array([0, 4, 8, 12, 16]))
        print(f"first calls (compile or cache load): {time.perf_counter() - t0:.2f} s; "
              f"import + first layer in a new process: {first_layer_seconds():.2f} s")
        print(f"read bandwidth {bl.read_bandwidth():.1f} GB/s, dense fp32 GEMM "
              f"{bl.matmul_rate():.1f} GFLOP/s")
        rows = []
        for name in args.presets.split(","):
            p = get_preset(name)
            for zipf in ([None, ZIPF_A] if p.tokens > 64 and not args.no_zipf else [None]):
                rows.append(run_preset(p, zipf, args.repeat, with_hf, args.train))
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in rows[-1].items()), flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float)
                                else str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
