"""fastmoe_nb against its alternatives, side by side, from one run of the benchmark harness
(fastmoe_nb.benchmark, the one behind `fastmoe-nb bench`).

    python bench/compare.py [--threads 2] [--repeat 3] [--presets mixtral-mini,...] [--no-hf]
                            [--no-zipf] [--train] [--json PATH]

Per preset (the CPU-performance presets, and Zipf-skewed routing for those of more than 64
tokens), on the same weights and tokens, each case checked against reference.py first:

  grouped_gemm: the first expert GEMM xs (N, d) @ w1 on raw weights (what moe_forward does)
      against the Numba kernel on weights packed once, a NumPy per-expert loop and a dense
      np.matmul of equal FLOPs;
  layer: moe_forward against the NumPy loop, a dense np.matmul of the layer's FLOPs, the
      experts alone on packed weights, HF transformers' Mixtral block ('eager',
      'grouped_mm'; pip install 'fastmoe-nb[bench]') and, when decoding (64 tokens or
      fewer), the read floor: one read of the weights of the experts that got a token;
  train-step (--train): moe_forward(return_context=True) + moe_backward against a dense
      np.matmul of 3x the forward FLOPs and HF's block with 'grouped_mm'.

Every implementation of a case is timed in the same interleaved rounds (see `fastmoe-nb bench
--help`); time/ours is its median over fastmoe_nb's. Also printed: the first calls (compile
or cache load), import + first layer in a fresh process, and the layer's peak extra memory
(tracemalloc) over its limit, 1.2x the unavoidable activations N*2h + N*d plus the weights.
Exit status 1 when a check fails (that case is not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc

from fastmoe_nb import baselines as bl
from fastmoe_nb import benchmark as bm
from fastmoe_nb.presets import CPU_PERF_PRESETS, get_preset

ZIPF_A = 1.2          # skew of the Zipf-routed variants (expert e gets ~ 1/(e+1)^1.2)


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


def peak_over_limit(case, p, rows):
    """The layer's peak traced memory over 1.2x its activations plus its weights."""
    tracemalloc.start()
    case.run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / (1.2 * 4.0 * (rows * p.h1 + rows * p.d) + p.weight_bytes())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--presets", default=",".join(CPU_PERF_PRESETS))
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-zipf", action="store_true", help="uniform routing only")
    ap.add_argument("--train", action="store_true", help="also time forward + backward")
    ap.add_argument("--json", metavar="PATH", help="write the result rows as JSON")
    args = ap.parse_args(argv)
    hf = [] if args.no_hf else ["hf-eager", "hf-grouped_mm"]
    wanted = {"grouped_gemm": ["packed", "numpy", "dense"],
              "layer": ["numpy", "dense", "experts-packed", *hf],
              "train-step": ["dense", *hf[1:]]}
    rows, lines = [], []
    with bl.thread_limits(args.threads):
        t0 = time.perf_counter()
        tiny = get_preset("mixtral-mini").replace(tokens=16, d=32, h=24, experts=4, k=2)
        for op in ("layer", "train-step"):
            bm.make_case(op, tiny, "float32", bm.Host(), 0, None, 16).run()
        print(f"threads {args.threads}; first calls (compile or cache load): "
              f"{time.perf_counter() - t0:.2f} s; import + first layer in a new process: "
              f"{first_layer_seconds():.2f} s")
        machine = bm.measure_machine("float32", args.threads)
        print(f"machine: dense fp32 GEMM {machine['matmul_gflops']:.1f} GFLOP/s, read "
              f"{machine['read_gbs']:.1f} GB/s", flush=True)
        for name in args.presets.split(","):
            p = get_preset(name)
            for zipf in ([None, ZIPF_A] if p.tokens > 64 and not args.no_zipf else [None]):
                for op in ["grouped_gemm", "layer"] + (["train-step"] if args.train else []):
                    label = f"{p.name}{f' zipf{ZIPF_A}' if zipf else ''} {op}"
                    case = bm.make_case(op, p, "float32", bm.Host(), 0, zipf, 1024)
                    names = wanted[op] + (["read-floor"] if op == "layer" and p.tokens <= 64
                                          else [])
                    rows += bm.run_cases({label: case}, args.repeat, names, machine=machine)
                    if op == "layer" and rows[-1]["correct"]:
                        lines.append(f"{label}: peak memory / limit "
                                     f"{peak_over_limit(case, p, case.routing['rows']):.3f}")
                    print(f"{label}: done", file=sys.stderr, flush=True)
    print()
    bm.table(rows)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": bm.versions(), "machine": machine, "results": rows}, f,
                      indent=1)
    return bm.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
