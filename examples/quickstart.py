"""Build one MoE layer on random data, check it against the NumPy reference, time it.

    python examples/quickstart.py            # Mixtral-style: T=2048, d=1024, h=3584, E=8, k=2
    python examples/quickstart.py --small    # a few seconds anywhere
"""
import argparse
import time

import numpy as np

import fastmoe_nb as fm
from fastmoe_nb import reference as ref


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="T=256, d=256, h=512")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    T, d, h, E, k = (256, 256, 512, 8, 2) if a.small else (2048, 1024, 3584, 8, 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, d), dtype=np.float32)
    router_w = (rng.standard_normal((d, E), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    w1 = (rng.standard_normal((E, d, 2 * h), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((E, h, d), dtype=np.float32) / np.sqrt(h)).astype(np.float32)
    print(f"MoE layer, swiglu experts: T={T} d={d} h={h} E={E} k={k} (float32)")

    t0 = time.perf_counter()
    y, ctx = fm.moe_forward(x, router_w, w1, w2, k=k, activation="swiglu", return_context=True)
    first = time.perf_counter() - t0
    y_ref = ref.moe_forward(x, router_w, w1, w2, k=k, activation="swiglu")
    err = float(np.abs(y - y_ref).max() / np.abs(y_ref).max())
    print(f"max |y - reference| / max |reference| = {err:.2e}  "
          f"({'OK' if err < 1e-4 else 'MISMATCH'})")
    print(f"tokens per expert: {ctx.counts.tolist()}")

    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        fm.moe_forward(x, router_w, w1, w2, k=k, activation="swiglu")
        times.append(time.perf_counter() - t0)
    # the same FLOPs as one dense matmul: T*k rows through d -> 2h and h -> d
    flops = 2.0 * T * k * d * (2 * h) + 2.0 * T * k * h * d
    xa = rng.standard_normal((T * k, d), dtype=np.float32)
    wa = rng.standard_normal((d, 3 * h), dtype=np.float32)
    dense = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        xa @ wa
        dense.append(time.perf_counter() - t0)
    t, td = float(np.median(times)), float(np.median(dense))
    print(f"first call (compile included, or cache load): {first:.2f} s")
    print(f"moe_forward: {t * 1e3:.1f} ms  {flops / t / 1e9:.1f} GFLOP/s")
    print(f"numpy matmul of equal FLOPs ({T * k}x{d} @ {d}x{3 * h}): {td * 1e3:.1f} ms  "
          f"{flops / td / 1e9:.1f} GFLOP/s  -> moe_forward at {td / t:.0%} of its rate")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
