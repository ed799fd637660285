"""grouped_gemm / grouped_gemm_backward and the expert MLPs (experts_forward /
experts_backward) against fastmoe_nb.reference and float64 central differences: on the shape
table's plans, on block structures that take each of the CPU's ways (streamed, packed kernel,
per-expert BLAS), packed weights, determinism across thread counts, bad input."""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref

from helpers import SHAPES, Shape, assert_close, check_op, plan_of


def make_case(counts, K, M, dtype=np.float32, trans_w=False, seed=0):
    """counts: rows per expert -> a (N, K), w (E, K, M) or (E, M, K), offsets (E+1,)."""
    rng = np.random.default_rng(seed)
    E = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    N = int(offsets[-1])
    a = rng.standard_normal((N, K)).astype(dtype)
    w = rng.standard_normal((E, M, K) if trans_w else (E, K, M)).astype(dtype)
    return a, w, offsets


# (counts per expert, K, M): T=0, one row, empty experts, E=1, sizes that are no tile multiple
SHAPES_GEMM = [
    ((0, 0, 0), 100, 64),
    ((1,), 100, 37),
    ((2, 0, 8, 5), 781, 150),                    # decode-sized: at most 8 rows an expert
    ((12, 1, 0, 3), 300, 5500),                  # streamed in depth chunks with a tail, two
                                                 # column blocks of 12 rows, L1 pieces
    ((3, 0, 5), 600, 100),
    ((0, 17, 1, 0), 781, 33),
    ((40, 9, 0, 23), 64, 781),
    ((70,), 48, 256),
    ((65, 1, 0, 1, 1, 1), 33, 70),               # few rows on average, one expert too many
                                                 # to stream: streamed and BLAS side by side
]


def test_the_decoding_shape_streams_in_depth_chunks_and_column_blocks():
    """SHAPES_GEMM's decoding case keeps covering what its comment says as the constants move."""
    from fastmoe_nb.kernels.cpu import gemm as kg
    from fastmoe_nb.backends.cpu import route
    offsets = np.array([0, 12, 13, 13, 16])
    light = route(offsets).stream
    assert light.tolist() == [True, True, False, True]
    tasks, _, _ = kg.stream_plan(offsets, light, 300, 5500, False)
    first = tasks[tasks[:, 0] == 0]
    assert len(set(first[:, 1])) == 2 and len(set(first[:, 3])) == 2


def _counts(rng, shape):
    """A case's blocks: (counts, K, M) as written, or a Shape's plan (K = d, M = h)."""
    if isinstance(shape, Shape):
        return tuple(int(c) for c in plan_of(rng, shape).counts), shape.d, shape.h
    return shape


def _gemm_inputs(trans_w):
    def make(rng, shape, dtype):
        counts, K, M = _counts(rng, shape)
        a, w, offsets = make_case(counts, K, M, dtype, trans_w, seed=int(rng.integers(2**31)))
        return [a, w, offsets, trans_w]
    return make


def _gemm(gemm, backward, pack=None):
    def forward(a, w, offsets, trans_w):
        return gemm(a, w if pack is None else pack(w, trans_w), offsets, trans_w=trans_w)
    return forward, lambda dy, a, w, offsets, trans_w: [
        *backward(dy, a, w, offsets, trans_w=trans_w), None, None]


GEMM = _gemm(fm.grouped_gemm, fm.grouped_gemm_backward)
GEMM_REF = _gemm(ref.grouped_gemm, ref.grouped_gemm_backward)
# the shape table's plans, the block structures above, a tiny one for central differences
GEMM_CASES = list(SHAPES.values()) + SHAPES_GEMM + [((2, 0, 3), 5, 4)]


@pytest.mark.parametrize("trans_w", [False, True])
def test_grouped_gemm_and_its_backward(trans_w):
    """Forward, da and dw against the reference (raw weights are packed tile by tile in the
    kernel), inputs unchanged, central differences on the small cases."""
    assert check_op(GEMM, GEMM_REF, _gemm_inputs(trans_w), GEMM_CASES) > 0


