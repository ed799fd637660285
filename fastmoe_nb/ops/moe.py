"""The whole MoE layer: route, plan, permute, expert MLPs (two grouped GEMMs and an
activation), combine, plus optional shared experts."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..backend import CUDA, as_host, backend_of, cuda_module
from ..types import MoEContext
from .activations import activate, activate_backward, activation_code, hidden_width
from .dispatch import (combine, combine_backward, combine_planned, make_plan, permute,
                       permute_backward, permute_planned)
from ..kernels.common import SWIGLU
from . import pool
from .gemm import (PackedWeights, blas_weight_grads, check_weights, expert_runs, expert_tiles,
                   grouped_gemm, grouped_gemm_backward, large_blocks, num_panels, run_gemm,
                   run_stream, streamed, weight, weight_grad)
from ..kernels.cpu.activations import activate_backward_rows, activate_rows
from ..kernels.cpu.dispatch import permute_rows
from .routing import (check_sigmoid_options, router_logits, sigmoid_topk, sigmoid_topk_backward,
                      softmax_topk, softmax_topk_backward)

ROUTERS = ("softmax_topk", "sigmoid_topk",
           # fastmoe_nb.routing, by name (routing/layer.py)
           "switch_top1", "gshard_top2", "expert_choice", "dense_gating", "noisy_topk")


def _matmul(a, b):
    """Dense a @ b on the arrays' backend."""
    if backend_of(a=a) == CUDA:
        return cuda_module().matmul(a, b)
    return pool.matmul(a, b)       # BLAS at one thread a block: none spinning afterwards


def _add(y, s):
    """y + s on the arrays' backend (in place on the host)."""
    if backend_of(y=y) == CUDA:
        return cuda_module().add_rows(y, s)
    y += s
    return y


def _check_layer(x, router_w, w1, w2, k, activation, trans_w, shared_w1, shared_w2,
                 shared_gate_w, router_b=None):
    """Validate the layer's arrays; returns (backend, the arrays on that side, E, h)."""
    be = backend_of(x=x, router_w=router_w, w1=w1, w2=w2, shared_w1=shared_w1,
                    shared_w2=shared_w2, shared_gate_w=shared_gate_w, router_b=router_b)
    host = (lambda n, a: a) if be == CUDA else as_host
    x = chk.check_float("x", host("x", x), ndim=2)
    T, d = x.shape
    dt = x.dtype
    router_w = chk.check_float("router_w", host("router_w", router_w), shape=(d, None), dtype=dt)
    E = router_w.shape[1]
    if E < 1:
        raise ValueError("router_w: expected at least one expert column, got shape "
                         f"{tuple(router_w.shape)}")
    k = chk.check_int("k", k, 1, E, what=f"1..E = 1..{E}")
    if router_b is not None:
        router_b = chk.check_float("router_b", host("router_b", router_b), shape=(E,), dtype=dt)
        chk.check_finite("router_b", cuda_module().dev(router_b).copy_to_host()
                         if be == CUDA else router_b)
    activation_code(activation)
    w1 = chk.check_float("w1", host("w1", w1), ndim=3, dtype=dt)
    if w1.shape[0] != E:
        raise ValueError(f"router_w, w1: router_w has {E} expert columns but w1 holds "
                         f"{w1.shape[0]} experts; expected the same E in both")
    H1 = w1.shape[1] if trans_w else w1.shape[2]
    chk.check_array("w1", w1, shape=(E, H1, d) if trans_w else (E, d, H1))
    h = hidden_width(H1, activation)
    w2 = chk.check_float("w2", host("w2", w2), shape=(E, d, h) if trans_w else (E, h, d),
                         dtype=dt)
    if (shared_w1 is None) != (shared_w2 is None):
        raise ValueError("shared_w1, shared_w2: expected both (a shared expert) or neither")
    if shared_gate_w is not None and shared_w1 is None:
        raise ValueError("shared_gate_w: given without shared_w1 / shared_w2")
    if shared_w1 is not None:
        shared_w1 = chk.check_float("shared_w1", host("shared_w1", shared_w1), shape=(d, None),
                                    dtype=dt)
        hs = hidden_width(shared_w1.shape[1], activation, "shared_w1")
        shared_w2 = chk.check_float("shared_w2", host("shared_w2", shared_w2), shape=(hs, d),
                                    dtype=dt)
    if shared_gate_w is not None:
        shared_gate_w = chk.check_float("shared_gate_w", host("shared_gate_w", shared_gate_w),
                                        dtype=dt)
        if tuple(shared_gate_w.shape) not in ((d,), (d, 1)):
            raise ValueError(f"shared_gate_w: expected shape ({d},) or ({d}, 1), got "
                             f"{tuple(shared_gate_w.shape)}")
        shared_gate_w = shared_gate_w.reshape(d, 1)
    return be, x, router_w, router_b, w1, w2, shared_w1, shared_w2, shared_gate_w, E, h


