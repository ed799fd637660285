"""Balancing losses (every normalization, padding masks), router z-loss, DeepSeek-V3's
sequence-wise loss and bias update: hand-computed values, the reference, HF transformers' own
functions when installed, and gradients by central differences."""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.routing as R
from fastmoe_nb.nn.gradcheck import gradcheck
from fastmoe_nb.routing import reference as rref

from helpers import assert_close

# two tokens, four experts, top-2; logits = log p + a per-row constant (softmax ignores it)
P_HAND = np.array([[0.4, 0.3, 0.2, 0.1], [0.5, 0.25, 0.15, 0.1]])
LOGITS_HAND = np.log(P_HAND) + np.array([[1.0], [2.0]])
EXPERTS_HAND = np.array([[0, 1], [0, 1]], np.int32)


# P = mean p = [0.45, 0.275, 0.175, 0.1]; f (all k) = [1, 1, 0, 0]; f (first) = [1, 0, 0, 0]
@pytest.mark.parametrize("normalization,want", [
    ("mixtral", 4 * (0.45 + 0.275)),          # E * sum f P = 2.9
    ("switch", 4 * 0.45),                     # E * sum f1 P = 1.8
    ("gshard", 4 * 0.45),
    ("megablocks", 4 / 2 * (0.45 + 0.275)),   # E / k * sum f P = 1.45
    ("deepspeed", 16 / 2 * (0.45 + 0.275) / 4),   # E^2 / k * mean f P = 1.45
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_balancing_loss_hand_values(normalization, want, dtype):
    got = R.load_balancing_loss(LOGITS_HAND.astype(dtype), EXPERTS_HAND, normalization)
    assert got == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("normalization,want", [("mixtral", 4 * 0.7), ("switch", 4 * 0.4),
                                                ("megablocks", 2 * 0.7)])
def test_load_balancing_loss_mask_drops_padding(normalization, want):
    for mask in (np.array([1, 0]), np.array([True, False]), np.array([1.0, 0.0])):
        got = R.load_balancing_loss(LOGITS_HAND, EXPERTS_HAND, normalization, mask=mask)
        assert got == pytest.approx(want, rel=1e-12)
    # all padding: nothing to balance
    assert R.load_balancing_loss(LOGITS_HAND, EXPERTS_HAND, normalization,
                                 mask=np.zeros(2)) == 0.0


def test_balanced_routing_gives_the_documented_minimum():
    E, k = 4, 2
    logits = np.zeros((8, E))                  # uniform p
    experts = np.array([[t % E, (t + 1) % E] for t in range(8)], np.int32)
    assert R.load_balancing_loss(logits, experts, "mixtral") == pytest.approx(k)
    for norm in ("switch", "megablocks", "deepspeed"):
        assert R.load_balancing_loss(logits, experts, norm) == pytest.approx(1.0)


@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 1, 1), (7, 3, 3), (33, 8, 2), (64, 16, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_balancing_loss_matches_reference(rng, T, E, k, dtype):
    logits = (2 * rng.standard_normal((T, E))).astype(dtype)
    experts = fm.softmax_topk(logits, k).experts
    mask = rng.random(T) < 0.7
    for norm in R.NORMALIZATIONS:
        for m in (None, mask):
            got = R.load_balancing_loss(logits, experts, norm, mask=m)
            assert got == pytest.approx(rref.load_balancing_loss(logits, experts, norm, m),
                                        rel=1e-6, abs=1e-12)
            d = R.load_balancing_loss_backward(0.7, logits, experts, norm, mask=m)
            # k = E: every token picks every expert, the gradient is exactly 0 in exact
            # arithmetic; its terms are O(0.7 / T) (a coefficient times probabilities / T)
            assert_close(d, rref.load_balancing_loss_backward(0.7, logits, experts, norm, m),
                         floor=0.7 / max(T, 1))


@pytest.mark.parametrize("normalization", ["mixtral", "switch", "megablocks", "deepspeed"])
def test_load_balancing_loss_gradient(rng, normalization):
    logits = rng.standard_normal((9, 5))
    experts = fm.softmax_topk(logits, 2).experts
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1, 1])
    for m in (None, mask):
        gradcheck(lambda l: np.array(R.load_balancing_loss(l, experts, normalization, mask=m)),
                  [logits],
                  lambda d: [R.load_balancing_loss_backward(float(d), logits, experts,
                                                            normalization, mask=m)],
                  max_entries=30)


