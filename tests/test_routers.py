"""Capacity routers (Switch top-1, GShard top-2), expert choice, hash routing and dense gating
against fastmoe_nb.routing.reference: indices exact, gates to rounding, gradients by central
differences, capacity edge cases and seeded determinism."""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.routing as R
from fastmoe_nb.nn.gradcheck import gradcheck
from fastmoe_nb.routing import reference as rref

from helpers import assert_close, assert_plan_equal

SHAPES = [(0, 4), (1, 1), (1, 3), (7, 3), (33, 8), (64, 16)]
DTYPES = [np.float32, np.float64]


def assert_plan_invariants(plan):
    T, k = plan.slots.shape
    assert plan.num_rows == T * k - plan.num_dropped
    assert plan.offsets[-1] == plan.num_rows
    flat = plan.slots.reshape(-1)
    kept = np.nonzero(flat >= 0)[0]
    np.testing.assert_array_equal(np.sort(plan.rows), kept)
    np.testing.assert_array_equal(flat[plan.rows], np.arange(plan.num_rows))
    for e in range(plan.num_experts):   # increasing flat id within an expert
        seg = plan.rows[plan.offsets[e]:plan.offsets[e + 1]]
        assert (np.diff(seg) > 0).all()
        if plan.capacity is not None:
            assert seg.size <= plan.capacity


def logits_of(rng, T, E, dtype, scale=2.0):
    return (scale * rng.standard_normal((T, E))).astype(dtype)


# --------------------------------------------------------------------------- capacity

def test_expert_capacity_rounding_is_documented():
    assert R.expert_capacity(100, 10, 1.0) == 10
    assert R.expert_capacity(1000, 10, 1.1) == 111      # float64: 100 * 1.1 = 110.00000000000001
    assert R.expert_capacity(100, 10, 1.1) == 11
    assert R.expert_capacity(10, 3, 1.0) == 4           # ceil(3.33)
    assert R.expert_capacity(8, 8, 1.0) == 4            # min_capacity
    assert R.expert_capacity(8, 8, 1.0, min_capacity=0) == 1
    assert R.expert_capacity(64, 8, 1.25, k=2) == 20
    assert R.expert_capacity(0, 4, 1.0, min_capacity=0) == 0
    for T, E, cf, k in [(100, 10, 1.1, 1), (77, 6, 1.5, 2), (5, 5, 2.0, 3)]:
        assert R.expert_capacity(T, E, cf, k) == rref.expert_capacity(T, E, cf, k)


def test_capacity_plan_default_order_equals_make_plan(rng):
    experts = rng.integers(0, 5, (40, 2)).astype(np.int32)
    experts[:, 1] = (experts[:, 0] + 1 + rng.integers(0, 4, 40)) % 5
    for cap in (None, 0, 3, 100):
        assert_plan_equal(R.capacity_plan(experts, 5, cap), fm.make_plan(experts, 5, cap))


def test_capacity_plan_order_and_skip_match_reference(rng):
    experts = rng.integers(0, 4, (30, 2)).astype(np.int32)
    order = rng.permutation(60)
    skip = rng.random(60) < 0.2
    got = R.capacity_plan(experts, 4, 5, order, skip)
    assert_plan_equal(got, rref.capacity_plan(experts, 4, 5, order, skip))
    assert_plan_invariants(got)


# --------------------------------------------------------------------------- Switch

