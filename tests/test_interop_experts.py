"""fastmoe_nb.interop without any framework: the zero-copy array helpers and routed_experts
(the experts with a routing chosen elsewhere), checked against reference.py."""
import numpy as np
import pytest

from support import assert_close, random_layer
from fastmoe_nb import reference as ref
from fastmoe_nb.interop import as_array, routed_experts, routed_experts_backward


def _reference_experts(x, experts, weights, w1, w2, trans_w):
    """y[t] = sum_j weights[t, j] * MLP_{experts[t, j]}(x[t]), per assignment, float64."""
    y = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = experts[t, j]
            a = w1[e].T if trans_w else w1[e]
            b = w2[e].T if trans_w else w2[e]
            y[t] += float(weights[t, j]) * ref.expert_mlp(x[t:t + 1].astype(np.float64),
                                                          a.astype(np.float64),
                                                          b.astype(np.float64), "swiglu")[0]
    return y.astype(x.dtype)


def _routing(rng, T, E, k, skip=None):
    """(T, k) distinct experts per token (never `skip`, to leave an expert empty), weights."""
    pool = [e for e in range(E) if e != skip]
    experts = np.array([rng.permutation(pool)[:k] for _ in range(T)], np.int32).reshape(T, k)
    return experts, rng.random((T, k))


@pytest.mark.parametrize("T,d,h,E,k,skip", [
    (0, 8, 4, 3, 2, None),      # no token
    (1, 100, 8, 4, 2, None),    # one token, d = 100
    (9, 781, 6, 5, 2, 3),       # d = 781, expert 3 receives nothing
    (6, 16, 4, 1, 1, None),     # E = 1, k = 1
    (5, 12, 4, 3, 3, None),     # k = E
])
@pytest.mark.parametrize("dtype,trans_w", [(np.float32, True), (np.float64, False)])
def test_routed_experts_matches_reference(rng, T, d, h, E, k, skip, dtype, trans_w):
    x, _, w1, w2 = random_layer(rng, T, d, h, E, dtype, trans_w=trans_w)
    experts, weights = _routing(rng, T, E, k, skip)
    weights = weights.astype(dtype)
    before = [a.copy() for a in (x, experts, weights, w1, w2)]
    y = routed_experts(x, experts, weights, w1, w2, trans_w=trans_w)
    assert_close(y, _reference_experts(x, experts, weights, w1, w2, trans_w))
    for a, b in zip((x, experts, weights, w1, w2), before):
        np.testing.assert_array_equal(a, b)       # the caller's arrays are untouched


@pytest.mark.parametrize("trans_w", [False, True])
def test_routed_experts_equals_moe_with_the_same_routing(rng, trans_w):
    """routed_experts on moe_forward's own routing is moe_forward; its weight gradients are
    moe_backward's (the reference's)."""
    T, d, h, E, k = 11, 10, 5, 4, 2
    x, rw, w1, w2 = random_layer(rng, T, d, h, E, np.float64, trans_w=trans_w)
    r = ref.softmax_topk(x @ rw, k)
    y, ctx = routed_experts(x, r.experts, r.weights, w1, w2, trans_w=trans_w,
                            return_context=True)
    assert_close(y, ref.moe_forward(x, rw, w1, w2, k, trans_w=trans_w))
    dy = rng.standard_normal((T, d))
    _, d_weights, dw1, dw2 = routed_experts_backward(dy, ctx)
    _, grads = ref.moe_backward(dy, x, rw, w1, w2, k, trans_w=trans_w)
    assert_close(dw1, grads["w1"])
    assert_close(dw2, grads["w2"])
    assert d_weights.shape == (T, k)


def test_routed_experts_backward_finite_differences(rng):
    """Each input's gradient against float64 central differences of <dy, y> along random
    directions (3 per input: a wrong entry anywhere shows in all of them)."""
    T, d, h, E, k = 4, 5, 3, 3, 2
    x, _, w1, w2 = random_layer(rng, T, d, h, E, np.float64, trans_w=True)
    experts, weights = _routing(rng, T, E, k, skip=2)     # expert 2 empty: zero gradient
    dy = rng.standard_normal((T, d))
    _, ctx = routed_experts(x, experts, weights, w1, w2, trans_w=True, return_context=True)
    got = routed_experts_backward(dy, ctx)
    args = [x, weights, w1, w2]

    def f(p):
        return np.sum(dy * routed_experts(p[0], experts, p[1], p[2], p[3], trans_w=True))

    eps = 1e-6
    for i, (a, g) in enumerate(zip(args, got)):
        assert g.shape == a.shape and g.dtype == a.dtype
        for _ in range(3):
            v = rng.standard_normal(a.shape)
            hi, lo = list(args), list(args)
            hi[i], lo[i] = a + eps * v, a - eps * v
            num = (f(hi) - f(lo)) / (2 * eps)
            assert abs(np.sum(g * v) - num) <= 1e-6 * max(1.0, abs(num)), (i, np.sum(g * v), num)
    assert not got[2][2].any() and not got[3][2].any()


@pytest.mark.parametrize("change,err,match", [
    (dict(x=np.zeros((3, 8), np.float32)), ValueError, "experts"),
    (dict(experts=np.zeros((4, 2), np.float32)), TypeError, "experts: expected an integer"),
    (dict(experts=np.full((4, 2), 7, np.int32)), ValueError, "experts: expected expert ids"),
    (dict(weights=np.ones((4, 2), np.float64)), TypeError, "weights: expected dtype float32"),
    (dict(weights=np.ones((4, 3), np.float32)), ValueError, "weights: expected shape"),
    (dict(w1=np.zeros((3, 8, 7), np.float32)), ValueError, "w1: swiglu expects an even"),
    (dict(w2=np.zeros((3, 5, 8), np.float32)), ValueError, "w2: expected shape"),
    (dict(activation="tanh"), ValueError, "activation: expected one of"),
])
def test_routed_experts_rejects_bad_input(rng, change, err, match):
    args = dict(x=np.zeros((4, 8), np.float32), experts=np.zeros((4, 2), np.int32),
                weights=np.ones((4, 2), np.float32), w1=np.zeros((3, 8, 8), np.float32),
                w2=np.zeros((3, 4, 8), np.float32), activation="swiglu")
    args.update(change)
    with pytest.raises(err, match=match):
        routed_experts(**args)


def test_as_array_is_zero_copy_for_numpy_and_array_likes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert as_array(a) is a
    class Foreign:                                    # another library's host array
        __array_interface__ = a.__array_interface__

    view = as_array(Foreign())
    assert view.shape == (2, 3) and np.shares_memory(view, a)
    ro = a.copy()
    ro.flags.writeable = False
    assert as_array(ro) is ro                         # read-only stays a view...
    w = as_array(ro, writable=True)                   # ...unless asked writable: copied then
    assert w.flags.writeable and not np.shares_memory(w, ro)
    np.testing.assert_array_equal(w, ro)
    with pytest.raises(TypeError, match="x: expected an array"):
        as_array(object(), "x")
