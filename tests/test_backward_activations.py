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