@pytest.mark.parametrize("trans_w", [False, True])
def test_grouped_gemm_with_packed_weights(trans_w):
    """PackedWeights, packed once beforehand, give the raw weights' result."""
    check_op(_gemm(fm.grouped_gemm, None, fm.pack_weights)[0], GEMM_REF[0],
             _gemm_inputs(trans_w), GEMM_CASES, grads=False, dtypes=[np.float32])


@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("counts,K,M", SHAPES_GEMM)
def test_grouped_gemm_backward_of_an_empty_expert_is_zero(counts, K, M, trans_w):
    a, w, offsets = make_case(counts, K, M, trans_w=trans_w)
    dy = np.random.default_rng(1).standard_normal((a.shape[0], M)).astype(a.dtype)
    _, dw = fm.grouped_gemm_backward(dy, a, w, offsets, trans_w=trans_w)
    assert not dw[np.diff(offsets) == 0].any()


@pytest.mark.parametrize("call,match", [
    (lambda a, w, o: fm.grouped_gemm(a[0], w, o), "a: expected a 2-D"),
    (lambda a, w, o: fm.grouped_gemm(a, w[0], o), "w: expected a 3-D"),
    (lambda a, w, o: fm.grouped_gemm(a, w.astype(np.float64), o), "w: expected dtype"),
    (lambda a, w, o: fm.grouped_gemm(a.astype(np.int32), w, o), "a: expected float"),
    (lambda a, w, o: fm.grouped_gemm(a[:, :-1], w, o), "w: expected shape"),
    (lambda a, w, o: fm.grouped_gemm(a, w, o[:-1]), "offsets: expected shape"),
    (lambda a, w, o: fm.grouped_gemm(a, w, o[::-1].copy()), "offsets: expected non-decr"),
    (lambda a, w, o: fm.grouped_gemm(a, w, o.astype(np.float64)), "offsets: expected an int"),
    (lambda a, w, o: fm.grouped_gemm_backward(np.zeros((1, 1), np.float32), a, w, o),
     "dy: expected shape"),
])
def test_bad_input_names_the_argument(call, match):
    a, w, offsets = make_case((2, 3), 8, 6)
    with pytest.raises((ValueError, TypeError), match=match):
        call(a, w, offsets)


# --------------------------------------------------------------------------- packed weights

def test_packed_weights_are_a_snapshot():
    """Packing copies: an in-place update of w changes nothing until w is packed again."""
    a, w, offsets = make_case((4, 0, 7), 33, 40)
    pw = fm.pack_weights(w)
    before = fm.grouped_gemm(a, pw, offsets)
    assert_close(before, ref.grouped_gemm(a, w, offsets))
    w *= 2.0
    np.testing.assert_array_equal(fm.grouped_gemm(a, pw, offsets), before)
    assert_close(fm.grouped_gemm(a, fm.pack_weights(w), offsets),
                 ref.grouped_gemm(a, w, offsets))


@pytest.mark.parametrize("trans_w", [False, True])
def test_swiglu_packing_keeps_grouped_gemm_result(trans_w):
    """Interleaved [gate | up] panels (half = 50, not a multiple of the panel) change nothing."""
    a, w, offsets = make_case((9, 3), 20, 100, trans_w=trans_w)
    got = fm.grouped_gemm(a, fm.pack_weights(w, trans_w, swiglu=True), offsets)
    assert_close(got, ref.grouped_gemm(a, w, offsets, trans_w))


