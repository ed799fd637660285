"""moe_backward and shared_backward: against reference.moe_backward (float32 and float64),
the whole layer against float64 central differences, the E=1 k=1 layer against the dense MLP,
determinism across thread counts, bad input."""
import numba
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.nn.gradcheck import gradcheck

from support import assert_close

RTOL = {np.float32: 1e-4, np.float64: 1e-12}


@pytest.fixture
def one_thread():
    """Gradchecks call tiny kernels thousands of times: one thread avoids the parallel launch
    cost (results are the same for any thread count, see test_moe_backward_is_deterministic)."""
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(n)


def make_layer(rng, T, d, h, E, dtype=np.float64, activation="swiglu", trans_w=False,
               shared=False, gate=False, bias=False):
    """Arrays of one layer, O(1) values -> (x, router_w, w1, w2, moe_forward kwargs)."""
    H1 = 2 * h if activation == "swiglu" else h
    f = lambda *s: rng.standard_normal(s).astype(dtype)   # noqa: E731
    x, router_w = f(T, d), f(d, E) / d ** 0.5
    w1 = f(E, H1, d) if trans_w else f(E, d, H1)
    w2 = f(E, d, h) if trans_w else f(E, h, d)
    kw = dict(activation=activation, trans_w=trans_w)
    if shared:
        kw.update(shared_w1=f(d, H1) / d ** 0.5, shared_w2=f(h, d) / h ** 0.5)
    if gate:
        kw["shared_gate_w"] = f(d) / d ** 0.5          # (d,): its gradient keeps that shape
    if bias:
        kw["bias"] = 0.3 * f(E)
    return x, router_w, w1 / d ** 0.5, w2 / h ** 0.5, kw


# (T, d, h, E, k, layer options, call options): T=0/1, E=1 k=1, k=E, odd widths, both routers,
# renormalize off, trans_w, other activations, capacity drops, shared experts with/without gate
CASES = [
    (0, 8, 4, 4, 2, {}, {}),
    (1, 100, 8, 4, 2, {}, {}),
    (1, 6, 3, 1, 1, {}, {}),
    (9, 16, 8, 4, 4, {}, {}),
    (5, 781, 8, 3, 2, {"activation": "gelu"}, {}),
    (13, 24, 8, 4, 2, {}, {"renormalize": False}),
    (13, 24, 8, 6, 3, {"bias": True}, dict(router="sigmoid_topk", n_group=3, topk_group=2,
                                           scale=2.5)),
    (13, 24, 8, 4, 2, {"trans_w": True, "activation": "gelu_tanh"}, {}),
    (16, 24, 8, 4, 2, {"activation": "relu"}, {"capacity": 5}),
    (11, 24, 8, 4, 2, {"shared": True, "activation": "silu"}, {}),
    (11, 24, 8, 4, 2, {"shared": True, "gate": True, "trans_w": True},
     {"router": "sigmoid_topk", "renormalize": False, "capacity": 4}),
]


def _run(x, router_w, w1, w2, k, kw, dy):
    y, ctx = fm.moe_forward(x, router_w, w1, w2, k, return_context=True, **kw)
    return fm.moe_backward(dy, ctx)


