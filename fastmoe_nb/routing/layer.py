"""The routers of fastmoe_nb.routing inside moe_forward / moe_backward, by name.

    y, ctx = fm.moe_forward(x, router_w, w1, w2, k=1, router="switch_top1",
                            capacity_factor=1.25, priority="score", return_context=True)
    dx, grads = fm.moe_backward(dy, ctx)

route() turns the layer's logits into (Routing, Plan) and keeps what the backward needs;
route_backward() gives the logits' gradient (and, for noisy_topk, the noise weight's).
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from . import _checks
from .dense import dense_gating, dense_gating_backward
from .expert_choice import expert_choice, expert_choice_backward
from .gshard import gshard_top2, gshard_top2_backward
from .noisy import noisy_topk, noisy_topk_backward
from .switch import switch_top1, switch_top1_backward

# name -> (the k it routes to: an int, "E" (all experts) or None (any), its options)
LAYER_ROUTERS = {
    "switch_top1": (1, ("capacity_factor", "min_capacity", "priority")),
    "gshard_top2": (2, ("capacity_factor", "min_capacity", "priority", "random_routing",
                        "seed")),
    "expert_choice": ("E", ("capacity_factor", "min_capacity")),
    "dense_gating": ("E", ()),
    "noisy_topk": (None, ("noise_w", "train", "seed", "noise_epsilon")),
}


def check_router_options(router, k, E, capacity, options):
    """Validate a by-name router's k and options before any work."""
    want_k, allowed = LAYER_ROUTERS[router]
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise TypeError(f"{', '.join(extra)}: not an option of router={router!r} (its options: "
                        f"{', '.join(allowed) or 'none'})")
    kk = E if want_k == "E" else want_k
    if kk is not None and k != kk:
        raise ValueError(f"k: router={router!r} routes every token to "
                         f"{'all E = ' + str(E) if want_k == 'E' else kk} expert(s), got k={k}")
    if capacity is not None and router in ("dense_gating", "noisy_topk"):
        raise ValueError(f"capacity: router={router!r} has no capacity (dropless)")


def route(router, x, logits, k, capacity, options, check_finite=True):
    """-> (Routing, Plan or None, state for route_backward). x: (T, d), logits: (T, E)."""
    E = logits.shape[1]
    check_router_options(router, k, E, capacity, options)
    if router == "switch_top1":
        r, plan = switch_top1(logits, capacity, check_finite=check_finite, **options)
    elif router == "gshard_top2":
        r, plan = gshard_top2(logits, capacity, check_finite=check_finite, **options)
    elif router == "expert_choice":
        r, plan = expert_choice(logits, capacity, check_finite=check_finite, **options)
    elif router == "dense_gating":
        r, plan = dense_gating(logits, check_finite=check_finite), None
    else:
        opts = dict(options)
        noise_w = opts.pop("noise_w", None)
        train = bool(opts.get("train", True))
        raw = None
        if train:
            if noise_w is None:
                raise ValueError("noise_w: router='noisy_topk' needs the (d, E) noise weight in "
                                 "training (or train=False)")
            noise_w = chk.check_float("noise_w", _checks.host("noise_w", noise_w),
                                      shape=(x.shape[1], E), dtype=x.dtype)
            raw = x @ noise_w
            if opts.get("seed") is None:
                opts["seed"] = int(np.random.default_rng().integers(2**63))
        r, _load = noisy_topk(logits, raw, k, check_finite=check_finite, **opts)
        return r, None, dict(raw=raw, noise_w=noise_w, opts=opts)
    return r, plan, {}


def route_backward(router, d_weights, ctx):
    """-> (d_logits (T, E), extra dx (T, d) or None, extra grads {name: array})."""
    p, r = ctx.params, ctx.routing
    if router == "switch_top1":
        return switch_top1_backward(d_weights, ctx.logits, r.experts), None, {}
    if router == "gshard_top2":
        return gshard_top2_backward(d_weights, ctx.logits, r.experts), None, {}
    if router == "expert_choice":
        return expert_choice_backward(d_weights, ctx.logits, ctx.plan), None, {}
    if router == "dense_gating":
        return dense_gating_backward(d_weights, ctx.logits), None, {}
    st = p["router_state"]
    d_logits, d_raw = noisy_topk_backward(d_weights, None, ctx.logits, st["raw"], p["k"],
                                          **st["opts"])
    if st["raw"] is None:
        return d_logits, None, {}
    return d_logits, d_raw @ st["noise_w"].T, {"noise_w": ctx.x.T @ d_raw}
