"""Surgery on a trained nn.MoE: grow, shrink, merge and duplicate experts, freeze chosen
experts and router columns, and turn a dense nn.MLP into an MoE (sparse upcycling).

    moe = surgery.upcycle(mlp, num_experts=8, k=2)         # y == mlp(x) at the start
    surgery.add_experts(moe, 4, init="copy", noise=1e-2)    # old routing exactly unchanged
    surgery.wake(moe, range(8, 12))                         # let training reach the new ones
    surgery.freeze(moe, experts=range(8), router=range(8))  # train only the new parts
    opt = surgery.FrozenRows(nn.AdamW(model, lr=1e-3), model)
    ...; model.backward(dy); surgery.mask_grads(model); nn.clip_grad_norm(model, 1.0); opt.step()

Every function edits the MoE in place (the Parameter objects are kept, their arrays replaced)
and returns it. Build the optimizer after the surgery: its state has the old shapes.

New experts ("suppress", the default) leave the old routing exactly as it was — the same
experts chosen, the same weights and output bit for bit — for softmax_topk (any k,
renormalized or not) and sigmoid_topk: their router columns are zeros and a router bias
(router_b, added to the layer if it had none; the sigmoid router's choice bias instead) holds
their logit SUPPRESS below the others. They are dormant — no loss gives them a gradient —
until wake() opens them for training (see add_experts for the trade-off).

Row freezing: nn.Parameter freezes whole arrays, so frozen experts (rows of w1 / w2) and
router columns are recorded on the MoE (``moe.frozen_experts``, ``moe.frozen_router``) and
enforced by this module: ``mask_grads`` zeroes their gradients (call it before clipping),
``FrozenRows`` wraps any fastmoe_nb optimizer so that a step leaves them bit-identical
(weight decay included) and keeps their optimizer state at zero.
"""
from __future__ import annotations

import os

import numpy as np

from . import errors as chk
from .nn.checkpoint import PARAM
from .nn.layers import MLP, as_rng
from .nn.module import Module, Parameter
from .nn.moe import MoE
from .nn.optim import Optimizer
from .routing.stats import RoutingMonitor

SUPPRESS = 1e4   # how far below the old minimum a new expert's sigmoid choice bias starts


# ----------------------------------------------------------------------------- helpers

def _check_moe(moe):
    if not isinstance(moe, MoE):
        raise TypeError(f"moe: expected a fastmoe_nb.nn.MoE, got {type(moe).__name__}")
    if moe.router == "sigmoid_topk" and moe.options.get("n_group", 1) != 1:
        raise ValueError("moe: surgery on a grouped sigmoid router (n_group > 1) would break "
                         "its groups; expected n_group=1")
    return moe


def _expert_ids(name, ids, E, allow_empty=False):
    """A list of distinct expert ids in 0..E-1, in the given order."""
    if isinstance(ids, (int, np.integer)):
        ids = [ids]
    ids = [chk.check_int(f"{name}[{i}]", e, 0, E - 1, what=f"0..E-1 = 0..{E - 1}")
           for i, e in enumerate(ids)]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: expected distinct expert ids, got {ids}")
    if not ids and not allow_empty:
        raise ValueError(f"{name}: expected at least one expert id")
    return ids


def _expert_params(moe):
    """The Parameters indexed by expert: (name, Parameter, axis)."""
    out = [("w1", moe.w1, 0), ("w2", moe.w2, 0), ("router_w", moe.router_w, 1)]
    if hasattr(moe, "router_b"):
        out.append(("router_b", moe.router_b, 0))
    if moe.router == "sigmoid_topk":
        out.append(("bias", moe.bias, 0))
    return out


def _set(p, value):
    """Replace a Parameter's array (same Parameter object), with a zero gradient."""
    p.value = np.ascontiguousarray(value, dtype=p.value.dtype)
    p.grad = np.zeros_like(p.value)


