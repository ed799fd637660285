"""Compile every CUDA kernel of fastmoe_nb, with each signature the host wrappers launch it
with, to PTX for real GPU targets — no GPU needed (numba-cuda's compile_ptx).

The simulator (NUMBA_ENABLE_CUDASIM=1) runs kernels as Python and cannot show that they
compile; this does: untyped variables, Python objects and unsupported calls fail here.

    python tools/cuda_compile_check.py [--cc 9.0 7.5] [-v] [--no-cache]

Exit status 0 when every kernel compiled for every target; 1 with the failures listed. Run
under the default launch configuration (launch.DEFAULTS), as a GPU runs it. A compilation that
succeeded is remembered (~/.cache/fastmoe_nb/) under a hash of the CUDA kernel sources, the
shared maths and the numba / numba-cuda versions, so an unchanged tree is not compiled twice;
a clean machine (CI) compiles everything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# the checkout this script is in, not an installed fastmoe_nb (the script's folder would come
# first on the path otherwise)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastmoe_nb" / (
    "cuda_compile_check.json")


def source_digest():
    """Hash of what the PTX depends on: the CUDA kernels, the shared maths, the compilers."""
    import numba  # noqa: PLC0415
    import numba_cuda  # noqa: PLC0415

    import fastmoe_nb.kernels as kernels  # noqa: PLC0415

    root = Path(kernels.__file__).parent
    h = hashlib.sha256(f"{numba.__version__} {numba_cuda.__version__}".encode())
    for f in [root / "common.py", *sorted((root / "cuda").glob("*.py"))]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:24]


def _load_cache():
    try:
        return set(json.loads(CACHE.read_text()))
    except (OSError, ValueError):
        return set()


def _save_cache(keys):
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=CACHE.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(sorted(keys), f)
        os.replace(tmp, CACHE)
    except OSError:
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", nargs="*", default=[f"{a}.{b}" for a, b in TARGETS],
                    help="compute capabilities (default: 9.0 7.5)")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--no-cache", action="store_true", help="compile even what passed before")
    args = ap.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        sys.exit("cuda_compile_check: unset NUMBA_ENABLE_CUDASIM (the simulator compiles nothing)")
    from numba import cuda  # noqa: PLC0415

    device = _no_device_compile()
    ccs = [tuple(int(p) for p in c.split(".")) for c in args.cc]
    failures, n, cached, t0 = [], 0, 0, time.perf_counter()
    digest = source_digest()
    passed = set() if args.no_cache else _load_cache()
    for family, name, dt, fn, sig in kernels():
        for cc in ccs:
            device.compute_capability = cc
            n += 1
            key = f"{digest} {family}.{name} {dt} sm_{cc[0]}{cc[1]}"
            if key in passed and not args.verbose:
                cached += 1
                continue
            try:
                ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
                passed.add(key)
                local = ptx.count("ld.local") + ptx.count("st.local")
                if args.verbose:
                    print(f"ok   sm_{cc[0]}{cc[1]} {family}.{name} {dt}: {len(ptx)} chars PTX, "
                          f"{local} local-memory accesses")
            except Exception as e:  # noqa: BLE001  (every failure is reported)
                failures.append(f"{family}.{name} {dt} sm_{cc[0]}{cc[1]}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                print("FAIL", failures[-1])
    _save_cache({k for k in passed | _load_cache() if k.startswith(digest)})
    print(f"cuda_compile_check: {n - len(failures)}/{n} kernel compilations to PTX succeeded "
          f"in {time.perf_counter() - t0:.1f} s ({cached} unchanged since a previous run)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
