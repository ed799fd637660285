"""Launch configuration of every CUDA kernel, in one place, and the compiled-kernel cache.

Block sizes and tile shapes are compile-time constants of the kernels that use shared memory
(routing, scan, grouped GEMM), so each family describes its kernels as `specs(dt, cfg) ->
{name: (python function, signature)}` and `kernel(specs, name, dt)` compiles the one asked for,
once per (dtype, configuration). Every kernel is grid-stride: any grid is valid, and
`configure(...)` may shrink blocks and grids (the simulator tests run ~100 threads a launch).

The signatures listed by the specs are exactly those the host wrappers launch with (arrays in
'A' layout, so C-contiguous, strided, CuPy and PyTorch arrays share one compiled kernel), and
tools/cuda_compile_check.py compiles the same list to PTX.
"""
from __future__ import annotations

import functools

DEFAULTS = dict(
    threads=256,        # threads per block of the elementwise / grid-stride kernels
    max_blocks=4096,    # grid cap of the grid-stride kernels
    route_threads=32,   # threads cooperating on one token in the routers (a power of 2)
    max_k=32,           # the most experts (and groups) a CUDA router keeps per token
    plan_chunks=1024,   # chunks of the T*k assignments make_plan counts in parallel
    plan_min_chunk=16,  # ...each holding at least this many assignments
    scan_threads=256,   # threads of the single-block exclusive scan (a power of 2)
    gemm_bm=64,         # grouped GEMM tile rows (tokens)
    gemm_bn=64,         # grouped GEMM tile columns (output features; swiglu: gate + up halves)
    gemm_bk=16,         # grouped GEMM reduction step
    gemm_tm=4,          # rows of the register tile of one thread
    gemm_tn=4,          # columns of the register tile of one thread (swiglu: even)
)

CONFIG = dict(DEFAULTS)

_POW2 = ("route_threads", "scan_threads")


def configure(**changes):
    """Change launch parameters (keys of DEFAULTS; `configure(**DEFAULTS)` restores them).
    Kernels compiled for the old values are dropped; the next launch compiles new ones."""
    new = dict(CONFIG)
    for key, v in changes.items():
        if key not in DEFAULTS:
            raise ValueError(f"{key}: expected one of {', '.join(DEFAULTS)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}: expected a positive integer, got {v!r}")
        new[key] = v
    for key in _POW2:
        if new[key] & (new[key] - 1):
            raise ValueError(f"{key}: expected a power of 2, got {new[key]}")
    if new["gemm_bm"] % new["gemm_tm"] or new["gemm_bn"] % new["gemm_tn"]:
        raise ValueError("gemm_tm, gemm_tn: expected divisors of gemm_bm, gemm_bn")
    if new["gemm_tn"] % 2 or new["gemm_bn"] % 2:
        raise ValueError("gemm_tn, gemm_bn: expected even values (swiglu splits them in halves)")
    if gemm_threads(new) > 1024:
        raise ValueError("gemm_bm, gemm_bn, gemm_tm, gemm_tn: more than 1024 threads per block")
    CONFIG.clear()
    CONFIG.update(new)
    _compiled.cache_clear()
    return dict(CONFIG)


def gemm_threads(cfg=None):
    cfg = CONFIG if cfg is None else cfg
    return (cfg["gemm_bm"] // cfg["gemm_tm"]) * (cfg["gemm_bn"] // cfg["gemm_tn"])


def blocks(n, threads=None):
    """Blocks of a grid-stride launch over n items: enough to cover them, at most max_blocks."""
    threads = CONFIG["threads"] if threads is None else threads
    return max(1, min(-(-n // threads), CONFIG["max_blocks"]))


def _frozen():
    return tuple(sorted(CONFIG.items()))


@functools.lru_cache(maxsize=None)
def _specs(specs, dt, frozen):
    return specs(dt, dict(frozen))


# Check every launch's arguments against the kernel's signature (the tests turn it on: the
# simulator ignores signatures, and a GPU kernel compiled for one signature reinterprets what
# it is given).
CHECK_ARGS = False


def check_args(name, sig, args):
    """TypeError unless args match sig: arrays of its dtype and rank; integers for integer
    parameters, booleans for boolean ones, reals for float ones."""
    from numba import typeof, types  # noqa: PLC0415

    if len(args) != len(sig.args):
        raise TypeError(f"{name}: expected {len(sig.args)} arguments, got {len(args)}")
    for i, (want, a) in enumerate(zip(sig.args, args)):
        got = typeof(a)
        if isinstance(want, types.Array):
            ok = isinstance(got, types.Array) and (got.dtype, got.ndim) == (want.dtype, want.ndim)
        elif isinstance(want, types.Boolean):
            ok = isinstance(got, types.Boolean)
        elif isinstance(want, types.Integer):
            ok = isinstance(got, types.Integer)
        else:
            ok = isinstance(got, (types.Integer, types.Float))
        if not ok:
            raise TypeError(f"{name}: argument {i} is {got}, the kernel expects {want}")


class _Checked:
    """A kernel whose launches check their arguments first (CHECK_ARGS)."""

    def __init__(self, disp, name, sig):
        self.disp, self.name, self.sig = disp, name, sig

    def __getitem__(self, launch_config):
        run = self.disp[launch_config]

        def launch(*args):
            check_args(self.name, self.sig, args)
            return run(*args)

        return launch


@functools.lru_cache(maxsize=None)
def _compiled(specs, name, dt, frozen):
    from numba import cuda  # noqa: PLC0415

    fn, sig = _specs(specs, dt, frozen)[name]
    return cuda.jit(sig)(fn), sig


def kernel(specs, name, dt):
    """The compiled kernel `name` of a family's specs for dtype dt under the current CONFIG."""
    disp, sig = _compiled(specs, name, dt, _frozen())
    return _Checked(disp, name, sig) if CHECK_ARGS else disp
