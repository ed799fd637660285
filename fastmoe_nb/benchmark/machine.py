"""What the machine has: the ceilings a result is divided by (measured in the same run), the
memory a case may use, installed versions, and the facts `fastmoe-nb info` prints."""
from __future__ import annotations

import os
import platform
from importlib import metadata

import llvmlite.binding as llvm
import numba
import numpy as np

from .. import __version__
from .. import baselines as B
from ..backends import cuda_module
from ..formats import FORMAT
from ..kernels.cpu import bf16dot, int8dot
from ..kernels.cpu.config import ISA
from .core import UsageError


def memory_available():
    """Bytes of memory available now (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(p, dtype, op, compare, formats=(), ggml=False):
    """A one-line UsageError when the op's arrays cannot fit in the host's memory; formats:
    the weight formats of `--weights` (each a copy of the experts, ggml holding another)."""
    item = np.dtype(dtype).itemsize
    rows = p.tokens * p.k
    need = item * (p.experts * p.d * (p.h1 + p.h) + rows * (2 * p.d + p.h1 + p.h)
                   + 3 * p.tokens * p.d)
    need *= 3 if op == "train-step" else 1          # weight gradients, saved activations
    need += 8 * p.d * (p.h1 + p.h) * 2               # the reference's float64 expert copies
    need *= 2 if compare and not formats else 1      # HF holds its own copy of the weights
    values = p.experts * p.d * (p.h1 + p.h)
    if formats:                                      # the trans_w float32 copy, one format's
        need += 8 * values                           # dequantized weights for its check
    for f in formats:
        spec = FORMAT[f]
        need += spec.block_bytes / spec.block * values * (2 if ggml else 1)
    have = memory_available()
    if have is not None and need > 0.8 * have:
        raise UsageError(f"preset {p.name} (T={p.tokens}, d={p.d}, h={p.h}, E={p.experts}) "
                         f"needs about {need / 1e9:.1f} GB for '{op}', {have / 1e9:.1f} GB are "
                         f"available: use its -laptop preset or smaller --tokens/--d/--h")


def measure_machine(dtype, threads):
    """The ceilings, measured now: dense matmul GFLOP/s (in dtype) and read GB/s."""
    with B.thread_limits(threads):
        return {"matmul_gflops": B.matmul_rate(np.dtype(dtype)),
                "matmul_shape": list(B.MATMUL_SHAPE), "read_gbs": B.read_bandwidth(),
                "threads": threads}


def versions():
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    v = {"fastmoe_nb": __version__, "python": platform.python_version()}
    for dist in ("numpy", "numba", "scipy", "llvmlite", "numba-cuda", "torch", "transformers",
                 "threadpoolctl", "tqdm", "matplotlib"):
        try:
            v[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            v[dist] = None
    return v


def machine_info():
    """What the machine has, as a dict (the `info` command)."""
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
        from threadpoolctl import threadpool_info  # noqa: PLC0415  (optional)

        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads",
                                       "threading_layer", "architecture")}
                for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        blas = [{"numpy": "see numpy.show_config() (threadpoolctl not installed)"}]
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # which kernels this CPU gets: the ISA class the blocking follows, and the opt-in
    # activations' native instructions (without them those settings run plain code)
    kernels = {"isa": ISA, "bf16_activations_vdpbf16ps": bf16dot.NATIVE,
               "q8_0_activations_vpdpbusd": int8dot.VNNI}
    info = {"versions": versions(), "cpu": {"name": llvm.get_host_cpu_name(),
                                            "logical_cores": os.cpu_count(), "simd": simd,
                                            "machine": platform.machine(), "kernels": kernels},
            "threads": {"numba_num_threads": numba.config.NUMBA_NUM_THREADS,
                        "numba_threads_now": numba.get_num_threads(), "threading_layer": layer},
            "blas": blas, "cuda": cuda_info(),
            "numba_cache": numba.config.CACHE_DIR or os.path.join(package, "**", "__pycache__")
            + " (beside each kernel's source; set NUMBA_CACHE_DIR to move it)"}
    mem = memory_available()
    info["memory_available_gb"] = None if mem is None else round(mem / 1e9, 1)
    return info


def cuda_info():
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    out = {"simulator": sim, "numba_cuda": None, "gpus": [], "fastmoe_nb_backend": None}
    try:
        from numba import cuda  # noqa: PLC0415  (imported only when asked: it reads the driver)

        out["numba_cuda"] = bool(cuda.is_available())
        if out["numba_cuda"] and not sim:
            out["gpus"] = [str(g.name.decode() if isinstance(g.name, bytes) else g.name)
                           for g in cuda.gpus]
    except Exception as e:  # noqa: BLE001  (any driver/toolkit failure means: no CUDA here)
        out["numba_cuda"] = False
        out["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        cuda_module()
        out["fastmoe_nb_backend"] = "ready"
    except (RuntimeError, ImportError) as e:
        out["fastmoe_nb_backend"] = str(e).splitlines()[0]
    return out
