"""Check, then time: a Case, its Baselines, and measure(), which refuses to time a result
that its check rejects."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .timer import Progress, no_sync, stats, timed

# The correctness gate on max |got - reference| / max |reference|: loose enough for the
# rounding of sums over a preset's widths (thousands of terms, added in another order than
# the reference adds them), while a wrong row, expert or index is an error of order 1.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9}


class UsageError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


@dataclass
class Baseline:
    """Another implementation of a Case: run() -> host outputs; check(outputs) -> max rel err
    against the Case's reference, or None; flops / nbytes when they differ from the Case's;
    sync: what its calls wait on (a device), None for host calls."""

    run: Callable
    check: Optional[Callable] = None
    flops: Optional[float] = None
    nbytes: Optional[float] = None
    sync: Optional[Callable] = None


@dataclass
class Case:
    """One op on one shape, ready to run.

    run() -> outputs (host or device); check(outputs) -> (max rel err, what was checked);
    flops / nbytes: the work and the minimal memory traffic of one call; baselines: name ->
    a factory giving a Baseline (or a str saying why it cannot run: built only when asked
    for), or a str saying why it does not apply; reference: what check compares with."""

    run: Callable
    check: Callable
    flops: float
    nbytes: float
    baselines: dict = field(default_factory=dict)
    routing: Optional[dict] = None
    reference: str = "reference.py"


def rel_err(got, want):
    """max |got - want| / max |want| in float64 (inf when the shapes differ); integer arrays
    (indices) compare exactly: 0 or inf."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    if want.dtype.kind in "iub":
        return 0.0 if np.array_equal(got, want) else float("inf")
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def select_baselines(case, names, explicit, op):
    """The Baselines of names to run beside case -> {name: Baseline, or why it cannot run}.
    A name the case has no baseline for is left out, or with explicit (the user named it) a
    UsageError, as is one that cannot run here."""
    wanted = {}
    for name in names:
        b = case.baselines.get(name, f"does not apply to '{op}'")
        b = b if isinstance(b, str) else b()
        if explicit and isinstance(b, str):
            raise UsageError(f"--compare {name}: {b}")
        if isinstance(b, Baseline) or name in case.baselines:
            wanted[name] = b
    return wanted


def rates(entry, flops, nbytes, machine, cpu):
    """GFLOP/s, GB/s of entry's median and, on the CPU with machine ceilings, what bounds the
    op (its FLOPs per byte against the machine's, roofline style) and the fraction of that
    ceiling reached."""
    t = entry["median_s"]
    entry["gflops"] = flops / t / 1e9 if flops and t > 0 else None
    entry["gbs"] = nbytes / t / 1e9 if t > 0 else None
    if machine and cpu:
        compute = flops > 0 and flops / nbytes > machine["matmul_gflops"] / machine["read_gbs"]
        entry["bound"] = "compute" if compute else "memory"
        entry["fraction_of_peak"] = (entry["gflops"] / machine["matmul_gflops"] if compute
                                     else entry["gbs"] / machine["read_gbs"])
    else:
        entry["bound"], entry["fraction_of_peak"] = None, None


def measure(case, repeat, tolerance, label="fastmoe_nb", sync=no_sync, wanted=None,
            machine=None, cpu=True, quiet=True):
    """Check case's first call, then time it and the wanted baselines ({name: Baseline, or
    why it cannot run}) in one interleaved run -> the result fields: first_call_s, correct,
    check, and only when correct the timings, rates and baselines (each with its own check
    and time_vs_fastmoe_nb)."""
    wanted = wanted or {}
    res = {}
    total = 2 + repeat + sum(1 + repeat for b in wanted.values() if isinstance(b, Baseline))
    progress = Progress(total, quiet)
    try:
        t0 = time.perf_counter()
        out = case.run()
        sync()
        res["first_call_s"] = time.perf_counter() - t0
        progress.step(f"{label}: first call")
        err, what = case.check(out)
        del out
        res["correct"] = bool(err <= tolerance)
        res["check"] = {"max_rel_err": err if math.isfinite(err) else None,
                        "tolerance": tolerance, "checked": what, "reference": case.reference}
        progress.step(f"{label}: reference check")
        if not res["correct"]:
            return res
        res["baselines"], res["skipped_baselines"] = [], {}
        runs, entries = [(label, case.run, sync)], []
        for name, b in wanted.items():
            if isinstance(b, str):
                res["skipped_baselines"][name] = b
                continue
            first = b.run()
            (b.sync or no_sync)()
            progress.step(f"{name}: first call")
            entries.append(({"name": name,
                             "max_rel_err": b.check(first) if b.check else None}, b))
            del first
            runs.append((name, b.run, b.sync or no_sync))
        times = timed(runs, repeat, progress)
        res.update(stats(times[0]))
        res["compile_s"] = max(res["first_call_s"] - res["median_s"], 0.0)
        rates(res, case.flops, case.nbytes, machine, cpu)
        for (entry, b), t in zip(entries, times[1:]):
            entry.update(stats(t))
            flops = case.flops if b.flops is None else b.flops
            nbytes = case.nbytes if b.nbytes is None else b.nbytes
            entry["flops"], entry["bytes"] = flops, nbytes
            rates(entry, flops, nbytes, machine, True)
            entry["time_vs_fastmoe_nb"] = entry["median_s"] / res["median_s"]
            res["baselines"].append(entry)
    finally:
        progress.close()
    return res
