"""Expert weights in a format (fastmoe_nb.formats: bf16, q8_0, q4_0, q4_k, q6_k) wherever float
weights are taken: grouped_gemm, experts_forward / experts_backward, moe_forward / moe_backward,
routed_experts. Each is checked against the same op on the float32 weights the format decodes
to (fastmoe_nb.formats.dequantize): the products then agree within float32 rounding, whatever
the format's own error. Weights in a format are frozen: no weight gradient, an error if asked.
"""
import numpy as np
import pytest

import fastmoe_nb as fm
import fastmoe_nb.reference as ref
from fastmoe_nb import formats as F
from fastmoe_nb.interop import routed_experts, routed_experts_backward
from helpers import assert_close

FORMATS = ("bf16", "q8_0", "q4_0", "q4_k", "q6_k")


def _weights(rng, shape, fmt):
    """Float weights of shape, their format, and what that decodes to (float32)."""
    w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    q = F.quantize(w, fmt)
    return q, F.dequantize(q)


def _offsets(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# rows per expert: decoding (a few rows each, one expert empty), prefill-sized blocks, E = 1
COUNTS = [(1, 0, 3, 2), (40, 0, 70, 9), (5,)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trans_w", [False, True])
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_gemm_equals_the_decoded_weights(rng, fmt, trans_w, counts):
    K, M = 256, 512
    offsets = _offsets(counts)
    E = len(counts)
    q, w = _weights(rng, (E, M, K) if trans_w else (E, K, M), fmt)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    got = fm.grouped_gemm(a, q, offsets, trans_w=trans_w)
    assert_close(got, ref.grouped_gemm(a, w, offsets, trans_w))
    np.testing.assert_array_equal(got, fm.grouped_gemm(a, q, offsets, trans_w=trans_w))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trans_w,activation", [(False, "swiglu"), (True, "swiglu"),
                                                (False, "gelu"), (True, "relu")])
def test_experts_forward_and_backward(rng, fmt, trans_w, activation):
    d, h, counts = 256, 256, (7, 0, 30, 1)
    H1 = 2 * h if activation == "swiglu" else h
    offsets = _offsets(counts)
    E = len(counts)
    q1, w1 = _weights(rng, (E, H1, d) if trans_w else (E, d, H1), fmt)
    q2, w2 = _weights(rng, (E, d, h) if trans_w else (E, h, d), fmt)
    xs = rng.standard_normal((int(offsets[-1]), d)).astype(np.float32)
    h_pre, h_act, ys = fm.experts_forward(xs, q1, q2, offsets, activation, trans_w, keep=True)
    r_pre, r_act, r_ys = ref.experts_forward(xs, w1, w2, offsets, activation, trans_w,
                                             keep=True)
    assert_close(h_pre, r_pre)
    assert_close(ys, r_ys)
    d_ys = rng.standard_normal(ys.shape).astype(np.float32)
    d_xs, dw1, dw2 = fm.experts_backward(d_ys, xs, h_pre, h_act, q1, q2, offsets, activation,
                                         trans_w)
    want = ref.experts_backward(d_ys, xs, r_pre, r_act, w1, w2, offsets, activation, trans_w)
    assert_close(d_xs, want[0])
    assert dw1 is None and dw2 is None               # frozen


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 8, 300])
def test_moe_layer_forward_and_backward(rng, fmt, T):
    """The layer with experts in a format and a float shared expert: y, dx and every float
    parameter's gradient as with the decoded weights; no w1 / w2 gradient."""
    d, h, E, k = 256, 256, 4, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    router_w = (rng.standard_normal((d, E)) / 16).astype(np.float32)
    q1, w1 = _weights(rng, (E, d, 2 * h), fmt)
    q2, w2 = _weights(rng, (E, h, d), fmt)
    shared = dict(shared_w1=(rng.standard_normal((d, 64)) / 16).astype(np.float32),
                  shared_w2=(rng.standard_normal((32, d)) / 6).astype(np.float32))
    y = fm.moe_forward(x, router_w, q1, q2, k, **shared)
    y2, ctx = fm.moe_forward(x, router_w, q1, q2, k, return_context=True, **shared)
    yf, ctxf = fm.moe_forward(x, router_w, w1, w2, k, return_context=True, **shared)
    assert_close(y, yf)
    np.testing.assert_array_equal(y, y2)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, grads = fm.moe_backward(dy, ctx)
    dxf, gradsf = fm.moe_backward(dy, ctxf)
    assert sorted(grads) == ["router_w", "shared_w1", "shared_w2"]
    assert_close(dx, dxf)
    for name, g in grads.items():
        assert_close(g, gradsf[name], err_msg=name)
    with pytest.raises(ValueError, match="'w1' is not a gradient of this layer"):
        fm.moe_backward(dy, ctx, grads={"w1": np.zeros(w1.shape, np.float32)})