def _reshape_experts(moe, keep):
    """Keep only the experts `keep` (old ids, in their new order), in place: rows of w1 / w2
    / bias and columns of router_w; the freeze record follows the renumbering, the routing
    statistics start over."""
    keep = np.asarray(keep, np.int64)
    for _, p, axis in _expert_params(moe):
        _set(p, np.take(p.value, keep, axis=axis))
    old_to_new = {int(o): i for i, o in enumerate(keep)}
    moe.frozen_experts = sorted(old_to_new[e] for e in getattr(moe, "frozen_experts", ())
                                if e in old_to_new)
    moe.frozen_router = sorted(old_to_new[e] for e in getattr(moe, "frozen_router", ())
                               if e in old_to_new)
    moe.monitor = RoutingMonitor(len(keep), window=moe.monitor.window,
                                 threshold=moe.monitor.threshold)
    moe.stats = None


# ----------------------------------------------------------------------------- growing

def add_experts(moe, n, init="copy", source=None, noise=0.0, router="suppress", rng=None):
    """Append n experts to moe (E -> E + n), in place; returns moe.

    init: "copy" — expert source[i % len(source)] (all old experts in turn by default) plus
    Gaussian noise of std noise * (that weight's std); "fresh" — the layer's own random
    initialization (std d^-1/2 for w1, h^-1/2 for w2).

    router: how the new experts enter the router.
    - "suppress" (default): the old routing stays exactly as it was — the same experts, the
      same weights bit for bit, the same output — and the new experts are dormant. Their
      router columns are zeros and, for softmax routers, their router bias (router_b, added
      to the layer with zeros for the old experts if it had none: logits + 0 are the old
      logits) is min(old router_b) - SUPPRESS, so their logit is that constant for every
      token. softmax_topk with renormalize=True reads only the k chosen logits: exact
      whenever a token's k-th best old logit is above it; with renormalize=False the softmax
      sums every expert: exact because exp(new - best) underflows to exactly 0 in float64
      (a token whose best old logit is above the constant + 746).
      The sigmoid router suppresses through its choice bias instead (new router_b, if any:
      0): min(old bias) - SUPPRESS, never chosen for any input (scores lie in [0, 1]), and
      its weights read only the chosen experts.
      The price is learnability: an expert that is never chosen and has probability exactly
      0 gets no gradient from the task loss, the balancing loss or the z-loss (every one of
      them is proportional to its probability or to its being chosen), and jitter cannot move
      a zero column. Suppressed experts stay dormant until you open them: wake() sets their
      bias to the old experts' level, after which the router's gradients train their rows.
      (Any bias low enough to be exact for all inputs leaves exp(bias - logit) so small that
      Adam's epsilon swamps its gradient: there is no setting that is both.)
    - "copy": the source expert's router column, router_b and choice bias (ties with the
      source, loses them: k = 1 routing unchanged); "zeros": zero columns and biases (chosen
      where the old logits are below 0: trains at once, old routing not kept)."""
    _check_moe(moe)
    n = chk.check_int("n", n, 1)
    chk.check_choice("init", init, ("copy", "fresh"))
    chk.check_choice("router", router, ("suppress", "copy", "zeros"))
    noise = chk.check_real("noise", noise)
    if noise < 0:
        raise ValueError(f"noise: expected a number >= 0, got {noise}")
    E = moe.num_experts
    src = list(range(E)) if source is None else _expert_ids("source", source, E)
    src = [src[i % len(src)] for i in range(n)]
    rng = moe.rng if rng is None else as_rng(rng)
    w1, w2, rw = moe.w1.value, moe.w2.value, moe.router_w.value
    d, h = rw.shape[0], w2.shape[1]
    if init == "copy":
        new1, new2 = w1[src].copy(), w2[src].copy()
        if noise:
            for a, old in ((new1, w1), (new2, w2)):
                a += (rng.standard_normal(a.shape) * noise * old[src].std(axis=(1, 2),
                                                                          keepdims=True)
                      ).astype(a.dtype)
    else:
        new1 = (rng.standard_normal((n,) + w1.shape[1:]) * d ** -0.5).astype(w1.dtype)
        new2 = (rng.standard_normal((n,) + w2.shape[1:]) * h ** -0.5).astype(w2.dtype)
    cols = rw[:, src] if router == "copy" else np.zeros((d, n), rw.dtype)
    sigmoid = moe.router == "sigmoid_topk"
    if router == "suppress" and not sigmoid and not hasattr(moe, "router_b"):
        moe.router_b = Parameter(np.zeros(E, rw.dtype), decay=False)
    if hasattr(moe, "router_b"):
        b = moe.router_b.value
        nb = (b[src] if router == "copy" else
              np.full(n, b.min() - SUPPRESS, b.dtype) if router == "suppress" and not sigmoid
              else np.zeros(n, b.dtype))
        _set(moe.router_b, np.concatenate([b, nb]))
    if sigmoid:
        b = moe.bias.value
        nb = (np.full(n, b.min() - SUPPRESS, b.dtype) if router == "suppress"
              else b[src] if router == "copy" else np.zeros(n, b.dtype))
        _set(moe.bias, np.concatenate([b, nb]))
    frozen_e, frozen_r = list(getattr(moe, "frozen_experts", ())), \
        list(getattr(moe, "frozen_router", ()))
    _set(moe.w1, np.concatenate([w1, new1]))
    _set(moe.w2, np.concatenate([w2, new2]))
    _set(moe.router_w, np.concatenate([rw, cols.astype(rw.dtype)], axis=1))
    moe.monitor = RoutingMonitor(E + n, window=moe.monitor.window,
                                 threshold=moe.monitor.threshold)
    moe.stats = None
    moe.frozen_experts, moe.frozen_router = frozen_e, frozen_r
    return moe


