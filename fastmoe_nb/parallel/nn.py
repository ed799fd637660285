"""The expert-parallel MoE layer as an nn Module, and the data-parallel gradient reduction.

    comm = MPI.COMM_WORLD
    model = nn.Sequential(nn.Embedding(V, d, rng=0), nn.Residual(
        ep.ExpertParallelMoE(d, h, num_experts=8, k=2, comm=comm, rng=1)), nn.Linear(d, V, rng=2))
    opt = nn.AdamW(model, lr=1e-3)
    logits = model.forward(ids_of_this_rank)
    loss, dlogits = nn.cross_entropy(logits, targets_of_this_rank)
    model.zero_grad(); model.backward(dlogits)
    ep.sync_gradients(model, comm)          # average over ranks: one Allreduce
    opt.step()

Every rank builds the same model (same seeds); an ExpertParallelMoE keeps only its rank's
experts. Each rank's loss is the mean over its own tokens; after sync_gradients every
gradient is that of the mean of the ranks' losses — the single-process gradient of the global
batch when the ranks hold equal numbers of tokens — so the optimizer steps of P ranks are
those of one process.
"""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..nn.layers import check_input
from ..nn.module import Module, Parameter
from ..nn.moe import MoE
from . import comm as mc
from .moe import ROUTERS, allreduce_grads, ep_moe_backward, ep_moe_forward, expert_range

# moe_forward's replicated weight arguments (every rank holds them whole)
REPLICATED = ("router_w", "shared_w1", "shared_w2", "shared_gate_w")


class ExpertParallelMoE(Module):
    """An MoE layer whose E experts are split over the P ranks of comm. x: (T_r, d) this
    rank's tokens -> y: (T_r, d).

    Parameters: router_w (d, E) and the shared expert (shared_w1, shared_w2, shared_gate_w)
    whole on every rank; w1 (E/P, d, h|2h) and w2 (E/P, h, d) this rank's experts
    r*E/P .. (r+1)*E/P - 1. They are initialized exactly as nn.MoE with the same arguments
    and rng (every rank draws all experts, keeps its own), so 1 rank is nn.MoE.
    capacity is per expert over the global batch, drops counted over all ranks (`dropped`).
    The router-noise and balancing-loss options of nn.MoE are not part of this layer.
    """

    def __init__(self, d, h, num_experts, k, comm=None, activation="swiglu",
                 router="softmax_topk", renormalize=True, capacity=None, shared_h=0,
                 shared_gate=False, n_group=1, topk_group=1, scale=1.0, dtype=np.float32,
                 rng=None):
        comm = mc.get_comm(comm)
        chk.check_choice("router", router, ROUTERS)
        E = chk.check_int("num_experts", num_experts, 1)
        expert_range(E, comm)                      # E divisible by P, before drawing weights
        full = MoE(d, h, E, k, activation=activation, router=router, renormalize=renormalize,
                   capacity=capacity, shared_h=shared_h, shared_gate=shared_gate,
                   n_group=n_group, topk_group=topk_group, scale=scale, dtype=dtype, rng=rng)
        self._take(full, comm)

    @classmethod
    def from_moe(cls, moe, comm=None):
        """Shard an nn.MoE: this rank keeps copies of its experts and of the replicated
        weights (call it on every rank with the same layer)."""
        if not isinstance(moe, MoE):
            raise TypeError(f"moe: expected an nn.MoE, got {type(moe).__name__}")
        comm = mc.get_comm(comm)
        chk.check_choice("moe.router", moe.router, ROUTERS)
        extras = [n for n in ("jitter", "aux_loss_coef", "z_loss_coef") if getattr(moe, n, 0)]
        if extras:
            raise ValueError(f"moe: {', '.join(extras)} expected 0: router noise and balancing "
                             f"losses are not part of ExpertParallelMoE")
        expert_range(moe.num_experts, comm)
        self = cls.__new__(cls)
        self._take(moe, comm)
        return self

    def _take(self, moe, comm):
        self.comm = comm
        self.k, self.activation, self.router = moe.k, moe.activation, moe.router
        self.renormalize, self.capacity = moe.renormalize, moe.capacity
        self.options = dict(moe.options)
        self.num_experts = moe.num_experts
        lo, hi = expert_range(self.num_experts, comm)
        self.first_expert = lo
        for n in REPLICATED:
            if hasattr(moe, n):
                setattr(self, n, Parameter(getattr(moe, n).value))
            else:
                setattr(self, n, None)
        self.w1 = Parameter(moe.w1.value[lo:hi])
        self.w2 = Parameter(moe.w2.value[lo:hi])
        self.bias = (Parameter(moe.bias.value, requires_grad=False, decay=False)
                     if self.router == "sigmoid_topk" else None)
        self.dropped = np.zeros(self.num_experts, np.int64)
        self.ctx = None

    def expert_parameters(self):
        """The parameters that live on this rank only (w1, w2)."""
        return [self.w1, self.w2]

    def forward(self, x):
        # x: (T_r, d) -> y: (T_r, d); keeps the context; dropped: (E,) over all ranks
        x = check_input("x", x, self.router_w.shape[0], self.router_w.dtype)
        kw = {n: getattr(self, n).value for n in REPLICATED if getattr(self, n) is not None}
        y, self.ctx = ep_moe_forward(
            x, w1=self.w1.value, w2=self.w2.value, k=self.k, comm=self.comm,
            activation=self.activation, router=self.router, renormalize=self.renormalize,
            capacity=self.capacity, bias=None if self.bias is None else self.bias.value,
            return_context=True, **self.options, **kw)
        self.dropped = self.ctx.dropped
        return y

    def backward(self, dy):
        # dy: (T_r, d) -> dx: (T_r, d); the replicated weights get this rank's share only
        # (sync_gradients reduces them), the experts the sum over every rank's tokens
        if self.ctx is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first (backward "
                               f"needs what forward keeps)")
        dx, grads = ep_moe_backward(dy, self.ctx, reduce=None)
        for n, g in grads.items():
            getattr(self, n).accumulate(g)
        return dx


