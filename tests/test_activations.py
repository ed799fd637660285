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
