"""kernels/cpu/quant.py: block decoders, dequantization and the decoding GEMM for bf16 / q8_0 /
q4_0 / q4_k / q6_k weights, against a NumPy decoding of the same bytes and float64 products.

The test data comes from a small NumPy quantizer here (q8_0: d = amax / 127, q = round(v / d);
q4_0: d = v_at_amax / -8, q = clip(floor(v / d + 8.5), 0, 15); bf16: round to nearest even),
and for the 256-value super-blocks of q4_k / q6_k from formats.quantize, their NumPy decoding
from formats.dequantize (the spec the kernels must equal bit for bit). Bit-compatibility with
llama.cpp is formats.py's business: the kernels must decode any valid block, so the decoders
are also checked on hand-made bytes (fp16 subnormal, zero and negative zero, inf and nan
scales, int8 -128, nibbles 0 and 15, 6-bit codes 0 and 63) and on random bytes.

Tolerance of the products: each output is a float32 sum of K products of float32 values, so
its rounding error is a few times K * 2^-24 of the sum of |terms| in the worst case and about
sqrt(K) * 2^-24 typically; |got - want| <= 1e-5 * sum_k |x_k w_k| (plus a 1e-30 floor) holds
with room at the depths used here (K <= 512).
"""
import numba
import numpy as np
import pytest
from numba import njit

from fastmoe_nb import formats as F
from fastmoe_nb.kernels.cpu import config as kconfig
from fastmoe_nb.kernels.cpu import quant as kq

QK = 32
K_FORMATS = ("q4_k", "q6_k")                 # 256-value super-blocks
ALL = ("bf16", "q8_0", "q4_0") + K_FORMATS


def block(fmt):
    """Values per block along the blocked axis (bf16: 1, any length)."""
    return 1 if fmt == "bf16" else F.BLOCK[fmt]


# --------------------------------------------------------------------------- NumPy side

