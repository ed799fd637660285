"""The cases of the memory-bound kernels alone, called below the public ops with outputs
preallocated (no validation, no page faults of fresh buffers): activations forward and
backward, softmax_topk, permute and combine on a preset's shape (CPU), and permute / combine
on a large batch (CUDA). Each is checked against reference.py and compared with a copy of
the same bytes (its floor) and, optionally, the same kernels of another source tree.

These cases name kernel functions of kernels/cpu and kernels/cuda, the one place in the
harness that does: a renamed kernel is renamed here too.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from importlib import import_module

import numpy as np
from numba.core.caching import NullCache
from numba.core.dispatcher import Dispatcher

import fastmoe_nb as fm

from .. import reference as ref
from .cases import Host, copy_baseline
from .core import Baseline, Case, rel_err


def load_package(tree):
    """The fastmoe_nb package of another source tree, imported as fastmoe_nb_baseline (its
    imports are relative, so it loads beside this tree's), with numba's cache off for it: a
    cache entry records the module name it was compiled under, so entries written under this
    alias would break that tree's own later imports (and its own entries would break here)."""
    init = os.path.join(os.path.abspath(tree), "fastmoe_nb", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "fastmoe_nb_baseline", init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    for name, sub in list(sys.modules.items()):
        if name.startswith(spec.name):
            for obj in vars(sub).values():
                if isinstance(obj, Dispatcher):
                    obj._cache = NullCache()
    return mod


def _cpu_calls(preset, pkg, seed):
    """[(name, call -> output, bytes read + written, reference output)] of one package's CPU
    kernels on preset's shape, inputs drawn from seed (the same for every package)."""
    ka, kd, kr, common = (import_module(f"{pkg.__name__}.kernels.{m}") for m in (
        "cpu.activations", "cpu.dispatch", "cpu.routing", "common"))
    rng = np.random.default_rng(seed)
    T, d, h, E, k = preset.shape
    f32 = np.float32
    logits = rng.standard_normal((T, E)).astype(f32)
    r = fm.softmax_topk(logits, k)
    plan = fm.make_plan(r.experts, E)
    N = plan.num_rows
    x = rng.standard_normal((T, d)).astype(f32)
    xs = np.empty((N, d), f32)
    y = np.empty((T, d), f32)
    h2 = (2 * rng.standard_normal((N, 2 * h))).astype(f32)
    h1 = np.ascontiguousarray(h2[:, :h])
    dyh = rng.standard_normal((N, h)).astype(f32)
    act = np.empty((N, h), f32)
    dh2, dh1 = np.empty_like(h2), np.empty_like(h1)
    w, ex = np.empty((T, k), f32), np.empty((T, k), np.int32)
    xs_in = ref.permute(x, plan)
    out = []
    for name in ("swiglu", "silu", "gelu_tanh"):
        code = common.ACTIVATION_CODES[name]
        hin, dh = (h2, dh2) if name == "swiglu" else (h1, dh1)
        out.append((f"{name} fwd",
                    lambda hin=hin, code=code: (ka.activate_kernel(hin, code, act), act)[1],
                    hin.nbytes + act.nbytes, lambda hin=hin, name=name: ref.activate(hin, name)))
        out.append((f"{name} bwd",
                    lambda hin=hin, code=code, dh=dh: (ka.activate_backward_kernel(
                        dyh, hin, code, dh), dh)[1],
                    dyh.nbytes + hin.nbytes + dh.nbytes,
                    lambda hin=hin, name=name: ref.activate_backward(dyh, hin, name)))
    out.append(("softmax_topk", lambda: (kr.softmax_topk_kernel(logits, k, True, w, ex),
                                         (w, ex))[1],
                logits.nbytes + w.nbytes + ex.nbytes, lambda: ref.softmax_topk(logits, k)))
    out.append(("permute", lambda: (kd.permute_kernel(x, plan.rows, k, xs), xs)[1],
                x.nbytes + plan.rows.nbytes + xs.nbytes, lambda: xs_in))
    out.append(("combine", lambda: (kd.combine_kernel(xs_in, plan.slots, r.weights, y), y)[1],
                xs_in.nbytes + plan.slots.nbytes + r.weights.nbytes + y.nbytes,
                lambda: ref.combine(xs_in, plan, r.weights)))
    return out


def _err(got, want):
    if isinstance(want, tuple):   # softmax_topk: (weights, experts) against a Routing
        if not np.array_equal(got[1], want.experts):
            return float("inf")
        return rel_err(got[0], want.weights)
    return rel_err(got, want)


def cpu_kernel_cases(preset, seed=0, other=None):
    """{f"{preset.name} {kernel}": Case} of the CPU kernels, each with the baselines "copy"
    and, with other (a package from load_package), "baseline tree"."""
    mine = _cpu_calls(preset, fm, seed)
    theirs = _cpu_calls(preset, other, seed) if other is not None else None
    cases = {}
    for i, (name, run, nbytes, want) in enumerate(mine):
        def check(out, want=want):
            return _err(out, want()), "all rows"

        bl = {"copy": lambda nbytes=nbytes: copy_baseline(nbytes, Host())}
        if theirs is not None:
            bl["baseline tree"] = lambda i=i, check=check: Baseline(
                theirs[i][1], lambda out, check=check: check(out)[0])
        cases[f"{preset.name} {name}"] = Case(run, check, 0.0, float(nbytes), bl)
    return cases


def cuda_kernel_cases(be, T=65536, d=1024, E=8, k=2, seed=0):
    """{name: Case} of the CUDA permute and combine kernels on (T, d) float32 with outputs
    preallocated (about 1 GB moved by permute at the defaults: launches amortized), each
    against a device copy of the same bytes."""
    # imported here: kernels.cuda.dispatch imports numba.cuda, which looks for a driver
    from ..kernels.cuda import dispatch as kd  # noqa: PLC0415
    from ..kernels.cuda import launch  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((T, E)), axis=1)[:, :k].astype(np.int32)
    hplan = ref.make_plan(experts, E)
    plan = fm.make_plan(be.to_dev(experts), E)
    N = hplan.num_rows
    xh = rng.standard_normal((T, d), dtype=np.float32)
    wh = rng.random((T, k), dtype=np.float32)
    x, w = be.to_dev(xh), be.to_dev(wh)
    xs = be.to_dev(np.empty((N, d), np.float32))
    y = be.to_dev(np.empty((T, d), np.float32))
    ys = be.to_dev(ref.permute(xh, hplan))
    threads, grid = launch.CONFIG["threads"], min(N, launch.CONFIG["max_blocks"])
    perm = launch.kernel(kd.specs, "permute", np.dtype(np.float32))
    comb = launch.kernel(kd.specs, "combine", np.dtype(np.float32))

    def permute():
        perm[grid, threads](x, plan.rows, k, xs)
        return xs

    def combine():
        comb[min(T, grid), threads](ys, plan.slots, w, y)
        return y

    nb_p, nb_c = 8.0 * N * d, 4.0 * (N + T) * d
    return {
        "permute kernel": Case(permute, lambda out: (rel_err(be.to_host(out),
                                                             ref.permute(xh, hplan)),
                                                     f"all {N} rows"), 0.0, nb_p,
                               {"copy": lambda: copy_baseline(nb_p, be)}),
        "combine kernel": Case(combine, lambda out: (rel_err(be.to_host(out), ref.combine(
            ref.permute(xh, hplan), hplan, wh)), f"all {T} tokens"), 0.0, nb_c,
                               {"copy": lambda: copy_baseline(nb_c, be)}),
    }
