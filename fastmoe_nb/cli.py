"""The `fastmoe-nb` command: benchmarks a user can trust, and what the machine has.

    fastmoe-nb bench                      # the MoE layer on the mixtral-mini preset
    fastmoe-nb bench grouped_gemm --preset fine-128 --compare --json out.json
    fastmoe-nb bench --tokens 64 --d 32 --h 64 --experts 4 --k 2 --skew zipf:1.2
    fastmoe-nb bench --sweep tokens=256,1024,4096 --compare --plot sweep.png
    fastmoe-nb info                       # versions, threads, BLAS, CPU, CUDA, numba cache
    fastmoe-nb presets                    # the named shapes

Every bench first checks the op against reference.py on the same inputs and refuses to time a
wrong result (exit status 1). Then it reports the first call apart (compile or cache load),
median / min / max of --repeat calls, GFLOP/s and GB/s, and the fraction of the machine's
ceiling measured in the same run: the dense-matmul rate for compute-bound ops, the read
bandwidth for memory-bound ones (whichever the op's FLOPs per byte says, roofline style).
Bad input (an unknown op or preset, inconsistent shapes, a missing optional dependency) is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

EXIT_OK, EXIT_WRONG, EXIT_USAGE = 0, 1, 2
OPS = ("layer", "grouped_gemm", "permute", "combine", "route", "train-step")
BENCH_ROUTERS = ("softmax_topk", "sigmoid_topk")
SWEEP_KEYS = ("tokens", "d", "h", "experts", "k", "threads")
BASELINES = ("numpy", "dense", "hf-eager", "hf-grouped_mm")
SCHEMA = "fastmoe-nb-bench/1"
# the correctness gate: max |got - reference| / max |reference| (10x looser than the tests)
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


# --------------------------------------------------------------------------- arguments

def _positive(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {s!r}")
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name}: expected a positive integer, got {v}")
        return v
    return parse


def _skew(s):
    """'zipf:A' -> A (a finite number >= 0)."""
    kind, _, a = s.partition(":")
    try:
        v = float(a)
    except ValueError:
        v = float("nan")
    if kind != "zipf" or not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"--skew: expected zipf:A with A >= 0 (e.g. zipf:1.2), "
                                         f"got {s!r}")
    return v


def _sweep(s):
    """'tokens=256,1024' -> ('tokens', [256, 1024])."""
    key, _, vals = s.partition("=")
    if key not in SWEEP_KEYS:
        raise argparse.ArgumentTypeError(f"--sweep: expected one of {', '.join(SWEEP_KEYS)} "
                                         f"before '=', got {s!r}")
    try:
        values = [int(v) for v in vals.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--sweep: expected {key}=N1,N2,... positive "
                                         f"integers, got {s!r}")
    return key, values


def _compare(s):
    """'all' or a comma list of BASELINES ('hf' is both HF implementations)."""
    groups = {"all": list(BASELINES), "hf": ["hf-eager", "hf-grouped_mm"]}
    names = []
    for n in s.split(","):
        if n not in BASELINES and n not in groups:
            raise argparse.ArgumentTypeError(f"--compare: expected all, hf or a list of "
                                             f"{', '.join(BASELINES)}, got {n!r}")
        names += groups.get(n, [n])
    return {"explicit": s != "all", "names": list(dict.fromkeys(names))}


def build_parser():
    from .presets import DEFAULT_PRESET  # noqa: PLC0415

    p = _Parser(prog="fastmoe-nb", description="fastmoe_nb benchmarks and machine facts.")
    sub = p.add_subparsers(dest="command", metavar="{bench,info,presets}")
    sub.required = True

    b = sub.add_parser("bench", help="check an op against reference.py, then time it",
                       description=__doc__.split("\n\n")[2])
    b.add_argument("op", nargs="?", default="layer", choices=OPS,
                   help="what to time (default: layer, the whole moe_forward)")
    b.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"named shape and options (default {DEFAULT_PRESET}; see "
                        "'fastmoe-nb presets')")
    for flag, name in (("--tokens", "T"), ("--d", "d"), ("--h", "h"), ("--experts", "E"),
                       ("--k", "k")):
        b.add_argument(flag, type=_positive(flag), metavar=name,
                       help=f"override the preset's {name}")
    b.add_argument("--activation", help="override the preset's expert activation")
    b.add_argument("--router", help="override the preset's router (softmax_topk, sigmoid_topk)")
    b.add_argument("--skew", type=_skew, metavar="zipf:A",
                   help="imbalanced routing: expert e gets about a share 1/(e+1)^A")
    b.add_argument("--threads", type=_positive("--threads"), help="numba and BLAS threads")
    b.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    b.add_argument("--backend", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--repeat", type=_positive("--repeat"), default=5, help="timed calls")
    b.add_argument("--check-tokens", type=_positive("--check-tokens"), default=1024,
                   metavar="N", help="tokens (rows) checked against reference.py (default 1024)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", metavar="PATH", help="write the results as JSON")
    b.add_argument("--plot", metavar="PATH", help="a PNG of the sweep (needs matplotlib)")
    b.add_argument("--sweep", type=_sweep, metavar="KEY=V1,V2,..",
                   help=f"run once per value of one of {', '.join(SWEEP_KEYS)}")
    b.add_argument("--compare", type=_compare, nargs="?", const="all", metavar="LIST",
                   help="also time the baselines, in the same run: all (default) or some of "
                        f"{', '.join(BASELINES)}, hf")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="versions, threads, BLAS, CPU features, CUDA, numba cache")
    i.add_argument("--json", metavar="PATH", help="write the facts as JSON")
    sub.add_parser("presets", help="list the named shapes")
    return p


# --------------------------------------------------------------------------- the config

def resolve_preset(args, **override):
    """The Preset a bench runs: --preset, then the shape flags, then a sweep value."""
    from . import presets as P  # noqa: PLC0415
    from .ops.activations import ACTIVATIONS  # noqa: PLC0415
    from .ops.routing import check_sigmoid_options  # noqa: PLC0415

    try:
        p = P.get_preset(args.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    changes = {f: getattr(args, f) for f in ("tokens", "d", "h", "experts", "k", "activation",
                                             "router") if getattr(args, f) is not None}
    changes.update({f: v for f, v in override.items() if f != "threads"})
    if "activation" in changes and changes["activation"] not in ACTIVATIONS:
        raise UsageError(f"--activation: expected one of {', '.join(ACTIVATIONS)}, "
                         f"got {changes['activation']!r}")
    if "router" in changes:
        if changes["router"] not in BENCH_ROUTERS:
            raise UsageError(f"--router: expected one of {', '.join(BENCH_ROUTERS)} (the "
                             f"routers reference.py specifies), "
                             f"got {changes['router']!r}")
        if changes["router"] != p.router:   # another router: its default options
            changes.update(n_group=1, topk_group=1, scale=1.0)
    p = p.replace(**changes)
    if p.k > p.experts:
        raise UsageError(f"--k: expected 1..E = 1..{p.experts} (experts per token cannot "
                         f"exceed the experts), got {p.k}")
    if p.router == "sigmoid_topk":
        try:
            check_sigmoid_options(p.experts, p.k, None, p.n_group, p.topk_group, p.scale,
                                  np.float32)
        except ValueError as e:
            raise UsageError(f"preset {args.preset} with E={p.experts}, k={p.k}: {e}") from None
    return p


def _memory_available():
    """Bytes of memory available now (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(p, dtype, op, compare):
    """A one-line UsageError when the op's arrays cannot fit in the host's memory."""
    item = np.dtype(dtype).itemsize
    rows = p.tokens * p.k
    need = item * (p.experts * p.d * (p.h1 + p.h) + rows * (2 * p.d + p.h1 + p.h)
                   + 3 * p.tokens * p.d)
    need *= 3 if op == "train-step" else 1          # weight gradients, saved activations
    need += 8 * p.d * (p.h1 + p.h) * 2               # the reference's float64 expert copies
    need *= 2 if compare else 1                      # HF holds its own copy of the weights
    have = _memory_available()
    if have is not None and need > 0.8 * have:
        raise UsageError(f"preset {p.name} (T={p.tokens}, d={p.d}, h={p.h}, E={p.experts}) "
                         f"needs about {need / 1e9:.1f} GB for '{op}', {have / 1e9:.1f} GB are "
                         f"available: use its -laptop preset or smaller --tokens/--d/--h")


# --------------------------------------------------------------------------- backends

class _Host:
    name = "cpu"

    @staticmethod
    def to_dev(a):
        return a

    @staticmethod
    def to_host(a):
        return a

    @staticmethod
    def sync():
        pass


class _Cuda:
    name = "cuda"

    def __init__(self):
        from .backend import cuda_module  # noqa: PLC0415

        try:
            cuda_module()
            from numba import cuda  # noqa: PLC0415
        except (RuntimeError, ImportError) as e:
            raise UsageError(f"--backend cuda: {e}") from None
        self.cuda = cuda

    def to_dev(self, a):
        return self.cuda.to_device(a) if isinstance(a, np.ndarray) else a

    @staticmethod
    def to_host(a):
        return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)

    def sync(self):
        self.cuda.synchronize()


