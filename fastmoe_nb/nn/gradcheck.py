"""gradcheck: an analytic backward against float64 central differences, for any function.

    y = fn(*inputs)                      # an array, or a tuple of arrays
    grads = backward(dy)                 # one gradient (or None) per input, for the loss <y, dy>

gradcheck draws a random dy (seeded), and for every entry of every float input whose analytic
gradient is not None compares grads[i] with (L(x + eps) - L(x - eps)) / (2 eps), L = <fn, dy>.
The relative error of an input is max |analytic - numeric| / max |numeric|. Central differences
in float64 with eps = 1e-6 are good to ~1e-9 on smooth functions; a kink (relu at 0, a top-k
choice that flips) inside +-eps is the one way a correct backward can fail, so use random data.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with the central differences."""


def _outputs(y):
    """fn's result as a tuple of arrays."""
    return tuple(y) if isinstance(y, tuple) else (y,)


def _loss(fn, inputs, dys):
    # inputs: the argument list; dys: one float64 array (or None) per output -> <fn(*inputs), dy>
    total = 0.0
    for y, dy in zip(_outputs(fn(*inputs)), dys):
        if dy is not None:
            total += float(np.sum(np.asarray(y, dtype=np.float64) * dy))
    return total


def numerical_gradient(fn, inputs, dys, index, eps=1e-6, entries=None):
    """Central differences of <fn(*inputs), dys> w.r.t. inputs[index] (float64).

    inputs: the argument list (its arrays are perturbed in place and restored: pass copies);
    dys: one array or None per output of fn; entries: flat indices to differentiate (all when
    None) -> (inputs[index].shape) float64, NaN where an entry was not differentiated."""
    x = inputs[index]
    g = np.full(x.shape, np.nan)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for m in range(x.size) if entries is None else entries:
        v = flat[m]
        flat[m] = v + eps
        up = _loss(fn, inputs, dys)
        flat[m] = v - eps
        down = _loss(fn, inputs, dys)
        flat[m] = v
        gflat[m] = (up - down) / (2.0 * eps)
    return g


def gradcheck(fn, inputs, backward, eps=1e-6, rtol=1e-6, atol=1e-10, seed=0, max_entries=None,
              raise_exception=True):
    """Check backward against float64 central differences of fn.

    fn(*inputs) -> an array or a tuple of arrays (non-float outputs, such as expert ids, are
    not differentiated); backward(dy) -> a sequence with one gradient per input, None for an
    input not checked, where dy is one float64 array per float output (a tuple when fn returns
    a tuple, None for its non-float outputs). inputs: float64 arrays (checked) and any other
    arguments (passed through); they are copied, never modified. max_entries: check at most
    this many random entries per input (all when None).

    Returns {input index: relative error}. An input fails when max |analytic - numeric| exceeds
    rtol * max |numeric| + atol; with raise_exception (the default) a failure raises
    GradcheckError naming the input, its error and its worst entry.
    """
    if not callable(fn) or not callable(backward):
        raise TypeError("fn, backward: expected callables")
    eps = chk.check_real("eps", eps, positive=True)
    rtol = chk.check_real("rtol", rtol, positive=True)
    atol = chk.check_real("atol", atol)
    if max_entries is not None:
        max_entries = chk.check_int("max_entries", max_entries, 1, None,
                                    what="a positive integer or None")
    inputs = list(inputs)
    for i, a in enumerate(inputs):
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            chk.check_float(f"inputs[{i}]", a, dtype=np.float64)   # float32 differences: noise
            inputs[i] = a.copy()
    rng = np.random.default_rng(seed)
    y0 = fn(*inputs)
    dys = tuple(rng.standard_normal(np.shape(y)) if np.asarray(y).dtype.kind == "f" else None
                for y in _outputs(y0))
    grads = list(backward(dys if isinstance(y0, tuple) else dys[0]))
    if len(grads) != len(inputs):
        raise ValueError(f"backward: expected one gradient (or None) per input, {len(inputs)}, "
                         f"got {len(grads)}")
    errors = {}
    for i, (a, g) in enumerate(zip(inputs, grads)):
        if g is None:
            continue
        if not (isinstance(a, np.ndarray) and a.dtype.kind == "f"):
            raise ValueError(f"backward: returned a gradient for inputs[{i}], which is not a "
                             "float array")
        g = np.asarray(g, dtype=np.float64)
        if g.shape != a.shape:
            raise ValueError(f"backward: gradient {i} has shape {g.shape}, expected the shape of "
                             f"inputs[{i}], {a.shape}")
        entries = None
        if max_entries is not None and a.size > max_entries:
            entries = np.sort(rng.choice(a.size, max_entries, replace=False))
        num = numerical_gradient(fn, inputs, dys, i, eps, entries)
        mask = ~np.isnan(num)
        diff = np.abs(np.where(mask, g - num, 0.0))
        scale = float(np.abs(num[mask]).max()) if mask.any() else 0.0
        worst = float(diff.max()) if diff.size else 0.0
        errors[i] = worst / scale if scale > 0 else worst
        if raise_exception and worst > rtol * scale + atol:
            m = np.unravel_index(int(diff.argmax()), diff.shape)
            raise GradcheckError(
                f"inputs[{i}]: analytic gradient differs from central differences, relative "
                f"error {errors[i]:.3e} > rtol {rtol:.1e}; worst entry {tuple(map(int, m))}: "
                f"analytic {g[m]:.9g}, numeric {num[m]:.9g}")
    return errors


__all__ = ["GradcheckError", "gradcheck", "numerical_gradient"]
