"""softmax, topk, softmax_topk, sigmoid_topk and their backwards: against reference.py and
float64 central differences on the shape table (routers read (T, E) and k), by hand, their
invariants (hypothesis), bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.nn.gradcheck import gradcheck

from helpers import SHAPES, Shape, assert_close, assert_unchanged, check_op, snapshot

DTYPES = [np.float32, np.float64]
# the shape table, and wider routers: 16, 64 and 100 experts
CASES = list(SHAPES.values()) + [Shape(33, 8, 4, 16, 4), Shape(64, 8, 4, 64, 2),
                                 Shape(5, 8, 4, 100, 6)]


def _logits(scale):
    def make(rng, shape, dtype):
        return [(scale * rng.standard_normal((shape.T, shape.E))).astype(dtype)]
    return make


def _ks(shape):
    """The k of the shape, 1, and E."""
    return sorted({shape.k, 1, shape.E})


SOFTMAX = (fm.softmax, lambda dy, x: [fm.softmax_backward(dy, fm.softmax(x))])
SOFTMAX_REF = (ref.softmax, lambda dy, x: [ref.softmax_backward(dy, ref.softmax(x))])


def test_softmax_and_its_backward():
    assert check_op(SOFTMAX, SOFTMAX_REF, _logits(3.0), CASES) > 0


@pytest.mark.parametrize("shape", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_sum_to_one(rng, shape, dtype):
    y = fm.softmax((3 * rng.standard_normal((shape.T, shape.E))).astype(dtype))
    assert_close(y.sum(axis=1), np.ones(shape.T, dtype))


def test_softmax_large_logits_do_not_overflow():
    x = np.array([[1000.0, 999.0, -1000.0]], np.float32)
    assert_close(fm.softmax(x), ref.softmax(x))


@pytest.mark.parametrize("shape", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk(rng, shape, dtype):
    x = rng.standard_normal((shape.T, shape.E)).astype(dtype)
    for k in _ks(shape):
        v, i = fm.topk(x, k)
        assert i.dtype == np.int32 and i.shape == (shape.T, k)
        assert_close((v, i), ref.topk(x, k), rtol=0)          # a selection is exact


def test_topk_ties_go_to_the_lower_index():
    x = np.array([[1, 3, 3, 0, 3, 1]], np.float32)
    v, i = fm.topk(x, 5)
    assert i.tolist() == [[1, 2, 4, 0, 5]]
    assert v.tolist() == [[3, 3, 3, 1, 1]]
    # integer-valued rows with many ties
    x = np.random.default_rng(0).integers(0, 3, (50, 9)).astype(np.float32)
    np.testing.assert_array_equal(fm.topk(x, 4)[1], ref.topk(x, 4)[1])


# --------------------------------------------------------------------------- softmax_topk

def _softmax_topk_inputs(k_of, renormalize):
    def make(rng, shape, dtype):
        return [(2 * rng.standard_normal((shape.T, shape.E))).astype(dtype),
                k_of(shape), renormalize]
    return make


def _routing_backward(router, backward, *extra):
    """backward(dy, logits, k, ...) of a router -> [d_logits, None, ...]: dy = (d_weights,
    None), the experts not differentiated."""
    def grads(dy, logits, k, *opts):
        r = router(logits, k, *opts)
        return [backward(dy[0], logits, r.experts, *[opts[i] for i in extra])] + [None] * (
            1 + len(opts))
    return grads


SOFTMAX_TOPK = (fm.softmax_topk, _routing_backward(fm.softmax_topk, fm.softmax_topk_backward, 0))
SOFTMAX_TOPK_REF = (ref.softmax_topk,
                    _routing_backward(ref.softmax_topk, ref.softmax_topk_backward, 0))
K_OF = {"k": lambda s: s.k, "1": lambda s: 1, "E": lambda s: s.E}


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", list(K_OF))
def test_softmax_topk_and_its_backward(k, renormalize):
    """Experts exactly, weights and d_logits to rounding (k = 1 and k = E on every shape)."""
    assert check_op(SOFTMAX_TOPK, SOFTMAX_TOPK_REF, _softmax_topk_inputs(K_OF[k], renormalize),
                    CASES) > 0


@pytest.mark.parametrize("shape", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_topk_renormalized_weights_and_their_gradient(rng, shape, dtype):
    """Renormalized weights sum to 1; they are a softmax over the k chosen logits, so nothing
    else gets gradient."""
    logits = (2 * rng.standard_normal((shape.T, shape.E))).astype(dtype)
    r = fm.softmax_topk(logits, shape.k)
    assert_close(r.weights.sum(axis=1), np.ones(shape.T, dtype))
    d = fm.softmax_topk_backward(rng.standard_normal(r.weights.shape).astype(dtype), logits,
                                 r.experts)
    off = np.ones(logits.shape, bool)
    np.put_along_axis(off, r.experts.astype(np.int64), False, axis=1)
    assert not d[off].any()


def test_softmax_topk_k_equals_e_renormalized_is_softmax(rng):
    logits = rng.standard_normal((9, 6)).astype(np.float32)
    r = fm.softmax_topk(logits, 6, renormalize=False)
    p = fm.softmax(logits)
    assert_close(np.take_along_axis(p, r.experts, 1), r.weights)


# --------------------------------------------------------------------------- sigmoid_topk

def _sigmoid_inputs(k_of, use_bias, groups, renormalize, scale):
    def make(rng, shape, dtype):
        logits = (2 * rng.standard_normal((shape.T, shape.E))).astype(dtype)
        bias = (0.3 * rng.standard_normal(shape.E)).astype(dtype) if use_bias else None
        return [logits, k_of(shape), bias, *groups, renormalize, scale]
    return make


# sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale): backward takes
# renormalize and scale (opts 3 and 4 after k); the bias only chooses and gets no gradient
SIGMOID = (fm.sigmoid_topk, _routing_backward(fm.sigmoid_topk, fm.sigmoid_topk_backward, 3, 4))
SIGMOID_REF = (ref.sigmoid_topk,
               _routing_backward(ref.sigmoid_topk, ref.sigmoid_topk_backward, 3, 4))


@pytest.mark.parametrize("renormalize,scale", [(True, 1.0), (False, 2.5), (True, 2.5)])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("k", ["k", "E"])
def test_sigmoid_topk_and_its_backward(k, use_bias, renormalize, scale):
    assert check_op(SIGMOID, SIGMOID_REF,
                    _sigmoid_inputs(K_OF[k], use_bias, (1, 1), renormalize, scale), CASES) > 0


def test_sigmoid_topk_renormalized_k1_gradient_is_zero(rng):
    """w = s / (s + 1e-20) = 1 to rounding: the true gradient is ~1e-20, and so is the
    kernel's (float32 too, where assert_close's floor would allow 1e-5)."""
    for dtype in DTYPES:
        logits = (2 * rng.standard_normal((17, 5))).astype(dtype)
        r = fm.sigmoid_topk(logits, 1)
        got = fm.sigmoid_topk_backward(rng.standard_normal((17, 1)).astype(dtype), logits,
                                       r.experts)
        assert got.dtype == dtype and np.abs(got).max() <= 1e-12


SIGMOID_CASES = [  # (E, k, n_group, topk_group)
    (8, 2, 1, 1), (8, 8, 1, 1), (1, 1, 1, 1), (16, 4, 4, 2), (16, 3, 8, 3), (12, 6, 4, 2),
    (6, 2, 6, 2),  # groups of one expert: a group is scored by its single value
]


@pytest.mark.parametrize("E,k,n_group,topk_group", SIGMOID_CASES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_sigmoid_topk_groups(E, k, n_group, topk_group, use_bias):
    """DeepSeek-V3's group-limited choice, forward and backward, 41 tokens."""
    for renormalize, scale in [(True, 2.5), (False, 1.0)]:
        check_op(SIGMOID, SIGMOID_REF,
                 _sigmoid_inputs(lambda s: k, use_bias, (n_group, topk_group), renormalize,
                                 scale), [Shape(41, 8, 4, E, k)])