@pytest.mark.parametrize("fmt", ["bf16", "q4_0"])
def test_routed_experts_in_a_format(rng, fmt):
    T, d, h, E, k = 20, 256, 256, 4, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    q1, w1 = _weights(rng, (E, 2 * h, d), fmt)
    q2, w2 = _weights(rng, (E, d, h), fmt)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
    weights = rng.random((T, k)).astype(np.float32)
    y = routed_experts(x, experts, weights, q1, q2, trans_w=True)
    assert_close(y, ref.routed_experts(x, experts, weights, w1, w2, "swiglu", True))
    y2, ctx = routed_experts(x, experts, weights, q1, q2, trans_w=True, return_context=True)
    dx, d_weights, dw1, dw2 = routed_experts_backward(np.ones_like(y), ctx)
    _, rctx = ref.routed_experts(x, experts, weights, w1, w2, "swiglu", True,
                                 return_context=True)
    want = ref.routed_experts_backward(np.ones_like(y), rctx)
    assert_close(dx, want[0])
    assert_close(d_weights, want[1])
    assert dw1 is None and dw2 is None


def test_bad_input_names_the_argument(rng):
    q, _ = _weights(rng, (2, 256, 64), "q8_0")
    a = rng.standard_normal((4, 256)).astype(np.float32)
    offsets = np.array([0, 2, 4])
    with pytest.raises(TypeError, match="w: q8_0 weights are frozen"):
        fm.grouped_gemm_backward(np.ones((4, 64), np.float32), a, q, offsets)
    with pytest.raises(TypeError, match="w: q8_0 weights compute in float32"):
        fm.grouped_gemm(a.astype(np.float64), q, offsets)
    with pytest.raises(ValueError, match="w: expected shape"):
        fm.grouped_gemm(a[:, :128], q, offsets)
    x = rng.standard_normal((4, 256))
    q1, _ = _weights(rng, (2, 256, 128), "q4_0")
    q2, _ = _weights(rng, (2, 64, 256), "q4_0")
    with pytest.raises(TypeError, match="w1: q4_0 weights compute in float32"):
        fm.moe_forward(x, rng.standard_normal((256, 2)), q1, q2, 1)
    xs = a
    h_pre, h_act, ys = fm.experts_forward(xs, q1, q2, offsets, "swiglu", keep=True)
    with pytest.raises(ValueError, match="into: w1, w2 in a format get no weight gradient"):
        fm.experts_backward(np.ones_like(ys), xs, h_pre, h_act, q1, q2, offsets, "swiglu",
                            into=(np.zeros((2, 256, 128), np.float32), None))


