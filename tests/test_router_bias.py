"""The router bias router_b (logits = x @ router_w + router_b): moe_forward / moe_backward against
the reference for every router, float64 central differences through moe_forward and nn.MoE,
the sigmoid router's choice-only bias beside it, width-free router logits, validation."""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.nn as nn
from fastmoe_nb import reference as ref
from fastmoe_nb.nn.gradcheck import gradcheck

from helpers import assert_close, layer_logits, make_layer


def make(rng, T, d, h, E, dtype=np.float64):
    """helpers.make_layer's arrays and its router bias: x, router_w, w1, w2, router_b."""
    x, router_w, w1, w2, kw = make_layer(rng, T, d, h, E, dtype, router_b=True)
    return x, router_w, w1, w2, kw["router_b"]


CALLS = [dict(), dict(renormalize=False),
         dict(router="sigmoid_topk", bias="choice", scale=2.0),
         dict(router="sigmoid_topk", renormalize=False)]


def _kw(rng, call, E, dtype):
    kw = dict(call)
    if kw.get("bias") == "choice":                 # the sigmoid router's choice-only bias
        kw["bias"] = (0.3 * rng.standard_normal(E)).astype(dtype)
    return kw


@pytest.mark.parametrize("T,d,E,k", [(0, 8, 4, 2), (1, 6, 3, 3), (17, 100, 6, 2)])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_backward_match_the_reference(rng, T, d, E, k, call, dtype):
    x, router_w, w1, w2, b = make(rng, T, d, 4, E, dtype)
    kw = _kw(rng, call, E, dtype)
    b0 = b.copy()
    y, ctx = fm.moe_forward(x, router_w, w1, w2, k, router_b=b, return_context=True, **kw)
    assert_close(y, ref.moe_forward(x, router_w, w1, w2, k, router_b=b, **kw))
    np.testing.assert_array_equal(ctx.logits, ref.router_logits(x, router_w, b))
    dy = rng.standard_normal((T, d)).astype(dtype)
    dx, grads = fm.moe_backward(dy, ctx)
    want_dx, want = ref.moe_backward(dy, x, router_w, w1, w2, k, router_b=b, **kw)
    assert sorted(grads) == sorted(want) and "router_b" in grads and "bias" not in grads
    assert grads["router_b"].shape == (E,) and grads["router_b"].dtype == dtype
    for name in want:
        assert_close(grads[name], want[name])
    assert_close(dx, want_dx)
    np.testing.assert_array_equal(b, b0)
    # without router_b: no gradient entry; a zero router_b is the layer without one
    _, ctx0 = fm.moe_forward(x, router_w, w1, w2, k, return_context=True, **kw)
    assert "router_b" not in fm.moe_backward(dy, ctx0)[1]
    y0 = fm.moe_forward(x, router_w, w1, w2, k, router_b=np.zeros(E, dtype), **kw)
    np.testing.assert_array_equal(y0, fm.moe_forward(x, router_w, w1, w2, k, **kw))


def test_router_b_moves_choice_and_weights_the_choice_bias_only_the_choice(rng):
    x, router_w, w1, w2, _ = make(rng, 12, 8, 4, 4)
    big = np.array([0.0, 0.0, 0.0, 50.0])             # expert 3 wins every token
    for name in ("router_b", "bias"):
        _, ctx = fm.moe_forward(x, router_w, w1, w2, 2, router="sigmoid_topk",
                                return_context=True, **{name: big})
        assert (ctx.routing.experts[:, 0] == 3).all()
        s3 = ctx.routing.weights[:, 0]
        if name == "router_b":                         # sigmoid(logit + 50) = 1: all weight
            assert_close(s3 / (s3 + ctx.routing.weights[:, 1]), s3, rtol=1e-12)
        else:                                          # weights from the unbiased scores
            assert (s3 < 0.99).all()


@pytest.mark.parametrize("name,k,opts", [("switch_top1", 1, dict(capacity_factor=1.0)),
                                         ("gshard_top2", 2, dict(capacity_factor=None)),
                                         ("dense_gating", 4, {}),
                                         ("noisy_topk", 2, dict(train=False))])
def test_named_routers_take_the_biased_logits(rng, one_thread, name, k, opts):
    x, router_w, w1, w2, b = make(rng, 7, 5, 3, 4)
    _, ctx = fm.moe_forward(x, router_w, w1, w2, k, router=name, router_b=b,
                            return_context=True, **opts)
    np.testing.assert_array_equal(ctx.logits, ref.router_logits(x, router_w, b))

    def fn(router_b, router_w):
        return fm.moe_forward(x, router_w, w1, w2, k, router=name, router_b=router_b, **opts)

    def backward(dy):
        _, c = fm.moe_forward(x, router_w, w1, w2, k, router=name, router_b=b,
                              return_context=True, **opts)
        g = fm.moe_backward(dy, c)[1]
        return g["router_b"], g["router_w"]

    errs = gradcheck(fn, [b, router_w], backward)
    assert max(errs.values()) <= 1e-6


