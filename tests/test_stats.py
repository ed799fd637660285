"""fastmoe_nb.routing.stats on hand-made routings."""
import numpy as np
import pytest

from fastmoe_nb.routing.stats import RoutingMonitor, load_cv, router_entropy, routing_stats


def test_even_routing():
    experts = np.array([[0, 1], [2, 3], [1, 0], [3, 2]], np.int32)   # every expert twice
    s = routing_stats(experts, 4, probs=np.full((4, 4), 0.25))
    np.testing.assert_array_equal(s.tokens_per_expert, [2, 2, 2, 2])
    assert s.load_cv == 0.0 and s.max_load == 1.0 and s.dropped_fraction == 0.0
    assert s.entropy == pytest.approx(np.log(4))
    np.testing.assert_allclose(s.shares, 0.25)


def test_collapsed_routing_by_hand():
    experts = np.zeros((6, 1), np.int64)                             # all on expert 0 of 3
    probs = np.tile([1.0, 0.0, 0.0], (6, 1))
    s = routing_stats(experts, 3, probs=probs)
    np.testing.assert_array_equal(s.tokens_per_expert, [6, 0, 0])
    assert s.load_cv == pytest.approx(np.sqrt(2))                   # sqrt(E - 1)
    assert s.max_load == pytest.approx(3.0)                          # E
    assert s.entropy == 0.0
    assert np.isnan(routing_stats(experts, 3).entropy)


def test_uneven_counts_and_dropped_assignments():
    experts = np.array([[0, 1], [0, 2], [0, 1]])
    s = routing_stats(experts, 4, dropped=np.array([1, 0, 0, 0]))
    np.testing.assert_array_equal(s.tokens_per_expert, [2, 2, 1, 0])  # 3 wanted, 1 dropped
    mean = 5 / 4
    std = np.sqrt(((np.array([2, 2, 1, 0]) - mean) ** 2).mean())
    assert s.load_cv == pytest.approx(std / mean)
    assert s.max_load == pytest.approx(2 / mean)
    assert s.dropped_fraction == pytest.approx(1 / 6)


def test_entropy_by_hand_and_empty_inputs():
    p = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert router_entropy(p) == pytest.approx(np.log(2) / 2)
    s = routing_stats(np.zeros((0, 2), np.int32), 4, probs=np.zeros((0, 4)))
    assert s.tokens_per_expert.sum() == 0 and s.load_cv == 0.0 and s.max_load == 0.0
    assert s.dropped_fraction == 0.0 and np.isnan(s.entropy)
    assert load_cv([]) == 0.0


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="experts: expected expert ids in 0..2"):
        routing_stats(np.array([[3]]), 3)
    with pytest.raises(TypeError, match="experts: expected an integer array"):
        routing_stats(np.array([[0.0]]), 3)
    with pytest.raises(ValueError, match="probs: expected shape \\(1, 3\\)"):
        routing_stats(np.array([[0]]), 3, probs=np.ones((1, 2)))
    with pytest.raises(ValueError, match="dropped"):
        routing_stats(np.array([[0]]), 3, dropped=np.array([2, 0, 0]))
    with pytest.raises(ValueError, match="num_experts"):
        routing_stats(np.array([[0]]), 0)
    with pytest.raises(ValueError, match="window"):
        RoutingMonitor(4, window=0)


def test_monitor_flags_an_expert_starved_for_a_whole_window():
    mon = RoutingMonitor(3, window=3, threshold=0.1)   # starved: share < 0.1 / 3
    starve_2 = routing_stats(np.array([[0], [1]] * 20), 3)          # expert 2 gets nothing
    even = routing_stats(np.array([[0], [1], [2]] * 10), 3)
    assert not mon.update(starve_2) and not mon.update(starve_2)    # window not yet full
    assert mon.update(starve_2) and mon.starved_experts == [2]
    assert not mon.update(even)                                     # recovered: flag clears
    for _ in range(2):
        assert not mon.update(starve_2)
    mon.update(routing_stats(np.zeros((0, 1), np.int32), 3))        # an empty step is ignored
    assert mon.update(starve_2) and mon.collapsed
    assert len(mon.history) == 8
    np.testing.assert_allclose(mon.mean("tokens_per_expert", last=1), [20, 20, 0])
    assert mon.mean("load_cv", last=2) == pytest.approx(np.sqrt(2) / 4)   # with the empty step
    with pytest.raises(ValueError, match="expected 3 experts"):
        mon.update(routing_stats(np.array([[0]]), 4))


def test_monitor_threshold_is_relative_to_the_even_share():
    # 1 token of 100 on expert 3 of 4: share 0.01 < 0.1/4 -> starved; 5 of 100 -> not
    low = np.array([[0]] * 33 + [[1]] * 33 + [[2]] * 33 + [[3]])
    ok = np.array([[0]] * 32 + [[1]] * 32 + [[2]] * 31 + [[3]] * 5)
    m = RoutingMonitor(4, window=1)
    assert m.update(routing_stats(low, 4)) and m.starved_experts == [3]
    assert not m.update(routing_stats(ok, 4))
