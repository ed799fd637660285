"""Where weights in a format should leave the decoding GEMM for decoded panels and BLAS: the
break-even behind kernels/cpu/config.py's QSTREAM_ROWS.

    python bench/bench_quant_route.py [--formats q4_0,q8_0,bf16] [--rows 8,16,32,48,64]
                                      [--layouts mk,km] [--repeat 7]

One product of the Mixtral-like w1 (E = 8, d = 1024 -> 2h = 7168) with every expert holding
the same number of rows, run through backends/cpu.py's quantized_gemm twice: all experts
streamed (the decoding GEMM) and all experts on decoded panels (BLAS), in interleaved
rounds, the caches flushed before each call. Prints the median ms of both per row count;
QSTREAM_ROWS belongs where they cross.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# the checkout this script lies in, not an installed fastmoe_nb (a worktree has its own)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastmoe_nb import formats  # noqa: E402
from fastmoe_nb.backends import cpu as be  # noqa: E402

E, K, M = 8, 1024, 7168


def forced(stream):
    """A route() that sends every busy expert one way."""
    def route(offsets, packed=False, backward=False, quantized=False):
        busy = np.diff(offsets) > 0
        none = np.zeros_like(busy)
        return be.Route(False, busy if stream else none, none if stream else busy)
    return route


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", default="q4_0,q8_0,bf16")
    p.add_argument("--rows", default="8,16,32,48,64")
    p.add_argument("--layouts", default="mk,km")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    flush = np.ones(96 << 18, np.float32)
    fmts = args.formats.split(",")
    for layout in args.layouts.split(","):
        trans = layout == "mk"
        w = rng.standard_normal((E, M, K) if trans else (E, K, M), dtype=np.float32) * 0.03
        qs = {f: formats.quantize(w, f) for f in fmts}
        for rows in (int(r) for r in args.rows.split(",")):
            a = rng.standard_normal((E * rows, K), dtype=np.float32)
            off = np.arange(E + 1, dtype=np.int64) * rows
            times = {(f, s): [] for f in fmts for s in (True, False)}
            original = be.route
            try:
                for rnd in range(args.repeat + 1):        # round 0 compiles / warms up
                    for f, s in times:
                        be.route = forced(s)
                        flush.sum()
                        t = time.perf_counter()
                        be.quantized_gemm(a, qs[f], off, trans)
                        if rnd:
                            times[(f, s)].append(time.perf_counter() - t)
            finally:
                be.route = original
            print(f"{layout} rows {rows:3d}  " + "  ".join(
                f"{f}: stream {np.median(times[(f, True)]) * 1e3:6.1f} "
                f"panels {np.median(times[(f, False)]) * 1e3:6.1f} ms" for f in fmts), flush=True)


if __name__ == "__main__":
    main()