@pytest.mark.parametrize("T,d,h,E,k,layer,call", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moe_backward_matches_reference(rng, T, d, h, E, k, layer, call, dtype):
    x, router_w, w1, w2, kw = make_layer(rng, T, d, h, E, dtype, **layer)
    kw.update(call)
    dy = rng.standard_normal((T, d)).astype(dtype)
    dy0, x0, w10 = dy.copy(), x.copy(), w1.copy()
    dx, grads = _run(x, router_w, w1, w2, k, kw, dy)
    want_dx, want = ref.moe_backward(dy, x, router_w, w1, w2, k, **kw)
    assert sorted(grads) == sorted(want)
    assert_close(dx, want_dx, rtol=RTOL[dtype])
    for name in want:
        assert_close(grads[name], want[name], rtol=RTOL[dtype])
    for a, a0 in ((dy, dy0), (x, x0), (w1, w10)):
        np.testing.assert_array_equal(a, a0)
    if call.get("capacity") is not None:
        _, ctx = fm.moe_forward(x, router_w, w1, w2, k, return_context=True, **kw)
        assert ctx.plan.num_dropped > 0


# layer options for the central-difference check of the whole layer (float64, tiny shapes)
GRADCHECK = [
    ({}, {}),
    ({}, {"renormalize": False}),
    ({"bias": True}, dict(router="sigmoid_topk", n_group=2, topk_group=1, scale=1.5)),
    ({"bias": True}, dict(router="sigmoid_topk", renormalize=False)),
    ({"trans_w": True, "activation": "gelu"}, {}),
    ({"shared": True}, {"capacity": 2}),
    ({"shared": True, "gate": True, "trans_w": True}, {"router": "sigmoid_topk"}),
]
PARAMS = ["router_w", "w1", "w2", "shared_w1", "shared_w2", "shared_gate_w"]


@pytest.mark.parametrize("layer,call", GRADCHECK)
def test_moe_layer_gradcheck(rng, one_thread, layer, call):
    T, d, h, E, k = 6, 4, 3, 4, 2
    x, router_w, w1, w2, kw = make_layer(rng, T, d, h, E, **layer)
    kw.update(call)
    names = [n for n in PARAMS[3:] if n in kw]

    def fn(x, router_w, w1, w2, *shared):
        return fm.moe_forward(x, router_w, w1, w2, k, **{**kw, **dict(zip(names, shared))})

    def backward(dy):
        dx, grads = _run(x, router_w, w1, w2, k, kw, dy)
        assert "bias" not in grads
        return [dx] + [grads[n] for n in PARAMS[:3] + names]

    errs = gradcheck(fn, [x, router_w, w1, w2] + [kw[n] for n in names], backward)
    assert len(errs) == 4 + len(names) and max(errs.values()) <= 1e-6


@pytest.mark.parametrize("k,E", [(1, 1), (3, 3)])
def test_moe_gradcheck_single_expert_and_k_equals_e(rng, one_thread, k, E):
    x, router_w, w1, w2, kw = make_layer(rng, 3, 4, 2, E)
    errs = gradcheck(lambda x, r, w1, w2: fm.moe_forward(x, r, w1, w2, k), [x, router_w, w1, w2],
                     lambda dy: [(g := _run(x, router_w, w1, w2, k, {}, dy))[0]]
                     + [g[1][n] for n in PARAMS[:3]])
    assert max(errs.values()) <= 1e-6


@pytest.mark.parametrize("gate", [False, True])
def test_shared_backward_gradcheck(rng, one_thread, gate):
    x, _, _, _, kw = make_layer(rng, 5, 4, 3, 1, shared=True, gate=gate)
    g = kw["shared_gate_w"].reshape(-1, 1) if gate else None

    def fn(x, w1, w2, g):
        return fm.shared_forward(x, w1, w2, g, "swiglu")[0]

    def backward(ds):
        _, cache = fm.shared_forward(x, kw["shared_w1"], kw["shared_w2"], g, "swiglu")
        return fm.shared_backward(ds, x, kw["shared_w1"], kw["shared_w2"], g, cache, "swiglu")

    errs = gradcheck(fn, [x, kw["shared_w1"], kw["shared_w2"], g], backward)
    assert len(errs) == (4 if gate else 3) and max(errs.values()) <= 1e-6


def test_single_expert_moe_backward_is_the_dense_mlp_backward(rng):
    x, router_w, w1, w2, _ = make_layer(rng, 7, 12, 5, 1, np.float32)
    dy = rng.standard_normal((7, 12)).astype(np.float32)
    dx, grads = _run(x, router_w, w1, w2, 1, {}, dy)
    _, cache = fm.shared_forward(x, w1[0], w2[0], None, "swiglu")
    dx_d, dw1_d, dw2_d, _ = fm.shared_backward(dy, x, w1[0], w2[0], None, cache, "swiglu")
    assert_close(dx, dx_d, rtol=1e-5)
    assert_close(grads["w1"][0], dw1_d, rtol=1e-5)
    assert_close(grads["w2"][0], dw2_d, rtol=1e-5)
    assert not grads["router_w"].any()        # one expert, weight 1: the router learns nothing


def test_moe_backward_is_deterministic_for_any_thread_count(rng):
    x, router_w, w1, w2, kw = make_layer(rng, 64, 32, 16, 4, np.float32, shared=True, gate=True)
    dy = rng.standard_normal((64, 32)).astype(np.float32)
    n = numba.get_num_threads()
    try:
        runs = []
        for threads in sorted({1, n}):
            numba.set_num_threads(threads)
            runs.append(_run(x, router_w, w1, w2, 2, kw, dy))
    finally:
        numba.set_num_threads(n)
    runs.append(_run(x, router_w, w1, w2, 2, kw, dy))
    for dx, grads in runs[1:]:
        np.testing.assert_array_equal(dx, runs[0][0])
        for name, g in grads.items():
            np.testing.assert_array_equal(g, runs[0][1][name])


@pytest.mark.parametrize("gate_shape", [(10,), (10, 1)])
def test_moe_backward_gradients_keep_the_weights_shapes(rng, gate_shape):
    x, router_w, w1, w2, kw = make_layer(rng, 6, 10, 4, 3, np.float32, shared=True, gate=True,
                                         trans_w=True)
    kw["shared_gate_w"] = kw["shared_gate_w"].reshape(gate_shape)
    _, grads = _run(x, router_w, w1, w2, 2, kw, np.ones((6, 10), np.float32))
    given = dict(kw, router_w=router_w, w1=w1, w2=w2)
    for name, g in grads.items():
        assert g.shape == given[name].shape and g.dtype == np.float32, name


def test_moe_backward_rejects_bad_input(rng):
    x, router_w, w1, w2, _ = make_layer(rng, 5, 8, 4, 3, np.float32)
    y, ctx = fm.moe_forward(x, router_w, w1, w2, 2, return_context=True)
    with pytest.raises(TypeError, match="ctx: expected the MoEContext"):
        fm.moe_backward(y, {"x": x})
    with pytest.raises(ValueError, match=r"dy: expected shape \(5, 8\)"):
        fm.moe_backward(y[:, :4], ctx)
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        fm.moe_backward(y.astype(np.float64), ctx)
    with pytest.raises(TypeError, match="dy: expected an array"):
        fm.moe_backward("dy", ctx)


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
    from fastmoe_nb.ops.moe import experts_backward
    ctx, dy = _accumulation_case(False, 300, 4, 2, False)
    p = ctx.params
    args = (ctx.ys, ctx.xs, ctx.h_pre, ctx.h_act, p["w1"], p["w2"], ctx.plan.offsets, "swiglu")
    _, dw1, dw2 = experts_backward(*args)
    acc = np.ones_like(dw1)
    _, got1, got2 = experts_backward(*args, into=(acc, None))    # one of the two
    assert got1 is acc
    np.testing.assert_array_equal(acc, 1.0 + dw1)
    np.testing.assert_array_equal(got2, dw2)
    accf = np.asfortranarray(np.ones_like(dw2))                  # any memory layout
    _, got1, got2 = experts_backward(*args, into=(None, accf))
    assert got2 is accf
    np.testing.assert_array_equal(got1, dw1)
    np.testing.assert_array_equal(accf, 1.0 + dw2)
    with pytest.raises(TypeError, match="into: expected None or a pair"):
        experts_backward(*args, into=acc)
    with pytest.raises(ValueError, match=r"into\[1\] \(dw2\)"):
        experts_backward(*args, into=(None, np.zeros((2, 2), np.float32)))