def wake(moe, experts, bias=None):
    """Open dormant experts (suppressed by add_experts) so that training reaches them: their
    router bias — router_b for softmax routers, the choice bias for sigmoid_topk — is set to
    `bias`, by default the mean bias of the other awake (not suppressed) experts. Their router
    columns are kept (zeros after add_experts: a constant logit, chosen where the old experts'
    logits are below it; the router's gradient then shapes the columns). The routing changes
    from here on. Returns moe."""
    _check_moe(moe)
    E = moe.num_experts
    ids = _expert_ids("experts", experts, E)
    p = moe.bias if moe.router == "sigmoid_topk" else getattr(moe, "router_b", None)
    if p is None:
        raise ValueError("moe: has no router bias to open (router_bias=False and never "
                         "suppressed by add_experts)")
    v = p.value
    awake = [e for e in range(E) if e not in ids and v[e] > v.max() - SUPPRESS / 2]
    if bias is None:
        if not awake:
            raise ValueError("bias: expected a value when no other expert is awake (the "
                             "default is the mean bias of the other awake experts)")
        bias = float(v[awake].mean())
    bias = chk.check_real("bias", bias)
    p.value[ids] = bias
    return moe


def duplicate_expert(moe, expert, noise=0.0, rng=None):
    """Append a copy of `expert` (plus noise, see add_experts) with the same router column
    (and sigmoid bias): the copy ties with its original and loses ties (lower index first),
    so with k = 1 the routing and output are unchanged until training separates them.
    Returns moe; the copy is expert E."""
    _check_moe(moe)
    e = _expert_ids("expert", expert, moe.num_experts)
    return add_experts(moe, 1, init="copy", source=e, noise=noise, router="copy", rng=rng)


def remove_experts(moe, experts):
    """Delete the given experts (rows of w1 / w2, router columns, sigmoid bias); the others
    keep their order and are renumbered 0..E'-1. Returns moe."""
    _check_moe(moe)
    E = moe.num_experts
    drop = set(_expert_ids("experts", experts, E))
    if E - len(drop) < moe.k:
        raise ValueError(f"experts: removing {len(drop)} of {E} experts leaves fewer than "
                         f"k = {moe.k}")
    _reshape_experts(moe, [e for e in range(E) if e not in drop])
    return moe


