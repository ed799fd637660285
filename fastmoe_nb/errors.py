"""Validation at the public boundary: every helper raises ValueError / TypeError naming the
argument and what was expected. Kernels never validate; ops call these first."""
from __future__ import annotations

import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_of(a):
    """The NumPy dtype of an array: NumPy, Numba/CuPy device arrays, and PyTorch CUDA tensors
    (whose torch dtype NumPy cannot read: their __cuda_array_interface__ typestr says it)."""
    try:
        return np.dtype(a.dtype)
    except TypeError:
        cai = getattr(a, "__cuda_array_interface__", None)
        if cai is None:
            raise
        return np.dtype(cai["typestr"])


def _shape_of(a):
    return tuple(int(s) for s in a.shape)


def check_array(name, a, ndim=None, shape=None):
    """a must be an array (NumPy or device) of the given rank; shape entries None are free."""
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    s = _shape_of(a)
    if ndim is not None and len(s) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {s}")
    if shape is not None:
        if len(s) != len(shape) or any(w is not None and w != g for w, g in zip(shape, s)):
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {s}")
    return a


def check_float(name, a, ndim=None, shape=None, dtype=None):
    """A float32/float64 array; with dtype, exactly that dtype (mixed dtypes are an error)."""
    check_array(name, a, ndim, shape)
    dt = dtype_of(a)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32 or float64, got {dt}")
    if dtype is not None and dt != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)} (the dtype of the other "
                        f"inputs; mixed dtypes are not cast), got {dt}")
    return a


def check_int_array(name, a, ndim=None, shape=None):
    check_array(name, a, ndim, shape)
    if dtype_of(a).kind not in "iu":
        raise TypeError(f"{name}: expected an integer array, got {dtype_of(a)}")
    return a


def check_int(name, v, lo=None, hi=None, what=None):
    """A Python/NumPy integer (not bool) in lo..hi inclusive (None: unbounded).

    what describes the range in the message: a range such as "1..E = 1..8" reads "expected an
    integer in 1..E = 1..8"; a phrase such as "a positive integer" is used as it is."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(v).__name__}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = what or f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
        if rng[0].isdigit() or rng[0] == "-":
            rng = f"an integer in {rng}"
        raise ValueError(f"{name}: expected {rng}, got {v}")
    return v


def check_real(name, v, positive=False):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(v).__name__}")
    v = float(v)
    if not np.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} number, got {v}")
    return v


def check_choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def check_finite(name, a):
    """Host arrays only (device arrays are checked by their backend)."""
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: expected finite values, found NaN or Inf "
                         f"(pass check_finite=False to skip this check)")
    return a
