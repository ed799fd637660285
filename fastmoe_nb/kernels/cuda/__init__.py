"""@cuda.jit kernels, mirroring kernels/cpu/ file by file: routing.py, dispatch.py, gemm.py,
activations.py; launch.py holds the launch configuration, host.py the wrappers the ops call.

Importing this package does not import numba.cuda; `require()` does, and gives the one clear
error when CUDA cannot run here. The wrappers (softmax, make_plan, grouped_gemm, ...) are
loaded on first use.
"""

_HOST = ("softmax", "topk", "softmax_topk", "sigmoid_topk", "make_plan", "permute", "combine",
         "activate", "sigmoid", "add_rows", "grouped_gemm", "matmul", "softmax_backward",
         "softmax_topk_backward", "sigmoid_topk_backward", "permute_backward",
         "combine_backward", "activate_backward", "grouped_gemm_backward", "shared_backward",
         "scale_rows", "rowdot_gate", "column_sums", "dev")


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


def __getattr__(name):
    if name in _HOST:
        from . import host  # noqa: PLC0415

        return getattr(host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
