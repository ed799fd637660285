"""Arrays across the framework boundary, without copies where the memory allows.

In: `as_array` turns a PyTorch tensor, a JAX array, a CuPy / Numba device array or anything
with `__array__` into what fastmoe_nb's ops take — a NumPy array over the same host memory, or
the device object itself (its `__cuda_array_interface__` selects the CUDA backend). A tensor
that requires grad is detached first (fastmoe_nb computes its own gradients). JAX arrays come
back read-only; fastmoe_nb never writes into its inputs, so that costs nothing, and
`writable=True` copies only then.

Out: `to_torch` hands a NumPy or device array to PyTorch over the same memory (DLPack /
`__cuda_array_interface__`); a read-only NumPy array is the one case that is copied.

Framework imports are lazy: this module never imports torch or jax itself.
"""
from __future__ import annotations

import sys

import numpy as np


def _is_torch_tensor(a) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def _torch_as_array(name, t):
    """A torch tensor (any requires_grad) -> NumPy view (CPU) or the detached tensor (CUDA)."""
    t = t.detach()
    if t.device.type == "cuda":
        return t                               # __cuda_array_interface__: the CUDA backend
    if t.device.type != "cpu":
        raise TypeError(f"{name}: expected a CPU or CUDA tensor, got one on {t.device}")
    try:
        return np.from_dlpack(t)
    except (RuntimeError, BufferError, TypeError) as e:
        raise TypeError(f"{name}: expected a tensor NumPy can view (float32, float64 or an "
                        f"integer dtype), got {t.dtype}") from e


def as_array(a, name="a", writable=False):
    """A framework's array -> a NumPy array over the same host memory, or the device array
    itself (anything with __cuda_array_interface__), with no copy.

    Torch tensors are detached (requires_grad is fine); JAX arrays come back read-only, and
    only `writable=True` copies them (a read-only host view is the one case that copies)."""
    if _is_torch_tensor(a):
        out = _torch_as_array(name, a)
    elif isinstance(a, np.ndarray) or hasattr(a, "__cuda_array_interface__"):
        out = a
    elif hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        out = np.from_dlpack(a)                  # JAX CPU arrays, array-API libraries
    elif hasattr(a, "__array__") or hasattr(a, "__array_interface__"):
        out = np.asarray(a)
    else:
        raise TypeError(f"{name}: expected an array (NumPy, PyTorch, JAX, or a CUDA array), "
                        f"got {type(a).__name__}")
    if writable and isinstance(out, np.ndarray) and not out.flags.writeable:
        out = out.copy()
    return out


def to_torch(a, device=None):
    """A fastmoe_nb result (NumPy or CUDA device array) -> a torch.Tensor over the same memory.

    A read-only NumPy array (e.g. a view of a JAX array) is copied, since torch tensors are
    always writable; device arrays stay on their GPU. `device` moves the result if given."""
    import torch  # noqa: PLC0415  (optional dependency)

    if isinstance(a, torch.Tensor):
        t = a
    elif isinstance(a, np.ndarray):
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    elif hasattr(a, "__cuda_array_interface__"):
        t = torch.as_tensor(a, device="cuda")
    else:
        return to_torch(as_array(a, "a"), device)
    return t if device is None else t.to(device)


__all__ = ["as_array", "to_torch"]
