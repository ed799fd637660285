"""PyTorch autograd over fastmoe_nb: forward and backward both run fastmoe_nb's kernels.

- `MoEFunction`: the whole layer, fm.moe_forward / fm.moe_backward (routing included);
  `moe(x, router_w, w1, w2, k, ...)` is its functional form, `MoE` a small nn.Module.
- `ExpertsFunction`: the routed experts alone with the routing given (HF transformers'
  experts interface); `experts(x, experts, weights, w1, w2, ...)`.

Tensors cross without copies (DLPack for CPU tensors; CUDA tensors go to the CUDA backend
through `__cuda_array_interface__`); results come back as tensors over fastmoe_nb's arrays.
float32 and float64 tensors are supported. `experts` also takes bfloat16 CPU expert weights
(a bf16 model's): they run as fastmoe_nb's bf16 format over the tensors' own memory, frozen
(no weight gradient), with the activations in float32; float16 is a TypeError.
"""
from __future__ import annotations

import math

import torch

from ..formats import from_blocks
from ..moe import moe_backward, moe_forward, routed_experts, routed_experts_backward
from .arrays import as_array, to_torch

_GRAD_NAMES = ("router_w", "w1", "w2", "shared_w1", "shared_w2", "shared_gate_w", "router_b")


def _grad(g, device):
    """A fastmoe_nb gradient as a tensor on the input's device (None stays None)."""
    return None if g is None else to_torch(g, device=device)


def _needs_grad(*tensors):
    """Whether autograd will ask for a backward (else the forward keeps no activations)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _moe_forward(x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w, router_b, k,
                 options, return_context):
    """fm.moe_forward on the tensors' memory -> y (NumPy / device array) [, ctx]."""
    tensors = dict(x=x, router_w=router_w, w1=w1, w2=w2, shared_w1=shared_w1,
                   shared_w2=shared_w2, shared_gate_w=shared_gate_w, router_b=router_b)
    arrays = {n: None if t is None else as_array(t, n) for n, t in tensors.items()}
    opts = dict(options)
    if opts.get("bias") is not None:
        opts["bias"] = as_array(opts["bias"], "bias")
    return moe_forward(**arrays, k=k, **opts, return_context=return_context)


def _expert_weight(w, name):
    """w: (E, R, C) expert weight tensor -> what routed_experts takes, over the same memory:
    a bf16 tensor as a bf16 QuantizedWeights (E, R, C) of its bits (frozen), any other as
    as_array's view."""
    if w.dtype != torch.bfloat16:
        return as_array(w, name)
    if w.device.type != "cpu":
        raise TypeError(f"{name}: bfloat16 expert weights run on the CPU; got a tensor on "
                        f"{w.device} (fastmoe_nb's CUDA kernels take float32 / float64)")
    if not w.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous bfloat16 tensor (bf16 weights are "
                         f"used without a copy), got strides {tuple(w.stride())}")
    return from_blocks(w.detach(), "bf16", tuple(w.shape))


def _experts_forward(x, experts, weights, w1, w2, activation, trans_w, return_context):
    """routed_experts on the tensors' memory -> y [, ExpertsContext]."""
    return routed_experts(as_array(x, "x"), as_array(experts, "experts"),
                          as_array(weights, "weights"), _expert_weight(w1, "w1"),
                          _expert_weight(w2, "w2"), activation, trans_w,
                          return_context=return_context)


def _check_frozen(ctx):
    """ExpertsFunction's backward: a RuntimeError if autograd asks for the gradient of a
    bfloat16 w1 / w2 (weights in a format are frozen)."""
    asked = [n for n, i, bf16 in (("w1", 3, ctx.bf16[0]), ("w2", 4, ctx.bf16[1]))
             if bf16 and ctx.needs_input_grad[i]]
    if asked:
        raise RuntimeError(
            f"{', '.join(asked)}: fastmoe_nb's bfloat16 experts are frozen (they get no weight "
            f"gradient), but these weights require grad and backward asked for it. Freeze them "
            f"with param.requires_grad_(False) (in an HF model: each experts module's "
            f"gate_up_proj and down_proj), or run in float32 to train the experts")


class MoEFunction(torch.autograd.Function):
    """y = fm.moe_forward(x, router_w, w1, w2, k, **options); backward is fm.moe_backward.

    x: (T, d), router_w: (d, E), w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h, d),
    (E, d, h)], shared_w1 / shared_w2 / shared_gate_w, router_b (E,): tensors or None; options:
    a dict of
    moe_forward's keyword options (activation, router, renormalize, bias, ..., trans_w).
    Every tensor argument gets its gradient but the routing options; the sigmoid router's bias
    gets none (it only chooses)."""

    @staticmethod
    def forward(ctx, x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w, router_b, k,
                options):
        y, ctx.moe = _moe_forward(x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w,
                                  router_b, k, options, return_context=True)
        ctx.device = x.device
        return to_torch(y, device=x.device)

    @staticmethod
    def backward(ctx, dy):
        dx, grads = moe_backward(as_array(dy.contiguous(), "dy"), ctx.moe)
        return (_grad(dx, ctx.device), *(_grad(grads.get(n), ctx.device) for n in _GRAD_NAMES),
                None, None)