@pytest.mark.parametrize("call", CALLS)
def test_gradcheck_through_moe_forward(rng, one_thread, call):
    T, d, h, E, k = 6, 4, 3, 4, 2
    x, router_w, w1, w2, b = make(rng, T, d, h, E)
    kw = _kw(rng, call, E, np.float64)

    def fn(x, router_w, router_b, w1, w2):
        return fm.moe_forward(x, router_w, w1, w2, k, router_b=router_b, **kw)

    def backward(dy):
        _, ctx = fm.moe_forward(x, router_w, w1, w2, k, router_b=b, return_context=True, **kw)
        dx, g = fm.moe_backward(dy, ctx)
        return dx, g["router_w"], g["router_b"], g["w1"], g["w2"]

    errs = gradcheck(fn, [x, router_w, b, w1, w2], backward)
    assert len(errs) == 5 and max(errs.values()) <= 1e-6


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_nn_moe_router_bias_gradcheck_with_balancing_losses(rng, one_thread, router):
    moe = nn.MoE(5, 3, 4, 2, router=router, router_bias=True, dtype=np.float64, rng=1,
                 aux_loss_coef=0.1, z_loss_coef=0.01)
    assert moe.router_b.decay is False and moe.router_b.requires_grad
    assert not moe.router_b.value.any()                       # zeros at first
    x, b = rng.standard_normal((7, 5)), 0.5 * rng.standard_normal(4)

    def fn(x, router_b):          # the layer and its training losses, times their coefficients
        moe.router_b.value[...] = router_b
        y = moe.forward(x)
        return y, np.array([moe.aux_loss_coef * moe.aux_loss + moe.z_loss_coef * moe.z_loss])

    def grads(dy):
        fn(x, b)
        moe.zero_grad()
        return moe.backward(dy), moe.router_b.grad.copy()

    def backward(dys):            # backward adds the losses' gradients with weight 1: rescale
        dy, dloss = dys
        with_loss, loss_only = grads(dy), grads(np.zeros_like(dy))
        return [g1 - g0 + dloss[0] * g0 for g1, g0 in zip(with_loss, loss_only)]

    errs = gradcheck(fn, [x, b], backward)
    assert len(errs) == 2 and max(errs.values()) <= 1e-6


@pytest.mark.parametrize("T,d", [(1, 5), (3, 16), (64, 100), (65, 30), (257, 64)])   # both
# sides of kernels/cpu/config.py's LOGITS_LOOP_ROWS: a plain loop, then the grouped GEMM kernel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_router_logits_of_a_column_do_not_depend_on_the_width(rng, T, d, dtype):
    x = rng.standard_normal((T, d)).astype(dtype)
    for E, n in ((1, 1), (3, 5), (8, 8), (13, 4), (16, 1), (17, 20)):
        w = rng.standard_normal((d, E + n)).astype(dtype)
        wide = layer_logits(x, w)
        np.testing.assert_array_equal(layer_logits(x, w[:, :E]), wide[:, :E])
        np.testing.assert_array_equal(wide, ref.router_logits(x, w))
        assert_close(wide, (x.astype(np.float64) @ w).astype(dtype))


def test_bad_router_b_names_the_argument(rng):
    x, router_w, w1, w2, b = make(rng, 5, 4, 3, 3, np.float32)
    cases = [(b[:2], ValueError, "router_b: expected shape"),
             (b.astype(np.float64), TypeError, "router_b"),
             (np.array([0.0, np.inf, 0.0], np.float32), ValueError, "router_b: expected finite"),
             ([0.0, 1.0, 2.0], TypeError, "router_b")]
    for bad, err, match in cases:
        with pytest.raises(err, match=match):
            fm.moe_forward(x, router_w, w1, w2, 2, router_b=bad)


def test_nn_moe_router_bias_in_checkpoints(rng, tmp_path):
    moe = nn.MoE(6, 4, 3, 2, router_bias=True, rng=0)
    moe.router_b.value[...] = [0.5, -1.0, 2.0]
    nn.save(tmp_path / "m.npz", moe)
    back = nn.load(tmp_path / "m.npz", nn.MoE(6, 4, 3, 2, router_bias=True, rng=1))
    np.testing.assert_array_equal(back.router_b.value, moe.router_b.value)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x), moe.forward(x))
    with pytest.raises(ValueError, match="router_b"):
        nn.load(tmp_path / "m.npz", nn.MoE(6, 4, 3, 2, rng=1))
