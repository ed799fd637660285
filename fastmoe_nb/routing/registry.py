"""Every router the MoE layer can use, by name, in one table (ROUTERS).

    y, ctx = fm.moe_forward(x, router_w, w1, w2, k=1, router="switch_top1",
                            capacity_factor=1.25, priority="score", return_context=True)
    dx, grads = fm.moe_backward(dy, ctx)

A Router says what k it routes to, which options it takes, whether it takes a capacity, on
which backends it runs, whether a rank can route its own tokens alone (expert parallelism),
and holds its forward and backward on the layer's logits. moe_forward / moe_backward, expert
parallelism, nn.MoE, the JAX bridge and the CLI look routers up here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import CUDA, backend_of
from ..checks import check_sigmoid_options
from ..ops.routing import sigmoid_topk, sigmoid_topk_backward, softmax_topk_backward
from . import _checks
from .dense import dense_gating, dense_gating_backward
from .expert_choice import expert_choice, expert_choice_backward
from .gshard import gshard_top2, gshard_top2_backward
from .noisy import noisy_topk, noisy_topk_backward
from .switch import switch_top1, switch_top1_backward

# moe_forward's keywords of the two kernel routers; the other routers take keywords of their own
SIGMOID_DEFAULTS = dict(bias=None, n_group=1, topk_group=1, scale=1.0)


@dataclass(frozen=True)
class Router:
    """One router of the MoE layer.

    k: the k it routes every token to (an int), "E" (all experts), or None (any 1..E);
    options: its keyword options; capacity: whether it takes one (else dropless); backends:
    where it runs; local: token choice with no global capacity, so each rank of expert
    parallelism can route its tokens alone; source: the model or paper.
    forward(x, logits, k, capacity, options, check_finite) -> (Routing, Plan or None, state);
    backward(d_weights, x, logits, routing, plan, k, options, state)
        -> (d_logits (T, E), extra dx (T, d) or None, {name: extra gradient}).
    """

    name: str
    k: Union[int, str, None]
    options: tuple
    capacity: bool
    backends: tuple
    local: bool
    source: str
    forward: Callable
    backward: Callable

    def check(self, E, k, capacity, options, dtype):
        """Validate k, the capacity and the options against E experts before any work
        -> (k, options); options holds moe_forward's renormalize / bias / n_group /
        topk_group / scale beside the router's own keywords."""
        opts = dict(options)
        sig = {n: opts.pop(n, v) for n, v in SIGMOID_DEFAULTS.items()}
        renormalize = bool(opts.pop("renormalize", True))
        if self.name == "sigmoid_topk":
            k, n_group, topk_group, scale = check_sigmoid_options(
                E, k, sig["bias"], sig["n_group"], sig["topk_group"], sig["scale"], dtype)
            own = dict(bias=sig["bias"], n_group=n_group, topk_group=topk_group,
                       renormalize=renormalize, scale=scale)
        else:
            if (sig["bias"] is not None or sig["n_group"] != 1 or sig["topk_group"] != 1
                    or sig["scale"] != 1.0):
                raise ValueError("bias, n_group, topk_group, scale: only for "
                                 "router='sigmoid_topk'")
            own = dict(renormalize=renormalize) if self.name == "softmax_topk" else {}
        extra = sorted(set(opts) - set(self.options))
        if extra:
            if self.name in ("softmax_topk", "sigmoid_topk"):
                raise TypeError(f"{', '.join(extra)}: not an option of router={self.name!r}")
            raise TypeError(f"{', '.join(extra)}: not an option of router={self.name!r} (its "
                            f"options: {', '.join(self.options) or 'none'})")
        want = E if self.k == "E" else self.k
        if want is not None and k != want:
            raise ValueError(f"k: router={self.name!r} routes every token to "
                             f"{'all E = ' + str(E) if self.k == 'E' else want} expert(s), "
                             f"got k={k}")
        if capacity is not None and not self.capacity:
            raise ValueError(f"capacity: router={self.name!r} has no capacity (dropless)")
        return k, {**own, **opts}


# --------------------------------------------------------------------------- the routers

def _backend(logits, check_finite):
    """The backend of a layer's logits (router_logits' own: validated, host ones contiguous),
    checked to be finite on the host: softmax_topk calls it directly, not the public op that
    would validate the logits again on every decoding step (sigmoid_topk's op also prepares
    the bias)."""
    be = backend_of(logits=logits)
    if check_finite and be != CUDA:
        chk.check_finite("logits", logits)
    return backends.get(be)


def _softmax_topk(x, logits, k, capacity, o, check_finite):
    return _backend(logits, check_finite).softmax_topk(logits, k, o["renormalize"],
                                                       check_finite), None, {}


def _softmax_topk_backward(d_weights, x, logits, r, plan, k, o, state):
    return softmax_topk_backward(d_weights, logits, r.experts, o["renormalize"]), None, {}


