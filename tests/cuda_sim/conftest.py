"""The CUDA tests: the public ops on device arrays, against fastmoe_nb.reference and the CPU
path, on tiny awkward shapes.

They need numba's CUDA target before numba is first imported, so the normal test run does not
collect them here: tests/test_cuda_ops.py runs this folder in a subprocess with
NUMBA_ENABLE_CUDASIM=1 (the simulator: tiny blocks and grids, see launch.configure below). On a
machine with a GPU run them unchanged on the device:

    FASTMOE_NB_CUDA_TESTS=1 python -m pytest tests/cuda_sim -q
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# tests/helpers.py (the shared test helpers) for the files of this folder
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
if not (SIM or os.environ.get("FASTMOE_NB_CUDA_TESTS") == "1"):
    collect_ignore_glob = ["test_*.py"]
else:
    from fastmoe_nb.kernels.cuda import launch

    launch.CHECK_ARGS = True   # every launch's arguments against its kernel's signature
    if SIM:  # about 100 simulated threads a launch; every kernel is grid-stride
        launch.configure(threads=32, max_blocks=4, route_threads=4, max_k=8, plan_chunks=4,
                         plan_min_chunk=2, scan_threads=4, gemm_bm=8, gemm_bn=8, gemm_bk=4,
                         gemm_tm=2, gemm_tn=2)

    @pytest.fixture
    def rng():
        return np.random.default_rng(7)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs the CUDA kernels (simulator or GPU)")
