"""Outputs are bitwise the same with 1 and 2 Numba threads (each run in its own process,
since NUMBA_NUM_THREADS is read when numba starts)."""
import os
import subprocess
import sys

SCRIPT = r"""
import hashlib, numpy as np, fastmoe_nb as fm
rng = np.random.default_rng(7)
T, d, h, E = 301, 96, 40, 16
x = rng.standard_normal((T, d)).astype(np.float32)
rw = (rng.standard_normal((d, E)) / 10).astype(np.float32)
w1 = (rng.standard_normal((E, d, 2 * h)) / 10).astype(np.float32)
w2 = (rng.standard_normal((E, h, d)) / 10).astype(np.float32)
out = [fm.softmax(x @ rw), *fm.topk(x @ rw, 3)]
out.append(fm.moe_forward(x, rw, w1, w2, k=4))
out.append(fm.moe_forward(x, rw, w1, w2, k=3, router="sigmoid_topk", n_group=4, topk_group=2,
                          bias=np.linspace(-.1, .1, E).astype(np.float32), capacity=50,
                          shared_w1=w1[0], shared_w2=w2[0]))
plan = fm.make_plan(out[2], E)
out += [plan.rows, plan.slots, fm.combine(fm.permute(x, plan), plan, out[1])]
import numba
print(numba.get_num_threads(), hashlib.sha256(b"".join(a.tobytes() for a in out)).hexdigest())
"""


def _run(threads):
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    n, digest = p.stdout.split()
    assert int(n) == threads
    return digest


def test_outputs_bitwise_equal_for_1_and_2_threads():
    assert _run(1) == _run(2)
