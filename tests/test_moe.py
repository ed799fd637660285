"""moe_forward, the whole layer, against reference.py for each model family's routing."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.ops.routing import router_logits

from support import RTOL, assert_close, random_layer

STYLES = {
    # name: (router options, shared expert?, shared gate?)
    "mixtral": (dict(router="softmax_topk"), False, False),
    "olmoe": (dict(router="softmax_topk", renormalize=False), False, False),
    "qwen2_moe": (dict(router="softmax_topk", renormalize=False), True, True),
    "deepseek_v3": (dict(router="sigmoid_topk", n_group=4, topk_group=2, scale=2.5), True,
                    False),
}


def _layer_args(rng, style, T, d, h, E, dtype, activation="swiglu", trans_w=False):
    opts, shared, gated = STYLES[style]
    opts = dict(opts)
    x, router_w, w1, w2 = random_layer(rng, T, d, h, E, dtype, activation == "swiglu", trans_w)
    if opts["router"] == "sigmoid_topk":
        opts["bias"] = (0.1 * rng.standard_normal(E)).astype(dtype)
    if shared:
        hs = 24
        H1 = 2 * hs if activation == "swiglu" else hs
        opts["shared_w1"] = (rng.standard_normal((d, H1)) / np.sqrt(d)).astype(dtype)
        opts["shared_w2"] = (rng.standard_normal((hs, d)) / np.sqrt(hs)).astype(dtype)
        if gated:
            opts["shared_gate_w"] = (rng.standard_normal(d) / np.sqrt(d)).astype(dtype)
    return (x, router_w, w1, w2), opts


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moe_forward_matches_reference(rng, style, dtype):
    T, d, h, E, k = 67, 100, 40, 8, 2
    args, opts = _layer_args(rng, style, T, d, h, E, dtype)
    y = fm.moe_forward(*args, k=k, activation="swiglu", **opts)
    assert y.dtype == dtype and y.shape == (T, d)
    assert_close(y, ref.moe_forward(*args, k=k, activation="swiglu", **opts))


@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
@pytest.mark.parametrize("trans_w", [False, True])
def test_moe_forward_activations_and_layouts(rng, activation, trans_w):
    T, d, h, E, k = 33, 64, 24, 4, 2
    args, opts = _layer_args(rng, "mixtral", T, d, h, E, np.float32, activation, trans_w)
    y = fm.moe_forward(*args, k=k, activation=activation, trans_w=trans_w)
    assert_close(y, ref.moe_forward(*args, k=k, activation=activation, trans_w=trans_w))


@pytest.mark.parametrize("T,d,h,E,k", [
    (0, 16, 8, 4, 2),        # no tokens
    (1, 600, 16, 4, 4),      # one token, k = E
    (5, 781, 12, 16, 1),     # most experts get no token
    (29, 100, 30, 1, 1),     # a single expert
])
def test_moe_forward_awkward_shapes(rng, T, d, h, E, k):
    args, _ = _layer_args(rng, "mixtral", T, d, h, E, np.float32)
    y, ctx = fm.moe_forward(*args, k=k, return_context=True)
    assert_close(y, ref.moe_forward(*args, k=k))
    assert ctx.counts.sum() == T * k and ctx.counts.shape == (E,)


@pytest.mark.parametrize("capacity", [0, 2, 5, 10_000])
def test_moe_forward_capacity_drops_add_zero(rng, capacity):
    T, d, h, E, k = 40, 32, 16, 4, 2
    args, _ = _layer_args(rng, "mixtral", T, d, h, E, np.float64)
    y, ctx = fm.moe_forward(*args, k=k, capacity=capacity, return_context=True)
    assert_close(y, ref.moe_forward(*args, k=k, capacity=capacity))
    assert np.all(ctx.counts <= capacity)
    assert ctx.plan.num_dropped == T * k - ctx.counts.sum()
    if capacity == 0:
        np.testing.assert_array_equal(y, 0)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_expert_moe_is_the_dense_mlp(rng, activation, dtype):
    T, d, h = 23, 48, 20
    x, router_w, w1, w2 = random_layer(rng, T, d, h, 1, dtype, activation == "swiglu")
    y = fm.moe_forward(x, router_w, w1, w2, k=1, activation=activation)
    assert_close(y, ref.expert_mlp(x, w1[0], w2[0], activation), rtol=RTOL[dtype] * 10)


def test_context_holds_what_backward_needs(rng):
    T, d, h, E, k = 21, 16, 8, 4, 2
    args, _ = _layer_args(rng, "mixtral", T, d, h, E, np.float32)
    x, router_w, w1, w2 = args
    y, ctx = fm.moe_forward(*args, k=k, return_context=True)
    assert_close(ctx.logits, x @ router_w)
    np.testing.assert_array_equal(ctx.logits, router_logits(x, router_w))
    r = fm.softmax_topk(router_logits(x, router_w), k)
    np.testing.assert_array_equal(ctx.routing.experts, r.experts)
    np.testing.assert_array_equal(ctx.xs, fm.permute(x, ctx.plan))
    assert ctx.h_pre.shape == (T * k, 2 * h) and ctx.h_act.shape == (T * k, h)
    assert_close(ctx.h_act, fm.activate(ctx.h_pre, "swiglu"))
    assert_close(fm.combine(ctx.ys, ctx.plan, ctx.routing.weights), y)
    assert ctx.params["k"] == k and ctx.params["w1"] is w1


def test_inputs_are_not_modified(rng):
    args, opts = _layer_args(rng, "deepseek_v3", 16, 32, 8, 8, np.float32)
    copies = [a.copy() for a in args] + [v.copy() for v in opts.values()
                                         if isinstance(v, np.ndarray)]
    fm.moe_forward(*args, k=2, **opts)
    after = list(args) + [v for v in opts.values() if isinstance(v, np.ndarray)]
    for a, b in zip(after, copies):
        np.testing.assert_array_equal(a, b)


def test_non_contiguous_inputs(rng):
    args, _ = _layer_args(rng, "mixtral", 30, 32, 8, 4, np.float32)
    x, router_w, w1, w2 = args
    xf = np.asfortranarray(x)
    w1s = np.concatenate([w1, w1], axis=2)[:, :, ::2]   # strided view
    y = fm.moe_forward(xf, router_w, w1s, w2, k=2)
    assert_close(y, ref.moe_forward(x, router_w, np.ascontiguousarray(w1s), w2, k=2))


@pytest.mark.parametrize("route", ["blas-per-expert", "streamed", "streamed-and-blas"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_every_gemm_route_matches_the_reference(rng, monkeypatch, route, activation):
    """Raw weights take a way per expert in the forward: streamed with at most STREAM_ROWS
    rows, else BLAS, and all BLAS when the experts average BLAS_MIN_ROWS rows (backends/cpu.py);
    force each on the same layer, two kinds of experts side by side in the last."""
    import fastmoe_nb.backends.cpu as g
    args, _ = _layer_args(rng, "mixtral", 90, 100, 20, 4, np.float32, activation)
    offsets = fm.moe_forward(*args, k=2, activation=activation,
                             return_context=True)[1].plan.offsets
    counts = np.sort(np.diff(offsets))
    monkeypatch.setattr(g, "BLAS_MIN_ROWS", 1 if route == "blas-per-expert" else 10**9)
    monkeypatch.setattr(g, "STREAM_ROWS", {"blas-per-expert": 10**9, "streamed": 10**9,
                                           "streamed-and-blas": int(counts[1])}[route])
    streamed = {"blas-per-expert": [0], "streamed": [4], "streamed-and-blas": [1, 2, 3]}
    assert int(g.route(offsets).stream.sum()) in streamed[route]     # experts streamed
    for trans_w in (False, True):
        a = list(args)
        if trans_w:
            a[2], a[3] = (np.ascontiguousarray(w.transpose(0, 2, 1)) for w in a[2:])
        y = fm.moe_forward(*a, k=2, activation=activation, trans_w=trans_w)
        assert_close(y, ref.moe_forward(*a, k=2, activation=activation, trans_w=trans_w))
        y2, ctx = fm.moe_forward(*a, k=2, activation=activation, trans_w=trans_w,
                                 return_context=True)
        np.testing.assert_array_equal(y, y2)
