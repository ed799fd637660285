"""kernels/cpu/bf16dot.py: native bf16 dot products (vdpbf16ps) for bf16 weights whose
activations are rounded to bf16 (QuantizedWeights.activations == "bf16"), and the opt-in's
fallback to the exact float32 path on CPUs without AVX512_BF16.

Tolerances:
- The kernel computes sums of products of bf16 values, each product exact in float32 (8-bit
  significands), accumulated in float32. Against the float64 sum of the same products (the
  bf16-rounded activations times the bf16 weights) the error is that of a float32 sum of K
  terms: at most about K * 2^-24 * sum_k |a_k w_k| (recursive summation; the kernel adds two
  products per step, which is no worse). So |got - want| <= K * 2^-24 * sum |a w| is a bound,
  not a fit (the data has no subnormals, which the instruction would flush to zero).
- Against the exact product of the float32 activations (the default path), rounding an
  activation to bf16 moves it by at most 2^-9 of itself, so the sums move by at most
  2^-9 * sum_k |a_k w_k|, plus both sides' float32 rounding (2 K 2^-24 of the same sum).
The native tests run only where the host has AVX512_BF16 (skipped elsewhere); the fallback and
the argument checks run everywhere.
"""
import numba
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import formats as F
from fastmoe_nb.backends import cpu as be
from fastmoe_nb.kernels.cpu import bf16dot as kb
from fastmoe_nb.kernels.cpu.config import HN, NR, QSTREAM_ROWS

native = pytest.mark.skipif(not kb.NATIVE, reason="this CPU has no AVX512_BF16 (vdpbf16ps)")
U = 2.0 ** -24


