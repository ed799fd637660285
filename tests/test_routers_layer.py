"""moe_forward / moe_backward with the routers of fastmoe_nb.routing by name: the same layer
as the router + plan + experts + combine written out, and its gradients by central
differences."""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.routing as R
from fastmoe_nb.nn.gradcheck import gradcheck
from fastmoe_nb import reference as ref

from helpers import assert_close, make_layer

CASES = [
    ("switch_top1", 1, dict(capacity=3)),
    ("switch_top1", 1, dict(capacity_factor=1.0, min_capacity=1, priority="score")),
    ("gshard_top2", 2, dict(capacity=4, random_routing=True, seed=5)),
    ("gshard_top2", 2, dict(capacity_factor=None)),
    ("expert_choice", 4, dict(capacity=5)),
    ("dense_gating", 4, dict()),
    ("noisy_topk", 2, dict(seed=3)),
]


def _route(name, x, router_w, noise_w, opts):
    logits = ref.router_logits(x, router_w)        # the library's logits, bit for bit
    opts = dict(opts)
    cap = opts.pop("capacity", None)
    if name == "switch_top1":
        return R.switch_top1(logits, cap, **opts)
    if name == "gshard_top2":
        return R.gshard_top2(logits, cap, **opts)
    if name == "expert_choice":
        return R.expert_choice(logits, cap, **opts)
    if name == "dense_gating":
        r = R.dense_gating(logits)
        return r, fm.make_plan(r.experts, router_w.shape[1])
    r, _ = R.noisy_topk(logits, x @ noise_w, 2, **opts)
    return r, fm.make_plan(r.experts, router_w.shape[1])


@pytest.mark.parametrize("name,k,opts", CASES)
def test_moe_forward_by_name_equals_the_steps(rng, name, k, opts):
    T, d, h, E = 11, 6, 5, 4
    x, router_w, w1, w2 = make_layer(rng, T, d, h, E, np.float64, activation="gelu").args
    noise_w = rng.standard_normal((d, E)) * 0.3
    extra = dict(noise_w=noise_w) if name == "noisy_topk" else {}
    y, ctx = fm.moe_forward(x, router_w, w1, w2, k, "gelu", router=name, return_context=True,
                            **opts, **extra)
    r, plan = _route(name, x, router_w, noise_w, opts)
    np.testing.assert_array_equal(ctx.routing.experts, r.experts)
    np.testing.assert_array_equal(ctx.plan.slots, plan.slots)
    _, _, ys = fm.experts_forward(fm.permute(x, plan), w1, w2, plan.offsets, "gelu")
    assert_close(y, fm.combine(ys, plan, r.weights), rtol=1e-12)


@pytest.mark.parametrize("name,k,opts", CASES)
def test_moe_backward_by_name(rng, name, k, opts):
    T, d, h, E = 6, 4, 3, 4
    x, router_w, w1, w2 = make_layer(rng, T, d, h, E, np.float64, activation="gelu").args
    noise_w = rng.standard_normal((d, E)) * 0.3
    extra = dict(noise_w=noise_w) if name == "noisy_topk" else {}
    _, ctx = fm.moe_forward(x, router_w, w1, w2, k, "gelu", router=name, return_context=True,
                            **opts, **extra)

    def fn(x_, rw, a, b, nw):
        more = dict(noise_w=nw) if name == "noisy_topk" else {}
        return fm.moe_forward(x_, rw, a, b, k, "gelu", router=name, **opts, **more)

    def backward(dy):
        dx, g = fm.moe_backward(dy, ctx)
        assert ("noise_w" in g) == (name == "noisy_topk")
        return dx, g["router_w"], g["w1"], g["w2"], g.get("noise_w")

    gradcheck(fn, [x, router_w, w1, w2, noise_w], backward, max_entries=5)


def test_moe_forward_router_option_errors(rng):
    x, router_w, w1, w2 = make_layer(rng, 5, 4, 3, 4, np.float32).args
    with pytest.raises(ValueError, match="k"):
        fm.moe_forward(x, router_w, w1, w2, 2, router="switch_top1")
    with pytest.raises(ValueError, match="k"):
        fm.moe_forward(x, router_w, w1, w2, 2, router="dense_gating")
    with pytest.raises(TypeError, match="priority"):
        fm.moe_forward(x, router_w, w1, w2, 2, router="softmax_topk", priority="score")
    with pytest.raises(TypeError, match="jitter"):
        fm.moe_forward(x, router_w, w1, w2, 1, router="switch_top1", jitter=0.1)
    with pytest.raises(ValueError, match="noise_w"):
        fm.moe_forward(x, router_w, w1, w2, 2, router="noisy_topk")
    with pytest.raises(ValueError, match="capacity"):
        fm.moe_forward(x, router_w, w1, w2, 4, router="dense_gating", capacity=2)
    # evaluation mode: no noise weight needed, the clean top-k
    y = fm.moe_forward(x, router_w, w1, w2, 2, router="noisy_topk", train=False)
    assert_close(y, fm.moe_forward(x, router_w, w1, w2, 2, renormalize=True))