def merge_experts(moe, experts, weights=None):
    """Replace experts[0] by the weighted average of `experts` (w1, w2, router columns,
    sigmoid bias; weights: one non-negative number per expert, default equal, normalized to
    sum 1) and delete the others. Returns moe; the merged expert keeps experts[0]'s id among
    the survivors (renumbered as by remove_experts)."""
    _check_moe(moe)
    ids = _expert_ids("experts", experts, moe.num_experts)
    if len(ids) < 2:
        raise ValueError(f"experts: expected at least two experts to merge, got {ids}")
    w = np.ones(len(ids)) if weights is None else chk.check_float(
        "weights", np.asarray(weights, np.float64), shape=(len(ids),))
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights: expected {len(ids)} finite non-negative numbers with a "
                         f"positive sum, got {list(w)}")
    w = w / w.sum()
    for _, p, axis in _expert_params(moe):
        v = np.moveaxis(p.value, axis, 0)          # a view: writes go to p.value
        v[ids[0]] = np.tensordot(w, v[ids].astype(np.float64), axes=1).astype(v.dtype)
    remove_experts(moe, ids[1:])
    return moe


def upcycle(mlp, num_experts, k, noise=0.0, rng=None, **moe_options):
    """Sparse upcycling (Komatsuzaki et al. 2022): an nn.MoE whose num_experts experts are
    copies of the trained dense nn.MLP (same d, h, activation, dtype) plus noise (see
    add_experts), and a freshly initialized router (moe_options go to nn.MoE). With noise=0
    and a router whose weights sum to 1 (softmax_topk renormalized, or k = E) the MoE's output
    equals the MLP's at the start, up to float rounding."""
    if not isinstance(mlp, MLP):
        raise TypeError(f"mlp: expected a fastmoe_nb.nn.MLP, got {type(mlp).__name__}")
    for key in ("d", "h", "activation", "dtype"):
        if key in moe_options:
            raise TypeError(f"{key}: taken from mlp, not an option of upcycle")
    d, h = mlp.w1.shape[0], mlp.hidden
    moe = MoE(d, h, num_experts, k, activation=mlp.activation, dtype=mlp.w1.dtype, rng=rng,
              **moe_options)
    moe.w1.value[...] = mlp.w1.value
    moe.w2.value[...] = mlp.w2.value
    if noise:
        rng = moe.rng
        for p, src in ((moe.w1, mlp.w1.value), (moe.w2, mlp.w2.value)):
            p.value += (rng.standard_normal(p.shape) * noise * src.std()).astype(p.dtype)
    return moe


# ----------------------------------------------------------------------------- freezing

def _set_frozen(moe, experts, router, add):
    # moe.frozen_experts / frozen_router (sorted ids) with `experts` / `router` (ids or
    # "all") added (add) or removed
    _check_moe(moe)
    E = moe.num_experts
    for attr, name, ids in (("frozen_experts", "experts", experts),
                            ("frozen_router", "router", router)):
        ids = set(range(E)) if isinstance(ids, str) and ids == "all" else \
            set(_expert_ids(name, ids, E, allow_empty=True))
        now = set(getattr(moe, attr, ()))
        setattr(moe, attr, sorted(now | ids if add else now - ids))
    return moe


def freeze(moe, experts=(), router=()):
    """Freeze the given experts (their rows of w1 / w2) and router columns (of router_w):
    mask_grads zeroes their gradients and FrozenRows keeps them bit-identical. Adds to what
    is already frozen. experts / router: ids, or "all". Returns moe."""
    return _set_frozen(moe, experts, router, True)


def unfreeze(moe, experts="all", router="all"):
    """Undo freeze for the given experts and router columns ("all" by default). Returns moe."""
    return _set_frozen(moe, experts, router, False)