def moe(x, router_w, w1, w2, k, shared_w1=None, shared_w2=None, shared_gate_w=None,
        router_b=None, **options):
    """The functional form of MoEFunction: fm.moe_forward's arguments, tensors in and out,
    differentiable in x, router_w, w1, w2, the shared-expert weights and the router bias."""
    args = (x, router_w, w1, w2, shared_w1, shared_w2, shared_gate_w, router_b)
    if not _needs_grad(*args):                   # inference: no activations kept
        return to_torch(_moe_forward(*args, k, options, return_context=False), x.device)
    return MoEFunction.apply(*args, k, options)


class ExpertsFunction(torch.autograd.Function):
    """y = routed_experts(x, experts, weights, w1, w2, activation, trans_w): the experts with a
    routing chosen elsewhere. Gradients reach x, weights (and so the caller's router), w1, w2;
    bfloat16 w1 / w2 are frozen: backward raises if they require grad."""

    @staticmethod
    def forward(ctx, x, experts, weights, w1, w2, activation, trans_w):
        y, ctx.experts = _experts_forward(x, experts, weights, w1, w2, activation, trans_w,
                                          return_context=True)
        ctx.device = x.device
        ctx.bf16 = (w1.dtype == torch.bfloat16, w2.dtype == torch.bfloat16)
        return to_torch(y, device=x.device)

    @staticmethod
    def backward(ctx, dy):
        _check_frozen(ctx)
        dx, d_weights, dw1, dw2 = routed_experts_backward(as_array(dy.contiguous(), "dy"),
                                                          ctx.experts)
        dev = ctx.device
        return (_grad(dx, dev), None, _grad(d_weights, dev), _grad(dw1, dev), _grad(dw2, dev),
                None, None)


def _compute_dtype(x, w1, w2):
    """The dtype fastmoe_nb computes in: float32 when x or a weight is bfloat16 (bf16 weights
    decode to float32 and accumulate in float32), else x's. float16 is a TypeError."""
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if t.dtype == torch.float16:
            raise TypeError(f"{name}: float16 is neither a dtype fastmoe_nb computes in nor a "
                            f"format it stores experts in; use bfloat16, float32 or float64")
    return torch.float32 if torch.bfloat16 in (x.dtype, w1.dtype, w2.dtype) else x.dtype


def experts(x, top_k_index, top_k_weights, w1, w2, activation="swiglu", trans_w=False):
    """The functional form of ExpertsFunction. x: (T, d), top_k_index: (T, k) int,
    top_k_weights: (T, k), w1, w2 as in fm.moe_forward -> y: (T, d) in x's dtype.

    x and top_k_weights are cast to the compute dtype: x's, or float32 when x, w1 or w2 is
    bfloat16 (bf16 weights are read as they are, without a copy, and are frozen). The casts
    are autograd's, so the gradients come back in the caller's dtypes."""
    dt = _compute_dtype(x, w1, w2)
    args = (x.to(dt), top_k_index, top_k_weights.to(dt), w1, w2, activation, bool(trans_w))
    if not _needs_grad(x, top_k_weights, w1, w2):      # inference: no activations kept
        y = to_torch(_experts_forward(*args, return_context=False), x.device)
    else:
        y = ExpertsFunction.apply(*args)
    return y.to(x.dtype)


class MoE(torch.nn.Module):
    """A Mixture-of-Experts layer whose forward and backward run fastmoe_nb.

    x: (..., d) -> (..., d). Parameters in fastmoe_nb's layout: router_w (d, E),
    w1 (E, d, h|2h) ([gate | up] for swiglu), w2 (E, h, d); initialized like nn.Linear
    (uniform in +-1/sqrt(fan_in)); with router_bias=True a router bias router_b (E,), zeros.
    Options are fm.moe_forward's (router, renormalize, ...).
    """

    def __init__(self, d, h, num_experts, k, activation="swiglu", dtype=torch.float32,
                 device=None, router_bias=False, **options):
        super().__init__()
        h1 = 2 * h if activation == "swiglu" else h
        kw = dict(dtype=dtype, device=device)
        self.router_w = torch.nn.Parameter(torch.empty(d, num_experts, **kw))
        self.router_b = (torch.nn.Parameter(torch.zeros(num_experts, **kw)) if router_bias
                         else None)
        self.w1 = torch.nn.Parameter(torch.empty(num_experts, d, h1, **kw))
        self.w2 = torch.nn.Parameter(torch.empty(num_experts, h, d, **kw))
        self.k, self.activation, self.options = k, activation, options
        self.reset_parameters()

    def reset_parameters(self):
        for p, fan_in in ((self.router_w, self.router_w.shape[0]), (self.w1, self.w1.shape[1]),
                          (self.w2, self.w2.shape[1])):
            bound = 1.0 / math.sqrt(fan_in)
            torch.nn.init.uniform_(p, -bound, bound)

    def forward(self, x):
        shape = x.shape
        y = moe(x.reshape(-1, shape[-1]), self.router_w, self.w1, self.w2, self.k,
                router_b=self.router_b, activation=self.activation, **self.options)
        return y.reshape(shape)

    def extra_repr(self):
        E, d, _ = self.w1.shape
        return f"d={d}, h={self.w2.shape[1]}, num_experts={E}, k={self.k}, " \
               f"activation={self.activation!r}"


__all__ = ["ExpertsFunction", "MoE", "MoEFunction", "experts", "moe"]
