"""Expert activations: relu, gelu (erf), gelu_tanh, silu, and swiglu ([gate | up] halves)."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..kernels.common import ACTIVATION_CODES, SWIGLU
from ..kernels.cpu.activations import activate_backward_kernel, activate_kernel

ACTIVATIONS = tuple(ACTIVATION_CODES)


def activation_code(activation):
    return ACTIVATION_CODES[chk.check_choice("activation", activation, ACTIVATIONS)]


def hidden_width(h_pre_width, activation, name="w1"):
    """The hidden width h after the activation of an (.., h_pre_width) first GEMM."""
    if activation == "swiglu":
        if h_pre_width % 2:
            raise ValueError(f"{name}: swiglu expects an even hidden width holding [gate | up] "
                             f"halves, got {h_pre_width}")
        return h_pre_width // 2
    return h_pre_width


def activate(h, activation):
    """h: (N, H) -> (N, H); swiglu: h (N, 2H) = [gate | up] -> silu(gate) * up, (N, H)."""
    code = activation_code(activation)
    if backend_of(h=h) == CUDA:
        chk.check_float("h", h, ndim=2)
        hidden_width(h.shape[1], activation, "h")
        return cuda_module().activate(h, code)
    h = chk.check_float("h", as_host("h", h), ndim=2)
    out = np.empty((h.shape[0], hidden_width(h.shape[1], activation, "h")), h.dtype)
    activate_kernel(np.ascontiguousarray(h), code, out)
    return out


__all__ = ["ACTIVATIONS", "SWIGLU", "activate", "activate_backward", "activation_code",
           "hidden_width"]


def activate_backward(dy, h, activation):
    """dy: (N, H) gradient of activate(h, activation), h: (N, H) the pre-activation
    -> dh: (N, H); swiglu: h (N, 2H) = [gate | up] -> dh (N, 2H), both halves."""
    code = activation_code(activation)
    if backend_of(dy=dy, h=h) == CUDA:
        chk.check_float("h", h, ndim=2)
        return cuda_module().activate_backward(dy, h, code)
    h = chk.check_float("h", as_host("h", h), ndim=2)
    H = hidden_width(h.shape[1], activation, "h")
    dy = chk.check_float("dy", as_host("dy", dy), shape=(h.shape[0], H), dtype=h.dtype)
    dh = np.empty_like(h)
    activate_backward_kernel(np.ascontiguousarray(dy), np.ascontiguousarray(h), code, dh)
    return dh
