"""Backend choice, in one place.

An input with ``__cuda_array_interface__`` (Numba device arrays, CuPy, PyTorch CUDA tensors)
runs the CUDA kernels and gets device arrays back; anything else runs on the CPU and gets NumPy
arrays back. Mixing host and device inputs in one call is an error.
"""
from __future__ import annotations

import numpy as np

CPU = "cpu"
CUDA = "cuda"


def is_device_array(a) -> bool:
    # __cuda_ndarray__: Numba's device arrays, including the simulator's (which lack the
    # interface); a weight in a format lives where its blocks are
    if type(a) is np.ndarray:            # the common case, first: a host call's inputs
        return False
    from .formats import QuantizedWeights  # noqa: PLC0415  (formats may come to import this)

    if isinstance(a, QuantizedWeights):
        a = a.blocks
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def backend_of(**named) -> str:
    """The backend of a call from its array arguments (None entries are ignored)."""
    kinds = {n: (CUDA if is_device_array(a) else CPU) for n, a in named.items() if a is not None}
    found = set(kinds.values())
    if len(found) > 1:
        host = sorted(n for n, b in kinds.items() if b == CPU)
        dev = sorted(n for n, b in kinds.items() if b == CUDA)
        raise TypeError(f"mixed host and device arrays: {', '.join(dev)} on the GPU but "
                        f"{', '.join(host)} on the host; move them to one side")
    return found.pop() if found else CPU


def as_host(name, a):
    """A NumPy view of a host array-like (NumPy, or anything with __array__), without a copy
    where the memory allows."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__array__") or hasattr(a, "__array_interface__"):
        return np.asarray(a)
    raise TypeError(f"{name}: expected an array, got {type(a).__name__}")


def to_host(a):
    """A host (NumPy) copy of a device array (any __cuda_array_interface__ array); host
    arrays as they are."""
    if is_device_array(a) and not hasattr(a, "copy_to_host"):
        from numba import cuda  # noqa: PLC0415  (only with a device array: numba.cuda is heavy)
        a = cuda.as_cuda_array(a)
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)

