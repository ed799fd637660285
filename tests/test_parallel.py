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


def run_mpi(nranks, script, *args, timeout=240):
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
