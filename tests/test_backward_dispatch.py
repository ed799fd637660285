"""permute_backward and combine_backward: against reference.py, each other's adjoint, dropped
slots, and float64 central differences."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.nn.gradcheck import gradcheck

from support import assert_close

# (T, E, k, d, capacity): T=0, T=1, E=1, k=E, an empty expert, odd widths, dropping
CASES = [(0, 4, 2, 8, None), (1, 1, 1, 100, None), (1, 3, 3, 7, None), (9, 4, 2, 600, None),
         (17, 5, 2, 781, 3), (12, 3, 3, 5, 2), (6, 4, 1, 4, 0)]
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-4, np.float64: 1e-12}


def _plan(rng, T, E, k, capacity):
    """Random distinct experts per token, expert E-1 left empty when E > k."""
    pool = E - 1 if E > k else E
    experts = np.argsort(rng.random((T, pool)), axis=1)[:, :k].astype(np.int32)
    return fm.make_plan(experts, E, capacity)


@pytest.mark.parametrize("T,E,k,d,capacity", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_backward_matches_reference_and_is_the_adjoint(rng, T, E, k, d, capacity,
                                                                dtype):
    plan = _plan(rng, T, E, k, capacity)
    x = rng.standard_normal((T, d)).astype(dtype)
    g = rng.standard_normal((plan.num_rows, d)).astype(dtype)
    dx = fm.permute_backward(g, plan)
    assert_close(dx, ref.permute_backward(g, plan), rtol=RTOL[dtype])
    # <permute(x), g> == <x, permute_backward(g)>
    xs = fm.permute(x, plan).astype(np.float64)
    lhs, rhs = np.sum(xs * g), np.sum(x.astype(np.float64) * dx)
    assert abs(lhs - rhs) <= RTOL[dtype] * np.sum(np.abs(xs * g)) + 1e-30


@pytest.mark.parametrize("T,E,k,d,capacity", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_weights", [False, True])
def test_combine_backward_matches_reference_and_is_the_adjoint(rng, T, E, k, d, capacity,
                                                                dtype, unit_weights):
    plan = _plan(rng, T, E, k, capacity)
    ys = rng.standard_normal((plan.num_rows, d)).astype(dtype)
    w = None if unit_weights else rng.random((T, k)).astype(dtype)
    dy = rng.standard_normal((T, d)).astype(dtype)
    d_ys, d_w = fm.combine_backward(dy, ys, plan, w)
    want_ys, want_w = ref.combine_backward(dy, ys, plan, w)
    assert_close(d_ys, want_ys, rtol=RTOL[dtype])
    assert_close(d_w, want_w, rtol=RTOL[dtype])
    assert not d_w[plan.slots < 0].any()          # a dropped assignment gets no gradient
    # <combine(ys), dy> == <ys, d_ys>, and combine's adjoint of unit weights is permute
    prod = ys.astype(np.float64) * d_ys
    lhs = np.sum(fm.combine(ys, plan, w).astype(np.float64) * dy)
    assert abs(lhs - np.sum(prod)) <= RTOL[dtype] * np.sum(np.abs(prod)) + 1e-30
    if unit_weights:
        np.testing.assert_array_equal(d_ys, fm.permute(dy, plan))


def test_dispatch_gradcheck_with_drops(rng):
    T, E, k, d = 7, 3, 2, 4
    plan = _plan(rng, T, E, k, capacity=3)
    assert plan.num_dropped > 0
    x = rng.standard_normal((T, d))
    ys = rng.standard_normal((plan.num_rows, d))
    w = rng.random((T, k))
    gradcheck(lambda x: fm.permute(x, plan), [x], lambda g: [fm.permute_backward(g, plan)])
    errs = gradcheck(lambda ys, w: fm.combine(ys, plan, w), [ys, w],
                     lambda dy: fm.combine_backward(dy, ys, plan, w))
    assert max(errs.values()) <= 1e-6


def test_dispatch_backward_rejects_bad_input_and_keeps_inputs(rng):
    plan = _plan(rng, 5, 3, 2, None)
    ys = rng.standard_normal((plan.num_rows, 4)).astype(np.float32)
    dy = rng.standard_normal((5, 4)).astype(np.float32)
    ys0, dy0 = ys.copy(), dy.copy()
    fm.combine_backward(dy, ys, plan, np.ones((5, 2), np.float32))
    np.testing.assert_array_equal(ys, ys0)
    np.testing.assert_array_equal(dy, dy0)
    with pytest.raises(TypeError, match="plan: expected a Plan"):
        fm.permute_backward(ys, (plan.rows, plan.offsets))
    with pytest.raises(ValueError, match=r"d_xs: expected shape \(10, \*\)"):
        fm.permute_backward(ys[:3], plan)
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 4\)"):
        fm.combine_backward(dy[:, :3], ys, plan)
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        fm.combine_backward(dy.astype(np.float64), ys, plan)
    with pytest.raises(ValueError, match=r"weights: expected shape \(5, 2\)"):
        fm.combine_backward(dy, ys, plan, np.ones((5, 3), np.float32))