def test_packed_weights_bad_input():
    a, w, offsets = make_case((2, 3), 8, 6)
    with pytest.raises(ValueError, match="w: swiglu expects an even"):
        fm.pack_weights(w[:, :, :5], swiglu=True)
    with pytest.raises(TypeError, match="w: expected dtype float64"):
        fm.grouped_gemm(a.astype(np.float64), fm.pack_weights(w), offsets)
    with pytest.raises(ValueError, match="w: expected PackedWeights with K"):
        fm.grouped_gemm(a[:, :4], fm.pack_weights(w), offsets)
    with pytest.raises(ValueError, match="offsets: expected shape"):
        fm.grouped_gemm(a, fm.pack_weights(w), offsets[:-1])


# --------------------------------------------------------------------------- fused experts

def _experts_inputs(activation, trans_w):
    def make(rng, shape, dtype):
        """[xs (N, d), w1, w2, offsets, activation, trans_w] of the case's blocks (K = d,
        M = h), w1 scaled to keep the activations O(1)."""
        counts, d, h = _counts(rng, shape)
        H1 = 2 * h if activation == "swiglu" else h
        seed = int(rng.integers(2**31))
        xs, w1, offsets = make_case(counts, d, H1, dtype, trans_w, seed)
        _, w2, _ = make_case(counts, h, d, dtype, trans_w, seed + 1)
        return [xs, w1 / dtype(np.sqrt(d)), w2 / dtype(np.sqrt(h)), offsets, activation,
                trans_w]
    return make


def _experts(module):
    """experts_forward as a function of (xs, w1, w2) -> ys, its backward from the kept h_pre,
    h_act."""
    def forward(xs, w1, w2, offsets, activation, trans_w):
        return module.experts_forward(xs, w1, w2, offsets, activation, trans_w)[2]

    def backward(d_ys, xs, w1, w2, offsets, activation, trans_w):
        h_pre, h_act, _ = module.experts_forward(xs, w1, w2, offsets, activation, trans_w,
                                                 keep=True)
        return [*module.experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets, activation,
                                         trans_w), None, None, None]
    return forward, backward


@pytest.mark.parametrize("activation,trans_w", [("swiglu", False), ("swiglu", True),
                                                ("gelu", False), ("relu", True)])
def test_experts_forward_and_backward(activation, trans_w):
    """ys, d_xs, dw1, dw2 against the reference on the shape table's plans and the block
    structures above, central differences on the small ones."""
    cases = list(SHAPES.values()) + [((5, 0, 12, 1), 37, 21), ((1, 0, 70, 1, 1, 1, 1), 37, 21),
                                     ((2, 0, 3), 5, 4)]
    assert check_op(_experts(fm), _experts(ref), _experts_inputs(activation, trans_w),
                    cases) > 0


@pytest.mark.parametrize("activation,trans_w,packed,keep", [
    ("swiglu", False, False, True), ("swiglu", True, True, False), ("swiglu", False, True, True),
    ("gelu", False, False, True), ("gelu_tanh", True, False, False), ("relu", False, True, True),
    ("silu", True, True, True),
])
@pytest.mark.parametrize("counts", [(5, 0, 12, 1), (1, 0, 70, 1, 1, 1, 1),   # streamed /
                                    (40, 0, 30, 1)])                  # side by side / BLAS
def test_experts_forward_fused_epilogue(activation, trans_w, packed, keep, counts):
    """The activation in the first GEMM's epilogue: h_pre (when kept), h_act, ys all match."""
    d, h = 37, 21                                 # h odd: swiglu halves cut panels unevenly
    H1 = 2 * h if activation == "swiglu" else h
    xs, w1, offsets = make_case(counts, d, H1, trans_w=trans_w, seed=5)
    _, w2, _ = make_case(counts, h, d, trans_w=trans_w, seed=6)
    w1 *= 0.3
    want = ref.experts_forward(xs, w1, w2, offsets, activation, trans_w, keep=True)
    if packed:
        w1 = fm.pack_weights(w1, trans_w, swiglu=activation == "swiglu")
    h_pre, h_act, ys = fm.experts_forward(xs, w1, w2, offsets, activation, trans_w, keep)
    assert (h_pre is None) == (not keep)
    if keep:
        assert_close(h_pre, want[0])
    assert_close(h_act, want[1])
    assert_close(ys, want[2])


