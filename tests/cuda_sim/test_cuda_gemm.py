"""CUDA grouped GEMM (tiled, one scheduler over all experts' tiles, activation epilogue), its
backward, the dense matmul and the activations, vs the reference and the CPU path."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.backends import cuda as kc
from fastmoe_nb.kernels.common import ACTIVATION_CODES

from helpers import assert_close, to_device


def offsets_of(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# (counts per expert, K, M): empty experts, E = 1, rows and sizes off the 8x8x4 tiles
CASES = [([0, 13, 0, 5], 10, 9), ([1], 3, 2), ([0, 0], 4, 6), ([9, 17, 2], 5, 16)]


@pytest.mark.parametrize("counts,K,M", CASES)
@pytest.mark.parametrize("trans_w", [False, True])
def test_grouped_gemm_and_backward(rng, counts, K, M, trans_w):
    o = offsets_of(counts)
    N, E = int(o[-1]), len(counts)
    a = rng.standard_normal((N, K)).astype(np.float32)
    w = rng.standard_normal((E, M, K) if trans_w else (E, K, M)).astype(np.float32)
    out = fm.grouped_gemm(to_device(a), to_device(w), to_device(o), trans_w=trans_w)
    assert_close(out, ref.grouped_gemm(a, w, o, trans_w))
    assert_close(fm.grouped_gemm(to_device(a), to_device(w), o, trans_w=trans_w),
                 fm.grouped_gemm(a, w, o, trans_w))
    dy = rng.standard_normal((N, M)).astype(np.float32)
    da, dw = fm.grouped_gemm_backward(*map(to_device, (dy, a, w, o)), trans_w)
    ca, cw = fm.grouped_gemm_backward(dy, a, w, o, trans_w)
    assert_close(da, ca)
    assert_close(dw, cw)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
def test_epilogue_and_activate(rng, activation):
    counts, K, H = [5, 0, 11], 6, 10
    o = offsets_of(counts)
    a = rng.standard_normal((16, K)).astype(np.float32)
    w = rng.standard_normal((3, K, H)).astype(np.float32)
    h = ref.grouped_gemm(a, w, o)
    want = ref.activate(h, activation)
    code = ACTIVATION_CODES[activation]
    assert_close(kc.grouped_gemm(to_device(a), to_device(w), o, False, code), want)   # fused
    assert_close(fm.activate(to_device(h), activation), want)
    dy = rng.standard_normal(want.shape).astype(np.float32)
    assert_close(fm.activate_backward(to_device(dy), to_device(h), activation),
                 fm.activate_backward(dy, h, activation))


def test_float64_and_matmul_layouts(rng):
    a = rng.standard_normal((7, 5))
    w = rng.standard_normal((2, 5, 3))
    o = offsets_of([3, 4])
    assert_close(fm.grouped_gemm(to_device(a), to_device(w), o), ref.grouped_gemm(a, w, o))
    b = rng.standard_normal((5, 6)).astype(np.float32)
    a32 = a.astype(np.float32)
    want = (a32.astype(np.float64) @ b).astype(np.float32)
    assert_close(kc.matmul(to_device(a32), to_device(b)), want)
    bt = to_device(np.ascontiguousarray(b.T)).T                       # F-contiguous: no copy
    assert_close(kc.matmul(to_device(a32), bt), want)
    assert_close(kc.matmul(to_device(a32).T, to_device(a32)),
                 (a32.T.astype(np.float64) @ a32).astype(np.float32))


def test_gemm_errors(rng):
    a = to_device(np.zeros((5, 4), np.float32))
    w = to_device(np.zeros((2, 4, 3), np.float32))
    with pytest.raises(ValueError, match="offsets: expected non-decreasing offsets from 0 to N"):
        fm.grouped_gemm(a, w, to_device(np.array([0, 3, 4], np.int64)))
    with pytest.raises(ValueError, match="offsets: expected non-decreasing"):
        fm.grouped_gemm(a, w, np.array([0, 4, 3, 5][:3], np.int64))
    with pytest.raises(ValueError, match=r"w: expected shape \(E, K, M\) with K = a.shape\[1\]"):
        fm.grouped_gemm(a, to_device(np.zeros((2, 3, 4), np.float32)), np.array([0, 2, 5]))
    with pytest.raises(TypeError, match="w: expected dtype float32"):
        fm.grouped_gemm(a, to_device(np.zeros((2, 4, 3))), np.array([0, 2, 5]))