def split_parameters(model):
    """(replicated, expert-sharded) trainable parameters of model, each in model order."""
    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE)
               for p in m.expert_parameters()}
    rep, exp = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (exp if id(p) in sharded else rep).append(p)
    return rep, exp


def sync_gradients(model, comm=None, average=True):
    """Reduce model's gradients over the ranks of comm (a collective call).

    Replicated parameters (every one outside the experts): summed over ranks in one Allreduce
    of one flat buffer per dtype. With average (the data-parallel convention: each rank's
    loss is the mean over its own tokens), every gradient, the experts' included, is then
    divided by P: they become the gradients of the mean of the ranks' losses. Returns model.
    """
    comm = mc.get_comm(comm)
    P = comm.Get_size()

    def check():
        if not isinstance(model, Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        rep, exp = split_parameters(model)
        names = {id(p): n for n, p in model.named_parameters()}
        layout = tuple((names[id(p)], p.shape, str(p.dtype)) for p in rep)
        return (("replicated parameters (name, shape, dtype)", layout),), (rep, exp)

    rep, exp = mc.check_collectively(comm, check, "sync_gradients")
    total = allreduce_grads(comm, {i: p.grad for i, p in enumerate(rep)})
    for i, p in enumerate(rep):
        p.grad[...] = total[i]
    if average and P > 1:
        for p in rep + exp:
            p.grad /= p.grad.dtype.type(P)
    return model


def global_grad_norm(model, comm=None):
    """sqrt of the sum of squared gradients of the whole sharded model (every rank's
    experts once, the replicated parameters once), the same on every rank; call it after
    sync_gradients."""
    comm = mc.get_comm(comm)
    rep, exp = split_parameters(model)
    sq = lambda ps: sum(float(np.dot(g, g)) for g in  # noqa: E731
                        (p.grad.astype(np.float64, copy=False).ravel() for p in ps))
    experts = mc.allreduce_sum(comm, np.array([sq(exp)]))[0]
    return float(np.sqrt(sq(rep) + experts))


def clip_grad_norm(model, max_norm, comm=None):
    """Scale every gradient by max_norm / norm when the global norm (over every rank's
    experts) exceeds max_norm, as nn.clip_grad_norm does in one process. Returns the norm."""
    max_norm = chk.check_real("max_norm", max_norm, positive=True)
    norm = global_grad_norm(model, comm)
    if norm > max_norm:
        rep, exp = split_parameters(model)
        for p in rep + exp:
            p.grad *= p.grad.dtype.type(max_norm / (norm + 1e-12))
    return norm
