"""Expert activations: relu, gelu (erf), gelu_tanh, silu, and swiglu ([gate | up] halves)."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..kernels.common import ACTIVATION_CODES, SWIGLU
from ..kernels.cpu.activations import activate_kernel

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


__all__ = ["ACTIVATIONS", "SWIGLU", "activate", "activation_code", "hidden_width"]
