"""Grow a trained MoE: add experts for new data, train only them (and their router columns),
and keep what the model knew — against fine-tuning the whole model, which forgets.

    python examples/grow_experts.py                  # about 2 minutes on 2 cores
    python examples/grow_experts.py --steps 200      # a quick look

Data (embedded in the Python installation, no download): next-character prediction from the
previous --context characters on two kinds of text,
  A  Python source code: the standard library's .py files,
  B  Unicode character names (unicodedata.name: "LATIN SMALL LETTER A WITH GRAVE"), one a
     line, shuffled.
Steps:
  1. train a character model with one MoE block (E experts) on A;
  2. "grown":  surgery.add_experts(moe, n) — the model's output stays bit-identical (checked)
               — then surgery.wake the new experts, freeze everything old (experts, router
               columns and biases, embedding, projection, norms, head) and train the new
               experts, their router columns and biases on B, mixing into each batch a
               fraction --rehearse of text the step-1 model generates itself (pseudo-
               rehearsal: no A data is kept or read after step 1);
  3. the same without the generated text, and "fine-tuned": every parameter trained on B
     from the same checkpoint (without, then with the generated text).
(--replay f mixes a fraction f of real A windows instead: rehearsal, for comparison.)
Printed: loss (nats per character) and accuracy on A and B after each, and the share of A's
and B's routed assignments that go to the new experts.
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


def generate(model, a, streams=512, length=200):
    """Text sampled from model itself (ids, streams * length), each stream started from
    --context newlines: what the model learned of its data, without the data."""
    rng = np.random.default_rng(a.seed + 2)
    model.eval()
    ctx = np.zeros((streams, a.context), np.int32)                   # VOCAB[0] = "\n"
    out = np.empty((streams, length), np.int32)
    for i in range(length):
        z = model.forward(ctx).astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        c = (p.cumsum(axis=1) > rng.random((streams, 1)) * p.sum(axis=1, keepdims=True)
             ).argmax(axis=1)
        out[:, i] = c
        ctx = np.concatenate([ctx[:, 1:], c[:, None].astype(np.int32)], axis=1)
    model.train()
    return out.reshape(-1)


def train(model, data, a, opt, label, replay=None, frac=0.0):
    """a.steps AdamW steps on random windows of data (seeded: the same batches for every run);
    with replay (ids), a fraction frac of every batch comes from it instead."""
    rng = np.random.default_rng(a.seed + 1)
    n_old = int(round(a.batch * frac)) if replay is not None else 0
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


def grow(model, a, E):
    """add_experts (checked: the output is unchanged bit for bit), wake the new experts and
    leave only them, their router columns and biases trainable -> an optimizer for that."""
    probe = windows(model.a_val, np.arange(0, 4096 * 7, 7), a.context)[0]
    before = model.eval().forward(probe)
    surgery.add_experts(model.moe, a.new, init="copy", noise=0.01, rng=a.seed)
    same = np.array_equal(model.forward(probe), before)
    model.train()
    surgery.wake(model.moe, range(E, E + a.new))
    model.requires_grad_(False)
    for p in (model.moe.w1, model.moe.w2, model.moe.router_w, model.moe.router_b):
        p.requires_grad = True
    surgery.freeze(model.moe, experts=range(E), router=range(E))
    return surgery.FrozenRows(nn.AdamW(model, lr=a.lr, weight_decay=0.01), model), same


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
    p.add_argument("--rehearse", type=float, default=0.25,
                   help="fraction of each B batch drawn from text the A model generates")
    p.add_argument("--replay", type=float, default=0.0,
                   help="instead: fraction of each B batch drawn from A's training text")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--chars", type=int, default=400_000, help="characters of each part")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    parts = load_parts(a.chars, a.seed)
    (a_train, a_val), (b_train, b_val) = parts["A"], parts["B"]
    E = a.experts

    def build():
        m = CharModel(len(VOCAB), a.context, a.d_emb, a.d, a.hidden, E, a.k, a.seed)
        m.a_val = a_val
        return m

    print(f"A (code) {len(a_train)} + {len(a_val)} chars, B (names) {len(b_train)} + "
          f"{len(b_val)} chars; {a.steps} steps of {a.batch} windows per phase")
    base = build()
    train(base, a_train, a, nn.AdamW(base, lr=a.lr, weight_decay=0.01), "A       ")
    ckpt = os.path.join(tempfile.mkdtemp(), "base.npz")
    nn.save(ckpt, base)
    rows = {"trained on A": (evaluate(base, a_val, a), evaluate(base, b_val, a))}
    if a.replay:
        old, frac, how = a_train, a.replay, f"real A text {a.replay:.0%}"
    else:
        t0 = time.perf_counter()
        old, frac = generate(base, a), a.rehearse
        how = f"generated text {a.rehearse:.0%}"
        print(f"generated {len(old)} characters with the A model ({time.perf_counter() - t0:.0f}"
              f" s): {''.join(VOCAB[c] for c in old[:60])!r}")

    runs = [(f"grown, {how}", True, frac), ("grown, B only", True, 0.0),
            ("fine-tuned, B only", False, 0.0), (f"fine-tuned, {how}", False, frac)]
    for name, is_grown, f in runs:
        model = nn.load(ckpt, build())
        if is_grown:
            opt, same = grow(model, a, E)
            print(f"add_experts: output on A unchanged bit for bit: {same}")
        else:
            opt = nn.AdamW(model, lr=a.lr, weight_decay=0.01)
        train(model, b_train, a, opt, f"{name[:18]:18s}", old if f else None, f)
        new = E if is_grown else None
        rows[name] = (evaluate(model, a_val, a, new), evaluate(model, b_val, a, new))
        if is_grown and f:
            surgery.check_expert_counts(nn.save(ckpt + ".grown.npz", model), model)
            counts = rows[name][0][3], rows[name][1][3]

    print(f"\n{'model':30s} {'A loss':>7s} {'A acc':>6s} {'B loss':>7s} {'B acc':>6s}"
          f"  {'A->new':>6s} {'B->new':>6s}")
    for name, (ra, rb) in rows.items():
        share = f"  {ra[2]:6.1%} {rb[2]:6.1%}" if name.startswith("grown") else ""
        print(f"{name:30s} {ra[0]:7.3f} {ra[1]:6.1%} {rb[0]:7.3f} {rb[1]:6.1%}{share}")
    print(f"\ntokens per expert of the grown model (experts {E}..{E + a.new - 1} are new):\n"
          f"  A: {counts[0].tolist()}\n  B: {counts[1].tolist()}")


if __name__ == "__main__":
    main()
