"""Dense layers: Linear, Embedding, RMSNorm, LayerNorm, MLP (the dense twin of one expert).

Every layer takes ``dtype`` (float32 by default; float64 for gradient checks) and ``rng`` (a
NumPy Generator or a seed) for its initialization. Inputs are (T, d); callers flatten
(B, S, d) to (T, d).
"""
from __future__ import annotations

import math
import os

import numpy as np

from .. import errors as chk
from ..checks import activation_code, hidden_width
from ..ops.activations import activate, activate_backward
from .module import Module, Parameter


def as_rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _memory_bytes():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):   # not POSIX: let NumPy decide
        return None


def normal(rng, shape, std, dtype, name="parameter"):
    """A parameter's initial values; a shape too large for this machine's memory (the float64
    draw counts) is a ValueError naming it, not NumPy's bare overflow or an out-of-memory
    kill while the draw fills it."""
    need, limit = math.prod(shape) * 8, _memory_bytes()
    if need > np.iinfo(np.int64).max or (limit is not None and need > limit):
        raise ValueError(f"{name}: a parameter of shape {tuple(shape)} needs {need:.3g} "
                         f"bytes to initialize, more than this machine's memory: check the "
                         f"layer's sizes")
    return (as_rng(rng).standard_normal(shape) * std).astype(dtype)


def check_input(name, x, width, dtype):
    """x: (T, width) of the layer's dtype, on the host."""
    x = chk.check_float(name, np.asarray(x), ndim=2, dtype=dtype)
    chk.check_array(name, x, shape=(None, width))
    return x


class Linear(Module):
    """y = x @ w + b. x: (T, d_in), w: (d_in, d_out), b: (d_out,) -> y: (T, d_out)."""

    def __init__(self, d_in, d_out, bias=True, dtype=np.float32, rng=None, std=None):
        d_in = chk.check_int("d_in", d_in, 1)
        d_out = chk.check_int("d_out", d_out, 1)
        self.w = Parameter(normal(rng, (d_in, d_out), std or d_in ** -0.5, dtype, "w"))
        self.b = Parameter(np.zeros(d_out, dtype), decay=False) if bias else None

    def forward(self, x):
        # x: (T, d_in) -> (T, d_out)
        self.x = check_input("x", x, self.w.shape[0], self.w.dtype)
        y = self.x @ self.w.value
        if self.b is not None:
            y += self.b.value
        return y

    def backward(self, dy):
        # dy: (T, d_out) -> dx: (T, d_in); w.grad += x.T @ dy, b.grad += sum_t dy
        self.w.accumulate(self._saved("x").T @ dy)
        if self.b is not None:
            self.b.accumulate(dy.sum(axis=0))
        return dy @ self.w.value.T


class Embedding(Module):
    """A table lookup. ids: (...) integers in 0..V-1, w: (V, d) -> (..., d).

    backward(dy) adds each row of dy into its id's row of w.grad (np.add.at: in index order,
    deterministic) and returns None: integer ids have no gradient."""

    def __init__(self, num_embeddings, d, dtype=np.float32, rng=None, std=1.0):
        V = chk.check_int("num_embeddings", num_embeddings, 1)
        d = chk.check_int("d", d, 1)
        self.w = Parameter(normal(rng, (V, d), std, dtype, "w"))

    def forward(self, ids):
        # ids: (...) int -> (..., d)
        ids = chk.check_int_array("ids", np.asarray(ids))
        V = self.w.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"ids: expected integers in 0..{V - 1}, found "
                             f"{ids.min() if ids.min() < 0 else ids.max()}")
        self.ids = ids
        return self.w.value[ids]

    def backward(self, dy):
        # dy: (..., d) -> None; w.grad[ids] += dy
        ids = self._saved("ids")
        if self.w.requires_grad:
            np.add.at(self.w.grad, ids.reshape(-1), dy.reshape(-1, self.w.shape[1]))
        return None


class RMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * g. x: (T, d), g: (d,) -> y: (T, d)."""

    center = False      # LayerNorm: subtract each row's mean first, and add a bias

    def __init__(self, d, eps=1e-6, dtype=np.float32):
        d = chk.check_int("d", d, 1)
        self.eps = chk.check_real("eps", eps, positive=True)
        self.g = Parameter(np.ones(d, dtype), decay=False)
        self.b = Parameter(np.zeros(d, dtype), decay=False) if self.center else None

    def forward(self, x):
        # x: (T, d) -> (T, d); keeps xhat = xc * r (T, d) and r = 1 / rms(xc) (T, 1),
        # xc = x (RMSNorm) or x - mean(x) (LayerNorm)
        x = check_input("x", x, self.g.shape[0], self.g.dtype)
        xc = x - x.mean(axis=1, keepdims=True) if self.center else x
        self.r = 1.0 / np.sqrt((xc * xc).mean(axis=1, keepdims=True) + self.eps)
        self.xhat = xc * self.r
        y = self.xhat * self.g.value
        return y + self.b.value if self.center else y

    def backward(self, dy):
        # dy: (T, d) -> dx: (T, d)
        # dx = r * (dy*g - xhat * mean(dy*g*xhat)), minus its row mean for LayerNorm;
        # g.grad += sum_t dy * xhat, b.grad += sum_t dy
        xhat = self._saved("xhat")
        self.g.accumulate((dy * xhat).sum(axis=0))
        if self.center:
            self.b.accumulate(dy.sum(axis=0))
        dyg = dy * self.g.value
        dx = self.r * (dyg - xhat * (dyg * xhat).mean(axis=1, keepdims=True))
        return dx - dx.mean(axis=1, keepdims=True) if self.center else dx


class LayerNorm(RMSNorm):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * g + b. x: (T, d), g, b: (d,) -> y: (T, d)."""

    center = True


class MLP(Module):
    """The dense twin of one expert: y = act(x @ w1) @ w2.

    x: (T, d), w1: (d, h) — (d, 2h) = [gate | up] for swiglu —, w2: (h, d) -> (T, d). The
    activations are the experts' own (fm.activate / activate_backward)."""

    def __init__(self, d, h, activation="swiglu", dtype=np.float32, rng=None):
        d = chk.check_int("d", d, 1)
        h = chk.check_int("h", h, 1)
        activation_code(activation)
        self.activation = activation
        rng = as_rng(rng)
        H1 = 2 * h if activation == "swiglu" else h
        self.w1 = Parameter(normal(rng, (d, H1), d ** -0.5, dtype, "w1"))
        self.w2 = Parameter(normal(rng, (h, d), h ** -0.5, dtype, "w2"))

    @property
    def hidden(self):
        return hidden_width(self.w1.shape[1], self.activation)

    def forward(self, x):
        # x: (T, d) -> (T, d); keeps x, h_pre (T, h|2h), h_act (T, h)
        self.x = check_input("x", x, self.w1.shape[0], self.w1.dtype)
        self.h_pre = self.x @ self.w1.value
        self.h_act = activate(self.h_pre, self.activation)
        return self.h_act @ self.w2.value

    def backward(self, dy):
        # dy: (T, d) -> dx: (T, d)
        self.w2.accumulate(self._saved("h_act").T @ dy)
        dh_pre = activate_backward(dy @ self.w2.value.T, self.h_pre, self.activation)
        self.w1.accumulate(self.x.T @ dh_pre)
        return dh_pre @ self.w1.value.T
