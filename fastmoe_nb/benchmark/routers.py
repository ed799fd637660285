"""The cases of the routers and balancing losses of fastmoe_nb.routing (CPU) on random (T, E)
logits: forward + backward against the same maths in PyTorch, written as HF transformers and
DeepSpeed write it ("torch"), and forward alone against the NumPy spec ("numpy spec").

Every case is checked against routing/reference.py (float64): expert ids and plan slots
exactly, weights and losses relative to their largest value; a gradient against the float64
gradient of the same function (reference.py's softmax backward of the chosen gates, the
reference loss backward, or the z-loss's closed form).
"""
from __future__ import annotations

import numpy as np

import fastmoe_nb as fm
import fastmoe_nb.routing as R

from .. import reference as ref
from ..routing import reference as rref
from .core import Baseline, Case, rel_err


def _routing_err(got, want):
    """(Routing, Plan) against the reference's -> max rel err (ids and slots exactly)."""
    (r, plan), (wr, wplan) = got, want
    if not (np.array_equal(r.experts, wr.experts) and np.array_equal(plan.slots, wplan.slots)):
        return float("inf")
    return rel_err(r.weights, wr.weights)


def _z_loss_grad(logits):
    """d z_loss / d logits in float64: 2 lse_t softmax(logits_t) / T."""
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    lse = mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True))
    return 2.0 * lse * ref.softmax(x) / x.shape[0]


def _torch_cases(logits, experts_k, k, cap):
    """name -> the torch way, forward and backward (HF's Switch router, NLLB/GShard top-2, HF
    Mixtral's loss, HF's z-loss, DeepSpeed's top-k loss, expert choice with torch.topk)."""
    import torch  # noqa: PLC0415  (optional: the bench extra)

    F = torch.nn.functional
    lt = torch.from_numpy(logits)
    T, E = logits.shape

    def switch():
        x = lt.clone().requires_grad_()
        p = F.softmax(x, dim=-1)
        idx = torch.argmax(p, dim=-1)
        mask = F.one_hot(idx, E)
        mask = mask * (torch.cumsum(mask, dim=0) <= cap)
        gate = p.max(dim=-1).values
        gate.sum().backward()
        return mask, x.grad

    def gshard():
        x = lt.clone().requires_grad_()
        p = F.softmax(x, dim=-1)
        i1 = torch.argmax(p, dim=-1)
        m1 = F.one_hot(i1, E)
        i2 = torch.argmax(x.masked_fill(m1.bool(), float("-inf")), dim=-1)
        m2 = F.one_hot(i2, E)
        loc1 = torch.cumsum(m1, dim=0) - 1
        loc2 = torch.cumsum(m2, dim=0) - 1 + m1.sum(dim=0, keepdim=True)
        m1 = m1 * (loc1 < cap)
        m2 = m2 * (loc2 < cap)
        g1 = (p * F.one_hot(i1, E)).sum(1)
        g2 = (p * F.one_hot(i2, E)).sum(1)
        d = g1 + g2
        ((g1 / d) + (g2 / d)).sum().backward()
        return m1, m2, x.grad

    def expert_choice():
        x = lt.clone().requires_grad_()
        p = F.softmax(x, dim=-1)
        g, idx = torch.topk(p.t(), cap, dim=1)
        g.sum().backward()
        return idx, x.grad

    ek = torch.from_numpy(experts_k.astype(np.int64))

    def mixtral_loss():
        from transformers.models.mixtral.modeling_mixtral import (  # noqa: PLC0415
            load_balancing_loss_func)

        x = lt.clone().requires_grad_()
        load_balancing_loss_func((x,), E, k).backward()
        return x.grad

    def deepspeed_loss():
        x = lt.clone().requires_grad_()
        gates = F.softmax(x, dim=1)
        mask = torch.zeros_like(gates).scatter_(1, ek, 1)
        me, ce = gates.mean(0), mask.mean(0)
        (torch.mean(me * ce) * E * E / k).backward()
        return x.grad

    def z_loss():
        x = lt.clone().requires_grad_()
        (torch.logsumexp(x, dim=-1) ** 2).mean().backward()
        return x.grad

    return dict(switch=switch, gshard=gshard, expert_choice=expert_choice,
                mixtral_loss=mixtral_loss, deepspeed_loss=deepspeed_loss, z_loss=z_loss)