def experts_forward(xs, w1, w2, offsets, activation, trans_w=False, keep=False):
    """The expert MLPs on tokens in expert order.

    xs: (N, d), w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h, d), (E, d, h)]
    -> (h_pre (N, h|2h) or None, h_act (N, h), ys (N, d)); h_pre is kept only when keep.
    On the CPU w1 / w2 may also be PackedWeights (pack_weights(w1, trans_w, swiglu=True) for
    swiglu), packed once per weight update; raw weights are packed tile by tile inside the
    kernel, each selected expert's weights read once (decoding is bound by that read). The
    activation runs in the first GEMM's epilogue (h_pre is only written when keep).
    """
    if not keep and backend_of(xs=xs) == CUDA:  # the activation in the GEMM's epilogue
        hidden_width(w1.shape[1] if trans_w else w1.shape[2], activation)
        h_act = cuda_module().grouped_gemm(xs, w1, offsets, trans_w, activation_code(activation))
        return None, h_act, grouped_gemm(h_act, w2, offsets, trans_w)
    if backend_of(xs=xs) == CUDA:
        h_pre = grouped_gemm(xs, w1, offsets, trans_w)
        h_act = activate(h_pre, activation)
        ys = grouped_gemm(h_act, w2, offsets, trans_w)
        return (h_pre if keep else None), h_act, ys
    trans_w = bool(trans_w)
    code = activation_code(activation)
    swiglu = code == SWIGLU
    xs = np.ascontiguousarray(chk.check_float("xs", as_host("xs", xs), ndim=2))
    w1, offsets, H1 = check_weights(w1, xs, offsets, trans_w, "w1")
    h = hidden_width(H1, activation)
    N = xs.shape[0]
    w2, _, d = check_weights(w2, np.broadcast_to(np.zeros((1, h), xs.dtype), (N, h)), offsets,
                             trans_w, "w2")
    if d != xs.shape[1]:
        got = repr(w2) if isinstance(w2, PackedWeights) else f"shape {tuple(w2.shape)}"
        raise ValueError(f"w2: expected {xs.shape[1]} output columns (xs.shape[1]), got {got}")
    if not isinstance(w1, PackedWeights) and not isinstance(w2, PackedWeights):
        return _experts_forward_raw(xs, w1, w2, offsets, code, h, trans_w, keep)
    if isinstance(w1, PackedWeights):
        b, fused = w1.panels, w1.swiglu == swiglu
    else:                            # w2 packed: w1's product by grouped_gemm, activation apart
        b, fused = None, False
    if not fused:                    # swiglu panels for another activation (or the reverse)
        h_pre = grouped_gemm(xs, w1, offsets, trans_w)
        h_act = activate(h_pre, activation)
    else:
        half = H1 // 2 if swiglu else 0
        h_pre = np.empty((N, H1), xs.dtype) if keep else np.empty((0, 0), xs.dtype)
        h_act = np.empty((N, h), xs.dtype)
        run_gemm(xs, np.arange(N, dtype=np.int64), False, b, trans_w, H1, half,
                 expert_tiles(offsets, num_panels(H1, half), xs.shape[1]), h_pre, h_act, code,
                 keep)
    ys = grouped_gemm(h_act, w2, offsets, trans_w)
    return (h_pre if keep else None), h_act, ys


