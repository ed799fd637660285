"""The cases of the MoE layer and its ops on one preset: inputs made once, the timed call, its
check against reference.py and its baselines, on the CPU or a CUDA device."""
from __future__ import annotations

import numpy as np

import fastmoe_nb as fm

from .. import baselines as B
from .. import reference as ref
from ..backend import cuda_module
from ..types import Plan
from .core import TOLERANCE, Baseline, Case, UsageError, measure, rel_err, select_baselines


# --------------------------------------------------------------------------- backends

class Host:
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


class Cuda:
    name = "cuda"

    def __init__(self):
        try:
            cuda_module()
            from numba import cuda  # noqa: PLC0415  (numba.cuda only when a GPU is asked for)
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


def backend(name):
    """Host() for "cpu", Cuda() for "cuda" (a UsageError when CUDA cannot run here)."""
    return Cuda() if name == "cuda" else Host()


def plan_to_host(plan, be):
    return Plan(*[be.to_host(f) if hasattr(f, "shape") else f for f in plan])


# --------------------------------------------------------------------------- helpers

def routing_stats(plan):
    counts = np.asarray(plan.counts)
    mean = counts.mean() if counts.size else 0.0
    return {"rows": int(plan.num_rows), "dropped": int(np.asarray(plan.dropped).sum()),
            "max_over_mean": float(counts.max() / mean) if mean else None,
            "empty_experts": int((counts == 0).sum())}


def sample_rows(offsets, per_expert):
    """Up to per_expert leading rows of every expert -> (row ids, their offsets (E+1,))."""
    offsets = np.asarray(offsets, np.int64)
    take = np.minimum(np.diff(offsets), per_expert)
    ids = np.concatenate([np.arange(lo, lo + n) for lo, n in zip(offsets[:-1], take)]
                         or [np.zeros(0, np.int64)])
    return ids.astype(np.int64), np.concatenate([[0], np.cumsum(take)]).astype(np.int64)


def _dense(rows, K, flops, dtype, seed):
    """The dense-matmul baseline: (rows, K) @ (K, M) with M chosen for the same FLOPs."""
    rows = max(rows, 1)
    M = max(1, round(flops / (2.0 * rows * K)))
    a, b = B.dense_operands(rows, K, M, dtype, seed)
    out = np.empty((rows, M), a.dtype)
    return Baseline(lambda: np.matmul(a, b, out=out), flops=2.0 * rows * K * M,
                    nbytes=a.itemsize * (rows * K + K * M + rows * M))


def _hf(host, k, impl, train, check):
    """HF's Mixtral block, forward or forward + backward."""
    fwd, step = B.hf_mixtral_block(host, k, impl)
    return Baseline(step if train else fwd, check)


# --------------------------------------------------------------------------- the cases

def make_case(op, p, dtype, be, seed, skew, check_tokens):
    """Inputs, the timed call, its reference check and its baselines for one op."""
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
    hplan = plan_to_host(plan, be)
    hweights = be.to_host(r.weights)
    stats = routing_stats(hplan)
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
                return rel_err(be.to_host(out)[:P], y_ref), f"y of the first {P} tokens"

            def numpy_check(out):
                return rel_err(out[:P], ref.moe_forward(x[:P], router_w, w1, w2, **kw))

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
            errs = [rel_err(be.to_host(dx), dx_ref)]
            errs += [rel_err(be.to_host(grads[n]), g_ref[n]) for n in g_ref]
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
            ids, offs = sample_rows(offsets, max(1, -(-check_tokens // max(used, 1))))
            want = ref.grouped_gemm(xs_host[ids], w1, offs)
            return rel_err(be.to_host(out)[ids], want), f"{ids.size} rows across all experts"

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
            return rel_err(be.to_host(out), ref.combine(ys_host, hplan, hweights)), \
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
        return rel_err(be.to_host(out.weights), want.weights), f"all {T} tokens' experts " \
            "(exactly) and weights"

    return Case(lambda: router(ld, k, **rkw), check, 0.0,
                item * T * E + T * k * (item + 4),
                {"numpy": lambda: Baseline(lambda: ref_router(logits, k, **hkw))}, stats)


# --------------------------------------------------------------------------- one result row

def bench_op(op, p, *, preset, dtype, be, threads, seed=0, skew=None, check_tokens=1024,
             repeat=5, machine=None, compare=None, quiet=True):
    """Check, then time one op on preset p (and the baselines compare asks for: {"names":
    [...], "explicit": bool}) -> the result dict the command prints and writes as JSON."""
    res = {"op": op, "preset": preset, "name": p.name, "description": p.description,
           "shape": {"tokens": p.tokens, "d": p.d, "h": p.h, "experts": p.experts, "k": p.k},
           "activation": p.activation, "router": p.router, "router_options":
           {n: v for n, v in p.router_kwargs().items() if n != "router"},
           "capacity": p.capacity(), "shared_h": p.shared_h, "dtype": dtype,
           "backend": be.name, "threads": threads,
           "skew": None if skew is None else f"zipf:{skew:g}"}
    with B.thread_limits(threads):
        case = make_case(op, p, dtype, be, seed, skew, check_tokens)
        res["routing"] = case.routing
        res["flops"], res["bytes"] = case.flops, case.nbytes
        wanted = select_baselines(case, compare["names"] if compare else [],
                                  bool(compare and compare["explicit"]), op)
        res.update(measure(case, repeat, TOLERANCE[dtype], label=op, sync=be.sync,
                           wanted=wanted, machine=machine, cpu=be.name == "cpu", quiet=quiet))
    return res
