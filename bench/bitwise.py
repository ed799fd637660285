"""Bit-for-bit check of a refactor: record every public pipeline's outputs, change the code,
compare.

    python bench/bitwise.py record /tmp/before.json      # on the old code
    python bench/bitwise.py compare /tmp/before.json     # on the new code, same host

Each case runs one pipeline on fixed random inputs — every preset (scaled to a few sizes that
take the stream, packed-kernel and BLAS routes), every router, routed_experts, the grouped
GEMMs with raw and packed weights in both layouts, soft MoE, an nn.MoE training step, expert
parallelism on one rank — forward and backward, and records the sha256 of each output.
`--cuda-sim` runs the CUDA cases in Numba's simulator (in a child process). Results depend on
the host's ISA (the kernels compile for the CPU they run on): compare on the host that
recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import zlib

import numpy as np


def digest(a):
    """sha256 of an array's dtype, shape and bytes (device arrays copied to the host)."""
    if hasattr(a, "copy_to_host"):
        a = a.copy_to_host()
    a = np.ascontiguousarray(np.asarray(a))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:24]


def digests(**arrays):
    """{name: digest} of arrays and of dicts of arrays (keys prefixed), None skipped."""
    out = {}
    for name, a in arrays.items():
        if isinstance(a, dict):
            out.update({f"{name}.{k}": digest(v) for k, v in sorted(a.items()) if v is not None})
        elif a is not None:
            out[name] = digest(a)
    return out


def layer_arrays(rng, T, d, h, E, activation="swiglu", shared_h=0, shared_gate=False,
                 dtype=np.float32, trans_w=False):
    """x, router_w, w1, w2 (+ shared expert) of one layer, fixed by rng."""
    H1 = 2 * h if activation == "swiglu" else h
    f = lambda *s: (rng.standard_normal(s) * 0.5).astype(dtype)  # noqa: E731
    a = dict(x=f(T, d), router_w=f(d, E),
             w1=f(E, H1, d) if trans_w else f(E, d, H1),
             w2=f(E, d, h) if trans_w else f(E, h, d))
    if shared_h:
        hs1 = 2 * shared_h if activation == "swiglu" else shared_h
        a.update(shared_w1=f(d, hs1), shared_w2=f(shared_h, d))
        if shared_gate:
            a["shared_gate_w"] = f(d)
    return a


def run_layer(fm, arrays, k, accumulate=False, **kw):
    """moe_forward without context (the fused path), with context, moe_backward (fresh and
    accumulated gradients) -> digests."""
    y_fast = fm.moe_forward(**arrays, k=k, **kw)
    y, ctx = fm.moe_forward(**arrays, k=k, return_context=True, **kw)
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(y.dtype)
    dx, grads = fm.moe_backward(dy, ctx)
    out = digests(y_fast=y_fast, y=y, dx=dx, grads=grads)
    if accumulate:
        acc = {n: np.full_like(g, 0.25) for n, g in grads.items()}
        dx2, grads2 = fm.moe_backward(dy, ctx, grads=acc)
        out.update(digests(dx_acc=dx2, grads_acc=grads2))
    return out


def preset_cases(fm):
    """Every preset, shrunk to sizes that take each route, float32 (and float64 once)."""
    from fastmoe_nb.presets import PRESETS, CPU_PERF_PRESETS
    cases = {}
    for name, p in PRESETS.items():
        E = p.experts if p.experts <= 64 else 64
        sizes = [(1, 96, 80), (8, 96, 80), (200, 128, 72)]
        if name in CPU_PERF_PRESETS:              # the real shapes, a smaller batch
            sizes.append((min(p.tokens, 512), p.d, p.h))
        for T, d, h in sizes:
            for dtype in (np.float32, np.float64) if T == 8 else (np.float32,):
                rng = np.random.default_rng(zlib.crc32(f"{name}/{T}".encode()))
                pp = p.replace(tokens=T, d=d, h=h, experts=E,
                               shared_h=min(p.shared_h, 64) if p.shared_h else 0)
                arrays = layer_arrays(rng, T, d, h, E, p.activation, pp.shared_h,
                                      p.shared_gate, dtype)
                kw = dict(pp.router_kwargs(), activation=p.activation,
                          capacity=pp.capacity())
                if kw.get("router") == "sigmoid_topk":
                    kw["bias"] = (rng.standard_normal(E) * 0.1).astype(dtype)
                cases[f"preset/{name}/T{T}/d{d}/{np.dtype(dtype).name}"] = lambda a=arrays, \
                    k=p.k, kw=kw: run_layer(fm, a, k, accumulate=True, **kw)
    return cases


