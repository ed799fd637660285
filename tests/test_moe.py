"""moe_forward / moe_backward, the whole layer, and the shared expert (shared_forward /
shared_backward): against reference.py and float64 central differences on the shape table for
each model family's routing, invariants (an E=1 k=1 layer is the dense MLP, capacity drops add
zero, determinism across thread counts), gradient accumulation (grads=), bad input."""
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from helpers import (RTOL, SHAPES, Shape, assert_close, assert_unchanged, check_op,
                     make_layer, snapshot)

DTYPES = [np.float32, np.float64]
STYLE_SHAPE = Shape(67, 100, 40, 8, 2)            # the model families' layer, 8 experts
LAYER_SHAPES = list(SHAPES.values()) + [STYLE_SHAPE]
ARRAYS = ["shared_w1", "shared_w2", "shared_gate_w", "router_b"]   # the optional weights


def _groups(E):
    """DeepSeek-V3's groups for E experts: (n_group, topk_group)."""
    return {8: (4, 2), 6: (3, 2), 4: (2, 1)}[E]


# name: (make_layer options, moe_forward options, shapes); the options of every family's
# routing: both routers, renormalize off, groups, capacity, both layouts, every activation,
# shared experts with and without their gate, a router bias
CONFIGS = {
    "mixtral": ({}, {}, LAYER_SHAPES),
    "olmoe": ({}, {"renormalize": False}, LAYER_SHAPES),
    "qwen2_moe": ({"shared": True, "gate": True}, {"renormalize": False}, LAYER_SHAPES),
    "deepseek_v3": ({"shared": True, "bias": True}, dict(router="sigmoid_topk", scale=2.5,
                                                         groups=True),
                    [STYLE_SHAPE, Shape(13, 24, 8, 6, 3), Shape(3, 4, 2, 4, 2)]),
    "gelu": ({"activation": "gelu"}, {}, LAYER_SHAPES),
    "gelu_tanh,trans_w": ({"activation": "gelu_tanh", "trans_w": True}, {}, LAYER_SHAPES),
    "relu,capacity": ({"activation": "relu"}, {"capacity": 3}, LAYER_SHAPES),
    "silu,shared": ({"activation": "silu", "shared": True}, {}, LAYER_SHAPES),
    "sigmoid,bias": ({"bias": True}, dict(router="sigmoid_topk", scale=1.5), LAYER_SHAPES),
    "sigmoid,shared,gate,trans_w,capacity": (
        {"shared": True, "gate": True, "trans_w": True},
        dict(router="sigmoid_topk", renormalize=False, capacity=4), LAYER_SHAPES),
    "router_b": ({"router_b": True}, {}, LAYER_SHAPES),
}


def _layer_inputs(layer_opts, call_opts):
    def make(rng, shape, dtype):
        """[x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w (d, 1), router_b, k,
        options]; an empty expert by router_b[E-1] = -30 (never chosen unless k = E)."""
        x, router_w, w1, w2, kw = make_layer(rng, shape.T, shape.d, shape.h, shape.E, dtype,
                                             **layer_opts)
        opts = dict(call_opts)
        if opts.pop("groups", False):
            opts["n_group"], opts["topk_group"] = _groups(shape.E)
        if shape.capacity is not None:
            opts.setdefault("capacity", shape.capacity)
        if shape.empty:
            kw["router_b"] = kw.get("router_b", np.zeros(shape.E, dtype))
            kw["router_b"][-1] = -30.0
        arrays = [kw.pop(n, None) for n in ARRAYS]
        if arrays[2] is not None:
            arrays[2] = arrays[2].reshape(-1, 1)
        return [x, router_w, w1, w2, *arrays, shape.k, {**kw, **opts}]
    return make


