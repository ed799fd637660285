"""fastmoe_nb.nn layers and losses: backward against float64 central differences, gradient
accumulation, frozen parameters, train/eval, bad input."""
import numba
import numpy as np
import pytest

import fastmoe_nb.nn as nn
from fastmoe_nb.nn.gradcheck import numerical_gradient

from helpers import assert_close

F64 = np.float64
TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_numba_thread():
    """Gradient checks run hundreds of forwards on tiny shapes, where waking a second thread
    costs more than it saves (and much more on a busy machine)."""
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(n)


def numeric_grad(f, a, eps=1e-6):
    """Central differences of the scalar f() with respect to every element of a."""
    return numerical_gradient(lambda a: f(), [a], [1.0], 0, eps)


def check_module(m, x, reseed=None, max_entries=None):
    """The backward's dx (for float x) and every trainable parameter's gradient against
    float64 central differences of <m.forward(x), dy> (nn.gradcheck). reseed() runs before
    each forward (for layers that draw noise)."""
    reseed = reseed or (lambda: None)
    params = [p for _, p in m.named_parameters() if p.requires_grad]
    float_x = np.issubdtype(x.dtype, np.floating)

    def fn(x, *values):
        for p, v in zip(params, values):
            p.value = v                 # gradcheck's own copies, perturbed in place
        reseed()
        return m.forward(x)

    def backward(dy):
        m.zero_grad()
        dx = m.backward(dy)
        return [dx if float_x else None] + [p.grad for p in params]

    errors = nn.gradcheck(fn, [x] + [p.value for p in params], backward, rtol=TOL,
                          max_entries=max_entries)
    assert len(errors) == len(params) + float_x


@pytest.mark.parametrize("T,d_in,d_out,bias", [(1, 3, 2, True), (5, 4, 7, False), (0, 3, 2, True)])
def test_linear_backward(rng, T, d_in, d_out, bias):
    m = nn.Linear(d_in, d_out, bias=bias, dtype=F64, rng=rng)
    if bias:
        m.b.value[...] = rng.standard_normal(d_out)
    check_module(m, rng.standard_normal((T, d_in)))
    if T == 0:
        assert not m.w.grad.any()


@pytest.mark.parametrize("T,d", [(1, 1), (4, 6), (3, 100)])
@pytest.mark.parametrize("norm", [nn.RMSNorm, nn.LayerNorm])
def test_norm_backward(rng, T, d, norm):
    m = norm(d, dtype=F64)
    for p in m.parameters():
        p.value[...] = rng.standard_normal(d)
    check_module(m, rng.standard_normal((T, d)))


