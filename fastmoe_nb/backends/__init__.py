"""The host side of each backend: backends/cpu.py over kernels/cpu, backends/cuda.py over
kernels/cuda. The ops validate, then call the backend of their arrays (get); a backend trusts
what it is given."""
from ..backend import CUDA
from . import cpu


def cuda_module():
    """The CUDA backend (backends/cuda.py); the one clear error when CUDA cannot run here."""
    from ..kernels import cuda as kc  # noqa: PLC0415  (numba.cuda is heavy: on first use)
    kc.require()
    from . import cuda  # noqa: PLC0415
    return cuda


def get(be):
    """The backend module for backend_of's answer."""
    return cuda_module() if be == CUDA else cpu
