"""Optimizers (SGD with momentum, AdamW) and gradient clipping by global norm.

Both follow PyTorch's update rules, so their steps can be checked by hand. Frozen parameters
(``requires_grad=False``) are skipped entirely; parameters with ``decay=False`` get no weight
decay. Updates are in place on ``Parameter.value``.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from .module import Module, Parameter


def named_params(params, name="params"):
    """A Module, or an iterable of Parameters or (name, Parameter) -> [(name, Parameter)]."""
    if isinstance(params, Module):
        return params.named_parameters()
    out = []
    for i, p in enumerate(params):
        n, p = p if isinstance(p, tuple) else (str(i), p)
        if not isinstance(p, Parameter):
            raise TypeError(f"{name}[{i}]: expected a Parameter, got {type(p).__name__}")
        out.append((n, p))
    return out


def global_grad_norm(params):
    """sqrt(sum of squared gradients) over the trainable parameters, in float64, in order."""
    total = 0.0
    for _, p in named_params(params):
        if p.requires_grad:
            g = p.grad.astype(np.float64, copy=False).ravel()
            total += float(g @ g)
    return total ** 0.5


def clip_grad_norm(params, max_norm):
    """Scale every trainable gradient by max_norm / norm when the global norm exceeds
    max_norm. Returns the norm before clipping."""
    max_norm = chk.check_real("max_norm", max_norm, positive=True)
    ps = named_params(params)
    norm = global_grad_norm(ps)
    if norm > max_norm:
        scale = max_norm / (norm + 1e-12)
        for _, p in ps:
            if p.requires_grad:
                p.grad *= p.grad.dtype.type(scale)
    return norm


class Optimizer:
    """The shared part: the parameter list, the learning rate, the step count and a per-
    parameter state of named arrays (``state_dict`` / ``load_state_dict`` for checkpoints)."""

    slots = ()  # names of the per-parameter state arrays

    def __init__(self, params, lr, weight_decay):
        self.params = named_params(params)
        names = [n for n, _ in self.params]
        if len(set(names)) != len(names):
            raise ValueError("params: expected distinct parameter names")
        self.lr = chk.check_real("lr", lr, positive=True)
        self.weight_decay = chk.check_real("weight_decay", weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        self.t = 0
        self.state = {n: {s: np.zeros_like(p.value) for s in self.slots}
                      for n, p in self.params}

    def zero_grad(self):
        for _, p in self.params:
            p.grad[...] = 0

    def step(self):
        self.t += 1
        for n, p in self.params:
            if p.requires_grad:
                self.update(p, self.state[n])

    def state_dict(self):
        """{"t": step count, "<slot>/<param name>": array} (lr is the caller's schedule)."""
        out = {"t": np.array(self.t, np.int64)}
        for n, st in self.state.items():
            for s, a in st.items():
                out[f"{s}/{n}"] = a
        return out

    def check_state_dict(self, sd):
        """Validate sd against this optimizer without changing anything: the same keys, "t" a
        non-negative integer scalar, every slot a real floating array of its slot's shape and
        dtype. Returns (t, {key: array}) ready for apply; raises ValueError / TypeError naming
        the key and what was expected."""
        if not hasattr(sd, "keys"):
            raise TypeError(f"optimizer state: expected a mapping, got {type(sd).__name__}")
        want = set(self.state_dict())
        got = set(sd)
        if want != got:
            raise ValueError("optimizer state: "
                             + _describe_mismatch(sorted(want - got), sorted(got - want)))
        t = np.asarray(sd["t"])
        if t.shape != ():
            raise ValueError(f"optimizer state: t expected a scalar (shape ()), got shape "
                             f"{t.shape}")
        if t.dtype.kind not in "iu":
            raise TypeError(f"optimizer state: t expected an integer scalar, got dtype {t.dtype}")
        if int(t) < 0:
            raise ValueError(f"optimizer state: t expected a non-negative step count, got "
                             f"{int(t)}")
        arrays = {}
        for n, st in self.state.items():
            for s, a in st.items():
                key = f"{s}/{n}"
                b = np.asarray(sd[key])
                if b.shape != a.shape:
                    raise ValueError(f"optimizer state: {key} expected shape {a.shape}, "
                                     f"got {b.shape}")
                if b.dtype != a.dtype:
                    raise TypeError(f"optimizer state: {key} expected a real floating array of "
                                    f"dtype {a.dtype}, got dtype {b.dtype}")
                arrays[key] = b
        return int(t), arrays

    def apply_state_dict(self, checked):
        """Write a (t, arrays) pair returned by check_state_dict (cannot fail)."""
        t, arrays = checked
        for n, st in self.state.items():
            for s, a in st.items():
                a[...] = arrays[f"{s}/{n}"]
        self.t = t

    def load_state_dict(self, sd):
        """The inverse of state_dict; every key, shape and dtype (and t's kind) is checked
        before anything changes: on any error the optimizer is left as it was."""
        self.apply_state_dict(self.check_state_dict(sd))


def _describe_mismatch(missing, unexpected):
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        parts.append("unexpected " + ", ".join(unexpected[:8])
                     + (" ..." if len(unexpected) > 8 else ""))
    return "; ".join(parts)


class SGD(Optimizer):
    """PyTorch's SGD: g = grad + wd * p; buf = momentum * buf + g (buf = g on the first
    step); p -= lr * (g + momentum * buf if nesterov else buf)."""

    slots = ("momentum",)

    def __init__(self, params, lr=0.01, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr, weight_decay)
        self.momentum = chk.check_real("momentum", momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum}")
        self.nesterov = bool(nesterov)

    def update(self, p, st):
        # p.value, p.grad, st["momentum"]: the parameter's shape
        g = p.grad
        if self.weight_decay and p.decay:
            g = g + self.weight_decay * p.value
        if self.momentum:
            buf = st["momentum"]
            if self.t == 1:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p.value -= p.dtype.type(self.lr) * g


class AdamW(Optimizer):
    """PyTorch's AdamW (decoupled weight decay): p *= 1 - lr * wd; m = b1 m + (1 - b1) g;
    v = b2 v + (1 - b2) g^2; p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""

    slots = ("m", "v")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, weight_decay)
        b1, b2 = betas
        self.b1, self.b2 = chk.check_real("betas[0]", b1), chk.check_real("betas[1]", b2)
        for i, b in enumerate((self.b1, self.b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}]: expected a number in [0, 1), got {b}")
        self.eps = chk.check_real("eps", eps, positive=True)

    def update(self, p, st):
        # p.value, p.grad, st["m"], st["v"]: the parameter's shape
        m, v, g = st["m"], st["v"], p.grad
        if self.weight_decay and p.decay:
            p.value *= p.dtype.type(1.0 - self.lr * self.weight_decay)
        m *= self.b1
        m += (1.0 - self.b1) * g
        v *= self.b2
        v += (1.0 - self.b2) * (g * g)
        c1 = 1.0 - self.b1 ** self.t
        c2 = 1.0 - self.b2 ** self.t
        p.value -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)
