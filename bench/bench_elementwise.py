"""The memory-bound CPU kernels — activations (forward and backward), softmax_topk, permute,
combine — on the CPU-performance presets, against a copy of the same bytes timed in the same
rounds: a configuration of the benchmark harness (fastmoe_nb.benchmark.kernels).

    python bench/bench_elementwise.py [--presets fine-128 mixtral-mini] [--threads 2]
                                      [--repeat 15] [--baseline DIR]

The kernels are called below the public ops with outputs preallocated, so neither validation
nor the page faults of fresh output buffers are counted; each is checked against reference.py
first. Bytes are each input and output array once (permute gathers x k times). The "copy"
line's time/ours is the kernel's distance from its floor (1.00x: at the copy's speed); a
kernel whose arrays fit in the last-level cache stays cached between calls, as does its copy.

With --baseline DIR (a source tree, e.g. an older commit unpacked with `git archive`), that
tree's kernels run in the same process on the same inputs, in the same rounds, and are
checked against reference.py too ("baseline tree"). Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import sys

from fastmoe_nb import baselines as bl
from fastmoe_nb import benchmark as bm
from fastmoe_nb.benchmark.kernels import cpu_kernel_cases, load_package
from fastmoe_nb.presets import get_preset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["fine-128", "mixtral-mini"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--baseline", metavar="DIR", help="source tree whose kernels to time "
                    "alongside")
    args = ap.parse_args(argv)
    other = load_package(args.baseline) if args.baseline else None
    rows = []
    with bl.thread_limits(args.threads):
        for name in args.presets:
            rows += bm.run_cases(cpu_kernel_cases(get_preset(name), other=other), args.repeat)
    print(f"threads {args.threads}, {args.repeat} interleaved rounds")
    bm.table(rows)
    return bm.exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
