"""The `fastmoe-nb` command: benchmarks a user can trust, and what the machine has.

    fastmoe-nb bench                      # the MoE layer on the mixtral-mini preset
    fastmoe-nb bench grouped_gemm --preset fine-128 --compare --json out.json
    fastmoe-nb bench --tokens 64 --d 32 --h 64 --experts 4 --k 2 --skew zipf:1.2
    fastmoe-nb bench --sweep tokens=256,1024,4096 --compare --plot sweep.png
    fastmoe-nb bench --preset decode-1 --weights f32,bf16,q8_0,q4_0 --compare ggml
    fastmoe-nb info                       # versions, threads, BLAS, CPU, CUDA, numba cache
    fastmoe-nb presets                    # the named shapes

Every bench first checks the op against reference.py on the same inputs and refuses to time a
wrong result (exit status 1). Then it reports the first call apart (compile or cache load),
the median / min / max time per call over --repeat samples (a sample: enough calls to
outlast the clock's noise, benchmark/timer.py's MIN_SAMPLE_S; fastmoe_nb and its baselines in
interleaved rounds), the FLOP and byte rates, and on the
CPU the fraction of the machine's ceiling measured in the same run: the dense-matmul rate for
compute-bound ops, the read bandwidth for memory-bound ones (whichever the op's FLOPs per
byte says, roofline style).
With --weights FORMATS the layer's experts are stored in each format (trans_w, GGUF's layout),
each checked against reference.py on its dequantized weights, then all timed in the same
rounds with caches flushed before each call, beside a read-bandwidth probe and a dense matmul
(and ggml's MoE with --compare ggml): per format the selected experts' bytes, the fraction of
the read bandwidth, the floor max(bytes / bandwidth, FLOPs / matmul rate), time over floor,
and the error against the float32 layer (relative RMS).
Bad input (an unknown op or preset, inconsistent shapes, a missing optional dependency) is one
line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numba
import numpy as np

from . import baselines as B
from . import presets as P
from .benchmark import (WEIGHT_FORMATS, UsageError, backend, bench_op, bench_weights,
                        check_memory, machine_info, measure_machine, print_result,
                        print_weights, versions, write_plot)
from .benchmark.weights import check_shape, ggml_status, ggml_supports
from .checks import ACTIVATIONS, check_sigmoid_options
from .routing.registry import router_names

EXIT_OK, EXIT_WRONG, EXIT_USAGE = 0, 1, 2
OPS = ("layer", "grouped_gemm", "permute", "combine", "route", "train-step")
BENCH_ROUTERS = router_names(backend="cuda")   # on every backend; reference.py specifies them
SWEEP_KEYS = ("tokens", "d", "h", "experts", "k", "threads")
BASELINES = ("numpy", "dense", "hf-eager", "hf-grouped_mm")
GGML = "ggml"   # compared only when named: it runs the --weights formats, not these baselines
SCHEMA = "fastmoe-nb-bench/1"


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


def _weights(s):
    """'q8_0' or 'f32,bf16,q4_0' -> ('q8_0',) / ('f32', 'bf16', 'q4_0'), each of
    WEIGHT_FORMATS once."""
    names = s.split(",")
    for n in names:
        if n not in WEIGHT_FORMATS:
            raise argparse.ArgumentTypeError(f"--weights: expected one of "
                                             f"{', '.join(WEIGHT_FORMATS)} or a comma list of "
                                             f"them, got {n!r}")
    return tuple(dict.fromkeys(names))


def _compare(s):
    """'all' or a comma list of BASELINES ('hf' is both HF implementations) or ggml."""
    groups = {"all": list(BASELINES), "hf": ["hf-eager", "hf-grouped_mm"]}
    names = []
    for n in s.split(","):
        if n not in BASELINES and n not in groups and n != GGML:
            raise argparse.ArgumentTypeError(f"--compare: expected all, hf, ggml or a list of "
                                             f"{', '.join(BASELINES)}, got {n!r}")
        names += groups.get(n, [n])
    return {"explicit": s != "all", "names": list(dict.fromkeys(names))}


def build_parser():
    p = _Parser(prog="fastmoe-nb", description="fastmoe_nb benchmarks and machine facts.")
    sub = p.add_subparsers(dest="command", metavar="{bench,info,presets}")
    sub.required = True

    b = sub.add_parser("bench", help="check an op against reference.py, then time it",
                       description=__doc__.split("\n\n")[2])
    b.add_argument("op", nargs="?", default="layer", choices=OPS,
                   help="what to time (default: layer, the whole moe_forward)")
    b.add_argument("--preset", default=P.DEFAULT_PRESET,
                   help=f"named shape and options (default {P.DEFAULT_PRESET}; see "
                        "'fastmoe-nb presets')")
    for flag, name in (("--tokens", "T"), ("--d", "d"), ("--h", "h"), ("--experts", "E"),
                       ("--k", "k")):
        b.add_argument(flag, type=_positive(flag), metavar=name,
                       help=f"override the preset's {name}")
    b.add_argument("--activation", help="override the preset's expert activation")
    b.add_argument("--router", help=f"override the preset's router ({', '.join(BENCH_ROUTERS)})")
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
    b.add_argument("--weights", type=_weights, metavar="FORMATS",
                   help="the layer with its experts in these weight formats, side by side: "
                        f"one or a comma list of {', '.join(WEIGHT_FORMATS)}")
    b.add_argument("--compare", type=_compare, nargs="?", const="all", metavar="LIST",
                   help="also time the baselines, in the same run: all (default) or some of "
                        f"{', '.join(BASELINES)}, hf; or ggml (llama.cpp's MoE on the "
                        "--weights formats; an optional extra)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="versions, threads, BLAS, CPU features, CUDA, numba cache")
    i.add_argument("--json", metavar="PATH", help="write the facts as JSON")
    sub.add_parser("presets", help="list the named shapes")
    return p


# --------------------------------------------------------------------------- the config

def resolve_preset(args, **override):
    """The Preset a bench runs: --preset, then the shape flags, then a sweep value."""
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


# --------------------------------------------------------------------------- commands

def _check_output_path(flag, path):
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UsageError(f"{flag}: cannot write {path!r} (no writable folder {d!r})")


def _weights_mode(args):
    """(formats, ggml) of a --weights / --compare ggml run: formats None for an ordinary
    bench; ggml None, "explicit" (--compare ggml: an error when it cannot run) or "implicit"
    (a bare --compare beside --weights: skipped when it cannot run)."""
    compare = args.compare
    named = compare["names"] if compare and compare["explicit"] else []
    if GGML in named and len(named) > 1:
        raise UsageError("--compare ggml: compared on its own (numpy, dense and HF run float32 "
                         f"weights in another layout), got {', '.join(named)}")
    if args.weights and named and named != [GGML]:
        raise UsageError(f"--compare: with --weights only ggml is compared, got "
                         f"{', '.join(named)}")
    if not args.weights and named != [GGML]:
        return None, None
    formats = args.weights or ("f32",)
    flag = "--weights" if args.weights else "--compare ggml"
    if args.op != "layer":
        raise UsageError(f"{flag}: times the whole layer (op 'layer'), got op {args.op!r}")
    if args.dtype != "float32":
        raise UsageError(f"{flag}: the formats compute in float32, not with --dtype "
                         f"{args.dtype}")
    if args.backend != "cpu":
        raise UsageError(f"{flag}: runs on the CPU backend, got --backend {args.backend}")
    if args.plot:
        raise UsageError(f"--plot: draws a sweep of one implementation per line, not of "
                         f"{flag}'s formats")
    ggml = "explicit" if named == [GGML] else "implicit" if compare else None
    if ggml == "explicit":
        _, why = ggml_status()
        if why is not None:
            raise UsageError(f"--compare ggml: {why}")
    return formats, ggml


def cmd_bench(args):
    op = args.op
    formats, ggml = _weights_mode(args)
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
        if any(n.startswith("hf-") for n in compare["names"]):
            ok, why = B.hf_status()
            if not ok:
                raise UsageError(f"--compare hf: {why}")
    for _, p, _ in configs:
        if formats:
            check_shape(p, formats)
        if ggml == "explicit" and ggml_supports(p):
            raise UsageError(f"--compare ggml: {ggml_supports(p)} (preset {p.name})")
        if args.backend == "cpu":
            check_memory(p, args.dtype, op, bool(compare), formats or (), bool(ggml))
    be = backend(args.backend)

    # --weights measures its ceilings in its own rounds, beside the formats
    machine = (measure_machine(args.dtype, max(threads_list))
               if be.name == "cpu" and not formats else None)
    doc = {"schema": SCHEMA, "command": "fastmoe-nb " + " ".join(args.argv),
           "versions": versions(), "machine": machine, "sweep": sweep_key, "results": []}
    if machine:
        print(f"machine ceilings, measured now with {machine['threads']} threads: dense "
              f"{args.dtype} matmul {machine['matmul_gflops']:.0f} GFLOP/s, read "
              f"{machine['read_gbs']:.1f} GB/s")
    status = EXIT_OK
    for v, p, threads in configs:
        if formats:
            res = bench_weights(p, formats, preset=args.preset, threads=threads, seed=args.seed,
                                skew=args.skew, check_tokens=args.check_tokens,
                                repeat=args.repeat, ggml=ggml, quiet=args.quiet)
        else:
            res = bench_op(op, p, preset=args.preset, dtype=args.dtype, be=be, threads=threads,
                           seed=args.seed, skew=args.skew, check_tokens=args.check_tokens,
                           repeat=args.repeat, machine=machine, compare=compare,
                           quiet=args.quiet)
        if sweep_key:
            res["sweep_value"] = v
        doc["results"].append(res)
        (print_weights if formats else print_result)(res)
        sys.stdout.flush()
        if not res["correct"]:
            status = EXIT_WRONG
            where = f" with {res['check']['format']} weights" if "format" in res["check"] else ""
            print(f"fastmoe-nb: {op} on {p.name}{where} differs from reference.py "
                  f"(max rel err {res['check']['max_rel_err']}); not timed", file=sys.stderr)
            break
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.plot and status == EXIT_OK:
        write_plot(args.plot, doc["results"], sweep_key, machine)
    return status


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
    print(f"{'name':<20}{'T':>6}{'d':>6}{'h':>7}{'E':>5}{'k':>3}  {'weights':>9}  options")
    perf = tuple(n for n in P.CPU_PERF_PRESETS if n not in P.DECODE_PRESETS)
    for title, names in (("models, full size (GPU)", P.MODEL_PRESETS),
                         ("models scaled for a laptop CPU", P.LAPTOP_PRESETS),
                         ("CPU performance", perf),
                         ("CPU decoding (reads the selected experts' weights)",
                          P.DECODE_PRESETS)):
        print(f"# {title}")
        for n in names:
            p = P.PRESETS[n]
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
