"""softmax, topk, softmax_topk, sigmoid_topk against reference.py."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from support import assert_close

SHAPES = [(0, 4), (1, 1), (1, 8), (7, 3), (33, 16), (64, 64), (5, 100)]
DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("T,E", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax(rng, T, E, dtype):
    x = (3 * rng.standard_normal((T, E))).astype(dtype)
    y = fm.softmax(x)
    assert_close(y, ref.softmax(x))
    if T:
        assert_close(y.sum(axis=1), np.ones(T, dtype))


def test_softmax_large_logits_do_not_overflow():
    x = np.array([[1000.0, 999.0, -1000.0]], np.float32)
    assert_close(fm.softmax(x), ref.softmax(x))


@pytest.mark.parametrize("T,E", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk(rng, T, E, dtype):
    x = rng.standard_normal((T, E)).astype(dtype)
    for k in sorted({1, min(2, E), E}):
        v, i = fm.topk(x, k)
        rv, ri = ref.topk(x, k)
        assert i.dtype == np.int32 and i.shape == (T, k)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v, rv)


def test_topk_ties_go_to_the_lower_index():
    x = np.array([[1, 3, 3, 0, 3, 1]], np.float32)
    v, i = fm.topk(x, 5)
    assert i.tolist() == [[1, 2, 4, 0, 5]]
    assert v.tolist() == [[3, 3, 3, 1, 1]]
    # integer-valued rows with many ties
    x = np.random.default_rng(0).integers(0, 3, (50, 9)).astype(np.float32)
    np.testing.assert_array_equal(fm.topk(x, 4)[1], ref.topk(x, 4)[1])


@pytest.mark.parametrize("T,E", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(rng, T, E, dtype, renormalize):
    logits = (2 * rng.standard_normal((T, E))).astype(dtype)
    for k in sorted({1, min(2, E), E}):
        r = fm.softmax_topk(logits, k, renormalize=renormalize)
        rr = ref.softmax_topk(logits, k, renormalize=renormalize)
        assert isinstance(r, fm.Routing)
        np.testing.assert_array_equal(r.experts, rr.experts)
        assert_close(r.weights, rr.weights)
        if T and renormalize:
            assert_close(r.weights.sum(axis=1), np.ones(T, dtype))


def test_softmax_topk_k_equals_e_renormalized_is_softmax(rng):
    logits = rng.standard_normal((9, 6)).astype(np.float32)
    r = fm.softmax_topk(logits, 6, renormalize=False)
    p = fm.softmax(logits)
    assert_close(np.take_along_axis(p, r.experts, 1), r.weights)


SIGMOID_CASES = [  # (E, k, n_group, topk_group)
    (8, 2, 1, 1), (8, 8, 1, 1), (1, 1, 1, 1), (16, 4, 4, 2), (16, 3, 8, 3), (12, 6, 4, 2),
    (6, 2, 6, 2),  # groups of one expert: a group is scored by its single value
]


@pytest.mark.parametrize("E,k,n_group,topk_group", SIGMOID_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_sigmoid_topk(rng, E, k, n_group, topk_group, dtype, use_bias):
    T = 41
    logits = rng.standard_normal((T, E)).astype(dtype)
    bias = (0.3 * rng.standard_normal(E)).astype(dtype) if use_bias else None
    for renorm, scale in [(True, 2.5), (False, 1.0)]:
        r = fm.sigmoid_topk(logits, k, bias, n_group, topk_group, renorm, scale)
        rr = ref.sigmoid_topk(logits, k, bias, n_group, topk_group, renorm, scale)
        np.testing.assert_array_equal(r.experts, rr.experts)
        assert_close(r.weights, rr.weights)


def test_sigmoid_topk_bias_chooses_but_does_not_weight():
    logits = np.array([[2.0, 0.0, -1.0, 1.0]], np.float32)
    bias = np.array([0.0, 5.0, 0.0, 0.0], np.float32)
    r = fm.sigmoid_topk(logits, 2, bias=bias, renormalize=False)
    assert r.experts.tolist() == [[1, 0]]  # expert 1 chosen only through the bias
    s = 1 / (1 + np.exp(-logits[0].astype(np.float64)))
    np.testing.assert_allclose(r.weights[0], s[[1, 0]], rtol=1e-6)


def test_sigmoid_topk_group_masking_by_hand():
    # 4 experts in 2 groups; group 0 = {0, 1} scores s0 + s1, group 1 = {2, 3}.
    # The single best expert (3) is in the group with the lower top-2 sum: it must be masked.
    logits = np.array([[1.0, 1.0, -3.0, 2.0]], np.float64)
    r = fm.sigmoid_topk(logits, 2, n_group=2, topk_group=1)
    assert r.experts.tolist() == [[0, 1]]
    r1 = fm.sigmoid_topk(logits, 2, n_group=1)
    assert r1.experts.tolist() == [[3, 0]]


def test_sigmoid_topk_underflow_gives_zero_not_nan():
    logits = np.full((2, 4), -200.0, np.float32)
    r = fm.sigmoid_topk(logits, 2)
    assert np.isfinite(r.weights).all()
