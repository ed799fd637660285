"""Routers and balancing losses of fastmoe_nb.routing against the same maths in PyTorch (CPU),
written as HF transformers / DeepSpeed write it, and against the routers' NumPy spec, in one
process on the same data.

    python bench/bench_routers.py [--tokens 4096] [--experts 64] [--threads 2] [--repeat 7]

Prints the median time of each and the ratio baseline / fastmoe_nb (> 1: fastmoe_nb is faster).
Forward + backward rows time the router and its gradient into the logits (torch: autograd).
"""
from __future__ import annotations

import argparse
import math

import numpy as np

import fastmoe_nb as fm
import fastmoe_nb.routing as R
from fastmoe_nb.baselines import thread_limits, time_calls
from fastmoe_nb.routing import reference as rref


def torch_cases(torch, logits, experts_k, k, cap, T, E):
    """name -> callable, the torch way (HF Switch router, NLLB/GShard top-2, HF Mixtral loss,
    HF z-loss, DeepSpeed's top-k loss, expert choice with torch.topk), each with backward."""
    F = torch.nn.functional
    lt = torch.from_numpy(logits)

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
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
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

    def zloss():
        x = lt.clone().requires_grad_()
        (torch.logsumexp(x, dim=-1) ** 2).mean().backward()
        return x.grad

    return dict(switch=switch, gshard=gshard, expert_choice=expert_choice,
                mixtral_loss=mixtral_loss, deepspeed_loss=deepspeed_loss, zloss=zloss)


def ours(logits, experts_k, k, cap):
    def switch():
        r, plan = R.switch_top1(logits, cap)
        return R.switch_top1_backward(np.ones_like(r.weights), logits, r.experts)

    def gshard():
        r, plan = R.gshard_top2(logits, cap)
        return R.gshard_top2_backward(np.ones_like(r.weights), logits, r.experts)

    def expert_choice():
        r, plan = R.expert_choice(logits, cap)
        return R.expert_choice_backward(np.ones_like(r.weights), logits, plan)

    def mixtral_loss():
        R.load_balancing_loss(logits, experts_k, "mixtral")
        return R.load_balancing_loss_backward(1.0, logits, experts_k, "mixtral")

    def deepspeed_loss():
        R.load_balancing_loss(logits, experts_k, "deepspeed")
        return R.load_balancing_loss_backward(1.0, logits, experts_k, "deepspeed")

    def zloss():
        R.z_loss(logits)
        return R.z_loss_backward(1.0, logits)

    return dict(switch=switch, gshard=gshard, expert_choice=expert_choice,
                mixtral_loss=mixtral_loss, deepspeed_loss=deepspeed_loss, zloss=zloss)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args(argv)
    T, E, k = a.tokens, a.experts, a.k
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    experts_k = fm.softmax_topk(logits, k).experts
    cap = R.expert_capacity(T, E, 1.0, 1)
    rows = []
    with thread_limits(a.threads):
        mine = ours(logits, experts_k, k, cap)
        try:
            import torch  # noqa: PLC0415
            torch.set_num_threads(a.threads)
            base = torch_cases(torch, logits, experts_k, k, cap, T, E)
        except ImportError:
            base = {}
        for name, fn in mine.items():
            t = float(np.median(time_calls(fn, a.repeat)))
            tb = float(np.median(time_calls(base[name], a.repeat))) if name in base else math.nan
            rows.append((name + " fwd+bwd", t, "torch", tb))
        # forward only, against the NumPy spec
        for name, f, g in [
            ("switch_top1", lambda: R.switch_top1(logits, cap),
             lambda: rref.switch_top1(logits, cap)),
            ("noisy_topk", lambda: R.noisy_topk(logits, logits, k, seed=0),
             lambda: rref.noisy_topk(logits, logits, k, seed=0)),
            ("load_balancing_loss", lambda: R.load_balancing_loss(logits, experts_k),
             lambda: rref.load_balancing_loss(logits, experts_k)),
        ]:
            rows.append((name + " fwd", float(np.median(time_calls(f, a.repeat))), "numpy spec",
                         float(np.median(time_calls(g, max(2, a.repeat // 3))))))
    print(f"T={T} E={E} k={k} capacity={cap} threads={a.threads} float32, median of {a.repeat}")
    print(f"{'op':30s} {'fastmoe_nb':>11s} {'baseline':>22s} {'ratio':>7s}")
    for name, t, bname, tb in rows:
        print(f"{name:30s} {t * 1e3:9.3f}ms {bname:>11s} {tb * 1e3:8.3f}ms {tb / t:7.2f}x")


if __name__ == "__main__":
    main()
