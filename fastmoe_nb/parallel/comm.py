"""The MPI side of expert parallelism, in one place: the communicator, the collective
validation, and the two exchanges (Alltoall of counts, Alltoallv of rows).

mpi4py is imported lazily, so `import fastmoe_nb` never needs MPI. Every function here is a
collective: all ranks of the communicator call it, in the same order.
"""
from __future__ import annotations

import numpy as np


def mpi():
    """The mpi4py.MPI module; one clear error when it is not installed."""
    try:
        from mpi4py import MPI  # noqa: PLC0415  (optional dependency, imported on use)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastmoe_nb.parallel needs mpi4py and an MPI library: "
                          "pip install 'fastmoe-nb[mpi]' (mpi4py + mpich)") from e
    return MPI


def get_comm(comm=None):
    """comm, or MPI.COMM_WORLD when None; anything without Get_size/Alltoallv is an error."""
    if comm is None:
        return mpi().COMM_WORLD
    for attr in ("Get_size", "Get_rank", "Alltoallv", "allgather"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm: expected an mpi4py communicator (MPI.Comm), got "
                            f"{type(comm).__name__}")
    return comm


def check_collectively(comm, check, what):
    """Run check() on every rank, then agree: one allgather of (error, signature).

    check() validates this rank's arguments (and may do local work that can reject them, such
    as routing with its finiteness check) and returns (signature, result): signature a tuple
    of (name, value) pairs that must be equal on every rank (widths, dtype, options), or it
    raises ValueError/TypeError. If any rank
    raised, or the signatures differ, every rank raises: the failing rank its own error, the
    others a ValueError naming the failing rank and its message — so no rank is left waiting
    in an exchange that another rank never enters. Returns check()'s result on success.
    """
    err = sig = None
    try:
        sig = check()
    except (ValueError, TypeError) as e:
        err = e
    found = comm.allgather((None if err is None else (type(err).__name__, str(err)),
                            None if sig is None else sig[0]))
    if err is not None:
        raise err
    bad = [(r, e) for r, (e, _) in enumerate(found) if e is not None]
    if bad:
        r, (kind, msg) = bad[0]
        cls = TypeError if kind == "TypeError" else ValueError
        raise cls(f"{what}: rank {r} of {len(found)} rejected its arguments ({msg})")
    mine = sig[0]
    for r, (_, s) in enumerate(found):
        if s != mine:
            diff = [f"{name} = {a!r} here (rank {comm.Get_rank()}) but {b!r} on rank {r}"
                    for (name, a), (_, b) in zip(mine, s) if a != b]
            raise ValueError(f"{what}: expected the same {', '.join(n for n, _ in mine)} on "
                             f"every rank; " + "; ".join(diff))
    return sig[1]


def exchange_counts(comm, send_counts):
    """Alltoall of counts. send_counts: (P, El) int64, rows this rank sends to rank p for its
    local expert l -> recv_counts (P, El) int64, rows rank s sends here for local expert l."""
    recv = np.empty_like(send_counts)
    comm.Alltoall(np.ascontiguousarray(send_counts), recv)
    return recv


def exchange_rows(comm, send, send_rows, recv_rows):
    """Alltoallv of rows, one buffer per direction.

    send: (sum(send_rows), d), rows for rank p contiguous and in rank order;
    send_rows / recv_rows: (P,) rows to / from each rank -> recv: (sum(recv_rows), d), the
    rows of rank 0 first, then rank 1, ..."""
    d = send.shape[1]
    recv = np.empty((int(recv_rows.sum()), d), send.dtype)
    sc = (send_rows * d).astype(np.int64)
    rc = (recv_rows * d).astype(np.int64)
    sd = np.zeros_like(sc)
    rd = np.zeros_like(rc)
    np.cumsum(sc[:-1], out=sd[1:])
    np.cumsum(rc[:-1], out=rd[1:])
    comm.Alltoallv([np.ascontiguousarray(send), (sc, sd)], [recv, (rc, rd)])
    return recv


def allreduce_sum(comm, a):
    """a: any shape -> the elementwise sum over ranks (a new array; a is left unchanged).
    Every rank gets the same bits (MPICH combines the same partial sums on every rank, as the
    MPI standard advises), which keeps replicated weights identical across ranks."""
    out = np.empty_like(a)
    comm.Allreduce(np.ascontiguousarray(a), out, op=mpi().SUM)
    return out


def exscan_sum(comm, a):
    """a: any shape -> its exclusive prefix sum over ranks: rank r gets the sum of a over
    ranks 0..r-1 (zeros on rank 0)."""
    out = np.zeros_like(a)
    comm.Exscan(np.ascontiguousarray(a), out, op=mpi().SUM)
    if comm.Get_rank() == 0:
        out[...] = 0           # MPI leaves rank 0's buffer undefined
    return out
