"""The CUDA backend, checked without a GPU, in subprocesses (numba's CUDA target must be set up
before numba is first imported, and this process keeps the CPU path):

- tests/cuda_sim/ under NUMBA_ENABLE_CUDASIM=1: every CUDA op against fastmoe_nb.reference and
  the CPU path on tiny awkward shapes (on a GPU machine run that folder directly, see its
  conftest.py);
- tools/cuda_compile_check.py: every kernel compiled to PTX for sm_90 and sm_75 with each
  signature it is launched with (the simulator runs Python and proves no compilation);
- the one clear error for a device array when CUDA cannot run.

The two long ones run for a minute or two on a core each: they start as soon as the suite is
collected (conftest.py starts what start_background starts for the tests marked `background`,
and runs those tests last), so the rest of the suite runs beside them, each with a Numba cache
of its own.
"""
import atexit
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
pytestmark = pytest.mark.skipif(not HAVE_NUMBA_CUDA,
                                reason="needs numba-cuda: pip install -e '.[test]'")
TIMEOUT = 900


def _env(**extra):
    # the checkout under test first on the path: a script's own folder (tools/) would come
    # first otherwise, and an installed fastmoe_nb elsewhere would be checked instead
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _start(args, **env):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


_PROCS = {}


def _kill():
    for p in _PROCS.values():
        if p.poll() is None:
            p.kill()


def _own_cache(name):
    # A Numba disk cache of the subprocess's own: Numba's index of a function's cached
    # versions is read, extended and written back without a lock, so two processes compiling
    # different versions at once can leave an entry that names the other's code.
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastmoe_nb")
    return os.path.join(base, f"numba-{name}")


def start_background():
    """Start the simulator's and the PTX compile's runs (once; none without numba-cuda)."""
    if HAVE_NUMBA_CUDA and not _PROCS:
        _PROCS["sim"] = _start(["-m", "pytest", "tests/cuda_sim", "-q", "-p", "no:cacheprovider"],
                               NUMBA_ENABLE_CUDASIM="1", NUMBA_CACHE_DIR=_own_cache("cudasim"))
        _PROCS["ptx"] = _start(["tools/cuda_compile_check.py"],
                               NUMBA_CACHE_DIR=_own_cache("ptx"))
        atexit.register(_kill)


@pytest.fixture(scope="module")
def runs():
    start_background()          # already started at collection when run through conftest.py
    yield _PROCS
    _kill()


def _finish(proc):
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out


@pytest.mark.background
def test_cuda_ops_in_simulator(runs):
    rc, out = _finish(runs["sim"])
    assert rc == 0, "tests/cuda_sim failed under NUMBA_ENABLE_CUDASIM=1:\n" + out[-6000:]
    assert " passed" in out and "skipped" not in out, out[-2000:]


@pytest.mark.background
def test_cuda_kernels_compile_to_ptx(runs):
    rc, out = _finish(runs["ptx"])
    assert rc == 0, "tools/cuda_compile_check.py failed:\n" + out[-6000:]
    assert "kernel compilations to PTX succeeded" in out, out[-2000:]


def test_clear_error_without_gpu():
    code = """
import numpy as np, fastmoe_nb as fm
class Fake:  # a device array as CuPy or PyTorch would hand it over
    shape, dtype = (2, 3), np.dtype(np.float32)
    __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False),
                                "version": 3}
try:
    fm.softmax(Fake())
except RuntimeError as e:
    print("ERROR:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), text=True,
                         capture_output=True, timeout=300)
    if "numba.cuda.is_available() is False" not in out.stdout:
        pytest.skip("a CUDA GPU is usable here" if "ERROR" not in out.stdout else out.stdout)
    assert "pass NumPy arrays to run on the CPU" in out.stdout
    assert "NUMBA_ENABLE_CUDASIM=1" in out.stdout


def test_launch_configure_validates():
    from fastmoe_nb.kernels.cuda import launch  # no numba.cuda import: plain Python

    try:
        with pytest.raises(ValueError, match="route_threads: expected a power of 2, got 3"):
            launch.configure(route_threads=3)
        with pytest.raises(ValueError, match="gemm_tm, gemm_tn: expected divisors"):
            launch.configure(gemm_bm=64, gemm_tm=3)
        with pytest.raises(ValueError, match="threads: expected a positive integer"):
            launch.configure(threads=0)
        with pytest.raises(ValueError, match="blocks: expected one of"):
            launch.configure(blocks=2)
        assert launch.CONFIG == launch.DEFAULTS          # a rejected change changes nothing
        assert launch.configure(max_blocks=2)["max_blocks"] == 2
        assert launch.blocks(1000, 32) == 2 and launch.blocks(0, 32) == 1
    finally:
        launch.configure(**launch.DEFAULTS)
    assert launch.CONFIG == launch.DEFAULTS
