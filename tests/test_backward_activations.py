"""activate_backward for every activation (swiglu: both halves): against reference.py and
float64 central differences."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.nn.gradcheck import gradcheck

from support import assert_close

SHAPES = [(0, 8), (1, 100), (5, 600), (3, 781), (64, 32)]
RTOL = {np.float32: 1e-4, np.float64: 1e-12}


def _width(H, activation):
    return 2 * H if activation == "swiglu" else H


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
@pytest.mark.parametrize("N,H", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activate_backward_matches_reference(rng, activation, N, H, dtype):
    h = (3 * rng.standard_normal((N, _width(H, activation)))).astype(dtype)
    dy = rng.standard_normal((N, H)).astype(dtype)
    h0 = h.copy()
    got = fm.activate_backward(dy, h, activation)
    assert_close(got, ref.activate_backward(dy, h, activation), rtol=RTOL[dtype])
    np.testing.assert_array_equal(h, h0)


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
def test_activate_gradcheck(rng, activation):
    h = 2 * rng.standard_normal((4, _width(5, activation)))
    h[np.abs(h) < 1e-3] = 0.5          # keep relu's kink out of reach of the differences
    errs = gradcheck(lambda h: fm.activate(h, activation), [h],
                     lambda dy: [fm.activate_backward(dy, h, activation)])
    assert errs[0] <= 1e-6


def test_activate_backward_rejects_bad_input():
    h = np.zeros((3, 6), np.float32)
    with pytest.raises(ValueError, match=r"dy: expected shape \(3, 3\)"):
        fm.activate_backward(np.zeros((3, 6), np.float32), h, "swiglu")
    with pytest.raises(ValueError, match="activation: expected one of"):
        fm.activate_backward(h, h, "tanh")
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        fm.activate_backward(h.astype(np.float64), h, "relu")
    with pytest.raises(ValueError, match="h: swiglu expects an even hidden width"):
        fm.activate_backward(h[:, :1], h[:, :5], "swiglu")


# --------------------------------------------------------------------------- float limits

def _extremes(dtype):
    big = np.finfo(dtype).max
    vals = [1e-30, 1e20, 1e30, big] + ([1e160, 1e200] if dtype == np.float64 else [])
    return np.array([v * s for v in vals for s in (1, -1)], dtype)


def _grad_limit(x, activation):
    """act'(x) to rounding: 1 for x >> 0, 0 for x << 0, 1/2 for |x| tiny (relu: x > 0)."""
    if activation == "relu":
        return (x > 0).astype(x.dtype)
    return np.where(np.abs(x) < 1, 0.5, np.where(x > 0, 1.0, 0.0)).astype(x.dtype)


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activate_backward_at_float_limits(activation, dtype):
    """Finite and equal to the analytic limit (gelu_tanh used to give 0 * inf = NaN once x^2
    overflowed). swiglu: gate at the limits, up = 1, so d gate = silu'(gate), d up =
    silu(gate)."""
    x = _extremes(dtype)[None, :]
    dy = np.ones_like(x)
    eps = np.finfo(dtype).eps
    if activation == "swiglu":
        h = np.concatenate([x, np.ones_like(x)], 1)
        silu = np.where(np.abs(x) < 1, x / 2, np.where(x > 0, x, 0)).astype(dtype)
        want = np.concatenate([_grad_limit(x, activation), silu], 1)
    else:
        h, want = x, _grad_limit(x, activation)
    for name, got in (("kernel", fm.activate_backward(dy, h, activation)),
                      ("reference", ref.activate_backward(dy, h, activation))):
        assert np.isfinite(got).all(), (name, got)
        np.testing.assert_allclose(got, want, rtol=4 * eps, atol=0, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_tanh_backward_fuzz_report(dtype):
    h = np.full((1, 8), 1e20, dtype)
    h[0, 4:] = -1e20
    got = fm.activate_backward(np.ones((1, 8), dtype), h, "gelu_tanh")
    np.testing.assert_array_equal(got, np.array([[1.0] * 4 + [0.0] * 4], dtype))


def test_reference_backward_tails_against_mpmath():
    """reference.activate_backward for gelu_tanh, silu and swiglu's gate to ~ulp against
    50-digit mpmath in the left tail, where 1 - s(x) by subtraction and 1 + tanh(u) cancel."""
    import mpmath
    mpmath.mp.dps = 50
    x = np.array([-3.0, -6.0, -9.0, -12.0, -20.0, 2.0, 5.0, 9.0, 20.0])
    c, k = mpmath.sqrt(2 / mpmath.pi), mpmath.mpf(0.044715)

    def sig(z):
        return 1 / (1 + mpmath.exp(-z))

    def gelu_tanh_grad(X):
        u2 = 2 * c * (X + k * X ** 3)
        return sig(u2) + X * sig(u2) * sig(-u2) * 2 * c * (1 + 3 * k * X ** 2)

    def silu_grad(X):
        return sig(X) * (1 + X * sig(-X))

    for activation, f in (("gelu_tanh", gelu_tanh_grad), ("silu", silu_grad)):
        got = ref.activate_backward(np.ones((1, x.size)), x[None, :], activation)[0]
        for xi, gi in zip(x, got):
            X = mpmath.mpf(xi)
            want = float(f(X))
            # rounding inside e^-z is magnified by ~|z| (the function's own condition)
            z = abs(float(2 * c * (X + k * X ** 3))) * 3 if activation == "gelu_tanh" else abs(xi)
            tol = 4e-16 * (4 + z)
            assert abs(gi - want) <= tol * abs(want), (activation, xi, gi, want)
    h = np.concatenate([x, np.full_like(x, 1.0)])[None, :]
    got = ref.activate_backward(np.ones((1, x.size)), h, "swiglu")[0, :x.size]
    for xi, gi in zip(x, got):
        want = float(silu_grad(mpmath.mpf(xi)))
        assert abs(gi - want) <= 4e-16 * (4 + abs(xi)) * abs(want), ("swiglu", xi, gi, want)
