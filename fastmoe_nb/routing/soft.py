"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Each expert owns p slots (S = E * p slots). With logits = x @ phi (T, S), every slot's input
is a mixture of all tokens of its sequence, weighted by the softmax over those tokens
(dispatch); every token's output is a mixture of all slot outputs, weighted by the softmax over
slots (combine). Nothing is dropped and everything is differentiable. Sequences are
independent: T = B * seq_len tokens.

Slot rows are expert-major, (slot s, sequence b) at row s * B + b, so expert e owns the
contiguous rows e*p*B .. (e+1)*p*B - 1 and the experts run as one grouped GEMM. The paper's
optional l2-normalization of x and phi (with a learned scale) is the caller's.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from .. import backends
from ..checks import check_layer
from ..ops.routing import softmax, softmax_backward
from . import _checks


def _seq(T, seq_len):
    if seq_len is None:
        return 1, T
    seq_len = chk.check_int("seq_len", seq_len, 1, None, what="a positive integer")
    if T % seq_len:
        raise ValueError(f"seq_len: expected a divisor of T = {T} (B sequences of seq_len "
                         f"tokens), got {seq_len}")
    return T // seq_len, seq_len


def _over_tokens(a, B, m):
    """(T, S) -> (B*S, m): row (b, s) holds slot s's column over sequence b's tokens."""
    S = a.shape[1]
    return np.ascontiguousarray(a.reshape(B, m, S).transpose(0, 2, 1)).reshape(B * S, m)


def _from_over_tokens(a, B, m):
    """(B*S, m) -> (T, S), the inverse of _over_tokens."""
    S = a.shape[0] // max(B, 1)
    return np.ascontiguousarray(a.reshape(B, S, m).transpose(0, 2, 1)).reshape(B * m, S)


def soft_moe_weights(logits, seq_len=None, check_finite=True):
    """logits: (T, S) -> (dispatch (T, S), combine (T, S)): dispatch = softmax over each
    sequence's tokens (columns), combine = softmax over the S slots (rows)."""
    logits = _checks.scores("logits", logits, check_finite)
    T, S = logits.shape
    B, m = _seq(T, seq_len)
    if T == 0:
        return np.empty_like(logits), np.empty_like(logits)
    dispatch = _from_over_tokens(softmax(_over_tokens(logits, B, m), check_finite=False), B, m)
    return dispatch, softmax(logits, check_finite=False)


def soft_moe_weights_backward(d_dispatch, d_combine, dispatch, combine, seq_len=None):
    """-> d_logits (T, S): the two softmaxes' backward, summed."""
    combine = _checks.scores("combine", combine, False)
    T, S = combine.shape
    B, m = _seq(T, seq_len)
    dispatch = _checks.grad("dispatch", dispatch, (T, S), combine.dtype)
    dd = _checks.grad("d_dispatch", d_dispatch, (T, S), combine.dtype)
    dc = _checks.grad("d_combine", d_combine, (T, S), combine.dtype)
    if T == 0:
        return np.empty_like(combine)
    d_t = softmax_backward(_over_tokens(dd, B, m), _over_tokens(dispatch, B, m))
    return _from_over_tokens(d_t, B, m) + softmax_backward(dc, combine)


def soft_moe(x, phi, w1, w2, slots_per_expert=1, activation="gelu", seq_len=None,
             trans_w=False, check_finite=True, return_context=False):
    """The Soft MoE layer. x: (T, d), phi: (d, E*p), w1: (E, d, h|2h), w2: (E, h, d)
    [trans_w: (E, h|2h, d), (E, d, h)] -> y: (T, d), or (y, ctx) with return_context.

    T = B * seq_len (None: one sequence). Every expert processes its p slots of every sequence.
    """
    x, layer = check_layer(_checks.host("x", x), _checks.host("w1", w1), _checks.host("w2", w2),
                           activation, trans_w)
    (T, d), E = x.shape, layer.E
    p = chk.check_int("slots_per_expert", slots_per_expert, 1, None, what="a positive integer")
    phi = chk.check_float("phi", _checks.host("phi", phi), shape=(d, E * p), dtype=x.dtype)
    B, m = _seq(T, seq_len)
    x = np.ascontiguousarray(x)
    S = E * p
    logits = x @ phi
    if check_finite:
        chk.check_finite("x @ phi (the slot logits)", logits)
    dispatch, comb = soft_moe_weights(logits, seq_len, check_finite=False)
    # slot inputs, expert-major rows (s, b): (S*B, d)
    xs = np.ascontiguousarray(
        np.matmul(dispatch.reshape(B, m, S).transpose(0, 2, 1), x.reshape(B, m, d))
        .transpose(1, 0, 2)).reshape(S * B, d)
    offsets = np.arange(E + 1, dtype=np.int64) * (p * B)
    h_pre, h_act, ys = backends.cpu.experts_forward(xs, layer.w1, layer.w2, offsets,
                                                    layer.code, layer.h, layer.trans_w,
                                                    return_context)
    yb = ys.reshape(S, B, d).transpose(1, 0, 2)                   # (B, S, d)
    y = np.matmul(comb.reshape(B, m, S), yb).reshape(T, d)
    if not return_context:
        return y
    ctx = dict(x=x, phi=phi, w1=layer.w1, w2=layer.w2, p=p, activation=activation,
               seq_len=seq_len, trans_w=layer.trans_w, layer=layer, B=B, m=m, logits=logits, dispatch=dispatch, combine=comb,
               xs=xs, offsets=offsets, h_pre=h_pre, h_act=h_act, ys=ys)
    return y, ctx


def soft_moe_backward(dy, ctx):
    """dy: (T, d), ctx from soft_moe(..., return_context=True)
    -> (dx (T, d), {"phi": (d, S), "w1": w1's shape, "w2": w2's shape})."""
    x, phi = ctx["x"], ctx["phi"]
    T, d = x.shape
    B, m, S = ctx["B"], ctx["m"], phi.shape[1]
    dy = _checks.grad("dy", dy, (T, d), x.dtype)
    dyb = dy.reshape(B, m, d)
    yb = ctx["ys"].reshape(S, B, d).transpose(1, 0, 2)            # (B, S, d)
    cb = ctx["combine"].reshape(B, m, S)
    d_comb = np.matmul(dyb, yb.transpose(0, 2, 1)).reshape(T, S)
    d_ys = np.ascontiguousarray(np.matmul(cb.transpose(0, 2, 1), dyb).transpose(1, 0, 2))
    d_ys = d_ys.reshape(S * B, d)
    off = ctx["offsets"]
    ly = ctx["layer"]
    d_xs, dw1, dw2 = backends.cpu.experts_backward(d_ys, ctx["xs"], ctx["h_pre"], ctx["h_act"],
                                                   ly.w1, ly.w2, off, ly.code, ly.trans_w)
    d_xsb = d_xs.reshape(S, B, d).transpose(1, 0, 2)              # (B, S, d)
    db = ctx["dispatch"].reshape(B, m, S)
    xb = x.reshape(B, m, d)
    d_disp = np.matmul(xb, d_xsb.transpose(0, 2, 1)).reshape(T, S)
    dx = np.matmul(db, d_xsb).reshape(T, d)
    d_logits = soft_moe_weights_backward(d_disp, d_comb, ctx["dispatch"], ctx["combine"],
                                         ctx["seq_len"])
    dx = dx + d_logits @ phi.T
    return dx, {"phi": x.T @ d_logits, "w1": dw1, "w2": dw2}