def _plan_to_host(plan, be):
    from .types import Plan  # noqa: PLC0415

    return Plan(*[be.to_host(f) if hasattr(f, "shape") else f for f in plan])


# --------------------------------------------------------------------------- the ops

@dataclass
class Baseline:
    """Another implementation of a Case: run() -> host outputs; check(outputs) -> max rel err
    against reference.py, or None; flops / nbytes when they differ from the Case's."""

    run: Callable
    check: Optional[Callable] = None
    flops: Optional[float] = None
    nbytes: Optional[float] = None


@dataclass
class Case:
    """One op on one shape, ready to run.

    run() -> outputs (host or device); check(outputs) -> (max rel err, what was checked);
    flops / nbytes: the work and the minimal memory traffic of one call; baselines: name ->
    a factory giving a Baseline (or a str saying why it cannot run: built only when asked
    for), or a str saying why it does not apply."""

    run: Callable
    check: Callable
    flops: float
    nbytes: float
    baselines: dict = field(default_factory=dict)
    routing: Optional[dict] = None


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def _routing_stats(plan):
    counts = np.asarray(plan.counts)
    mean = counts.mean() if counts.size else 0.0
    return {"rows": int(plan.num_rows), "dropped": int(np.asarray(plan.dropped).sum()),
            "max_over_mean": float(counts.max() / mean) if mean else None,
            "empty_experts": int((counts == 0).sum())}


