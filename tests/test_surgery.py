"""fastmoe_nb.surgery: function preserved where it should be, weights moved where they should
go, gradients consistent after surgery, frozen rows bit-identical through optimizer steps,
checkpoints before / after surgery, validation."""
import numpy as np
import pytest
from helpers import assert_close

import fastmoe_nb as fm
import fastmoe_nb.nn as nn
from fastmoe_nb import surgery as S


def layer(d=16, h=8, E=4, k=1, dtype=np.float32, seed=0, **kw):
    return nn.MoE(d, h, E, k, dtype=dtype, rng=seed, **kw).eval()


def tokens(T, d, dtype=np.float32, seed=1):
    return np.random.default_rng(seed).standard_normal((T, d)).astype(dtype)


def forward_of(moe, x):
    """The layer's output computed from its arrays by fm.moe_forward (an independent path)."""
    bias = moe.bias.value if moe.router == "sigmoid_topk" else None
    router_b = moe.router_b.value if hasattr(moe, "router_b") else None
    return fm.moe_forward(x, moe.router_w.value, moe.w1.value, moe.w2.value, moe.k,
                          activation=moe.activation, router=moe.router, bias=bias,
                          renormalize=moe.renormalize, router_b=router_b)


# ----------------------------------------------------------------------------- growing

@pytest.mark.parametrize("T,d,init", [(0, 16, "copy"), (1, 16, "fresh"), (64, 100, "copy"),
                                      (33, 16, "fresh")])
def test_add_experts_softmax_k1_keeps_routing_and_output(T, d, init):
    moe = layer(d=d, k=1)
    x = tokens(T, d)
    y0, e0 = moe.forward(x), moe.ctx.routing.experts.copy()
    w1 = moe.w1.value.copy()
    S.add_experts(moe, 3, init=init, noise=0.1, rng=2)
    assert moe.num_experts == 7 and moe.w1.shape[0] == moe.w2.shape[0] == 7
    assert moe.router_w.shape == (d, 7) and moe.w1.grad.shape == moe.w1.shape
    np.testing.assert_array_equal(moe.w1.value[:4], w1)        # old experts untouched
    y1 = moe.forward(x)
    np.testing.assert_array_equal(moe.ctx.routing.experts, e0)
    np.testing.assert_array_equal(y1, y0)
    assert moe.stats.tokens_per_expert.shape == (7,)
    assert moe.stats.tokens_per_expert[4:].sum() == 0


@pytest.mark.parametrize("E,k", [(1, 1), (4, 2), (4, 4)])
def test_add_experts_sigmoid_suppressed_bias_keeps_output_for_any_k(E, k):
    moe = layer(E=E, k=k, router="sigmoid_topk")
    x = tokens(40, 16)
    y0, e0 = moe.forward(x), moe.ctx.routing.experts.copy()
    S.add_experts(moe, 2, init="fresh")
    assert moe.bias.shape == (E + 2,) and (moe.bias.value[E:] < moe.bias.value[:E].min()).all()
    y1 = moe.forward(x)
    np.testing.assert_array_equal(moe.ctx.routing.experts, e0)
    np.testing.assert_array_equal(y1, y0)
    assert moe.stats.tokens_per_expert[E:].sum() == 0


