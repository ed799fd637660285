"""Expert weights in a format on the device: QuantizedWeights whose blocks are a device array
(bf16, q8_0, q4_0) in the grouped GEMM, the experts and the layer, forward and frozen backward.

The kernels decode each weight to exactly the float32 value formats.dequantize gives and then
run the float32 kernel's tiles and sums, so the results are compared bitwise with the float32
kernel on the dequantized weights, and with the float64 reference within float32 rounding.
Tiny shapes (the simulator runs every thread in Python); a q8_0 / q4_0 weight's block axis is 32.
"""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import reference as ref
from fastmoe_nb.backends import cuda as kc
from fastmoe_nb.checks import check_quantized
from fastmoe_nb.formats import dequantize, quantize
from fastmoe_nb.kernels.common import SWIGLU
from fastmoe_nb.kernels.cuda import WEIGHT_FORMATS
from fastmoe_nb.kernels.cuda import gemm as kg

from helpers import assert_close, is_device, make_layer, to_device, to_host


def offsets_of(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def equal(got, want):
    np.testing.assert_array_equal(to_host(got), to_host(want))


def test_formats_listed_are_the_kernels():
    assert set(WEIGHT_FORMATS) == {"f32", "f64", *kg.LOADS}


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "q4_0"])
@pytest.mark.parametrize("trans_w", [False, True])
def test_grouped_gemm_formats(rng, fmt, trans_w):
    # an empty expert, rows and the free axis (5) off the 8x8x4 tiles; blocks along the last
    # axis: M = 32 for w (E, K, M), K = 32 for trans_w's (E, M, K)
    o = offsets_of([3, 0, 6])
    shape = (3, 5, 32)
    K = 32 if trans_w else 5
    a = rng.standard_normal((int(o[-1]), K)).astype(np.float32)
    qw = quantize(rng.standard_normal(shape).astype(np.float32), fmt)
    blocks = qw.blocks.copy()
    dw = kc.to_device(qw)
    assert dw.format == fmt and dw.shape == shape and is_device(dw.blocks)
    got = fm.grouped_gemm(to_device(a), dw, to_device(o), trans_w=trans_w)
    assert is_device(got)
    wf = dequantize(qw)
    equal(got, fm.grouped_gemm(to_device(a), to_device(wf), o, trans_w=trans_w))
    assert_close(got, ref.grouped_gemm(a, wf, o, trans_w))
    np.testing.assert_array_equal(qw.blocks, blocks)                 # nothing modified
    equal(dw.blocks, blocks)


@pytest.mark.parametrize("fmt", ["bf16", "q4_0"])
def test_swiglu_epilogue_formats(rng, fmt):
    # the fused swiglu epilogue reads a gate and an up column of the blocks per output
    o = offsets_of([4, 3])
    qw = quantize(rng.standard_normal((2, 3, 64)).astype(np.float32), fmt)
    a = rng.standard_normal((7, 3)).astype(np.float32)
    got = kc.grouped_gemm(to_device(a), kc.to_device(qw), o, False, SWIGLU)
    equal(got, kc.grouped_gemm(to_device(a), to_device(dequantize(qw)), o, False, SWIGLU))
    assert_close(got, ref.activate(ref.grouped_gemm(a, dequantize(qw), o), "swiglu"))


def test_moe_forward_backward_frozen(rng):
    # q8_0 w1 through the fused swiglu epilogue, bf16 w2; the backward reads both in the other
    # layout. d = 5 keeps the router cheap, swiglu's 2h = 32 columns hold the q8_0 blocks
    layer = make_layer(rng, 4, 5, 16, 3)
    x, router_w, kw = layer.x, layer.router_w, layer.kw
    qs = [quantize(layer.w1, "q8_0"), quantize(layer.w2, "bf16")]
    wf = [to_device(dequantize(q)) for q in qs]
    dev_q = [kc.to_device(q) for q in qs]
    dx_, dr = to_device(x), to_device(router_w)
    y = fm.moe_forward(dx_, dr, *dev_q, 2, **kw)                     # fused epilogue
    assert_close(y, ref.moe_forward(x, router_w, *map(to_host, wf), 2, **kw))
    y, ctx = fm.moe_forward(dx_, dr, *dev_q, 2, return_context=True, **kw)
    yf, ctx_f = fm.moe_forward(dx_, dr, *wf, 2, return_context=True, **kw)
    equal(y, yf)
    dy = to_device(rng.standard_normal(x.shape).astype(np.float32))
    dx, grads = fm.moe_backward(dy, ctx)
    dx_f, grads_f = fm.moe_backward(dy, ctx_f)
    assert sorted(grads) == ["router_w"]                              # frozen experts
    equal(dx, dx_f)
    equal(grads["router_w"], grads_f["router_w"])


