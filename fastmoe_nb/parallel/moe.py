"""The expert-parallel MoE layer: E experts split over the P ranks of an MPI communicator.

Rank r owns the El = E / P experts r*El .. (r+1)*El - 1 (their w1, w2) and a copy of every
other weight (router, shared expert). Each rank routes its own T_r tokens; forward is

    route -> plan (sorted by expert = by owner rank) -> permute      (local, xs: (N_r, d))
    Alltoall of counts, Alltoallv of rows                             (xr: (R, d), by source)
    reorder to expert order -> expert MLPs (grouped GEMMs)            (ye: (R, d))
    reorder to source order -> Alltoallv back                         (ys: (N_r, d))
    combine with the routing weights (+ shared expert)                (y: (T_r, d))

and backward is the reverse exchange: the gradient of combine is gathered and sent to the
experts, the experts' input gradient is sent back and summed per token (permute's adjoint).

Every expert sees its rows in global token order (rank 0's tokens, then rank 1's, ...) —
exactly the rows the single-process layer gives it on the concatenated batch, so the expert
outputs and gradients are bitwise those of `fm.moe_forward` / `fm.moe_backward`. With a
capacity, each expert keeps its first `capacity` assignments in that global order: a rank
learns how many its lower ranks sent (an Exscan of the counts) and drops the rest before
sending; drops are counted globally (an Allreduce).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .. import backends
from .. import errors as chk
from ..backend import as_host
from ..checks import check_capacity, check_layer, check_shards
from ..moe import run_experts
from ..ops.dispatch import make_plan
from ..ops.routing import router_logits
from ..routing.registry import get_router, router_names
from ..types import Plan, Routing
from . import comm as mc

REDUCTIONS = ("sum", "mean", None)
ROUTERS = router_names(local=True)   # the token-choice routers a rank applies alone


@dataclass
class EPContext:
    """What ep_moe_forward(..., return_context=True) hands back beside y (this rank's part).

    plan is this rank's dispatch plan (its tokens sorted by global expert id, capacity drops
    applied); xplan orders the received rows by local expert (rows: expert order -> received
    position; slots: the inverse), its counts are the rows each local expert processed.
    """

    comm: Any
    x: Any                      # (T_r, d)     this rank's tokens
    logits: Any                 # (T_r, E)
    routing: Routing            # (T_r, k)
    plan: Plan                  # E experts, N_r kept rows of this rank
    xplan: Plan                 # El local experts, R received rows (k = 1)
    send_rows: Any              # (P,) rows sent to each rank
    recv_rows: Any              # (P,) rows received from each rank
    xe: Any                     # (R, d)       expert inputs, local expert order
    h_pre: Any                  # (R, h|2h)
    h_act: Any                  # (R, h)
    ys: Any                     # (N_r, d)     expert outputs back here, plan order
    dropped: Any                # (E,) int64   assignments dropped by capacity, all ranks
    layer: Any = None           # checks.Layer: this rank's experts, the replicated weights
    shared: Optional[dict] = None

    @property
    def counts(self):
        """(El,) rows each local expert processed (from every rank)."""
        return self.xplan.counts


def expert_range(num_experts, comm=None):
    """(first, last + 1): the global ids of the experts this rank owns."""
    comm = mc.get_comm(comm)
    P, r = comm.Get_size(), comm.Get_rank()
    check_shards(num_experts, P)
    El = num_experts // P
    return r * El, (r + 1) * El


def shard_experts(w, comm=None):
    """w: (E, ...) all experts' weights -> a copy of this rank's (E / P, ...) slice."""
    w = as_host("w", w)
    chk.check_array("w", w)
    if w.ndim < 1:
        raise ValueError("w: expected an array with a leading expert axis, got a scalar")
    lo, hi = expert_range(w.shape[0], comm)
    return np.array(w[lo:hi], copy=True)


def _check_forward(P, x, router_w, w1, w2, k, activation, router, renormalize, bias, n_group,
                   topk_group, scale, capacity, trans_w, shared_w1, shared_w2, shared_gate_w,
                   check_finite):
    """This rank's validation and routing -> (signature, (x, layer, logits, routing))."""
    spec = get_router(router, local=True)
    x, layer = check_layer(x, w1, w2, activation, trans_w, router_w, k, None, shared_w1,
                           shared_w2, shared_gate_w, num_shards=P, host_only=True)
    k, options = spec.check(layer.E, layer.k, capacity, dict(
        renormalize=renormalize, bias=bias, n_group=n_group, topk_group=topk_group,
        scale=scale), x.dtype)
    layer = layer.with_router(router, k, options,
                              check_capacity(capacity, what="a non-negative integer"))
    logits = router_logits(x, layer.router_w)    # as fm.moe_forward: width-free rounding
    r, _, _ = spec.forward(x, logits, k, None, options, check_finite)
    o = layer.router_options
    sig = (("d", layer.d), ("dtype", str(x.dtype)), ("E", layer.E),
           ("w1 shape", tuple(layer.w1.shape)), ("w2 shape", tuple(layer.w2.shape)), ("k", k),
           ("activation", activation), ("router", router),
           ("renormalize", o["renormalize"]),
           ("n_group, topk_group, scale", (o.get("n_group", 1), o.get("topk_group", 1),
                                           o.get("scale", 1.0))),
           ("bias given", o.get("bias") is not None), ("capacity", layer.capacity),
           ("trans_w", layer.trans_w),
           ("shared expert shape", None if shared_w1 is None else tuple(layer.shared_w1.shape)),
           ("shared gate shape", layer.shared_gate_shape))
    return sig, (x, layer, logits, r)