GROW = [dict(k=2), dict(k=3, renormalize=False), dict(k=4, router_bias=True),
        dict(k=2, router="sigmoid_topk"), dict(k=1, renormalize=False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", GROW, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_add_experts_keeps_routing_weights_and_output_bit_for_bit(kw, dtype):
    moe = layer(d=24, E=4, seed=3, dtype=dtype, **kw)
    if hasattr(moe, "router_b"):
        moe.router_b.value[...] = [0.3, -0.2, 0.0, 0.1]
    x = tokens(200, 24, dtype, seed=4) * 3.0            # logits of a few units
    y0 = moe.forward(x)
    r0, dy = moe.ctx.routing, tokens(200, 24, dtype, seed=5)
    moe.zero_grad()
    dx0 = moe.backward(dy)
    g0 = {n: getattr(moe, n).grad.copy() for n in ("w1", "w2", "router_w")}
    S.add_experts(moe, 3, init="copy", noise=0.1, rng=1)
    y1 = moe.forward(x)
    np.testing.assert_array_equal(moe.ctx.routing.experts, r0.experts)
    np.testing.assert_array_equal(moe.ctx.routing.weights, r0.weights)
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(forward_of(moe, x), y0)
    # gradients: the old experts' exactly the old ones, the dormant experts' exactly zero
    moe.zero_grad()
    dx1 = moe.backward(dy)
    for n in ("w1", "w2"):
        np.testing.assert_array_equal(getattr(moe, n).grad[:4], g0[n])
        assert not getattr(moe, n).grad[4:].any()
    assert_close(moe.router_w.grad[:, :4], g0["router_w"], rtol=1e-6)
    assert not moe.router_w.grad[:, 4:].any()
    if hasattr(moe, "router_b"):
        assert not moe.router_b.grad[4:].any()
    assert_close(dx1, dx0, rtol=1e-6)
    # woken, the new experts are chosen and get gradients
    S.wake(moe, [4, 5, 6])
    moe.forward(x)
    assert moe.stats.tokens_per_expert[4:].sum() > 0
    moe.zero_grad()
    moe.backward(dy)
    assert moe.w1.grad[4:].any() and moe.router_w.grad[:, 4:].any()


def test_add_experts_adds_a_router_bias_that_checkpoints_record(tmp_path):
    moe = layer(E=3, k=2)
    assert not hasattr(moe, "router_b")
    S.add_experts(moe, 2)
    np.testing.assert_array_equal(moe.router_b.value, [0, 0, 0, -S.SUPPRESS, -S.SUPPRESS])
    assert not moe.router_w.value[:, 3:].any()
    S.wake(moe, [3])
    assert moe.router_b.value[3] == 0.0 and moe.router_b.value[4] == -S.SUPPRESS
    S.wake(moe, 4, bias=-1.5)
    assert moe.router_b.value[4] == -1.5
    nn.save(tmp_path / "g.npz", moe)
    nn.load(tmp_path / "g.npz", layer(E=5, k=2, router_bias=True))
    sig = layer(E=3, k=2, router="sigmoid_topk")
    S.add_experts(sig, 1)
    assert not hasattr(sig, "router_b") and sig.bias.value[3] == -S.SUPPRESS
    S.wake(sig, [3])
    assert sig.bias.value[3] == 0.0
    with pytest.raises(ValueError, match="router bias"):
        S.wake(layer(E=3, k=2), [1])
    with pytest.raises(ValueError, match="bias"):
        S.wake(moe, range(5))


def test_add_experts_copy_sources_and_noise():
    moe = layer(E=3)
    w1, w2 = moe.w1.value.copy(), moe.w2.value.copy()
    S.add_experts(moe, 4, init="copy", source=[2, 0], router="copy")
    np.testing.assert_array_equal(moe.w1.value[3:], w1[[2, 0, 2, 0]])
    np.testing.assert_array_equal(moe.w2.value[3:], w2[[2, 0, 2, 0]])
    np.testing.assert_array_equal(moe.router_w.value[:, 3:], moe.router_w.value[:, [2, 0, 2, 0]])
    S.add_experts(moe, 1, source=1, noise=0.05, rng=0, router="zeros")
    diff = moe.w1.value[7] - w1[1]
    assert 0 < diff.std() < 0.2 * w1[1].std()
    assert not moe.router_w.value[:, 7].any()


def test_duplicate_expert_keeps_output_k1():
    moe = layer(E=4, k=1, d=32)
    x = tokens(50, 32)
    y0 = moe.forward(x)
    S.duplicate_expert(moe, 2)
    np.testing.assert_array_equal(moe.w1.value[4], moe.w1.value[2])
    np.testing.assert_array_equal(moe.router_w.value[:, 4], moe.router_w.value[:, 2])
    np.testing.assert_array_equal(moe.forward(x), y0)


@pytest.mark.parametrize("E,k,router", [(1, 1, "softmax_topk"), (4, 2, "softmax_topk"),
                                        (3, 3, "dense_gating"), (8, 8, "softmax_topk")])
def test_upcycle_equals_the_dense_mlp(E, k, router):
    mlp = nn.MLP(16, 12, rng=3)
    w1 = mlp.w1.value.copy()
    moe = S.upcycle(mlp, E, k, router=router, rng=4).eval()
    for T in (0, 1, 37):
        x = tokens(T, 16, seed=T)
        assert_close(moe.forward(x), mlp.forward(x))
    np.testing.assert_array_equal(mlp.w1.value, w1)            # the MLP is not modified
    moe.w1.value[0] += 1.0
    np.testing.assert_array_equal(mlp.w1.value, w1)            # nor aliased
    noisy = S.upcycle(mlp, E, k, router=router, noise=0.1, rng=4)
    assert not np.array_equal(noisy.w1.value[0], mlp.w1.value)


def test_upcycle_keeps_the_activation_and_dtype():
    mlp = nn.MLP(8, 5, activation="gelu", dtype=np.float64, rng=0)
    moe = S.upcycle(mlp, 2, 1)
    assert moe.activation == "gelu" and moe.w1.shape == (2, 8, 5)
    assert moe.w1.dtype == np.float64
    with pytest.raises(TypeError, match="activation"):
        S.upcycle(mlp, 2, 1, activation="relu")
    with pytest.raises(TypeError, match="mlp"):
        S.upcycle(nn.Linear(8, 8), 2, 1)


# ----------------------------------------------------------------------------- shrinking

def test_remove_experts_keeps_the_others_in_order():
    moe = layer(E=5, k=2, router="sigmoid_topk")
    moe.bias.value[:] = np.arange(5) * 0.1
    w1, rw, b = moe.w1.value.copy(), moe.router_w.value.copy(), moe.bias.value.copy()
    S.remove_experts(moe, [3, 1])
    keep = [0, 2, 4]
    np.testing.assert_array_equal(moe.w1.value, w1[keep])
    np.testing.assert_array_equal(moe.router_w.value, rw[:, keep])
    np.testing.assert_array_equal(moe.bias.value, b[keep])
    x = tokens(30, 16)
    np.testing.assert_array_equal(moe.forward(x), forward_of(moe, x))
    assert moe.stats.tokens_per_expert.shape == (3,)
    with pytest.raises(ValueError, match="k = 2"):
        S.remove_experts(moe, [0, 1])
    assert moe.num_experts == 3                                 # nothing changed on error


def test_merge_experts_weighted_average():
    moe = layer(E=4, k=1)
    w1, w2, rw = (p.value.astype(np.float64) for p in (moe.w1, moe.w2, moe.router_w))
    S.merge_experts(moe, [2, 0], weights=[3.0, 1.0])
    assert moe.num_experts == 3
    # survivors 1, 2, 3 -> 0, 1, 2; the merged expert is old 2, now 1
    assert_close(moe.w1.value[1], (0.75 * w1[2] + 0.25 * w1[0]).astype(np.float32))
    assert_close(moe.w2.value[1], (0.75 * w2[2] + 0.25 * w2[0]).astype(np.float32))
    assert_close(moe.router_w.value[:, 1], (0.75 * rw[:, 2] + 0.25 * rw[:, 0]).astype(np.float32))
    np.testing.assert_array_equal(moe.w1.value[[0, 2]], w1[[1, 3]].astype(np.float32))
    x = tokens(20, 16)
    np.testing.assert_array_equal(moe.forward(x), forward_of(moe, x))


def test_merging_identical_experts_is_a_no_op_on_them():
    moe = layer(E=3, k=1)
    S.duplicate_expert(moe, 1)
    w1 = moe.w1.value[1].copy()
    S.merge_experts(moe, [1, 3])
    np.testing.assert_array_equal(moe.w1.value[1], w1)
    assert moe.num_experts == 3


# ----------------------------------------------------------------------------- gradients

def test_gradients_after_surgery_match_finite_differences():
    moe = layer(d=6, h=4, E=3, k=2, dtype=np.float64, seed=5)
    S.add_experts(moe, 2, init="fresh", router="zeros", rng=1)
    moe.router_w.value[:, 3:] = np.random.default_rng(2).standard_normal((6, 2))
    S.merge_experts(moe, [0, 1], weights=[1, 2])
    x = tokens(9, 6, np.float64, seed=3)

    def fn(x, rw, w1, w2):
        moe.router_w.value[...], moe.w1.value[...], moe.w2.value[...] = rw, w1, w2
        return moe.forward(x)

    def backward(dy):
        moe.zero_grad()
        dx = moe.backward(dy)
        assert moe.w1.grad.shape == (4, 6, 8) and moe.router_w.grad.shape == (6, 4)
        return dx, moe.router_w.grad.copy(), moe.w1.grad.copy(), moe.w2.grad.copy()

    nn.gradcheck(fn, [x, moe.router_w.value.copy(), moe.w1.value.copy(), moe.w2.value.copy()],
                 backward, rtol=1e-6, max_entries=6)


# ----------------------------------------------------------------------------- freezing

def one_step(model, opt, x, masked=True):
    y = model.forward(x)
    model.zero_grad()
    model.backward(y - 1.0)                                   # mse-like gradient
    if masked:
        S.mask_grads(model)
    nn.clip_grad_norm(model, 10.0)
    opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda m: nn.AdamW(m, lr=1e-2, weight_decay=0.1),
    lambda m: nn.SGD(m, lr=1e-2, momentum=0.9, weight_decay=0.1)])