def _layer(moe_forward, moe_backward):
    def forward(x, router_w, w1, w2, sw1, sw2, gate, router_b, k, opts):
        return moe_forward(x, router_w, w1, w2, k, shared_w1=sw1, shared_w2=sw2,
                           shared_gate_w=gate, router_b=router_b, **opts)

    def backward(dy, x, router_w, w1, w2, sw1, sw2, gate, router_b, k, opts):
        _, ctx = moe_forward(x, router_w, w1, w2, k, shared_w1=sw1, shared_w2=sw2,
                             shared_gate_w=gate, router_b=router_b, return_context=True, **opts)
        dx, g = moe_backward(dy, ctx)
        given = dict(zip(ARRAYS, (sw1, sw2, gate, router_b)))
        want = {"router_w", "w1", "w2"} | {n for n, a in given.items() if a is not None}
        assert set(g) == want, (sorted(g), sorted(want))      # the choice bias gets none
        return [dx] + [g.get(n) for n in ("router_w", "w1", "w2", *ARRAYS)] + [None, None]

    return forward, backward


LAYER, LAYER_REF = _layer(fm.moe_forward, fm.moe_backward), _layer(ref.moe_forward,
                                                                    ref.moe_backward)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_moe_layer_forward_and_backward(one_thread, config):
    """y, dx and every weight's gradient against the reference (float32 and float64) on the
    shape table, inputs unchanged, the gradients of the small cases against central
    differences (at most 250 float entries: the two tiny shapes)."""
    layer_opts, call_opts, shapes = CONFIGS[config]
    assert check_op(LAYER, LAYER_REF, _layer_inputs(layer_opts, call_opts), shapes,
                    fd_max=250) > 0


@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("activation", fm.ACTIVATIONS)
def test_moe_forward_activations_and_layouts(rng, activation, trans_w):
    x, router_w, w1, w2, kw = make_layer(rng, 33, 64, 24, 4, np.float32, activation, trans_w)
    assert_close(fm.moe_forward(x, router_w, w1, w2, 2, **kw),
                 ref.moe_forward(x, router_w, w1, w2, 2, **kw))


@pytest.mark.parametrize("T,d,h,E,k", [
    (0, 16, 8, 4, 2),        # no tokens
    (1, 600, 16, 4, 4),      # one token, k = E
    (5, 781, 12, 16, 1),     # most experts get no token
    (29, 100, 30, 1, 1),     # a single expert
])
def test_moe_forward_awkward_shapes(rng, T, d, h, E, k):
    layer = make_layer(rng, T, d, h, E)
    y, ctx = fm.moe_forward(*layer.args, k=k, return_context=True)
    assert_close(y, ref.moe_forward(*layer.args, k=k))
    assert ctx.counts.sum() == T * k and ctx.counts.shape == (E,)


@pytest.mark.parametrize("capacity", [0, 2, 5, 10_000])
def test_moe_forward_capacity_drops_add_zero(rng, capacity):
    T, d, h, E, k = 40, 32, 16, 4, 2
    layer = make_layer(rng, T, d, h, E, np.float64)
    y, ctx = fm.moe_forward(*layer.args, k=k, capacity=capacity, return_context=True)
    assert_close(y, ref.moe_forward(*layer.args, k=k, capacity=capacity))
    assert np.all(ctx.counts <= capacity)
    assert ctx.plan.num_dropped == T * k - ctx.counts.sum()
    if capacity == 0:
        np.testing.assert_array_equal(y, 0)
    if capacity in (2, 5):
        assert ctx.plan.num_dropped > 0


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_expert_moe_is_the_dense_mlp(rng, activation, dtype):
    x, router_w, w1, w2, _ = make_layer(rng, 23, 48, 20, 1, dtype, activation)
    y = fm.moe_forward(x, router_w, w1, w2, k=1, activation=activation)
    # the dense MLP's reference rounds its hidden layer to dtype, the layer's does not: a few
    # float32 roundings apart, hence 10 RTOL
    assert_close(y, ref.expert_mlp(x, w1[0], w2[0], activation), rtol=RTOL[dtype] * 10)


def test_single_expert_moe_backward_is_the_dense_mlp_backward(rng):
    x, router_w, w1, w2, _ = make_layer(rng, 7, 12, 5, 1)
    dy = rng.standard_normal((7, 12)).astype(np.float32)
    dx, grads = fm.moe_backward(dy, fm.moe_forward(x, router_w, w1, w2, 1,
                                                   return_context=True)[1])
    _, cache = fm.shared_forward(x, w1[0], w2[0], None, "swiglu")
    dx_d, dw1_d, dw2_d, _ = fm.shared_backward(dy, x, w1[0], w2[0], None, cache, "swiglu")
    assert_close((dx, grads["w1"][0], grads["w2"][0]), (dx_d, dw1_d, dw2_d))
    assert not grads["router_w"].any()        # one expert, weight 1: the router learns nothing