def _sample_rows(offsets, per_expert):
    """Up to per_expert leading rows of every expert -> (row ids, their offsets (E+1,))."""
    offsets = np.asarray(offsets, np.int64)
    take = np.minimum(np.diff(offsets), per_expert)
    ids = np.concatenate([np.arange(lo, lo + n) for lo, n in zip(offsets[:-1], take)]
                         or [np.zeros(0, np.int64)])
    return ids.astype(np.int64), np.concatenate([[0], np.cumsum(take)]).astype(np.int64)


def make_case(op, p, dtype, be, seed, skew, check_tokens):
    """Inputs, the timed call, its reference check and its baselines for one op."""
    import fastmoe_nb as fm  # noqa: PLC0415

    from . import baselines as B  # noqa: PLC0415
    from . import reference as ref  # noqa: PLC0415

    host = B.layer_inputs(p, dtype=dtype, seed=seed, zipf=skew)
    kw = B.layer_kwargs(p, host)
    item = np.dtype(dtype).itemsize
    T, d, h, E, k = p.shape
    dev = {n: be.to_dev(a) for n, a in host.items()}
    dkw = {n: (dev[n] if n in dev else v) for n, v in kw.items()}
    x, router_w, w1, w2 = (host[n] for n in ("x", "router_w", "w1", "w2"))

    # the routing every op works from (our kernels; the reference checks them in 'route')
    logits = x @ router_w
    rkw = {n: dkw[n] for n in ("renormalize", "bias", "n_group", "topk_group", "scale")
           if n in dkw}
    router = getattr(fm, p.router)
    r = router(be.to_dev(logits), k, **rkw)
    plan = fm.make_plan(r.experts, E, p.capacity())
    hplan = _plan_to_host(plan, be)
    hweights = be.to_host(r.weights)
    stats = _routing_stats(hplan)
    N = hplan.num_rows
    used = int((np.asarray(hplan.counts) > 0).sum())
    hs = p.shared_h
    hs1 = (2 * hs if p.activation == "swiglu" else hs)
    layer_flops = 2.0 * (T * d * E + N * d * (p.h1 + h) + T * d * (hs1 + hs))
    layer_bytes = item * (2 * T * d + d * E + used * d * (p.h1 + h) + d * (hs1 + hs))

    if op in ("layer", "train-step"):
        P = min(T, check_tokens)
        args = (dev["x"], dev["router_w"], dev["w1"], dev["w2"])

        def hf(impl, train, check):   # why HF cannot run this, or its Baseline
            why = B.hf_supports(p)
            if why is None and dtype != "float32":
                why = "the HF comparison runs in float32 only"
            if why is None and be.name != "cpu":
                why = "the HF comparison runs with the CPU backend only"
            if why is None:
                ok, status = B.hf_status()
                why = None if ok else status
            return why or _hf(host, k, impl, train, check)

        if op == "layer":
            def check(out):
                y_ref = ref.moe_forward(x[:P], router_w, w1, w2, **kw)
                return _rel_err(be.to_host(out)[:P], y_ref), f"y of the first {P} tokens"

            def numpy_check(out):
                return _rel_err(out[:P], ref.moe_forward(x[:P], router_w, w1, w2, **kw))

            rows = T * k
            bl = {"numpy": lambda: Baseline(
                      lambda: B.numpy_moe_forward(x, router_w, w1, w2, **kw), numpy_check),
                  "dense": lambda: _dense(rows, d, layer_flops, dtype, seed),
                  "hf-eager": lambda: hf("eager", False, numpy_check),
                  "hf-grouped_mm": lambda: hf("grouped_mm", False, numpy_check)}
            return Case(lambda: fm.moe_forward(*args, **dkw), check, layer_flops, layer_bytes,
                        bl, stats)

        if not hasattr(fm, "moe_backward"):
            raise UsageError("train-step: this build of fastmoe_nb has no moe_backward")
        dy_host = np.random.default_rng(seed + 1).standard_normal((T, d)).astype(dtype)
        dy = be.to_dev(dy_host)

        def step(xx=args[0], dyy=dy):
            _, ctx = fm.moe_forward(xx, *args[1:], return_context=True, **dkw)
            return fm.moe_backward(dyy, ctx)

        def check(out):
            if P < T:   # gradients sum over tokens: check a prefix batch on its own
                out = step(be.to_dev(x[:P]), be.to_dev(dy_host[:P]))
            dx, grads = out
            dx_ref, g_ref = ref.moe_backward(dy_host[:P], x[:P], router_w, w1, w2, **kw)
            errs = [_rel_err(be.to_host(dx), dx_ref)]
            errs += [_rel_err(be.to_host(grads[n]), g_ref[n]) for n in g_ref]
            return max(errs), f"dx and {len(g_ref)} weight gradients ({P} tokens)"

        bl = {"numpy": "no NumPy backward to compare with",
              "dense": lambda: _dense(T * k, d, 3 * layer_flops, dtype, seed),
              "hf-eager": lambda: hf("eager", True, None),
              "hf-grouped_mm": lambda: hf("grouped_mm", True, None)}
        return Case(step, check, 3 * layer_flops, 3 * layer_bytes, bl, stats)

    if op == "grouped_gemm":
        xs_host = ref.permute(x, hplan)
        xs = be.to_dev(xs_host)
        offsets = hplan.offsets

        def check(out):
            ids, offs = _sample_rows(offsets, max(1, -(-check_tokens // max(used, 1))))
            want = ref.grouped_gemm(xs_host[ids], w1, offs)
            return _rel_err(be.to_host(out)[ids], want), f"{ids.size} rows across all experts"

        flops = 2.0 * N * d * p.h1
        nbytes = item * (N * d + N * p.h1 + used * d * p.h1)
        bl = {"numpy": lambda: Baseline(lambda: B.numpy_grouped_gemm(xs_host, w1, offsets)),
              "dense": lambda: _dense(N, d, flops, dtype, seed)}
        return Case(lambda: fm.grouped_gemm(xs, dev["w1"], be.to_dev(offsets)), check, flops,
                    nbytes, bl, stats)

    if op == "permute":
        xd = dev["x"]

        def check(out):
            return (0.0 if np.array_equal(be.to_host(out), ref.permute(x, hplan))
                    else float("inf")), f"all {N} rows, exactly"

        return Case(lambda: fm.permute(xd, plan), check, 0.0, item * 2 * N * d + 4 * N,
                    {"numpy": lambda: Baseline(lambda: ref.permute(x, hplan))}, stats)

    if op == "combine":
        ys_host = ref.permute(x, hplan)
        ys = be.to_dev(ys_host)

        def check(out):
            return _rel_err(be.to_host(out), ref.combine(ys_host, hplan, hweights)), \
                f"all {T} tokens"

        return Case(lambda: fm.combine(ys, plan, r.weights), check, 2.0 * N * d,
                    item * (N * d + T * d + T * k) + 4 * T * k,
                    {"numpy": lambda: Baseline(lambda: ref.combine(ys_host, hplan, hweights))},
                    stats)

    # route: the router on (T, E) logits
    ld = be.to_dev(logits)
    hkw = {n: kw[n] for n in rkw}
    ref_router = getattr(ref, p.router)

    def check(out):
        want = ref_router(logits, k, **hkw)
        if not np.array_equal(be.to_host(out.experts), want.experts):
            return float("inf"), "expert ids differ"
        return _rel_err(be.to_host(out.weights), want.weights), f"all {T} tokens' experts " \
            "(exactly) and weights"

    return Case(lambda: router(ld, k, **rkw), check, 0.0,
                item * T * E + T * k * (item + 4),
                {"numpy": lambda: Baseline(lambda: ref_router(logits, k, **hkw))}, stats)


def _dense(rows, K, flops, dtype, seed):
    """The dense-matmul baseline: (rows, K) @ (K, M) with M chosen for the same FLOPs."""
    from . import baselines as B  # noqa: PLC0415

    rows = max(rows, 1)
    M = max(1, round(flops / (2.0 * rows * K)))
    a, b = B.dense_operands(rows, K, M, dtype, seed)
    out = np.empty((rows, M), a.dtype)
    return Baseline(lambda: np.matmul(a, b, out=out), flops=2.0 * rows * K * M,
                    nbytes=a.itemsize * (rows * K + K * M + rows * M))


def _hf(host, k, impl, train, check):
    """HF's Mixtral block, forward or forward + backward."""
    from . import baselines as B  # noqa: PLC0415

    fwd, step = B.hf_mixtral_block(host, k, impl)
    return Baseline(step if train else fwd, check)


# --------------------------------------------------------------------------- running

class _Progress:
    """tqdm on stderr when installed and stderr is a terminal; otherwise silent."""

    def __init__(self, total, quiet):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # noqa: PLC0415

                self.bar = tqdm(total=total, file=sys.stderr, unit="call", leave=False)
            except ImportError:
                pass

    def step(self, what):
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _stats(timed):
    times, n = timed
    return {"times_s": [float(t) for t in times], "calls_per_sample": n,
            "median_s": float(np.median(times)), "min_s": float(np.min(times)),
            "max_s": float(np.max(times))}


MIN_SAMPLE_S = 2e-3   # calls faster than this are timed in groups (the clock's noise)


def _timed(runs, repeat, progress):
    """runs: [(what, fn, sync)] -> [((repeat,) seconds per call, n)] in the same order.
    A sample times n calls of fn (and one sync), n chosen per fn from a call timed after
    baselines.settle() so that a sample lasts MIN_SAMPLE_S or more. The samples are taken
    in rounds, each round one sample of every fn in turn, each after the pause and one
    untimed sample (baselines.time_interleaved): the machine's drift over the run then
    hits fastmoe_nb and its baselines alike, and their ratios do not depend on which of
    them ran while a neighbour was busy."""
    from .baselines import settle, time_interleaved  # noqa: PLC0415

    samples, counts = [], []
    for _, fn, sync in runs:
        settle()
        t0 = time.perf_counter()
        fn()
        sync()
        n = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))

        def sample(fn=fn, sync=sync, n=n):
            for _ in range(n):
                fn()
            sync()

        samples.append(sample)
        counts.append(n)
    t = time_interleaved(samples, repeat, after=lambda j: progress.step(runs[j][0]))
    return [(t[j] / n, n) for j, n in enumerate(counts)]


def _rates(entry, flops, nbytes, machine, cpu):
    t = entry["median_s"]
    entry["gflops"] = flops / t / 1e9 if flops and t > 0 else None
    entry["gbs"] = nbytes / t / 1e9 if t > 0 else None
    if machine and cpu:
        compute = flops > 0 and flops / nbytes > machine["matmul_gflops"] / machine["read_gbs"]
        entry["bound"] = "compute" if compute else "memory"
        entry["fraction_of_peak"] = (entry["gflops"] / machine["matmul_gflops"] if compute
                                     else entry["gbs"] / machine["read_gbs"])
    else:
        entry["bound"], entry["fraction_of_peak"] = None, None


def bench_one(args, op, p, be, threads, machine, compare):
    """Check, then time one op (and its baselines) -> the result dict."""
    from .baselines import thread_limits  # noqa: PLC0415

    res = {"op": op, "preset": args.preset, "name": p.name, "description": p.description,
           "shape": {"tokens": p.tokens, "d": p.d, "h": p.h, "experts": p.experts, "k": p.k},
           "activation": p.activation, "router": p.router, "router_options":
           {n: v for n, v in p.router_kwargs().items() if n != "router"},
           "capacity": p.capacity(), "shared_h": p.shared_h, "dtype": args.dtype,
           "backend": be.name, "threads": threads,
           "skew": None if args.skew is None else f"zipf:{args.skew:g}"}
    with thread_limits(threads):
        case = make_case(op, p, args.dtype, be, args.seed, args.skew, args.check_tokens)
        res["routing"] = case.routing
        res["flops"], res["bytes"] = case.flops, case.nbytes
        wanted = {}   # name -> Baseline, or why it cannot run; built only when asked for
        for name in compare["names"] if compare else []:
            b = case.baselines.get(name, f"does not apply to '{op}'")
            b = b if isinstance(b, str) else b()
            if compare["explicit"] and isinstance(b, str):
                raise UsageError(f"--compare {name}: {b}")
            if isinstance(b, Baseline) or name in case.baselines:
                wanted[name] = b
        total = 2 + args.repeat + sum(1 + args.repeat for b in wanted.values()
                                      if isinstance(b, Baseline))
        progress = _Progress(total, args.quiet)
        try:
            t0 = time.perf_counter()
            out = case.run()
            be.sync()
            res["first_call_s"] = time.perf_counter() - t0
            progress.step(f"{op}: first call")
            err, what = case.check(out)
            del out
            tol = TOLERANCE[args.dtype]
            res["correct"] = bool(err <= tol)
            res["check"] = {"max_rel_err": err if math.isfinite(err) else None,
                            "tolerance": tol, "checked": what, "reference": "reference.py"}
            progress.step(f"{op}: reference check")
            if not res["correct"]:
                return res
            res["baselines"], res["skipped_baselines"] = [], {}
            runs, entries = [(op, case.run, be.sync)], []
            for name, b in wanted.items():
                if isinstance(b, str):
                    res["skipped_baselines"][name] = b
                    continue
                first = b.run()
                progress.step(f"{name}: first call")
                entries.append(({"name": name,
                                 "max_rel_err": b.check(first) if b.check else None}, b))
                del first
                runs.append((name, b.run, _Host.sync))
            timed = _timed(runs, args.repeat, progress)
            res.update(_stats(timed[0]))
            res["compile_s"] = max(res["first_call_s"] - res["median_s"], 0.0)
            _rates(res, case.flops, case.nbytes, machine, be.name == "cpu")
            for (entry, b), t in zip(entries, timed[1:]):
                entry.update(_stats(t))
                flops = case.flops if b.flops is None else b.flops
                nbytes = case.nbytes if b.nbytes is None else b.nbytes
                entry["flops"], entry["bytes"] = flops, nbytes
                _rates(entry, flops, nbytes, machine, True)
                entry["time_vs_fastmoe_nb"] = entry["median_s"] / res["median_s"]
                res["baselines"].append(entry)
        finally:
            progress.close()
    return res


def measure_machine(dtype, threads):
    """The ceilings, measured now: dense matmul GFLOP/s (in dtype) and read GB/s."""
    from . import baselines as B  # noqa: PLC0415

    with B.thread_limits(threads):
        return {"matmul_gflops": B.matmul_rate(np.dtype(dtype)),
                "matmul_shape": list(B.MATMUL_SHAPE), "read_gbs": B.read_bandwidth(),
                "threads": threads}


# --------------------------------------------------------------------------- output

def _ms(t):
    """Seconds as milliseconds, 3 significant digits or more (never an exponent)."""
    if t is None:
        return "-"
    ms = t * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def _num(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def print_result(res, out=None):
    s = res["shape"]
    w = (out or sys.stdout).write
    w(f"\n{res['op']}  preset {res['name']}  T={s['tokens']} d={s['d']} h={s['h']} "
      f"E={s['experts']} k={s['k']}  {res['activation']} {res['router']}  {res['dtype']}  "
      f"{res['backend']}  {res['threads']} threads"
      + (f"  skew {res['skew']}" if res["skew"] else "") + "\n")
    c = res["check"]
    err = "inf" if c["max_rel_err"] is None else f"{c['max_rel_err']:.1e}"
    w(f"check vs reference.py: max rel err {err} (tolerance {c['tolerance']:.0e}, "
      f"{c['checked']}) {'OK' if res['correct'] else 'WRONG: not timed'}\n")
    if not res["correct"]:
        return
    r = res["routing"]
    w(f"first call {res['first_call_s']:.2f} s (compile or cache load, ~{res['compile_s']:.2f}"
      f" s over a timed call); routed rows N={r['rows']}, dropped {r['dropped']}, "
      f"busiest expert {_num(r['max_over_mean'], '{:.2f}')}x the mean, "
      f"{r['empty_experts']} empty\n")
    rows = [("fastmoe_nb", res)] + [(b["name"], b) for b in res["baselines"]]
    w(f"{'impl':<15}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'GFLOP/s':>9}{'GB/s':>8}"
      f"{'of peak':>9}  {'bound':<8}{'time/ours':>9}\n")
    for name, e in rows:
        frac = "-" if e["fraction_of_peak"] is None else f"{e['fraction_of_peak']:.0%}"
        ratio = e.get("time_vs_fastmoe_nb", 1.0)
        w(f"{name:<15}{_ms(e['median_s']):>10}{_ms(e['min_s']):>9}{_ms(e['max_s']):>9}"
          f"{_num(e['gflops']):>9}{_num(e['gbs']):>8}{frac:>9}  {e['bound'] or '-':<8}"
          f"{ratio:>8.2f}x\n")
    for name, why in res.get("skipped_baselines", {}).items():
        w(f"  {name}: skipped ({why})\n")


def write_plot(path, results, key, machine):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ok = [r for r in results if r.get("correct")]
    xs = [r["sweep_value"] for r in ok]
    compute = any(r.get("bound") == "compute" for r in ok)
    metric, label = ("gflops", "GFLOP/s") if compute else ("gbs", "GB/s")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r[metric] for r in ok], "o-", label="fastmoe_nb")
    names = list(dict.fromkeys(b["name"] for r in ok for b in r.get("baselines", [])))
    for n in names:
        pts = [(r["sweep_value"], b[metric]) for r in ok for b in r["baselines"]
               if b["name"] == n and b.get(metric) is not None]
        if pts:
            ax.plot(*zip(*pts), "s--", label=n)
    if machine and ok and ok[0]["backend"] == "cpu":
        ceiling = machine["matmul_gflops"] if compute else machine["read_gbs"]
        ax.axhline(ceiling, color="grey", ls=":", label=f"machine {label} (measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel(label)
    r0 = ok[0] if ok else results[0]
    ax.set_title(f"fastmoe-nb bench {r0['op']} ({r0['preset']}, {r0['dtype']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions():
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    from importlib import metadata  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    v = {"fastmoe_nb": __version__, "python": platform.python_version()}
    for dist in ("numpy", "numba", "scipy", "llvmlite", "numba-cuda", "torch", "transformers",
                 "threadpoolctl", "tqdm", "matplotlib"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    return v


# --------------------------------------------------------------------------- commands

def _check_output_path(flag, path):
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UsageError(f"{flag}: cannot write {path!r} (no writable folder {d!r})")


def cmd_bench(args):
    import numba  # noqa: PLC0415

    op = args.op
    max_threads = numba.config.NUMBA_NUM_THREADS
    sweep_key, sweep_vals = args.sweep or (None, [None])
    threads_list = sweep_vals if sweep_key == "threads" else [args.threads or max_threads]
    for t in threads_list:
        if t > max_threads:
            raise UsageError(f"--threads: expected 1..{max_threads} (NUMBA_NUM_THREADS), got {t}")
    if args.plot:
        if not args.sweep:
            raise UsageError("--plot: needs --sweep (it draws one line per implementation "
                             "over the swept values)")
        try:
            import matplotlib  # noqa: F401, PLC0415
        except ImportError:
            raise UsageError("--plot: needs matplotlib, which is not installed "
                             "(pip install matplotlib)") from None
        _check_output_path("--plot", args.plot)
    if args.json:
        _check_output_path("--json", args.json)
    configs = []
    for v in sweep_vals:
        over = {sweep_key: v} if sweep_key and sweep_key != "threads" else {}
        p = resolve_preset(args, **over)
        threads = v if sweep_key == "threads" else threads_list[0]
        configs.append((v, p, threads))
    compare = args.compare
    if compare and compare["explicit"]:
        from . import baselines as B  # noqa: PLC0415

        if any(n.startswith("hf-") for n in compare["names"]):
            ok, why = B.hf_status()
            if not ok:
                raise UsageError(f"--compare hf: {why}")
    for _, p, _ in configs:
        if args.backend == "cpu":
            check_memory(p, args.dtype, op, bool(compare))
    be = _Cuda() if args.backend == "cuda" else _Host()

    machine = measure_machine(args.dtype, max(threads_list)) if be.name == "cpu" else None
    doc = {"schema": SCHEMA, "command": "fastmoe-nb " + " ".join(args.argv),
           "versions": _versions(), "machine": machine, "sweep": sweep_key, "results": []}
    if machine:
        print(f"machine ceilings, measured now with {machine['threads']} threads: dense "
              f"{args.dtype} matmul {machine['matmul_gflops']:.0f} GFLOP/s, read "
              f"{machine['read_gbs']:.1f} GB/s")
    status = EXIT_OK
    for v, p, threads in configs:
        res = bench_one(args, op, p, be, threads, machine, compare)
        if sweep_key:
            res["sweep_value"] = v
        doc["results"].append(res)
        print_result(res)
        sys.stdout.flush()
        if not res["correct"]:
            status = EXIT_WRONG
            print(f"fastmoe-nb: {op} on {p.name} differs from reference.py "
                  f"(max rel err {res['check']['max_rel_err']}); not timed", file=sys.stderr)
            break
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot and status == EXIT_OK:
        write_plot(args.plot, doc["results"], sweep_key, machine)
    return status


def machine_info():
    """What the machine has, as a dict (the `info` command)."""
    import llvmlite.binding as llvm  # noqa: PLC0415
    import numba  # noqa: PLC0415

    from . import baselines as B  # noqa: PLC0415

    B._read_kernel(np.ones(64, np.uint64), 2)   # a parallel kernel ran: the layer is chosen
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = None
    feats = llvm.get_host_cpu_features()
    simd = sorted(f for f in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                              "avx512vnni", "avx512bf16", "amx-tile", "neon", "sve")
                  if feats.get(f, False))
    blas = []
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415

        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads",
                                       "threading_layer", "architecture")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        blas = [{"numpy": "see numpy.show_config() (threadpoolctl not installed)"}]
    info = {"versions": _versions(), "cpu": {"name": llvm.get_host_cpu_name(),
                                             "logical_cores": os.cpu_count(), "simd": simd,
                                             "machine": platform.machine()},
            "threads": {"numba_num_threads": numba.config.NUMBA_NUM_THREADS,
                        "numba_threads_now": numba.get_num_threads(), "threading_layer": layer},
            "blas": blas, "cuda": _cuda_info(),
            "numba_cache": numba.config.CACHE_DIR or os.path.join(
                os.path.dirname(os.path.abspath(__file__)), "**", "__pycache__")
            + " (beside each kernel's source; set NUMBA_CACHE_DIR to move it)"}
    mem = _memory_available()
    info["memory_available_gb"] = None if mem is None else round(mem / 1e9, 1)
    return info


def _cuda_info():
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    out = {"simulator": sim, "numba_cuda": None, "gpus": [], "fastmoe_nb_backend": None}
    try:
        from numba import cuda  # noqa: PLC0415

        out["numba_cuda"] = bool(cuda.is_available())
        if out["numba_cuda"] and not sim:
            out["gpus"] = [str(g.name.decode() if isinstance(g.name, bytes) else g.name)
                           for g in cuda.gpus]
    except Exception as e:  # noqa: BLE001  (any driver/toolkit failure means: no CUDA here)
        out["numba_cuda"] = False
        out["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        from .backend import cuda_module  # noqa: PLC0415

        cuda_module()
        out["fastmoe_nb_backend"] = "ready"
    except (RuntimeError, ImportError) as e:
        out["fastmoe_nb_backend"] = str(e).splitlines()[0]
    return out


def cmd_info(args):
    if args.json:
        _check_output_path("--json", args.json)
    info = machine_info()
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<20} {vv}")
        elif isinstance(v, list):
            print(f"{k}:")
            for vv in v or ["(none found)"]:
                print(f"  {vv}")
        else:
            print(f"{k:<22} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return EXIT_OK


def cmd_presets(args):
    from .presets import CPU_PERF_PRESETS, LAPTOP_PRESETS, MODEL_PRESETS, PRESETS  # noqa

    print(f"{'name':<20}{'T':>6}{'d':>6}{'h':>7}{'E':>5}{'k':>3}  {'weights':>9}  options")
    for title, names in (("models, full size (GPU)", MODEL_PRESETS),
                         ("models scaled for a laptop CPU", LAPTOP_PRESETS),
                         ("CPU performance", CPU_PERF_PRESETS)):
        print(f"# {title}")
        for n in names:
            p = PRESETS[n]
            opts = [p.activation, p.router] + [f"{k}={v}" for k, v in p.router_kwargs().items()
                                               if k != "router"]
            if p.capacity_factor:
                opts.append(f"capacity_factor={p.capacity_factor}")
            if p.shared_h:
                opts.append(f"shared_h={p.shared_h}")
            print(f"{n:<20}{p.tokens:>6}{p.d:>6}{p.h:>7}{p.experts:>5}{p.k:>3}  "
                  f"{p.weight_bytes() / 1e9:>7.2f}GB  {' '.join(opts)}")
    return EXIT_OK


def main(argv=None):
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        return {"bench": cmd_bench, "info": cmd_info, "presets": cmd_presets}[args.command](args)
    except UsageError as e:
        print(f"fastmoe-nb: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("fastmoe-nb: error: out of memory for this shape; use a smaller preset or "
              "--tokens/--d/--h", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastmoe-nb: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
