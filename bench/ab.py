"""Time two checkouts of fastmoe_nb against each other, interleaved (a refactor's "nothing
slower" check).

    python bench/ab.py /path/to/old /path/to/new [--presets mixtral-mini,decode-8] [--rounds 5]

Each checkout runs in a worker process of its own (its package first on sys.path, its kernels
compiled and warm); the parent asks the workers in turn to time one case, round after round, so
both see the same machine noise. Every case checks first that the two checkouts' outputs are
bitwise equal. Reported: the median time of each, and new / old.

Cases per preset: the layer (moe_forward), a training step (moe_forward with its context and
moe_backward), the routed experts of the HF bridge (routed_experts): inference (routed_fwd)
and forward with backward (routed_experts).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORKER = r'''
import hashlib, json, sys, time
import numpy as np
import fastmoe_nb as fm
from fastmoe_nb.interop import routed_experts, routed_experts_backward
from fastmoe_nb.presets import get_preset

def arrays(p):
    rng = np.random.default_rng(0)
    f = lambda *s, sc=0.5: (rng.standard_normal(s) * sc).astype(np.float32)
    return dict(x=f(p.tokens, p.d), router_w=f(p.d, p.experts), w1=f(p.experts, p.d, p.h1, sc=0.05),
                w2=f(p.experts, p.h, p.d, sc=0.05))

def case(name, preset):
    p = get_preset(preset)
    a = arrays(p)
    kw = dict(p.router_kwargs(), k=p.k, activation=p.activation)
    dy = np.ones((p.tokens, p.d), np.float32)
    if name == "layer":
        return lambda: fm.moe_forward(**a, **kw)
    if name == "train_step":
        def step():
            y, ctx = fm.moe_forward(**a, **kw, return_context=True)
            return fm.moe_backward(dy, ctx)[0]
        return step
    r = fm.softmax_topk(a["x"] @ a["router_w"], p.k)
    if name == "routed_fwd":
        return lambda: routed_experts(a["x"], r.experts, r.weights, a["w1"], a["w2"],
                                      p.activation)
    def experts():
        y, ctx = routed_experts(a["x"], r.experts, r.weights, a["w1"], a["w2"], p.activation,
                                return_context=True)
        return routed_experts_backward(dy, ctx)[0]
    return experts

cache = {}
for line in sys.stdin:
    name, preset, n = line.split()
    fn = cache.get((name, preset)) or cache.setdefault((name, preset), case(name, preset))
    out = fn()
    times = []
    for _ in range(int(n)):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    digest = hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()[:16]
    print(json.dumps(dict(t=sorted(times)[len(times) // 2], digest=digest)), flush=True)
'''

CASES = ("layer", "train_step", "routed_fwd", "routed_experts")


def start(tree):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    return subprocess.Popen([sys.executable, "-c", WORKER], cwd=os.path.abspath(tree), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def ask(worker, name, preset, n):
    worker.stdin.write(f"{name} {preset} {n}\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--presets", default="mixtral-mini,deepseek-mini,fine-128,decode-8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3, help="calls timed per round (median)")
    args = ap.parse_args(argv)
    workers = [start(args.old), start(args.new)]
    print(f"{'preset':14} {'case':15} {'old ms':>8} {'new ms':>8} {'new/old':>8}")
    worst = 0.0
    try:
        for preset in args.presets.split(","):
            for name in CASES:
                first = [ask(w, name, preset, 1) for w in workers]     # warm, and equal?
                if first[0]["digest"] != first[1]["digest"]:
                    print(f"{preset:14} {name:15} outputs differ: not timed")
                    continue
                t = [[], []]
                for _ in range(args.rounds):
                    for i, w in enumerate(workers):
                        t[i].append(ask(w, name, preset, args.calls)["t"])
                old, new = (sorted(v)[len(v) // 2] * 1e3 for v in t)
                worst = max(worst, new / old)
                print(f"{preset:14} {name:15} {old:8.2f} {new:8.2f} {new / old:8.3f}",
                      flush=True)
    finally:
        for w in workers:
            w.stdin.close()
            w.wait()
    print(f"worst new/old: {worst:.3f}")


if __name__ == "__main__":
    sys.exit(main())