def test_context_holds_what_backward_needs(rng):
    T, d, h, E, k = 21, 16, 8, 4, 2
    x, router_w, w1, w2, _ = make_layer(rng, T, d, h, E)
    y, ctx = fm.moe_forward(x, router_w, w1, w2, k, return_context=True)
    np.testing.assert_array_equal(ctx.logits, ref.router_logits(x, router_w))
    assert_close(ctx.logits, (x.astype(np.float64) @ router_w).astype(np.float32))
    np.testing.assert_array_equal(ctx.routing.experts,
                                  ref.softmax_topk(ref.router_logits(x, router_w), k).experts)
    np.testing.assert_array_equal(ctx.xs, fm.permute(x, ctx.plan))
    assert ctx.h_pre.shape == (T * k, 2 * h) and ctx.h_act.shape == (T * k, h)
    assert_close(ctx.h_act, fm.activate(ctx.h_pre, "swiglu"))
    assert_close(fm.combine(ctx.ys, ctx.plan, ctx.routing.weights), y)
    assert ctx.params["k"] == k and ctx.params["w1"] is w1


def test_non_contiguous_inputs(rng):
    x, router_w, w1, w2, _ = make_layer(rng, 30, 32, 8, 4)
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
    layer = make_layer(rng, 90, 100, 20, 4, np.float32, activation)
    offsets = fm.moe_forward(*layer.args, k=2, activation=activation,
                             return_context=True)[1].plan.offsets
    counts = np.sort(np.diff(offsets))
    monkeypatch.setattr(g, "BLAS_MIN_ROWS", 1 if route == "blas-per-expert" else 10**9)
    monkeypatch.setattr(g, "STREAM_ROWS", {"blas-per-expert": 10**9, "streamed": 10**9,
                                           "streamed-and-blas": int(counts[1])}[route])
    streamed = {"blas-per-expert": [0], "streamed": [4], "streamed-and-blas": [1, 2, 3]}
    assert int(g.route(offsets).stream.sum()) in streamed[route]     # experts streamed
    for trans_w in (False, True):
        a = list(layer.args)
        if trans_w:
            a[2], a[3] = (np.ascontiguousarray(w.transpose(0, 2, 1)) for w in a[2:])
        y = fm.moe_forward(*a, k=2, activation=activation, trans_w=trans_w)
        assert_close(y, ref.moe_forward(*a, k=2, activation=activation, trans_w=trans_w))
        y2, ctx = fm.moe_forward(*a, k=2, activation=activation, trans_w=trans_w,
                                 return_context=True)
        np.testing.assert_array_equal(y, y2)


# --------------------------------------------------------------------------- backward

def test_moe_backward_is_deterministic_for_any_thread_count(rng):
    x, router_w, w1, w2, kw = make_layer(rng, 64, 32, 16, 4, shared=True, gate=True)
    dy = rng.standard_normal((64, 32)).astype(np.float32)

    def run():
        return fm.moe_backward(dy, fm.moe_forward(x, router_w, w1, w2, 2, return_context=True,
                                                  **kw)[1])

    n = numba.get_num_threads()
    try:
        runs = []
        for threads in sorted({1, n}):
            numba.set_num_threads(threads)
            runs.append(run())
    finally:
        numba.set_num_threads(n)
    runs.append(run())
    for dx, grads in runs[1:]:
        np.testing.assert_array_equal(dx, runs[0][0])
        for name, g in grads.items():
            np.testing.assert_array_equal(g, runs[0][1][name])


