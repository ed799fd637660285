"""Routers and balancing losses of fastmoe_nb.routing against the same maths in PyTorch (CPU),
written as HF transformers / DeepSpeed write it, and against the routers' NumPy spec, in one
process on the same data: a configuration of the benchmark harness (fastmoe_nb.benchmark).

    python bench/bench_routers.py [--tokens 4096] [--experts 64] [--k 2] [--threads 2]
                                  [--repeat 7]

Each case is checked against fastmoe_nb/routing/reference.py (float64) before it is timed;
"fwd+bwd" cases time the router and its gradient into the logits (torch: autograd), "fwd"
cases the forward alone. time/ours > 1: fastmoe_nb is faster. Exit status 1 when a check
fails (that case is not timed).
"""
from __future__ import annotations

import argparse
import sys

from fastmoe_nb import baselines as bl
from fastmoe_nb import benchmark as bm
from fastmoe_nb.benchmark.routers import router_cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args(argv)
    with bl.thread_limits(a.threads):
        cases, size = router_cases(a.tokens, a.experts, a.k)
        rows = bm.run_cases(cases, a.repeat)
    print(f"T={size['tokens']} E={size['experts']} k={size['k']} capacity={size['capacity']} "
          f"threads={a.threads} float32, {a.repeat} interleaved rounds")
    bm.table(rows)
    return bm.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