def router_cases(tokens=4096, experts=64, k=2, seed=0):
    """{name: Case} of the routers and losses on (tokens, experts) float32 logits."""
    rng = np.random.default_rng(seed)
    T, E = tokens, experts
    logits = rng.standard_normal((T, E)).astype(np.float32)
    experts_k = fm.softmax_topk(logits, k).experts
    cap = R.expert_capacity(T, E, 1.0, 1)
    dw1, dw2, dwe = (rng.standard_normal(s).astype(np.float32) for s in ((T, 1), (T, 2),
                                                                         (T, E)))

    def torch_baseline(name):
        def make():
            try:
                fn = _torch_cases(logits, experts_k, k, cap)[name]
            except ImportError as e:
                return f"PyTorch / transformers cannot be imported ({e})"
            return Baseline(fn)
        return make

    def switch():
        r, plan = R.switch_top1(logits, cap)
        return (r, plan), R.switch_top1_backward(dw1, logits, r.experts)

    def check_switch(out):
        (r, plan), g = out
        err = max(_routing_err((r, plan), rref.switch_top1(logits, cap)),
                  rel_err(g, ref.softmax_topk_backward(dw1, logits, r.experts, False)))
        return err, "experts, plan slots, gates and d_logits"

    def gshard():
        r, plan = R.gshard_top2(logits, cap)
        return (r, plan), R.gshard_top2_backward(dw2, logits, r.experts)

    def check_gshard(out):
        (r, plan), g = out
        err = max(_routing_err((r, plan), rref.gshard_top2(logits, cap)),
                  rel_err(g, ref.softmax_topk_backward(dw2, logits, r.experts, True)))
        return err, "experts, plan slots, gates and d_logits"

    def expert_choice():
        r, plan = R.expert_choice(logits, cap)
        return (r, plan), R.expert_choice_backward(dwe, logits, plan)

    def check_expert_choice(out):
        (r, plan), g = out
        want = ref.softmax_backward(np.where(plan.slots >= 0, dwe, 0), ref.softmax(logits))
        err = max(_routing_err((r, plan), rref.expert_choice(logits, cap)), rel_err(g, want))
        return err, "choices, plan slots, gates and d_logits"

    def loss(normalization):
        def run():
            return (R.load_balancing_loss(logits, experts_k, normalization),
                    R.load_balancing_loss_backward(1.0, logits, experts_k, normalization))

        def check(out):
            err = max(rel_err(out[0], rref.load_balancing_loss(logits, experts_k,
                                                               normalization)),
                      rel_err(out[1], rref.load_balancing_loss_backward(
                          1.0, logits, experts_k, normalization)))
            return err, "loss and d_logits"
        return run, check

    def z_loss():
        return R.z_loss(logits), R.z_loss_backward(1.0, logits)

    def check_z_loss(out):
        err = max(rel_err(out[0], rref.z_loss(logits)), rel_err(out[1], _z_loss_grad(logits)))
        return err, "loss and d_logits"

    ref_name = "fastmoe_nb/routing/reference.py"
    cases = {}
    for name, run, check in [("switch fwd+bwd", switch, check_switch),
                             ("gshard fwd+bwd", gshard, check_gshard),
                             ("expert_choice fwd+bwd", expert_choice, check_expert_choice),
                             ("mixtral_loss fwd+bwd", *loss("mixtral")),
                             ("deepspeed_loss fwd+bwd", *loss("deepspeed")),
                             ("z_loss fwd+bwd", z_loss, check_z_loss)]:
        cases[name] = Case(run, check, 0.0, 4.0 * T * E * 2,
                           {"torch": torch_baseline(name.split()[0])}, reference=ref_name)

    # forward alone, against the NumPy spec
    def spec(name, ours, theirs, err):
        def check(out):
            return err(out, theirs()), "the forward outputs"
        cases[name] = Case(ours, check, 0.0, 4.0 * T * E,
                           {"numpy spec": lambda: Baseline(theirs)}, reference=ref_name)

    spec("switch_top1 fwd", lambda: R.switch_top1(logits, cap),
         lambda: rref.switch_top1(logits, cap), _routing_err)
    spec("noisy_topk fwd", lambda: R.noisy_topk(logits, logits, k, seed=0),
         lambda: rref.noisy_topk(logits, logits, k, seed=0),
         lambda got, want: (float("inf") if not np.array_equal(got[0].experts, want[0].experts)
                            else max(rel_err(got[0].weights, want[0].weights),
                                     rel_err(got[1], want[1]))))
    spec("load_balancing_loss fwd", lambda: R.load_balancing_loss(logits, experts_k),
         lambda: rref.load_balancing_loss(logits, experts_k), rel_err)
    return cases, dict(tokens=T, experts=E, k=k, capacity=cap)
