"""The cases of the MoE layer and its ops on one preset: inputs made once, the timed call, its
check against reference.py and its baselines, on the CPU or a CUDA device.

make_case(op, ...) builds one. `fastmoe-nb bench` offers the ops of cli.OPS with the
baselines of cli.BASELINES; the bench/ scripts use the rest. Ops, and their baselines:

    layer                  moe_forward: numpy, dense, hf-eager, hf-grouped_mm;
                           CPU: experts-packed, read-floor; CUDA: cpu, hf-grouped_mm-cuda
    train-step             moe_forward(return_context=True) + moe_backward: dense, hf-eager,
                           hf-grouped_mm
    grouped_gemm           the first expert GEMM xs (N, d) @ w1: numpy, dense;
                           CPU: packed; CUDA: sgemm, fused-act
    grouped_gemm2          the second expert GEMM act (N, h) @ w2: the same but fused-act
    grouped_gemm_backward  da and dw of the first expert GEMM: dense
    pack_weights           packing w1 for the Numba kernel (CPU): copy
    permute, combine       dispatch and its inverse: numpy, copy
    route                  the preset's router on (T, E) logits: numpy
    make_plan              the counting sort of the T*k assignments: numpy
    activate               the experts' activation on (N, h1): numpy, copy
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

import fastmoe_nb as fm

from .. import baselines as B
from .. import reference as ref
from ..backends import cuda_module
from ..kernels.common import ACTIVATION_CODES
from ..types import Plan
from .core import TOLERANCE, Baseline, Case, UsageError, measure, rel_err, select_baselines

CASE_OPS = ("layer", "train-step", "grouped_gemm", "grouped_gemm2", "grouped_gemm_backward",
            "pack_weights", "permute", "combine", "route", "make_plan", "activate")


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


@njit(parallel=True, cache=True)
def _copy_kernel(src, dst):
    # src: (n,) -> dst: (n,), in blocks of 64K elements with unsigned indices: the loop
    # vectorizes, and the threads of a prange over blocks share the copy
    n, b = src.shape[0], 1 << 16
    for i in prange((n + b - 1) // b):
        s, d = src[i * b:min(n, i * b + b)], dst[i * b:min(n, i * b + b)]
        for j in range(np.uint64(0), np.uint64(s.shape[0])):
            d[j] = s[j]


def copy_baseline(nbytes, be):
    """A copy that reads nbytes / 2 and writes as many (a threaded Numba copy, or a device to
    device copy): the floor of an op that moves nbytes once each way."""
    n = max(1, int(nbytes) // 8)
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    if be.name == "cuda":
        dsrc, ddst = be.to_dev(src), be.to_dev(dst)
        return Baseline(lambda: ddst.copy_to_device(dsrc), flops=0.0, nbytes=8.0 * n,
                        sync=be.sync)
    return Baseline(lambda: _copy_kernel(src, dst), flops=0.0, nbytes=8.0 * n)


def _dense(rows, K, flops, dtype, seed):
    """The dense-matmul baseline: (rows, K) @ (K, M) with M chosen for the same FLOPs."""
    rows = max(rows, 1)
    M = max(1, round(flops / (2.0 * rows * K)))
    a, b = B.dense_operands(rows, K, M, dtype, seed)
    out = np.empty((rows, M), a.dtype)
    return Baseline(lambda: np.matmul(a, b, out=out), flops=2.0 * rows * K * M,
                    nbytes=a.itemsize * (rows * K + K * M + rows * M))


def _sgemm(m, K, n, be):
    """cuBLAS SGEMM (TF32 off) of (m, K) @ (K, n) through PyTorch or CuPy, or why not."""
    if be.name != "cuda":
        return "cuBLAS runs with the CUDA backend only"
    try:
        import torch  # noqa: PLC0415  (optional)

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
            a, b = torch.randn(m, K, device="cuda"), torch.randn(K, n, device="cuda")
            c = torch.empty(m, n, device="cuda")
            return Baseline(lambda: torch.matmul(a, b, out=c), sync=be.sync)
    except ImportError:
        pass
    try:
        import cupy  # noqa: PLC0415  (optional)
    except ImportError:
        return "needs PyTorch with CUDA or CuPy"
    a = cupy.random.standard_normal((m, K), dtype=cupy.float32)
    b = cupy.random.standard_normal((K, n), dtype=cupy.float32)
    c = cupy.empty((m, n), cupy.float32)
    return Baseline(lambda: cupy.matmul(a, b, out=c), sync=be.sync)


def _hf(host, k, impl, train, check):
    """HF's Mixtral block, forward or forward + backward."""
    fwd, step = B.hf_mixtral_block(host, k, impl)
    return Baseline(step if train else fwd, check)


