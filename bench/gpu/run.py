"""The CUDA backend on a GPU, in one call: a configuration of the benchmark harness
(fastmoe_nb.benchmark) with the CUDA backend.

1. per preset, every op of the layer (route, make_plan, permute, combine, both expert GEMMs,
   the activation, moe_forward) is checked against reference.py, then timed (a sample is
   enough calls to take 2 ms, then cuda.synchronize(); interleaved rounds) beside:
   - the grouped GEMMs: cuBLAS fp32 SGEMM (TF32 off) of equal FLOPs through PyTorch or CuPy,
     and the first GEMM with its activation fused in the epilogue;
   - permute / combine / activate: a device-to-device copy of the same bytes;
   - moe_forward: the CPU path on host arrays, and HF transformers' Mixtral block with the
     'grouped_mm' experts on the GPU (torch and transformers installed);
2. the grouped GEMM's tile configurations (--tiles) on the first preset;
3. the permute / combine kernels alone on ~1 GB (outputs preallocated), beside a device copy.

    python bench/gpu/run.py [--presets mixtral-mini deepseek-mini fine-128 decode-8]
                            [--repeat 10] [--json results.json]

The rows are written to --json (default: $OUT/gpu_bench.json when $OUT is set). `--tiny` runs
a toy preset, for checking the script itself in the simulator (NUMBA_ENABLE_CUDASIM=1). Exit
status 1 when a check fails (that case is not timed).
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

from fastmoe_nb import benchmark as bm  # noqa: E402
from fastmoe_nb.benchmark.kernels import cuda_kernel_cases  # noqa: E402
from fastmoe_nb.presets import CPU_PERF_PRESETS, Preset, get_preset  # noqa: E402

OPS = ("route", "make_plan", "permute", "combine", "grouped_gemm", "activate", "grouped_gemm2",
       "layer")
BASELINES = ["sgemm", "fused-act", "copy", "cpu", "hf-grouped_mm-cuda"]
TINY = dict(threads=32, max_blocks=4, route_threads=4, max_k=8, plan_chunks=4, plan_min_chunk=2,
            scan_threads=4, gemm_bm=8, gemm_bn=8, gemm_bk=4, gemm_tm=2, gemm_tn=2)


def tile_sweep(p, tiles, be, repeat, check_tokens):
    """The first expert GEMM (plain and with the fused activation) for each tile config
    "BM,BN,BK,TM,TN" of launch.configure, on preset p's routing -> result rows."""
    from fastmoe_nb.kernels.cuda import launch  # noqa: PLC0415  (imports numba.cuda)

    saved, rows = dict(launch.CONFIG), []
    try:
        for spec in tiles:
            bm_, bn, bk, tm, tn = (int(v) for v in spec.split(","))
            try:
                launch.configure(gemm_bm=bm_, gemm_bn=bn, gemm_bk=bk, gemm_tm=tm, gemm_tn=tn)
                case = bm.make_case("grouped_gemm", p, "float32", be, 0, None, check_tokens)
                rows += bm.run_cases({f"{p.name} grouped_gemm tiles {spec}": case}, repeat,
                                     ["fused-act"], sync=be.sync, cpu=False)
            except Exception as e:  # noqa: BLE001  (a config the device rejects is reported)
                print(f"tiles {spec}: {type(e).__name__}: {e}"[:120], flush=True)
    finally:
        launch.configure(**saved)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="*", default=list(CPU_PERF_PRESETS))
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--check-tokens", type=int, default=1024, metavar="N",
                    help="tokens (rows) checked against reference.py")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiles", nargs="*", default=["64,64,16,4,4", "128,128,8,8,8",
                                                   "128,64,8,8,4", "64,64,8,4,4"],
                    help="grouped GEMM tiles BM,BN,BK,TM,TN swept on the first preset")
    ap.add_argument("--tiny", action="store_true", help="a toy preset (simulator smoke test)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        be = bm.Cuda()
    except bm.UsageError as e:
        print(f"run.py: {e}", file=sys.stderr)
        return 2
    if args.tiny:
        from fastmoe_nb.kernels.cuda import launch  # noqa: PLC0415

        launch.configure(**TINY)
        presets = [Preset("tiny", 12, 8, 6, 4, 2)]
        args.repeat, args.tiles = min(args.repeat, 2), ["8,8,4,2,2"]
    else:
        presets = [get_preset(n) for n in args.presets]
    dev = be.cuda.get_current_device()
    name = getattr(dev, "name", "simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    print(f"device: {name!r} cc {dev.compute_capability}; python {platform.python_version()}"
          f"; numpy {np.__version__}", flush=True)
    rows = []
    for p in presets:
        t1 = time.perf_counter()
        for op in OPS:
            case = bm.make_case(op, p, "float32", be, 0, None, args.check_tokens)
            rows += bm.run_cases({f"{p.name} {op}": case}, args.repeat, BASELINES,
                                 sync=be.sync, cpu=False)
        print(f"{p.name}: done in {time.perf_counter() - t1:.1f} s", flush=True)
    rows += tile_sweep(presets[0], args.tiles, be, args.repeat, args.check_tokens)
    size = dict(T=16, d=8, E=4, k=2) if args.tiny else {}
    rows += bm.run_cases(cuda_kernel_cases(be, **size), args.repeat, ["copy"], sync=be.sync,
                         cpu=False)
    print()
    bm.table(rows)
    out = args.json or (os.path.join(os.environ["OUT"], "gpu_bench.json")
                        if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(dict(device=name, versions=bm.versions(), rows=rows),
                                        indent=1, default=str))
        print(f"numbers: {out}")
    status = bm.exit_status(rows)
    print(f"total {time.perf_counter() - t0:.0f} s; "
          f"{sum(not r['correct'] for r in rows)} check(s) failed")
    return status


if __name__ == "__main__":
    sys.exit(main())
