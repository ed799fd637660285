"""make_plan, permute, combine against reference.py, plus their invariants (hypothesis)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from support import assert_close


def distinct_experts(rng, T, k, E):
    """(T, k) int32: k distinct experts per token (the routers' output)."""
    return np.array([rng.choice(E, k, replace=False) for _ in range(T)],
                    np.int32).reshape(T, k)


def _plans_equal(p, q):
    for name in ("rows", "offsets", "counts", "slots", "dropped"):
        a, b = getattr(p, name), getattr(q, name)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert p.capacity == q.capacity


CASES = [  # (T, k, E, capacity)
    (0, 2, 4, None), (1, 1, 1, None), (1, 3, 3, None), (17, 2, 8, None), (64, 4, 4, None),
    (50, 2, 8, 3), (50, 2, 8, 0), (50, 2, 8, 1000), (30, 1, 1, 7), (100, 6, 64, None),
]


@pytest.mark.parametrize("T,k,E,capacity", CASES)
def test_make_plan_matches_reference(rng, T, k, E, capacity):
    experts = distinct_experts(rng, T, k, E)
    p = fm.make_plan(experts, E, capacity)
    _plans_equal(p, ref.make_plan(experts, E, capacity))
    assert p.num_rows == T * k - p.num_dropped


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


@pytest.mark.parametrize("T,k,E,capacity", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_permute_combine_match_reference(rng, T, k, E, capacity, dtype):
    d = 13
    experts = rng.integers(0, E, (T, k)).astype(np.int32)   # repeats allowed: still valid
    plan = fm.make_plan(experts, E, capacity)
    x = rng.standard_normal((T, d)).astype(dtype)
    xs = fm.permute(x, plan)
    np.testing.assert_array_equal(xs, ref.permute(x, plan))   # a gather is exact
    ys = rng.standard_normal((plan.num_rows, d)).astype(dtype)
    w = rng.random((T, k)).astype(dtype)
    assert_close(fm.combine(ys, plan, w), ref.combine(ys, plan, w))
    assert_close(fm.combine(ys, plan), ref.combine(ys, plan))


@pytest.mark.parametrize("d", [1, 100, 600, 781])
def test_combine_of_permute_with_unit_weights_is_k_times_x(rng, d):
    T, k, E = 37, 3, 5
    experts = distinct_experts(rng, T, k, E)
    plan = fm.make_plan(experts, E)
    x = rng.standard_normal((T, d)).astype(np.float32)
    y = fm.combine(fm.permute(x, plan), plan, np.ones((T, k), np.float32))
    assert_close(y, k * x)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 40), k=st.integers(1, 4), E=st.integers(1, 9),
       cap=st.one_of(st.none(), st.integers(0, 12)), seed=st.integers(0, 2**31 - 1))
def test_plan_properties(T, k, E, cap, seed):
    r = np.random.default_rng(seed)
    experts = r.integers(0, E, (T, k)).astype(np.int32)
    p = fm.make_plan(experts, E, cap)
    _plans_equal(p, ref.make_plan(experts, E, cap))
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