def test_norm_forwards_by_hand(rng):
    x = 3 * rng.standard_normal((5, 8)) + 2
    y = nn.RMSNorm(8, eps=1e-12).forward(x.astype(np.float32))
    np.testing.assert_allclose(np.sqrt((y.astype(F64) ** 2).mean(axis=1)), 1.0, rtol=1e-5)
    ln = nn.LayerNorm(8, eps=1e-12, dtype=F64)
    ln.b.value[...] = 0.5
    want = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True) + 0.5
    np.testing.assert_allclose(ln.forward(x), want, rtol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
def test_mlp_backward(rng, activation):
    m = nn.MLP(5, 3, activation=activation, dtype=F64, rng=rng)
    check_module(m, rng.standard_normal((4, 5)))


def test_mlp_matches_numpy(rng):
    m = nn.MLP(6, 4, activation="silu", dtype=F64, rng=rng)
    x = rng.standard_normal((3, 6))
    h = x @ m.w1.value
    np.testing.assert_allclose(m.forward(x), (h / (1 + np.exp(-h))) @ m.w2.value, rtol=1e-12)


def test_embedding_backward_accumulates_repeated_ids(rng):
    m = nn.Embedding(5, 3, dtype=F64, rng=rng)
    ids = np.array([[1, 4], [1, 1], [0, 4]])
    y = m.forward(ids)
    assert y.shape == (3, 2, 3)
    np.testing.assert_array_equal(y[1, 0], m.w.value[1])
    dy = rng.standard_normal(y.shape)
    assert m.backward(dy) is None
    want = np.zeros((5, 3))
    for (i, j), e in np.ndenumerate(ids):
        want[e] += dy[i, j]
    np.testing.assert_allclose(m.w.grad, want, rtol=1e-14)
    assert not m.w.grad[[2, 3]].any()


def test_sequential_and_residual_backward(rng):
    m = nn.Sequential(nn.Linear(4, 6, dtype=F64, rng=rng),
                      nn.Residual(nn.Sequential(nn.RMSNorm(6, dtype=F64),
                                                nn.MLP(6, 3, "gelu", dtype=F64, rng=rng))),
                      nn.Linear(6, 2, dtype=F64, rng=rng))
    names = [n for n, _ in m.named_parameters()]
    assert names == ["layers.0.w", "layers.0.b", "layers.1.body.layers.0.g",
                     "layers.1.body.layers.1.w1", "layers.1.body.layers.1.w2", "layers.2.w",
                     "layers.2.b"]
    check_module(m, rng.standard_normal((3, 4)))


def test_gradients_accumulate_and_zero_grad_clears(rng):
    m = nn.Linear(3, 2, dtype=F64, rng=rng)
    x, dy = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    m.forward(x)
    m.backward(dy)
    once = m.w.grad.copy()
    m.forward(x)
    m.backward(dy)
    np.testing.assert_allclose(m.w.grad, 2 * once, rtol=1e-14)
    m.zero_grad()
    assert not m.w.grad.any() and not m.b.grad.any()


def test_frozen_parameters_get_no_gradient(rng):
    m = nn.Sequential(nn.Linear(3, 3, rng=rng), nn.Linear(3, 2, rng=rng))
    m.layers[0].requires_grad_(False)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    m.forward(x)
    dx = m.backward(np.ones((4, 2), np.float32))
    assert dx.shape == (4, 3) and dx.any()             # the input gradient still flows
    assert not m.layers[0].w.grad.any() and m.layers[1].w.grad.any()


def test_train_eval_reach_every_submodule(rng):
    m = nn.Sequential(nn.Linear(2, 2), nn.Residual(nn.RMSNorm(2)))
    assert all(s.training for s in m.modules())
    assert m.eval() is m and not any(s.training for s in m.modules())
    m.train()
    assert all(s.training for s in m.modules())


def test_layers_do_not_modify_or_alias_caller_arrays(rng):
    w = rng.standard_normal((3, 2))
    p = nn.Parameter(w)
    p.value += 1
    assert not np.shares_memory(p.value, w) and np.allclose(p.value - w, 1)
    m = nn.Sequential(nn.RMSNorm(3, dtype=F64), nn.Linear(3, 3, dtype=F64, rng=rng))
    x = rng.standard_normal((4, 3))
    dy = rng.standard_normal((4, 3))
    x0, dy0 = x.copy(), dy.copy()
    m.forward(x)
    m.backward(dy)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(dy, dy0)


def test_bad_inputs_name_the_argument():
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="x: expected shape"):
        lin.forward(np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        lin.forward(np.zeros((4, 3), np.float64))
    with pytest.raises(ValueError, match="ids: expected integers in 0..4"):
        nn.Embedding(5, 2).forward(np.array([0, 5]))
    with pytest.raises(TypeError, match="ids: expected an integer array"):
        nn.Embedding(5, 2).forward(np.array([0.0]))
    with pytest.raises(ValueError, match="d_out"):
        nn.Linear(3, 0)
    with pytest.raises(ValueError, match="activation"):
        nn.MLP(3, 2, activation="tanh")
    with pytest.raises(TypeError, match="layers\\[1\\]"):
        nn.Sequential(nn.Linear(2, 2), "relu")


# ------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("T,V", [(1, 1), (1, 5), (6, 4), (3, 100)])
def test_cross_entropy_value_and_gradient(rng, T, V):
    logits = 3 * rng.standard_normal((T, V))
    t = rng.integers(0, V, T)
    loss, g = nn.cross_entropy(logits, t)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(T), t]).mean(), rel=1e-12, abs=1e-15)
    assert_close(g, numeric_grad(lambda: nn.cross_entropy(logits, t)[0], logits), rtol=TOL,
                 floor=1e-12)   # a loss's gradient, O(1/T): relative to its own scale


