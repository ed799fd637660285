"""JAX: fastmoe_nb's MoE layer as a differentiable JAX function on the CPU.

`moe(x, router_w, w1, w2, k, ...)` is a `jax.custom_vjp` whose forward and backward are
`jax.pure_callback`s into fm.moe_forward / fm.moe_backward: it works under `jit`, `grad` and
`vmap` (one call per batch element). JAX hands the callbacks read-only NumPy views of its
buffers (no copy; fastmoe_nb never writes into inputs). The backward keeps only the inputs as
residuals and recomputes the forward's activations on the host (rematerialization: one extra
forward per backward, nothing held between the two passes).

Shapes and dtypes are validated when the function is traced, before any work. Shared experts
are not exposed here (use fm.moe_forward's NumPy API or the PyTorch bridge for them).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import errors as chk
from ..checks import check_expert_weights
from ..moe import ROUTERS, moe_backward, moe_forward

_OPTIONS = ("activation", "router", "renormalize", "n_group", "topk_group", "scale",
            "capacity", "trans_w")


def _options(k, options):
    """The static (hashable) options of one moe() signature."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"{', '.join(unknown)}: unexpected option; expected any of "
                        f"{', '.join(_OPTIONS)}")
    chk.check_choice("router", options.get("router", "softmax_topk"), ROUTERS)
    return (("k", k),) + tuple(sorted(options.items()))


def _check_traced(x, router_w, w1, w2, bias, k, opts):
    """Shape / dtype checks on JAX values (tracers included), before any work."""
    chk.check_float("x", x, ndim=2)
    d, dt = int(x.shape[1]), np.dtype(x.dtype)
    chk.check_float("router_w", router_w, shape=(d, None), dtype=dt)
    E = int(router_w.shape[1])
    chk.check_int("k", k, 1, max(E, 1), what=f"1..E = 1..{E}")
    check_expert_weights(w1, w2, d, dt, opts.get("activation", "swiglu"),
                         bool(opts.get("trans_w", False)), num_experts=E)
    if bias is not None:
        chk.check_float("bias", bias, shape=(E,), dtype=dt)


def _host_args(x, router_w, w1, w2, bias):
    b = np.asarray(bias)
    return dict(x=np.asarray(x), router_w=np.asarray(router_w), w1=np.asarray(w1),
                w2=np.asarray(w2), bias=b if b.size else None)


def _host_forward(opts, x, router_w, w1, w2, bias):
    # x: (T, d), router_w: (d, E), w1, w2: fm layout [trans_w], bias: (E,) or (0,) -> y (T, d)
    return moe_forward(**_host_args(x, router_w, w1, w2, bias), **opts)


def _host_backward(opts, x, router_w, w1, w2, bias, dy):
    # the forward's inputs and dy: (T, d) -> (dx, d_router_w, dw1, dw2)
    _, ctx = moe_forward(**_host_args(x, router_w, w1, w2, bias), **opts,
                         return_context=True)
    dx, grads = moe_backward(np.asarray(dy), ctx)
    return dx, grads["router_w"], grads["w1"], grads["w2"]


@functools.lru_cache(maxsize=None)
def _moe_vjp(static):
    """One custom_vjp function per static option set."""
    opts = dict(static)

    def forward(x, router_w, w1, w2, bias):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(functools.partial(_host_forward, opts), out,
                                 x, router_w, w1, w2, bias, vmap_method="sequential")

    @jax.custom_vjp
    def f(x, router_w, w1, w2, bias):
        return forward(x, router_w, w1, w2, bias)

    def f_fwd(x, router_w, w1, w2, bias):
        return forward(x, router_w, w1, w2, bias), (x, router_w, w1, w2, bias)

    def f_bwd(res, dy):
        shapes = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in res[:4])
        grads = jax.pure_callback(functools.partial(_host_backward, opts), shapes, *res, dy,
                                  vmap_method="sequential")
        return (*grads, jnp.zeros_like(res[4]))     # the bias only chooses: no gradient

    f.defvjp(f_fwd, f_bwd)
    return f


def moe(x, router_w, w1, w2, k, bias=None, **options):
    """fm.moe_forward as a JAX function, differentiable in x, router_w, w1 and w2.

    x: (T, d), router_w: (d, E), w1: (E, d, h|2h), w2: (E, h, d) [trans_w=True: (E, h|2h, d),
    (E, d, h)], k: experts per token (static), bias: (E,) for router="sigmoid_topk" (no
    gradient); options (static): activation, router, renormalize, n_group, topk_group, scale,
    capacity, trans_w -> y: (T, d) in x's dtype."""
    static = _options(k, options)
    _check_traced(x, router_w, w1, w2, bias, k, options)
    if bias is None:
        bias = jnp.zeros((0,), x.dtype)             # "no bias": an empty array, size 0
    return _moe_vjp(static)(x, router_w, w1, w2, bias)


__all__ = ["moe"]
