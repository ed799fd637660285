"""Grow a trained MoE: add experts for new data, train only them (and their router columns),
and keep what the model knew — against fine-tuning the whole model, which forgets.

    python examples/grow_experts.py                  # about a minute on 2 cores
    python examples/grow_experts.py --steps 200      # a quick look

Data (embedded in the Python installation, no download): next-character prediction from the
previous --context characters on two kinds of text,
  A  Python source code: the standard library's .py files,
  B  Unicode character names (unicodedata.name: "LATIN SMALL LETTER A WITH GRAVE"), one a
     line, shuffled.
Steps:
  1. train a character model with one MoE block (E experts) on A;
  2. "grow":     surgery.add_experts(moe, n) (copies of the old experts, routing unchanged
                 at first), freeze everything else (old experts, old router columns, embedding,
                 projection, norms, head) and train on B;
  3. "finetune": the same steps on B from the same checkpoint, every parameter trainable.
(--replay f mixes a fraction f of A windows into both runs' B batches: rehearsal.)
Printed: loss (nats per character) and accuracy on A and B after each, and which experts take
the A and B tokens.
"""
from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one level of parallelism (see FACTS)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import fastmoe_nb.nn as nn  # noqa: E402
from fastmoe_nb import surgery  # noqa: E402

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127)) + "\x00"     # \x00: anything else


def encode(text):
    table = np.full(0x110000, len(VOCAB) - 1, np.int32)
    for i, c in enumerate(VOCAB[:-1]):
        table[ord(c)] = i
    s = text.replace("\t", "    ")
    return table[np.frombuffer(s.encode("utf-32-le"), np.uint32)]