def _experts_forward_raw(xs, w1, w2, offsets, code, h, trans_w, keep, tokens=None):
    # xs (N, d), w1 (E, d, H1), w2 (E, h, d) [trans_w: transposed] -> (h_pre, h_act, ys)
    # Raw weights, a way per expert (ops/gemm.py: streamed): the experts with a few rows
    # together through stream_kernel (both products; the activation apart, on their rows);
    # the others per task, one block of an expert's rows: h_pre = xs_b @ B1_e (BLAS),
    # h_act = act(h_pre) while the block is in cache, ys_b = h_act @ B2_e (BLAS), h_pre in
    # the thread's scratch unless kept. tokens (N,): xs is then x (T, d), and its rows are
    # gathered, x[tokens[lo:hi]] (permute fused: xs is never written); h_act, not kept,
    # stays in scratch too (returned as None).
    N, H1 = offsets[-1], w1.shape[1] if trans_w else w1.shape[2]
    h_pre = np.empty((N, H1), xs.dtype) if keep else None
    h_act = np.empty((N, h), xs.dtype) if keep or tokens is None else None
    ys = np.empty((N, xs.shape[1]), xs.dtype)
    light = streamed(offsets)
    if light.any():
        hp = h_pre if keep else np.empty((N, H1), xs.dtype)     # only light rows touched
        ha = np.empty((N, h), xs.dtype) if h_act is None else h_act
        run_stream(xs, np.ascontiguousarray(w1), trans_w, offsets, hp, light, tokens)
        for lo, hi in expert_runs(offsets, light):
            activate_rows(hp[lo:hi], code, ha[lo:hi])
        run_stream(ha, np.ascontiguousarray(w2), trans_w, offsets, ys, light)

    def task(t, scratch):
        e, lo, hi = t
        if tokens is None:
            xb = xs[lo:hi]
        else:
            xb = pool.buffer(scratch, "xs", hi - lo, xs.shape[1], xs.dtype)
            permute_rows(xs, tokens[lo:hi], 1, xb)
        hp = h_pre[lo:hi] if keep else pool.buffer(scratch, "h_pre", hi - lo, H1, xs.dtype)
        np.matmul(xb, weight(w1, e, trans_w), out=hp)
        ha = pool.buffer(scratch, "h_act", hi - lo, h, xs.dtype) if h_act is None \
            else h_act[lo:hi]
        activate_rows(hp, code, ha)
        np.matmul(ha, weight(w2, e, trans_w), out=ys[lo:hi])

    pool.run_tasks(task, pool.row_tasks(offsets, experts=~light))
    return h_pre, h_act, ys


FUSED_MAX_ROWS = 512   # an expert with at most this many rows is one backward task


def _experts_backward_blas(d_ys, xs, h_pre, h_act, w1, w2, offsets, code, trans_w, into=None):
    # The gradients of _experts_forward_raw's BLAS tasks. An expert with <= FUSED_MAX_ROWS
    # rows is one task: d_h_act = d_ys_e @ B2_e^T, d_h_pre = act'(...), d_xs_e =
    # d_h_pre @ B1_e^T and its weight gradients while its rows are in cache (d_h_pre in the
    # thread's scratch). A larger expert runs per block of rows (d_h_pre kept), then its
    # weight gradients per block of columns (ops/gemm.py: blas_weight_grads), so that it
    # alone still keeps every thread busy.
    # Which way an expert goes depends on its row count only: results do not depend on threads.
    # into: (dw1, dw2), either None: arrays to add the weight gradients into (computed in
    # scratch, added while in cache: no fresh arrays, no pass over them afterwards).
    N, d = xs.shape
    H1 = h_pre.shape[1]
    counts = np.diff(offsets)
    big = np.flatnonzero(counts > FUSED_MAX_ROWS)
    d_h_pre = np.empty(h_pre.shape, xs.dtype) if big.size else None
    d_xs = np.empty((N, d), xs.dtype)
    add1, add2 = (False, False) if into is None else (into[0] is not None, into[1] is not None)
    dw1 = into[0] if add1 else np.empty(w1.shape, xs.dtype)
    dw2 = into[1] if add2 else np.empty(w2.shape, xs.dtype)

    def rows(e, lo, hi, dhp, scratch):           # d_h_pre -> dhp, d_xs of rows lo..hi of e
        dha = pool.buffer(scratch, "d_h_act", hi - lo, h_act.shape[1], xs.dtype)
        np.matmul(d_ys[lo:hi], weight(w2, e, trans_w).T, out=dha)
        activate_backward_rows(dha, h_pre[lo:hi], code, dhp)
        np.matmul(dhp, weight(w1, e, trans_w).T, out=d_xs[lo:hi])

    def task(t, scratch):
        e, lo, hi = t
        if counts[e] > FUSED_MAX_ROWS:
            rows(e, lo, hi, d_h_pre[lo:hi], scratch)
            return
        dhp = pool.buffer(scratch, "d_h_pre", hi - lo, H1, xs.dtype)
        rows(e, lo, hi, dhp, scratch)
        weight_grad(xs[lo:hi], dhp, trans_w, dw1[e], scratch if add1 else None, "dw1")
        weight_grad(h_act[lo:hi], d_ys[lo:hi], trans_w, dw2[e], scratch if add2 else None,
                    "dw2")

    tasks = [t for t in pool.row_tasks(offsets) if counts[t[0]] > FUSED_MAX_ROWS]
    tasks += [(e, int(offsets[e]), int(offsets[e + 1])) for e in range(counts.shape[0])
              if 0 < counts[e] <= FUSED_MAX_ROWS]
    tasks.sort(key=lambda t: t[1] - t[2])            # larger first: the threads end together
    pool.run_tasks(task, tasks)
    if big.size:
        blas_weight_grads([(xs, d_h_pre, dw1, add1), (h_act, d_ys, dw2, add2)], offsets,
                          trans_w, big)
    for dw, add in ((dw1, add1), (dw2, add2)):
        if not add:
            dw[counts == 0] = 0.0
    return d_xs, dw1, dw2


def experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets, activation, trans_w=False,
                     into=None):
    """The gradients of experts_forward. d_ys: (N, d) gradient of ys; xs, h_pre, h_act: the
    forward's (kept with keep=True); w1, w2, offsets, activation, trans_w: as in the forward
    -> (d_xs (N, d), dw1, dw2), dw1 / dw2 in the forward's layout. into: None, or (dw1, dw2)
    arrays of w1's and w2's shapes (either may be None) into which the weight gradients are
    added in place, and which are returned in their place (gradient accumulation without
    new arrays; host arrays only)."""
    if backend_of(d_ys=d_ys, xs=xs, h_pre=h_pre, h_act=h_act, w1=w1, w2=w2) != CUDA:
        trans_w = bool(trans_w)
        xs = np.ascontiguousarray(chk.check_float("xs", as_host("xs", xs), ndim=2))
        N, d = xs.shape
        w1, offsets, H1 = check_weights(w1, xs, offsets, trans_w, "w1")
        h = hidden_width(H1, activation)
        h_pre = chk.check_float("h_pre", as_host("h_pre", h_pre), shape=(N, H1), dtype=xs.dtype)
        h_act = chk.check_float("h_act", as_host("h_act", h_act), shape=(N, h), dtype=xs.dtype)
        d_ys = chk.check_float("d_ys", as_host("d_ys", d_ys), shape=(N, d), dtype=xs.dtype)
        w2, _, _ = check_weights(w2, h_act, offsets, trans_w, "w2")
        into = _check_into(into, w1, w2, xs)
        if large_blocks(offsets):
            return _experts_backward_blas(np.ascontiguousarray(d_ys), xs,
                                          np.ascontiguousarray(h_pre),
                                          np.ascontiguousarray(h_act), w1, w2, offsets,
                                          activation_code(activation), trans_w, into)
    elif into is not None:
        _check_into(into, w1, w2, xs)                # raises: host arrays only
    d_h_act, dw2 = grouped_gemm_backward(d_ys, h_act, w2, offsets, trans_w)
    d_h_pre = activate_backward(d_h_act, h_pre, activation)
    d_xs, dw1 = grouped_gemm_backward(d_h_pre, xs, w1, offsets, trans_w)
    if into is not None:
        dw1, dw2 = (g if a is None else _add(a, g) for a, g in zip(into, (dw1, dw2)))
    return d_xs, dw1, dw2


def _check_accumulator(name, a, shape, dtype, be):
    """An array gradients are added into in place: a writeable NumPy array of that shape and
    dtype (host arrays only)."""
    if be == CUDA:
        raise ValueError(f"{name}: gradients are added in place into host (NumPy) arrays only; "
                         "on CUDA use the returned gradients")
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array (added into in place), got "
                        f"{type(a).__name__}")
    chk.check_float(name, a, shape=tuple(shape), dtype=dtype)
    if not a.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (gradients are added into it)")
    return a


def _check_into(into, w1, w2, like):
    """into of experts_backward: None or (dw1, dw2), each None or an accumulator of the
    weight's shape and like's dtype."""
    if into is None:
        return None
    if not isinstance(into, (tuple, list)) or len(into) != 2:
        raise TypeError(f"into: expected None or a pair (dw1, dw2), got {type(into).__name__}")
    be = backend_of(like=like)
    return tuple(None if a is None else _check_accumulator(name, a, w.shape, like.dtype, be)
                 for name, a, w in (("into[0] (dw1)", into[0], w1),
                                    ("into[1] (dw2)", into[1], w2)))