def _hf_cuda(host, k, check, be):
    """HF's Mixtral block with the 'grouped_mm' experts on the GPU, forward."""
    import torch  # noqa: PLC0415  (optional)

    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    block = B.hf_mixtral_module(host, k, "grouped_mm").cuda().eval()
    T, d = host["x"].shape
    xt = torch.from_numpy(host["x"]).reshape(1, T, d).cuda()

    def forward():
        with torch.no_grad():
            out = block(xt)
        return out[0] if isinstance(out, tuple) else out

    return Baseline(forward, lambda out: check(out.float().cpu().numpy().reshape(T, d)),
                    sync=be.sync)


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
    cpu = be.name == "cpu"

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
            bl.update(_layer_extras(p, host, kw, hplan, be, numpy_check))
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

    if op in ("grouped_gemm", "grouped_gemm2"):
        first = op == "grouped_gemm"
        offsets = hplan.offsets
        a_host = ref.permute(x, hplan)
        if not first:   # the second GEMM's input: the experts' activations (N, h)
            a_host = ref.activate(ref.grouped_gemm(a_host, w1, offsets), p.activation)
        wh, K, M = (w1, d, p.h1) if first else (w2, h, d)
        a, wd = be.to_dev(a_host), dev["w1" if first else "w2"]

        def check_rows(got):
            ids, offs = sample_rows(offsets, max(1, -(-check_tokens // max(used, 1))))
            want = ref.grouped_gemm(a_host[ids], wh, offs)
            return rel_err(be.to_host(got)[ids], want), f"{ids.size} rows across all experts"

        flops = 2.0 * N * K * M
        nbytes = item * (N * K + N * M + used * K * M)
        bl = {"numpy": lambda: Baseline(lambda: B.numpy_grouped_gemm(a_host, wh, offsets)),
              "dense": lambda: _dense(N, K, flops, dtype, seed),
              "packed": lambda: _packed(a_host, wh, offsets, first and p.activation == "swiglu",
                                        check_rows, be),
              "sgemm": lambda: _sgemm(max(N, 1), K, M, be)}
        if first:
            bl["fused-act"] = lambda: _fused_act(a, wd, a_host, w1, hplan, p, check_tokens,
                                                 used, be)
        return Case(lambda: fm.grouped_gemm(a, wd, be.to_dev(offsets)), check_rows, flops,
                    nbytes, bl, stats)

    if op in ("grouped_gemm_backward", "pack_weights"):
        offsets = hplan.offsets
        xs_host = ref.permute(x, hplan)
        ids, offs = sample_rows(offsets, max(1, -(-check_tokens // max(used, 1))))
        swiglu = p.activation == "swiglu"
        if op == "pack_weights":   # checked by a grouped GEMM on the packed weights
            def check(out):
                got = fm.grouped_gemm(xs_host[ids], out, offs)
                return rel_err(got, ref.grouped_gemm(xs_host[ids], w1, offs)), \
                    f"a grouped GEMM of {ids.size} rows on them"

            if not cpu:
                raise UsageError("pack_weights: packed weights are the CPU kernels' layout")
            return Case(lambda: fm.pack_weights(w1, swiglu=swiglu), check, 0.0, 2.0 * w1.nbytes,
                        {"copy": lambda: copy_baseline(2.0 * w1.nbytes, be)}, stats)
        dy_host = np.random.default_rng(seed + 1).standard_normal((N, p.h1)).astype(dtype)
        xs, dy = be.to_dev(xs_host), be.to_dev(dy_host)
        offsets_d = be.to_dev(offsets)

        def check(out):   # dw sums over an expert's rows: a sample of rows, run on its own
            if ids.size < N:
                out = fm.grouped_gemm_backward(be.to_dev(dy_host[ids]), be.to_dev(xs_host[ids]),
                                               dev["w1"], be.to_dev(offs))
            da_ref, dw_ref = ref.grouped_gemm_backward(dy_host[ids], xs_host[ids], w1, offs)
            return max(rel_err(be.to_host(out[0]), da_ref), rel_err(be.to_host(out[1]),
                                                                    dw_ref)), \
                f"da and dw of {ids.size} rows across all experts"

        flops = 4.0 * N * d * p.h1
        return Case(lambda: fm.grouped_gemm_backward(dy, xs, dev["w1"], offsets_d), check, flops,
                    item * (2 * N * d + N * p.h1 + 2 * used * d * p.h1),
                    {"dense": lambda: _dense(N, d, flops, dtype, seed)}, stats)

    if op == "permute":
        xd = dev["x"]

        def check(out):
            return (0.0 if np.array_equal(be.to_host(out), ref.permute(x, hplan))
                    else float("inf")), f"all {N} rows, exactly"

        nbytes = item * 2 * N * d + 4 * N
        return Case(lambda: fm.permute(xd, plan), check, 0.0, nbytes,
                    {"numpy": lambda: Baseline(lambda: ref.permute(x, hplan)),
                     "copy": lambda: copy_baseline(nbytes, be)}, stats)

    if op == "combine":
        ys_host = ref.permute(x, hplan)
        ys = be.to_dev(ys_host)

        def check(out):
            return rel_err(be.to_host(out), ref.combine(ys_host, hplan, hweights)), \
                f"all {T} tokens"

        nbytes = item * (N * d + T * d + T * k) + 4 * T * k
        return Case(lambda: fm.combine(ys, plan, r.weights), check, 2.0 * N * d, nbytes,
                    {"numpy": lambda: Baseline(lambda: ref.combine(ys_host, hplan, hweights)),
                     "copy": lambda: copy_baseline(nbytes, be)}, stats)

    if op == "make_plan":
        hexperts = be.to_host(r.experts)

        def check(out):
            want = ref.make_plan(hexperts, E, p.capacity())
            got = plan_to_host(out, be)
            same = all(np.array_equal(got[i], want[i]) for i in range(5))
            return (0.0 if same else float("inf")), "rows, offsets, counts, slots, dropped, " \
                "exactly"

        return Case(lambda: fm.make_plan(r.experts, E, p.capacity()), check, 0.0,
                    4.0 * T * k * 3 + 8.0 * E * 3, {"numpy": lambda: Baseline(
                        lambda: ref.make_plan(hexperts, E, p.capacity()))}, stats)

    if op == "activate":
        h_host = ref.grouped_gemm(ref.permute(x, hplan), w1, hplan.offsets)
        hd = be.to_dev(h_host)

        def check(out):
            return rel_err(be.to_host(out), ref.activate(h_host, p.activation)), \
                f"all {N} rows"

        nbytes = item * N * (p.h1 + h)
        return Case(lambda: fm.activate(hd, p.activation), check, 0.0, nbytes,
                    {"numpy": lambda: Baseline(lambda: ref.activate(h_host, p.activation)),
                     "copy": lambda: copy_baseline(nbytes, be)}, stats)

    if op != "route":
        raise UsageError(f"op: expected one of {', '.join(CASE_OPS)}, got {op!r}")
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


def _layer_extras(p, host, kw, hplan, be, numpy_check):
    """The layer's baselines beyond the command's: the experts alone on packed weights and
    the weights' read floor (CPU); the CPU path and HF's block on the GPU (CUDA)."""
    x, router_w, w1, w2 = (host[n] for n in ("x", "router_w", "w1", "w2"))
    T, d, h, E, k = p.shape
    if be.name == "cuda":
        def hf_cuda():
            why = B.hf_supports(p) or (None if B.hf_status()[0] else B.hf_status()[1])
            return why or _hf_cuda(host, k, numpy_check, be)

        return {"cpu": lambda: Baseline(lambda: fm.moe_forward(x, router_w, w1, w2, **kw),
                                        numpy_check),
                "hf-grouped_mm-cuda": hf_cuda,
                "experts-packed": "packed weights are the CPU kernels' layout",
                "read-floor": "the read bandwidth is the CPU's"}

    def experts_packed():
        xs = fm.permute(x, hplan)
        pw1 = fm.pack_weights(w1, swiglu=p.activation == "swiglu")
        pw2 = fm.pack_weights(w2)
        return Baseline(lambda: fm.experts_forward(xs, pw1, pw2, hplan.offsets, p.activation),
                        flops=2.0 * hplan.num_rows * d * (p.h1 + h))

    def read_floor():   # reading the weights of the experts that got a token, nothing else
        used = int((np.asarray(hplan.counts) > 0).sum())
        fn, nbytes = B.read_probe(used * d * (p.h1 + h) * w1.itemsize)
        return Baseline(fn, flops=0.0, nbytes=nbytes)

    return {"experts-packed": experts_packed, "read-floor": read_floor,
            "cpu": "the layer runs on the CPU already",
            "hf-grouped_mm-cuda": "HF's block on the GPU is a CUDA-backend baseline"}


def _packed(a, w, offsets, swiglu, check_rows, be):
    """The grouped GEMM on weights packed once (pack_weights), as between weight updates."""
    if be.name != "cpu":
        return "packed weights are the CPU kernels' layout"
    pw = fm.pack_weights(w, swiglu=swiglu)
    return Baseline(lambda: fm.grouped_gemm(a, pw, offsets), lambda out: check_rows(out)[0])


def _fused_act(a, wd, a_host, w1, hplan, p, check_tokens, used, be):
    """The first GEMM with the activation in its epilogue, as moe_forward runs it on a GPU."""
    if be.name != "cuda":
        return "the fused epilogue is the CUDA kernel's"
    kc = cuda_module()
    code = ACTIVATION_CODES[p.activation]
    offs_d = be.to_dev(hplan.offsets)

    def check(out):
        ids, offs = sample_rows(hplan.offsets, max(1, -(-check_tokens // max(used, 1))))
        want = ref.activate(ref.grouped_gemm(a_host[ids], w1, offs), p.activation)
        return rel_err(be.to_host(out)[ids], want)

    nbytes = a_host.itemsize * (a_host.size + hplan.num_rows * p.h + used * w1[0].size)
    return Baseline(lambda: kc.grouped_gemm(a, wd, offs_d, False, code), check, nbytes=nbytes,
                    sync=be.sync)


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
