"""Expert parallelism (fastmoe_nb.parallel) on 2 and 4 MPI ranks.

The checks run inside `mpiexec -n P python tests/mpi/<script>.py` (ranks oversubscribe the 2
cores; each rank uses one thread and loads the Numba cache this process has written): the
expert-parallel layer against the single-process layer on the same global batch, collective
validation, the nn form and the training example. Skipped, with the reason, when mpi4py or
mpiexec is missing (pip install -e ".[mpi]").
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import parallel as ep

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec")
try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

needs_mpi = pytest.mark.skipif(not (MPIEXEC and HAVE_MPI4PY),
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")


def warm_numba_cache():
    """Compile (or load) every kernel the ranks use, in this process, so that P ranks do not
    each compile them: one tiny layer, forward and backward, float32 and float64, every
    activation and router the scripts use (every dtype and flag the ranks meet, so that
    none of them compiles)."""
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        for act in fm.ACTIVATIONS:
            H1 = 8 if act == "swiglu" else 4
            x = rng.standard_normal((5, 6)).astype(dt)
            rw = rng.standard_normal((6, 4)).astype(dt)
            w1 = rng.standard_normal((4, 6, H1)).astype(dt)
            w2 = rng.standard_normal((4, 4, 6)).astype(dt)
            for router in ep.ROUTERS:
                y, ctx = fm.moe_forward(x, rw, w1, w2, k=2, activation=act, router=router,
                                        capacity=3, return_context=True)
                fm.moe_backward(y, ctx)


def run_mpi(nranks, script, *args, timeout=600):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [MPIEXEC, "-n", str(nranks), sys.executable, str(ROOT / "tests" / "mpi" / script),
           *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def warm():
    warm_numba_cache()


@needs_mpi
@pytest.mark.parametrize("nranks", [2, 4])
def test_expert_parallel_equals_single_process(warm, nranks):
    rc, out = run_mpi(nranks, "check_parallel.py")
    assert rc == 0 and f"ALL OK" in out, out[-6000:]
    assert f"on {nranks} ranks" in out, out[-6000:]


# ---------------------------------------------------------------- the plans (no MPI needed)

@pytest.mark.parametrize("capacity", [0, 1, 2, 5])
def test_capped_plan_equals_make_plan_with_capacity(rng, capacity):
    # one rank keeping `capacity` per expert is make_plan's capacity
    experts = rng.integers(0, 5, (9, 2)).astype(np.int32)
    experts[:, 1] = (experts[:, 0] + 1 + rng.integers(0, 4, 9)) % 5   # distinct per token
    want = fm.make_plan(experts, 5, capacity)
    got = ep.capped_plan(fm.make_plan(experts, 5), np.full(5, capacity, np.int64))
    for f in ("rows", "offsets", "counts", "slots", "dropped"):
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f


def test_capped_plan_per_expert_keep():
    experts = np.array([[0], [1], [0], [0], [1]], np.int32)
    plan = ep.capped_plan(fm.make_plan(experts, 3), np.array([1, 5, 0]))
    assert plan.rows.tolist() == [0, 1, 4]                  # expert 0 keeps its first token
    assert plan.slots.ravel().tolist() == [0, 1, -1, -1, 2]
    assert plan.dropped.tolist() == [2, 0, 0] and plan.offsets.tolist() == [0, 1, 3, 3]


def test_exchange_plan_orders_by_local_expert():
    # 3 source ranks, 2 local experts: received blocks (s, l) in source order
    recv = np.array([[2, 1], [0, 3], [1, 0]], np.int64)
    xplan = ep.exchange_plan(recv)
    # received positions: s0: e0 [0,1] e1 [2]; s1: e1 [3,4,5]; s2: e0 [6]
    assert xplan.rows.tolist() == [0, 1, 6, 2, 3, 4, 5]
    assert xplan.offsets.tolist() == [0, 3, 7] and xplan.counts.tolist() == [3, 4]
    xr = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    xe = fm.permute(xr, xplan)
    assert np.array_equal(xe[:, 0], [0, 1, 6, 2, 3, 4, 5])
    assert np.array_equal(fm.combine(xe, xplan), xr)        # and back, bitwise
    empty = ep.exchange_plan(np.zeros((2, 1), np.int64))
    assert empty.num_rows == 0 and empty.offsets.tolist() == [0, 0]
