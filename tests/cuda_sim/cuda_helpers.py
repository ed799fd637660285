"""Helpers of the CUDA tests: host <-> device copies and tolerance-aware comparisons."""
import numpy as np
from numba import cuda

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def dev(a):
    """A host array on the device (None stays None)."""
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def host(a):
    """A device array (or a tuple of them) back on the host."""
    if isinstance(a, tuple):
        return type(a)(*(host(x) if hasattr(x, "copy_to_host") else x for x in a))
    return a.copy_to_host()


def is_dev(a):
    return bool(getattr(a, "__cuda_ndarray__", False))


def close(got, want, rtol=None):
    """got (device or host) equals want within rtol of want's largest magnitude; integer
    arrays exactly."""
    got = got.copy_to_host() if is_dev(got) else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want)
        return
    if got.size == 0:
        return
    rtol = RTOL[want.dtype] if rtol is None else rtol
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"
