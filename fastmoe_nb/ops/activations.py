"""Expert activations: relu, gelu (erf), gelu_tanh, silu, and swiglu ([gate | up] halves)."""
from __future__ import annotations

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import CUDA, as_host, backend_of
from ..checks import ACTIVATIONS, activation_code, hidden_width
from ..kernels.common import SWIGLU


def activate(h, activation):
    """h: (N, H) -> (N, H); swiglu: h (N, 2H) = [gate | up] -> silu(gate) * up, (N, H)."""
    code = activation_code(activation)
    be = backend_of(h=h)
    h = chk.check_float("h", h if be == CUDA else as_host("h", h), ndim=2)
    hidden_width(h.shape[1], activation, "h")
    return backends.get(be).activate(h if be == CUDA else np.ascontiguousarray(h), code)


def activate_backward(dy, h, activation):
    """dy: (N, H) gradient of activate(h, activation), h: (N, H) the pre-activation
    -> dh: (N, H); swiglu: h (N, 2H) = [gate | up] -> dh (N, 2H), both halves."""
    code = activation_code(activation)
    be = backend_of(dy=dy, h=h)
    if be == CUDA:
        chk.check_float("h", h, ndim=2)
        return backends.get(be).activate_backward(dy, h, code)
    h = chk.check_float("h", as_host("h", h), ndim=2)
    H = hidden_width(h.shape[1], activation, "h")
    dy = chk.check_float("dy", as_host("dy", dy), shape=(h.shape[0], H), dtype=h.dtype)
    return backends.cpu.activate_backward(np.ascontiguousarray(dy), np.ascontiguousarray(h),
                                          code)


__all__ = ["ACTIVATIONS", "SWIGLU", "activate", "activate_backward", "activation_code",
           "hidden_width"]
