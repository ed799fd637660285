"""One training step of a small HF Mixtral model, by experts implementation.

    python bench/hf_train_step.py                 # d=512, h=1024, E=8, k=2, 2 layers, T=1024
    python bench/hf_train_step.py --tokens 256 --repeat 3

The same model (same weights, same batch) runs forward, backward and an AdamW step with
experts_implementation "eager" (HF's per-expert loop), "grouped_mm" (torch's grouped GEMM)
and "fastmoe_nb" (register_hf_experts()). After one warm-up step each (compilation excluded)
the implementations take turns, step by step, so a shared machine's load hits all alike.
Printed: the median step time of --repeat steps, its ratio to the first implementation
(eager) in this same run, and the largest logits / loss difference from it (a sanity check).
Only the experts differ; attention, router, norms and optimizer are torch's in all three.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch
import transformers

from fastmoe_nb.interop import register_hf_experts

IMPLEMENTATIONS = ("eager", "grouped_mm", "fastmoe_nb")


def build(args, impl):
    cfg = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.d, intermediate_size=args.h,
        num_local_experts=args.experts, num_experts_per_tok=args.k,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=args.seq, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl,
                                                         dtype=torch.float32)


def step(model, opt, ids):
    # ids: (B, S) -> loss; forward, backward, AdamW
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


def prepare(args, impl, state, ids):
    """The model of one implementation, loaded with state, warmed up -> (model, opt, logits)."""
    model = build(args, impl)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    step(model, opt, ids)                                    # warm-up (numba, allocators)
    return model, opt, logits


def timed(model, opt, ids):
    t0 = time.perf_counter()
    loss = float(step(model, opt, ids).loss.detach())
    return time.perf_counter() - t0, loss


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024, help="T = batch * seq")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    args = p.parse_args()
    register_hf_experts()
    state = build(args, "eager").state_dict()
    B = max(1, args.tokens // args.seq)
    ids = torch.randint(0, args.vocab, (B, min(args.seq, args.tokens)),
                        generator=torch.Generator().manual_seed(1))
    print(f"Mixtral d={args.d} h={args.h} E={args.experts} k={args.k} layers={args.layers} "
          f"T={ids.numel()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, numba {numba.__version__}")
    runs = {impl: prepare(args, impl, state, ids) for impl in args.impl}
    times = {impl: [] for impl in args.impl}
    losses = {impl: [] for impl in args.impl}
    for _ in range(args.repeat):          # round robin: load on a shared machine hits all alike
        for impl, (model, opt, _) in runs.items():
            t, loss = timed(model, opt, ids)
            times[impl].append(t)
            losses[impl].append(loss)
    base = args.impl[0]
    t_base = statistics.median(times[base])
    rows = []
    for impl in args.impl:
        t = statistics.median(times[impl])
        diff = float((runs[impl][2] - runs[base][2]).abs().max())
        dloss = max(abs(a - b) for a, b in zip(losses[impl], losses[base]))
        rows.append((impl, t, t_base / t, diff, dloss))
    print(f"numba threading layer: {numba.threading_layer()}")
    print(f"{'experts':<12}{'step (s)':>10}{'vs ' + base:>12}{'max |dlogits|':>15}"
          f"{'max |dloss|':>13}")
    for impl, t, speed, diff, dloss in rows:
        print(f"{impl:<12}{t:>10.3f}{speed:>11.2f}x{diff:>15.2e}{dloss:>13.2e}")


if __name__ == "__main__":
    main()
