"""Shared test helpers: tolerance-aware comparisons and seeded layers.

Import them with `from support import ...` (not from conftest: tests/cuda_sim has a conftest
of its own, and pytest keeps only one module named conftest)."""
import numpy as np

# float32 results are compared with the float64-accumulating reference at a few ulps of the
# largest magnitude; float64 at rounding level.
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def assert_close(got, want, dtype=None, rtol=None, floor=1e-30):
    """Max abs error relative to the largest |want|, or to floor where that is smaller (0-size
    arrays compare by shape). floor is the size of the terms the true value is summed from:
    where that sum is mathematically zero, rounding leaves noise of that scale times eps."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if got.size == 0:
        return
    rtol = rtol if rtol is not None else RTOL[np.dtype(dtype or want.dtype).type]
    scale = max(float(np.abs(want).max()), floor)
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def random_layer(rng, T, d, h, E, dtype=np.float32, swiglu=True, trans_w=False):
    """x (T, d), router_w (d, E), w1 (E, d, 2h|h), w2 (E, h, d) scaled to keep values O(1)."""
    H1 = 2 * h if swiglu else h
    x = rng.standard_normal((T, d)).astype(dtype)
    router_w = (rng.standard_normal((d, E)) / np.sqrt(d)).astype(dtype)
    w1 = (rng.standard_normal((E, d, H1)) / np.sqrt(d)).astype(dtype)
    w2 = (rng.standard_normal((E, h, d)) / np.sqrt(h)).astype(dtype)
    if trans_w:
        w1, w2 = np.ascontiguousarray(w1.transpose(0, 2, 1)), np.ascontiguousarray(
            w2.transpose(0, 2, 1))
    return x, router_w, w1, w2