def quantize(w, fmt):
    """w (E, R, C) float32 -> blocks in format fmt (C a multiple of its block)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if fmt in K_FORMATS:
        return F.quantize(w, fmt).blocks
    if fmt == "bf16":
        u = w.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    E, R, C = w.shape
    b = w.reshape(E, R, C // QK, QK)
    if fmt == "q8_0":
        d = (np.abs(b).max(-1) / 127).astype(np.float16)
        inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(d.shape, np.float32),
                        where=d != 0)
        q = np.clip(np.round(b * inv[..., None]), -128, 127).astype(np.int8).view(np.uint8)
    else:
        i = np.abs(b).argmax(-1)[..., None]
        d = (np.take_along_axis(b, i, -1)[..., 0] / -8).astype(np.float16)
        inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(d.shape, np.float32),
                        where=d != 0)
        q = np.clip(np.floor(b * inv[..., None] + 8.5), 0, 15).astype(np.uint8)
        q = q[..., :QK // 2] | (q[..., QK // 2:] << 4)
    return np.concatenate([d.view(np.uint8).reshape(E, R, C // QK, 2), q], -1).reshape(E, R, -1)


def decode(blocks, fmt, C):
    """blocks (E, R, row_bytes) -> (E, R, C) float32, by NumPy (float32(d) * q; the
    k-formats by formats.dequantize)."""
    if fmt in K_FORMATS:
        return F.dequantize(F.from_blocks(blocks, fmt, blocks.shape[:2] + (C,)))
    if fmt == "bf16":
        return (blocks.astype(np.uint32) << 16).view(np.float32)
    E, R, _ = blocks.shape
    b = blocks.reshape(E, R, C // QK, -1)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    if fmt == "q8_0":
        q = b[..., 2:].view(np.int8).astype(np.float32)
    else:
        q = (np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], -1).astype(np.int32) - 8
             ).astype(np.float32)
    return (q * d).reshape(E, R, C)


# where a block's fp16 scales lie (q4_k: d and dmin; q6_k: d, after the 16 int8 scales)
SCALE_BYTES = {"q8_0": (0,), "q4_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}


def random_blocks(rng, fmt, E, R, C):
    """Random valid bytes: any q and 6- / 8-bit scale codes, finite fp16 scales of varied
    size and sign (some subnormal)."""
    if fmt == "bf16":
        w = rng.standard_normal((E, R, C)).astype(np.float32)
        return (w.view(np.uint32) >> 16).astype(np.uint16)
    nb = C // block(fmt)
    blocks = rng.integers(0, 256, (E, R, nb, F.BLOCK_BYTES[fmt]), dtype=np.uint8)
    for at in SCALE_BYTES[fmt]:
        d = (rng.choice([-1, 1], (E, R, nb)) * np.exp2(rng.uniform(-26, 3, (E, R, nb))))
        blocks[..., at:at + 2] = d.astype(np.float16).view(np.uint8).reshape(E, R, nb, 2)
    return blocks.reshape(E, R, -1)


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# --------------------------------------------------------------------------- decoders

@njit
def _halves(fn_code, h, out):
    for i in range(h.shape[0]):
        out[i] = kq.half_to_f32_bits(h[i]) if fn_code == 0 else kq.half_to_f32_fpext(h[i])


@pytest.mark.parametrize("variant", ["bits", "fpext"])
def test_half_to_f32_matches_numpy_on_every_fp16(variant):
    """All 65536 fp16 bit patterns: subnormals, +-0, +-inf bitwise; NaN stays NaN (the bit
    version keeps the payload, F16C quiets signalling NaNs)."""
    if variant == "fpext" and not kq.host_features().get("f16c"):
        pytest.skip("no F16C on this CPU: the kernels use the bit arithmetic")
    h = np.arange(1 << 16, dtype=np.uint32)
    got = np.empty(h.shape, np.float32)
    _halves(0 if variant == "bits" else 1, h, got)
    want = h.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(bits(got)[~nan], bits(want)[~nan])
    assert np.isnan(got[nan]).all()
    if variant == "bits":       # payload and sign: the fp16 mantissa shifted into place
        hn = h[nan]
        assert np.array_equal(bits(got)[nan], ((hn & 0x8000) << 16) | 0x7F800000
                              | ((hn & 0x3FF) << 13))


def chunk_decoders(fmt):
    """An @njit fn(blocks (n, row_bytes), out, out2) decoding every row's chunks of 32 values
    by decode_<fmt> into out (n, C) and by values_<fmt> times its d into out2 (the scales
    prepared by prep_<fmt> once a super-block)."""
    prep, values, decode, _ = kq._DECODERS[kq.FORMATS[fmt]]

    @njit
    def run(blocks, out, out2):
        sv = np.full(16, np.nan, np.float32)
        for i in range(blocks.shape[0]):
            o = i * blocks.shape[1]
            for b in range(out.shape[1] // 32):
                if b % 8 == 0:
                    prep(blocks, o, b, sv, 0)
                decode(blocks, o, b, sv, 0, out, i * out.shape[1] + b * 32)
                d = values(blocks, o, b, sv, 0, out2, i * out.shape[1] + b * 32)
                for j in range(b * 32, b * 32 + 32):
                    out2[i, j] = out2[i, j] * d
    return run


FP16_SCALES = [0x0001, 0x03FF, 0x0400, 0x8001, 0x8000, 0x0000, 0x3C00, 0xBC00, 0x7BFF,
               0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0x3555]


def _le16(s):
    return np.array([s & 0xFF, s >> 8], np.uint8)


def special_blocks(fmt):
    """Blocks whose scales and values sit at the edges of the format (one block a row)."""
    rows = []
    if fmt == "q4_k":            # d, dmin; 6-bit codes all 63 / 0 / mixed; nibbles 0 and 15
        nibbles = [np.array([0x0F, 0xF0, 0x00, 0xFF, 0x8F, 0xF8, 0x08, 0x80] * 16, np.uint8),
                   np.full(128, 0xFF, np.uint8), np.arange(128, dtype=np.uint8) * 17]
        codes = [np.full(12, 0xFF, np.uint8), np.zeros(12, np.uint8),
                 (np.arange(12) * 23 + 7).astype(np.uint8)]
        for i, s in enumerate(FP16_SCALES):
            for dmin in (s, 0x0000, FP16_SCALES[(i + 5) % len(FP16_SCALES)]):
                for c in codes:
                    for q in nibbles:
                        rows.append(np.concatenate([_le16(s), _le16(dmin), c, q]))
        return np.stack(rows)
    if fmt == "q6_k":            # ql, qh giving q 0 and 63; int8 scales -128 and 127; d
        ql = [np.zeros(128, np.uint8), np.full(128, 0xFF, np.uint8),
              (np.arange(128) * 37).astype(np.uint8)]
        qh = [np.zeros(64, np.uint8), np.full(64, 0xFF, np.uint8),
              np.tile(np.array([0xE4, 0x1B], np.uint8), 32)]
        sc = [np.array([-128, 127, 0, -1, 1, 2, -2, 64, -64, 5, -5, 100, -100, 3, -3, 127],
                       np.int8).view(np.uint8), np.full(16, 0x80, np.uint8)]
        for s in FP16_SCALES:
            for lo in ql:
                for hi in qh:
                    for c in sc:
                        rows.append(np.concatenate([lo, hi, c, _le16(s)]))
        return np.stack(rows)
    for s in FP16_SCALES:
        if fmt == "q8_0":
            qs = [np.array([-128, 127, 0, -1, 1] * 6 + [-128, -128], np.int8),
                  np.full(32, -128, np.int8), np.full(32, 127, np.int8),
                  np.arange(-16, 16, dtype=np.int8)]
            qs = [q.view(np.uint8) for q in qs]
        else:
            qs = [np.array([0x0F, 0xF0, 0x00, 0xFF, 0x8F, 0xF8, 0x08, 0x80] * 2, np.uint8),
                  np.full(16, 0x00, np.uint8), np.full(16, 0xFF, np.uint8),
                  np.arange(16, dtype=np.uint8) * 17]
        for q in qs:
            rows.append(np.concatenate([_le16(s), q]))
    return np.stack(rows)


def decoder_case(fmt, data):
    """(blocks (n, block_bytes), want (n, block) float32 by NumPy)."""
    if data == "special":
        blocks = special_blocks(fmt)
    else:
        blocks = random_blocks(np.random.default_rng(3), fmt, 1, 40, 8 * block(fmt))[0]
        blocks = blocks.reshape(-1, F.BLOCK_BYTES[fmt])
    blocks = np.ascontiguousarray(blocks)
    with np.errstate(invalid="ignore", over="ignore"):
        return blocks, decode(blocks[None], fmt, block(fmt))[0]


def assert_bits_or_nan(got, want):
    nan = np.isnan(want)
    assert np.array_equal(bits(got)[~nan], bits(want)[~nan])
    assert np.isnan(got[nan]).all()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("data", ["special", "random"])
def test_block_decoders_bitwise_equal_numpy(fmt, data):
    """decode_<fmt> gives NumPy's decoding (q8_0 / q4_0: float32(d) * q; q4_k / q6_k:
    formats.dequantize) bit for bit, and values_<fmt> * d the same, including inf / nan
    scales (nan positions compared as nan)."""
    check_chunk_decoders(fmt, data)


def check_chunk_decoders(fmt, data):
    """decode_<fmt> and values_<fmt> * d on decoder_case(fmt, data) equal NumPy bit for bit."""
    blocks, want = decoder_case(fmt, data)
    got, got2 = (np.empty(want.shape, np.float32) for _ in range(2))
    with np.errstate(invalid="ignore"):
        chunk_decoders(fmt)(blocks, got, got2)
    assert_bits_or_nan(got, want)
    assert_bits_or_nan(got2, want)


def test_bf16_decoder_bitwise_and_round_trip():
    rng = np.random.default_rng(4)
    u = rng.integers(0, 1 << 16, (50, QK), dtype=np.uint16)
    u[0, :8] = [0x0000, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC1, 0x3F80]
    got, got2 = (np.empty((50, QK), np.float32) for _ in range(2))
    chunk_decoders("bf16")(u, got, got2)
    assert np.array_equal(bits(got), u.astype(np.uint32) << 16)
    assert np.array_equal(bits(got2), u.astype(np.uint32) << 16)
    w = rng.standard_normal((1, 3, 70)).astype(np.float32)
    assert np.abs(decode(quantize(w, "bf16"), "bf16", 70) - w).max() <= 2 ** -8 * np.abs(w).max()


@pytest.mark.parametrize("fmt", ALL)
def test_dequant_and_dequant_rows_bitwise(fmt):
    """The whole array (parallel) and panels (rows r0..r1, columns c0..c1; bf16 with a
    partial last chunk; the k-formats' panels starting and ending inside a super-block)
    equal the NumPy decoding bit for bit."""
    rng = np.random.default_rng(5)
    C = {"bf16": 70, "q8_0": 256, "q4_0": 256}.get(fmt, 512)
    w = rng.standard_normal((3, 9, C)).astype(np.float32)
    blocks = quantize(w, fmt)
    want = decode(blocks, fmt, C)
    code = kq.FORMATS[fmt]
    out = np.empty((3, 9, C), np.float32)
    kq.dequant(blocks, code, out)
    assert np.array_equal(bits(out), bits(want))
    panels = [(1, 2, 7, 32, C), (2, 0, 9, 0, 64), (0, 8, 9, 64, min(C, 96))]
    if C > 224:
        panels.append((2, 3, 4, 224, min(C, 288)))
    for e, r0, r1, c0, c1 in panels:
        panel = np.full((r1 - r0, c1 - c0), np.nan, np.float32)
        kq.dequant_rows(blocks, code, e, r0, r1, c0, c1, panel)
        assert np.array_equal(bits(panel), bits(want[e, r0:r1, c0:c1]))
    # the test quantizer's own error: q4_0 clips the side opposite the block's largest value
    # at 7 steps of amax / 8; q8_0 rounds to half a step of amax / 127 (d rounded to fp16)
    if fmt == "q4_0":
        assert np.abs(want - w).max() <= np.abs(w).max() / 8 * 1.01
    if fmt == "q8_0":
        assert np.abs(want - w).max() <= np.abs(w).max() / 254 * 1.2


# --------------------------------------------------------------------------- decoding GEMM

def make_case(rng, fmt, counts, K, M, trans, gather):
    """-> (src, ridx, blocks, offsets, W (E, K, M) float64 decoded)."""
    E = len(counts)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    N = int(offsets[-1])
    R, C = (M, K) if trans else (K, M)
    w = rng.standard_normal((E, R, C)).astype(np.float32) / np.float32(np.sqrt(K))
    blocks = quantize(w, fmt)
    W = decode(blocks, fmt, C).astype(np.float64)
    if trans:
        W = W.transpose(0, 2, 1)
    if gather:                   # rows gathered from a larger source, out of order
        src = rng.standard_normal((N + 5, K)).astype(np.float32)
        ridx = rng.permutation(N + 5)[:N].astype(np.int64)
    else:
        src = rng.standard_normal((N, K)).astype(np.float32)
        ridx = np.arange(N, dtype=np.int64)
    return src, ridx, blocks, offsets, W


def expected(src, ridx, W, offsets):
    """float64 products and the sums of |terms| they are judged against."""
    N, M = int(offsets[-1]), W.shape[2]
    want, scale = np.zeros((N, M)), np.zeros((N, M))
    for e in range(W.shape[0]):
        lo, hi = offsets[e], offsets[e + 1]
        a = src[ridx[lo:hi]].astype(np.float64)
        want[lo:hi] = a @ W[e]
        scale[lo:hi] = np.abs(a) @ np.abs(W[e])
    return want, scale


def run(src, ridx, blocks, fmt, trans, offsets, M, experts=None):
    N = int(offsets[-1])
    out = np.full((N, M), np.nan, np.float32)
    if experts is None:
        experts = np.ones(offsets.shape[0] - 1, np.bool_)
    kq.run_qstream(src, blocks, kq.FORMATS[fmt], trans, offsets, out, experts, ridx)
    return out


# (rows an expert, K, M): T = 1, 3, 12 rows an expert, an expert without rows, E = 1,
# K and M multiples of 32 and of 256; (K, M) with a depth tail of one row and of 3 rows
# (four depth rows at a time), several column blocks of 12 rows (12 x 5504 > QSTREAM_ACC;
# 12 x 5376 for the super-blocks: column blocks of 512); (M, K) with a partial last task of
# columns. A case runs where the blocked axis (M; trans: K) holds whole blocks.
SHAPES = [
    ((1,), 32, 32),
    ((3, 0, 12), 256, 512),
    ((12, 1, 0, 3), 96, 288),
    ((0, 2, 1), 512, 256),
    ((12, 3), 64, 5504),
    ((12, 3), 64, 5376),
    ((2, 7), 768, 96),
]
ROW_TAILS = [((3, 2), 301, 64), ((1, 4), 259, 96), ((3, 2), 301, 512), ((1, 4), 259, 256)]


def blocked(fmt, trans, K, M):
    """Whether a (K, M) product's weight holds whole blocks of fmt along its blocked axis."""
    return (K if trans else M) % block(fmt) == 0


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("counts,K,M", SHAPES + ROW_TAILS)
def test_decoding_gemm_matches_float64(fmt, trans, counts, K, M):
    if not blocked(fmt, trans, K, M):
        pytest.skip(f"{fmt} blocks run along {'K' if trans else 'M'}")
    rng = np.random.default_rng(sum(counts) * 7 + K + M)
    src, ridx, blocks, offsets, W = make_case(rng, fmt, counts, K, M, trans, gather=True)
    got = run(src, ridx, blocks, fmt, trans, offsets, M)
    want, scale = expected(src, ridx, W, offsets)
    assert np.isfinite(got).all()
    assert (np.abs(got - want) <= 1e-5 * scale + 1e-30).all(), \
        float((np.abs(got - want) / np.maximum(scale, 1e-30)).max())


@pytest.mark.parametrize("trans", [False, True])
def test_bf16_partial_chunks(trans):
    """bf16 rows need not hold whole chunks of 32: M = 70 ((K, M) layout) and K = 100
    ((M, K) layout) leave partial chunks, summed after the whole ones."""
    rng = np.random.default_rng(11)
    K, M = (100, 40) if trans else (40, 70)
    src, ridx, blocks, offsets, W = make_case(rng, "bf16", (2, 5, 1, 4), K, M, trans, False)
    got = run(src, None, blocks, "bf16", trans, offsets, M)
    want, scale = expected(src, ridx, W, offsets)
    assert (np.abs(got - want) <= 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("trans", [False, True])
def test_only_selected_experts_with_rows_are_read_and_written(trans):
    """Experts outside the mask keep their output rows untouched, experts without rows are
    not in the plan, and an unselected expert's blocks (NaN scales here) are never read."""
    rng = np.random.default_rng(12)
    fmt, K, M = "q8_0", 64, 96
    src, ridx, blocks, offsets, W = make_case(rng, fmt, (2, 0, 3, 1), K, M, trans, False)
    blocks = blocks.copy()
    R = blocks.shape[1]
    nan_scale = np.array([0x00, 0x7E], np.uint8)
    for e in (1, 2):                                 # 1: no rows; 2: masked out
        blocks[e].reshape(R, -1, kq.BLOCK_BYTES[kq.Q8_0])[..., :2] = nan_scale
    experts = np.array([True, True, False, True])
    got = run(src, ridx, blocks, fmt, trans, offsets, M, experts)
    want, scale = expected(src, ridx, W, offsets)
    rows2 = slice(offsets[2], offsets[3])
    assert np.isnan(got[rows2]).all()
    keep = np.ones(got.shape[0], bool)
    keep[rows2] = False
    assert (np.abs(got[keep] - want[keep]) <= 1e-5 * scale[keep] + 1e-30).all()
    tasks, _, _ = kq.qstream_plan(offsets, experts, K, M, trans)
    assert sorted(set(tasks[:, 0].tolist())) == [0, 3]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 numba threads")
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("trans", [False, True])
def test_bitwise_equal_for_1_and_2_threads(fmt, trans):
    rng = np.random.default_rng(13)
    K, M = 512, 1024
    src, ridx, blocks, offsets, _ = make_case(rng, fmt, (1, 7, 0, 12, 3), K, M, trans, True)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run(src, ridx, blocks, fmt, trans, offsets, M)
        numba.set_num_threads(2)
        two = run(src, ridx, blocks, fmt, trans, offsets, M)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(bits(one), bits(two))


def test_plan_cuts_from_shapes_alone():
    """The (K, M) plan: STREAM_KC depth rows a task, column blocks of whole 32-column blocks
    summed in depth order by stream_sum's groups; (M, K): QSTREAM_CT columns, all depth."""
    offsets = np.array([0, 12, 12, 15], np.int64)
    experts = np.ones(3, np.bool_)
    tasks, groups, size = kq.qstream_plan(offsets, experts, 600, 5504, False)
    assert set(tasks[:, 0].tolist()) == {0, 2}
    assert (tasks[:, 3] % QK == 0).all() and (tasks[:, 4] % QK == 0).all()
    assert (tasks[:, 2] - tasks[:, 1] <= kconfig.STREAM_KC).all()
    for t0, t1 in groups:        # one column block's tasks, depth in order, covering 0..K
        g = tasks[t0:t1]
        assert (g[:, 3] == g[0, 3]).all() and g[0, 1] == 0 and g[-1, 2] == 600
        assert (g[1:, 1] == g[:-1, 2]).all()
    m = np.diff(offsets)[tasks[:, 0]]
    assert size == int((m * (tasks[:, 4] - tasks[:, 3])).sum())
    tasks, _, size = kq.qstream_plan(offsets, experts, 512, 300, True)
    assert size == 0 and (tasks[:, 1] == 0).all() and (tasks[:, 2] == 512).all()
    assert (tasks[:, 4] - tasks[:, 3] <= kconfig.QSTREAM_CT).all()


@pytest.mark.parametrize("fmt", K_FORMATS)
def test_plan_reads_whole_super_blocks(fmt):
    """q4_k / q6_k: a (K, M) task's columns start and end on super-blocks of 256 values
    (12 rows: 8192 / 12 partials would give 672 columns; 512 here), covering 0..M once."""
    offsets = np.array([0, 12, 13], np.int64)
    tasks, _, _ = kq.qstream_plan(offsets, np.ones(2, np.bool_), 300, 5376, False,
                                  fmt=kq.FORMATS[fmt])
    assert (tasks[:, 3] % 256 == 0).all() and (tasks[:, 4] % 256 == 0).all()
    first = tasks[(tasks[:, 0] == 0) & (tasks[:, 1] == 0)]
    assert first[0, 4] - first[0, 3] == 512
    assert np.array_equal(first[:, 3], np.arange(0, 5376, 512))


# --------------------------------------------------------------------------- other hosts' paths

@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
@pytest.mark.parametrize("table", [False, True])
def test_nibble_decoders_with_and_without_the_avx512_table(monkeypatch, fmt, table):
    """The nibble table (vpermps) is AVX-512 only; the arithmetic path other CPUs compile gives
    the same bits, and so does the table (the flag is read when a caller is compiled)."""
    if table and kconfig.ISA != "avx512":
        pytest.skip("vpermps over 16 lanes needs AVX-512")
    monkeypatch.setattr(kq, "_Q4_TABLE", table)
    for data in ("special", "random"):
        check_chunk_decoders(fmt, data)


@pytest.mark.parametrize("fmt", ["bf16", "q6_k"])
def test_cols_kernel_with_the_avx2_row_groups(fmt):
    """Hosts without AVX-512 group the (M, K) layout's rows in twos (COL_GROUPS); that kernel,
    built here from the same factories, matches float64 too. The grouping does not depend on
    the format: bf16 has the partial last chunk, q6_k the super-blocks' scales (each format's
    decoder is checked on its own above)."""
    code = kq.FORMATS[fmt]
    prep, _, dec, tail = kq._DECODERS[code]
    kernel = kq.slp_vectorized(kq._make_cols_kernel(kq._make_cols_task(tuple(
        (r, kq._make_cols_group(prep, dec, tail, kq.SPAN[code], kq.ITEMSIZE[code], r, s))
        for r, s in ((2, 1), (1, 2))))))
    rng = np.random.default_rng(14)
    K, M = {"bf16": (96, 70)}.get(fmt, (512, 64))
    src, ridx, blocks, offsets, W = make_case(rng, fmt, (5, 0, 2, 1), K, M, True, True)
    tasks, _, _ = kq.qstream_plan(offsets, np.ones(4, np.bool_), K, M, True)
    got = np.full((int(offsets[-1]), M), np.nan, np.float32)
    kernel(src, ridx, blocks, offsets, tasks, got)
    want, scale = expected(src, ridx, W, offsets)
    assert (np.abs(got - want) <= 1e-5 * scale + 1e-30).all()


_CACHE_KEYS = """
from numba.core.registry import cpu_target
from fastmoe_nb.kernels.cpu import quant as kq
codegen = cpu_target.target_context.codegen()
for table in (kq._DEQUANT_ROWS, kq._DEQUANT_ALL, kq._ROWS_KERNELS, kq._COLS_KERNELS):
    for f in sorted(table):
        k = getattr(table[f], "kernel", table[f])
        print(k._cache._index_key(("sig",), codegen)[2])
"""


def test_factory_kernels_keep_one_disk_cache_key_across_processes():
    """The per-format kernels are closures over other jitted functions: Numba's own cache key
    pickles those with a per-process id (a fresh compile in every process). cache.cached's key
    is the same in two processes, and differs between formats."""
    import subprocess
    import sys
    runs = [subprocess.run([sys.executable, "-c", _CACHE_KEYS], capture_output=True, text=True,
                           check=True).stdout.split("\n") for _ in range(2)]
    assert runs[0] == runs[1]
    keys = [k for k in runs[0] if k]
    assert len(keys) == 4 * len(kq.FORMATS) and len(set(keys)) == len(keys)
