"""make_plan, permute, combine and their backwards: against reference.py and float64 central
differences on the shape table (drops by capacity included), by hand, and their invariants
(hypothesis): a stable grouping, adjoint pairs, combine(permute(x)) = k x."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from helpers import (SHAPES, Shape, assert_close, assert_plan_equal, assert_unchanged,
                     check_op, make_experts, plan_of, snapshot)

DTYPES = [np.float32, np.float64]

# the shape table, and what only dispatch has: capacities that drop (0, every choice of a k=E
# routing, a tiny case for central differences), one that drops nothing, many experts
CASES = list(SHAPES.values()) + [
    Shape(50, 13, 4, 8, 2, capacity=3), Shape(50, 13, 4, 8, 2, capacity=0),
    Shape(50, 13, 4, 8, 2, capacity=1000), Shape(30, 13, 4, 1, 1, capacity=7),
    Shape(100, 13, 4, 64, 6), Shape(12, 5, 3, 3, 3, capacity=2),
    Shape(7, 4, 2, 3, 2, capacity=3),
]


def _assignments(rng, shape, repeats):
    """(T, k) experts: distinct per token (the routers' output), or with repeats (still a
    valid plan: an expert may hold a token twice)."""
    if repeats:
        return rng.integers(0, shape.E, (shape.T, shape.k)).astype(np.int32)
    return make_experts(rng, shape.T, shape.E, shape.k, shape.empty)


@pytest.mark.parametrize("shape", CASES, ids=str)
def test_make_plan_matches_reference(rng, shape):
    for repeats in (False, True):
        experts = _assignments(rng, shape, repeats)
        p = fm.make_plan(experts, shape.E, shape.capacity)
        assert_plan_equal(p, ref.make_plan(experts, shape.E, shape.capacity))
        assert p.num_rows == shape.T * shape.k - p.num_dropped


def test_make_plan_by_hand():
    experts = np.array([[2, 0], [0, 1], [2, 0]], np.int32)   # flat ids 0..5
    p = fm.make_plan(experts, 4)
    assert p.rows.tolist() == [1, 2, 5, 3, 0, 4]
    assert p.offsets.tolist() == [0, 3, 4, 6, 6]
    assert p.counts.tolist() == [3, 1, 2, 0]           # expert 3 gets no token
    assert p.slots.tolist() == [[4, 0], [1, 3], [5, 2]]
    c = fm.make_plan(experts, 4, capacity=1)           # first come (token order) is kept
    assert c.rows.tolist() == [1, 3, 0]
    assert c.dropped.tolist() == [2, 0, 1, 0]
    assert c.slots.tolist() == [[2, 0], [-1, 1], [-1, -1]]


def test_make_plan_accepts_int64_without_touching_it():
    e = np.array([[1, 0], [0, 1]], np.int64)
    before = e.copy()
    p = fm.make_plan(e, 2)
    np.testing.assert_array_equal(e, before)
    assert p.rows.dtype == np.int32


# --------------------------------------------------------------------------- permute, combine

def _permute_inputs(repeats):
    def make(rng, shape, dtype):
        experts = _assignments(rng, shape, repeats)
        plan = fm.make_plan(experts, shape.E, shape.capacity)
        return [rng.standard_normal((shape.T, shape.d)).astype(dtype), plan]
    return make


def _combine_inputs(repeats, unit):
    def make(rng, shape, dtype):
        plan = _permute_inputs(repeats)(rng, shape, dtype)[1]
        ys = rng.standard_normal((plan.num_rows, shape.d)).astype(dtype)
        w = None if unit else rng.random((shape.T, shape.k)).astype(dtype)
        return [ys, plan, w]
    return make


PERMUTE = (fm.permute, lambda g, x, plan: [fm.permute_backward(g, plan), None])
PERMUTE_REF = (ref.permute, lambda g, x, plan: [ref.permute_backward(g, plan), None])


def _combine_backward(backward):
    def grads(dy, ys, plan, w):
        d_ys, d_w = backward(dy, ys, plan, w)
        return [d_ys, None, None if w is None else d_w]
    return grads


COMBINE = (fm.combine, _combine_backward(fm.combine_backward))
COMBINE_REF = (ref.combine, _combine_backward(ref.combine_backward))


@pytest.mark.parametrize("repeats", [False, True])
def test_permute_and_its_backward(repeats):
    """A gather is exact (rtol=0); its backward sums each token's rows."""
    assert check_op(PERMUTE, PERMUTE_REF, _permute_inputs(repeats), CASES, rtol=0) > 0


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("repeats", [False, True])
def test_combine_and_its_backward(repeats, unit):
    assert check_op(COMBINE, COMBINE_REF, _combine_inputs(repeats, unit), CASES) > 0