def _sigmoid_topk(x, logits, k, capacity, o, check_finite):
    r = sigmoid_topk(logits, k, o["bias"], o["n_group"], o["topk_group"], o["renormalize"],
                     o["scale"], check_finite=check_finite)
    return r, None, {}


def _sigmoid_topk_backward(d_weights, x, logits, r, plan, k, o, state):
    return (sigmoid_topk_backward(d_weights, logits, r.experts, o["renormalize"], o["scale"]),
            None, {})


def _planned(router):
    """forward of a router of fastmoe_nb.routing that returns (Routing, Plan)."""
    def forward(x, logits, k, capacity, o, check_finite):
        r, plan = router(logits, capacity, check_finite=check_finite, **o)
        return r, plan, {}
    return forward


def _dense(x, logits, k, capacity, o, check_finite):
    return dense_gating(logits, check_finite=check_finite), None, {}


def _noisy(x, logits, k, capacity, o, check_finite):
    opts = dict(o)
    noise_w = opts.pop("noise_w", None)
    raw = None
    if bool(opts.get("train", True)):
        if noise_w is None:
            raise ValueError("noise_w: router='noisy_topk' needs the (d, E) noise weight in "
                             "training (or train=False)")
        noise_w = chk.check_float("noise_w", _checks.host("noise_w", noise_w),
                                  shape=(x.shape[1], logits.shape[1]), dtype=x.dtype)
        raw = x @ noise_w
        if opts.get("seed") is None:
            opts["seed"] = int(np.random.default_rng().integers(2**63))
    r, _load = noisy_topk(logits, raw, k, check_finite=check_finite, **opts)
    return r, None, dict(raw=raw, noise_w=noise_w, opts=opts)


def _noisy_backward(d_weights, x, logits, r, plan, k, o, state):
    d_logits, d_raw = noisy_topk_backward(d_weights, None, logits, state["raw"], k,
                                          **state["opts"])
    if state["raw"] is None:
        return d_logits, None, {}
    return d_logits, d_raw @ state["noise_w"].T, {"noise_w": x.T @ d_raw}


_CAPACITY = ("capacity_factor", "min_capacity")
_BOTH = ("cpu", "cuda")

ROUTERS = {r.name: r for r in (
    Router("softmax_topk", None, ("renormalize",), True, _BOTH, True,
           "Mixtral, Qwen-MoE (renormalize=True); OLMoE (renormalize=False)",
           _softmax_topk, _softmax_topk_backward),
    Router("sigmoid_topk", None, ("bias", "n_group", "topk_group", "renormalize", "scale"),
           True, _BOTH, True, "DeepSeek-V3: sigmoid scores, balancing bias, group-limited",
           _sigmoid_topk, _sigmoid_topk_backward),
    Router("switch_top1", 1, (*_CAPACITY, "priority"), True, ("cpu",), False,
           "Switch Transformer (Fedus et al. 2021)", _planned(switch_top1),
           lambda dw, x, lg, r, plan, k, o, s: (switch_top1_backward(dw, lg, r.experts), None,
                                                {})),
    Router("gshard_top2", 2, (*_CAPACITY, "priority", "random_routing", "seed"), True,
           ("cpu",), False, "GShard (Lepikhin et al. 2020)", _planned(gshard_top2),
           lambda dw, x, lg, r, plan, k, o, s: (gshard_top2_backward(dw, lg, r.experts), None,
                                                {})),
    Router("expert_choice", "E", _CAPACITY, True, ("cpu",), False,
           "expert choice (Zhou et al. 2022)", _planned(expert_choice),
           lambda dw, x, lg, r, plan, k, o, s: (expert_choice_backward(dw, lg, plan), None,
                                                {})),
    Router("dense_gating", "E", (), False, ("cpu",), False, "dense MoE: every expert, softmax",
           _dense, lambda dw, x, lg, r, plan, k, o, s: (dense_gating_backward(dw, lg), None,
                                                        {})),
    Router("noisy_topk", None, ("noise_w", "train", "seed", "noise_epsilon"), False, ("cpu",),
           False, "noisy top-k gating (Shazeer et al. 2017)", _noisy, _noisy_backward),
)}
ROUTER_NAMES = tuple(ROUTERS)


def get_router(name, local=False, backend=None) -> Router:
    """The router called name (ValueError listing the names otherwise); local=True: only the
    routers a rank can apply to its own tokens alone; backend: only those that run there."""
    return ROUTERS[chk.check_choice("router", name, router_names(local, backend))]


def router_names(local=False, backend=None):
    """The names get_router accepts with these filters, in the table's order."""
    return tuple(n for n, r in ROUTERS.items()
                 if (not local or r.local) and (backend is None or backend in r.backends))


__all__ = ["ROUTERS", "ROUTER_NAMES", "Router", "get_router", "router_names"]
