"""Measurements the cost model is fitted to; run under MPI, rank 0 prints one JSON line.

    mpiexec -n 2 python -m fastmoe_nb.parallel.measure
    mpiexec -n 4 python -m fastmoe_nb.parallel.measure

- alltoallv: seconds of one Alltoallv moving m bytes to every other rank, for several m;
- allreduce: seconds of one Allreduce of n bytes;
- step: one expert-parallel layer, forward + backward (ep_moe_forward / ep_moe_backward)
  on T tokens per rank, next to the same FLOPs computed locally on every rank at the same
  time (moe_forward / moe_backward of the rank's tokens on E/P experts): their difference is
  what the exchanges cost inside the layer.

Each figure is the median over repeats of the slowest rank's time (a barrier before each).
Run the ranks with one thread each (NUMBA_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1) so that
they share the cores as they would share a node.
"""
from __future__ import annotations

import json
import time

import numpy as np

from . import comm as mc
from ..moe import moe_backward, moe_forward
from .moe import ep_moe_backward, ep_moe_forward, shard_experts

A2A_BYTES = (64, 1024, 8192, 65536, 262144, 1048576, 4194304)
ALLREDUCE_BYTES = (64, 8192, 262144, 4194304)
STEP = dict(T=1024, d=512, h=512, E=8, k=2)       # per-rank tokens, SwiGLU experts


def timed(comm, fn, repeat):
    """Median over repeat runs of the slowest rank's seconds for fn()."""
    MPI = mc.mpi()
    fn()                                            # warm: buffers, kernels
    out = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        out.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return float(np.median(out))


def alltoallv_times(comm, sizes=A2A_BYTES):
    P = comm.Get_size()
    out = []
    for m in sizes:
        rows = np.full(P, m // 4, np.int64)        # float32 "rows" of width 1
        send = np.ones((P * (m // 4), 1), np.float32)
        t = timed(comm, lambda: mc.exchange_rows(comm, send, rows, rows),  # noqa: B023
                  repeat=30 if m <= 65536 else 8)
        out.append([m, t])
    return out


def allreduce_times(comm, sizes=ALLREDUCE_BYTES):
    out = []
    for n in sizes:
        a = np.ones(n // 4, np.float32)
        out.append([n, timed(comm, lambda: mc.allreduce_sum(comm, a),  # noqa: B023
                             repeat=30 if n <= 65536 else 8)])
    return out


def step_times(comm, T, d, h, E, k, repeat=5):
    P, r = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(0)
    f = lambda *s, sc=1.0: (rng.standard_normal(s) * sc).astype(np.float32)  # noqa: E731
    X, dY = f(P * T, d), f(P * T, d)
    router_w, w1, w2 = f(d, E, sc=d ** -0.5), f(E, d, 2 * h, sc=d ** -0.5), f(E, h, d,
                                                                                sc=h ** -0.5)
    x, dy = X[r * T:(r + 1) * T], dY[r * T:(r + 1) * T]
    w1l, w2l = shard_experts(w1, comm), shard_experts(w2, comm)

    def ep_step():
        y, ctx = ep_moe_forward(x, router_w, w1l, w2l, k=k, comm=comm, return_context=True)
        ep_moe_backward(dy, ctx)

    # the same expert FLOPs without the exchange: this rank's tokens on E/P experts
    rw_local = np.ascontiguousarray(router_w[:, :E // P])
    kl = min(k, E // P)

    def local_step():
        y, ctx = moe_forward(x, rw_local, w1l, w2l, k=kl, return_context=True)
        moe_backward(dy, ctx)

    rows = T * kl                                   # routed rows of the local step
    flops = 3 * 2.0 * rows * d * (2 * h + h)        # forward + backward (2x) expert GEMMs
    ep_t, local_t = timed(comm, ep_step, repeat), timed(comm, local_step, repeat)
    return dict(T=T, d=d, h=h, E=E, k=k, ep=ep_t, local=local_t, rows_local=rows,
                ep_rows=T * k, gflops_local=flops / local_t / 1e9)


def main():
    comm = mc.get_comm()
    res = dict(P=comm.Get_size(), alltoallv=alltoallv_times(comm),
               allreduce=allreduce_times(comm), step=step_times(comm, **STEP))
    if comm.Get_rank() == 0:
        print("MEASURE " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
