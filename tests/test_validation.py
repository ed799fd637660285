"""Every malformed argument gives a ValueError / TypeError naming it, before any work."""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.nn  # noqa: F401  (fm.nn)

from helpers import make_layer

f32, f64 = np.float32, np.float64


def _raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


@pytest.fixture
def layer():
    """x (6, 8), router_w (8, 4), w1 (4, 8, 8), w2 (4, 4, 8) float32, by name."""
    return dict(zip(("x", "router_w", "w1", "w2"),
                    make_layer(np.random.default_rng(0), 6, 8, 4, 4).args))


def test_routing_primitives():
    x = np.zeros((3, 4), f32)
    _raises(ValueError, "x: expected a 2-D array", fm.softmax, np.zeros(4, f32))
    _raises(TypeError, "x: expected float32 or float64, got int64", fm.softmax,
            np.zeros((2, 2), np.int64))
    _raises(TypeError, "x: expected an array, got list", fm.softmax, [[1.0, 2.0]])
    _raises(ValueError, "x: expected finite", fm.softmax, np.array([[0, np.nan]], f32))
    _raises(ValueError, r"k: expected an integer in 1..E = 1..4, got 0", fm.topk, x, 0)
    _raises(ValueError, r"k: expected an integer in 1..E = 1..4, got 5", fm.topk, x, 5)
    _raises(TypeError, "k: expected an integer, got float", fm.topk, x, 2.0)
    _raises(TypeError, "k: expected an integer, got bool", fm.topk, x, True)


def test_softmax_topk_non_finite_logits():
    bad = np.array([[0.0, np.inf, 1.0]], f32)
    _raises(ValueError, "logits: expected finite values", fm.softmax_topk, bad, 1)
    # an explicit opt-out skips the scan
    r = fm.softmax_topk(np.array([[0.0, -np.inf, 1.0]], f32), 1, check_finite=False)
    assert r.experts.tolist() == [[2]]


def test_sigmoid_topk_options():
    x = np.zeros((3, 8), f32)
    _raises(ValueError, "n_group: expected a divisor of E = 8, got 3", fm.sigmoid_topk, x, 2,
            n_group=3)
    _raises(ValueError, r"topk_group: expected an integer in 1..n_group = 1..4, got 5",
            fm.sigmoid_topk, x, 2, n_group=4, topk_group=5)
    _raises(ValueError, r"k: expected an integer in 1..4 \(the experts in the topk_group",
            fm.sigmoid_topk, x, 5, n_group=4, topk_group=2)
    _raises(ValueError, r"bias: expected shape \(8\), got \(7,\)", fm.sigmoid_topk, x, 2,
            bias=np.zeros(7, f32))
    _raises(TypeError, "bias: expected dtype float32", fm.sigmoid_topk, x, 2,
            bias=np.zeros(8, f64))
    _raises(ValueError, "bias: expected finite", fm.sigmoid_topk, x, 2,
            bias=np.full(8, np.nan, f32))
    _raises(ValueError, "scale: expected a finite number", fm.sigmoid_topk, x, 2,
            scale=float("nan"))


def test_make_plan():
    e = np.array([[0, 1], [2, 3]], np.int32)
    _raises(TypeError, "experts: expected an integer array, got float32", fm.make_plan,
            e.astype(f32), 4)
    _raises(ValueError, "experts: expected a 2-D array", fm.make_plan, e.ravel(), 4)
    _raises(ValueError, r"experts: expected expert ids in 0..num_experts-1 = 0..2, found 3",
            fm.make_plan, e, 3)
    _raises(ValueError, "found -1", fm.make_plan, np.array([[0, -1]], np.int32), 3)
    _raises(ValueError, "num_experts: expected an integer in 1..2147483647", fm.make_plan, e, 0)
    _raises(ValueError, "capacity: expected a non-negative integer or None, got -1",
            fm.make_plan, e, 4, capacity=-1)
    _raises(TypeError, "capacity: expected an integer, got float", fm.make_plan, e, 4, 2.5)


