"""The CUDA backend on a GPU, in one call (under 8 minutes on an H200):

1. check every CUDA op against the CPU path at the full preset sizes (max |gpu - cpu| /
   max |cpu|; index outputs exactly);
2. time them with CUDA events (median of --repeat after warm-up) and print one table:
   - grouped GEMM GFLOP/s next to cuBLAS fp32 SGEMM (TF32 off) of equal FLOPs, through CuPy
     or PyTorch, whichever is present (target: >= 50 % on mixtral-mini);
   - permute / combine GB/s next to a device-to-device copy of the same bytes (target >= 60 %):
     per op at the preset sizes (allocation and launch included), and the kernels alone on
     ~1 GB (bandwidth());
   - moe_forward next to the CPU path and to HF transformers' Mixtral block with the
     'grouped_mm' experts implementation on the GPU, when torch and transformers are there.

    python bench/gpu/run.py [--presets mixtral-mini deepseek-mini fine-128 decode-8]
                            [--repeat 20] [--json results.json]

Numbers are written to --json (default: $OUT/gpu_bench.json when $OUT is set). `--tiny` runs a
toy preset, for checking the script itself in the simulator (NUMBA_ENABLE_CUDASIM=1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fastmoe_nb as fm  # noqa: E402
from fastmoe_nb.baselines import (hf_mixtral_module, hf_supports, layer_inputs,  # noqa: E402
                                  time_calls)
from fastmoe_nb.kernels.common import ACTIVATION_CODES  # noqa: E402
from fastmoe_nb.presets import CPU_PERF_PRESETS, Preset, get_preset  # noqa: E402

from numba import cuda  # noqa: E402
from fastmoe_nb.kernels import cuda as kc  # noqa: E402

TOL = 1e-5


# --------------------------------------------------------------------------- helpers

def gpu_time(fn, repeat, warmup=3):
    """Median seconds of fn() between two CUDA events on the default stream (the stream
    Numba, CuPy and PyTorch launch on by default)."""
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cuda.event(), cuda.event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)   # ms
    return float(np.median(times))


def rel_err(got, want):
    got = got.copy_to_host() if hasattr(got, "copy_to_host") else np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    if want.size == 0:
        return 0.0
    if want.dtype.kind in "iu":
        return 0.0 if np.array_equal(got, want) else float("inf")
    scale = max(float(np.abs(want).max()), 1e-30)
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) / scale


def sgemm_baseline():
    """(name, make(m, k, n) -> fn) for cuBLAS fp32 SGEMM with TF32 off, or None."""
    try:
        import torch  # noqa: PLC0415

        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")

            def make(m, k, n):
                a = torch.randn(m, k, device="cuda")
                b = torch.randn(k, n, device="cuda")
                c = torch.empty(m, n, device="cuda")
                return lambda: torch.matmul(a, b, out=c)

            return f"torch {torch.__version__} cuBLAS SGEMM (TF32 off)", make
    except ImportError:
        pass
    try:
        import cupy  # noqa: PLC0415

        os.environ.pop("CUPY_TF32", None)

        def make(m, k, n):
            a = cupy.random.standard_normal((m, k), dtype=cupy.float32)
            b = cupy.random.standard_normal((k, n), dtype=cupy.float32)
            c = cupy.empty((m, n), cupy.float32)
            return lambda: cupy.matmul(a, b, out=c)

        return f"cupy {cupy.__version__} cuBLAS SGEMM (TF32 off)", make
    except ImportError:
        return None


def hf_grouped_mm_gpu(inputs, k):
    """transformers' MixtralSparseMoeBlock, experts implementation 'grouped_mm', on the GPU,
    holding the same weights -> (forward() on device tensors, y as NumPy), or None."""
    try:
        import torch  # noqa: PLC0415
        import transformers  # noqa: F401, PLC0415
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    block = hf_mixtral_module(inputs, k, "grouped_mm").cuda().eval()
    x = inputs["x"]
    T, d = x.shape
    xt = torch.from_numpy(x).reshape(1, T, d).cuda()

    def forward():
        with torch.no_grad():
            out = block(xt)
        return out[0] if isinstance(out, tuple) else out

    return forward


# --------------------------------------------------------------------------- one preset

def run_preset(p: Preset, repeat, sgemm, rows_out):
    inp = layer_inputs(p)
    T, d, h, E, k = p.shape
    code = ACTIVATION_CODES[p.activation]
    D = {n: cuda.to_device(v) for n, v in inp.items()}
    rkw = p.router_kwargs()
    bias = inp.get("bias")
    cap = p.capacity()
    kw = dict(activation=p.activation, capacity=cap, **rkw)
    if bias is not None:
        kw["bias"] = bias

    # --- the CPU path: every stage, the reference of the checks
    logits = inp["x"] @ inp["router_w"]
    route = fm.softmax_topk if p.router == "softmax_topk" else fm.sigmoid_topk
    rargs = {"renormalize": p.renormalize} if p.router == "softmax_topk" else dict(
        bias=bias, n_group=p.n_group, topk_group=p.topk_group, renormalize=p.renormalize,
        scale=p.scale)
    r = route(logits, k, **rargs)
    plan = fm.make_plan(r.experts, E, cap)
    xs = fm.permute(inp["x"], plan)
    h_pre = fm.grouped_gemm(xs, inp["w1"], plan.offsets)
    h_act = fm.activate(h_pre, p.activation)
    ys = fm.grouped_gemm(h_act, inp["w2"], plan.offsets)
    y = fm.combine(ys, plan, r.weights)
    y_cpu_full = fm.moe_forward(inp["x"], inp["router_w"], inp["w1"], inp["w2"], k,
                                **{**kw, **({"shared_w1": inp["shared_w1"],
                                             "shared_w2": inp["shared_w2"]}
                                            if p.shared_h else {})})
    N = plan.num_rows

    # --- the same stages on the GPU, each from the CPU's inputs
    d_logits = cuda.to_device(logits)
    dargs = dict(rargs)
    if "bias" in dargs and dargs["bias"] is not None:
        dargs["bias"] = D["bias"]
    g_r = route(d_logits, k, **dargs)
    g_plan = fm.make_plan(cuda.to_device(r.experts), E, cap)
    d_xs, d_hact, d_ys = cuda.to_device(xs), cuda.to_device(h_act), cuda.to_device(ys)
    d_hpre, d_w = cuda.to_device(h_pre), cuda.to_device(r.weights)
    shared = {"shared_w1": D["shared_w1"], "shared_w2": D["shared_w2"]} if p.shared_h else {}
    dkw = {**kw, **shared}
    if bias is not None:
        dkw["bias"] = D["bias"]
    checks = {
        "router experts": rel_err(g_r.experts, r.experts),
        "router weights": rel_err(g_r.weights, r.weights),
        "make_plan rows": rel_err(g_plan.rows, plan.rows),
        "make_plan offsets": rel_err(g_plan.offsets, plan.offsets),
        "make_plan slots": rel_err(g_plan.slots, plan.slots),
        "permute": rel_err(fm.permute(D["x"], g_plan), xs),
        "grouped_gemm w1": rel_err(fm.grouped_gemm(d_xs, D["w1"], g_plan.offsets), h_pre),
        "grouped_gemm w1 + act (fused)": rel_err(
            kc.grouped_gemm(d_xs, D["w1"], g_plan.offsets, False, code), h_act),
        "activate": rel_err(fm.activate(d_hpre, p.activation), h_act),
        "grouped_gemm w2": rel_err(fm.grouped_gemm(d_hact, D["w2"], g_plan.offsets), ys),
        "combine": rel_err(fm.combine(d_ys, g_plan, d_w), y),
        "moe_forward": rel_err(fm.moe_forward(D["x"], D["router_w"], D["w1"], D["w2"], k,
                                              **dkw), y_cpu_full),
    }

    # --- timings
    H1 = p.h1
    t = {}
    t["router"] = gpu_time(lambda: route(d_logits, k, check_finite=False, **dargs), repeat)
    t["make_plan"] = gpu_time(lambda: fm.make_plan(g_r.experts, E, cap), repeat)
    t["permute"] = gpu_time(lambda: fm.permute(D["x"], g_plan), repeat)
    t["combine"] = gpu_time(lambda: fm.combine(d_ys, g_plan, d_w), repeat)
    t["gemm1"] = gpu_time(lambda: fm.grouped_gemm(d_xs, D["w1"], g_plan.offsets), repeat)
    t["gemm1+act"] = gpu_time(
        lambda: kc.grouped_gemm(d_xs, D["w1"], g_plan.offsets, False, code), repeat)
    t["gemm2"] = gpu_time(lambda: fm.grouped_gemm(d_hact, D["w2"], g_plan.offsets), repeat)
    t["moe_forward"] = gpu_time(lambda: fm.moe_forward(
        D["x"], D["router_w"], D["w1"], D["w2"], k, check_finite=False, **dkw), repeat)
    copy_src = cuda.device_array((N, d), np.float32)
    copy_dst = cuda.device_array((N, d), np.float32)
    t["d2d copy (N, d)"] = gpu_time(lambda: copy_dst.copy_to_device(copy_src), repeat)
    cpu_kw = {**kw, **({"shared_w1": inp["shared_w1"], "shared_w2": inp["shared_w2"]}
                       if p.shared_h else {})}
    t["cpu moe_forward"] = float(np.median(time_calls(lambda: fm.moe_forward(
        inp["x"], inp["router_w"], inp["w1"], inp["w2"], k, **cpu_kw), repeat=3)))
    if sgemm is not None:
        t["sgemm1"] = gpu_time(sgemm[1](N, d, H1), repeat)
        t["sgemm2"] = gpu_time(sgemm[1](N, h, d), repeat)
    hf_why = hf_supports(p)
    hf = hf_grouped_mm_gpu(inp, k) if hf_why is None else None
    if hf is not None:
        t["hf grouped_mm"] = gpu_time(hf, repeat)
        checks["hf grouped_mm vs cpu"] = rel_err(hf().float().cpu().numpy().reshape(T, d),
                                                y_cpu_full)

    f1, f2 = 2.0 * N * d * H1, 2.0 * N * h * d
    moved = 2.0 * N * d * 4                      # permute: read a row, write a row (fp32)
    moved_c = (N * d + T * d) * 4.0              # combine: read N rows, write T rows
    rate = {
        "gemm1 GFLOP/s": f1 / t["gemm1"] / 1e9,
        "gemm1+act GFLOP/s": f1 / t["gemm1+act"] / 1e9,
        "gemm2 GFLOP/s": f2 / t["gemm2"] / 1e9,
        "permute GB/s": moved / t["permute"] / 1e9,
        "combine GB/s": moved_c / t["combine"] / 1e9,
        "d2d copy GB/s": moved / t["d2d copy (N, d)"] / 1e9,
    }
    if sgemm is not None:
        rate["sgemm1 GFLOP/s"] = f1 / t["sgemm1"] / 1e9
        rate["sgemm2 GFLOP/s"] = f2 / t["sgemm2"] / 1e9
    rows_out.append(dict(preset=p.name, shape=p.shape, N=N, checks=checks, seconds=t,
                         rates=rate, hf=hf_why or ("ok" if hf is not None else "unavailable")))
    return rows_out[-1]


def tile_sweep(p: Preset, tiles, repeat):
    """grouped GEMM GFLOP/s of the first expert GEMM (plain and with the fused activation)
    for each tile config "BM,BN,BK,TM,TN" (launch.configure), on preset p's routing."""
    from fastmoe_nb.kernels.cuda import launch  # noqa: PLC0415

    inp = layer_inputs(p)
    T, d, h, E, k = p.shape
    r = fm.softmax_topk(inp["x"] @ inp["router_w"], k)
    plan = fm.make_plan(r.experts, E)
    xs = fm.permute(inp["x"], plan)
    want = fm.grouped_gemm(xs, inp["w1"], plan.offsets)
    d_xs, d_w1 = cuda.to_device(xs), cuda.to_device(inp["w1"])
    flops = 2.0 * plan.num_rows * d * p.h1
    code = ACTIVATION_CODES[p.activation]
    saved = dict(launch.CONFIG)
    out = []
    for spec in tiles:
        bm, bn, bk, tm, tn = (int(v) for v in spec.split(","))
        try:
            launch.configure(gemm_bm=bm, gemm_bn=bn, gemm_bk=bk, gemm_tm=tm, gemm_tn=tn)
            err = rel_err(fm.grouped_gemm(d_xs, d_w1, plan.offsets), want)
            t1 = gpu_time(lambda: fm.grouped_gemm(d_xs, d_w1, plan.offsets), repeat)
            t2 = gpu_time(lambda: kc.grouped_gemm(d_xs, d_w1, plan.offsets, False, code), repeat)
            out.append((spec, err, flops / t1 / 1e9, flops / t2 / 1e9))
        except Exception as e:  # noqa: BLE001  (a config the device rejects is reported)
            out.append((spec, f"{type(e).__name__}: {e}"[:80], None, None))
    launch.configure(**saved)
    print(f"\n== grouped GEMM tile sweep on {p.name} (first GEMM, N = {plan.num_rows}, "
          f"K = {d}, M = {p.h1})")
    print(f"{'BM,BN,BK,TM,TN':>16s} {'rel err':>10s} {'GFLOP/s':>10s} {'+act GF/s':>10s}")
    for spec, err, g1, g2 in out:
        if g1 is None:
            print(f"{spec:>16s} {err}")
        else:
            print(f"{spec:>16s} {err:10.1e} {g1:10.1f} {g2:10.1f}")
    return out