# --------------------------------------------------------------------------- stacked weights

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("trans_w", [False, True])
def test_stacked_weight_equals_its_parts_concatenated(rng, fmt, trans_w):
    """formats.stack(gate, up): parts of 96 and 160 rows along axis 1, never copied, run as
    the concatenated weight. trans_w: the parts are blocks of output columns; else blocks of
    the depth, whose products are summed. Experts 0 and 3 have a few rows (streamed: the
    decoding kernel part by part), expert 2 has 40 (BLAS on decoded panels, which cross the
    parts' boundary), expert 1 none."""
    K, M = 256, 256
    counts = (2, 0, 40, 1)
    offsets = _offsets(counts)
    E = len(counts)
    inner = K if trans_w else M                       # the blocked last axis
    qa, wa = _weights(rng, (E, 96, inner), fmt)
    qb, wb = _weights(rng, (E, 160, inner), fmt)
    q = F.stack(qa, qb)
    assert q.stacked and q.shape == (E, 256, inner) and q.nbytes == qa.nbytes + qb.nbytes
    assert q.blocks[0] is qa.blocks and q.blocks[1] is qb.blocks
    w = np.concatenate([wa, wb], axis=1)
    np.testing.assert_array_equal(F.dequantize(q), w)
    np.testing.assert_array_equal(F.dequantize(q, E - 1), w[E - 1])
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    got = fm.grouped_gemm(a, q, offsets, trans_w=trans_w)
    assert_close(got, ref.grouped_gemm(a, w, offsets, trans_w))
    np.testing.assert_array_equal(got, fm.grouped_gemm(a, q, offsets, trans_w=trans_w))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_layer_on_stacked_gate_and_up(rng, fmt):
    """The GGUF layout: w1 = stack(gate (E, h, d), up (E, h, d)) with trans_w=True; forward
    and the frozen experts' backward (dx, router gradient) as with the decoded weights."""
    T, d, h, E, k = 24, 256, 256, 4, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    router_w = (rng.standard_normal((d, E)) / 16).astype(np.float32)
    (qg, wg), (qu, wu) = _weights(rng, (E, h, d), fmt), _weights(rng, (E, h, d), fmt)
    q2, w2 = _weights(rng, (E, d, h), fmt)
    q1, w1 = F.stack(qg, qu), np.concatenate([wg, wu], axis=1)
    y, ctx = fm.moe_forward(x, router_w, q1, q2, k, trans_w=True, return_context=True)
    yf, ctxf = fm.moe_forward(x, router_w, w1, w2, k, trans_w=True, return_context=True)
    assert_close(y, yf)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, grads = fm.moe_backward(dy, ctx)
    dxf, gradsf = fm.moe_backward(dy, ctxf)
    assert sorted(grads) == ["router_w"]
    assert_close(dx, dxf)
    assert_close(grads["router_w"], gradsf["router_w"])


def test_stack_bad_input(rng):
    q8, _ = _weights(rng, (2, 4, 64), "q8_0")
    q4, _ = _weights(rng, (2, 4, 64), "q4_0")
    with pytest.raises(ValueError, match=r"weights\[1\]: expected the format"):
        F.stack(q8, q4)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape"):
        F.stack(q8, _weights(rng, (3, 4, 64), "q8_0")[0])
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape"):
        F.stack(q8, _weights(rng, (2, 4, 96), "q8_0")[0])
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        F.stack(np.zeros((2, 4, 64), np.float32))
    with pytest.raises(ValueError, match=r"weights\[1\]: expected the activations of "
                                         r"weights\[0\], 'q8_0', got 'f32'"):
        F.stack(q8.with_activations("q8_0"), q8)
    assert F.stack(q8.with_activations("q8_0"), q8.with_activations("q8_0")).activations \
        == "q8_0"
    with pytest.raises(ValueError, match="blocks: the parts hold 8 rows"):
        F.QuantizedWeights("q8_0", (2, 9, 64), (q8.blocks, q8.blocks))
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected a part's blocks"):
        F.QuantizedWeights("q8_0", (2, 8, 64), (q8.blocks, q8.blocks.reshape(-1)))


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
@pytest.mark.parametrize("trans_w", [False, True])
def test_blocks_not_contiguous_as_a_whole_take_the_numpy_codec(rng, fmt, trans_w):
    """Every other expert of a larger array (each row contiguous, the whole not): no kernel
    decodes such blocks, backends/cpu.py takes formats.py's NumPy codec, on the streamed
    (a few rows) and the BLAS (many rows) routes alike, with the decoded weights' products."""
    from fastmoe_nb.backends import cpu as be
    K, M, counts = 256, 512, (1, 0, 40, 3)
    offsets = _offsets(counts)
    E = len(counts)
    shape = (E, M, K) if trans_w else (E, K, M)
    q_all, _ = _weights(rng, (2 * E,) + shape[1:], fmt)
    q = F.from_blocks(q_all.blocks[::2], fmt, shape)
    assert not q.blocks.flags.c_contiguous and be._kernel_format(q) is None
    assert be._kernel_format(F.from_blocks(q.blocks.copy(), fmt, shape)) is not None
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    got = fm.grouped_gemm(a, q, offsets, trans_w=trans_w)
    assert_close(got, ref.grouped_gemm(a, F.dequantize(q), offsets, trans_w))
