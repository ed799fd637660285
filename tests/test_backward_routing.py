"""softmax_backward, softmax_topk_backward, sigmoid_topk_backward: against reference.py and
against float64 central differences (nn.gradcheck)."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.nn.gradcheck import gradcheck

from support import assert_close

# (T, E, k): T=0, T=1, E=1 k=1, k=E, odd sizes
SHAPES = [(0, 4, 2), (1, 1, 1), (1, 8, 8), (7, 3, 2), (33, 16, 4), (5, 100, 6)]
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-4, np.float64: 1e-12}


def _data(rng, T, E, k, dtype):
    logits = (2 * rng.standard_normal((T, E))).astype(dtype)
    d_weights = rng.standard_normal((T, k)).astype(dtype)
    return logits, d_weights


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_backward_matches_reference(rng, T, E, k, dtype):
    y = fm.softmax((2 * rng.standard_normal((T, E))).astype(dtype))
    dy = rng.standard_normal((T, E)).astype(dtype)
    assert_close(fm.softmax_backward(dy, y), ref.softmax_backward(dy, y), rtol=RTOL[dtype])


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_backward_matches_reference(rng, T, E, k, dtype, renormalize):
    logits, dw = _data(rng, T, E, k, dtype)
    r = fm.softmax_topk(logits, k, renormalize)
    got = fm.softmax_topk_backward(dw, logits, r.experts, renormalize)
    assert_close(got, ref.softmax_topk_backward(dw, logits, r.experts, renormalize),
                 rtol=RTOL[dtype])
    if renormalize and T:   # weights a softmax over the k chosen: nothing else gets gradient
        off = np.ones((T, E), bool)
        np.put_along_axis(off, r.experts.astype(np.int64), False, axis=1)
        assert not got[off].any()


@pytest.mark.parametrize("T,E,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize,scale", [(True, 1.0), (False, 2.5), (True, 2.5)])
def test_sigmoid_topk_backward_matches_reference(rng, T, E, k, dtype, renormalize, scale):
    logits, dw = _data(rng, T, E, k, dtype)
    r = fm.sigmoid_topk(logits, k, renormalize=renormalize, scale=scale)
    got = fm.sigmoid_topk_backward(dw, logits, r.experts, renormalize, scale)
    want = ref.sigmoid_topk_backward(dw, logits, r.experts, renormalize, scale)
    if renormalize and k == 1:   # w = s / (s + 1e-20): the true gradient is ~1e-20
        assert got.dtype == want.dtype and np.abs(got).max(initial=0) <= 1e-12
    else:
        assert_close(got, want, rtol=RTOL[dtype])


# ----------------------------------------------------------------- float64 central differences

def test_softmax_gradcheck(rng):
    x = rng.standard_normal((4, 5))
    y = fm.softmax(x)
    gradcheck(fm.softmax, [x], lambda dy: [fm.softmax_backward(dy, y)])


@pytest.mark.parametrize("E,k", [(1, 1), (5, 2), (4, 4)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_gradcheck(rng, E, k, renormalize):
    logits = 2 * rng.standard_normal((4, E))
    r = fm.softmax_topk(logits, k, renormalize)
    # fn returns Routing(weights, experts): the int experts are not differentiated
    errs = gradcheck(lambda l: fm.softmax_topk(l, k, renormalize), [logits],
                     lambda dys: [fm.softmax_topk_backward(dys[0], logits, r.experts,
                                                           renormalize)])
    assert errs[0] <= 1e-6


@pytest.mark.parametrize("renormalize,scale", [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_sigmoid_topk_gradcheck_bias_and_groups_get_none(rng, renormalize, scale):
    E, k = 8, 3
    logits = 2 * rng.standard_normal((5, E))
    bias = 0.3 * rng.standard_normal(E)
    opts = dict(n_group=4, topk_group=2, renormalize=renormalize, scale=scale)
    r = fm.sigmoid_topk(logits, k, bias, **opts)

    def backward(dys):
        d = fm.sigmoid_topk_backward(dys[0], logits, r.experts, renormalize, scale)
        return [d, np.zeros_like(bias)]   # the bias only chooses: its true gradient is 0

    errs = gradcheck(lambda l, b: fm.sigmoid_topk(l, k, b, **opts), [logits, bias], backward)
    assert errs[0] <= 1e-6 and errs[1] == 0.0


# ----------------------------------------------------------------- bad input

def test_routing_backward_rejects_bad_input():
    logits = np.zeros((3, 4), np.float32)
    dw = np.zeros((3, 2), np.float32)
    good = np.array([[0, 1], [2, 3], [1, 0]], np.int32)
    with pytest.raises(ValueError, match="experts: expected expert ids"):
        fm.softmax_topk_backward(dw, logits, good + 2)
    with pytest.raises(ValueError, match="experts: expected distinct"):
        fm.sigmoid_topk_backward(dw, logits, np.array([[0, 0], [2, 3], [1, 0]]))
    with pytest.raises(ValueError, match=r"experts: expected shape \(3, k\)"):
        fm.softmax_topk_backward(dw, logits, good[:2])
    with pytest.raises(TypeError, match="d_weights: expected dtype float32"):
        fm.softmax_topk_backward(dw.astype(np.float64), logits, good)
    with pytest.raises(ValueError, match=r"d_weights: expected shape \(3, 2\)"):
        fm.sigmoid_topk_backward(dw[:, :1], logits, good)
    with pytest.raises(TypeError, match="experts: expected an integer array"):
        fm.softmax_topk_backward(dw, logits, good.astype(np.float32))
    with pytest.raises(ValueError, match=r"dy: expected shape \(3, 4\)"):
        fm.softmax_backward(dw, logits)