def test_frozen_rows_are_bit_identical_through_optimizer_steps(make_opt):
    model = nn.Sequential(nn.Linear(16, 16, rng=0), nn.Residual(layer(E=3, k=2, seed=1)))
    moe = model.layers[1].body
    x = tokens(48, 16)
    S.add_experts(moe, 2, init="fresh", router="zeros", rng=3)
    S.freeze(moe, experts=[0, 1, 2], router=[0, 1, 2])
    model.layers[0].requires_grad_(False)
    before = {n: p.value.copy() for n, p in model.named_parameters()}
    opt = S.FrozenRows(make_opt(model), model)
    for _ in range(4):
        one_step(model, opt, x)
    assert opt.t == 4
    np.testing.assert_array_equal(moe.w1.value[:3], before["layers.1.body.w1"][:3])
    np.testing.assert_array_equal(moe.w2.value[:3], before["layers.1.body.w2"][:3])
    np.testing.assert_array_equal(moe.router_w.value[:, :3], before["layers.1.body.router_w"][:, :3])
    np.testing.assert_array_equal(model.layers[0].w.value, before["layers.0.w"])
    assert not np.array_equal(moe.w1.value[3:], before["layers.1.body.w1"][3:])
    assert not np.array_equal(moe.router_w.value[:, 3:], before["layers.1.body.router_w"][:, 3:])
    for key, st in opt.state.items():                          # no state moves frozen rows
        for a in st.values():
            if key.endswith(("w1", "w2")):
                assert not a[:3].any() and a[3:].any()
            elif key.endswith("router_w"):
                assert not a[:, :3].any() and a[:, 3:].any()
    # unfreezing lets them train again
    S.unfreeze(moe, experts=[0])
    one_step(model, opt, x)
    assert not np.array_equal(moe.w1.value[0], before["layers.1.body.w1"][0])
    np.testing.assert_array_equal(moe.w1.value[1:3], before["layers.1.body.w1"][1:3])


