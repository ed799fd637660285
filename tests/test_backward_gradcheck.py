"""nn.gradcheck itself: it passes a right gradient, catches a wrong one, and checks its input."""
import numpy as np
import pytest

from fastmoe_nb.nn.gradcheck import GradcheckError, gradcheck, numerical_gradient


def _tanh_matmul(x, w):
    # x: (T, d), w: (d, m) -> (T, m)
    return np.tanh(x @ w)


def _tanh_matmul_backward(x, w):
    def backward(dy):
        dz = dy * (1.0 - np.tanh(x @ w) ** 2)
        return [dz @ w.T, x.T @ dz]
    return backward


def test_gradcheck_passes_a_right_gradient_and_keeps_inputs(rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    x0, w0 = x.copy(), w.copy()
    errs = gradcheck(_tanh_matmul, [x, w], _tanh_matmul_backward(x, w))
    assert set(errs) == {0, 1} and max(errs.values()) <= 1e-8
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


def test_gradcheck_catches_a_wrong_gradient(rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    right = _tanh_matmul_backward(x, w)

    def wrong(dy):
        dx, dw = right(dy)
        dw[1, 0] *= 1.0 + 1e-4       # one entry off by 1e-4 relative
        return [dx, dw]

    with pytest.raises(GradcheckError, match=r"inputs\[1\].*worst entry \(1, 0\)"):
        gradcheck(_tanh_matmul, [x, w], wrong)
    errs = gradcheck(_tanh_matmul, [x, w], wrong, raise_exception=False)
    assert errs[0] <= 1e-8 < 1e-6 < errs[1]


def test_gradcheck_tuple_outputs_none_and_subsampling(rng):
    x = rng.standard_normal(5)
    n = np.arange(3)

    def fn(x, n):             # a float output and an int output (not differentiated)
        return x ** 3, n * 2

    def backward(dys):
        assert dys[1] is None
        return [3 * x ** 2 * dys[0], None]

    assert set(gradcheck(fn, [x, n], backward, max_entries=2)) == {0}
    g = numerical_gradient(lambda x: x ** 2, [x.copy()], (np.ones(5),), 0, entries=[1, 3])
    assert np.isnan(g[[0, 2, 4]]).all()
    np.testing.assert_allclose(g[[1, 3]], 2 * x[[1, 3]], rtol=1e-8)


def test_gradcheck_rejects_bad_input(rng):
    x = rng.standard_normal((2, 2))
    with pytest.raises(TypeError, match=r"inputs\[0\]: expected dtype float64"):
        gradcheck(np.sin, [x.astype(np.float32)], lambda dy: [dy])
    with pytest.raises(ValueError, match="backward: expected one gradient"):
        gradcheck(np.sin, [x], lambda dy: [])
    with pytest.raises(ValueError, match=r"backward: gradient 0 has shape \(2,\)"):
        gradcheck(np.sin, [x], lambda dy: [dy[0]])
    with pytest.raises(ValueError, match="eps: expected a finite positive number"):
        gradcheck(np.sin, [x], lambda dy: [dy], eps=0.0)
    with pytest.raises(TypeError, match="fn, backward: expected callables"):
        gradcheck(np.sin, [x], None)
