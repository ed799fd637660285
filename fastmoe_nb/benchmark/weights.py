"""The MoE layer with its experts stored in a weight format: `fastmoe-nb bench --weights`.

Every format's layer is checked against reference.py on its own dequantized weights (a wrong
kernel is refused, as for float32), and its error against reference.py's layer on the float32
weights is reported (relative RMS: sqrt(sum (y - y_f32)^2 / sum y_f32^2), the figure a
quantization error is usually quoted in; a max relative error would be set by one unlucky
element). Then every format, ggml's MoE on the same weights when asked for, a read of a large
array (the read bandwidth) and a dense float32 matmul (the FLOP rate) are timed in the same
interleaved rounds, every call after a flush of the caches (timer.timed_cold). From those:

    floor   = max(bytes / read bandwidth, FLOPs / matmul rate)
    bytes   = the weights of the experts that got a token, in the format, scales included
              (plus a shared expert's, float32)
    x floor = median time / floor  (issue #20's decoding target is <= 1.2); also from the
              best round of each (min time / floor of the best ceilings)

The weights are the preset's float32 ones (baselines.layer_inputs) in the trans_w layout —
w1 (E, h|2h, d), w2 (E, d, h), blocks along the reduction axis: GGUF's and PyTorch's — put
into each format by formats.quantize; "f32" is that float32 array itself.
"""
from __future__ import annotations

import importlib
import time

import numpy as np

import fastmoe_nb as fm

from .. import baselines as B
from .. import formats as F
from .. import reference as ref
from .cases import routing_stats
from .core import TOLERANCE, UsageError, rel_err
from .timer import Progress, stats, timed_cold

WEIGHT_FORMATS = ("f32", "bf16", "q8_0", "q4_0", "q4_k", "q6_k")
FLUSH_BYTES = 96 << 20   # read before each timed call: a few times a server's L3 (32 MiB a CCD)
READ_BYTES = 256 << 20   # the read-bandwidth probe: far larger than any cache
GGML_EXTRA = "pip install 'fastmoe-nb[ggml]'"


# --------------------------------------------------------------------------- checks

def check_shape(p, formats):
    """A UsageError when d or h is not a multiple of a format's block: blocks run along d in
    w1 (E, h|2h, d) and along h in w2 (E, d, h)."""
    for f in formats:
        block = F.BLOCK[f]
        if p.d % block or p.h % block:
            raise UsageError(f"--weights {f}: d and h must be multiples of its block of {block} "
                             f"values (blocks run along d in w1 and along h in w2, GGUF's "
                             f"layout), got d={p.d}, h={p.h}")


def ggml_status():
    """(the fastmoe_nb.benchmark.ggml module, None) when it imports and its bindings load,
    else (None, why not)."""
    try:
        mod = importlib.import_module("fastmoe_nb.benchmark.ggml")
    except ImportError as e:
        return None, (f"ggml's comparison module cannot be imported ({e}); install the "
                      f"optional extra: {GGML_EXTRA}")
    if not mod.available():
        return None, ("ggml's Python bindings (ggml-python) are not installed or do not "
                      f"load; install the optional extra: {GGML_EXTRA}")
    return mod, None


def ggml_supports(p):
    """None when ggml's MoE (SwiGLU experts, every assignment kept) computes p's layer, else
    why not."""
    if p.activation != "swiglu":
        return "ggml's MoE here runs SwiGLU experts only"
    if p.capacity_factor is not None:
        return "ggml's MoE keeps every assignment (no capacity)"
    if p.shared_h:
        return "ggml's MoE here has no shared expert"
    return None