@pytest.mark.parametrize("gate_shape", [(10,), (10, 1)])
def test_moe_backward_gradients_keep_the_weights_shapes(rng, gate_shape):
    x, router_w, w1, w2, kw = make_layer(rng, 6, 10, 4, 3, shared=True, gate=True, trans_w=True)
    kw["shared_gate_w"] = kw["shared_gate_w"].reshape(gate_shape)
    _, ctx = fm.moe_forward(x, router_w, w1, w2, 2, return_context=True, **kw)
    _, grads = fm.moe_backward(np.ones((6, 10), np.float32), ctx)
    given = dict(kw, router_w=router_w, w1=w1, w2=w2)
    for name, g in grads.items():
        assert g.shape == given[name].shape and g.dtype == np.float32, name
    _, want = ref.moe_backward(np.ones((6, 10), np.float32), x, router_w, w1, w2, 2, **kw)
    assert_close(grads, want)


def test_moe_backward_rejects_bad_input(rng):
    x, router_w, w1, w2, _ = make_layer(rng, 5, 8, 4, 3)
    y, ctx = fm.moe_forward(x, router_w, w1, w2, 2, return_context=True)
    with pytest.raises(TypeError, match="ctx: expected the MoEContext"):
        fm.moe_backward(y, {"x": x})
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 8\)"):
        fm.moe_backward(y[:, :4], ctx)
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        fm.moe_backward(y.astype(np.float64), ctx)
    with pytest.raises(TypeError, match="dy: expected an array"):
        fm.moe_backward("dy", ctx)


# --------------------------------------------------------------------------- shared expert

def _shared_inputs(gate, activation):
    def make(rng, shape, dtype):
        """[x, shared_w1, shared_w2, gate_w (d, 1) or None, activation]"""
        _, _, _, _, kw = make_layer(rng, shape.T, shape.d, shape.h, 1, dtype, activation,
                                    shared=True, gate=gate)
        x = rng.standard_normal((shape.T, shape.d)).astype(dtype)
        g = kw["shared_gate_w"].reshape(-1, 1) if gate else None
        return [x, kw["shared_w1"], kw["shared_w2"], g, activation]
    return make


def _shared(forward, backward):
    def grads(dy, x, w1, w2, gate_w, activation):
        _, cache = forward(x, w1, w2, gate_w, activation)
        return [*backward(dy[0], x, w1, w2, gate_w, cache, activation), None]
    return forward, grads


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_forward_and_backward(one_thread, gate, activation):
    """s and its cache (h_pre, h_act, gate), then dx, dw1, dw2, dgate_w against the reference
    and central differences."""
    assert check_op(_shared(fm.shared_forward, fm.shared_backward),
                    _shared(ref.shared_forward, ref.shared_backward),
                    _shared_inputs(gate, activation), SHAPES.values()) > 0


# --------------------------------------------------------------------------- invariants

@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 9), d=st.integers(1, 10), hs=st.integers(1, 6), gate=st.booleans(),
       activation=st.sampled_from(fm.ACTIVATIONS), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_shared_expert_properties(T, d, hs, gate, activation, dtype, seed):
    """Any small shared expert, gated or not: s (T, d), its cache and gradients as the
    reference's, in their operands' shapes; the operands untouched."""
    args = _shared_inputs(gate, activation)(np.random.default_rng(seed), Shape(T, d, hs, 1, 1),
                                            dtype)
    ds = np.random.default_rng(seed + 1).standard_normal((T, d)).astype(dtype)
    before = snapshot(args + [ds])
    s, cache = fm.shared_forward(*args)
    assert s.shape == (T, d) and s.dtype == dtype
    assert_close((s, cache), ref.shared_forward(*args))
    got = fm.shared_backward(ds, *args[:4], cache, activation)
    assert [None if g is None else g.shape for g in got] == [
        None if a is None else a.shape for a in args[:4]]
    assert_close(got, ref.shared_backward(ds, *args[:4], None, activation))
    assert_unchanged(args + [ds], before)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 9), d=st.integers(1, 12), h=st.integers(1, 6), E=st.integers(1, 5),
       data=st.data(), router=st.sampled_from(["softmax_topk", "sigmoid_topk"]),
       activation=st.sampled_from(fm.ACTIVATIONS), trans_w=st.booleans(),
       cap=st.one_of(st.none(), st.integers(0, 6)), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_moe_layer_properties(T, d, h, E, data, router, activation, trans_w, cap, dtype, seed):
    """Any small layer: y (T, d) and every gradient in its weight's shape and dtype, all as
    the reference's; counts within capacity; the inputs untouched."""
    k = data.draw(st.integers(1, E))
    r = np.random.default_rng(seed)
    x, router_w, w1, w2, kw = make_layer(r, T, d, h, E, dtype, activation, trans_w)
    dy = r.standard_normal((T, d)).astype(dtype)
    before = snapshot([x, router_w, w1, w2, dy])
    y, ctx = fm.moe_forward(x, router_w, w1, w2, k, router=router, capacity=cap,
                            return_context=True, **kw)
    assert y.shape == (T, d) and y.dtype == dtype
    if cap is not None:
        assert (ctx.counts <= cap).all()
    y_ref, ctx_ref = ref.moe_forward(x, router_w, w1, w2, k, router=router, capacity=cap,
                                     return_context=True, **kw)
    assert_close(y, y_ref)
    dx, grads = fm.moe_backward(dy, ctx)
    for name, a in (("router_w", router_w), ("w1", w1), ("w2", w2)):
        assert grads[name].shape == a.shape and grads[name].dtype == dtype
    assert_close((dx, grads), ref.moe_backward(dy, ctx_ref))
    assert_unchanged([x, router_w, w1, w2, dy], before)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["x", "router_w", "w1", "w2"]), change=st.sampled_from(
    ["rank", "width", "dtype"]))