def test_without_the_wrapper_weight_decay_would_move_frozen_rows():
    # the test above can fail: a plain optimizer does change frozen rows
    moe = layer(E=3, k=2)
    S.freeze(moe, experts="all", router="all")
    w1 = moe.w1.value.copy()
    one_step(moe, nn.AdamW(moe, lr=1e-2, weight_decay=0.1), tokens(8, 16))
    assert not np.array_equal(moe.w1.value, w1)


def test_mask_grads_and_freeze_bookkeeping_follow_renumbering():
    moe = layer(E=5, k=1)
    S.freeze(moe, experts=[1, 3], router=[4])
    S.remove_experts(moe, [1])
    assert moe.frozen_experts == [2] and moe.frozen_router == [3]
    S.add_experts(moe, 1)
    assert moe.frozen_experts == [2] and moe.frozen_router == [3]
    moe.forward(tokens(30, 16))
    moe.zero_grad()
    moe.backward(np.ones((30, 16), np.float32))
    S.mask_grads(moe)
    assert not moe.w1.grad[2].any() and not moe.router_w.grad[:, 3].any()
    S.unfreeze(moe)
    assert moe.frozen_experts == [] and moe.frozen_router == []


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoints_before_and_after_surgery(tmp_path):
    model = nn.Sequential(nn.Linear(16, 16, rng=0), layer(E=4, k=1, seed=1))
    before = tmp_path / "before.npz"
    nn.save(before, model)
    S.add_experts(model.layers[1], 2)
    after = tmp_path / "after.npz"
    nn.save(after, model)
    assert S.expert_counts(before) == {"layers.1": 4}
    assert S.expert_counts(after) == {"layers.1": 6}

    same = nn.Sequential(nn.Linear(16, 16, rng=5), layer(E=4, k=1, seed=6))
    nn.load(before, S.check_expert_counts(before, same))
    grown = nn.Sequential(nn.Linear(16, 16, rng=5), layer(E=6, k=1, seed=6, router_bias=True))
    nn.load(after, S.check_expert_counts(after, grown))
    np.testing.assert_array_equal(grown.layers[1].w1.value, model.layers[1].w1.value)
    with pytest.raises(ValueError, match="6 experts in the checkpoint but 4 in the model"):
        S.check_expert_counts(after, same)
    with pytest.raises(ValueError, match="layers.1.router_b"):   # the bias add_experts added
        nn.load(after, same)
    # surgery on a loaded model reproduces the saved one
    S.add_experts(same.layers[1], 2, init="fresh")
    nn.load(after, S.check_expert_counts(after, same))
    x = tokens(20, 16)
    np.testing.assert_array_equal(same.forward(x), model.forward(x))