def test_experts_forward_swiglu_with_plain_packing():
    """Panels packed without swiglu=True still give the right answer (unfused path)."""
    xs, w1, offsets = make_case((3, 4), 12, 10, seed=7)
    _, w2, _ = make_case((3, 4), 5, 12, seed=8)
    _, h_act, ys = fm.experts_forward(xs, fm.pack_weights(w1), w2, offsets, "swiglu")
    want = ref.experts_forward(xs, w1, w2, offsets, "swiglu", keep=True)
    assert_close(h_act, want[1])
    assert_close(ys, want[2])


# --------------------------------------------------------------------------- BLAS pool path

# Blocks averaging >= BLAS_MIN_ROWS rows go to per-expert BLAS on backends/pool.py's threads:
# tasks of <= TASK_ROWS rows and dW tasks of <= TASK_COLS columns (kernels/cpu/config.py), so these shapes cut experts into
# several row blocks and dW into several column blocks, with an empty expert among them.
BLAS_CASES = [((300, 0, 70, 513), 33, 600), ((64,), 1030, 17), ((129, 64), 5, 1100)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("counts,K,M", BLAS_CASES)
def test_blas_path_matches_reference(counts, K, M, trans_w, dtype):
    from fastmoe_nb.backends.cpu import large_blocks
    a, w, offsets = make_case(counts, K, M, dtype=dtype, trans_w=trans_w, seed=3)
    assert large_blocks(offsets)                  # the path under test
    dy = np.random.default_rng(4).standard_normal((a.shape[0], M)).astype(dtype)
    assert_close(fm.grouped_gemm(a, w, offsets, trans_w=trans_w),
                 ref.grouped_gemm(a, w, offsets, trans_w))
    assert_close(fm.grouped_gemm_backward(dy, a, w, offsets, trans_w=trans_w),
                 ref.grouped_gemm_backward(dy, a, w, offsets, trans_w))


@pytest.mark.parametrize("activation,trans_w,keep", [
    ("swiglu", False, True), ("swiglu", True, False), ("gelu", False, False),
    ("gelu_tanh", True, True), ("relu", False, True)])
@pytest.mark.parametrize("counts", [(300, 0, 70, 9), (600, 0, 70, 9)])   # FUSED_MAX_ROWS 512
def test_experts_pipeline_matches_reference(activation, trans_w, keep, counts):
    """The per-block pipeline (BLAS, activation in cache, BLAS) and its backward: experts of
    <= FUSED_MAX_ROWS rows as one task each, a larger one per block of rows and of dW's
    columns."""
    from fastmoe_nb.backends.cpu import large_blocks
    d, h = 37, 21
    H1 = 2 * h if activation == "swiglu" else h
    xs, w1, offsets = make_case(counts, d, H1, trans_w=trans_w, seed=5)
    _, w2, _ = make_case(counts, h, d, trans_w=trans_w, seed=6)
    assert large_blocks(offsets)
    w1 *= 0.3
    want = ref.experts_forward(xs, w1, w2, offsets, activation, trans_w, keep=True)
    h_pre, h_act, ys = fm.experts_forward(xs, w1, w2, offsets, activation, trans_w, keep)
    assert (h_pre is None) == (not keep)
    assert_close(h_act, want[1])
    assert_close(ys, want[2])
    d_ys = np.random.default_rng(7).standard_normal(ys.shape).astype(np.float32)
    got = fm.experts_backward(d_ys, xs, want[0], h_act, w1, w2, offsets, activation, trans_w)
    assert_close(got, ref.experts_backward(d_ys, xs, want[0], want[1], w1, w2, offsets,
                                           activation, trans_w))


def test_experts_backward_bad_input_names_the_argument():
    xs, w1, offsets = make_case((100, 100), 8, 12, seed=1)
    _, w2, _ = make_case((100, 100), 6, 8, seed=2)
    h_pre, h_act, ys = fm.experts_forward(xs, w1, w2, offsets, "swiglu", keep=True)
    with pytest.raises(ValueError, match="d_ys"):
        fm.experts_backward(ys[:, :5], xs, h_pre, h_act, w1, w2, offsets, "swiglu")
    with pytest.raises(ValueError, match="h_act"):
        fm.experts_backward(ys, xs, h_pre, h_act[1:], w1, w2, offsets, "swiglu")
    with pytest.raises(ValueError, match="w2"):
        fm.experts_forward(xs, w1, w2[:, :, :5], offsets, "swiglu")


# --------------------------------------------------------------------------- determinism

_THREADS_SCRIPT = r"""
import hashlib, numpy as np, fastmoe_nb as fm
rng = np.random.default_rng(0)
counts = (200, 0, 7, 130)                     # several tiles per expert, an empty expert
off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
N = int(off[-1])
a = rng.standard_normal((N, 300), dtype=np.float32)
w = rng.standard_normal((4, 300, 290), dtype=np.float32)
dy = rng.standard_normal((N, 290), dtype=np.float32)
w2 = rng.standard_normal((4, 145, 300), dtype=np.float32)
outs = [fm.grouped_gemm(a, w, off), *fm.grouped_gemm_backward(dy, a, w, off),
        *fm.grouped_gemm_backward(dy, a, w.transpose(0, 2, 1).copy(), off, trans_w=True),
        *fm.experts_forward(a, w, w2, off, "swiglu", keep=True)]
outs += fm.experts_backward(outs[-1], a, *outs[-3:-1], w, w2, off, "swiglu")
off2 = np.array([0, 600, 600, 670, 679])            # an expert of more than FUSED_MAX_ROWS rows
a2 = rng.standard_normal((679, 300), dtype=np.float32)
fwd = fm.experts_forward(a2, w, w2, off2, "swiglu", keep=True)
outs += [*fwd, *fm.experts_backward(fwd[2], a2, fwd[0], fwd[1], w, w2, off2, "swiglu")]
wide = rng.standard_normal((4, 300, 1100), dtype=np.float32)    # dW in three column blocks
counts = (600, 0, 70, 9)                                         # three row blocks
off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
a = rng.standard_normal((int(off[-1]), 300), dtype=np.float32)
outs += fm.grouped_gemm_backward(fm.grouped_gemm(a, wide, off), a, wide, off)
off = np.array([0, 3, 3, 12, 13])                               # decoding: streamed weights
outs += [fm.grouped_gemm(a[:13], wide, off),
         fm.grouped_gemm(a[:13], wide.transpose(0, 2, 1).copy(), off, trans_w=True),
         *fm.experts_forward(a[:13], wide[:, :, :600], wide[:, :, :300].transpose(0, 2, 1).copy(),
                             off, "swiglu", keep=True)]
off = np.array([0, 3, 3, 43, 44])                  # streamed and BLAS experts side by side
outs += [fm.grouped_gemm(a[:44], wide, off),
         *fm.experts_forward(a[:44], wide[:, :, :600], wide[:, :, :300].transpose(0, 2, 1).copy(),
                             off, "swiglu", keep=True)]
print(hashlib.sha256(b"".join(o.tobytes() for o in outs)).hexdigest())
"""


def test_bitwise_identical_for_1_and_2_threads():
    import os
    import subprocess
    import sys

    digests = []
    for n in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=n)
        r = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        digests.append(r.stdout.strip())
    assert len(digests[0]) == 64 and digests[0] == digests[1]