def test_cross_entropy_float32_large_logits_and_empty():
    logits = np.array([[1000.0, 0.0], [-1000.0, 0.0]], np.float32)
    loss, g = nn.cross_entropy(logits, np.array([0, 1]))
    assert g.dtype == np.float32 and np.isfinite(g).all()
    assert loss == pytest.approx(np.log1p(np.exp(-1000.0)), abs=1e-12)
    loss, g = nn.cross_entropy(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert loss == 0.0 and g.shape == (0, 3)
    with pytest.raises(ValueError, match="targets: expected class ids in 0..1"):
        nn.cross_entropy(logits, np.array([0, 2]))
    with pytest.raises(ValueError, match="targets: expected shape"):
        nn.cross_entropy(logits, np.array([0]))


def test_mse_value_and_gradient(rng):
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    loss, g = nn.mse(pred, target)
    assert loss == pytest.approx(((pred - target) ** 2).mean(), rel=1e-14)
    assert_close(g, numeric_grad(lambda: nn.mse(pred, target)[0], pred), rtol=TOL,
                 floor=1e-12)   # a loss's gradient, O(1/T): relative to its own scale
    with pytest.raises(ValueError, match="target: expected the shape of pred"):
        nn.mse(pred, target[:2])
    with pytest.raises(TypeError, match="target: expected dtype float64"):
        nn.mse(pred, target.astype(np.float32))


# ------------------------------------------------------------------------------- MoE layer

@pytest.mark.parametrize("kw", [
    dict(num_experts=4, k=2),
    dict(num_experts=1, k=1, activation="gelu"),
    dict(num_experts=3, k=3, activation="silu", renormalize=False),
    dict(num_experts=4, k=2, shared_h=3, shared_gate=True),
    dict(num_experts=4, k=2, router="sigmoid_topk", scale=2.0, shared_h=2),
    dict(num_experts=4, k=1, capacity=2),
    dict(num_experts=4, k=1, router="switch_top1", capacity_factor=1.0),
])
def test_moe_backward(rng, kw):
    m = nn.MoE(6, 3, dtype=F64, rng=rng, **kw).eval()
    if kw.get("router") == "sigmoid_topk":
        m.bias.value[...] = [0.3, 0.0, -0.2, 0.1]
    check_module(m, rng.standard_normal((7, 6)), max_entries=6)
    assert not hasattr(m, "bias") or not m.bias.grad.any()


def test_moe_with_one_expert_equals_the_dense_mlp(rng):
    moe = nn.MoE(5, 4, num_experts=1, k=1, activation="swiglu", dtype=F64, rng=rng)
    mlp = nn.MLP(5, 4, activation="swiglu", dtype=F64, rng=rng)
    mlp.w1.value[...] = moe.w1.value[0]
    mlp.w2.value[...] = moe.w2.value[0]
    x, dy = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    np.testing.assert_allclose(moe.forward(x), mlp.forward(x), rtol=1e-12)
    np.testing.assert_allclose(moe.backward(dy), mlp.backward(dy), rtol=1e-12)
    np.testing.assert_allclose(moe.w1.grad[0], mlp.w1.grad, rtol=1e-12)
    assert not moe.router_w.grad.any()        # one expert, weight 1: the router gets nothing


def test_moe_jitter_only_in_train_mode_and_its_backward(rng):
    m = nn.MoE(6, 3, num_experts=4, k=2, jitter=0.2, dtype=F64, rng=rng)
    x = rng.standard_normal((5, 6))
    m.eval()
    np.testing.assert_array_equal(m.forward(x), m.forward(x))
    m.train()
    assert not np.array_equal(m.forward(x), m.forward(x))
    check_module(m, x, reseed=lambda: setattr(m, "rng", np.random.default_rng(7)),
                 max_entries=8)


def test_moe_records_routing_statistics(rng):
    m = nn.MoE(6, 3, num_experts=4, k=2, capacity=2, rng=rng, window=3)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    m.forward(x)
    s = m.stats
    assert s.tokens_per_expert.sum() == 18 - m.ctx.plan.num_dropped
    np.testing.assert_array_equal(s.tokens_per_expert, m.ctx.plan.counts)
    assert s.dropped_fraction == m.ctx.plan.num_dropped / 18
    assert 0 < s.entropy <= np.log(4) + 1e-9
    assert len(m.monitor.history) == 1
    m.eval().forward(x)
    assert len(m.monitor.history) == 1        # the monitor follows training steps only


def test_moe_float32_matches_float64_layer(rng):
    m64 = nn.MoE(8, 4, num_experts=4, k=2, dtype=F64, rng=rng)
    m32 = nn.MoE(8, 4, num_experts=4, k=2, rng=rng)
    for (_, a), (_, b) in zip(m32.named_parameters(), m64.named_parameters()):
        b.value[...] = a.value
    x, dy = rng.standard_normal((10, 8)), rng.standard_normal((10, 8))
    y32 = m32.forward(x.astype(np.float32))
    dx32 = m32.backward(dy.astype(np.float32))
    assert y32.dtype == dx32.dtype == np.float32
    # float32 against float64 (rounded to float32), relative to each array's own scale
    assert_close(y32, m64.forward(x).astype(np.float32), rtol=1e-5, floor=1e-12)
    assert_close(dx32, m64.backward(dy).astype(np.float32), rtol=1e-4, floor=1e-12)
    for (n, a), (_, b) in zip(m32.named_parameters(), m64.named_parameters()):
        assert_close(a.grad, b.grad.astype(np.float32), rtol=1e-4, floor=1e-12, err_msg=n)


def test_moe_bad_arguments():
    with pytest.raises(ValueError, match="k: expected an integer in 1..num_experts"):
        nn.MoE(4, 2, num_experts=3, k=4)
    with pytest.raises(ValueError, match="router"):
        nn.MoE(4, 2, num_experts=3, k=1, router="top1")
    with pytest.raises(ValueError, match="jitter"):
        nn.MoE(4, 2, num_experts=3, k=1, jitter=1.5)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        nn.MoE(4, 2, num_experts=3, k=1, aux_loss_coef=-0.1)
    with pytest.raises(ValueError, match="capacity"):
        nn.MoE(4, 2, num_experts=3, k=1, capacity=-1)
    with pytest.raises(ValueError, match="balance"):
        nn.MoE(4, 2, num_experts=3, k=1, balance="uniform")
    with pytest.raises(ValueError, match="x: expected shape"):
        nn.MoE(4, 2, num_experts=3, k=1).forward(np.zeros((2, 5), np.float32))


def test_check_module_catches_a_wrong_backward(rng):
    class Doubled(nn.Linear):
        def backward(self, dy):
            dx = super().backward(dy)
            self.b.grad *= 2
            return dx

    with pytest.raises(nn.GradcheckError, match="inputs\\[2\\]"):   # inputs: x, w, b
        check_module(Doubled(3, 2, dtype=F64, rng=rng), rng.standard_normal((4, 3)))


def test_moe_balancing_and_z_loss_gradients_reach_router_and_input(rng):
    m = nn.MoE(6, 3, num_experts=4, k=2, aux_loss_coef=0.3, z_loss_coef=0.2, dtype=F64,
               rng=rng).eval()
    x, r = rng.standard_normal((7, 6)), rng.standard_normal((7, 6))

    def total():   # the training loss the layer's backward differentiates
        y = m.forward(x)
        return float((y * r).sum()) + 0.3 * m.aux_loss + 0.2 * m.z_loss

    total()
    assert m.aux_loss > 0 and m.z_loss > 0
    m.zero_grad()
    dx = m.backward(r)
    for got, a in ((dx, x), (m.router_w.grad, m.router_w.value)):
        num = numerical_gradient(lambda a: total(), [a], [1.0], 0, entries=range(0, a.size, 3))
        assert_close(got[~np.isnan(num)], num[~np.isnan(num)], rtol=TOL, floor=1e-12)
    plain = nn.MoE(6, 3, num_experts=4, k=2, dtype=F64, rng=0).eval()
    plain.router_w.value[...] = m.router_w.value
    plain.w1.value[...], plain.w2.value[...] = m.w1.value, m.w2.value
    plain.forward(x)
    assert not np.allclose(plain.backward(r), dx)        # the losses did add something


def test_moe_update_bias_follows_the_load(rng):
    m = nn.MoE(4, 2, num_experts=4, k=1, router="sigmoid_topk", rng=rng)
    with pytest.raises(ValueError, match="call forward first"):
        m.update_bias()
    m.forward(rng.standard_normal((16, 4)).astype(np.float32))
    load = m.stats.tokens_per_expert
    m.update_bias(0.01)
    np.testing.assert_allclose(m.bias.value, 0.01 * np.sign(load.mean() - load), rtol=1e-6)
    assert m.bias not in [p for p in m.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="sigmoid_topk"):
        nn.MoE(4, 2, num_experts=4, k=1).update_bias()


@pytest.mark.parametrize("T", [0, 1])
def test_moe_and_dense_layers_take_zero_or_one_token(rng, T):
    m = nn.Sequential(nn.RMSNorm(100), nn.MoE(100, 8, num_experts=3, k=2, shared_h=4, rng=rng),
                      nn.MLP(100, 8, "gelu", rng=rng), nn.Linear(100, 5, rng=rng))
    x = rng.standard_normal((T, 100)).astype(np.float32)
    y = m.forward(x)
    assert y.shape == (T, 5) and y.dtype == np.float32
    m.zero_grad()
    dx = m.backward(np.ones((T, 5), np.float32))
    assert dx.shape == (T, 100)
    moe = m.layers[1]
    assert moe.stats.tokens_per_expert.sum() == 2 * T
    assert moe.w1.grad.any() == (T > 0)


def test_moe_expert_gradients_accumulate_in_place(rng):
    """nn.MoE adds w1 / w2 gradients into Parameter.grad inside moe_backward (per expert, on
    the per-expert BLAS route at this size): twice the steps, twice the gradient; a frozen
    weight still gets none, and its grad array is the same object throughout."""
    m = nn.MoE(16, 12, 4, 2, rng=rng)
    x = rng.standard_normal((96, 16)).astype(np.float32)          # 48 rows an expert
    dy = rng.standard_normal((96, 16)).astype(np.float32)
    grads = {n: getattr(m, n).grad for n in ("w1", "w2")}
    m.forward(x)
    m.backward(dy)
    once = {n: g.copy() for n, g in grads.items()}
    assert all(g.any() for g in once.values())
    m.forward(x)
    m.backward(dy)
    for n, g in grads.items():
        assert getattr(m, n).grad is g
        np.testing.assert_array_equal(g, once[n] + once[n])
    m.zero_grad()
    m.w1.requires_grad = False
    m.forward(x)
    m.backward(dy)
    assert not m.w1.grad.any() and m.w2.grad.any()