def bandwidth(repeat, T=65536, d=1024, E=8, k=2):
    """permute / combine kernels alone (outputs preallocated, so no allocation and the launch
    overhead amortized over ~1 GB) next to a device-to-device copy of the same bytes -> GB/s."""
    from fastmoe_nb.kernels.cuda import dispatch as kd  # noqa: PLC0415
    from fastmoe_nb.kernels.cuda import launch  # noqa: PLC0415

    rng = np.random.default_rng(0)
    experts = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    plan = fm.make_plan(cuda.to_device(experts), E)
    N = plan.num_rows
    x = cuda.to_device(rng.standard_normal((T, d), dtype=np.float32))
    w = cuda.to_device(rng.random((T, k), dtype=np.float32))
    xs, y = cuda.device_array((N, d), np.float32), cuda.device_array((T, d), np.float32)
    src, dst = cuda.device_array((N, d), np.float32), cuda.device_array((N, d), np.float32)
    threads, grid = launch.CONFIG["threads"], min(N, launch.CONFIG["max_blocks"])
    perm = launch.kernel(kd.specs, "permute", np.dtype(np.float32))
    comb = launch.kernel(kd.specs, "combine", np.dtype(np.float32))
    t_copy = gpu_time(lambda: dst.copy_to_device(src), repeat)
    t_perm = gpu_time(lambda: perm[grid, threads](x, plan.rows, k, xs), repeat)
    t_comb = gpu_time(lambda: comb[min(T, grid), threads](xs, plan.slots, w, y), repeat)
    ok = rel_err(xs, x.copy_to_host()[plan.rows.copy_to_host() // k])
    res = {"copy GB/s": 2 * N * d * 4 / t_copy / 1e9,
           "permute GB/s": 2 * N * d * 4 / t_perm / 1e9,
           "combine GB/s": (N + T) * d * 4 / t_comb / 1e9, "permute check": ok}
    print(f"\n== permute / combine kernels at T = {T}, d = {d}, k = {k} (N = {N}; "
          f"{2 * N * d * 4 / 1e9:.2f} GB moved by permute)")
    print(f"copy {res['copy GB/s']:.0f} GB/s; permute {res['permute GB/s']:.0f} GB/s "
          f"({100 * res['permute GB/s'] / res['copy GB/s']:.0f} %); combine "
          f"{res['combine GB/s']:.0f} GB/s ({100 * res['combine GB/s'] / res['copy GB/s']:.0f} "
          f"%); permute rel err {ok:.1e}")
    return res


# --------------------------------------------------------------------------- report

def report(rows, sgemm_name):
    print("\n== correctness: max |gpu - cpu| / max |cpu| (indices: 0 = equal), "
          f"tolerance {TOL:g}")
    names = sorted({c for r in rows for c in r["checks"]}, key=lambda s: list(
        rows[0]["checks"]).index(s) if s in rows[0]["checks"] else 99)
    print(f"{'check':32s}" + "".join(f"{r['preset']:>16s}" for r in rows))
    bad = 0
    for c in names:
        vals = [r["checks"].get(c) for r in rows]
        bad += sum(v is not None and not v <= TOL for v in vals)
        print(f"{c:32s}" + "".join(f"{'-' if v is None else format(v, '.1e'):>16s}"
                                   for v in vals))
    print(f"\n== speed ({sgemm_name or 'no cuBLAS baseline: neither torch nor cupy'})")
    head = ["preset", "gemm1 GF/s", "sgemm1", "%", "gemm2 GF/s", "sgemm2", "%",
            "+act GF/s", "permute GB/s", "combine GB/s", "copy GB/s", "perm %", "comb %",
            "moe ms", "cpu ms", "hf gmm ms"]
    print(" ".join(f"{h:>12s}" for h in head))
    for r in rows:
        q, s = r["rates"], r["seconds"]
        s1, s2 = q.get("sgemm1 GFLOP/s"), q.get("sgemm2 GFLOP/s")
        cells = [r["preset"], q["gemm1 GFLOP/s"], s1, None if s1 is None else
                 100 * q["gemm1 GFLOP/s"] / s1, q["gemm2 GFLOP/s"], s2,
                 None if s2 is None else 100 * q["gemm2 GFLOP/s"] / s2,
                 q["gemm1+act GFLOP/s"], q["permute GB/s"], q["combine GB/s"],
                 q["d2d copy GB/s"], 100 * q["permute GB/s"] / q["d2d copy GB/s"],
                 100 * q["combine GB/s"] / q["d2d copy GB/s"], 1e3 * s["moe_forward"],
                 1e3 * s["cpu moe_forward"],
                 None if "hf grouped_mm" not in s else 1e3 * s["hf grouped_mm"]]
        print(" ".join(f"{c:>12s}" if isinstance(c, str) else
                       (f"{'-':>12s}" if c is None else f"{c:12.1f}") for c in cells))
    print("\nrouter / make_plan ms: " + ", ".join(
        f"{r['preset']} {1e3 * r['seconds']['router']:.3f} / "
        f"{1e3 * r['seconds']['make_plan']:.3f}" for r in rows))
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(CPU_PERF_PRESETS))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiles", nargs="*", default=["64,64,16,4,4", "128,128,8,8,8",
                                                   "128,64,8,8,4", "64,64,8,4,4"],
                    help="grouped GEMM tiles BM,BN,BK,TM,TN swept on the first preset")
    ap.add_argument("--tiny", action="store_true", help="a toy preset (simulator smoke test)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    kc.require()
    if args.tiny:
        from fastmoe_nb.kernels.cuda import launch  # noqa: PLC0415

        launch.configure(threads=32, max_blocks=4, route_threads=4, max_k=8, plan_chunks=4,
                         plan_min_chunk=2, scan_threads=4, gemm_bm=8, gemm_bn=8, gemm_bk=4,
                         gemm_tm=2, gemm_tn=2)
        presets = [Preset("tiny", 12, 8, 6, 4, 2)]
        args.repeat = min(args.repeat, 2)
    else:
        presets = [get_preset(n) for n in args.presets]
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "simulator")
    print(f"device: {name!r} cc {dev.compute_capability}; python {platform.python_version()}"
          f"; numpy {np.__version__}")
    sgemm = sgemm_baseline()
    rows = []
    for p in presets:
        t1 = time.perf_counter()
        run_preset(p, args.repeat, sgemm, rows)
        print(f"{p.name}: done in {time.perf_counter() - t1:.1f} s", flush=True)
    sweep = tile_sweep(presets[0], ["8,8,4,2,2"] if args.tiny else args.tiles, args.repeat)
    bw = bandwidth(args.repeat, *((16, 8, 4, 2) if args.tiny else ()))
    bad = report(rows, sgemm[0] if sgemm else None)
    out = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json")
                        if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(dict(device=str(name), rows=rows, tile_sweep=sweep, bandwidth=bw,
                                             sgemm=sgemm[0] if sgemm else None), indent=1,
                                        default=str))
        print(f"numbers: {out}")
    print(f"total {time.perf_counter() - t0:.0f} s; {bad} check(s) above tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
