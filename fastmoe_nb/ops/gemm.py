"""Grouped GEMM: one matrix product per expert over its block of rows, and its backward.

    out[offsets[e]:offsets[e+1]] = a[offsets[e]:offsets[e+1]] @ w[e]      (trans_w: @ w[e].T)

Validated here, run by the backend of the arrays: on the CPU the way (streamed weights,
per-expert BLAS, or the packed Numba kernel) is chosen from the block sizes by
backends/cpu.py's route(); pack_weights packs weights once per update for the kernel.
"""
from __future__ import annotations

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import CUDA, as_host, backend_of
from ..checks import check_gemm_args, check_weights
from ..formats import QuantizedWeights
from ..types import PackedWeights


def pack_weights(w, trans_w=False, swiglu=False):
    """w: (E, K, M) [trans_w: (E, M, K)] -> PackedWeights, reused by grouped_gemm and
    experts_forward until the next weight update. swiglu=True (M even, [gate | up]) lays the
    halves side by side for the fused swiglu epilogue; grouped_gemm's result is unchanged.
    PackedWeights always run the Numba kernel; raw weights take faster ways for some block
    sizes (per-expert BLAS for larger blocks, streaming for a few rows an expert)."""
    w = chk.check_float("w", as_host("w", w), ndim=3)
    trans_w = bool(trans_w)
    M = w.shape[1] if trans_w else w.shape[2]
    if swiglu and M % 2:
        raise ValueError(f"w: swiglu expects an even number of output columns holding "
                         f"[gate | up] halves, got {M}")
    return backends.cpu.pack_weights(np.ascontiguousarray(w), trans_w, bool(swiglu))


def grouped_gemm(a, w, offsets, trans_w=False):
    """a: (N, K), w: (E, K, M) — or (E, M, K) with trans_w, the PyTorch Linear layout used
    without a copy —, or PackedWeights from pack_weights(w, trans_w); offsets: (E+1,)
    -> (N, M); rows offsets[e]:offsets[e+1] are a[rows] @ w[e] (or @ w[e].T). w may be
    QuantizedWeights (fastmoe_nb.formats) of that logical shape: decoded a panel at a time,
    float32 accumulation."""
    trans_w = bool(trans_w)
    if not isinstance(w, PackedWeights) and backend_of(a=a, w=w) == CUDA:
        chk.check_float("a", a, ndim=2)
        return backends.get(CUDA).grouped_gemm(a, w, offsets, trans_w)
    a = chk.check_float("a", as_host("a", a), ndim=2)
    w, offsets, _ = check_weights(w, a, offsets, trans_w)
    return backends.cpu.grouped_gemm(np.ascontiguousarray(a), w, offsets, trans_w)


def grouped_gemm_backward(dy, a, w, offsets, trans_w=False):
    """The gradients of grouped_gemm. dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)],
    offsets: (E+1,) -> da (N, K), dw (E, K, M) [trans_w: (E, M, K)], dw in w's layout.

    da[rows of e] = dy[rows] @ w[e].T; dw[e] = a[rows].T @ dy[rows], zero for an expert with
    no rows. dw's sum over an expert's rows runs in one thread in row order: deterministic."""
    trans_w = bool(trans_w)
    if isinstance(w, QuantizedWeights):
        raise TypeError(f"w: {w.format} weights are frozen: they have no gradient dw; the "
                        f"gradient of a is grouped_gemm(dy, w, offsets, trans_w={not trans_w})")
    if backend_of(dy=dy, a=a, w=w) == CUDA:
        chk.check_float("a", a, ndim=2)
        return backends.get(CUDA).grouped_gemm_backward(dy, a, w, offsets, trans_w)
    a, w, offsets, M = check_gemm_args(a, w, offsets, trans_w)
    dy = chk.check_float("dy", as_host("dy", dy), shape=(a.shape[0], M), dtype=a.dtype)
    return backends.cpu.grouped_gemm_backward(np.ascontiguousarray(dy), np.ascontiguousarray(a),
                                              np.ascontiguousarray(w), offsets, trans_w)


__all__ = ["PackedWeights", "grouped_gemm", "grouped_gemm_backward", "pack_weights"]