def test_pool_survives_fork_and_reraises_task_errors():
    """A child forked after the pool started computes (no hang on the parent's pool threads);
    an exception in a task reaches the caller."""
    import multiprocessing as mp

    from fastmoe_nb.backends import pool
    a, w, offsets = make_case((300, 200), 16, 24, seed=2)
    want = fm.grouped_gemm(a, w, offsets)                 # the parent's pool is running
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as p:
        got = p.apply_async(fm.grouped_gemm, (a, w, offsets)).get(timeout=120)
    np.testing.assert_array_equal(got, want)

    def task(t, scratch):
        if t == 3:
            raise RuntimeError("task 3")
    with pytest.raises(RuntimeError, match="task 3"):
        pool.run_tasks(task, list(range(8)))


# --------------------------------------------------------------------------- invariants

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import assert_unchanged, snapshot  # noqa: E402


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(0, 9), min_size=1, max_size=5), K=st.integers(1, 12),
       M=st.integers(1, 12), trans_w=st.booleans(), packed=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1))
def test_grouped_gemm_properties(counts, K, M, trans_w, packed, dtype, seed):
    """Any blocks (empty experts, one row, no rows at all): (N, M) results and gradients in
    their operands' shapes and dtype, as the reference's; an empty expert's dw exactly 0; the
    operands untouched."""
    a, w, offsets = make_case(tuple(counts), K, M, dtype, trans_w, seed)
    dy = np.random.default_rng(seed).standard_normal((a.shape[0], M)).astype(dtype)
    before = snapshot([a, w, offsets, dy])
    y = fm.grouped_gemm(a, fm.pack_weights(w, trans_w) if packed else w, offsets,
                        trans_w=trans_w)
    assert y.shape == (a.shape[0], M) and y.dtype == dtype
    assert_close(y, ref.grouped_gemm(a, w, offsets, trans_w))
    da, dw = fm.grouped_gemm_backward(dy, a, w, offsets, trans_w=trans_w)
    assert da.shape == a.shape and dw.shape == w.shape
    assert_close((da, dw), ref.grouped_gemm_backward(dy, a, w, offsets, trans_w))
    assert not dw[np.diff(offsets) == 0].any()
    assert_unchanged([a, w, offsets, dy], before)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["a", "w", "offsets"]), change=st.sampled_from(["rank", "dtype"]))
