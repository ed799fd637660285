"""Expert activations against reference.py."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from support import assert_close


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,H", [(0, 6), (1, 2), (9, 100), (5, 782)])
def test_activate(rng, activation, dtype, N, H):
    h = (3 * rng.standard_normal((N, H))).astype(dtype)
    out = fm.activate(h, activation)
    assert out.shape == (N, H // 2 if activation == "swiglu" else H)
    assert_close(out, ref.activate(h, activation))


def test_activate_extremes_stay_finite():
    h = np.array([[-1e4, -80.0, 0.0, 80.0, 1e4, 3.0]], np.float32)
    for a in fm.ACTIVATIONS:
        out = fm.activate(h, a)
        assert np.isfinite(out).all(), a
        assert_close(out, ref.activate(h, a))


def test_swiglu_is_silu_of_gate_times_up():
    gate = np.array([[1.0, -2.0]]); up = np.array([[3.0, 0.5]])
    out = fm.activate(np.concatenate([gate, up], 1), "swiglu")
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_block_functions_write_only_their_rows(rng, dtype):
    """activate_rows / activate_backward_rows (the expert pipeline's serial entry points) on a
    row slice give the op's rows and leave the rest of the buffers alone."""
    from fastmoe_nb.kernels.common import ACTIVATION_CODES
    from fastmoe_nb.kernels.cpu.activations import activate_backward_rows, activate_rows
    for activation, code in ACTIVATION_CODES.items():
        h = (3 * rng.standard_normal((40, 2 * 37))).astype(dtype)
        H = 37 if activation == "swiglu" else 2 * 37
        dy = rng.standard_normal((40, H)).astype(dtype)
        out = np.full((40, H), 7.0, dtype)
        dh = np.full_like(h, 7.0)
        h0, dy0 = h.copy(), dy.copy()
        activate_rows(h[5:30], code, out[5:30])
        activate_backward_rows(dy[5:30], h[5:30], code, dh[5:30])
        np.testing.assert_array_equal(h, h0)
        np.testing.assert_array_equal(dy, dy0)
        assert (out[:5] == 7).all() and (out[30:] == 7).all()
        assert (dh[:5] == 7).all() and (dh[30:] == 7).all()
        np.testing.assert_array_equal(out[5:30], fm.activate(h[5:30], activation))
        np.testing.assert_array_equal(dh[5:30], fm.activate_backward(dy[5:30], h[5:30],
                                                                     activation))


# --------------------------------------------------------------------------- float limits

def _extremes(dtype):
    """(x, sign) at the float limits: +-1e-30, +-1e30, +-dtype max (float64: also +-1e200,
    where x^2 overflows)."""
    big = np.finfo(dtype).max
    vals = [1e-30, 1e20, 1e30, big] + ([1e200] if dtype == np.float64 else [])
    x = np.array([v * s for v in vals for s in (1, -1)], dtype)
    return x


def _forward_limit(x, activation):
    """The analytic value to rounding: x for x >> 0, 0 for x << 0, x/2 for |x| tiny (relu:
    max(x, 0))."""
    if activation == "relu":
        return np.maximum(x, 0)
    return np.where(np.abs(x) < 1, x / 2, np.where(x > 0, x, 0)).astype(x.dtype)


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activate_at_float_limits(activation, dtype):
    x = _extremes(dtype)[None, :]
    h = np.concatenate([x, np.ones_like(x)], 1) if activation == "swiglu" else x
    want = _forward_limit(x, activation)
    eps = np.finfo(dtype).eps
    for name, got in (("kernel", fm.activate(h, activation)), ("reference",
                                                               ref.activate(h, activation))):
        assert np.isfinite(got).all(), (name, got)
        np.testing.assert_allclose(got, want, rtol=4 * eps, atol=0, err_msg=name)


def test_reference_gelu_tanh_does_not_cancel_for_negative_x():
    """reference.activate's gelu_tanh to ~ulp against 50-digit mpmath, also deep in the left
    tail (0.5 x (1 + tanh u) gives 0 or a cancelled value there: 1.6e-12 off at x = -4)."""
    import mpmath
    mpmath.mp.dps = 50
    x = np.array([-0.5, -1.0, -2.0, -3.0, -4.0, -5.5, -7.0, -9.0, -12.0])
    got = ref.activate(x[None, :], "gelu_tanh")[0]
    for xi, gi in zip(x, got):
        X = mpmath.mpf(xi)
        u = mpmath.sqrt(2 / mpmath.pi) * (X + mpmath.mpf(0.044715) * X ** 3)
        want = float(X / (1 + mpmath.exp(-2 * u)))
        # rounding of x^3 inside e^-2u is magnified by ~3|2u| (the function's own condition)
        tol = 4e-16 * (1 + 3 * abs(float(2 * u)))
        assert want != 0 and abs(gi - want) <= tol * abs(want), (xi, gi, want)