def test_permute_combine():
    plan = fm.make_plan(np.array([[0, 1], [1, 0], [0, 0]], np.int32), 2)
    _raises(ValueError, r"x: expected shape \(3, \*\), got \(4, 5\)", fm.permute,
            np.zeros((4, 5), f32), plan)
    _raises(TypeError, "plan: expected a Plan from make_plan, got tuple", fm.permute,
            np.zeros((3, 5), f32), tuple(plan))
    ys = np.zeros((6, 5), f32)
    _raises(ValueError, r"ys: expected shape \(6, \*\), got \(5, 5\)", fm.combine,
            np.zeros((5, 5), f32), plan)
    _raises(ValueError, r"weights: expected shape \(3, 2\), got \(2, 3\)", fm.combine, ys,
            plan, np.zeros((2, 3), f32))
    _raises(TypeError, "weights: expected dtype float32", fm.combine, ys, plan,
            np.zeros((3, 2), f64))


def test_grouped_gemm():
    a = np.zeros((5, 4), f32)
    w = np.zeros((2, 4, 3), f32)
    off = np.array([0, 2, 5])
    _raises(ValueError, "w: expected shape", fm.grouped_gemm, a, np.zeros((2, 3, 3), f32), off)
    _raises(ValueError, "w: expected shape", fm.grouped_gemm, a, w, off, trans_w=True)
    _raises(TypeError, "w: expected dtype float32", fm.grouped_gemm, a, w.astype(f64), off)
    _raises(ValueError, "offsets: expected shape", fm.grouped_gemm, a, w, np.array([0, 5]))
    _raises(ValueError, "offsets: expected non-decreasing offsets from 0 to N = 5", fm.grouped_gemm,
            a, w, np.array([0, 2, 4]))
    _raises(ValueError, "offsets: expected non-decreasing", fm.grouped_gemm, a, w,
            np.array([0, 3, 2, 5])[[0, 2, 3]] * 0 + np.array([0, 6, 5]))
    _raises(TypeError, "offsets: expected an integer array", fm.grouped_gemm, a, w,
            np.array([0.0, 2.0, 5.0]))


def test_activate():
    _raises(ValueError, "activation: expected one of", fm.activate, np.zeros((2, 2), f32),
            "tanh")
    _raises(ValueError, "swiglu expects an even hidden width", fm.activate,
            np.zeros((2, 3), f32), "swiglu")


def test_moe_forward(layer):
    L = layer
    call = fm.moe_forward
    _raises(ValueError, r"router_w: expected shape \(8, \*\)", call, L["x"],
            L["router_w"][:7], L["w1"], L["w2"], k=2)
    _raises(ValueError, r"router_w, w1: router_w has 4 expert columns but w1 holds 3",
            call, L["x"], L["router_w"], L["w1"][:3], L["w2"], k=2)
    _raises(ValueError, r"w1: expected shape \(4, 8, 8\), got \(4, 7, 8\)", call, L["x"],
            L["router_w"], L["w1"][:, :7], L["w2"], k=2)
    _raises(ValueError, r"w2: expected shape \(4, 4, 8\)", call, L["x"], L["router_w"],
            L["w1"], L["w2"][:, :3], k=2)
    _raises(ValueError, "w1: swiglu expects an even hidden width", call, L["x"],
            L["router_w"], L["w1"][:, :, :7], L["w2"], k=2)
    _raises(ValueError, r"k: expected an integer in 1..E = 1..4, got 5", call, **L, k=5)
    _raises(TypeError, "router_w: expected dtype float32", call, L["x"],
            L["router_w"].astype(f64), L["w1"], L["w2"], k=2)
    _raises(ValueError, "router: expected one of", call, **L, k=2, router="top1")
    _raises(ValueError, "activation: expected one of", call, **L, k=2, activation="tanh")
    _raises(ValueError, "only for router='sigmoid_topk'", call, **L, k=2,
            bias=np.zeros(4, f32))
    _raises(ValueError, "capacity: expected a non-negative integer", call, **L, k=2,
            capacity=-3)
    _raises(ValueError, "shared_w1, shared_w2: expected both", call, **L, k=2,
            shared_w1=np.zeros((8, 6), f32))
    _raises(ValueError, r"shared_gate_w: expected shape \(8,\) or \(8, 1\)", call, **L, k=2,
            shared_w1=np.zeros((8, 6), f32), shared_w2=np.zeros((3, 8), f32),
            shared_gate_w=np.zeros((8, 2), f32))
    x = L["x"].copy()
    x[2, 3] = np.nan
    _raises(ValueError, "logits: expected finite values", call, x, L["router_w"], L["w1"],
            L["w2"], k=2)


