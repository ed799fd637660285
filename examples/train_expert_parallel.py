"""Train a small MoE character model with its experts split over MPI ranks.

    python examples/train_expert_parallel.py                 # 1 process
    mpiexec -n 2 python examples/train_expert_parallel.py    # 2 ranks, 4 experts each
    mpiexec -n 4 python examples/train_expert_parallel.py    # 4 ranks, 2 experts each

The same script, unchanged, on 1, 2 or 4 ranks: every rank builds the same model (same
seeds), keeps its share of the 8 experts, and trains on its slice of the same global batch
of (character -> next character) pairs from the text below; gradients are averaged over the
ranks (ep.sync_gradients), so each step — and the loss it reaches — is that of one process
(up to float32 rounding: the ranks sum some products in another order).
"""
import argparse

import numpy as np

from fastmoe_nb import nn
from fastmoe_nb import parallel as ep
from fastmoe_nb.parallel.comm import mpi

# Lewis Carroll, Alice's Adventures in Wonderland (1865), chapter I — public domain.
TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was "
    "reading, but it had no pictures or conversations in it, 'and what is the use of a "
    "book,' thought Alice 'without pictures or conversations?' So she was considering in "
    "her own mind (as well as she could, for the hot day made her feel very sleepy and "
    "stupid), whether the pleasure of making a daisy-chain would be worth the trouble of "
    "getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran "
    "close by her. There was nothing so very remarkable in that; nor did Alice think it so "
    "very much out of the way to hear the Rabbit say to itself, 'Oh dear! Oh dear! I shall "
    "be late!' (when she thought it over afterwards, it occurred to her that she ought to "
    "have wondered at this, but at the time it all seemed quite natural); but when the "
    "Rabbit actually took a watch out of its waistcoat-pocket, and looked at it, and then "
    "hurried on, Alice started to her feet, for it flashed across her mind that she had "
    "never before seen a rabbit with either a waistcoat-pocket, or a watch to take out of "
    "it, and burning with curiosity, she ran across the field after it, and fortunately "
    "was just in time to see it pop down a large rabbit-hole under the hedge. In another "
    "moment down went Alice after it, never once considering how in the world she was to "
    "get out again."
)


def build(comm, vocab, d, h, experts, k, dtype):
    """Embedding -> residual expert-parallel MoE -> RMSNorm -> Linear, the same on every
    rank (fixed seeds)."""
    return nn.Sequential(
        nn.Embedding(vocab, d, dtype=dtype, rng=0, std=0.5),
        nn.Residual(ep.ExpertParallelMoE(d, h, experts, k, comm=comm, activation="swiglu",
                                         dtype=dtype, rng=1)),
        nn.RMSNorm(d, dtype=dtype),
        nn.Linear(d, vocab, dtype=dtype, rng=2))


def train(comm, steps=60, batch=256, d=32, h=32, experts=8, k=2, lr=3e-3, dtype=np.float32,
          seed=0, log=None, return_model=False):
    """Train on comm's ranks; returns the global-batch loss of every step (all ranks), and
    the model with return_model."""
    P, r = comm.Get_size(), comm.Get_rank()
    if batch % P:
        raise ValueError(f"batch: expected a multiple of the {P} ranks, got {batch}")
    chars = sorted(set(TEXT))
    ids = np.array([chars.index(c) for c in TEXT], np.int64)
    model = build(comm, len(chars), d, h, experts, k, dtype)
    opt = nn.AdamW(model, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)                # the same global batches on every rank
    mine = slice(r * batch // P, (r + 1) * batch // P)
    losses = []
    for step in range(steps):
        pos = rng.integers(0, len(ids) - 1, batch)[mine]
        logits = model.forward(ids[pos])
        loss, dlogits = nn.cross_entropy(logits, ids[pos + 1])
        model.zero_grad()
        model.backward(dlogits)
        ep.sync_gradients(model, comm)               # average over the ranks
        ep.clip_grad_norm(model, 1.0, comm)
        opt.step()
        losses.append(comm.allreduce(loss) / P)      # the global batch's mean loss
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"step {step:3d}  loss {losses[-1]:.6f}")
    return (losses, model) if return_model else losses


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=256, help="global batch (tokens per step)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    a = p.parse_args()
    comm = mpi().COMM_WORLD
    say = print if comm.Get_rank() == 0 else None
    if say:
        say(f"{comm.Get_size()} rank(s), 8 experts ({8 // comm.Get_size()} per rank), "
            f"global batch {a.batch}, {a.dtype}")
    losses = train(comm, a.steps, a.batch, dtype=np.dtype(a.dtype).type, log=say)
    if say:
        say(f"final loss {losses[-1]:.6f}")


if __name__ == "__main__":
    main()