def bf16_bits(x):
    """float32 -> bf16 bits (uint16), round to nearest even (NumPy, finite values)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def offsets_of(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def products(a, w, offsets, trans):
    """float64 a_e @ B_e and |a_e| @ |B_e| per expert, B_e = w[e] (trans: w[e].T)."""
    N, M = a.shape[0], w.shape[1] if trans else w.shape[2]
    want, mag = np.zeros((N, M)), np.zeros((N, M))
    a = a.astype(np.float64)
    for e in range(offsets.shape[0] - 1):
        lo, hi = offsets[e], offsets[e + 1]
        b = w[e].astype(np.float64)
        b = b.T if trans else b
        want[lo:hi], mag[lo:hi] = a[lo:hi] @ b, np.abs(a[lo:hi]) @ np.abs(b)
    return want, mag


# --------------------------------------------------------------------------- rounding, packing

@pytest.mark.parametrize("K", [1, 2, 33, 64])
def test_round_pairs_is_round_to_nearest_even(rng, K):
    a = rng.standard_normal((5, K)).astype(np.float32) * np.float32(1e3)
    bits = a.view(np.uint32)
    bits[0, 0] = 0x3F808000          # a tie: rounds to the even 0x3F80
    if K > 1:
        bits[0, 1] = 0x3F818000      # a tie: rounds up to the even 0x3F82
    bits[1, 0] = 0x7F7FFFFF          # float32's largest rounds to +Inf
    bits[2, 0] = 0xFF800000          # -Inf stays -Inf
    got = np.empty((5, kb.pairs(K)), np.uint32)
    kb.round_pairs(a, got)
    want = np.zeros((5, 2 * kb.pairs(K)), np.uint16)
    want[:, :K] = bf16_bits(a)
    np.testing.assert_array_equal(got, want.view(np.uint32))
    assert got[0, 0] & 0xFFFF == 0x3F80 and got[1, 0] & 0xFFFF == 0x7F80
    a[3, 0] = np.nan                 # NaN stays NaN
    kb.round_pairs(a, got)
    assert np.isnan(bf16_value(np.array([got[3, 0] & 0xFFFF], np.uint16)))[0]


@pytest.mark.parametrize("trans,K", [(False, 21), (True, 21), (True, 40)])
@pytest.mark.parametrize("half", [0, 13])
def test_pack_pairs_layout(rng, trans, K, half):
    M = 2 * half if half else 37
    w = rng.integers(0, 1 << 16, (2, M, K) if trans else (2, K, M), dtype=np.uint16)
    w32 = w.view(np.uint32) if trans and K % 2 == 0 else np.empty((0, 0, 0), np.uint32)
    P = -(-half // HN) if half else -(-M // NR)
    p0, p1 = 3, kb.pairs(K)
    buf = np.full((P, kb.KCP, NR), 7, np.uint32)
    kb.pack_pairs(w, w32, trans, 1, 0, P, p0, p1, half, M, K, buf)
    b = w[1].T if trans else w[1]                        # B: (K, M) bits
    bpad = np.zeros((2 * p1, M), np.uint32)
    bpad[:K] = b
    for q in range(P):
        for j in range(NR):
            if half == 0:
                c = q * NR + j if q * NR + j < M else -1
            else:
                c = q * HN + (j % HN)
                c = -1 if c >= half else (c if j < HN else half + c)
            for p in range(p0, p1):
                want = 0 if c < 0 else int(bpad[2 * p, c]) | int(bpad[2 * p + 1, c]) << 16
                assert buf[q, p - p0, j] == want, (q, j, p)


# --------------------------------------------------------------------------- the kernel

SHAPES = [  # (counts per expert, K, M): odd depth, depths and widths off every block size,
    ((37, 0, 5), 101, 781),          # an empty expert, rows off MR
    ((1, 200), 100, 600),            # a one-row expert, a row block past MC
    ((13,), 64, 16),                 # E = 1, one panel
    ((9, 3), 301, 47),               # more depth than a chunk (KCP pairs), odd K
]


@native
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("counts,K,M", SHAPES)
def test_kernel_against_float64_products_of_the_bf16_values(rng, trans, counts, K, M):
    offsets = offsets_of(counts)
    E, N = len(counts), int(offsets[-1])
    a = rng.standard_normal((N, K)).astype(np.float32)
    w = bf16_bits(rng.standard_normal((E, M, K) if trans else (E, K, M)))
    out = np.full((N, M), np.nan, np.float32)
    kb.run(a, w, trans, M, be.expert_tiles(offsets, be.num_panels(M, 0), kb.pairs(K)), out)
    want, mag = products(bf16_value(bf16_bits(a)), bf16_value(w), offsets, trans)
    assert np.all(np.abs(out - want) <= K * U * mag + 1e-35)


@native
@pytest.mark.parametrize("trans", [False, True])
def test_kernel_swiglu_epilogue(rng, trans):
    # swiglu-interleaved panels: the pre-activation back in its [gate | up] halves, and
    # act_out = silu(gate) * up of the same float32 values
    counts, K, half = (30, 0, 7), 66, 45
    offsets = offsets_of(counts)
    E, N, M = len(counts), int(offsets[-1]), 2 * half
    a = rng.standard_normal((N, K)).astype(np.float32)
    w = bf16_bits(rng.standard_normal((E, M, K) if trans else (E, K, M)))
    h_pre, h_act = np.empty((N, M), np.float32), np.empty((N, half), np.float32)
    kb.run(a, w, trans, M, be.expert_tiles(offsets, be.num_panels(M, half), kb.pairs(K)),
           h_pre, half=half, act_out=h_act, code=fm.kernels.common.SWIGLU)
    want, mag = products(bf16_value(bf16_bits(a)), bf16_value(w), offsets, trans)
    assert np.all(np.abs(h_pre - want) <= K * U * mag + 1e-35)
    g, u = h_pre[:, :half].astype(np.float64), h_pre[:, half:].astype(np.float64)
    np.testing.assert_allclose(h_act, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- through the ops

def _bf16_weights(rng, E, K, M, trans):
    w = (rng.standard_normal((E, M, K) if trans else (E, K, M)) / np.sqrt(K)).astype(np.float32)
    return F.quantize(w, "bf16")


# prefill-sized experts, and streamed ones (<= QSTREAM_ROWS rows: the exact decoding GEMM)
# beside kernel ones in one product
COUNTS = [(70, 0, 41), (2, QSTREAM_ROWS + 9, QSTREAM_ROWS, 1)]


@native
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_gemm_with_bf16_activations(rng, trans, counts):
    K, M = 130, 200
    offsets = offsets_of(counts)
    q = _bf16_weights(rng, len(counts), K, M, trans)
    qn = q.with_activations("bf16")
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    exact = fm.grouped_gemm(a, q, offsets, trans_w=trans)
    got = fm.grouped_gemm(a, qn, offsets, trans_w=trans)
    w = F.dequantize(q)
    want, mag = products(a, w, offsets, trans)
    assert np.all(np.abs(got - want) <= (2.0 ** -9 + 2 * K * U) * mag + 1e-35)
    # the kernel rows multiplied the rounded activations: within float32 rounding of those
    rounded, rmag = products(bf16_value(bf16_bits(a)), w, offsets, trans)
    counts_ = np.diff(offsets)
    big = np.repeat(~be.route(offsets, quantized=True).stream, counts_)
    assert np.all(np.abs(got - rounded)[big] <= K * U * rmag[big] + 1e-35)
    assert not np.array_equal(got[big], exact[big])      # the native path did run
    np.testing.assert_array_equal(got, fm.grouped_gemm(a, qn, offsets, trans_w=trans))


@native
def test_bitwise_the_same_for_any_thread_count(rng):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    counts, K, M = (150, 3, 0, 260), 96, 300
    offsets = offsets_of(counts)
    qn = _bf16_weights(rng, len(counts), K, M, True).with_activations("bf16")
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = fm.grouped_gemm(a, qn, offsets, trans_w=True)
        numba.set_num_threads(2)
        two = fm.grouped_gemm(a, qn, offsets, trans_w=True)
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(one, two)


@native
def test_moe_forward_and_backward_with_bf16_activations(rng):
    T, d, h, E, k = 96, 64, 48, 4, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    router_w = rng.standard_normal((d, E)).astype(np.float32)
    q1 = _bf16_weights(rng, E, d, 2 * h, True)
    q2 = _bf16_weights(rng, E, h, d, True)
    n1, n2 = q1.with_activations("bf16"), q2.with_activations("bf16")
    y, ctx = fm.moe_forward(x, router_w, n1, n2, k, trans_w=True, return_context=True)
    y0, ctx0 = fm.moe_forward(x, router_w, q1, q2, k, trans_w=True, return_context=True)
    # two products and an activation, each input rounded to 2^-9: a few times 2^-9 of |y|'s
    # scale (a loose bound; the products' own bounds are the tests above)
    scale = np.abs(y0).max()
    assert np.abs(y - y0).max() <= 8 * 2.0 ** -9 * scale and not np.array_equal(y, y0)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, _ = fm.moe_backward(dy, ctx)
    dx0, _ = fm.moe_backward(dy, ctx0)
    assert np.abs(dx - dx0).max() <= 8 * 2.0 ** -9 * np.abs(dx0).max()


# --------------------------------------------------------------------------- everywhere

def test_without_the_instruction_the_exact_path_runs(rng, monkeypatch):
    monkeypatch.setattr(kb, "NATIVE", False)
    counts, K, M = (40, 0, 7), 64, 96
    offsets = offsets_of(counts)
    q = _bf16_weights(rng, len(counts), K, M, True)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    np.testing.assert_array_equal(fm.grouped_gemm(a, q.with_activations("bf16"), offsets,
                                                  trans_w=True),
                                  fm.grouped_gemm(a, q, offsets, trans_w=True))
    with pytest.raises(RuntimeError, match="AVX512_BF16"):
        kb.run(a, q.blocks, True, M, be.expert_tiles(offsets, be.num_panels(M, 0),
                                                     kb.pairs(K)), np.empty((47, M), np.float32))


def test_activations_argument(rng):
    w = rng.standard_normal((2, 8, 64)).astype(np.float32)
    q = F.quantize(w, "bf16")
    assert q.activations == "f32"
    qn = F.quantize(w, "bf16", activations="bf16")
    assert qn.activations == "bf16" and "activations='bf16'" in repr(qn)
    np.testing.assert_array_equal(qn.blocks, q.blocks)
    v = q.with_activations("bf16")
    assert v.blocks is q.blocks and q.activations == "f32"           # no copy, q unchanged
    assert v.with_activations("f32").activations == "f32"
    with pytest.raises(ValueError, match="activations"):
        F.quantize(w, "q8_0", activations="bf16")
    with pytest.raises(ValueError, match="activations"):
        F.quantize(w, "q8_0").with_activations("bf16")
    with pytest.raises(ValueError, match="activations"):
        q.with_activations("fp8")


@native
@pytest.mark.parametrize("activation,trans", [("swiglu", True), ("gelu", False),
                                               ("relu", True)])
def test_fused_first_product_equals_the_unfused_one(rng, activation, trans):
    # a prefill with w1 native runs the gather and the activation inside w1's product
    # (backends/cpu.py _native_first): h_pre the same bits as grouped_gemm's, h_act its
    # activation, and moe_forward without a context (rows gathered by tokens) the same bits as
    # with one (rows permuted first)
    T, d, h, E, k = 80, 48, 40, 3, 2
    H1 = 2 * h if activation == "swiglu" else h
    q1 = _bf16_weights(rng, E, d, H1, trans).with_activations("bf16")
    q2 = _bf16_weights(rng, E, h, d, trans).with_activations("bf16")
    counts = (60, 0, 100)
    offsets = offsets_of(counts)
    xs = rng.standard_normal((int(offsets[-1]), d)).astype(np.float32)
    h_pre, h_act, ys = fm.experts_forward(xs, q1, q2, offsets, activation, trans, keep=True)
    np.testing.assert_array_equal(h_pre, fm.grouped_gemm(xs, q1, offsets, trans_w=trans))
    np.testing.assert_allclose(h_act, fm.activate(h_pre, activation), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(ys, fm.grouped_gemm(h_act, q2, offsets, trans_w=trans))
    x = rng.standard_normal((T, d)).astype(np.float32)
    router_w = rng.standard_normal((d, E)).astype(np.float32)
    y = fm.moe_forward(x, router_w, q1, q2, k, activation=activation, trans_w=trans)
    y_ctx, _ = fm.moe_forward(x, router_w, q1, q2, k, activation=activation, trans_w=trans,
                              return_context=True)
    np.testing.assert_array_equal(y, y_ctx)


def test_stacked_weights_keep_the_exact_path(rng):
    # a stacked weight (formats.stack: several blocks arrays) is not read by the native
    # kernel: its bf16 activations setting gives the exact product, bit for bit
    counts, K = (40, 0, 30), 64
    offsets = offsets_of(counts)
    gate, up = (_bf16_weights(rng, len(counts), K, 48, True) for _ in range(2))
    q = F.stack(gate, up)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    np.testing.assert_array_equal(fm.grouped_gemm(a, q.with_activations("bf16"), offsets,
                                                  trans_w=True),
                                  fm.grouped_gemm(a, q, offsets, trans_w=True))
