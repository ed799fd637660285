"""Noisy top-k gating (Shazeer et al. 2017): the reference, seeded determinism, the smooth
load, cv^2 and the gradients of gates, load and the balancing loss by central differences."""
import numpy as np
import pytest

import fastmoe_nb.routing as R
from fastmoe_nb.nn.gradcheck import gradcheck
from fastmoe_nb.routing import reference as rref

from helpers import assert_close


def inputs(rng, T, E, dtype=np.float64):
    clean = rng.standard_normal((T, E)).astype(dtype)
    raw = rng.standard_normal((T, E)).astype(dtype)
    return clean, raw


@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 1, 1), (1, 3, 2), (7, 3, 3), (33, 8, 2),
                                   (64, 16, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noisy_topk_matches_reference(rng, T, E, k, dtype):
    clean, raw = inputs(rng, T, E, dtype)
    for train in (True, False):
        r, load = R.noisy_topk(clean, raw, k, train=train, seed=4)
        rr, rload = rref.noisy_topk(clean, raw, k, train=train, seed=4)
        np.testing.assert_array_equal(r.experts, rr.experts)
        assert_close(r.weights, rr.weights)
        assert_close(load, rload, rtol=1e-5 if dtype == np.float32 else 1e-11)
        assert load.shape == (E,) and load.dtype == dtype


def test_noisy_topk_is_seeded_and_noise_overrides_the_seed(rng):
    clean, raw = inputs(rng, 40, 6)
    a = R.noisy_topk(clean, raw, 2, seed=1)
    b = R.noisy_topk(clean, raw, 2, seed=1)
    c = R.noisy_topk(clean, raw, 2, seed=2)
    np.testing.assert_array_equal(a[0].experts, b[0].experts)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0].experts, c[0].experts)
    noise = np.random.default_rng(1).standard_normal((40, 6))
    d = R.noisy_topk(clean, raw, 2, noise=noise, seed=99)
    np.testing.assert_array_equal(a[0].experts, d[0].experts)
    # evaluation: no noise, the plain softmax top-k of the clean logits, load = counts
    r, load = R.noisy_topk(clean, None, 2, train=False)
    np.testing.assert_array_equal(r.experts, np.argsort(-clean, axis=1, kind="stable")[:, :2])
    assert load.sum() == 80 and (load == np.bincount(r.experts.ravel(), minlength=6)).all()


def test_smooth_load_estimates_the_expected_count():
    # E[load] over the noise is the expected number of tokens in each expert's top k: each term
    # is the probability over the expert's own noise, given the others' draw
    rng = np.random.default_rng(0)
    T, E, k = 200, 5, 2
    clean = rng.standard_normal((T, E))
    raw = rng.standard_normal((T, E)) - 1.0
    load = sum(R.noisy_topk(clean, raw, k, seed=s)[1] for s in range(100)) / 100
    counts = sum(np.bincount(R.noisy_topk(clean, raw, k, seed=1000 + s)[0].experts.ravel(),
                             minlength=E) for s in range(200)) / 200
    assert_close(load, counts, rtol=0.03)
    assert load.sum() == pytest.approx(T * k, rel=0.01)


def test_cv_squared_hand_values_and_gradient(rng):
    assert R.cv_squared(np.array([1.0, 3.0])) == pytest.approx(0.25, rel=1e-9)
    assert R.cv_squared(np.array([2.0, 2.0, 2.0])) == pytest.approx(0.0, abs=1e-12)
    assert R.cv_squared(np.zeros(4)) == 0.0
    assert R.cv_squared(np.array([0.0, 0.0, 6.0])) == pytest.approx(2.0, rel=1e-9)
    x = rng.random(6) + 0.5
    assert R.cv_squared(x) == pytest.approx(rref.cv_squared(x), rel=1e-12)
    gradcheck(lambda v: np.array(R.cv_squared(v)), [x],
              lambda d: [R.cv_squared_backward(float(d), x)])


@pytest.mark.parametrize("T,E,k", [(6, 4, 1), (7, 5, 2), (5, 3, 3)])
def test_noisy_topk_gradient_of_gates_and_load(rng, T, E, k):
    clean, raw = inputs(rng, T, E)
    noise = rng.standard_normal((T, E))

    def fn(c, r):
        routing, load = R.noisy_topk(c, r, k, noise=noise)
        return routing.weights, load

    gradcheck(fn, [clean, raw],
              lambda d: R.noisy_topk_backward(d[0], d[1], clean, raw, k, noise=noise),
              max_entries=16)
    # evaluation: gates only, no gradient into the noise scale
    dc, dr = R.noisy_topk_backward(np.ones((T, k)), np.ones(E), clean, None, k, train=False)
    assert (dr == 0).all()
    gradcheck(lambda c: R.noisy_topk(c, None, k, train=False)[0].weights, [clean],
              lambda d: [R.noisy_topk_backward(d, None, clean, None, k, train=False)[0]],
              max_entries=16)


def test_noisy_topk_balancing_loss_chain(rng):
    T, E, k = 8, 4, 2
    clean, raw = inputs(rng, T, E)
    r, load = R.noisy_topk(clean, raw, k, seed=3)
    want = rref.noisy_topk_loss(r, load, E, 0.5, 2.0)
    assert R.noisy_topk_loss(r, load, E, 0.5, 2.0) == pytest.approx(want, rel=1e-12)

    def loss(c, w):
        rr, ld = R.noisy_topk(c, w, k, seed=3)
        return np.array(R.noisy_topk_loss(rr, ld, E, 0.5, 2.0))

    def backward(d):
        dw, dl = R.noisy_topk_loss_backward(float(d), r, load, E, 0.5, 2.0)
        return R.noisy_topk_backward(dw, dl, clean, raw, k, seed=3)

    gradcheck(loss, [clean, raw], backward, max_entries=16)


def test_noisy_topk_validation(rng):
    clean, raw = inputs(rng, 4, 3)
    with pytest.raises(ValueError, match="noise_logits"):
        R.noisy_topk(clean, None, 2)
    with pytest.raises(ValueError, match="k"):
        R.noisy_topk(clean, raw, 4)
    with pytest.raises(TypeError, match="noise_logits"):
        R.noisy_topk(clean, raw.astype(np.float32), 2)
    with pytest.raises(ValueError, match="noise"):
        R.noisy_topk(clean, raw, 2, noise=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="noise_epsilon"):
        R.noisy_topk(clean, raw, 2, noise_epsilon=-1.0)
    with pytest.raises(ValueError, match="d_load"):
        R.noisy_topk_backward(None, np.zeros(4), clean, raw, 2, seed=0)
    keep = clean.copy(), raw.copy()
    R.noisy_topk(clean, raw, 2, seed=0)
    R.noisy_topk_backward(np.ones((4, 2)), np.ones(3), clean, raw, 2, seed=0)
    np.testing.assert_array_equal(keep[0], clean)
    np.testing.assert_array_equal(keep[1], raw)