def test_moe_forward_names_the_bad_argument(name, change):
    """Any one array of a layer with a wrong rank, width or dtype: an error that starts with
    its name (router_w's width also names w1, which it must agree with)."""
    r = np.random.default_rng(0)
    x, router_w, w1, w2, _ = make_layer(r, 6, 8, 4, 4)
    args = dict(x=x, router_w=router_w, w1=w1, w2=w2)
    a = args[name]
    args[name] = {"rank": a[0], "width": a[..., :-1], "dtype": a.astype(np.float64)}[change]
    if name == "x" and change != "rank":
        # x sets d and the dtype: the others then disagree with it
        pattern = "^(router_w|x)" if change == "width" else "^router_w: expected dtype"
    elif name == "router_w" and change == "width":
        pattern = "^router_w, w1: "
    else:
        pattern = f"^{name}: "
    with pytest.raises((ValueError, TypeError), match=pattern):
        fm.moe_forward(**args, k=2)


# ------------------------------------------------------- moe_backward(..., grads=): accumulation

def _accumulation_case(trans_w, T, E, k, big):
    """A layer with a shared expert and a router bias; big: an expert over FUSED_MAX_ROWS rows
    (its weight gradients go per block of columns)."""
    from fastmoe_nb.kernels.cpu import config as M
    rng = np.random.default_rng(3)
    d, h = 48, 40
    x = rng.standard_normal((T, d)).astype(np.float32)
    router_w = (rng.standard_normal((d, E)) / 7).astype(np.float32)
    w1 = (rng.standard_normal((E, 2 * h, d) if trans_w else (E, d, 2 * h)) / 7).astype(np.float32)
    w2 = (rng.standard_normal((E, d, h) if trans_w else (E, h, d)) / 6).astype(np.float32)
    kw = dict(k=k, trans_w=trans_w, router_b=(rng.standard_normal(E) / 10).astype(np.float32),
              shared_w1=(rng.standard_normal((d, 32)) / 7).astype(np.float32),
              shared_w2=(rng.standard_normal((16, d)) / 4).astype(np.float32))
    if big:
        kw["router_b"][0] += 5.0             # (nearly) every token chooses expert 0
    _, ctx = fm.moe_forward(x, router_w, w1, w2, return_context=True, **kw)
    if big:
        assert ctx.plan.counts.max() > M.FUSED_MAX_ROWS
    dy = rng.standard_normal((T, d)).astype(np.float32)
    return ctx, dy


@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("T,E,k,big", [(300, 4, 2, False),    # per-expert BLAS, one task each
                                       (700, 4, 1, True),     # an expert over FUSED_MAX_ROWS
                                       (40, 8, 2, False)])    # the tiled kernel