def frozen_slices(model):
    """[(Parameter, index)] of every frozen expert row / router column under model (a Module
    or a list of them): p.value[index] is frozen."""
    mods = model.modules() if isinstance(model, Module) else \
        [m for mm in model for m in mm.modules()]
    out = []
    for m in mods:
        if not isinstance(m, MoE):
            continue
        fe, fr = list(getattr(m, "frozen_experts", ())), list(getattr(m, "frozen_router", ()))
        if fe:
            out += [(m.w1, (fe,)), (m.w2, (fe,))]
        if fr:
            out.append((m.router_w, (slice(None), fr)))
            if hasattr(m, "router_b"):
                out.append((m.router_b, (fr,)))
    return out


def mask_grads(model):
    """Zero the gradients of the frozen rows / columns under model (before clipping, so they
    do not count in the global norm). Returns model."""
    for p, idx in frozen_slices(model):
        p.grad[idx] = 0
    return model


class FrozenRows:
    """An optimizer wrapper that leaves frozen expert rows and router columns bit-identical.

    step() zeroes their gradients, runs the wrapped step, then writes their saved values back
    (undoing weight decay and moment updates) and zeroes their slots of the optimizer state
    (no momentum keeps moving them, and unfreezing starts them from a clean state). Every
    other attribute (lr, t, state_dict, ...) is the wrapped optimizer's."""

    def __init__(self, optimizer, model):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a fastmoe_nb.nn optimizer, got "
                            f"{type(optimizer).__name__}")
        if not isinstance(model, Module):
            raise TypeError(f"model: expected a fastmoe_nb.nn.Module, got "
                            f"{type(model).__name__}")
        self.__dict__["optimizer"] = optimizer
        self.__dict__["model"] = model

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def __setattr__(self, name, value):
        setattr(self.optimizer, name, value)

    def step(self):
        opt = self.optimizer
        slices = frozen_slices(self.model)
        saved = [(p, idx, p.value[idx].copy()) for p, idx in slices]
        for p, idx in slices:
            p.grad[idx] = 0
        opt.step()
        names = {id(p): n for n, p in opt.params}
        for p, idx, v in saved:
            p.value[idx] = v
            if id(p) in names:
                for a in opt.state[names[id(p)]].values():
                    a[idx] = 0


# ----------------------------------------------------------------------------- checkpoints

def expert_counts(path):
    """{MoE parameter prefix: expert count} recorded in a checkpoint written by nn.save (read
    from the router_w shapes), e.g. {"blocks.0.body.layers.1": 8}."""
    with np.load(os.fspath(path), allow_pickle=False) as f:
        return {k[len(PARAM):-len(".router_w")].rstrip("."): int(f[k].shape[1])
                for k in f.files if k.startswith(PARAM) and k.endswith("router_w")
                and f[k].ndim == 2}


def check_expert_counts(path, model):
    """Raise ValueError when a checkpoint's expert counts differ from model's MoE layers,
    naming the layer and both counts (call before nn.load after surgery). Returns model."""
    stored = expert_counts(path)
    for name, p in model.named_parameters():
        if not name.endswith("router_w") or p.value.ndim != 2:
            continue
        prefix = name[:-len(".router_w")] if name != "router_w" else ""
        if prefix in stored and stored[prefix] != p.shape[1]:
            raise ValueError(
                f"{path}: MoE layer {prefix or '(the model)'!s} has {stored[prefix]} experts in "
                f"the checkpoint but {p.shape[1]} in the model: build the model with "
                f"num_experts={stored[prefix]} (or apply the same surgery) before loading")
    return model


__all__ = ["FrozenRows", "add_experts", "check_expert_counts", "duplicate_expert",
           "expert_counts", "freeze", "frozen_slices", "mask_grads", "merge_experts",
           "remove_experts", "unfreeze", "upcycle", "wake"]
