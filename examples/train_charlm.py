"""Train a small character-level language model with MoE layers on the Python standard
library's own source files (read from this interpreter's installation: no download).

    python examples/train_charlm.py                 # 3 models x 1500 steps: minutes
    python examples/train_charlm.py --steps 300     # a quick look

Three models are trained on the same batches for the same number of steps:
  dense     residual blocks of a dense SwiGLU MLP of hidden width k*h
  moe       the same blocks with E experts of hidden width h, top-k routing: the same active
            parameters per token as `dense` (plus the tiny router), E/k times the expert weights
  moe+aux   `moe` plus the Mixtral balancing loss (coefficient --aux)
and compared by validation loss, load balance (coefficient of variation of the tokens per
expert, the collapse monitor), and what each expert of the balanced model specializes in.
Everything runs through fastmoe_nb: nn.Embedding / Linear / RMSNorm / MLP / MoE, their
explicit backward, nn.AdamW, nn.clip_grad_norm, nn.save.
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import time

# One level of parallelism: the Numba kernels use the cores, the small BLAS calls of the dense
# layers run on one thread, and idle OpenMP threads sleep instead of spinning (on a busy
# machine spinning threads made every step several times slower). Set these yourself to
# override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import fastmoe_nb.nn as nn  # noqa: E402

# ----------------------------------------------------------------------------- data

CLASSES = {"lower": str.islower, "upper": str.isupper, "digit": str.isdigit,
           "space": lambda c: c == " ", "newline": lambda c: c == "\n",
           "punct": lambda c: not c.isalnum() and not c.isspace()}


def load_corpus(max_chars, seed=0):
    """The stdlib's .py files (sorted, then shuffled by seed), concatenated up to max_chars;
    the first 90% of the files train, the rest validate. Characters outside printable ASCII
    become one unknown symbol. -> (train ids, val ids, vocabulary string)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))
    np.random.default_rng(seed).shuffle(files)
    texts, total = [], 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            t = fh.read()
        texts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    cut = max(1, int(len(texts) * 0.9))
    vocab = "\n" + "".join(chr(c) for c in range(32, 127)) + "\x00"     # \x00: unknown
    table = np.full(0x110000, len(vocab) - 1, np.int32)
    for i, c in enumerate(vocab[:-1]):
        table[ord(c)] = i

    def encode(ts):
        s = "".join(ts).replace("\t", "    ")
        return table[np.frombuffer(s.encode("utf-32-le"), np.uint32)]

    return encode(texts[:cut]), encode(texts[cut:]), vocab


def windows(data, pos, n):
    """(T,) start positions -> contexts (T, n) and next-character targets (T,)."""
    idx = pos[:, None] + np.arange(n)
    return data[idx], data[pos + n]


# ----------------------------------------------------------------------------- model

class CharLM(nn.Module):
    """ids (T, n) -> logits (T, V): embed the n previous characters, concatenate, project
    to d, `layers` residual blocks x + ffn(RMSNorm(x)), RMSNorm, a linear head."""

    def __init__(self, V, n, d_emb, d, layers, make_ffn, rng, dtype=np.float32):
        self.n, self.d_emb = n, d_emb
        self.emb = nn.Embedding(V, d_emb, dtype=dtype, rng=rng, std=0.5)
        self.proj = nn.Linear(n * d_emb, d, dtype=dtype, rng=rng)
        self.blocks = [nn.Residual(nn.Sequential(nn.RMSNorm(d, dtype=dtype), make_ffn()))
                       for _ in range(layers)]
        self.norm = nn.RMSNorm(d, dtype=dtype)
        self.head = nn.Linear(d, V, dtype=dtype, rng=rng)

    def moe_layers(self):
        return [b.body.layers[1] for b in self.blocks if isinstance(b.body.layers[1], nn.MoE)]

    def forward(self, ids):
        # ids: (T, n) -> (T, V)
        e = self.emb.forward(ids)                                    # (T, n, d_emb)
        x = self.proj.forward(e.reshape(ids.shape[0], -1))           # (T, d)
        for b in self.blocks:
            x = b.forward(x)
        return self.head.forward(self.norm.forward(x))

    def backward(self, dlogits):
        # dlogits: (T, V) -> None (the ids have no gradient)
        dx = self.norm.backward(self.head.backward(dlogits))
        for b in reversed(self.blocks):
            dx = b.backward(dx)
        de = self.proj.backward(dx)
        return self.emb.backward(de.reshape(de.shape[0], self.n, self.d_emb))

    def active_parameters(self):
        """Parameters one token uses: all of them but the E-k experts it is not sent to."""
        total = self.num_parameters()
        for m in self.moe_layers():
            E, k = m.num_experts, m.k
            total -= (m.w1.size + m.w2.size) * (E - k) // E
        return total


