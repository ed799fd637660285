"""The host side of each backend: backends/cpu.py over kernels/cpu, backends/cuda.py over
kernels/cuda. The ops validate, then call the backend of their arrays (get); a backend trusts
what it is given."""
from ..backend import CUDA, cuda_module
from . import cpu


def get(be):
    """The backend module for backend_of's answer (CUDA: the one clear error if it cannot
    run here)."""
    return cuda_module() if be == CUDA else cpu