def shared_forward(x, w1, w2, gate_w, activation):
    """The shared (always-on) expert: x (T, d), w1 (d, hs|2hs), w2 (hs, d), gate_w (d, 1) or
    None -> (s (T, d), cache). Qwen2-MoE gates it with sigmoid(x @ gate_w); DeepSeek-V3 does
    not. Several shared experts are one with their hidden columns concatenated."""
    h_pre = _matmul(x, w1)
    h_act = activate(h_pre, activation)
    s = _matmul(h_act, w2)
    gate = None
    if gate_w is not None:
        z = _matmul(x, gate_w)
        if backend_of(z=z) == CUDA:
            gate = cuda_module().sigmoid(z)
            s = cuda_module().scale_rows(s, gate)
        else:
            gate = 1.0 / (1.0 + np.exp(-z))
            s = s * gate
    return s, {"h_pre": h_pre, "h_act": h_act, "gate": gate}


def moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0, capacity=None,
                trans_w=False, shared_w1=None, shared_w2=None, shared_gate_w=None,
                check_finite=True, return_context=False, router_b=None, **router_options):
    """The MoE layer. x: (T, d), router_w: (d, E), w1: (E, d, h) or (E, d, 2h) for swiglu
    ([gate | up]), w2: (E, h, d); with trans_w=True, w1: (E, h|2h, d) and w2: (E, d, h)
    (PyTorch Linear layout, no copy) -> y: (T, d), or (y, ctx) with return_context.

    router_b: (E,) or None, a router bias: logits = x @ router_w + router_b, for every router;
    it moves both the choice and the weights and gets a gradient (grads["router_b"]). The
    sigmoid router's `bias` is another thing: added to the sigmoid scores only to choose
    experts, never to the weights, and without a gradient (DeepSeek-V3's balancing bias).

    router="softmax_topk" (Mixtral, Qwen-MoE; OLMoE with renormalize=False) or "sigmoid_topk"
    (DeepSeek-V3: bias, n_group, topk_group, renormalize, scale). capacity: per-expert limit
    (None: dropless). shared_w1 (d, hs|2hs) / shared_w2 (hs, d): a shared expert added to every
    token, gated by sigmoid(x @ shared_gate_w) when shared_gate_w (d,) is given (Qwen2-MoE).
    router may also name a router of fastmoe_nb.routing, its options as keywords: switch_top1
    (k=1), gshard_top2 (k=2), expert_choice and dense_gating (k=E), noisy_topk (noise_w (d, E),
    train, seed); capacity is theirs (see fastmoe_nb/routing/layer.py).
    """
    trans_w = bool(trans_w)
    chk.check_choice("router", router, ROUTERS)
    gate_shape = getattr(shared_gate_w, "shape", None)  # (d,) or (d, 1): its grad keeps it
    be, x, router_w, router_b, w1, w2, shared_w1, shared_w2, shared_gate_w, E, h = _check_layer(
        x, router_w, w1, w2, k, activation, trans_w, shared_w1, shared_w2, shared_gate_w,
        router_b)
    if router == "sigmoid_topk":
        k, n_group, topk_group, scale = check_sigmoid_options(E, k, bias, n_group, topk_group,
                                                              scale, x.dtype)
    elif bias is not None or n_group != 1 or topk_group != 1 or scale != 1.0:
        raise ValueError("bias, n_group, topk_group, scale: only for router='sigmoid_topk'")
    if router in ROUTERS[2:]:
        from ..routing.layer import check_router_options  # lazily: routing builds on ops
        check_router_options(router, k, E, capacity, router_options)
    elif router_options:
        raise TypeError(f"{', '.join(sorted(router_options))}: not an option of "
                        f"router={router!r}")
    if capacity is not None:
        capacity = chk.check_int("capacity", capacity, 0, None, what="a non-negative integer")
    if be != CUDA:
        x = np.ascontiguousarray(x)

    logits = router_logits(x, router_w, router_b)
    if router == "softmax_topk":
        r = softmax_topk(logits, k, renormalize, check_finite=check_finite)
    elif router == "sigmoid_topk":
        r = sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale,
                         check_finite=check_finite)
    plan, router_state = None, None
    if router in ROUTERS[2:]:
        from ..routing.layer import route
        r, plan, router_state = route(router, x, logits, k, capacity, router_options,
                                      check_finite)
    plan = make_plan(r.experts, E, capacity) if plan is None else plan
    if be != CUDA and not return_context:    # permute fused into the experts' row loads
        tokens = np.ascontiguousarray(plan.rows // plan.top_k, dtype=np.int64)
        ys = _experts_forward_raw(x, w1, w2, plan.offsets, activation_code(activation), h,
                                  trans_w, False, tokens)[2]
    else:
        xs = permute_planned(x, plan)
        h_pre, h_act, ys = experts_forward(xs, w1, w2, plan.offsets, activation, trans_w,
                                           keep=return_context)
    y = combine_planned(ys, plan, r.weights)
    shared = None
    if shared_w1 is not None:
        s, shared = shared_forward(x, shared_w1, shared_w2, shared_gate_w, activation)
        y = _add(y, s)
    if not return_context:
        return y
    params = dict(router_w=router_w, w1=w1, w2=w2, k=k, activation=activation, router=router,
                  renormalize=bool(renormalize), bias=bias, n_group=n_group,
                  topk_group=topk_group, scale=scale, capacity=capacity, trans_w=trans_w,
                  shared_w1=shared_w1, shared_w2=shared_w2, shared_gate_w=shared_gate_w,
                  router_b=router_b,
                  shared_gate_shape=None if gate_shape is None else tuple(gate_shape),
                  router_options=router_options, router_state=router_state)
    return y, MoEContext(x=x, logits=logits, routing=r, plan=plan, xs=xs, h_pre=h_pre,
                         h_act=h_act, ys=ys, params=params, shared=shared)


# --------------------------------------------------------------------------- backward

def shared_backward(ds, x, w1, w2, gate_w, cache, activation):
    """The gradients of shared_forward. ds: (T, d) gradient of its output s, x: (T, d),
    w1: (d, hs|2hs), w2: (hs, d), gate_w: (d, 1) or None, cache: shared_forward's
    -> (dx (T, d), dw1, dw2, dgate_w (d, 1) or None).

    With the gate s = m * g, m = act(x @ w1) @ w2, g = sigmoid(x @ gate_w): the gate's
    gradient <ds, m> per token is taken as <ds @ w2.T, h_act>, so m is never recomputed."""
    if backend_of(ds=ds, x=x) == CUDA:
        return cuda_module().shared_backward(ds, x, w1, w2, gate_w, cache, activation)
    h_pre, h_act, gate = cache["h_pre"], cache["h_act"], cache["gate"]
    dh_act = _matmul(ds, w2.T)                                     # (T, hs)
    dgate_w = dx_gate = None
    if gate_w is not None:
        dz = np.einsum("th,th->t", dh_act, h_act)[:, None] * (gate * (1.0 - gate))  # (T, 1)
        dz = dz.astype(x.dtype)
        dgate_w = _matmul(x.T, dz)
        dx_gate = _matmul(dz, gate_w.T)
        dh_act *= gate
        ds = ds * gate
    dw2 = _matmul(h_act.T, ds)
    dh_pre = activate_backward(dh_act, h_pre, activation)
    dw1 = _matmul(x.T, dh_pre)
    dx = _matmul(dh_pre, w1.T)
    if dx_gate is not None:
        dx += dx_gate
    return dx, dw1, dw2, dgate_w


def _check_context(dy, ctx):
    if not isinstance(ctx, MoEContext):
        raise TypeError(f"ctx: expected the MoEContext of moe_forward(..., return_context=True), "
                        f"got {type(ctx).__name__}")
    if ctx.h_pre is None:
        raise ValueError("ctx: expected a context holding h_pre, from moe_forward(..., "
                         "return_context=True)")
    be = backend_of(dy=dy, x=ctx.x)
    host = (lambda n, a: a) if be == CUDA else as_host
    return be, chk.check_float("dy", host("dy", dy), shape=tuple(ctx.x.shape), dtype=ctx.x.dtype)


def _grad_shapes(ctx):
    """{name: shape} of the gradients moe_backward returns for ctx."""
    p = ctx.params
    shapes = {n: tuple(p[n].shape) for n in ("router_w", "w1", "w2", "router_b", "shared_w1",
                                             "shared_w2") if p.get(n) is not None}
    if p.get("shared_gate_w") is not None:
        shapes["shared_gate_w"] = p.get("shared_gate_shape") or tuple(p["shared_gate_w"].shape)
    if (p.get("router_state") or {}).get("noise_w") is not None:
        shapes["noise_w"] = tuple(p["router_state"]["noise_w"].shape)
    return shapes


def _check_grads(grads, ctx, be):
    """grads of moe_backward: None or {name: accumulator of that gradient's shape and the
    layer's dtype}."""
    if grads is None:
        return None
    if not isinstance(grads, dict):
        raise TypeError(f"grads: expected None or a dict of arrays, got {type(grads).__name__}")
    shapes = _grad_shapes(ctx)
    for name, a in grads.items():
        if name not in shapes:
            raise ValueError(f"grads: {name!r} is not a gradient of this layer (expected keys "
                             f"among {sorted(shapes)})")
        _check_accumulator(f"grads[{name!r}]", a, shapes[name], ctx.x.dtype, be)
    return grads


def moe_backward(dy, ctx, grads=None):
    """The gradients of moe_forward. dy: (T, d) gradient of y, ctx: the MoEContext of
    moe_forward(..., return_context=True) -> (dx (T, d), grads).

    grads (argument): None, or a dict of NumPy arrays keyed as the returned dict (any subset)
    into which this call adds its gradients in place — gradient accumulation, as nn.MoE does
    with its Parameter.grad — and which the returned dict then holds. The expert weights'
    gradients are then added per expert while in cache, without new (E, ...) arrays.

    grads holds "router_w" (d, E), "w1", "w2" (in the forward's layout, trans_w too) and, when
    the forward had them, "router_b" (E,) (the logits' gradient summed over tokens),
    "shared_w1", "shared_w2", "shared_gate_w" (in its given shape). The
    sigmoid router's bias only chooses experts and gets no gradient; an assignment dropped by
    capacity contributes nothing. Built from the forward's kernels, scattermoe style:
    combine_backward (a gather and row-wise dots), two grouped_gemm_backward, activate_backward,
    permute_backward (a combine with unit weights), the router's backward.
    """
    be, dy = _check_context(dy, ctx)
    acc = _check_grads(grads, ctx, be)
    if be != CUDA:
        dy = np.ascontiguousarray(dy)
    p, r, plan = ctx.params, ctx.routing, ctx.plan
    d_ys, d_weights = combine_backward(dy, ctx.ys, plan, r.weights)
    into = None if acc is None else (acc.get("w1"), acc.get("w2"))
    d_xs, dw1, dw2 = experts_backward(d_ys, ctx.xs, ctx.h_pre, ctx.h_act, p["w1"], p["w2"],
                                      plan.offsets, p["activation"], p["trans_w"], into)
    dx = permute_backward(d_xs, plan)
    dx_router, router_grads = None, {}
    if p["router"] == "softmax_topk":
        d_logits = softmax_topk_backward(d_weights, ctx.logits, r.experts, p["renormalize"])
    elif p["router"] == "sigmoid_topk":
        d_logits = sigmoid_topk_backward(d_weights, ctx.logits, r.experts, p["renormalize"],
                                         p["scale"])
    else:
        from ..routing.layer import route_backward  # lazily: routing builds on ops
        d_logits, dx_router, router_grads = route_backward(p["router"], d_weights, ctx)
    dx = _add(dx, _matmul(d_logits, p["router_w"].T))
    grads = {"router_w": _matmul(ctx.x.T, d_logits), "w1": dw1, "w2": dw2, **router_grads}
    if p.get("router_b") is not None:
        grads["router_b"] = (cuda_module().column_sums(d_logits) if be == CUDA
                             else d_logits.sum(axis=0))
    if dx_router is not None:
        dx = _add(dx, dx_router)
    if p["shared_w1"] is not None:
        dxs, grads["shared_w1"], grads["shared_w2"], dgate = shared_backward(
            dy, ctx.x, p["shared_w1"], p["shared_w2"], p["shared_gate_w"], ctx.shared,
            p["activation"])
        dx = _add(dx, dxs)
        if dgate is not None:
            grads["shared_gate_w"] = dgate.reshape(p.get("shared_gate_shape") or dgate.shape)
    for name, a in (acc or {}).items():
        if grads[name] is not a:                 # w1 / w2 were added into already
            a += grads[name]
            grads[name] = a
    return dx, grads