def test_matches_hf_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from transformers.models.switch_transformers import modeling_switch_transformers as st

    rng = np.random.default_rng(3)
    B, S, E, k = 3, 7, 8, 2
    logits = rng.standard_normal((B * S, E)).astype(np.float32)
    experts = fm.softmax_topk(logits, k).experts
    mask = np.ones((B, S), np.int64)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    t = torch.from_numpy(logits)
    hf = float(load_balancing_loss_func((t,), E, k))
    assert R.load_balancing_loss(logits, experts, "mixtral") == pytest.approx(hf, rel=1e-5)
    hf_m = float(load_balancing_loss_func((t,), E, k, torch.from_numpy(mask)))
    assert R.load_balancing_loss(logits, experts, "mixtral",
                                 mask=mask.reshape(-1)) == pytest.approx(hf_m, rel=1e-5)
    # two layers: HF concatenates their tokens, so do we
    t2 = torch.from_numpy(logits[::-1].copy())
    hf2 = float(load_balancing_loss_func((t, t2), E, k))
    both = np.concatenate([logits, logits[::-1]])
    assert R.load_balancing_loss(both, fm.softmax_topk(both, k).experts) == pytest.approx(
        hf2, rel=1e-5)
    # Switch: one group of tokens, top-1 index from the logits; router z-loss
    probs = torch.softmax(t, dim=-1)[None]
    hf_sw = float(st.load_balancing_loss_func(probs, t.argmax(dim=-1)[None]))
    top1 = fm.softmax_topk(logits, 1).experts
    assert R.load_balancing_loss(logits, top1, "switch") == pytest.approx(hf_sw, rel=1e-5)
    assert R.z_loss(logits) == pytest.approx(float(st.router_z_loss_func(t[None])), rel=1e-5)


# --------------------------------------------------------------------------- z-loss

def test_z_loss_hand_value_and_mask():
    # logsumexp of each row is its constant: 1 and 2
    assert R.z_loss(LOGITS_HAND) == pytest.approx((1 + 4) / 2, rel=1e-12)
    assert R.z_loss(LOGITS_HAND, mask=np.array([1, 0])) == pytest.approx(1.0, rel=1e-12)
    assert R.z_loss(LOGITS_HAND, mask=np.array([0, 0])) == 0.0
    assert R.z_loss(np.zeros((0, 3), np.float32)) == 0.0


@pytest.mark.parametrize("T,E", [(1, 1), (7, 3), (33, 8)])
def test_z_loss_reference_and_gradient(rng, T, E):
    logits = (3 * rng.standard_normal((T, E))).astype(np.float32)
    mask = rng.random(T) < 0.6
    for m in (None, mask):
        assert R.z_loss(logits, m) == pytest.approx(rref.z_loss(logits, m), rel=1e-6)
    x = rng.standard_normal((T, E))
    for m in (None, mask):
        gradcheck(lambda l: np.array(R.z_loss(l, mask=m)), [x],
                  lambda d: [R.z_loss_backward(float(d), x, mask=m)], max_entries=30)


# --------------------------------------------------------------------------- DeepSeek-V3

def test_sequence_balance_loss_hand_value():
    # sigmoid: t0 (0.5, 0.5), t1 (0.75, 0.25); normalized the same
    logits = np.array([[0.0, 0.0], [np.log(3), -np.log(3)]])
    experts = np.array([[0], [1]], np.int32)
    # one sequence: f = 2/(1*2) * [1, 1] = [1, 1], P = [0.625, 0.375] -> 1.0
    assert R.sequence_balance_loss(logits, experts) == pytest.approx(1.0, rel=1e-12)
    # two sequences of one token: 2 * 0.5 = 1.0 and 2 * 0.25 = 0.5 -> mean 0.75
    assert R.sequence_balance_loss(logits, experts, seq_len=1) == pytest.approx(0.75, rel=1e-12)