def load_parts(chars, seed=0):
    """-> {"A": (train ids, val ids), "B": (train ids, val ids)}: chars characters of stdlib
    source (A) and of Unicode character names (B), the last 10% of each held out."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    np.random.default_rng(seed).shuffle(files)
    code = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            code.append(fh.read())
        if sum(map(len, code)) >= chars:
            break
    import unicodedata
    names = [unicodedata.name(chr(c), "") for c in range(0x110000)]
    names = [n for n in names if n]
    np.random.default_rng(seed).shuffle(names)
    names_text = "\n".join(names)
    out = {}
    for name, text in (("A", "".join(code)[:chars]), ("B", names_text[:chars])):
        ids = encode(text)
        cut = int(len(ids) * 0.9)
        out[name] = (ids[:cut], ids[cut:])
    return out


def windows(data, pos, n):
    """(T,) start positions -> contexts (T, n) and next-character targets (T,)."""
    return data[pos[:, None] + np.arange(n)], data[pos + n]


class CharModel(nn.Module):
    """ids (T, n) -> logits (T, V): embed, concatenate, project to d, x + MoE(RMSNorm(x)),
    RMSNorm, linear head."""

    def __init__(self, V, n, d_emb, d, h, E, k, seed):
        rng = np.random.default_rng(seed)
        self.n, self.d_emb = n, d_emb
        self.emb = nn.Embedding(V, d_emb, rng=rng, std=0.5)
        self.proj = nn.Linear(n * d_emb, d, rng=rng)
        self.norm1 = nn.RMSNorm(d)
        self.moe = nn.MoE(d, h, E, k, renormalize=k > 1, rng=rng)   # Switch-style for k=1
        self.norm2 = nn.RMSNorm(d)
        self.head = nn.Linear(d, V, rng=rng)

    def forward(self, ids):
        # ids: (T, n) -> (T, V)
        x = self.proj.forward(self.emb.forward(ids).reshape(ids.shape[0], -1))
        x = x + self.moe.forward(self.norm1.forward(x))
        return self.head.forward(self.norm2.forward(x))

    def backward(self, dlogits):
        # dlogits: (T, V) -> None
        dx = self.norm2.backward(self.head.backward(dlogits))
        dx = dx + self.norm1.backward(self.moe.backward(dx))
        de = self.proj.backward(dx)
        self.emb.backward(de.reshape(de.shape[0], self.n, self.d_emb))


def train(model, data, a, opt, label, replay=None):
    """a.steps AdamW steps on random windows of data (seeded: the same batches for every run);
    with replay (ids), a fraction a.replay of every batch comes from it instead."""
    rng = np.random.default_rng(a.seed + 1)
    n_old = int(round(a.batch * a.replay)) if replay is not None else 0
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        opt.lr = a.lr * min(step / 30, 1.0) * (1.0 - 0.9 * step / a.steps)
        ids, tgt = windows(data, rng.integers(0, len(data) - a.context - 1, a.batch - n_old),
                           a.context)
        if n_old:
            old = windows(replay, rng.integers(0, len(replay) - a.context - 1, n_old), a.context)
            ids, tgt = np.concatenate([ids, old[0]]), np.concatenate([tgt, old[1]])
        loss, dlogits = nn.cross_entropy(model.forward(ids), tgt)
        model.zero_grad()
        model.backward(dlogits)
        surgery.mask_grads(model)
        nn.clip_grad_norm(model, 1.0)
        opt.step()
        if step % max(1, a.steps // 5) == 0:
            print(f"  {label} step {step:5d}  loss {loss:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


def evaluate(model, val, a, new_from=None):
    """Loss, accuracy on fixed, evenly spaced windows of val, and the share of routed
    assignments sent to experts >= new_from."""
    model.eval()
    pos = np.linspace(0, len(val) - a.context - 1, a.eval_tokens).astype(np.int64)
    ids, tgt = windows(val, pos, a.context)
    logits = model.forward(ids)
    loss = nn.cross_entropy(logits, tgt)[0]
    acc = float((logits.argmax(axis=1) == tgt).mean())
    counts = model.moe.stats.tokens_per_expert
    new = float(counts[new_from:].sum() / counts.sum()) if new_from is not None else 0.0
    model.train()
    return loss, acc, new, counts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="steps of each training phase")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--d-emb", type=int, default=16)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64, help="expert hidden width h")
    p.add_argument("--experts", type=int, default=4, help="experts trained on A")
    p.add_argument("--new", type=int, default=4, help="experts added for B")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--router", choices=("new", "all"), default="all",
                   help="router columns trained on B: the new experts' only, or all")
    p.add_argument("--replay", type=float, default=0.0,
                   help="fraction of each B batch drawn from A's training text (both runs)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--chars", type=int, default=400_000, help="characters of each part")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    parts = load_parts(a.chars, a.seed)
    (a_train, a_val), (b_train, b_val) = parts["A"], parts["B"]
    E = a.experts

    def build():
        return CharModel(len(VOCAB), a.context, a.d_emb, a.d, a.hidden, E, a.k, a.seed)

    print(f"A (code) {len(a_train)} + {len(a_val)} chars, B (names) {len(b_train)} + "
          f"{len(b_val)} chars; {a.steps} steps of {a.batch} windows per phase")
    base = build()
    train(base, a_train, a, nn.AdamW(base, lr=a.lr, weight_decay=0.01), "A       ")
    ckpt = os.path.join(tempfile.mkdtemp(), "base.npz")
    nn.save(ckpt, base)
    rows = {"trained on A": (evaluate(base, a_val, a), evaluate(base, b_val, a))}

    # grow: new experts and their router columns are the only trainable parts
    grown = nn.load(ckpt, build())
    surgery.add_experts(grown.moe, a.new, init="copy", noise=0.01, rng=a.seed)
    same = evaluate(grown, a_val, a, E)
    print(f"after add_experts (before training): A loss {same[0]:.4f} (was "
          f"{rows['trained on A'][0][0]:.4f}), share of A tokens on new experts {same[2]:.1%}")
    grown.requires_grad_(False)
    grown.moe.w1.requires_grad = grown.moe.w2.requires_grad = True
    grown.moe.router_w.requires_grad = True
    surgery.freeze(grown.moe, experts=range(E), router=range(E) if a.router == "new" else ())
    opt = surgery.FrozenRows(nn.AdamW(grown, lr=a.lr, weight_decay=0.01), grown)
    train(grown, b_train, a, opt, "B grow  ", a_train)
    rows["grown on B"] = (evaluate(grown, a_val, a, E), evaluate(grown, b_val, a, E))
    surgery.check_expert_counts(nn.save(ckpt + ".grown.npz", grown), grown)

    # the usual alternative: fine-tune every parameter on B
    tuned = nn.load(ckpt, build())
    train(tuned, b_train, a, nn.AdamW(tuned, lr=a.lr, weight_decay=0.01), "B tune  ", a_train)
    rows["fine-tuned on B"] = (evaluate(tuned, a_val, a), evaluate(tuned, b_val, a))

    print(f"\n{'model':18s} {'A loss':>7s} {'A acc':>6s} {'B loss':>7s} {'B acc':>6s}"
          f"  {'A->new':>6s} {'B->new':>6s}")
    for name, (ra, rb) in rows.items():
        share = (f"  {ra[2]:6.1%} {rb[2]:6.1%}" if name == "grown on B" else "")
        print(f"{name:18s} {ra[0]:7.3f} {ra[1]:6.1%} {rb[0]:7.3f} {rb[1]:6.1%}{share}")
    ra, rb = rows["grown on B"]
    print("\ntokens per expert of the grown model (experts "
          f"{E}..{E + a.new - 1} are new):\n  A: {ra[3].tolist()}\n  B: {rb[3].tolist()}")


if __name__ == "__main__":
    main()