@pytest.mark.parametrize("shape", CASES, ids=str)
def test_combine_backward_of_dropped_and_unit_weights(rng, shape):
    """A dropped assignment gets no weight gradient; with unit weights d_ys is permute(dy),
    bit for bit."""
    plan = plan_of(rng, shape)
    ys = rng.standard_normal((plan.num_rows, shape.d)).astype(np.float32)
    dy = rng.standard_normal((shape.T, shape.d)).astype(np.float32)
    _, d_w = fm.combine_backward(dy, ys, plan, rng.random((shape.T, shape.k)).astype(np.float32))
    assert not d_w[plan.slots < 0].any()
    d_ys, _ = fm.combine_backward(dy, ys, plan)
    np.testing.assert_array_equal(d_ys, fm.permute(dy, plan))


def test_central_differences_saw_dropped_assignments(rng):
    """CASES' tiny capacity case, which check_op differentiates, does drop."""
    shape = CASES[-1]
    assert plan_of(rng, shape).num_dropped > 0
    assert shape.T * shape.d + shape.T * shape.k <= 400     # helpers.FD_MAX


@pytest.mark.parametrize("d", [1, 100, 600, 781])
def test_combine_of_permute_with_unit_weights_is_k_times_x(rng, d):
    T, k, E = 37, 3, 5
    plan = fm.make_plan(make_experts(rng, T, E, k), E)
    x = rng.standard_normal((T, d)).astype(np.float32)
    y = fm.combine(fm.permute(x, plan), plan, np.ones((T, k), np.float32))
    assert_close(y, k * x)


def test_dispatch_backward_rejects_bad_input_and_keeps_inputs(rng):
    plan = plan_of(rng, Shape(5, 4, 2, 3, 2))
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


# --------------------------------------------------------------------------- invariants

@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 40), k=st.integers(1, 4), E=st.integers(1, 9),
       cap=st.one_of(st.none(), st.integers(0, 12)), seed=st.integers(0, 2**31 - 1))
def test_plan_properties(T, k, E, cap, seed):
    r = np.random.default_rng(seed)
    experts = r.integers(0, E, (T, k)).astype(np.int32)
    before = experts.copy()
    p = fm.make_plan(experts, E, cap)
    np.testing.assert_array_equal(experts, before)
    assert_plan_equal(p, ref.make_plan(experts, E, cap))
    flat = experts.ravel()
    # rows is a stable grouping: expert ids non-decreasing, ids increasing within an expert
    assert np.all(np.diff(flat[p.rows]) >= 0)
    for e in range(E):
        blk = p.rows[p.offsets[e]:p.offsets[e + 1]]
        assert np.all(np.diff(blk) > 0) and np.all(flat[blk] == e)
        assert p.counts[e] + p.dropped[e] == np.count_nonzero(flat == e)
        if cap is not None:
            assert p.counts[e] <= cap
    # slots is the inverse of rows; dropped assignments are -1
    kept = p.slots.ravel() >= 0
    np.testing.assert_array_equal(p.rows[p.slots.ravel()[kept]], np.nonzero(kept)[0])
    # combine(permute(x)) with unit weights = x times the number of kept choices of each token
    x = r.standard_normal((T, 3))
    y = fm.combine(fm.permute(x, p), p)
    np.testing.assert_allclose(y, x * (p.slots >= 0).sum(1, keepdims=True), rtol=1e-12,
                               atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 12), k=st.integers(1, 3), E=st.integers(1, 5), d=st.integers(1, 9),
       cap=st.one_of(st.none(), st.integers(0, 6)), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_permute_and_combine_are_adjoint_and_match_the_reference(T, k, E, d, cap, dtype, seed):
    """<permute(x), g> = <x, permute_backward(g)> and <combine(ys, w), dy> = <ys, d_ys>;
    every result as the reference's, no input modified."""
    r = np.random.default_rng(seed)
    plan = fm.make_plan(r.integers(0, E, (T, k)).astype(np.int32), E, cap)
    x = r.standard_normal((T, d)).astype(dtype)
    g = r.standard_normal((plan.num_rows, d)).astype(dtype)
    w = r.random((T, k)).astype(dtype)
    dy = r.standard_normal((T, d)).astype(dtype)
    before = snapshot([x, g, w, dy, plan])
    xs, dx = fm.permute(x, plan), fm.permute_backward(g, plan)
    np.testing.assert_array_equal(xs, ref.permute(x, plan))
    assert_close(dx, ref.permute_backward(g, plan))
    y = fm.combine(g, plan, w)
    d_ys, d_w = fm.combine_backward(dy, g, plan, w)
    assert_close(y, ref.combine(g, plan, w))
    assert_close((d_ys, d_w), ref.combine_backward(dy, g, plan, w))
    assert_unchanged([x, g, w, dy, plan], before)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for lhs, rhs in ((xs.astype(np.float64) * g, x.astype(np.float64) * dx),
                     (y.astype(np.float64) * dy, g.astype(np.float64) * d_ys)):
        assert abs(lhs.sum() - rhs.sum()) <= tol * (np.abs(lhs).sum() + 1.0)