@pytest.mark.parametrize("renormalize,scale", [(True, 1.0), (False, 1.0), (True, 2.5)])
def test_sigmoid_topk_gradcheck_bias_and_groups_get_none(rng, renormalize, scale):
    """The bias only chooses: central differences through it are exactly 0."""
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


# --------------------------------------------------------------------------- invariants

@settings(max_examples=60, deadline=None)
@given(T=st.integers(0, 12), E=st.integers(1, 12), data=st.data(),
       router=st.sampled_from(["softmax_topk", "sigmoid_topk"]), renormalize=st.booleans(),
       dtype=st.sampled_from(DTYPES), ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_router_properties(T, E, data, router, renormalize, dtype, ties, seed):
    """Any shape, also with tied logits: experts (T, k) int32, distinct per token, ordered by
    choice (best first, ties to the lower index) as the reference's; weights and d_logits as
    the reference's; the inputs untouched."""
    k = data.draw(st.integers(1, E))
    r = np.random.default_rng(seed)
    logits = r.standard_normal((T, E)) * 2
    logits = (np.round(logits) if ties else logits).astype(dtype)
    dw = r.standard_normal((T, k)).astype(dtype)
    before = snapshot([logits, dw])
    fwd, bwd = ((fm.softmax_topk, fm.softmax_topk_backward), (ref.softmax_topk,
                ref.softmax_topk_backward)) if router == "softmax_topk" else (
        (fm.sigmoid_topk, fm.sigmoid_topk_backward), (ref.sigmoid_topk,
                                                      ref.sigmoid_topk_backward))
    got = fwd[0](logits, k, renormalize=renormalize)
    want = bwd[0](logits, k, renormalize=renormalize)
    assert got.experts.dtype == np.int32 and got.experts.shape == (T, k)
    assert all(len(set(row)) == k for row in got.experts.tolist())
    assert_close(got, want)
    assert_close(fwd[1](dw, logits, got.experts, renormalize),
                 bwd[1](dw, logits, got.experts, renormalize))
    assert_unchanged([logits, dw], before)


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(["softmax", "topk", "softmax_topk", "sigmoid_topk"]),
       shape=st.sampled_from([(4,), (2, 3, 4)]))
def test_routers_name_their_argument_for_a_wrong_rank(op, shape):
    args = (2,) if op != "softmax" else ()
    name = "x" if op in ("softmax", "topk") else "logits"
    with pytest.raises(ValueError, match=f"^{name}: expected a 2-D array"):
        getattr(fm, op)(np.zeros(shape, np.float32), *args)


# --------------------------------------------------------------------------- bad input

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
