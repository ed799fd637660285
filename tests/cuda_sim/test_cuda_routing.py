"""CUDA routers vs fastmoe_nb.reference and the CPU path: indices exactly, values ~1e-5."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.kernels.cuda import launch

from helpers import assert_close, is_device, to_device, to_host

# (T, E, k): no token, one expert, k = E, E wider than a block's threads
SHAPES = [(0, 4, 2), (1, 1, 1), (7, 5, 5), (9, 16, 3)]


def logits(rng, T, E, dtype=np.float32, ties=False):
    x = rng.standard_normal((T, E))
    return (np.round(x) if ties else x).astype(dtype)


@pytest.mark.parametrize("T,E,k", SHAPES)
def test_softmax_topk(rng, T, E, k):
    x = logits(rng, T, E, ties=T == 9)   # integer logits: ties go to the lower index
    s = fm.softmax(to_device(x))
    assert is_device(s)
    assert_close(s, ref.softmax(x))
    v, i = fm.topk(to_device(x), k)
    rv, ri = ref.topk(x, k)
    assert_close(i, ri)
    assert_close(v, rv)
    for renorm in (True, False):
        r = fm.softmax_topk(to_device(x), k, renormalize=renorm)
        want = ref.softmax_topk(x, k, renorm)
        assert_close(r.experts, want.experts)
        assert_close(r.weights, want.weights)
        cpu = fm.softmax_topk(x, k, renormalize=renorm)
        assert_close(r.experts, cpu.experts)
        assert_close(r.weights, cpu.weights)


def test_softmax_float64(rng):
    x = logits(rng, 5, 6, np.float64)
    assert_close(fm.softmax(to_device(x)), ref.softmax(x))
    r = fm.softmax_topk(to_device(x), 2)
    assert_close(r.weights, ref.softmax_topk(x, 2).weights)


@pytest.mark.parametrize("T,E,k,n_group,topk_group,with_bias", [
    (7, 8, 2, 4, 2, True), (5, 6, 3, 3, 3, False), (1, 1, 1, 1, 1, False), (6, 12, 4, 1, 1, True)])
def test_sigmoid_topk(rng, T, E, k, n_group, topk_group, with_bias):
    x = logits(rng, T, E)
    bias = (rng.standard_normal(E) * 0.5).astype(np.float32) if with_bias else None
    for renorm in (True, False):
        r = fm.sigmoid_topk(to_device(x), k, to_device(bias), n_group, topk_group, renorm, 2.5)
        want = ref.sigmoid_topk(x, k, bias, n_group, topk_group, renorm, 2.5)
        assert_close(r.experts, want.experts)
        assert_close(r.weights, want.weights)
        cpu = fm.sigmoid_topk(x, k, bias, n_group, topk_group, renorm, 2.5)
        assert_close(r.experts, cpu.experts)


def test_router_errors(rng):
    x = logits(rng, 3, 4)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="logits: expected finite"):
        fm.softmax_topk(to_device(x), 2)
    with pytest.raises(ValueError, match="x: expected finite"):
        fm.softmax(to_device(x))
    fm.softmax_topk(to_device(x), 2, check_finite=False)   # no check, no error
    bias = np.array([0, np.inf, 0, 0], np.float32)
    with pytest.raises(ValueError, match="bias: expected finite"):
        fm.sigmoid_topk(to_device(logits(rng, 3, 4)), 2, to_device(bias))
    with pytest.raises(ValueError, match="k: expected an integer in 1..E"):
        fm.topk(to_device(x), 5)
    big = logits(rng, 2, launch.CONFIG["max_k"] + 1)
    with pytest.raises(ValueError, match="k: the CUDA routers keep at most max_k"):
        fm.topk(to_device(big), launch.CONFIG["max_k"] + 1)
    with pytest.raises(TypeError, match="mixed host and device"):
        fm.sigmoid_topk(to_device(x), 2, np.zeros(4, np.float32))


def test_caller_arrays_unchanged(rng):
    x = logits(rng, 4, 6)
    d = to_device(x)
    fm.softmax_topk(d, 2)
    fm.sigmoid_topk(d, 2, n_group=2, topk_group=1)
    np.testing.assert_array_equal(to_host(d), x)