def test_grouped_gemm_names_the_bad_argument(name, change):
    args = dict(zip(("a", "w", "offsets"), make_case((2, 0, 3), 4, 6)))
    a = args[name]
    # a sets the working dtype (another float one makes w the mismatch): an integer a
    wrong = {"a": np.int32, "w": np.float64, "offsets": np.float32}[name]
    args[name] = a[0] if change == "rank" else a.astype(wrong)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: "):
        fm.grouped_gemm(args["a"], args["w"], args["offsets"])


@settings(max_examples=30, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=4), d=st.integers(1, 9),
       h=st.integers(1, 6), activation=st.sampled_from(fm.ACTIVATIONS), trans_w=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 2**31 - 1))
def test_experts_properties(counts, d, h, activation, trans_w, dtype, seed):
    """experts_forward / experts_backward on any blocks: shapes, the reference's values, the
    operands untouched."""
    r = np.random.default_rng(seed)
    xs, w1, w2, offsets, _, _ = _experts_inputs(activation, trans_w)(
        r, (tuple(counts), d, h), dtype)
    N, H1 = xs.shape[0], 2 * h if activation == "swiglu" else h
    d_ys = r.standard_normal((N, d)).astype(dtype)
    before = snapshot([xs, w1, w2, offsets, d_ys])
    got = fm.experts_forward(xs, w1, w2, offsets, activation, trans_w, keep=True)
    assert [g.shape for g in got] == [(N, H1), (N, h), (N, d)]
    want = ref.experts_forward(xs, w1, w2, offsets, activation, trans_w, keep=True)
    assert_close(got, want)
    assert_close(fm.experts_backward(d_ys, xs, *got[:2], w1, w2, offsets, activation, trans_w),
                 ref.experts_backward(d_ys, xs, *want[:2], w1, w2, offsets, activation,
                                      trans_w))
    assert_unchanged([xs, w1, w2, offsets, d_ys], before)
