"""JAX: fastmoe_nb's MoE as a custom_vjp over pure_callback, under jit and grad (CPU)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import fastmoe_nb as fm  # noqa: E402
from fastmoe_nb import reference as ref  # noqa: E402
from fastmoe_nb.interop.jax_moe import moe  # noqa: E402
from helpers import assert_close, make_layer  # noqa: E402


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("router,opts", [
    ("softmax_topk", dict(trans_w=True)),
    ("sigmoid_topk", dict(n_group=2, topk_group=1, scale=2.0)),
])
def test_jit_and_grad_match_the_reference(rng, router, opts):
    T, d, h, E, k = 7, 6, 4, 4, 2
    arrays = make_layer(rng, T, d, h, E, np.float64, trans_w=opts.get("trans_w", False)).args
    bias = rng.standard_normal(E) * 0.1 if router == "sigmoid_topk" else None
    dy = rng.standard_normal((T, d))
    kw = dict(router=router, bias=bias, **opts)

    def loss(x, rw, w1, w2):
        return jnp.sum(moe(x, rw, w1, w2, k, **kw) * dy)

    j = [jnp.asarray(a) for a in arrays]
    y = jax.jit(lambda *a: moe(*a, k, **kw))(*j)
    assert y.dtype == jnp.float64
    assert_close(np.asarray(y), ref.moe_forward(*arrays, k, **kw))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*j)
    want_dx, want = ref.moe_backward(dy, *arrays, k, **kw)
    for g, w in zip(grads, (want_dx, want["router_w"], want["w1"], want["w2"])):
        assert_close(np.asarray(g), w, rtol=1e-10)


def test_float32_forward_and_vmap(rng):
    arrays = make_layer(rng, 5, 8, 4, 3, np.float32).args
    y = moe(*map(jnp.asarray, arrays), 2)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), fm.moe_forward(*arrays, k=2))
    xb = jnp.stack([jnp.asarray(arrays[0]), 2 * jnp.asarray(arrays[0])])     # (B, T, d)
    yb = jax.vmap(lambda x: moe(x, *map(jnp.asarray, arrays[1:]), 2))(xb)
    np.testing.assert_array_equal(np.asarray(yb[1]), fm.moe_forward(2 * arrays[0], *arrays[1:],
                                                                     k=2))


def test_bad_input_is_rejected_at_trace_time(rng):
    x, rw, w1, w2 = map(jnp.asarray, make_layer(rng, 4, 6, 3, 3, np.float64).args)
    with pytest.raises(TypeError, match="w1: expected dtype float64"):
        jax.jit(lambda x: moe(x, rw, w1.astype(jnp.float32), w2, 2))(x)
    with pytest.raises(ValueError, match="k: expected an integer in 1..E"):
        moe(x, rw, w1, w2, 4)
    with pytest.raises(ValueError, match="w2: expected shape"):
        moe(x, rw, w1, w2[:, :2], 2)
    with pytest.raises(TypeError, match="shared_w1: unexpected option"):
        moe(x, rw, w1, w2, 2, shared_w1=w1)


def test_jax_arrays_come_back_read_only_without_a_copy():
    from fastmoe_nb.interop import as_array

    a = jnp.arange(6.0).reshape(2, 3)
    v = as_array(a, "a")
    assert isinstance(v, np.ndarray) and not v.flags.writeable
    assert v.ctypes.data == a.unsafe_buffer_pointer()            # the same buffer
    w = as_array(a, "a", writable=True)                          # copied only when asked
    assert w.flags.writeable and w.ctypes.data != a.unsafe_buffer_pointer()
    np.testing.assert_array_equal(w, v)
