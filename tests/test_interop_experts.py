"""fastmoe_nb.interop without any framework: the zero-copy array helpers and routed_experts
(the experts with a routing chosen elsewhere), checked against reference.py."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmoe_nb import reference as ref
from fastmoe_nb.interop import as_array, routed_experts, routed_experts_backward

from helpers import (SHAPES, Shape, assert_close, assert_unchanged, check_op, make_experts,
                     make_layer, snapshot)


def _inputs(trans_w):
    def make(rng, shape, dtype):
        """[x, experts (distinct per token; expert E-1 left empty when asked), weights, w1, w2,
        activation, trans_w]"""
        x, _, w1, w2, _ = make_layer(rng, shape.T, shape.d, shape.h, shape.E, dtype,
                                     trans_w=trans_w)
        experts = make_experts(rng, shape.T, shape.E, shape.k, shape.empty)
        weights = rng.random((shape.T, shape.k)).astype(dtype)
        return [x, experts, weights, w1, w2, "swiglu", trans_w]
    return make


def _routed(forward, backward):
    def grads(dy, x, experts, weights, w1, w2, activation, trans_w):
        _, ctx = forward(x, experts, weights, w1, w2, activation, trans_w, return_context=True)
        dx, d_weights, dw1, dw2 = backward(dy, ctx)
        return [dx, None, d_weights, dw1, dw2, None, None]
    return forward, grads


@pytest.mark.parametrize("trans_w", [False, True])
def test_routed_experts_forward_and_backward(one_thread, trans_w):
    """y, dx, d_weights, dw1, dw2 against reference.routed_experts on the shape table (T=0,
    d=100/600/781, an empty expert, E=1, k=E), the arguments untouched, central differences on
    the tiny shapes (at most 250 float entries)."""
    assert check_op(_routed(routed_experts, routed_experts_backward),
                    _routed(ref.routed_experts, ref.routed_experts_backward), _inputs(trans_w),
                    SHAPES.values(), fd_max=250) > 0


def test_routed_experts_backward_of_an_empty_expert_is_zero(rng):
    x, experts, weights, w1, w2, act, _ = _inputs(True)(rng, SHAPES["tiny"], np.float64)
    assert not (experts == 2).any()
    _, ctx = routed_experts(x, experts, weights, w1, w2, trans_w=True, return_context=True)
    _, _, dw1, dw2 = routed_experts_backward(rng.standard_normal(x.shape), ctx)
    assert not dw1[2].any() and not dw2[2].any()


@pytest.mark.parametrize("trans_w", [False, True])
def test_routed_experts_equals_moe_with_the_same_routing(rng, trans_w):
    """routed_experts on moe_forward's own routing is moe_forward; its weight gradients are
    moe_backward's (the reference's)."""
    T, d, h, E, k = 11, 10, 5, 4, 2
    x, rw, w1, w2, _ = make_layer(rng, T, d, h, E, np.float64, trans_w=trans_w)
    r = ref.softmax_topk(ref.router_logits(x, rw), k)
    y, ctx = routed_experts(x, r.experts, r.weights, w1, w2, trans_w=trans_w,
                            return_context=True)
    assert_close(y, ref.moe_forward(x, rw, w1, w2, k, trans_w=trans_w))
    dy = rng.standard_normal((T, d))
    _, d_weights, dw1, dw2 = routed_experts_backward(dy, ctx)
    _, grads = ref.moe_backward(dy, x, rw, w1, w2, k, trans_w=trans_w)
    assert_close(dw1, grads["w1"])
    assert_close(dw2, grads["w2"])
    assert d_weights.shape == (T, k)


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


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 8), d=st.integers(1, 10), h=st.integers(1, 5), E=st.integers(1, 5),
       data=st.data(), trans_w=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_routed_experts_properties(T, d, h, E, data, trans_w, dtype, seed):
    """Any routing of any small layer: y (T, d) and its gradients in their operands' shapes,
    as the reference's; the operands untouched."""
    k = data.draw(st.integers(1, E))
    args = _inputs(trans_w)(np.random.default_rng(seed), Shape(T, d, h, E, k), dtype)
    dy = np.random.default_rng(seed + 1).standard_normal((T, d)).astype(dtype)
    before = snapshot(args + [dy])
    y, ctx = routed_experts(*args, return_context=True)
    y_ref, ctx_ref = ref.routed_experts(*args, return_context=True)
    assert y.shape == (T, d) and y.dtype == dtype
    assert_close(y, y_ref)
    got = routed_experts_backward(dy, ctx)
    assert [g.shape for g in got] == [args[0].shape, (T, k), args[3].shape, args[4].shape]
    assert_close(got, ref.routed_experts_backward(dy, ctx_ref))
    assert_unchanged(args + [dy], before)
