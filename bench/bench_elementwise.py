"""The memory-bound CPU kernels — activations (forward and backward), softmax_topk, permute,
combine — timed on the CPU-performance presets, against this machine's memory floor measured in
the same run.

    python bench/bench_elementwise.py [--presets fine-128 mixtral-mini] [--threads 2]
                                      [--repeat 15] [--baseline DIR]

Each row: the best time of the kernel (outputs preallocated, so page faults of fresh output
buffers are not counted), the bytes it must read and write, its rate in GB/s, and "x floor":
time / (bytes / copy rate), the copy rate being a Numba copy of 64 MB with the same threads,
timed first in the same process. Bytes are each input and output array once (permute gathers
x k times). A kernel whose arrays fit in the last-level cache (32 MB here: permute and combine
on mixtral-mini move 25 MB) stays cached between repeats and can come out under 1.

With --baseline DIR (a source tree, e.g. an older commit unpacked with `git archive`), that
tree's kernels run in the same process on the same inputs, timed in alternating rounds with
this tree's, and "speedup" gives baseline time / this tree's time.

No BLAS call is made in this process: after an OpenBLAS call, Numba's threaded kernels pay a
few ms extra while OpenBLAS worker threads spin down, which would swamp these kernels.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np
from numba import njit, prange

import fastmoe_nb as fm
from fastmoe_nb.kernels.common import ACTIVATION_CODES
from fastmoe_nb.presets import get_preset


@njit(parallel=True, cache=True)
def _copy(src, dst):
    # src: (n,) -> dst: (n,), in blocks of 64K elements with unsigned indices (vector copies;
    # ~30% faster here than a prange over elements, ~2x np.copyto's single thread)
    n, B = src.shape[0], 1 << 16
    for b in prange((n + B - 1) // B):
        s, d = src[b * B:min(n, b * B + B)], dst[b * B:min(n, b * B + B)]
        for i in range(np.uint64(0), np.uint64(s.shape[0])):
            d[i] = s[i]


def best_seconds(fn, repeat):
    """The fastest of `repeat` calls after one untimed call. The minimum, not the median: on a
    shared 2-core machine a 2-thread kernel that loses a core to another job waits a
    scheduler time slice (~8 ms here), which is not the kernel's cost."""
    fn()
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_rate(repeat):
    """Bytes read + written per second by a threaded copy of 64 MB."""
    src = np.ones(16 << 20, np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_seconds(lambda: _copy(src, dst), repeat)


def load_baseline(tree):
    """The fastmoe_nb package of another source tree, imported as fastmoe_nb_baseline (its
    imports are relative, so it loads beside this tree's), with numba's cache off for it: a
    cache entry records the module name it was compiled under, so entries written under this
    alias would break that tree's own later imports (and its own entries would break here)."""
    from numba.core.caching import NullCache  # noqa: PLC0415
    from numba.core.dispatcher import Dispatcher  # noqa: PLC0415

    init = os.path.join(os.path.abspath(tree), "fastmoe_nb", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "fastmoe_nb_baseline", init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    for name, sub in list(sys.modules.items()):
        if name.startswith(spec.name):
            for obj in vars(sub).values():
                if isinstance(obj, Dispatcher):
                    obj._cache = NullCache()
    return mod


def cases(preset, rng, pkg):
    """[(name, callable, bytes read + written)] for one preset and one fastmoe_nb package
    (this tree's or a baseline's), inputs drawn from rng."""
    ka, kd, kr = pkg.kernels.cpu.activations, pkg.kernels.cpu.dispatch, pkg.kernels.cpu.routing
    T, d, h, E, k = preset.shape
    f32 = np.float32
    logits = rng.standard_normal((T, E)).astype(f32)
    r = fm.softmax_topk(logits, k)
    plan = fm.make_plan(r.experts, E)
    N = plan.num_rows
    x = rng.standard_normal((T, d)).astype(f32)
    xs = np.empty((N, d), f32)
    y = np.empty((T, d), f32)
    h2 = (2 * rng.standard_normal((N, 2 * h))).astype(f32)
    h1 = np.ascontiguousarray(h2[:, :h])
    dyh = rng.standard_normal((N, h)).astype(f32)
    act = np.empty((N, h), f32)
    dh2 = np.empty_like(h2)
    dh1 = np.empty_like(h1)
    w, ex = np.empty((T, k), f32), np.empty((T, k), np.int32)
    out = []
    for name in ("swiglu", "silu", "gelu_tanh"):
        code = ACTIVATION_CODES[name]
        hin, dh = (h2, dh2) if name == "swiglu" else (h1, dh1)
        out.append((f"{name} fwd", lambda hin=hin, code=code: ka.activate_kernel(hin, code, act),
                    hin.nbytes + act.nbytes))
        out.append((f"{name} bwd",
                    lambda hin=hin, code=code, dh=dh: ka.activate_backward_kernel(
                        dyh, hin, code, dh), dyh.nbytes + hin.nbytes + dh.nbytes))
    out.append(("softmax_topk", lambda: kr.softmax_topk_kernel(logits, k, True, w, ex),
                logits.nbytes + w.nbytes + ex.nbytes))
    out.append(("permute", lambda: kd.permute_kernel(x, plan.rows, k, xs),
                x.nbytes + plan.rows.nbytes + xs.nbytes))
    out.append(("combine", lambda: kd.combine_kernel(xs, plan.slots, r.weights, y),
                xs.nbytes + plan.slots.nbytes + r.weights.nbytes + y.nbytes))
    return out


def measure(presets, repeat, base_pkg=None):
    """Copy rate (bytes/s) and rows [preset, case, bytes, seconds, baseline seconds or None].
    With a baseline, the two kernels are timed in alternating rounds so that the load of a
    shared machine weighs on both alike."""
    rate = copy_rate(repeat)
    rows = []
    for name in presets:
        preset = get_preset(name)
        mine = cases(preset, np.random.default_rng(0), fm)
        theirs = cases(preset, np.random.default_rng(0), base_pkg) if base_pkg else None
        for i, (case, fn, nbytes) in enumerate(mine):
            fns = [fn] + ([theirs[i][1]] if theirs else [])
            best = [np.inf] * len(fns)
            for _ in range(3):   # rounds
                for m, f in enumerate(fns):
                    best[m] = min(best[m], best_seconds(f, max(1, repeat // 3)))
            rows.append([name, case, nbytes, best[0], best[1] if theirs else None])
    return rate, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["fine-128", "mixtral-mini"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--baseline", help="source tree whose kernels to time alongside")
    args = ap.parse_args(argv)
    import numba  # noqa: PLC0415
    numba.set_num_threads(args.threads)
    base = load_baseline(args.baseline) if args.baseline else None
    rate, rows = measure(args.presets, args.repeat, base)
    print(f"threads {args.threads}; copy rate {rate / 1e9:.1f} GB/s (read + write)")
    head = f"{'preset':<14}{'kernel':<15}{'MB':>7}{'ms':>9}{'GB/s':>7}{'x floor':>9}"
    print(head + (f"{'base ms':>9}{'speedup':>9}" if base else ""))
    for preset, case, nbytes, sec, bsec in rows:
        line = (f"{preset:<14}{case:<15}{nbytes / 1e6:>7.1f}{sec * 1e3:>9.3f}"
                f"{nbytes / sec / 1e9:>7.1f}{sec * rate / nbytes:>9.2f}")
        if base:
            line += f"{bsec * 1e3:>9.3f}{bsec / sec:>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