ROUTER_CASES = [
    ("softmax_topk", 2, dict(renormalize=False)),
    ("sigmoid_topk", 3, dict(n_group=4, topk_group=2, scale=2.5)),
    ("switch_top1", 1, dict(capacity=3)),
    ("switch_top1", 1, dict(capacity_factor=1.0, min_capacity=1, priority="score")),
    ("gshard_top2", 2, dict(capacity=4, random_routing=True, seed=5)),
    ("gshard_top2", 2, dict(capacity_factor=None)),
    ("expert_choice", 8, dict(capacity=5)),
    ("dense_gating", 8, dict()),
    ("noisy_topk", 2, dict(train=True, seed=3)),
    ("noisy_topk", 2, dict(train=False)),
]


def router_cases(fm):
    cases = {}
    for i, (router, k, opts) in enumerate(ROUTER_CASES):
        for T, act in ((37, "swiglu"), (300, "gelu_tanh")):
            def case(router=router, k=k, opts=opts, T=T, act=act, i=i):
                rng = np.random.default_rng(100 + i)
                arrays = layer_arrays(rng, T, 64, 48, 8, act)
                kw = dict(opts)
                if router == "noisy_topk":
                    kw["noise_w"] = (rng.standard_normal((64, 8)) * 0.3).astype(np.float32)
                arrays["router_b"] = (rng.standard_normal(8) * 0.1).astype(np.float32)
                return run_layer(fm, arrays, k, router=router, activation=act, **kw)
            cases[f"router/{i}/{router}/T{T}/{act}"] = case
    return cases


def op_cases(fm):
    from fastmoe_nb.interop import routed_experts, routed_experts_backward
    cases = {}
    for T in (3, 40, 600):
        for trans_w in (False, True):
            for act in ("swiglu", "relu", "silu", "gelu"):
                def experts(T=T, trans_w=trans_w, act=act):
                    rng = np.random.default_rng(T)
                    a = layer_arrays(rng, T, 72, 56, 6, act, trans_w=trans_w)
                    ex = rng.integers(0, 5, (T, 2)).astype(np.int32)  # expert 5 empty
                    ex[:, 1] = (ex[:, 0] + 1) % 6
                    wt = rng.random((T, 2)).astype(np.float32)
                    y = routed_experts(a["x"], ex, wt, a["w1"], a["w2"], act, trans_w)
                    y2, ctx = routed_experts(a["x"], ex, wt, a["w1"], a["w2"], act, trans_w,
                                             return_context=True)
                    dy = rng.standard_normal(y.shape).astype(np.float32)
                    dx, dwt, dw1, dw2 = routed_experts_backward(dy, ctx)
                    out = digests(y=y, y2=y2, dx=dx, dwt=dwt, dw1=dw1, dw2=dw2)
                    plan = fm.make_plan(ex, 6)
                    xs = fm.permute(a["x"], plan)
                    g = fm.grouped_gemm(xs, a["w1"], plan.offsets, trans_w)
                    da, dw = fm.grouped_gemm_backward(g, xs, a["w1"], plan.offsets, trans_w)
                    pk = fm.pack_weights(a["w1"], trans_w, swiglu=act == "swiglu")
                    gp = fm.grouped_gemm(xs, pk, plan.offsets, trans_w)
                    ef = fm.experts_forward(xs, pk, a["w2"], plan.offsets, act, trans_w)
                    ef2 = fm.experts_forward(xs, a["w1"], a["w2"], plan.offsets, act, trans_w,
                                             keep=True)
                    d_ys = rng.standard_normal(ef2[2].shape).astype(np.float32)
                    eb = fm.experts_backward(d_ys, xs, ef2[0], ef2[1], a["w1"], a["w2"],
                                             plan.offsets, act, trans_w)
                    acc = (np.ones_like(a["w1"]), None)
                    eb2 = fm.experts_backward(d_ys, xs, ef2[0], ef2[1], a["w1"], a["w2"],
                                              plan.offsets, act, trans_w, into=acc)
                    out.update(digests(g=g, da=da, dw=dw, gp=gp, ef_h=ef[1], ef_y=ef[2],
                                       ef2_pre=ef2[0], ef2_act=ef2[1], ef2_y=ef2[2],
                                       eb_dx=eb[0], eb_dw1=eb[1], eb_dw2=eb[2],
                                       eb2_dx=eb2[0], eb2_dw1=eb2[1], eb2_dw2=eb2[2]))
                    return out
                cases[f"ops/T{T}/trans{int(trans_w)}/{act}"] = experts
    return cases