class _FakeDeviceArray:
    """Looks like a GPU array to the backend choice (never reaches a kernel)."""
    shape, dtype = (6, 8), np.dtype(f32)
    __cuda_array_interface__ = {"shape": (6, 8), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def test_host_and_device_arrays_do_not_mix(layer):
    L = dict(layer)
    L["x"] = _FakeDeviceArray()
    _raises(TypeError, "mixed host and device arrays: x on the GPU but router_w, w1, w2 on "
            "the host", fm.moe_forward, **L, k=2)


# --------------------------------------------------------------------------- plans from outside

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PLAN_INDEX_FIELDS = ("rows", "offsets", "counts", "slots", "dropped")


def _plan_calls(plan, d=3):
    """Every public op that indexes with a plan, on valid arrays for it."""
    T, k, N = plan.num_tokens, plan.top_k, plan.num_rows
    x, ys = np.ones((T, d), f32), np.ones((N, d), f32)
    w, dy = np.ones((T, k), f32), np.ones((T, d), f32)
    return [lambda p: fm.permute(x, p), lambda p: fm.combine(ys, p, w),
            lambda p: fm.permute_backward(ys, p), lambda p: fm.combine_backward(dy, ys, p, w)]


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 6), E=st.integers(1, 4), data=st.data(),
       field=st.sampled_from(_PLAN_INDEX_FIELDS),
       value=st.one_of(st.integers(-3, 12), st.sampled_from([-2**31, 2**31 - 1, 10**6])))
def test_a_perturbed_plan_is_refused_naming_its_field(T, E, data, field, value):
    # Any single-entry change to rows / offsets / counts / slots (or a negative dropped count)
    # leaves a plan inconsistent; every op must refuse it before a kernel indexes with it
    # (today's main: out-of-bounds reads, writes, or a segfault).
    k = data.draw(st.integers(1, E))
    cap = data.draw(st.one_of(st.none(), st.integers(0, T)))
    experts = np.array([data.draw(st.permutations(range(E)))[:k] for _ in range(T)], np.int32)
    plan = fm.make_plan(experts, E, capacity=cap)
    a = getattr(plan, field).copy()
    if a.size == 0:
        return
    i = data.draw(st.integers(0, a.size - 1))
    old = int(a.reshape(-1)[i])
    if value == old or (field == "dropped" and value >= 0):
        return   # not a change, or one a kernel never reads
    a.reshape(-1)[i] = np.array(value).astype(a.dtype)
    bad = plan._replace(**{field: a})
    for call in _plan_calls(plan):
        with pytest.raises(ValueError, match=r"^plan\.(rows|offsets|counts|slots|dropped): "):
            call(bad)
        call(plan)   # the untouched plan still runs


