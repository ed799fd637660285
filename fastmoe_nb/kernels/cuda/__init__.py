"""@cuda.jit kernels, mirroring kernels/cpu/ file by file: routing.py, dispatch.py, gemm.py,
activations.py; launch.py holds the launch configuration. Their host side (launches, device
checks) is fastmoe_nb/backends/cuda.py.

Importing this package does not import numba.cuda; `require()` does, and gives the one clear
error when CUDA cannot run here.
"""

# the expert weight formats (fastmoe_nb.formats) the CUDA grouped GEMM reads: f32 / f64 as
# plain arrays, the others decoded in its weight loads (gemm.LOADS)
WEIGHT_FORMATS = ("f32", "f64", "bf16", "q8_0", "q4_0")


def require():
    """Raise the one clear error when a device array cannot be run on: numba-cuda missing, or
    no usable GPU / driver (and the simulator, NUMBA_ENABLE_CUDASIM=1, not enabled)."""
    try:
        from numba import cuda  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise RuntimeError("fastmoe_nb: a CUDA array was passed, but numba's CUDA target is not "
                           "installed; pip install 'fastmoe-nb[cuda]' (numba-cuda), or pass "
                           "NumPy arrays to run on the CPU") from e
    if not cuda.is_available():
        raise RuntimeError("fastmoe_nb: a CUDA array was passed, but no CUDA GPU or driver is "
                           "usable here (numba.cuda.is_available() is False); pass NumPy "
                           "arrays to run on the CPU, or set NUMBA_ENABLE_CUDASIM=1 before "
                           "importing numba to run the CUDA kernels in the simulator")

