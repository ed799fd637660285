"""Per-expert BLAS products on a pool of worker threads, one BLAS thread each.

OpenBLAS called once per expert from one thread runs closer to a dense matmul's rate than
the Numba kernel of kernels/cpu/gemm.py does on such blocks (figures: docs/performance.md).
So for experts with blocks of rows large enough (backends/cpu.py: route) the
expert layer runs as a list of independent tasks — an expert's block of rows, or of dW's
columns — handed out to numba.get_num_threads() threads (the caller and pool workers); each
task calls single-threaded BLAS and, in the expert pipeline, the activation on its own rows
while they are in cache. One level of parallelism: OpenBLAS is held at one thread meanwhile,
so our calls never wake its worker threads, which spin for a while after a multi-threaded
call and slow the next Numba parallel kernel (README: OPENBLAS_THREAD_TIMEOUT).

A task's result does not depend on which thread runs it, nor on how many threads there are:
tasks are cut from the shapes alone, so outputs are bitwise the same for any thread count.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from ..kernels.cpu.config import TASK_ROWS

_lock = threading.Lock()
_state = {"pool": None, "controller": None, "depth": 0, "limiter": None}


def _after_fork():
    """A forked child has none of the parent's pool threads: start afresh (a pool copied
    from the parent would take tasks and never run them)."""
    global _lock
    _lock = threading.Lock()
    _state.update(pool=None, depth=0, limiter=None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _pool():
    with _lock:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                                thread_name_prefix="fastmoe_nb")
        return _state["pool"]


class _OneBlasThread:
    """Holds OpenBLAS (and any BLAS threadpoolctl sees) at one thread while any caller is
    inside; nested and concurrent callers share one limit, restored by the last to leave."""

    def __enter__(self):
        with _lock:
            if _state["depth"] == 0:
                if _state["controller"] is None:
                    from threadpoolctl import ThreadpoolController  # noqa: PLC0415
                    _state["controller"] = ThreadpoolController()
                _state["limiter"] = _state["controller"].limit(limits=1, user_api="blas")
            _state["depth"] += 1

    def __exit__(self, *exc):
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                _state["limiter"].restore_original_limits()
                _state["limiter"] = None


one_blas_thread = _OneBlasThread()


def run_tasks(fn, tasks):
    """fn(task, scratch) for every task of the list, on numba.get_num_threads() threads, each
    thread taking the next task when done with its last (tasks in any order), BLAS at one
    thread. scratch is a dict private to the thread, for buffers reused across its tasks.
    The first exception raised by a task is re-raised here once all threads have stopped."""
    n = min(numba.get_num_threads(), len(tasks))
    if n == 0:
        return
    it = iter(range(len(tasks)))       # next() on one iterator is atomic under the GIL
    errors = []

    def worker():
        scratch = {}
        try:
            for i in it:
                fn(tasks[i], scratch)
        except BaseException as e:    # noqa: BLE001 (re-raised in the caller)
            errors.append(e)
            for _ in it:               # drain: the other threads stop too
                pass

    with one_blas_thread:
        futures = []
        try:
            for _ in range(n - 1):
                futures.append(_pool().submit(worker))
        except RuntimeError:           # the interpreter is exiting (its pools are shut down,
            pass                       # e.g. a JAX callback at exit): the caller runs the rest
        worker()
        for f in futures:              # one not started yet (workers busy elsewhere) has
            if not f.cancel():         # nothing left to do
                f.result()
    if errors:
        raise errors[0]


def buffer(scratch, name, rows, cols, dtype):
    """A (rows, cols) view of a thread's scratch buffer `name`, grown as needed."""
    b = scratch.get(name)
    if b is None or b.dtype != dtype or b.size < rows * cols:
        b = scratch[name] = np.empty(max(rows * cols, 1), dtype)
    return b[:rows * cols].reshape(rows, cols)


def row_tasks(offsets, rows=TASK_ROWS, experts=None):
    """[(e, lo, hi)]: expert e's rows offsets[e]..offsets[e+1] cut into blocks of <= rows,
    for every expert (or those where the (E,) bool mask `experts` is True)."""
    return [(e, lo, min(lo + rows, int(offsets[e + 1])))
            for e in range(offsets.shape[0] - 1) if experts is None or experts[e]
            for lo in range(int(offsets[e]), int(offsets[e + 1]), rows)]


def matmul(a, b, out=None):
    """a (n, K) @ b (K, M) -> (n, M) in blocks of TASK_ROWS rows over the pool (no BLAS threads
    spinning afterwards)."""
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))

    def task(t, scratch):
        lo, hi = t
        np.matmul(a[lo:hi], b, out=out[lo:hi])

    run_tasks(task, [(lo, min(lo + TASK_ROWS, a.shape[0]))
                     for lo in range(0, a.shape[0], TASK_ROWS)])
    return out
