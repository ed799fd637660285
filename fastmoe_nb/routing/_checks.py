"""Validation shared by the routers and losses of fastmoe_nb.routing (host arrays only: these
routers run on the CPU)."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of


def host(name, a):
    """A NumPy view of a host array; device arrays get one clear error."""
    if backend_of(**{name: a}) == CUDA:
        raise TypeError(f"{name}: the routers of fastmoe_nb.routing run on the CPU; expected a "
                        "host (NumPy) array, got a device array")
    return as_host(name, a)


def scores(name, x, check_finite=True, ndim=2):
    """A (T, E) float score matrix, contiguous, with at least one expert column."""
    x = chk.check_float(name, host(name, x), ndim=ndim)
    if x.shape[-1] < 1:
        raise ValueError(f"{name}: expected at least one expert column, got shape "
                         f"{tuple(x.shape)}")
    if check_finite:
        chk.check_finite(name, x)
    return np.ascontiguousarray(x)


def grad(name, g, shape, dtype):
    """An upstream gradient of exactly this shape and dtype, contiguous."""
    return np.ascontiguousarray(chk.check_float(name, host(name, g), shape=shape, dtype=dtype))


def experts(name, e, T, E):
    """experts: (T, k) ids in 0..E-1, 1 <= k <= E -> int32 contiguous."""
    e = chk.check_int_array(name, host(name, e), ndim=2)
    if e.shape[0] != T:
        raise ValueError(f"{name}: expected shape ({T}, k) (one row per token of the logits), "
                         f"got {tuple(e.shape)}")
    chk.check_int(f"{name}.shape[1]", e.shape[1], 1, E, what=f"1..E = 1..{E}")
    if e.size and (int(e.min()) < 0 or int(e.max()) >= E):
        bad = int(e.min()) if int(e.min()) < 0 else int(e.max())
        raise ValueError(f"{name}: expected expert ids in 0..E-1 = 0..{E - 1}, found {bad}")
    return np.ascontiguousarray(e, dtype=np.int32)


def token_mask(mask, T):
    """mask: None or (T,) bool / 0-1 numbers (1 = a real token, 0 = padding) -> float64 or None."""
    if mask is None:
        return None
    m = chk.check_array("mask", host("mask", mask), shape=(T,))
    kind = np.dtype(m.dtype).kind
    if kind not in "biuf":
        raise TypeError(f"mask: expected a bool or numeric (T,) array, got {np.dtype(m.dtype)}")
    m = np.asarray(m, dtype=np.float64)
    if not np.isin(m, (0.0, 1.0)).all():
        raise ValueError("mask: expected 0/1 (or bool) entries, 1 for a real token")
    return np.ascontiguousarray(m)


def seed_value(seed):
    """A reproducible seed: None or a non-negative int (a Generator could not be replayed by
    the backward)."""
    if seed is None:
        return None
    return chk.check_int("seed", seed, 0, None, what="a non-negative integer or None")
