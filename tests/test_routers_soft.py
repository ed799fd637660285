"""Soft MoE (Puigcerver et al. 2023): dispatch / combine weights and the whole layer against
the reference, per-sequence independence, and gradients by central differences."""
import numpy as np
import pytest

import fastmoe_nb.routing as R
from fastmoe_nb.nn.gradcheck import gradcheck
from fastmoe_nb.routing import reference as rref

from helpers import assert_close


def layer(rng, T, d, h, E, p, dtype=np.float64, swiglu=False, trans_w=False):
    x = rng.standard_normal((T, d)).astype(dtype)
    phi = (rng.standard_normal((d, E * p)) / np.sqrt(d)).astype(dtype)
    H1 = 2 * h if swiglu else h
    w1 = (rng.standard_normal((E, d, H1)) / np.sqrt(d)).astype(dtype)
    w2 = (rng.standard_normal((E, h, d)) / np.sqrt(h)).astype(dtype)
    if trans_w:
        w1 = np.ascontiguousarray(w1.transpose(0, 2, 1))
        w2 = np.ascontiguousarray(w2.transpose(0, 2, 1))
    return x, phi, w1, w2


@pytest.mark.parametrize("T,S,seq_len", [(0, 3, None), (1, 1, None), (6, 4, 3), (12, 5, None),
                                         (12, 6, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_moe_weights(rng, T, S, seq_len, dtype):
    logits = (2 * rng.standard_normal((T, S))).astype(dtype)
    dispatch, combine = R.soft_moe_weights(logits, seq_len)
    rd, rc = rref.soft_moe_weights(logits, seq_len)
    assert_close(dispatch, rd)
    assert_close(combine, rc)
    m = seq_len or T
    if T:
        assert_close(combine.sum(axis=1), np.ones(T, dtype))
        assert_close(dispatch.reshape(-1, m, S).sum(axis=1), np.ones((T // m, S), dtype))


@pytest.mark.parametrize("T,d,h,E,p,seq_len,act,trans_w", [
    (0, 4, 3, 2, 1, None, "gelu", False),
    (1, 5, 3, 1, 1, None, "relu", False),
    (8, 6, 4, 3, 2, 4, "gelu", False),
    (12, 7, 5, 2, 3, 6, "swiglu", True),
    (9, 100, 8, 4, 1, None, "silu", False),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_moe_matches_reference(rng, T, d, h, E, p, seq_len, act, trans_w, dtype):
    x, phi, w1, w2 = layer(rng, T, d, h, E, p, dtype, act == "swiglu", trans_w)
    y = R.soft_moe(x, phi, w1, w2, p, act, seq_len, trans_w)
    want = rref.soft_moe(x, phi, w1, w2, p, act, seq_len, trans_w)
    assert_close(y, want, rtol=1e-4 if dtype == np.float32 else 1e-10)


def test_soft_moe_sequences_are_independent(rng):
    x, phi, w1, w2 = layer(rng, 12, 6, 4, 3, 2)
    y = R.soft_moe(x, phi, w1, w2, 2, seq_len=4)
    y1 = R.soft_moe(x[4:8], phi, w1, w2, 2)
    assert_close(y[4:8], y1, rtol=1e-12)


@pytest.mark.parametrize("seq_len,act,trans_w", [(None, "gelu", False), (2, "swiglu", True)])
def test_soft_moe_gradient(rng, seq_len, act, trans_w):
    T, d, h, E, p = 4, 3, 2, 2, 2
    x, phi, w1, w2 = layer(rng, T, d, h, E, p, np.float64, act == "swiglu", trans_w)
    _, ctx = R.soft_moe(x, phi, w1, w2, p, act, seq_len, trans_w, return_context=True)

    def backward(dy):
        dx, g = R.soft_moe_backward(dy, ctx)
        return dx, g["phi"], g["w1"], g["w2"]

    gradcheck(lambda a, b, c, e: R.soft_moe(a, b, c, e, p, act, seq_len, trans_w),
              [x, phi, w1, w2], backward, max_entries=8)


def test_soft_moe_weights_gradient(rng):
    logits = rng.standard_normal((6, 4))
    dispatch, combine = R.soft_moe_weights(logits, 3)
    gradcheck(lambda l: R.soft_moe_weights(l, 3), [logits],
              lambda d: [R.soft_moe_weights_backward(d[0], d[1], dispatch, combine, 3)])


def test_soft_moe_validation(rng):
    x, phi, w1, w2 = layer(rng, 6, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="phi"):
        R.soft_moe(x, phi, w1, w2, slots_per_expert=1)
    with pytest.raises(ValueError, match="seq_len"):
        R.soft_moe(x, phi, w1, w2, 2, seq_len=4)
    with pytest.raises(TypeError, match="phi"):
        R.soft_moe(x, phi.astype(np.float32), w1, w2, 2)
    with pytest.raises(ValueError, match="activation"):
        R.soft_moe(x, phi, w1, w2, 2, activation="tanh")
    with pytest.raises(ValueError, match="slots_per_expert"):
        R.soft_moe(x, phi, w1, w2, 0)
    keep = x.copy()
    R.soft_moe(x, phi, w1, w2, 2)
    np.testing.assert_array_equal(x, keep)