# ----------------------------------------------------------------------------- validation

def test_bad_arguments_raise_before_any_change():
    moe = layer(E=3, k=2)
    w1 = moe.w1.value.copy()
    cases = [(lambda: S.add_experts(moe, 0), ValueError, "n"),
             (lambda: S.add_experts(moe, 1.5), TypeError, "n"),
             (lambda: S.add_experts(moe, 1, init="zeros"), ValueError, "init"),
             (lambda: S.add_experts(moe, 1, router="low"), ValueError, "router"),
             (lambda: S.add_experts(moe, 1, noise=-1.0), ValueError, "noise"),
             (lambda: S.add_experts(moe, 1, source=[3]), ValueError, r"source\[0\]"),
             (lambda: S.add_experts(nn.MLP(4, 4), 1), TypeError, "moe"),
             (lambda: S.remove_experts(moe, [0, 0]), ValueError, "distinct"),
             (lambda: S.merge_experts(moe, [1]), ValueError, "at least two"),
             (lambda: S.merge_experts(moe, [0, 1], weights=[1, -1]), ValueError, "weights"),
             (lambda: S.merge_experts(moe, [0, 1], weights=[1, 2, 3]), ValueError, "weights"),
             (lambda: S.duplicate_expert(moe, 7), ValueError, "expert"),
             (lambda: S.freeze(moe, experts=[5]), ValueError, "experts"),
             (lambda: S.FrozenRows(moe, moe), TypeError, "optimizer"),
             (lambda: S.upcycle(nn.MLP(4, 4), 2, 3), ValueError, "k")]
    for call, err, match in cases:
        with pytest.raises(err, match=match):
            call()
    assert moe.num_experts == 3
    np.testing.assert_array_equal(moe.w1.value, w1)
    grouped = layer(E=4, k=2, router="sigmoid_topk", n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="n_group"):
        S.add_experts(grouped, 1)
