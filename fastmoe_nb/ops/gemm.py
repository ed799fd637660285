"""Grouped GEMM: one matrix product per expert over its block of rows."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module


def check_offsets(offsets, E, N, name="offsets"):
    """offsets: (E+1,) integers, 0 = offsets[0] <= ... <= offsets[E] = N (host array)."""
    chk.check_int_array(name, offsets, shape=(E + 1,))
    o = np.asarray(offsets)
    if o[0] != 0 or o[-1] != N or (E and np.any(np.diff(o) < 0)):
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to N = {N} "
                         f"(E+1 = {E + 1} entries), got {o[0]}..{o[-1]}"
                         + ("" if E == 0 or not np.any(np.diff(o) < 0) else ", decreasing"))
    return np.ascontiguousarray(o, dtype=np.int64)


def check_gemm_args(a, w, offsets, trans_w):
    """Validate a grouped GEMM's operands; returns (a, w, offsets, M) on the host."""
    a = chk.check_float("a", as_host("a", a), ndim=2)
    w = chk.check_float("w", as_host("w", w), ndim=3, dtype=a.dtype)
    K = a.shape[1]
    if (w.shape[2] if trans_w else w.shape[1]) != K:
        lay = "(E, M, K)" if trans_w else "(E, K, M)"
        raise ValueError(f"w: expected shape {lay} with K = a.shape[1] = {K} "
                         f"(trans_w={trans_w}), got {tuple(w.shape)}")
    offsets = check_offsets(as_host("offsets", offsets), w.shape[0], a.shape[0])
    return a, w, offsets, (w.shape[1] if trans_w else w.shape[2])


def grouped_gemm(a, w, offsets, trans_w=False):
    """a: (N, K), w: (E, K, M) — or (E, M, K) with trans_w, the PyTorch Linear layout used
    without a copy —, offsets: (E+1,) -> (N, M); rows offsets[e]:offsets[e+1] are
    a[rows] @ w[e] (or @ w[e].T)."""
    if backend_of(a=a, w=w) == CUDA:
        return cuda_module().grouped_gemm(a, w, offsets, trans_w)
    a, w, offsets, M = check_gemm_args(a, w, offsets, bool(trans_w))
    out = np.empty((a.shape[0], M), a.dtype)
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            np.matmul(a[lo:hi], w[e].T if trans_w else w[e], out=out[lo:hi])
    return out


def grouped_gemm_backward(dy, a, w, offsets, trans_w=False):
    """The gradients of grouped_gemm. dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)],
    offsets: (E+1,) -> da (N, K), dw (E, K, M) [trans_w: (E, M, K)], dw in w's layout.

    da[rows of e] = dy[rows] @ w[e].T; dw[e] = a[rows].T @ dy[rows], zero for an expert with
    no rows."""
    if backend_of(dy=dy, a=a, w=w) == CUDA:
        return cuda_module().grouped_gemm_backward(dy, a, w, offsets, trans_w)
    trans_w = bool(trans_w)
    a, w, offsets, M = check_gemm_args(a, w, offsets, trans_w)
    dy = chk.check_float("dy", as_host("dy", dy), shape=(a.shape[0], M), dtype=a.dtype)
    da = np.zeros(a.shape, a.dtype)
    dw = np.zeros(w.shape, w.dtype)
    for e in range(w.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        if hi > lo:
            np.matmul(dy[lo:hi], w[e] if trans_w else w[e].T, out=da[lo:hi])
            if trans_w:
                np.matmul(dy[lo:hi].T, a[lo:hi], out=dw[e])
            else:
                np.matmul(a[lo:hi].T, dy[lo:hi], out=dw[e])
    return da, dw
