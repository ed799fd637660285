"""One training step of a small HF Mixtral model, fastmoe_nb's experts against HF's: a
configuration of the benchmark harness (fastmoe_nb.benchmark.hf_model).

    python bench/hf_train_step.py                 # d=512, h=1024, E=8, k=2, 2 layers, T=1024
    python bench/hf_train_step.py --tokens 256 --repeat 3

The same model (same weights, same batch) runs forward, backward and an AdamW step with
experts_implementation "fastmoe_nb" (register_hf_experts()) and, beside it, those of --impl:
"eager" (HF's per-expert loop) and "grouped_mm" (torch's grouped GEMM). Before any step, the
fastmoe_nb model's logits and every parameter's gradient are checked against the eager
model's; then one warm-up step each, and the implementations take turns step by step, so a
shared machine's load hits all alike. time/ours > 1: fastmoe_nb's step is faster. Exit
status 1 when the check fails (nothing is timed).
"""
from __future__ import annotations

import argparse
import sys

import numba

from fastmoe_nb import benchmark as bm
from fastmoe_nb.benchmark.hf_model import HF_EXPERTS, train_step_case


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024, help="T = batch * seq")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--impl", nargs="*", default=list(HF_EXPERTS), choices=HF_EXPERTS,
                   help="HF experts implementations to time beside fastmoe_nb's")
    a = p.parse_args(argv)
    case, what = train_step_case(a.d, a.h, a.experts, a.k, a.layers, a.vocab, a.seq, a.tokens,
                                 a.impl)
    print(f"{what}, numba {numba.__version__}")
    rows = bm.run_cases({"train step": case}, a.repeat)
    print(f"numba threading layer: {numba.threading_layer()}")
    bm.table(rows)
    return bm.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