def capped_plan(plan, keep):
    """plan: a dropless Plan, keep: (E,) int64 assignments each expert may keep -> the Plan
    keeping, per expert, its first keep[e] rows (in row order); the others are dropped."""
    E = plan.num_experts
    counts = np.minimum(plan.counts, keep)
    if np.array_equal(counts, plan.counts):
        return plan._replace(capacity=None)
    e_of_row = np.repeat(np.arange(E), plan.counts)                 # (N,)
    pos = np.arange(plan.num_rows) - plan.offsets[e_of_row]
    rows = plan.rows[pos < counts[e_of_row]]                        # (N_kept,)
    offsets = np.zeros(E + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    slots = np.full(plan.slots.size, -1, np.int32)
    slots[rows] = np.arange(rows.shape[0], dtype=np.int32)
    return Plan(rows, offsets, counts, slots.reshape(plan.slots.shape), plan.counts - counts,
                None)


def exchange_plan(recv_counts):
    """recv_counts: (P, El) rows received from rank s for local expert l -> a Plan over the R
    received rows (k = 1): rows[i] = the received position of the i-th row in local-expert
    order (expert l: rank 0's rows, then rank 1's, ...), slots the inverse, offsets (El+1,).
    permute(xr, xplan) orders received rows by expert; combine(ye, xplan) orders them back."""
    P, El = recv_counts.shape
    R = int(recv_counts.sum())
    src_start = np.zeros(P * El, np.int64)                          # (s, l) block starts
    np.cumsum(recv_counts.ravel()[:-1], out=src_start[1:])
    lens = recv_counts.T.ravel()                                    # (l, s) order
    dst_start = np.zeros(P * El, np.int64)
    np.cumsum(lens[:-1], out=dst_start[1:])
    shift = src_start.reshape(P, El).T.ravel() - dst_start          # per (l, s) block
    rows = (np.arange(R, dtype=np.int64) + np.repeat(shift, lens)).astype(np.int32)
    slots = np.empty(R, np.int32)
    slots[rows] = np.arange(R, dtype=np.int32)
    counts = recv_counts.sum(axis=0).astype(np.int64)
    offsets = np.zeros(El + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Plan(rows, offsets, counts, slots.reshape(R, 1), np.zeros(El, np.int64), None)


def ep_moe_forward(x, router_w, w1, w2, k, comm=None, activation="swiglu",
                   router="softmax_topk", renormalize=True, bias=None, n_group=1, topk_group=1,
                   scale=1.0, capacity=None, trans_w=False, shared_w1=None, shared_w2=None,
                   shared_gate_w=None, check_finite=True, return_context=False):
    """The MoE layer with its experts split over the ranks of comm (a collective call).

    x: (T_r, d) this rank's tokens (T_r may differ between ranks, 0 included), router_w:
    (d, E) the same on every rank, w1: (E/P, d, h|2h), w2: (E/P, h, d) this rank's experts
    (see shard_experts; trans_w: (E/P, h|2h, d), (E/P, d, h)) -> y: (T_r, d), or (y, ctx)
    with return_context. Every other argument as in fm.moe_forward, the same on every rank;
    capacity is per expert over the global batch. comm: an mpi4py communicator
    (default MPI.COMM_WORLD).

    Arguments are checked on every rank and agreed on in one collective before any exchange:
    a bad argument on one rank, E not divisible by P, or widths, dtypes or options that
    differ between ranks raise ValueError/TypeError on every rank.
    """
    comm = mc.get_comm(comm)
    P = comm.Get_size()
    x, layer, logits, r = mc.check_collectively(comm, lambda: _check_forward(
        P, x, router_w, w1, w2, k, activation, router, renormalize, bias, n_group, topk_group,
        scale, capacity, bool(trans_w), shared_w1, shared_w2, shared_gate_w, check_finite),
        "ep_moe_forward")
    E, B = layer.E, backends.cpu
    El = E // P
    plan = make_plan(r.experts, E)
    dropped = np.zeros(E, np.int64)
    if layer.capacity is not None:
        before = mc.exscan_sum(comm, plan.counts)           # assignments of lower ranks
        plan = capped_plan(plan, np.clip(layer.capacity - before, 0, None))
        dropped = mc.allreduce_sum(comm, plan.dropped)
        plan = plan._replace(capacity=layer.capacity)
    xs = B.permute(x, plan)                                 # (N_r, d), by owner rank
    recv_counts = mc.exchange_counts(comm, plan.counts.reshape(P, El))
    send_rows = plan.counts.reshape(P, El).sum(axis=1)
    recv_rows = recv_counts.sum(axis=1)
    xplan = exchange_plan(recv_counts)
    xr = mc.exchange_rows(comm, xs, send_rows, recv_rows)  # (R, d), by source rank
    # the local experts in their order, back in received order (the layer's pipeline)
    yr, xe, h_pre, h_act, _ = run_experts(xr, xplan, None, layer, return_context)
    ys = mc.exchange_rows(comm, yr, recv_rows, send_rows)   # (N_r, d)
    y = B.combine(ys, plan, r.weights)
    shared = None
    if layer.has_shared:
        s, shared = B.shared_forward(x, layer.shared_w1, layer.shared_w2, layer.shared_gate_w,
                                     layer.code)
        y += s
    if not return_context:
        return y
    return y, EPContext(comm=comm, x=x, logits=logits, routing=r, plan=plan, xplan=xplan,
                        send_rows=send_rows, recv_rows=recv_rows, xe=xe, h_pre=h_pre,
                        h_act=h_act, ys=ys, dropped=dropped, layer=layer, shared=shared)


def _check_backward(dy, ctx, reduce):
    chk.check_choice("reduce", reduce, REDUCTIONS)
    dy = chk.check_float("dy", as_host("dy", dy), shape=tuple(ctx.x.shape), dtype=ctx.x.dtype)
    return (("dy dtype", str(dy.dtype)), ("reduce", reduce)), np.ascontiguousarray(dy)


def ep_moe_backward(dy, ctx, reduce="sum"):
    """The gradients of ep_moe_forward (a collective call). dy: (T_r, d) this rank's gradient
    of y, ctx: its EPContext -> (dx (T_r, d), grads).

    grads["w1"], grads["w2"]: this rank's experts, summed over the tokens of every rank.
    The replicated weights' gradients ("router_w", the shared expert's) are, by reduce:
    "sum": summed over ranks (an Allreduce) — with the expert gradients these are the
    gradients of sum_r <dy_r, y_r>, those of fm.moe_backward on the concatenated batch;
    "mean": the same divided by P, expert gradients included (data-parallel averaging);
    None: this rank's own share, not reduced (for a later bucketed reduction).
    """
    if not isinstance(ctx, EPContext):
        raise TypeError(f"ctx: expected the EPContext of ep_moe_forward(..., "
                        f"return_context=True), got {type(ctx).__name__}")
    comm, ly, r, plan, xplan = ctx.comm, ctx.layer, ctx.routing, ctx.plan, ctx.xplan
    B = backends.cpu
    dy = mc.check_collectively(comm, lambda: _check_backward(dy, ctx, reduce),
                               "ep_moe_backward")
    d_ys, d_weights = B.combine_backward(dy, ctx.ys, plan, r.weights)       # (N_r, d)
    d_ye = B.permute(mc.exchange_rows(comm, d_ys, ctx.send_rows, ctx.recv_rows), xplan)
    d_xe, dw1, dw2 = B.experts_backward(d_ye, ctx.xe, ctx.h_pre, ctx.h_act, ly.w1, ly.w2,
                                        xplan.offsets, ly.code, ly.trans_w)
    d_xs = mc.exchange_rows(comm, B.combine(d_xe, xplan), ctx.recv_rows, ctx.send_rows)
    dx = B.permute_backward(d_xs, plan)
    d_logits, _, _ = get_router(ly.router).backward(d_weights, ctx.x, ctx.logits, r, plan,
                                                    ly.k, ly.router_options, {})
    dx += d_logits @ ly.router_w.T
    replicated = {"router_w": ctx.x.T @ d_logits}
    if ly.has_shared:
        dxs, replicated["shared_w1"], replicated["shared_w2"], dgate = B.shared_backward(
            dy, ctx.x, ly.shared_w1, ly.shared_w2, ly.shared_gate_w, ctx.shared, ly.code)
        dx += dxs
        if dgate is not None:
            replicated["shared_gate_w"] = dgate.reshape(ly.shared_gate_shape)
    if reduce is not None:
        replicated = allreduce_grads(comm, replicated)
    experts = {} if ly.quantized else {"w1": dw1, "w2": dw2}    # in a format: frozen
    grads = {**experts, **replicated}
    if reduce == "mean":
        P = comm.Get_size()
        grads = {n: g / g.dtype.type(P) for n, g in grads.items()}
    return dx, grads


def allreduce_grads(comm, grads):
    """{name: array} -> the same names, each summed over ranks, in one Allreduce of one flat
    buffer per dtype (bitwise the same result on every rank)."""
    out = {}
    for dt in sorted({g.dtype.str for g in grads.values()}):
        names = [n for n, g in grads.items() if g.dtype.str == dt]
        flat = np.concatenate([grads[n].ravel() for n in names]) if names else None
        total = mc.allreduce_sum(comm, flat)
        at = 0
        for n in names:
            g = grads[n]
            out[n] = total[at:at + g.size].reshape(g.shape)
            at += g.size
    return {n: out[n] for n in grads}
