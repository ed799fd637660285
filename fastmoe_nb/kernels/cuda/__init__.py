"""@cuda.jit kernels, mirroring kernels/cpu/ file by file (see the CUDA backend issue)."""


def require():
    """The one clear error for a device array when the CUDA backend cannot run."""
    raise RuntimeError("fastmoe_nb: a CUDA array was passed, but this build of fastmoe_nb has "
                       "no CUDA backend yet; pass NumPy arrays to run on the CPU")
