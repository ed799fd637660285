"""activate and activate_backward for every activation (swiglu: [gate | up], both halves):
against reference.py and float64 central differences on the shape table, at the float limits,
invariants (hypothesis), bad input; and the reference itself against 50-digit mpmath."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from helpers import SHAPES, assert_close, assert_unchanged, check_op, snapshot

DTYPES = [np.float32, np.float64]


def _width(H, activation):
    """The pre-activation's width for an activation output of width H."""
    return 2 * H if activation == "swiglu" else H


def _inputs(activation):
    def make(rng, shape, dtype):
        """h: (T, d | 2d) pre-activations of O(3), away from relu's kink (central differences
        straddling 0 are not a derivative)."""
        h = 3 * rng.standard_normal((shape.T, _width(shape.d, activation)))
        h[np.abs(h) < 1e-3] = 0.5
        return [h.astype(dtype), activation]
    return make


OP = (fm.activate, lambda dy, h, a: [fm.activate_backward(dy, h, a), None])
REF = (ref.activate, lambda dy, h, a: [ref.activate_backward(dy, h, a), None])


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
def test_activate_forward_and_backward(activation):
    """Forward and backward against the reference on every shape of the table (T=0, T=1,
    widths 100 / 600 / 781, swiglu halves of odd width), inputs unchanged, and the backward
    against central differences on the small ones."""
    assert check_op(OP, REF, _inputs(activation), SHAPES.values()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H", [(1, 2), (5, 782)])    # the narrowest, an even width
def test_activate_output_width(rng, dtype, N, H):
    for activation in fm.ACTIVATIONS:
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


@pytest.mark.parametrize("dtype", DTYPES)
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


# --------------------------------------------------------------------------- invariants

@settings(max_examples=60, deadline=None)
@given(N=st.integers(0, 9), H=st.integers(1, 40), activation=st.sampled_from(fm.ACTIVATIONS),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**31 - 1))
def test_activate_properties(N, H, activation, dtype, scale, seed):
    """Any shape and scale: the output's shape, the reference's values forward and backward,
    the inputs untouched."""
    r = np.random.default_rng(seed)
    h = (scale * r.standard_normal((N, _width(H, activation)))).astype(dtype)
    dy = r.standard_normal((N, H)).astype(dtype)
    before = snapshot([h, dy])
    out = fm.activate(h, activation)
    assert out.shape == (N, H) and out.dtype == dtype
    assert_close(out, ref.activate(h, activation), floor=scale)
    dh = fm.activate_backward(dy, h, activation)
    # the swiglu gate's gradient is up * silu'(gate): its scale is that of h
    assert_close(dh, ref.activate_backward(dy, h, activation), floor=max(scale, 1.0))
    assert_unchanged([h, dy], before)


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from([(4,), (2, 3, 4), ()]), activation=st.sampled_from(fm.ACTIVATIONS))
def test_activate_names_h_for_a_wrong_rank(shape, activation):
    with pytest.raises(ValueError, match="^h: expected a 2-D array"):
        fm.activate(np.zeros(shape, np.float32), activation)


# --------------------------------------------------------------------------- float limits

def _extremes(dtype):
    """x at the float limits: +-1e-30, +-1e20, +-1e30, +-dtype max (float64: also +-1e160 and
    +-1e200, where x^2 overflows)."""
    big = np.finfo(dtype).max
    vals = [1e-30, 1e20, 1e30, big] + ([1e160, 1e200] if dtype == np.float64 else [])
    return np.array([v * s for v in vals for s in (1, -1)], dtype)


def _forward_limit(x, activation):
    """The analytic value to rounding: x for x >> 0, 0 for x << 0, x/2 for |x| tiny (relu:
    max(x, 0))."""
    if activation == "relu":
        return np.maximum(x, 0)
    return np.where(np.abs(x) < 1, x / 2, np.where(x > 0, x, 0)).astype(x.dtype)


def _grad_limit(x, activation):
    """act'(x) to rounding: 1 for x >> 0, 0 for x << 0, 1/2 for |x| tiny (relu: x > 0)."""
    if activation == "relu":
        return (x > 0).astype(x.dtype)
    return np.where(np.abs(x) < 1, 0.5, np.where(x > 0, 1.0, 0.0)).astype(x.dtype)


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activate_at_float_limits(activation, dtype):
    """Finite and equal to the analytic limit, the kernel and the reference (gelu_tanh's
    backward used to give 0 * inf = NaN once x^2 overflowed). swiglu: gate at the limits,
    up = 1, so d gate = silu'(gate), d up = silu(gate)."""
    x = _extremes(dtype)[None, :]
    eps = np.finfo(dtype).eps
    if activation == "swiglu":
        h = np.concatenate([x, np.ones_like(x)], 1)
        want_dh = np.concatenate([_grad_limit(x, activation), _forward_limit(x, "silu")], 1)
    else:
        h, want_dh = x, _grad_limit(x, activation)
    want = _forward_limit(x, activation)
    dy = np.ones_like(x)
    for name, got, dh in (
            ("kernel", fm.activate(h, activation), fm.activate_backward(dy, h, activation)),
            ("reference", ref.activate(h, activation), ref.activate_backward(dy, h, activation))):
        assert np.isfinite(got).all() and np.isfinite(dh).all(), (name, got, dh)
        np.testing.assert_allclose(got, want, rtol=4 * eps, atol=0, err_msg=name)
        np.testing.assert_allclose(dh, want_dh, rtol=4 * eps, atol=0, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_backward_fuzz_report(dtype):
    h = np.full((1, 8), 1e20, dtype)
    h[0, 4:] = -1e20
    got = fm.activate_backward(np.ones((1, 8), dtype), h, "gelu_tanh")
    np.testing.assert_array_equal(got, np.array([[1.0] * 4 + [0.0] * 4], dtype))


# --------------------------------------------------------------------------- the reference

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