def test_plan_fields_of_the_wrong_kind():
    plan = fm.make_plan(np.array([[0, 1], [1, 0]], np.int32), 2)
    x = np.arange(8, dtype=f32).reshape(2, 4)
    _raises(TypeError, r"plan\.rows: expected dtype int32, got float64", fm.permute, x,
            plan._replace(rows=plan.rows.astype(f64)))
    _raises(TypeError, r"plan\.offsets: expected dtype int64, got int32", fm.permute, x,
            plan._replace(offsets=plan.offsets.astype(np.int32)))
    _raises(ValueError, r"plan\.slots: expected a 2-D array", fm.permute, x,
            plan._replace(slots=plan.slots.reshape(-1)))
    _raises(ValueError, r"plan\.offsets: expected shape \(3,\)", fm.permute, x,
            plan._replace(offsets=plan.offsets[:2]))
    _raises(TypeError, r"plan\.rows: expected an array, got list", fm.permute, x,
            plan._replace(rows=[0, 1, 2, 3]))
    _raises(ValueError, r"plan\.rows: expected assignment ids in 0..T\*k-1 = 0..3, got "
            r"rows\[0\] = -1", fm.permute, x, plan._replace(rows=plan.rows - 1))
    _raises(ValueError, r"plan\.capacity: expected a non-negative integer", fm.permute, x,
            plan._replace(capacity=-1))


def test_make_plan_huge_sizes_name_their_argument():
    ex = np.zeros((2, 2), np.int32)
    _raises(ValueError, r"num_experts: expected an integer in 1\.\.2147483647", fm.make_plan,
            ex, 2**63)
    _raises(ValueError, r"num_experts: expected an integer in 1\.\.2147483647", fm.make_plan,
            ex, 2**62)
    plan = fm.make_plan(ex, 2, capacity=2**63)   # larger than T*k: drops nothing
    assert plan.capacity == 2**63 and plan.num_rows == 4 and not plan.dropped.any()
    np.testing.assert_array_equal(plan.rows, fm.make_plan(ex, 2).rows)


def test_router_columns_and_experts_disagree(layer):
    with pytest.raises(ValueError, match=r"router_w, w1: router_w has 3 expert columns but w1 "
                                         r"holds 4 experts"):
        fm.moe_forward(layer["x"], layer["router_w"][:, :-1], layer["w1"], layer["w2"], 2)


def test_edited_packed_weights_are_refused():
    w = np.ones((3, 8, 6), f32)
    a, off = np.ones((5, 8), f32), np.array([0, 2, 2, 5])
    pw = fm.pack_weights(w)
    pw.panels = pw.panels[:2]
    _raises(ValueError, r"w\.panels: expected a C-contiguous array of shape \(3, 1, 8, 16\)",
            fm.grouped_gemm, a, pw, off)
    pw = fm.pack_weights(w)
    pw.shape = (3, 8, 600)   # more columns than the panels hold: reads past them
    _raises(ValueError, r"w\.panels: expected a C-contiguous array of shape \(3, 38, 8, 16\)",
            fm.grouped_gemm, a, pw, off)
    pw = fm.pack_weights(w)
    pw.shape = [3, 8, 6]
    _raises(ValueError, r"w\.shape: expected the \(E, K, M\) tuple", fm.grouped_gemm, a, pw, off)


def test_a_context_with_an_edited_plan_is_refused(layer):
    import dataclasses  # noqa: PLC0415

    L = layer
    y, ctx = fm.moe_forward(L["x"], L["router_w"], L["w1"], L["w2"], 2, return_context=True)
    bad = dataclasses.replace(ctx, plan=ctx.plan._replace(slots=ctx.plan.slots + 10**6))
    _raises(ValueError, r"^plan\.slots: ", fm.moe_backward, np.ones_like(y), bad)


@pytest.mark.parametrize("make,name", [
    (lambda: fm.nn.MoE(2**63, 4, 4, 1), "router_w"),
    (lambda: fm.nn.MoE(4, 4, 2**62, 1), "router_w"),
    (lambda: fm.nn.MoE(4, 2**40, 4, 1), "w1"), (lambda: fm.nn.Linear(2**62, 3), "w"),
    (lambda: fm.nn.Embedding(2**40, 3), "w")])
def test_layers_too_large_for_memory_name_their_parameter(make, name):
    with pytest.raises(ValueError, match=rf"^{name}: a parameter of shape .* more than this "
                                         r"machine's memory"):
        make()