# ----------------------------------------------------------------------------- training

class Progress:
    """tqdm when installed, else a one-line bar on stderr."""

    def __init__(self, total, desc):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.total, self.desc, self.i, self.t0 = total, desc, 0, time.perf_counter()

    def update(self, info):
        self.i += 1
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(1)
        elif self.i % max(1, self.total // 50) == 0 or self.i == self.total:
            done = int(30 * self.i / self.total)
            rate = self.i / (time.perf_counter() - self.t0)
            print(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.i}/{self.total} "
                  f"{rate:.1f} it/s {info}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr)


def evaluate(model, val, n, batch, batches):
    """Mean cross-entropy (nats per character) on fixed, evenly spaced validation windows."""
    model.eval()
    pos = np.linspace(0, len(val) - n - 1, batch * batches).astype(np.int64)
    losses = []
    for b in range(batches):
        ids, tgt = windows(val, pos[b * batch:(b + 1) * batch], n)
        losses.append(nn.cross_entropy(model.forward(ids), tgt)[0])
    model.train()
    return float(np.mean(losses))


def train(name, model, train_data, val, a):
    """AdamW with linear warmup and decay, gradient clipping; the same batches for every
    model (the sampler is seeded by --seed). Returns the history dict."""
    opt = nn.AdamW(model, lr=a.lr, weight_decay=0.01)
    rng = np.random.default_rng(a.seed)
    hist = {"step": [], "train": [], "val_step": [], "val": [], "cv": [], "entropy": []}
    bar = Progress(a.steps, f"{name:8s}")
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        opt.lr = a.lr * min(step / 50, 1.0) * (1.0 - 0.9 * step / a.steps)
        pos = rng.integers(0, len(train_data) - a.context - 1, a.batch)
        ids, tgt = windows(train_data, pos, a.context)
        loss, dlogits = nn.cross_entropy(model.forward(ids), tgt)
        model.zero_grad()
        model.backward(dlogits)
        nn.clip_grad_norm(model, 1.0)
        opt.step()
        moes = model.moe_layers()
        hist["step"].append(step)
        hist["train"].append(loss)
        if moes:
            hist["cv"].append([m.stats.load_cv for m in moes])
            hist["entropy"].append([m.stats.entropy for m in moes])
        if step % a.eval_every == 0 or step == a.steps:
            hist["val_step"].append(step)
            hist["val"].append(evaluate(model, val, a.context, a.batch, a.eval_batches))
        cv = f" cv {np.mean(hist['cv'][-1]):.2f}" if moes else ""
        bar.update(f"loss {loss:.3f}{cv}")
    bar.close()
    hist["seconds"] = time.perf_counter() - t0
    return hist


# ----------------------------------------------------------------------------- analysis

def specialization(model, val, vocab, a, top=6):
    """For the last MoE layer: route validation windows, and per expert (by its first choice)
    the share of tokens, the character classes of the current (last context) character, and
    the characters most over-represented relative to their overall frequency."""
    moe = model.moe_layers()[-1]
    model.eval()
    pos = np.linspace(0, len(val) - a.context - 1, a.batch * a.eval_batches).astype(np.int64)
    ids, _ = windows(val, pos, a.context)
    cur = ids[:, -1]
    firsts = []
    for b in range(a.eval_batches):
        model.forward(ids[b * a.batch:(b + 1) * a.batch])
        firsts.append(moe.ctx.routing.experts[:, 0].copy())
    first = np.concatenate(firsts)
    model.train()
    V, E = len(vocab), moe.num_experts
    overall = np.bincount(cur, minlength=V) / len(cur)
    rows = []
    for e in range(E):
        mine = cur[first == e]
        if mine.size == 0:
            rows.append((e, 0.0, {}, ""))
            continue
        freq = np.bincount(mine, minlength=V) / mine.size
        lift = np.where(overall > 0, freq / np.maximum(overall, 1e-12), 0)
        lift[np.bincount(mine, minlength=V) < 5] = 0            # ignore rare characters
        best = [vocab[c] for c in np.argsort(-lift)[:top] if lift[c] > 1]
        chars = "".join(best)
        classes = {k: float(np.mean([f(vocab[c]) for c in mine])) for k, f in CLASSES.items()}
        rows.append((e, mine.size / len(cur), classes, chars))
    return rows


def show_char(s):
    return s.replace("\n", "\\n").replace(" ", "␠").replace("\x00", "?")


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG)")
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in results.items():
        ax[0].plot(h["val_step"], h["val"], marker="o", label=name)
        if h["cv"]:
            cv = np.mean(h["cv"], axis=1)
            w = min(25, len(cv))
            ax[1].plot(h["step"][w - 1:], np.convolve(cv, np.ones(w) / w, "valid"), label=name)
    ax[0].set(xlabel="step", ylabel="validation loss (nats/char)", title="MoE vs dense twin")
    ax[1].set(xlabel="step", ylabel="load CV (mean over MoE layers)",
              title="tokens per expert: coefficient of variation")
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=256, help="tokens (windows) per step")
    p.add_argument("--context", type=int, default=12, help="characters of context")
    p.add_argument("--d-emb", type=int, default=16)
    p.add_argument("--d", type=int, default=96, help="model width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64, help="expert hidden width h")
    p.add_argument("--aux", type=float, default=0.01, help="balancing loss coefficient")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--chars", type=int, default=2_000_000, help="characters of source read")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default="charlm.png")
    p.add_argument("--save", default=None, help="checkpoint the balanced MoE model here")
    a = p.parse_args()

    train_data, val, vocab = load_corpus(a.chars, a.seed)
    print(f"stdlib source: {len(train_data):,} train / {len(val):,} validation characters, "
          f"vocabulary {len(vocab)}")
    V = len(vocab)

    def model(kind):
        rng = np.random.default_rng(a.seed + 1)   # identical embeddings, projections, head
        if kind == "dense":
            ffn = lambda: nn.MLP(a.d, a.k * a.hidden, "swiglu", rng=rng)  # noqa: E731
        else:
            aux = a.aux if kind == "moe+aux" else 0.0
            ffn = lambda: nn.MoE(a.d, a.hidden, a.experts, a.k, "swiglu",  # noqa: E731
                                 aux_loss_coef=aux, rng=rng, window=100)
        return CharLM(V, a.context, a.d_emb, a.d, a.layers, ffn, rng)

    results, models = {}, {}
    for kind in ("dense", "moe", "moe+aux"):
        m = models[kind] = model(kind)
        print(f"{kind:8s} {m.num_parameters():,} parameters, {m.active_parameters():,} active "
              f"per token")
        results[kind] = train(kind, m, train_data, val, a)

    print(f"\nafter {a.steps} steps of {a.batch} characters (validation: nats per character)")
    print(f"{'model':8s} {'val loss':>9s} {'train(last 50)':>15s} {'load CV':>8s} "
          f"{'max/mean':>9s} {'min share':>10s} {'entropy':>8s} {'collapsed':>10s} "
          f"{'s/step':>7s}")
    for kind, h in results.items():
        m = models[kind]
        moes = m.moe_layers()
        tr = np.mean(h["train"][-50:])
        if moes:
            cv = np.mean(h["cv"][-50:])
            mx = np.mean([mm.monitor.mean("max_load", 50) for mm in moes])
            tpe = [mm.monitor.mean("tokens_per_expert", 50) for mm in moes]
            low = np.mean([t.min() / t.sum() for t in tpe])
            ent = np.mean(h["entropy"][-50:])
            col = ",".join(f"L{i}:{mm.monitor.starved_experts}" for i, mm in enumerate(moes)
                           if mm.monitor.collapsed) or "no"
            extra = f"{cv:8.3f} {mx:9.2f} {low:10.1%} {ent:8.3f} {col:>10s}"
        else:
            extra = f"{'-':>8s} {'-':>9s} {'-':>10s} {'-':>8s} {'-':>10s}"
        print(f"{kind:8s} {h['val'][-1]:9.4f} {tr:15.4f} {extra} "
              f"{h['seconds'] / a.steps:7.3f}")

    print("\nwhat each expert of `moe+aux` (last MoE layer) takes, by its first choice:")
    print(f"{'expert':>6s} {'share':>6s}  " + " ".join(f"{c:>7s}" for c in CLASSES)
          + "  over-represented characters")
    for e, share, classes, chars in specialization(models["moe+aux"], val, vocab, a):
        cls = " ".join(f"{classes.get(c, 0):7.0%}" for c in CLASSES)
        print(f"{e:6d} {share:6.1%}  {cls}  {show_char(chars)}")
    if a.save:
        nn.save(a.save, models["moe+aux"])
        print(f"saved {a.save}")
    plot(results, a.png)


if __name__ == "__main__":
    main()
