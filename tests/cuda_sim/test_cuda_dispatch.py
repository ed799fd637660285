"""CUDA make_plan / permute / combine (and their backward) vs the reference and the CPU path."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from helpers import assert_close, is_device, to_device, to_host


def experts_of(rng, T, E, k):
    """(T, k) distinct expert ids per token, expert E-1 left empty when E > k."""
    if T == 0:
        return np.zeros((0, k), np.int32)
    pool = E - 1 if E > k else E
    return np.stack([rng.permutation(pool)[:k] for _ in range(T)]).astype(np.int32)


# (T, E, k, d, capacity): no token, E = 1, k = E, an empty expert, capacity drops
CASES = [(0, 3, 2, 5, None), (1, 1, 1, 100, None), (6, 4, 4, 13, None), (9, 5, 2, 100, None),
         (9, 5, 2, 7, 2), (7, 3, 2, 6, 0)]


@pytest.mark.parametrize("T,E,k,d,capacity", CASES)
def test_plan_permute_combine(rng, T, E, k, d, capacity):
    experts = experts_of(rng, T, E, k)
    plan = fm.make_plan(to_device(experts), E, capacity)
    want = ref.make_plan(experts, E, capacity)
    cpu = fm.make_plan(experts, E, capacity)
    assert plan.capacity == capacity and is_device(plan.rows)
    for got, w, c in zip(plan[:5], want[:5], cpu[:5]):
        assert_close(got, w.astype(c.dtype))
        assert_close(got, c)
    x = rng.standard_normal((T, d)).astype(np.float32)
    xs = fm.permute(to_device(x), plan)
    assert_close(xs, ref.permute(x, want))
    ys = (rng.standard_normal((plan.num_rows, d))).astype(np.float32)
    weights = rng.random((T, k)).astype(np.float32)
    y = fm.combine(to_device(ys), plan, to_device(weights))
    assert_close(y, ref.combine(ys, want, weights))
    assert_close(y, fm.combine(ys, cpu, weights))
    assert_close(fm.combine(to_device(ys), plan), ref.combine(ys, want))   # weights None: ones
    # backward: permute's adjoint is a unit-weight combine; combine's is a gather + dots
    assert_close(fm.permute_backward(to_device(ys), plan), ref.combine(ys, want))
    dy = rng.standard_normal((T, d)).astype(np.float32)
    d_ys, d_w = fm.combine_backward(to_device(dy), to_device(ys), plan, to_device(weights))
    c_ys, c_w = fm.combine_backward(dy, ys, cpu, weights)
    assert_close(d_ys, c_ys)
    assert_close(d_w, c_w)


def test_plan_int64_strided_experts(rng):
    experts = experts_of(rng, 8, 6, 3).astype(np.int64)
    wide = np.zeros((8, 6), np.int64)
    wide[:, ::2] = experts
    d = to_device(wide)[:, ::2]                       # a strided int64 device view
    plan = fm.make_plan(d, 6)
    for got, w in zip(plan[:5], ref.make_plan(experts, 6)[:5]):
        np.testing.assert_array_equal(to_host(got), w)


def test_combine_float64_and_determinism(rng):
    experts = experts_of(rng, 5, 4, 2)
    plan = fm.make_plan(to_device(experts), 4)
    ys = rng.standard_normal((10, 3))
    w = rng.random((5, 2))
    a = to_host(fm.combine(to_device(ys), plan, to_device(w)))
    b = to_host(fm.combine(to_device(ys), plan, to_device(w)))
    np.testing.assert_array_equal(a, b)
    assert_close(a, ref.combine(ys, ref.make_plan(experts, 4), w))


def test_dispatch_errors(rng):
    bad = np.array([[0, 4], [1, 2]], np.int32)
    with pytest.raises(ValueError, match=r"experts: expected expert ids in 0..num_experts-1 = "
                                         r"0..3, found 4"):
        fm.make_plan(to_device(bad), 4)
    with pytest.raises(ValueError, match="found -1"):
        fm.make_plan(to_device(-np.ones((2, 2), np.int32)), 4)
    plan = fm.make_plan(to_device(experts_of(rng, 3, 4, 2)), 4)
    with pytest.raises(ValueError, match=r"x: expected shape \(3, \*\)"):
        fm.permute(to_device(np.zeros((4, 2), np.float32)), plan)
    with pytest.raises(TypeError, match="weights: expected dtype float32"):
        fm.combine(to_device(np.zeros((6, 2), np.float32)), plan, to_device(np.ones((3, 2))))
