"""Parameter and Module: manual autograd in the style of micrograd / llm.c.

A Module has an explicit ``forward`` that keeps in ``self`` what its ``backward`` needs, and a
``backward(dy)`` that returns the gradient of its input and *adds* the gradients of its
parameters into ``Parameter.grad`` (gradients accumulate until ``zero_grad``). One cached
forward per module: call ``backward`` before the next ``forward`` of the same module.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk


class Parameter:
    """A trainable array and its gradient.

    value: the array (float32 or float64), updated in place by optimizers and ``load``
    grad:  same shape and dtype, accumulated by ``Module.backward``
    requires_grad: False freezes it (no gradient is accumulated; optimizers and clipping skip it)
    decay: False exempts it from weight decay (norm gains, biases)
    """

    __slots__ = ("value", "grad", "requires_grad", "decay")

    def __init__(self, value, requires_grad=True, decay=True):
        value = chk.check_float("value", np.asarray(value))
        self.value = np.array(value, copy=True)      # never alias a caller's array
        self.grad = np.zeros_like(self.value)
        self.requires_grad = bool(requires_grad)
        self.decay = bool(decay)

    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return self.value.dtype

    @property
    def size(self):
        return self.value.size

    def accumulate(self, g):
        """grad += g (skipped when frozen)."""
        if self.requires_grad:
            self.grad += g

    def __repr__(self):
        flags = "" if self.requires_grad else ", frozen"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}{flags})"


class Module:
    """Base of every layer. Subclasses define ``forward(x)`` and ``backward(dy) -> dx``.

    Parameters and sub-modules are found by walking the instance's attributes in assignment
    order (lists and tuples of modules too), which names them like ``blocks.0.moe.w1``.
    """

    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _saved(self, name):
        """The attribute forward kept for backward; RuntimeError when forward has not run."""
        try:
            return vars(self)[name]
        except KeyError:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first (backward "
                               f"needs what forward keeps)") from None

    # ------------------------------------------------------------------ traversal

    def _children(self):
        """(name, Parameter | Module) in attribute order."""
        for name, v in vars(self).items():
            if isinstance(v, (Parameter, Module)):
                yield name, v
            elif isinstance(v, (list, tuple)):
                for i, m in enumerate(v):
                    if isinstance(m, (Parameter, Module)):
                        yield f"{name}.{i}", m

    def named_parameters(self, prefix=""):
        """[(dotted name, Parameter)], each parameter once, in a fixed order."""
        out, seen = [], set()
        for name, v in self._children():
            full = prefix + name
            if isinstance(v, Parameter):
                if id(v) not in seen:
                    seen.add(id(v))
                    out.append((full, v))
            else:
                for n, p in v.named_parameters(full + "."):
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append((n, p))
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        """This module and every sub-module, depth first."""
        out = [self]
        for _, v in self._children():
            if isinstance(v, Module):
                out.extend(v.modules())
        return out

    def num_parameters(self):
        return int(sum(p.size for p in self.parameters()))

    # ------------------------------------------------------------------ state

    def zero_grad(self):
        for p in self.parameters():
            p.grad[...] = 0

    def train(self, mode=True):
        """Training mode (router noise on) for this module and all sub-modules; returns self."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, flag=True):
        """Freeze (False) or unfreeze every parameter of this module; returns self."""
        for p in self.parameters():
            p.requires_grad = bool(flag)
        return self

    def __repr__(self):
        return f"{type(self).__name__}({self.num_parameters()} parameters)"


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse."""

    def __init__(self, *layers):
        for i, m in enumerate(layers):
            if not isinstance(m, Module):
                raise TypeError(f"layers[{i}]: expected a Module, got {type(m).__name__}")
        self.layers = list(layers)

    def forward(self, x):
        for m in self.layers:
            x = m.forward(x)
        return x

    def backward(self, dy):
        for m in reversed(self.layers):
            dy = m.backward(dy)
        return dy


class Residual(Module):
    """y = x + body(x); dx = dy + body.backward(dy). body maps (T, d) to (T, d)."""

    def __init__(self, body):
        if not isinstance(body, Module):
            raise TypeError(f"body: expected a Module, got {type(body).__name__}")
        self.body = body

    def forward(self, x):
        return x + self.body.forward(x)

    def backward(self, dy):
        return dy + self.body.backward(dy)
