"""Kernels: kernels/cpu (@njit) and kernels/cuda (@cuda.jit), one file per op family, and the
per-element maths both targets share (common.py)."""