@pytest.mark.parametrize("T,E,k,S", [(1, 1, 1, None), (12, 4, 2, 3), (32, 8, 3, 8)])
def test_sequence_balance_loss_reference_and_gradient(rng, T, E, k, S):
    logits = rng.standard_normal((T, E))
    bias = rng.standard_normal(E) * 0.1
    experts = fm.sigmoid_topk(logits, k, bias=bias).experts
    assert R.sequence_balance_loss(logits, experts, S) == pytest.approx(
        rref.sequence_balance_loss(logits, experts, S), rel=1e-12)
    l32 = logits.astype(np.float32)
    assert R.sequence_balance_loss(l32, experts, S) == pytest.approx(
        rref.sequence_balance_loss(l32, experts, S), rel=1e-6)
    gradcheck(lambda l: np.array(R.sequence_balance_loss(l, experts, S)), [logits],
              lambda d: [R.sequence_balance_loss_backward(float(d), logits, experts, S)],
              max_entries=30)


def test_update_bias():
    bias = np.zeros(3, np.float32)
    new = R.update_bias(bias, np.array([1, 2, 6]), gamma=0.1)
    assert new.dtype == np.float32 and new.tolist() == pytest.approx([0.1, 0.1, -0.1])
    assert bias.tolist() == [0, 0, 0]                     # not modified
    np.testing.assert_array_equal(R.update_bias(new, np.array([3, 3, 3]), 0.1), new)
    np.testing.assert_array_equal(new, rref.update_bias(bias, np.array([1, 2, 6]), 0.1))


def test_update_bias_balances_a_skewed_router():
    # aux-loss-free balancing: the bias alone spreads the load of a skewed sigmoid router
    rng = np.random.default_rng(0)
    T, E, k = 256, 8, 2
    logits = (rng.standard_normal((T, E)) + np.linspace(0, 2, E)).astype(np.float32)
    bias = np.zeros(E, np.float32)
    cv0 = np.bincount(fm.sigmoid_topk(logits, k).experts.ravel(), minlength=E).std()
    for _ in range(200):
        load = np.bincount(fm.sigmoid_topk(logits, k, bias=bias).experts.ravel(), minlength=E)
        bias = R.update_bias(bias, load, gamma=0.01)
    assert load.std() < 0.3 * cv0


# --------------------------------------------------------------------------- validation

def test_loss_validation_errors(rng):
    logits = rng.standard_normal((4, 3)).astype(np.float32)
    experts = np.zeros((4, 1), np.int32)
    with pytest.raises(ValueError, match="normalization"):
        R.load_balancing_loss(logits, experts, "fedus")
    with pytest.raises(ValueError, match="experts"):
        R.load_balancing_loss(logits, np.full((4, 1), 3), "mixtral")
    with pytest.raises(ValueError, match="experts"):
        R.load_balancing_loss(logits, np.zeros((5, 1), np.int32))
    with pytest.raises(ValueError, match="mask"):
        R.load_balancing_loss(logits, experts, mask=np.ones(3))
    with pytest.raises(ValueError, match="mask"):
        R.z_loss(logits, mask=np.array([0, 1, 2, 1]))
    with pytest.raises(TypeError, match="d_loss"):
        R.z_loss_backward("1", logits)
    with pytest.raises(ValueError, match="seq_len"):
        R.sequence_balance_loss(logits, experts, seq_len=3)
    with pytest.raises(ValueError, match="load"):
        R.update_bias(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError, match="bias"):
        R.update_bias(np.zeros(3, np.int64), np.zeros(3))
    bad = logits.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="finite"):
        R.z_loss(bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("big", [1e30, "max"])
def test_z_loss_backward_at_the_float_limits(dtype, big):
    # d/dl z_loss = 2 lse softmax(l): the experts whose probability is 0 get exactly 0, even
    # where 2 lse itself overflows (it gave inf * 0 = NaN); the top one 2 lse, inf only where
    # that value is not representable
    v = float(np.finfo(dtype).max) if big == "max" else big
    for sign in (1, -1):
        logits = np.array([[sign * v, 0.0, -sign * v, 1.0]], dtype)
        g = R.z_loss_backward(1.0, logits)
        top = 0 if sign > 0 else 2
        assert g.dtype == dtype and not np.isnan(g).any()
        assert (np.delete(g[0], top) == 0).all()
        with np.errstate(over="ignore"):
            assert g[0, top] == dtype(2.0 * v)