@pytest.mark.parametrize("T,E", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("priority", ["position", "score"])
def test_switch_top1_matches_reference(rng, T, E, dtype, priority):
    x = logits_of(rng, T, E, dtype)
    for kw in (dict(), dict(capacity=2), dict(capacity_factor=1.25, min_capacity=0),
               dict(capacity_factor=None)):
        r, plan = R.switch_top1(x, priority=priority, **kw)
        rr, rplan = rref.switch_top1(x, priority=priority, **kw)
        np.testing.assert_array_equal(r.experts, rr.experts)
        assert_close(r.weights, rr.weights)
        assert_plan_equal(plan, rplan)
        assert_plan_invariants(plan)


def test_switch_position_priority_is_make_plan_first_come(rng):
    x = logits_of(rng, 50, 4, np.float32)
    r, plan = R.switch_top1(x, capacity=6)
    assert_plan_equal(plan, fm.make_plan(r.experts, 4, 6))


def test_switch_score_priority_keeps_the_most_confident_tokens():
    # every token wants expert 0; confidence grows with the token index
    x = np.zeros((6, 3), np.float32)
    x[:, 0] = np.arange(1, 7)
    r, plan = R.switch_top1(x, capacity=2, priority="score")
    np.testing.assert_array_equal(plan.slots[:, 0] >= 0, [0, 0, 0, 0, 1, 1])
    r, plan = R.switch_top1(x, capacity=2, priority="position")
    np.testing.assert_array_equal(plan.slots[:, 0] >= 0, [1, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("priority", ["position", "score"])
def test_switch_capacity_edges(rng, priority):
    T, E = 12, 4
    x = logits_of(rng, T, E, np.float32)
    _, plan = R.switch_top1(x, capacity=0, priority=priority)
    assert plan.num_rows == 0 and plan.num_dropped == T
    _, plan = R.switch_top1(x, capacity=T, priority=priority)
    assert plan.num_dropped == 0 and plan.capacity == T
    one = np.zeros((T, E), np.float32)
    one[:, 2] = 5.0                                   # every token to expert 2
    r, plan = R.switch_top1(one, capacity=5, priority=priority)
    assert (r.experts == 2).all()
    assert plan.counts.tolist() == [0, 0, 5, 0] and plan.dropped.tolist() == [0, 0, T - 5, 0]
    assert_plan_invariants(plan)


def test_switch_dropped_tokens_give_zero_output(rng):
    T, E, d = 10, 2, 6
    x = rng.standard_normal((T, d)).astype(np.float32)
    logits = np.zeros((T, E), np.float32)
    logits[:, 0] = 1.0
    r, plan = R.switch_top1(logits, capacity=3)
    y = fm.combine(fm.permute(x, plan) * 2.0, plan, r.weights)
    assert np.abs(y[3:]).max() == 0.0
    assert_close(y[:3], (2.0 * x[:3] * r.weights[:3]).astype(np.float32))


def test_switch_gradient(rng):
    x = rng.standard_normal((9, 5))
    r, _ = R.switch_top1(x)
    gradcheck(lambda l: R.switch_top1(l, capacity_factor=None)[0].weights, [x],
              lambda dw: [R.switch_top1_backward(dw, x, r.experts)])


# --------------------------------------------------------------------------- GShard

@pytest.mark.parametrize("T,E", [(0, 2), (1, 2), (7, 3), (33, 8), (64, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("priority", ["position", "score"])
def test_gshard_top2_matches_reference(rng, T, E, dtype, priority):
    x = logits_of(rng, T, E, dtype)
    for kw in (dict(), dict(capacity=3), dict(capacity_factor=0.75, min_capacity=1),
               dict(capacity_factor=None), dict(random_routing=True, seed=7),
               dict(capacity=4, random_routing=True, seed=3)):
        r, plan = R.gshard_top2(x, priority=priority, **kw)
        rr, rplan = rref.gshard_top2(x, priority=priority, **kw)
        np.testing.assert_array_equal(r.experts, rr.experts)
        assert_close(r.weights, rr.weights)
        assert_plan_equal(plan, rplan)
        assert_plan_invariants(plan)


def test_gshard_first_choices_claim_capacity_before_second_choices():
    # token 0's second choice is expert 1, tokens 1..3 want expert 1 first; capacity 3
    x = np.array([[5, 4, 0], [0, 5, 4], [0, 5, 4], [0, 5, 4]], np.float32)
    r, plan = R.gshard_top2(x, capacity=3)
    assert r.experts[:, 0].tolist() == [0, 1, 1, 1]
    assert plan.slots[0, 1] == -1                      # token 0's second choice lost
    assert (plan.slots[1:, 0] >= 0).all()
    # make_plan (token order) would have kept token 0's second choice instead
    assert fm.make_plan(r.experts, 3, 3).slots[0, 1] >= 0


def test_gshard_random_routing_is_seeded_and_keeps_in_proportion():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4000, 4))).astype(np.float64)
    a = R.gshard_top2(x, capacity_factor=None, random_routing=True, seed=11)
    b = R.gshard_top2(x, capacity_factor=None, random_routing=True, seed=11)
    c = R.gshard_top2(x, capacity_factor=None, random_routing=True, seed=12)
    assert_plan_equal(a[1], b[1])
    assert not np.array_equal(a[1].slots, c[1].slots)
    kept = a[1].slots[:, 1] >= 0
    assert (a[1].slots[:, 0] >= 0).all()               # first choices are never skipped
    assert a[1].num_dropped == int((~kept).sum())
    g2 = a[0].weights[:, 1]
    assert abs(kept.mean() - np.minimum(2 * g2, 1).mean()) < 0.03
    assert_close(a[0].weights, R.gshard_top2(x, capacity_factor=None)[0].weights)


def test_gshard_capacity_edges(rng):
    x = logits_of(rng, 10, 4, np.float32)
    _, plan = R.gshard_top2(x, capacity=0)
    assert plan.num_rows == 0 and plan.num_dropped == 20
    _, plan = R.gshard_top2(x, capacity=10)
    assert plan.num_dropped == 0
    one = np.zeros((10, 4), np.float32)
    one[:, 1], one[:, 3] = 5.0, 4.0                    # everyone: expert 1, then expert 3
    r, plan = R.gshard_top2(one, capacity=4)
    assert plan.counts.tolist() == [0, 4, 0, 4]
    np.testing.assert_array_equal(plan.slots[:4] >= 0, np.ones((4, 2), bool))


def test_gshard_gradient(rng):
    x = rng.standard_normal((8, 5))
    r, _ = R.gshard_top2(x)
    gradcheck(lambda l: R.gshard_top2(l, capacity_factor=None)[0].weights, [x],
              lambda dw: [R.gshard_top2_backward(dw, x, r.experts)])


# --------------------------------------------------------------------------- expert choice

@pytest.mark.parametrize("T,E", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_choice_matches_reference(rng, T, E, dtype):
    x = logits_of(rng, T, E, dtype)
    for kw in (dict(), dict(capacity=0), dict(capacity=3), dict(capacity=T + 5),
               dict(capacity_factor=2.0, min_capacity=1), dict(capacity_factor=None)):
        r, plan = R.expert_choice(x, **kw)
        rr, rplan = rref.expert_choice(x, **kw)
        np.testing.assert_array_equal(r.experts, rr.experts)
        assert_close(r.weights, rr.weights)
        assert_plan_equal(plan, rplan)
        assert_plan_invariants(plan)
        assert (plan.counts == min(plan.capacity, T)).all()


def test_expert_choice_tokens_get_zero_to_e_experts():
    x = np.zeros((6, 3), np.float32)
    x[0] = [9, 9, 9]                      # everyone's favourite
    r, plan = R.expert_choice(x, capacity=2)
    per_token = (plan.slots >= 0).sum(axis=1)
    assert per_token[0] == 3 and per_token.sum() == 6 and (per_token == 0).any()
    # equal scores: the lower token first
    r, plan = R.expert_choice(np.zeros((5, 2), np.float64), capacity=2)
    np.testing.assert_array_equal(plan.slots >= 0, [[1, 1], [1, 1], [0, 0], [0, 0], [0, 0]])


def test_expert_choice_layer_and_gradient(rng):
    T, E, d = 9, 3, 4
    x = rng.standard_normal((T, d))
    logits = rng.standard_normal((T, E))
    r, plan = R.expert_choice(logits, capacity=4)
    # the combined output equals the dense sum over the chosen (t, e) pairs
    y = fm.combine(fm.permute(x, plan), plan, r.weights)
    want = (r.weights.sum(axis=1))[:, None] * x
    assert_close(y, want)
    gradcheck(lambda l: np.where(plan.slots >= 0, fm.softmax(l), 0.0), [logits],
              lambda dw: [R.expert_choice_backward(dw, logits, plan)])


# --------------------------------------------------------------------------- hash, dense

def test_hash_routing_matches_reference_and_is_balanced():
    table = R.balanced_hash_table(103, 8, seed=3)
    assert table.shape == (103,) and table.dtype == np.int32
    assert np.bincount(table, minlength=8).max() - np.bincount(table, minlength=8).min() <= 1
    np.testing.assert_array_equal(table, R.balanced_hash_table(103, 8, seed=3))
    ids = np.random.default_rng(0).integers(0, 103, 50)
    r = R.hash_routing(ids, table, 8)
    rr = rref.hash_routing(ids, table, 8)
    np.testing.assert_array_equal(r.experts, rr.experts)
    np.testing.assert_array_equal(r.weights, rr.weights)
    t2 = R.balanced_hash_table(20, 4, k=2, seed=1)
    assert t2.shape == (20, 2) and (t2[:, 0] != t2[:, 1]).all()
    r2 = R.hash_routing(np.arange(20), t2, 4, dtype=np.float64)
    assert r2.weights.dtype == np.float64 and (r2.weights == 0.5).all()
    assert R.hash_routing(np.zeros(0, np.int64), table, 8).experts.shape == (0, 1)


@pytest.mark.parametrize("T,E", SHAPES)
def test_dense_gating_matches_reference_and_gradient(rng, T, E):
    x = logits_of(rng, T, E, np.float32)
    r, rr = R.dense_gating(x), rref.dense_gating(x)
    np.testing.assert_array_equal(r.experts, rr.experts)
    assert_close(r.weights, rr.weights)
    if T:
        x64 = rng.standard_normal((4, E))
        gradcheck(lambda l: R.dense_gating(l).weights, [x64],
                  lambda dw: [R.dense_gating_backward(dw, x64)])


def test_dense_gating_layer_is_the_softmax_mixture(rng):
    T, d, E = 6, 5, 3
    x = rng.standard_normal((T, d))
    logits = rng.standard_normal((T, E))
    w = rng.standard_normal((E, d, d))
    r = R.dense_gating(logits)
    plan = fm.make_plan(r.experts, E)
    xs = fm.permute(x, plan)
    ys = np.concatenate([xs[plan.offsets[e]:plan.offsets[e + 1]] @ w[e] for e in range(E)])
    y = fm.combine(ys, plan, r.weights)
    p = fm.softmax(logits)
    want = sum(p[:, e:e + 1] * (x @ w[e]) for e in range(E))
    assert_close(y, want, rtol=1e-10)


# --------------------------------------------------------------------------- validation

def test_router_validation_errors(rng):
    x = logits_of(rng, 5, 4, np.float32)
    with pytest.raises(ValueError, match="priority"):
        R.switch_top1(x, priority="random")
    with pytest.raises(ValueError, match="capacity"):
        R.switch_top1(x, capacity=-1)
    with pytest.raises(TypeError, match="capacity"):
        R.switch_top1(x, capacity=2.5)
    with pytest.raises(ValueError, match="capacity_factor"):
        R.gshard_top2(x, capacity_factor=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        R.gshard_top2(x[:, :1])
    with pytest.raises(ValueError, match="seed"):
        R.gshard_top2(x, random_routing=True, seed=-1)
    with pytest.raises(ValueError, match="logits"):
        R.expert_choice(x[0])
    with pytest.raises(TypeError, match="logits"):
        R.dense_gating(x.astype(np.int32))
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        R.switch_top1(bad)
    with pytest.raises(ValueError, match="token_ids"):
        R.hash_routing(np.array([0, 9]), np.zeros(5, np.int32), 4)
    with pytest.raises(ValueError, match="table"):
        R.hash_routing(np.array([0]), np.array([0, 7]), 4)
    with pytest.raises(ValueError, match="order"):
        R.capacity_plan(np.zeros((3, 1), np.int32), 2, 1, order=np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="plan"):
        R.expert_choice_backward(x, x, fm.make_plan(np.zeros((5, 1), np.int32), 4))


def test_routers_do_not_modify_their_inputs(rng):
    x = logits_of(rng, 20, 4, np.float32)
    keep = x.copy()
    R.switch_top1(x, capacity=3, priority="score")
    R.gshard_top2(x, capacity=3, random_routing=True, seed=0)
    R.expert_choice(x, capacity=3)
    R.dense_gating(x)
    np.testing.assert_array_equal(x, keep)


def test_expert_choice_ties_on_the_running_list_path():
    # C * 16 <= T: the running top-C list; equal scores still go to the lower token
    r, plan = R.expert_choice(np.zeros((40, 2), np.float32), capacity=2)
    assert np.nonzero(plan.slots[:, 0] >= 0)[0].tolist() == [0, 1]
    assert np.nonzero(plan.slots[:, 1] >= 0)[0].tolist() == [0, 1]


def test_routers_and_losses_are_bitwise_the_same_for_any_thread_count(rng):
    import numba

    logits = rng.standard_normal((301, 8)).astype(np.float32)
    raw = rng.standard_normal((301, 8)).astype(np.float32)
    experts = fm.softmax_topk(logits, 2).experts

    def run():
        out = [R.expert_choice(logits, capacity=9)[0].weights,
               R.expert_choice(logits, capacity=200)[0].weights,
               *R.noisy_topk(logits, raw, 2, seed=1),
               *R.noisy_topk_backward(np.ones((301, 2), np.float32), np.ones(8, np.float32),
                                      logits, raw, 2, seed=1),
               R.load_balancing_loss_backward(1.0, logits, experts),
               R.z_loss_backward(1.0, logits),
               R.sequence_balance_loss_backward(1.0, logits, experts, 7),
               np.array([R.load_balancing_loss(logits, experts), R.z_loss(logits),
                         R.sequence_balance_loss(logits, experts, 7)])]
        return [np.asarray(a) for a in out]

    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = run()
    finally:
        numba.set_num_threads(prev)
    for a, b in zip(one, two):
        assert a.tobytes() == b.tobytes()
