"""Compile every CUDA kernel of fastmoe_nb, with each signature the host wrappers launch it
with, to PTX for real GPU targets — no GPU needed (numba-cuda's compile_ptx).

The simulator (NUMBA_ENABLE_CUDASIM=1) runs kernels as Python and cannot show that they
compile; this does: untyped variables, Python objects and unsupported calls fail here.

    python tools/cuda_compile_check.py [--cc 9.0 7.5] [-v]

Exit status 0 when every kernel compiled for every target; 1 with the failures listed. Run
under the default launch configuration (launch.DEFAULTS), as a GPU runs it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

TARGETS = ((9, 0), (7, 5))  # Hopper, and the oldest architecture CUDA 13 (cu13) still builds


def _no_device_compile():
    """Compiling a kernel that calls @cuda.jit(device=True) functions asks the driver for the
    current device's compute capability; without a GPU, answer with the target's."""
    from numba.cuda import dispatcher  # noqa: PLC0415

    class _Device:
        compute_capability = TARGETS[0]

    dispatcher.get_current_device = lambda: _Device()
    return _Device


def kernels():
    """[(family, name, dtype, function, signature)] for every launched kernel."""
    import numpy as np  # noqa: PLC0415

    from fastmoe_nb.kernels.cuda import activations, dispatch, gemm, launch, routing  # noqa

    out = []
    for mod in (routing, dispatch, gemm, activations):
        family = mod.__name__.rsplit(".", 1)[1]
        launched = getattr(mod, "LAUNCHED", {})
        names = mod.specs(np.dtype(np.float32), dict(launch.DEFAULTS))
        for name in names:
            for dt in launched.get(name, ("float32", "float64")):
                fn, sig = mod.specs(np.dtype(dt), dict(launch.DEFAULTS))[name]
                out.append((family, name, dt, fn, sig))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", nargs="*", default=[f"{a}.{b}" for a, b in TARGETS],
                    help="compute capabilities (default: 9.0 7.5)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        sys.exit("cuda_compile_check: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")
    from numba import cuda  # noqa: PLC0415

    device = _no_device_compile()
    ccs = [tuple(int(p) for p in c.split(".")) for c in args.cc]
    failures, n, t0 = [], 0, time.perf_counter()
    for family, name, dt, fn, sig in kernels():
        for cc in ccs:
            device.compute_capability = cc
            n += 1
            try:
                ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
                local = ptx.count("ld.local") + ptx.count("st.local")
                if args.verbose:
                    print(f"ok   sm_{cc[0]}{cc[1]} {family}.{name} {dt}: {len(ptx)} chars PTX, "
                          f"{local} local-memory accesses")
            except Exception as e:  # noqa: BLE001  (every failure is reported)
                failures.append(f"{family}.{name} {dt} sm_{cc[0]}{cc[1]}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print("FAIL", failures[-1])
    print(f"cuda_compile_check: {n - len(failures)}/{n} kernel compilations to PTX succeeded "
          f"in {time.perf_counter() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