def rel_rms(got, want):
    """sqrt(sum (got - want)^2 / sum want^2) in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    den = float(np.sum(want * want))
    return float(np.sqrt(np.sum((got - want) ** 2) / max(den, 1e-300)))


# --------------------------------------------------------------------------- the bench

def _weights(fmt, w1t, w2t):
    """The float32 (E, M, K) weights in fmt: the arrays themselves for f32."""
    if fmt == "f32":
        return w1t, w2t
    return F.quantize(w1t, fmt), F.quantize(w2t, fmt)


def _selected_bytes(w, used):
    """Bytes of the experts in used (ids) of w (an array or QuantizedWeights)."""
    blocks = w.blocks if isinstance(w, F.QuantizedWeights) else w
    return sum(int(blocks[e].nbytes) for e in used)


def bench_weights(p, formats, *, preset, threads, seed=0, skew=None, check_tokens=1024,
                  repeat=5, ggml=None, quiet=True):
    """Check, then time preset p's layer with its experts in each of formats (and ggml's MoE
    on them: ggml = None, "explicit" or "implicit", the latter skipping quietly what cannot
    run) -> the result dict `fastmoe-nb bench --weights` prints and writes as JSON."""
    res = {"op": "layer", "preset": preset, "name": p.name, "description": p.description,
           "shape": {"tokens": p.tokens, "d": p.d, "h": p.h, "experts": p.experts, "k": p.k},
           "activation": p.activation, "router": p.router, "router_options":
           {n: v for n, v in p.router_kwargs().items() if n != "router"},
           "capacity": p.capacity(), "shared_h": p.shared_h, "dtype": "float32",
           "backend": "cpu", "threads": threads,
           "skew": None if skew is None else f"zipf:{skew:g}", "layout": "trans_w",
           "formats": list(formats), "error_metric": "relative RMS against the float32 layer",
           "skipped_baselines": {}}
    with B.thread_limits(threads):
        _run(res, p, formats, threads, seed, skew, check_tokens, repeat, ggml, quiet)
    return res


def _run(res, p, formats, threads, seed, skew, check_tokens, repeat, ggml, quiet):
    host = B.layer_inputs(p, dtype=np.float32, seed=seed, zipf=skew)
    kw = dict(B.layer_kwargs(p, host), trans_w=True)
    x, router_w = host["x"], host["router_w"]
    w1t = np.ascontiguousarray(host.pop("w1").transpose(0, 2, 1))   # (E, h1, d)
    w2t = np.ascontiguousarray(host.pop("w2").transpose(0, 2, 1))   # (E, d, h)
    T, d, h, E, k = p.shape

    # the routing the layer chooses (ggml is handed it) and the experts it reads
    logits = x @ router_w
    rkw = {n: kw[n] for n in ("renormalize", "bias", "n_group", "topk_group", "scale")
           if n in kw}
    r = getattr(fm, p.router)(logits, k, **rkw)
    plan = fm.make_plan(r.experts, E, p.capacity())
    res["routing"] = routing_stats(plan)
    used = np.flatnonzero(np.asarray(plan.counts) > 0)
    N = plan.num_rows
    hs = p.shared_h
    hs1 = 2 * hs if p.activation == "swiglu" else hs
    res["flops"] = 2.0 * (T * d * E + N * d * (p.h1 + h) + T * d * (hs1 + hs))
    shared_bytes = 4 * d * (hs1 + hs)

    experts, rw = np.asarray(r.experts), np.asarray(r.weights, np.float32)   # ggml's routing

    P = min(T, check_tokens)
    y32 = ref.moe_forward(x[:P], router_w, w1t, w2t, **kw)   # the float32 layer
    checked = f"y of the first {P} tokens, each format against its dequantized weights"
    gmod, why = (None, None) if ggml is None else ggml_status()
    if ggml and why is None:
        why = ggml_supports(p)
    if ggml == "explicit" and why is not None:
        raise UsageError(f"--compare ggml: {why}")
    if why is not None:
        res["skipped_baselines"]["ggml"] = why

    runs, entries, worst = [], [], 0.0
    for f in formats:
        w1f, w2f = _weights(f, w1t, w2t)
        fn = (lambda w1f=w1f, w2f=w2f: fm.moe_forward(x, router_w, w1f, w2f, **kw))
        t0 = time.perf_counter()
        y = fn()
        first = time.perf_counter() - t0
        if f == "f32":
            want = y32
        else:
            want = ref.moe_forward(x[:P], router_w, F.dequantize(w1f), F.dequantize(w2f), **kw)
        err = rel_err(y[:P], want)
        worst = max(worst, err)
        e = {"format": f, "bytes": _selected_bytes(w1f, used) + _selected_bytes(w2f, used)
             + shared_bytes, "first_call_s": first,
             "check": {"max_rel_err": err if np.isfinite(err) else None,
                       "tolerance": TOLERANCE["float32"]},
             "err_vs_f32": rel_rms(y[:P], y32)}
        if not err <= TOLERANCE["float32"]:
            res["correct"] = False
            res["check"] = {"max_rel_err": e["check"]["max_rel_err"],
                            "tolerance": TOLERANCE["float32"], "format": f,
                            "checked": checked, "reference": "reference.py"}
            res["weights"] = entries + [e]
            return
        entries.append(e)
        runs.append((f, fn))
        if gmod is not None:
            if f not in gmod.FORMATS:
                e["ggml_skipped"] = f"ggml's comparison has no {f}"
                continue
            layer = gmod.GgmlExperts(w1t, w2t, f, threads)
            gfn = (lambda layer=layer: layer(x, experts, rw))
            t0 = time.perf_counter()
            yg = gfn()
            e["ggml"] = {"first_call_s": time.perf_counter() - t0,
                         "err_vs_f32": rel_rms(np.asarray(yg)[:P], y32)}
            runs.append((f"ggml {f}", gfn))
    res["correct"] = True
    res["check"] = {"max_rel_err": worst, "tolerance": TOLERANCE["float32"],
                    "checked": checked, "reference": "reference.py"}

    flush, _ = B.read_probe(FLUSH_BYTES)
    read, read_bytes = B.read_probe(READ_BYTES)
    m, K, n = B.MATMUL_SHAPE
    ma, mb = B.dense_operands(m, K, n)
    mc = np.empty((m, n), np.float32)
    runs += [("read", read), ("matmul", lambda: np.matmul(ma, mb, out=mc))]
    progress = Progress(len(runs) * repeat, quiet)
    try:
        times = dict(zip([what for what, _ in runs], timed_cold(runs, repeat, flush, progress)))
    finally:
        progress.close()
    # the ceilings from the medians of the rounds, and from their best (least disturbed) ones
    mm_flops = 2.0 * m * K * n
    ceil = {"median": (read_bytes / np.median(times["read"][0]),
                       mm_flops / np.median(times["matmul"][0])),
            "best": (read_bytes / np.min(times["read"][0]),
                     mm_flops / np.min(times["matmul"][0]))}
    (bw, rate), (bw_best, rate_best) = ceil["median"], ceil["best"]
    res["ceilings"] = {"read_gbs": bw / 1e9, "matmul_gflops": rate / 1e9,
                       "best_read_gbs": bw_best / 1e9, "best_matmul_gflops": rate_best / 1e9,
                       "matmul_shape": [m, K, n], "flushed_bytes": FLUSH_BYTES}
    for e in entries:
        e.update(stats(times[e["format"]]))
        _floor(e, e["bytes"], res["flops"], ceil)
        if "ggml" in e:
            g = e["ggml"]
            g.update(stats(times[f"ggml {e['format']}"]))
            _floor(g, e["bytes"], res["flops"], ceil)
            e["ours_vs_ggml"] = e["median_s"] / g["median_s"]
            e["ours_vs_ggml_best"] = e["min_s"] / g["min_s"]
    res["weights"] = entries


def _floor(entry, nbytes, flops, ceil):
    """The roofline fields of a timed entry: the fraction of the read bandwidth, the floor and
    time / floor from the medians; time / floor from the best times and best ceilings too
    (on a shared machine the medians carry the other tenants' load)."""
    (bw, rate), (bw_best, rate_best) = ceil["median"], ceil["best"]
    t = entry["median_s"]
    entry["fraction_of_read_bw"] = nbytes / t / bw
    entry["floor_s"] = max(nbytes / bw, flops / rate)
    entry["time_vs_floor"] = t / entry["floor_s"]
    entry["best_floor_s"] = max(nbytes / bw_best, flops / rate_best)
    entry["best_time_vs_floor"] = entry["min_s"] / entry["best_floor_s"]
