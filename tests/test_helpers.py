"""The test helpers themselves: assert_close and check_op fail where they must (a helper that
cannot fail makes every test built on it unable to fail) and pass what is right."""
import numpy as np
import pytest

from fastmoe_nb.nn.gradcheck import GradcheckError

from helpers import SHAPES, Shape, assert_close, check_op


def test_assert_close_scale_floor_and_kinds():
    want = np.array([1.0, -2.0, 0.5], np.float32)
    assert_close(want * (1 + 4e-6), want)                      # within 1e-5 of the scale
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(want * (1 + 3e-5), want)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(want.astype(np.float64), want)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(want[:2], want)
    # a mathematically zero result: rounding noise of O(1) terms compares as zero...
    assert_close(np.array([4e-19, -1e-17]), np.array([-4e-19, 3e-18]))
    # ...but not a wrong O(floor) value, nor NaN
    with pytest.raises(AssertionError):
        assert_close(np.array([1e-11, 0.0]), np.array([0.0, 0.0]))
    with pytest.raises(AssertionError):
        assert_close(np.array([np.nan, 0.0]), np.array([0.0, 0.0]))
    # a caller's own floor for values far from O(1)
    with pytest.raises(AssertionError):
        assert_close(np.array([2e-6]), np.array([1e-6]), floor=1e-6)
    # integers exactly; non-finite entries in place; structures entry by entry
    with pytest.raises(AssertionError):
        assert_close(np.array([1, 2], np.int32), np.array([1, 3], np.int32))
    assert_close(np.array([np.inf, 1.0]), np.array([np.inf, 1.0]))
    with pytest.raises(AssertionError):
        assert_close(np.array([-np.inf, 1.0]), np.array([np.inf, 1.0]))
    assert_close((want, None, {"a": want}), (want, None, {"a": want}))
    with pytest.raises(AssertionError, match=r"\[2\]\['a'\]"):
        assert_close((want, None, {"a": want}), (want, None, {"a": want + 1}))


def _square():
    fwd = lambda x: x * x                                  # noqa: E731
    bwd = lambda dy, x: [2 * x * dy]                       # noqa: E731
    return fwd, bwd


def _inputs(rng, shape, dtype):
    return [rng.standard_normal((shape.T, shape.d)).astype(dtype)]


SMALL = [SHAPES["tiny"], SHAPES["T=1,d=100"]]


def test_check_op_passes_a_right_op_and_runs_central_differences():
    assert check_op(_square(), _square(), _inputs, SMALL) == len(SMALL)


def test_check_op_catches_a_wrong_forward():
    fwd, bwd = _square()
    with pytest.raises(AssertionError, match="forward"):
        check_op((lambda x: x * x * (1 + 1e-4), bwd), _square(), _inputs, SMALL)


def test_check_op_catches_a_backward_that_disagrees_with_the_reference():
    fwd, _ = _square()
    with pytest.raises(AssertionError, match="backward"):
        check_op((fwd, lambda dy, x: [2 * x * dy * (1 + 1e-4)]), _square(), _inputs, SMALL)


def test_check_op_catches_a_backward_wrong_with_its_reference():
    """The reference's backward shares the op's mistake: central differences still see it."""
    fwd, _ = _square()
    wrong = (fwd, lambda dy, x: [3 * x * dy])
    with pytest.raises(GradcheckError):
        check_op(wrong, wrong, _inputs, SMALL)


def test_check_op_catches_an_op_that_writes_its_input():
    def fwd(x):
        x += 0.0 * x + 1.0
        return x * 1.0

    with pytest.raises(AssertionError, match="modified"):
        check_op(fwd, lambda x: x, _inputs, [Shape(3, 2, 1, 1, 1)], grads=False)