def test_moe_backward_adds_into_given_grads(trans_w, T, E, k, big):
    """grads= adds this call's gradients into the given arrays, in place, bit for bit what
    adding the returned ones would give; the returned dict holds those arrays."""
    ctx, dy = _accumulation_case(trans_w, T, E, k, big)
    dx, fresh = fm.moe_backward(dy, ctx)
    rng = np.random.default_rng(9)
    given = {n: rng.standard_normal(fresh[n].shape).astype(np.float32)
             for n in ("w1", "w2", "router_w", "shared_w2")}
    before = {n: a.copy() for n, a in given.items()}
    dx2, got = fm.moe_backward(dy, ctx, grads=given)
    np.testing.assert_array_equal(dx2, dx)
    assert set(got) == set(fresh)
    for n, g in fresh.items():
        if n in given:
            assert got[n] is given[n]
            np.testing.assert_array_equal(given[n], before[n] + g)
        else:
            np.testing.assert_array_equal(got[n], g)


def test_reference_moe_backward_adds_into_given_grads(rng):
    """The reference's grads= too (what the library's is compared with in nn's training)."""
    x, router_w, w1, w2, kw = make_layer(rng, 9, 6, 3, 3, np.float64)
    dy = rng.standard_normal((9, 6))
    _, ctx = ref.moe_forward(x, router_w, w1, w2, 2, return_context=True, **kw)
    _, fresh = ref.moe_backward(dy, ctx)
    acc = np.ones_like(fresh["w1"])
    _, got = ref.moe_backward(dy, ctx, {"w1": acc})
    assert got["w1"] is acc
    np.testing.assert_array_equal(acc, 1.0 + fresh["w1"])


def test_moe_backward_grads_errors_leave_everything_untouched():
    ctx, dy = _accumulation_case(False, 300, 4, 2, False)
    w1g = np.ones(ctx.params["w1"].shape, np.float32)
    ro = np.zeros(ctx.params["w2"].shape, np.float32)
    ro.flags.writeable = False
    cases = [
        ([w1g], TypeError, "grads: expected None or a dict"),
        ({"w1": w1g, "nope": w1g}, ValueError, "'nope' is not a gradient of this layer"),
        ({"w1": w1g, "w2": ro}, ValueError, r"grads\['w2'\]: expected a writeable array"),
        ({"w1": w1g, "router_w": np.zeros((3, 3), np.float32)}, ValueError, "router_w"),
        ({"w1": w1g, "w2": ro.astype(np.float64)}, TypeError, "expected dtype float32"),
        ({"w1": w1g, "w2": ro.tolist()}, TypeError, "expected a NumPy array"),
    ]
    for grads, err, msg in cases:
        with pytest.raises(err, match=msg):
            fm.moe_backward(dy, ctx, grads=grads)
        np.testing.assert_array_equal(w1g, 1.0)       # checked before any work


def test_experts_backward_into_checks():
    ctx, dy = _accumulation_case(False, 300, 4, 2, False)
    p = ctx.params
    args = (ctx.ys, ctx.xs, ctx.h_pre, ctx.h_act, p["w1"], p["w2"], ctx.plan.offsets, "swiglu")
    _, dw1, dw2 = fm.experts_backward(*args)
    acc = np.ones_like(dw1)
    _, got1, got2 = fm.experts_backward(*args, into=(acc, None))    # one of the two
    assert got1 is acc
    np.testing.assert_array_equal(acc, 1.0 + dw1)
    np.testing.assert_array_equal(got2, dw2)
    accf = np.asfortranarray(np.ones_like(dw2))                     # any memory layout
    _, got1, got2 = fm.experts_backward(*args, into=(None, accf))
    assert got2 is accf
    np.testing.assert_array_equal(got1, dw1)
    np.testing.assert_array_equal(accf, 1.0 + dw2)
    with pytest.raises(TypeError, match="into: expected None or a pair"):
        fm.experts_backward(*args, into=acc)
    with pytest.raises(ValueError, match=r"into\[1\] \(dw2\)"):
        fm.experts_backward(*args, into=(None, np.zeros((2, 2), np.float32)))
    # the reference's into= adds the same way
    _, rdw1, _ = ref.experts_backward(*args)
    racc = np.ones_like(rdw1)
    assert ref.experts_backward(*args, into=(racc, None))[1] is racc
    assert_close(racc, 1.0 + rdw1)
