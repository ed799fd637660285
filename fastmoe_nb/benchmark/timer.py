"""The one timer of the harness: samples of every call under comparison, taken in interleaved
rounds (baselines.time_interleaved), so that a shared machine's drift hits all of them alike
and the ratios of their medians do not depend on which one ran while a neighbour was busy."""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from .. import baselines

MIN_SAMPLE_S = 2e-3   # calls faster than this are timed in groups (the clock's noise)


def no_sync():
    """The sync of a host call: nothing to wait for."""


class Progress:
    """tqdm on stderr when installed and stderr is a terminal; otherwise silent."""

    def __init__(self, total, quiet):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm  # noqa: PLC0415  (optional: the bench extra)

                self.bar = tqdm(total=total, file=sys.stderr, unit="call", leave=False)
            except ImportError:
                pass

    def step(self, what):
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def timed(runs, repeat, progress=None):
    """runs: [(what, fn, sync)] -> [((repeat,) seconds per call, n)] in the same order.
    A sample times n calls of fn (and one sync), n chosen per fn from a call timed after
    baselines.settle() so that a sample lasts MIN_SAMPLE_S or more. The samples are taken
    in rounds, each round one sample of every fn in turn, each after the pause and one
    untimed sample (baselines.time_interleaved): the machine's drift over the run then
    hits fastmoe_nb and its baselines alike, and their ratios do not depend on which of
    them ran while a neighbour was busy."""
    samples, counts = [], []
    for _, fn, sync in runs:
        baselines.settle()
        t0 = time.perf_counter()
        fn()
        sync()
        n = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - t0, 1e-9)))

        def sample(fn=fn, sync=sync, n=n):
            for _ in range(n):
                fn()
            sync()

        samples.append(sample)
        counts.append(n)
    after = None if progress is None else (lambda j: progress.step(runs[j][0]))
    t = baselines.time_interleaved(samples, repeat, after=after)
    return [(t[j] / n, n) for j, n in enumerate(counts)]


def timed_cold(runs, repeat, flush, progress=None):
    """runs: [(what, fn)] -> [((repeat,) seconds of one call, 1)] in the same order, each call
    timed with cold caches: in rounds, every fn in turn after baselines.settle(), one untimed
    call (it wakes the threads the pause put to sleep) and flush(), which reads more than the
    last-level cache holds. A model's other layers evict a layer's weights between its calls;
    without the flush a decode step's few MB of quantized weights would come from the cache
    and run faster than the memory can deliver them."""
    out = [np.empty(repeat) for _ in runs]
    for i in range(repeat):
        for j, (what, fn) in enumerate(runs):
            baselines.settle()
            fn()
            flush()
            t0 = time.perf_counter()
            fn()
            out[j][i] = time.perf_counter() - t0
            if progress is not None:
                progress.step(what)
    return [(t, 1) for t in out]


def stats(timed_entry):
    """One entry of timed() -> the result row's timing fields (seconds per call)."""
    times, n = timed_entry
    return {"times_s": [float(t) for t in times], "calls_per_sample": n,
            "median_s": float(np.median(times)), "min_s": float(np.min(times)),
            "max_s": float(np.max(times))}
