"""The expert MLPs: experts_forward (two grouped GEMMs and an activation on tokens in expert
order), the shared (always-on) expert, and their backwards. Validated here, run by the
backend of the arrays (backends/cpu.py chooses each product's way from the block sizes)."""
from __future__ import annotations

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import CUDA, as_host, backend_of
from ..checks import (activation_code, check_gemm_weights, check_into, check_offsets,
                      check_shared, check_weights, hidden_width, on_side)
from ..formats import QuantizedWeights
from ..types import PackedWeights


def experts_forward(xs, w1, w2, offsets, activation, trans_w=False, keep=False):
    """The expert MLPs on tokens in expert order.

    xs: (N, d), w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h, d), (E, d, h)]
    -> (h_pre (N, h|2h) or None, h_act (N, h), ys (N, d)); h_pre is kept only when keep.
    On the CPU w1 / w2 may also be PackedWeights (pack_weights(w1, trans_w, swiglu=True) for
    swiglu), packed once per weight update; raw weights are streamed, sent to BLAS per expert
    or packed tile by tile inside the kernel, as the block sizes make fastest (each selected
    expert's weights read once: decoding is bound by that read). With PackedWeights packed
    for the activation, it runs in the first GEMM's epilogue (h_pre only written when keep).
    """
    trans_w, code = bool(trans_w), activation_code(activation)
    be = backend_of(xs=xs, **{n: w for n, w in (("w1", w1), ("w2", w2))
                              if not isinstance(w, PackedWeights)})
    if be == CUDA:
        chk.check_float("xs", xs, ndim=2)
        H1 = check_gemm_weights(xs, w1, trans_w, "w1")
        h = hidden_width(H1, activation)
        chk.check_float("w2", w2, shape=(w1.shape[0], xs.shape[1], h) if trans_w
                        else (w1.shape[0], h, xs.shape[1]), dtype=xs.dtype)
        return backends.get(CUDA).experts_forward(xs, w1, w2, offsets, code, h, trans_w, keep)
    xs = np.ascontiguousarray(chk.check_float("xs", as_host("xs", xs), ndim=2))
    w1, offsets, H1 = check_weights(w1, xs, offsets, trans_w, "w1")
    h = hidden_width(H1, activation)
    N = xs.shape[0]
    w2, _, d = check_weights(w2, np.broadcast_to(np.zeros((1, h), xs.dtype), (N, h)), offsets,
                             trans_w, "w2")
    if d != xs.shape[1]:
        got = repr(w2) if isinstance(w2, PackedWeights) else f"shape {tuple(w2.shape)}"
        raise ValueError(f"w2: expected {xs.shape[1]} output columns (xs.shape[1]), got {got}")
    return backends.cpu.experts_forward(xs, w1, w2, offsets, code, h, trans_w, keep)


def experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets, activation, trans_w=False,
                     into=None):
    """The gradients of experts_forward. d_ys: (N, d) gradient of ys; xs, h_pre, h_act: the
    forward's (kept with keep=True); w1, w2, offsets, activation, trans_w: as in the forward
    -> (d_xs (N, d), dw1, dw2), dw1 / dw2 in the forward's layout. into: None, or (dw1, dw2)
    arrays of w1's and w2's shapes (either may be None) into which the weight gradients are
    added in place, and which are returned in their place (gradient accumulation without
    new arrays; host arrays only). Weights in a format (fastmoe_nb.formats) are frozen:
    dw1 = dw2 = None, and into must be None."""
    trans_w, code = bool(trans_w), activation_code(activation)
    if backend_of(d_ys=d_ys, xs=xs, h_pre=h_pre, h_act=h_act, w1=w1, w2=w2) == CUDA:
        check_into(into, w1, w2, xs)                 # raises: host arrays only
        return backends.get(CUDA).experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets,
                                                   code, trans_w)
    xs = np.ascontiguousarray(chk.check_float("xs", as_host("xs", xs), ndim=2))
    N, d = xs.shape
    w1 = w1 if isinstance(w1, QuantizedWeights) else as_host("w1", w1)
    H1 = check_gemm_weights(xs, w1, trans_w, "w1")
    offsets = check_offsets(as_host("offsets", offsets), w1.shape[0], N)
    h = hidden_width(H1, activation)
    h_pre = chk.check_float("h_pre", as_host("h_pre", h_pre), shape=(N, H1), dtype=xs.dtype)
    h_act = chk.check_float("h_act", as_host("h_act", h_act), shape=(N, h), dtype=xs.dtype)
    d_ys = chk.check_float("d_ys", as_host("d_ys", d_ys), shape=(N, d), dtype=xs.dtype)
    w2 = w2 if isinstance(w2, QuantizedWeights) else as_host("w2", w2)
    check_gemm_weights(h_act, w2, trans_w, "w2")
    check_offsets(offsets, w2.shape[0], N)
    frozen = [n for n, w in (("w1", w1), ("w2", w2)) if isinstance(w, QuantizedWeights)]
    if frozen and into is not None:
        raise ValueError(f"into: {', '.join(frozen)} in a format get no weight gradient; "
                         f"expected into=None")
    into = check_into(into, w1, w2, xs)
    return backends.cpu.experts_backward(np.ascontiguousarray(d_ys), xs,
                                         np.ascontiguousarray(h_pre),
                                         np.ascontiguousarray(h_act), w1, w2, offsets, code,
                                         trans_w, into)


def _check_shared(x, w1, w2, gate_w, activation, **more):
    be = backend_of(x=x, w1=w1, w2=w2, gate_w=gate_w, **more)
    side = on_side(be)
    x = chk.check_float("x", side("x", x), ndim=2)
    w1, w2, gate_w, _ = check_shared(w1, w2, gate_w, x.shape[1], x.dtype, activation, side)
    return be, x, w1, w2, gate_w


def shared_forward(x, w1, w2, gate_w, activation):
    """The shared (always-on) expert: x (T, d), w1 (d, hs|2hs), w2 (hs, d), gate_w (d,),
    (d, 1) or None -> (s (T, d), cache). Qwen2-MoE gates it with sigmoid(x @ gate_w);
    DeepSeek-V3 does not. Several shared experts are one with their hidden columns
    concatenated."""
    code = activation_code(activation)
    be, x, w1, w2, gate_w = _check_shared(x, w1, w2, gate_w, activation)
    return backends.get(be).shared_forward(x, w1, w2, gate_w, code)


def shared_backward(ds, x, w1, w2, gate_w, cache, activation):
    """The gradients of shared_forward. ds: (T, d) gradient of its output s, x: (T, d),
    w1: (d, hs|2hs), w2: (hs, d), gate_w: (d, 1) or None, cache: shared_forward's
    -> (dx (T, d), dw1, dw2, dgate_w (d, 1) or None).

    With the gate s = m * g, m = act(x @ w1) @ w2, g = sigmoid(x @ gate_w): the gate's
    gradient <ds, m> per token is taken as <ds @ w2.T, h_act>, so m is never recomputed."""
    code = activation_code(activation)
    be, x, w1, w2, gate_w = _check_shared(x, w1, w2, gate_w, activation, ds=ds)
    ds = chk.check_float("ds", on_side(be)("ds", ds), shape=tuple(x.shape), dtype=x.dtype)
    if not isinstance(cache, dict) or not {"h_pre", "h_act", "gate"} <= set(cache):
        raise TypeError("cache: expected the cache dict of shared_forward")
    return backends.get(be).shared_backward(ds, x, w1, w2, gate_w, cache, code)


__all__ = ["experts_backward", "experts_forward", "shared_backward", "shared_forward"]
