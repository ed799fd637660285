"""The whole layer on the device: moe_forward (fused swiglu epilogue, shared experts, both
routers, capacity, both weight layouts) and moe_backward, vs the reference and the CPU path."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from helpers import assert_close, is_device, make_layer, to_device, to_host


CASES = [
    dict(T=9, d=6, h=5, E=4, k=2, activation="swiglu"),
    dict(T=1, d=5, h=3, E=1, k=1, activation="gelu"),
    dict(T=0, d=4, h=3, E=3, k=3, activation="silu"),
    dict(T=7, d=5, h=4, E=4, k=4, activation="relu", trans_w=True, capacity=3),
    dict(T=8, d=6, h=3, E=6, k=2, activation="swiglu", router="sigmoid_topk", n_group=3,
         topk_group=2, scale=2.5, bias=True, shared=True),
    dict(T=6, d=4, h=3, E=4, k=2, activation="gelu_tanh", shared=True, gate=True,
         renormalize=False),
]


def _call(rng, case):
    c = dict(case)
    T, d, h, E = c.pop("T"), c.pop("d"), c.pop("h"), c.pop("E")
    opts = {n: c.pop(n, False) for n in ("shared", "gate", "bias")}
    x, router_w, w1, w2, host_kw = make_layer(rng, T, d, h, E, activation=c.pop("activation"),
                                              trans_w=c.pop("trans_w", False), **opts)
    host_kw.update(c)
    dev_kw = {n: (to_device(v) if isinstance(v, np.ndarray) else v) for n, v in host_kw.items()}
    return (x, router_w, w1, w2), host_kw, dev_kw


@pytest.mark.parametrize("case", CASES, ids=[f"{c['activation']}-T{c['T']}" for c in CASES])
def test_moe_forward_backward(rng, case):
    args, host_kw, dev_kw = _call(rng, case)
    dargs = [to_device(a) for a in args]
    k = host_kw.pop("k")
    dev_kw.pop("k")
    y = fm.moe_forward(*dargs, k, **dev_kw)                  # fused epilogue, no context
    assert is_device(y)
    assert_close(y, ref.moe_forward(*args, k, **host_kw))
    y_ctx, ctx = fm.moe_forward(*dargs, k, return_context=True, **dev_kw)
    y_cpu, ctx_cpu = fm.moe_forward(*args, k, return_context=True, **host_kw)
    assert_close(y_ctx, y_cpu)
    assert_close(ctx.counts, ctx_cpu.counts)
    dy = rng.standard_normal(y_cpu.shape).astype(np.float32)
    dx, grads = fm.moe_backward(to_device(dy), ctx)
    dx_cpu, grads_cpu = fm.moe_backward(dy, ctx_cpu)
    assert_close(dx, dx_cpu, rtol=3e-5)
    assert sorted(grads) == sorted(grads_cpu)
    for name in grads:
        assert_close(grads[name], grads_cpu[name], rtol=3e-5)


def test_caller_arrays_unchanged(rng):
    args = make_layer(rng, 5, 4, 3, 3).args
    dargs = [to_device(a) for a in args]
    fm.moe_forward(*dargs, 2)
    for a, d in zip(args, dargs):
        np.testing.assert_array_equal(to_host(d), a)


def test_router_b_forward_backward(rng):
    # the router bias on the device: logits + router_b (add_rows broadcasting one row), its
    # gradient the column sums of d_logits; T=0 gives a zero gradient
    for T in (6, 0):
        x, router_w, w1, w2 = make_layer(rng, T, 5, 3, 4).args
        b = rng.standard_normal(4).astype(np.float32)
        y, ctx = fm.moe_forward(*map(to_device, (x, router_w, w1, w2)), 2,
                                router_b=to_device(b), return_context=True)
        y_cpu, ctx_cpu = fm.moe_forward(x, router_w, w1, w2, 2, router_b=b, return_context=True)
        assert_close(y, y_cpu)
        dy = rng.standard_normal(y_cpu.shape).astype(np.float32)
        g = fm.moe_backward(to_device(dy), ctx)[1]
        assert_close(g["router_b"], fm.moe_backward(dy, ctx_cpu)[1]["router_b"], rtol=3e-5)