def test_experts_backward_frozen(rng):
    # experts_backward on weights in a format, trans_w (the backward reads them as (E, K, M)):
    # the inputs' gradient, no weight gradient; q4_0 w1 (E, 2h, d) holds its blocks along d
    o = offsets_of([2, 0, 3])
    xs = rng.standard_normal((5, 32)).astype(np.float32)
    w1 = quantize(rng.standard_normal((3, 6, 32)).astype(np.float32) / 6, "q4_0")
    w2 = quantize(rng.standard_normal((3, 32, 3)).astype(np.float32), "bf16")
    dev_w = [kc.to_device(w) for w in (w1, w2)]
    h_pre, h_act, ys = fm.experts_forward(to_device(xs), *dev_w, o, "swiglu", trans_w=True,
                                          keep=True)
    d_ys = rng.standard_normal((5, 32)).astype(np.float32)
    got = fm.experts_backward(to_device(d_ys), to_device(xs), h_pre, h_act, *dev_w, o,
                              "swiglu", trans_w=True)
    assert got[1] is None and got[2] is None
    want = ref.experts_backward(d_ys, xs, to_host(h_pre), to_host(h_act), dequantize(w1),
                                dequantize(w2), o, "swiglu", trans_w=True)
    assert_close(got[0], want[0])
    with pytest.raises(TypeError, match="w: bf16 weights are frozen"):
        fm.grouped_gemm_backward(ys, h_act, dev_w[1], o, trans_w=True)


def test_device_blocks_and_errors(rng):
    w = rng.standard_normal((2, 3, 32)).astype(np.float32)
    qb, q4 = quantize(w, "bf16"), quantize(w, "q4_0")
    a = to_device(rng.standard_normal((4, 3)).astype(np.float32))
    o = offsets_of([1, 3])
    # blocks already on the device: bf16 bits as int16 (a torch bf16 tensor's view), q4_0's
    # bytes flat; both are taken as they are
    bits = to_device(qb.blocks.view(np.int16))
    from_int16 = kc.on_device(bits, "bf16", (2, 3, 32))
    equal(fm.grouped_gemm(a, from_int16, o), fm.grouped_gemm(a, kc.to_device(qb), o))
    equal(fm.grouped_gemm(a, kc.to_device(quantize(w, "f32")), o),     # plain floats
          fm.grouped_gemm(a, to_device(w), o))
    flat = kc.on_device(to_device(q4.blocks.reshape(-1)), "Q4_0", [2, 3, 32])
    assert flat.blocks.shape == q4.blocks.shape and flat.nbytes == q4.nbytes
    with pytest.raises(ValueError, match="format: the CUDA kernels read f32, f64, bf16, q8_0"):
        kc.to_device(quantize(rng.standard_normal((1, 1, 256)).astype(np.float32), "q4_k"))
    with pytest.raises(TypeError, match="w1: q4_k weights run on the CPU only; on CUDA pass"):
        check_quantized("w1", quantize(w[:1, :1].repeat(8, axis=2), "q4_k"), "cuda")
    assert check_quantized("w1", qb, "cuda") is qb
    with pytest.raises(TypeError, match="qw: expected QuantizedWeights"):
        kc.to_device(w)
    with pytest.raises(TypeError, match="blocks: expected a device array"):
        kc.on_device(qb.blocks, "bf16", (2, 3, 32))
    with pytest.raises(TypeError, match="blocks: expected uint8 blocks for a q4_0 weight"):
        kc.on_device(bits, "q4_0", (2, 3, 32))
    with pytest.raises(ValueError, match=r"blocks: expected shape \(2, 3, 18\)"):
        kc.on_device(to_device(q4.blocks[:, :2]), "q4_0", (2, 3, 32))
    with pytest.raises(ValueError, match="shape: the last axis .* multiple of the q4_0 block"):
        kc.on_device(to_device(q4.blocks), "q4_0", (2, 3, 36))
    # host weights with device activations, float64 activations with float32 decoding
    with pytest.raises(TypeError, match="mixed host and device arrays: a on the GPU but w"):
        fm.grouped_gemm(a, qb, o)
    with pytest.raises(TypeError, match="w: bf16 weights compute in float32"):
        fm.grouped_gemm(to_device(np.zeros((4, 3))), kc.to_device(qb), o)
    layer = make_layer(rng, 3, 32, 16, 2)
    dq = [kc.to_device(quantize(w_, "q8_0")) for w_ in (layer.w1, layer.w2)]
    with pytest.raises(TypeError, match="mixed host and device arrays: .* but w1 on the host"):
        fm.moe_forward(to_device(layer.x), to_device(layer.router_w), quantize(layer.w1, "q8_0"),
                       dq[1], 2)