def other_cases(fm):
    cases = {}

    def soft():
        from fastmoe_nb.routing import soft_moe, soft_moe_backward
        rng = np.random.default_rng(5)
        x = rng.standard_normal((24, 32)).astype(np.float32)
        phi = rng.standard_normal((32, 8)).astype(np.float32)
        w1 = (rng.standard_normal((4, 32, 40)) * 0.3).astype(np.float32)
        w2 = (rng.standard_normal((4, 20, 32)) * 0.3).astype(np.float32)
        y, ctx = soft_moe(x, phi, w1, w2, 2, "swiglu", seq_len=6, return_context=True)
        dx, grads = soft_moe_backward(np.ones_like(y), ctx)
        return digests(y=y, dx=dx, grads=grads if isinstance(grads, dict) else
                       {str(i): g for i, g in enumerate(grads)})
    cases["soft_moe"] = soft

    def train_step():
        from fastmoe_nb import nn
        out = {}
        for router, extra in (("softmax_topk", dict(shared_h=16, shared_gate=True)),
                              ("sigmoid_topk", dict())):
            layer = nn.MoE(48, 40, 8, 2, router=router, aux_loss_coef=0.01,
                           z_loss_coef=0.001, rng=np.random.default_rng(3), **extra)
            opt = nn.AdamW(layer, lr=1e-3)
            x = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
            for _ in range(2):
                y = layer.forward(x)
                layer.zero_grad()
                dx = layer.backward(np.ones_like(y))
                opt.step()
            out.update(digests(**{f"{router}.y": y, f"{router}.dx": dx}))
            out.update(digests(**{f"{router}.p": {n: p.value for n, p in
                                                  layer.named_parameters()}}))
        return out
    cases["nn_train_step"] = train_step

    def expert_parallel():
        from fastmoe_nb import parallel
        rng = np.random.default_rng(11)
        a = layer_arrays(rng, 50, 64, 48, 8, "swiglu", shared_h=16)
        y, ctx = parallel.ep_moe_forward(a["x"], a["router_w"], a["w1"], a["w2"], 2,
                                         shared_w1=a["shared_w1"], shared_w2=a["shared_w2"],
                                         return_context=True)
        dx, grads = parallel.ep_moe_backward(np.ones_like(y), ctx)
        return digests(y=y, dx=dx, grads=grads)
    cases["expert_parallel_1rank"] = expert_parallel
    return cases


def cuda_cases(fm):
    """Tiny CUDA launches (in the simulator): every router through the layer, routed_experts."""
    from numba import cuda
    from fastmoe_nb.interop import routed_experts, routed_experts_backward
    cases = {}
    for i, (router, k, opts) in enumerate(ROUTER_CASES[:2] + [("softmax_topk", 2, {})]):
        def case(router=router, k=k, opts=opts, i=i):
            rng = np.random.default_rng(200 + i)
            a = layer_arrays(rng, 9, 16, 12, 8, "swiglu", shared_h=8, shared_gate=True)
            a = {n: cuda.to_device(v) for n, v in a.items()}
            y, ctx = fm.moe_forward(**a, k=k, router=router, return_context=True, **opts)
            dx, grads = fm.moe_backward(cuda.to_device(np.ones(y.shape, np.float32)), ctx)
            return digests(y=y, dx=dx, grads=grads)
        cases[f"cuda/{router}/{i}"] = case

    def experts():
        rng = np.random.default_rng(9)
        a = layer_arrays(rng, 7, 16, 12, 4, "gelu", trans_w=True)
        ex = cuda.to_device(rng.integers(0, 4, (7, 2)).astype(np.int32))
        wt = cuda.to_device(rng.random((7, 2)).astype(np.float32))
        y, ctx = routed_experts(cuda.to_device(a["x"]), ex, wt, cuda.to_device(a["w1"]),
                                cuda.to_device(a["w2"]), "gelu", True, return_context=True)
        out = routed_experts_backward(cuda.to_device(np.ones(y.shape, np.float32)), ctx)
        return digests(y=y, **{f"g{i}": g for i, g in enumerate(out)})
    cases["cuda/routed_experts"] = experts
    return cases


def run(which):
    import fastmoe_nb as fm
    if which == "cuda":
        cases = cuda_cases(fm)
    else:
        cases = {**preset_cases(fm), **router_cases(fm), **op_cases(fm), **other_cases(fm)}
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as e:  # noqa: BLE001 (a case that raises is recorded as such)
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("record", "compare"))
    ap.add_argument("path")
    ap.add_argument("--cuda-sim", action="store_true", help="also the CUDA cases (simulator)")
    ap.add_argument("--only", choices=("cpu", "cuda"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:                                # the child process of --cuda-sim
        json.dump(run(args.only), sys.stdout)
        return 0
    results = run("cpu")
    if args.cuda_sim:
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        child = subprocess.run([sys.executable, __file__, args.mode, args.path, "--only",
                                "cuda"], env=env, capture_output=True, text=True, check=True)
        results.update(json.loads(child.stdout))
    if args.mode == "record":
        with open(args.path, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        errors = sum("error" in r for r in results.values())
        print(f"recorded {len(results)} cases ({errors} raising) in {args.path}")
        return 0
    with open(args.path) as f:
        before = json.load(f)
    differ = [n for n in sorted(set(before) | set(results)) if before.get(n) != results.get(n)]
    for n in differ:
        b, a = before.get(n, {}), results.get(n, {})
        keys = sorted(k for k in set(b) | set(a) if b.get(k) != a.get(k))
        print(f"DIFFERS {n}: {', '.join(keys)}")
    print(f"{len(results) - len(differ)} of {len(set(before) | set(results))} cases "
          f"bit-for-bit equal")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
