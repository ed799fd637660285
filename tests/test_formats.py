"""Weight formats (fastmoe_nb.formats): bit-compatibility with llama.cpp / the gguf package, round
trip error bounds, bf16 rounding, memory maps kept, and every bad input named.

The references: gguf.quants (quantize for bf16 / q8_0 / q4_0, dequantize for all) and, for the
quantizers gguf does not have (q4_k, q6_k), digests of the bytes llama.cpp's ggml writes
(ggml_quantize_chunk, no importance matrix) for deterministic inputs. With FASTMOE_NB_LIBGGML set
to a libggml-base shared library, test_matches_libggml compares against ggml itself.
"""
import ctypes
import hashlib
import os

import numpy as np
import pytest

from fastmoe_nb import formats as F
from fastmoe_nb.formats import (BLOCK, BLOCK_BYTES, FORMATS, QuantizedWeights, dequantize,
                                dequantize_rows, from_blocks, quantize, quantize_rows)

GGUF_QUANTIZERS = ("bf16", "q8_0", "q4_0")            # gguf.quants.quantize has these
BLOCKED = ("bf16", "q8_0", "q4_0", "q4_k", "q6_k")   # every format but the plain floats
SHAPES = {32: [(1, 1, 32), (1, 9, 64), (3, 5, 96)], 256: [(1, 1, 256), (1, 6, 512), (3, 4, 256)]}


def shapes_of(fmt):
    return SHAPES[256 if BLOCK[fmt] == 256 else 32]


def ggml_type(fmt):
    gguf = pytest.importorskip("gguf")
    return gguf.GGMLQuantizationType(F.FORMAT[fmt].ggml_type)


def as_bytes(a):
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1)


def gguf_dequantize(blocks, fmt):
    """gguf.quants.dequantize of (..., row) blocks (its bf16 takes the bytes, (..., 2 C))."""
    quants = pytest.importorskip("gguf.quants")
    b = np.ascontiguousarray(blocks)
    return quants.dequantize(b.view(np.uint8), ggml_type(fmt))


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def data(kind, shape, rng):
    """Test inputs (float32) of a kind: random, zeros, constant blocks, tiny, huge, ..."""
    x = rng.standard_normal(shape).astype(np.float32)
    C = shape[-1]
    if kind == "normal":
        return x
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "sparse":      # +0.0 zeros (gguf and ggml differ on -0.0 blocks: see below)
        return np.where(rng.random(shape) < 0.1, x, np.float32(0))
    if kind == "const_blocks":
        v = rng.standard_normal(shape[:-1] + (C // 32, 1)).astype(np.float32)
        return np.broadcast_to(v, shape[:-1] + (C // 32, 32)).reshape(shape).copy()
    if kind == "tiny":
        return x * np.float32(1e-30)
    if kind == "subnormal":
        return x * np.float32(1e-40)
    if kind == "huge":        # within every format's range (q4_0's fp16 scales: 5.2e5)
        return x / np.abs(x).max() * np.float32(5e5)
    if kind == "group_scales":
        s = np.exp2(rng.integers(-24, 12, shape[:-1] + (C // 16, 1))).astype(np.float32)
        return (x.reshape(shape[:-1] + (C // 16, 16)) * s).reshape(shape)
    if kind == "positive":
        return np.abs(x) + np.float32(0.5)
    if kind == "ints":        # values on the quantization grids: rounding ties
        return rng.integers(-8, 9, shape).astype(np.float32) / np.float32(4)
    raise ValueError(kind)


KINDS = ("normal", "zeros", "sparse", "const_blocks", "tiny", "subnormal", "huge",
         "group_scales", "positive", "ints")


# --------------------------------------------------------------------------- the format table

def test_format_table_matches_gguf():
    gguf = pytest.importorskip("gguf")
    for name in FORMATS:
        t = gguf.GGMLQuantizationType(F.FORMAT[name].ggml_type)
        assert t.name.lower() == name
        assert gguf.GGML_QUANT_SIZES[t] == (BLOCK[name], BLOCK_BYTES[name])
        assert F.format_of_ggml_type(t) == name
    assert [F.FORMAT[n].bits_per_value for n in ("q8_0", "q4_0", "q4_k", "q6_k", "bf16")] \
        == [8.5, 4.5, 4.5, 6.5625, 16.0]
    assert F.check_format("Q4_K") is F.FORMAT["q4_k"]


# --------------------------------------------------------------------------- bitwise vs gguf

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", GGUF_QUANTIZERS)
def test_quantize_matches_gguf(fmt, kind, rng):
    quants = pytest.importorskip("gguf.quants")
    for shape in shapes_of(fmt):
        x = data(kind, shape, rng)
        qw = quantize(x, fmt)
        with np.errstate(all="ignore"):   # gguf's own 1 / d overflow on subnormal blocks
            ref = quants.quantize(x.reshape(-1, shape[-1]), ggml_type(fmt))
        assert np.array_equal(as_bytes(qw.blocks), as_bytes(ref)), (fmt, kind, shape)


@pytest.mark.parametrize("fmt", BLOCKED)
def test_dequantize_matches_gguf(fmt, rng):
    """Our dequantize equals gguf's, bit for bit, on our blocks and on random blocks (every bit
    pattern of the values and scales; the fp16 scales kept finite)."""
    for kind in KINDS:
        for shape in shapes_of(fmt):
            qw = quantize(data(kind, shape, rng), fmt)
            ref = gguf_dequantize(qw.blocks, fmt)
            assert np.array_equal(bits(dequantize(qw)), bits(ref)), (kind, shape)
    E, R, C = shapes_of(fmt)[-1]
    raw = random_blocks(fmt, (E, R, C), rng)
    ref = gguf_dequantize(raw, fmt)
    assert np.array_equal(bits(dequantize(from_blocks(raw, fmt, (E, R, C)))), bits(ref))


def random_blocks(fmt, shape, rng):
    """Random bytes of a weight of float shape (E, R, C) with finite fp16 scales / bf16 values."""
    E, R, C = shape
    spec = F.FORMAT[fmt]
    raw = rng.integers(0, 256, (E, R, spec.row_bytes(C)), dtype=np.uint8)
    if fmt == "bf16":
        raw[..., 1::2] &= 0xBF                       # exponent < 0xFF: finite
        return raw.view(np.uint16)
    blk = raw.reshape(E, R, -1, spec.block_bytes)
    for o in F._SCALE_BYTES[fmt]:
        blk[..., o + 1] &= 0xBF                      # fp16 exponent < 31: finite
    return raw


@pytest.mark.parametrize("fmt", GGUF_QUANTIZERS)
def test_rows_helpers_match_gguf(fmt, rng):
    """quantize_rows / dequantize_rows are gguf.quants.quantize / dequantize for any rank."""
    quants = pytest.importorskip("gguf.quants")
    for shape in [(BLOCK[fmt] * 4,), (3, BLOCK[fmt] * 2), (2, 2, 3, BLOCK[fmt])]:
        x = rng.standard_normal(shape).astype(np.float32)
        b = quantize_rows(x, fmt)
        ref = quants.quantize(x, ggml_type(fmt))
        assert np.array_equal(as_bytes(b), as_bytes(ref))
        assert np.array_equal(bits(dequantize_rows(b, fmt)), bits(gguf_dequantize(ref, fmt)))
        assert dequantize_rows(b, fmt).shape == shape


# --------------------------------------------------------------------------- bitwise vs ggml

def det(n, seed):
    """n float32 in [-1, 1) with the same bits on every host: a splitmix64 hash of the index."""
    z = np.arange(n, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float32) - np.float32(2**23)) / np.float32(2**23)


def det_case(kind, rows=4, cols=512):
    """Deterministic (rows, cols) float32 inputs, the same on every host (no NumPy RNG)."""
    n = rows * cols
    u = [det(n, s) for s in range(1, 5)]
    g = (u[0] + u[1] + u[2] + u[3]) * np.float32(0.866)       # roughly normal, unit variance
    group = np.exp2(np.floor(det(n // 32, 9) * 16 - 8)).astype(np.float32).repeat(32)
    x = {
        "uniform": u[0],
        "gauss": g,
        "zeros": np.zeros(n, np.float32),
        "negzero": np.full(n, -0.0, np.float32),
        "const": np.full(n, 0.37, np.float32),
        "const_neg": np.full(n, -1.25, np.float32),
        "const_groups": (det(n // 16, 7) * 3).repeat(16),
        "sparse": g * (u[1] > 0.8).astype(np.float32),          # with -0.0 from g < 0
        "tiny": g * np.float32(2.0**-100),
        "subnormal": g * np.float32(2.0**-135),
        "huge": g * np.float32(1e5),
        "group_scales": g * group,
        "positive": np.abs(g),
        "negative": -np.abs(g) - np.float32(1),
        "ints": np.round(u[2] * 8).astype(np.float32),
    }[kind]
    return np.ascontiguousarray(x, dtype=np.float32).reshape(rows, cols)


DET_KINDS = ("uniform", "gauss", "zeros", "negzero", "const", "const_neg", "const_groups",
             "sparse", "tiny", "subnormal", "huge", "group_scales", "positive", "negative", "ints")

# sha256 (first 16 hex digits) of the bytes llama.cpp's ggml (libggml-base, ggml_quantize_chunk
# without an importance matrix, built for x86-64) writes for det_case(kind)
LLAMA_CPP_SHA256 = {
    "bf16": {
        "uniform": "73ef8a5be9cd30a8", "gauss": "2f865358c3ebe7cf",
        "zeros": "ad7facb2586fc6e9", "negzero": "60bdaf64cd242fcb",
        "const": "c332ac6c952643b8", "const_neg": "ddef099d8f078819",
        "const_groups": "ab2c3457838015c3", "sparse": "4d2fb24ede3248a9",
        "tiny": "4d70d3f29aeb7de8", "subnormal": "f39907f3ddad8975",
        "huge": "24b9f5ba1636314c", "group_scales": "2dff2394343705de",
        "positive": "4092d0b8850b11f8", "negative": "57cb8c294f979dcd",
        "ints": "f7e9870e04a668a4",
    },
    "q8_0": {
        "uniform": "74512d057c32fe07", "gauss": "867a9050ded376e9",
        "zeros": "5626d9a8f1d7364b", "negzero": "5626d9a8f1d7364b",
        "const": "dc502874826725c2", "const_neg": "b03e63029a07cd2b",
        "const_groups": "b30d0780956e45d0", "sparse": "0cd48ad991a97290",
        "tiny": "e6a4d3a87a503b46", "subnormal": "5626d9a8f1d7364b",
        "huge": "524ec71c04bf065d", "group_scales": "59d0c53df8eb0198",
        "positive": "b0bd43101fe68a6f", "negative": "96a7ad9179a82c9c",
        "ints": "51218885071ab357",
    },
    "q4_0": {
        "uniform": "89104d3f0d128a25", "gauss": "c0199f8efb270a1f",
        "zeros": "0573daf816aed7c2", "negzero": "0573daf816aed7c2",
        "const": "0999e2ec14d73d1d", "const_neg": "cd27758ebf2b90a9",
        "const_groups": "29dbbea04e37c391", "sparse": "6dc36d7323a3dd8e",
        "tiny": "846b80f78d69dc73", "subnormal": "e892fe4e04615617",
        "huge": "f0f89146acbcd6d9", "group_scales": "fe0da039e589f7d3",
        "positive": "3ad7c752d102eafe", "negative": "76622b3f19fb8880",
        "ints": "64420e07ca2d7787",
    },
    "q4_k": {
        "uniform": "f3bc72d3c59a3464", "gauss": "cbec90e0ec9c858d",
        "zeros": "4cf9816ed1062189", "negzero": "4cf9816ed1062189",
        "const": "b91ca27a9f72f030", "const_neg": "7468e1fbbd0a033f",
        "const_groups": "4c133f95ad344706", "sparse": "f8d8f81db49196dc",
        "tiny": "daf6daf3b6eb2c63", "subnormal": "4cf9816ed1062189",
        "huge": "e634d1c8ebb67b9b", "group_scales": "d78e357ac7dc915d",
        "positive": "697c4ce0aa659b8d", "negative": "b8b73bdac6f71916",
        "ints": "97db55ce4465d8d0",
    },
    "q6_k": {
        "uniform": "cf8e44168b1e0c9c", "gauss": "f9912e233d40c414",
        "zeros": "065cc6b2b996ca72", "negzero": "065cc6b2b996ca72",
        "const": "5d8a92654e1e9260", "const_neg": "ba420c93f49d1977",
        "const_groups": "34c2d8b2473fab8c", "sparse": "a65b371d56ba5ded",
        "tiny": "065cc6b2b996ca72", "subnormal": "065cc6b2b996ca72",
        "huge": "e245a0eed8e0eee2", "group_scales": "e35b992ceda9a3f4",
        "positive": "79b911db2e9c5b12", "negative": "8630b562fbd7ee50",
        "ints": "32aac49ddefc5ee3",
    },
}


def digest(b):
    return hashlib.sha256(as_bytes(b).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("fmt", BLOCKED)
def test_quantize_matches_llama_cpp(fmt):
    got = {kind: digest(quantize_rows(det_case(kind), fmt)) for kind in DET_KINDS}
    assert got == LLAMA_CPP_SHA256[fmt]


def libggml():
    path = os.environ.get("FASTMOE_NB_LIBGGML")
    if not path:
        pytest.skip("FASTMOE_NB_LIBGGML (a libggml-base shared library) is not set")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    return lib


@pytest.mark.parametrize("fmt", BLOCKED)
def test_matches_libggml(fmt, rng):
    """Against ggml itself (opt-in): random and deterministic inputs, quantize and dequantize."""
    lib = libggml()
    spec = F.FORMAT[fmt]
    dequant = {"bf16": "ggml_bf16_to_fp32_row", "q8_0": "dequantize_row_q8_0",
               "q4_0": "dequantize_row_q4_0", "q4_k": "dequantize_row_q4_K",
               "q6_k": "dequantize_row_q6_K"}[fmt]
    to_float = getattr(lib, dequant)
    to_float.argtypes, to_float.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    inputs = [det_case(k) for k in DET_KINDS]
    inputs += [data(k, (64, 1024), rng).reshape(64, 1024) for k in KINDS]
    for x in inputs:
        ref = np.zeros((x.shape[0], spec.row_bytes(x.shape[1])), np.uint8)
        lib.ggml_quantize_chunk(spec.ggml_type, x.ctypes.data, ref.ctypes.data, 0, x.shape[0],
                                x.shape[1], None)
        ours = quantize_rows(x, fmt)
        assert np.array_equal(as_bytes(ours), as_bytes(ref))
        vals = np.zeros(x.size, np.float32)
        to_float(ref.ctypes.data, vals.ctypes.data, x.size)
        assert np.array_equal(bits(dequantize_rows(ours, fmt)).reshape(-1), bits(vals))


def test_q4_0_zero_block_scale_is_ggmls():
    """An all-zero q4_0 block gets d = -0.0 (0x8000), as ggml's quantize_row_q4_0_ref writes it
    (max starts at +0.0, d = max / -8); gguf.quants takes the block's first value instead, so a
    block of -0.0 gets +0.0 there. Either way every value decodes to zero."""
    for z in (0.0, -0.0):
        b = quantize_rows(np.full((1, 32), z, np.float32), "q4_0")
        assert b[0, :2].view(np.uint16)[0] == 0x8000
        assert np.all(b[0, 2:] == 0x88)
        assert np.all(dequantize_rows(b, "q4_0") == 0)


# --------------------------------------------------------------------------- round trip bounds

def block_view(a, fmt):
    return a.reshape(-1, BLOCK[fmt] if BLOCK[fmt] > 1 else 256)


def test_round_trip_q8_0(rng):
    """q8_0: each value within d/2 of its block's float32 scale amax / 127, plus what rounding
    the scale to fp16 moves the largest code (127 * |d16 - d|)."""
    x = rng.standard_normal((2, 16, 256)).astype(np.float32) * np.float32(3)
    qw = quantize(x, "q8_0")
    err = np.abs(dequantize(qw) - x).reshape(-1, 32).max(axis=1)
    d = np.abs(x).reshape(-1, 32).max(axis=1) / 127
    d16 = qw.blocks.reshape(-1, 34)[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)
    assert np.all(err <= d / 2 + 127 * np.abs(d16 - d) + 1e-6 * d)


def test_round_trip_q4_0(rng):
    """q4_0: within |d| / 2, except the clamped code 15 (values near -max) within |d|."""
    x = rng.standard_normal((2, 16, 256)).astype(np.float32)
    qw = quantize(x, "q4_0")
    err = np.abs(dequantize(qw) - x).reshape(-1, 32)
    d16 = np.abs(qw.blocks.reshape(-1, 18)[:, :2].copy().view(np.float16)[:, 0].astype(float))
    d = np.abs(x).reshape(-1, 32).max(axis=1) / 8
    slack = 8 * np.abs(d16 - d) + 1e-6 * d
    assert np.all(err.max(axis=1) <= d16 + slack)
    clamped = quantize_rows(x, "q4_0").reshape(-1, 18)[:, 2:]
    q = np.concatenate([clamped & 15, clamped >> 4], axis=1)
    inner = np.where(q < 15, err, 0).max(axis=1)
    assert np.all(inner <= d16 / 2 + slack)


@pytest.mark.parametrize("fmt, rms, worst", [("bf16", 0.003, 2.0**-8), ("q8_0", 0.008, 0.006),
                                             ("q4_0", 0.11, 0.13), ("q4_k", 0.09, 0.11),
                                             ("q6_k", 0.025, 0.022)])
def test_round_trip_error(fmt, rms, worst, rng):
    """Relative RMS error on normal data, and the worst error of a 256-value block relative to
    its largest |x| (bf16: relative to each value, round to nearest: half an ulp, 2^-8)."""
    x = rng.standard_normal((4, 64, 512)).astype(np.float32)
    y = dequantize(quantize(x, fmt))
    e = (y - x).astype(np.float64)
    assert np.sqrt((e**2).mean() / (x.astype(np.float64)**2).mean()) <= rms
    if fmt == "bf16":
        assert np.all(np.abs(e) <= 2.0**-8 * np.abs(x))
    else:
        blk = np.abs(x).reshape(-1, 256).max(axis=1)
        assert np.all(np.abs(e).reshape(-1, 256).max(axis=1) <= worst * blk)


@pytest.mark.parametrize("fmt", BLOCKED)
def test_constant_and_zero_blocks(fmt):
    """A zero weight decodes to zeros, a constant block to near that constant."""
    z = quantize(np.zeros((2, 3, 256), np.float32), fmt)
    assert np.all(dequantize(z) == 0)
    c = dequantize(quantize(np.full((1, 2, 256), -0.75, np.float32), fmt))
    assert np.allclose(c, -0.75, rtol=0.01, atol=0)


# --------------------------------------------------------------------------- bf16

def test_bf16_round_to_nearest_even():
    """Hand-made float32 bit patterns: below / at / above the halfway point, ties to the even
    neighbour, a carry into the exponent, subnormals, signed zero, the largest finite."""
    cases = {
        0x3F800000: 0x3F80, 0x3F807FFF: 0x3F80, 0x3F808000: 0x3F80,   # tie, 0x3F80 even: down
        0x3F808001: 0x3F81, 0x3F818000: 0x3F82,                         # tie, 0x3F81 odd: up
        0x3F817FFF: 0x3F81, 0xBF818000: 0xBF82, 0xBF808000: 0xBF80,     # negatives alike
        0x3FFF8000: 0x4000, 0x3FFFFFFF: 0x4000,                         # carry into exponent
        0x00008000: 0x0000, 0x00018000: 0x0002, 0x00010000: 0x0001,     # subnormals
        0x80000000: 0x8000, 0x00000000: 0x0000,                         # signed zeros
        0x7F7F7FFF: 0x7F7F, 0x007FFFFF: 0x0080,                         # largest; to normal
    }
    x = np.array(list(cases), np.uint32).view(np.float32)
    got = quantize(x.reshape(1, 1, -1), "bf16").blocks.reshape(-1)
    assert got.dtype == np.uint16
    assert [hex(v) for v in got] == [hex(v) for v in cases.values()]
    assert np.array_equal(dequantize_rows(got, "bf16").view(np.uint32),
                          np.array(list(cases.values()), np.uint32) << 16)
    with pytest.raises(ValueError, match="w: values too large for bf16"):
        quantize(np.array([[[np.float32(3.3962e38)]]]), "bf16")   # 0x7F7F8000 rounds to Inf


def test_bf16_matches_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    u = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = u.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < F.RANGE["bf16"])]
    ours = quantize_rows(x, "bf16")
    assert np.array_equal(ours, x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_bf16_inputs_kept_without_copy(rng):
    """ml_dtypes.bfloat16 arrays and torch bf16 tensors are viewed as their uint16 bits."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    a = x.astype(ml_dtypes.bfloat16)
    qw = quantize(a, "bf16")
    assert qw.blocks.dtype == np.uint16 and np.shares_memory(qw.blocks, a)
    assert np.array_equal(qw.blocks, quantize(x, "bf16").blocks)
    assert np.shares_memory(from_blocks(a, "bf16", a.shape).blocks, a)
    assert np.array_equal(dequantize(qw), a.astype(np.float32))
    # a bf16 weight into a block format: its values, exactly widened to float32
    assert np.array_equal(quantize(a, "q8_0").blocks, quantize(a.astype(np.float32), "q8_0").blocks)


def test_torch_bf16_tensor_kept_without_copy(rng):
    torch = pytest.importorskip("torch")
    t = torch.randn(2, 3, 64).to(torch.bfloat16)
    qw = quantize(t, "bf16")
    assert np.shares_memory(qw.blocks, t.view(torch.int16).numpy())
    assert np.array_equal(dequantize(qw), t.float().numpy())
    assert np.shares_memory(from_blocks(t, "bf16", tuple(t.shape)).blocks,
                            t.view(torch.int16).numpy())
    f = torch.randn(2, 3, 64)
    assert np.array_equal(quantize(f, "q4_0").blocks, quantize(f.numpy(), "q4_0").blocks)


# --------------------------------------------------------------------------- the weight type

def test_weight_type(rng):
    E, R, C = 3, 5, 512
    x = rng.standard_normal((E, R, C)).astype(np.float32)
    for fmt in FORMATS:
        qw = quantize(x, fmt)
        spec = F.FORMAT[fmt]
        assert qw.format == fmt and qw.shape == (E, R, C) and qw.num_experts == E
        assert qw.nbytes == E * R * C // spec.block * spec.block_bytes
        assert qw.row_bytes == C // spec.block * spec.block_bytes
        assert qw.dtype == (np.float64 if fmt == "f64" else np.float32)
        assert qw.blocks.dtype == spec.storage
        assert qw.blocks.shape == (E, R, qw.row_bytes // spec.storage.itemsize)
        assert np.shares_memory(qw.expert(1), qw.blocks)
        assert qw.expert(1).shape == qw.blocks.shape[1:]
        full = dequantize(qw)
        assert full.dtype == qw.dtype and full.shape == (E, R, C)
        assert np.array_equal(dequantize(qw, 2), full[2])
        assert np.array_equal(dequantize(qw, [2, 0]), full[[2, 0]])
        assert np.array_equal(dequantize(qw, slice(1, None)), full[1:])
        out = np.empty((R, C), qw.dtype)
        assert dequantize(qw, 1, out=out) is out and np.array_equal(out, full[1])
        assert fmt in repr(qw)
    assert quantize(x, "f32").blocks is x                         # kept, no copy
    assert quantize(x.astype(np.float64), "f64").dtype == np.float64


def test_layouts_and_input_dtypes(rng):
    """trans_w's (E, M, K) view (strided) quantizes like its copy; float64 / float16 inputs like
    their float32 values (gguf rounds float64 to float32 first)."""
    w = rng.standard_normal((2, 256, 64)).astype(np.float32)       # (E, K, M)
    t = w.transpose(0, 2, 1)                                        # (E, M, K), blocks along K
    for fmt in ("q4_k", "q8_0", "f32", "bf16"):
        assert np.array_equal(quantize(t, fmt).blocks, quantize(t.copy(), fmt).blocks)
    x = rng.standard_normal((1, 4, 256))
    assert np.array_equal(quantize(x, "q6_k").blocks, quantize(x.astype(np.float32), "q6_k").blocks)
    h = x.astype(np.float16)
    assert np.array_equal(quantize(h, "q4_0").blocks, quantize(h.astype(np.float32), "q4_0").blocks)


def test_chunking_does_not_change_results(rng, monkeypatch):
    x = rng.standard_normal((2, 7, 512)).astype(np.float32)
    want = {fmt: quantize(x, fmt) for fmt in BLOCKED}
    monkeypatch.setattr(F, "CHUNK_VALUES", 700)    # a chunk of one row, then of a partial row
    for fmt, qw in want.items():
        got = quantize(x, fmt)
        assert np.array_equal(got.blocks, qw.blocks)
        assert np.array_equal(bits(dequantize(got)), bits(dequantize(qw)))


def test_empty_shapes():
    for fmt in FORMATS:
        for shape in [(0, 3, 256), (2, 0, 256), (2, 3, 0)]:
            qw = quantize(np.zeros(shape, np.float32), fmt)
            assert qw.shape == shape and qw.nbytes == 0
            assert dequantize(qw).shape == shape


# --------------------------------------------------------------------------- memory maps

@pytest.mark.parametrize("fmt", ["q4_0", "q6_k", "bf16"])
def test_memmap_blocks_stay_mapped(fmt, tmp_path, rng):
    x = rng.standard_normal((3, 4, 256)).astype(np.float32)
    qw = quantize(x, fmt)
    path = tmp_path / "w.npy"
    np.save(path, qw.blocks)
    mm = np.load(path, mmap_mode="r")
    m = from_blocks(mm, fmt, x.shape)
    assert isinstance(m.blocks, np.memmap) and np.shares_memory(m.blocks, mm)
    assert np.shares_memory(m.expert(2), mm)
    assert np.array_equal(bits(dequantize(m)), bits(dequantize(qw)))
    raw = np.memmap(tmp_path / "w.bin", dtype=np.uint8, mode="w+", shape=(qw.nbytes,))
    raw[:] = as_bytes(qw.blocks)                                    # one flat buffer, as in GGUF
    m = from_blocks(raw, fmt, x.shape)
    assert isinstance(m.blocks, np.memmap) and np.shares_memory(m.blocks, raw)
    assert np.array_equal(bits(dequantize(m, 1)), bits(dequantize(qw, 1)))


def test_memmap_float_weight_kept(tmp_path, rng):
    path = tmp_path / "w.npy"
    np.save(path, rng.standard_normal((2, 3, 64)).astype(np.float32))
    mm = np.load(path, mmap_mode="r")
    qw = quantize(mm, "f32")
    assert isinstance(qw.blocks, np.memmap) and np.shares_memory(qw.blocks, mm)
    assert isinstance(quantize(mm, "q8_0").blocks, np.ndarray)


def test_gguf_file_expert_tensors(tmp_path, rng):
    """Expert tensors written with gguf's writer, (E, M, K) with blocks along K, read back with
    its reader: from_blocks keeps the file's memory map and dequantizes like gguf."""
    gguf = pytest.importorskip("gguf")
    E, M, K = 4, 6, 256
    w = rng.standard_normal((E, M, K)).astype(np.float32)
    path = str(tmp_path / "experts.gguf")
    writer = gguf.GGUFWriter(path, "test")
    fmts = ("q8_0", "q4_0", "q4_k", "q6_k", "bf16", "f32")
    for fmt in fmts:
        qw = quantize(w, fmt)
        if fmt == "f32":
            writer.add_tensor(f"blk.0.ffn_up_exps.{fmt}", qw.blocks)
        else:
            writer.add_tensor(f"blk.0.ffn_up_exps.{fmt}", as_bytes(qw.blocks).reshape(E, M, -1),
                              raw_dtype=ggml_type(fmt))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        fmt = F.format_of_ggml_type(t.tensor_type)
        assert t.name.endswith(fmt) and tuple(int(s) for s in t.shape) == (K, M, E)
        qw = from_blocks(t.data, fmt, (E, M, K))
        assert isinstance(qw.blocks, np.memmap) and np.shares_memory(qw.blocks, t.data)
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(bits(dequantize(qw)), bits(ref))


# --------------------------------------------------------------------------- bad input

def raises(exc, *words):
    return pytest.raises(exc, match="".join(f"(?=.*{w})" for w in words))


def test_bad_format():
    x = np.zeros((1, 1, 32), np.float32)
    with raises(ValueError, "format", "q5_0"):
        quantize(x, "q5_0")
    with raises(ValueError, "format"):
        from_blocks(np.zeros((1, 1, 34), np.uint8), "int4", (1, 1, 32))
    with raises(ValueError, "format"):
        quantize_rows(x, 4)
    with raises(ValueError, "ggml_type"):
        F.format_of_ggml_type(3)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_last_axis_not_a_block_multiple(fmt):
    C = BLOCK[fmt] + 16
    with raises(ValueError, "w:", "last axis", "axis 2", f"length {C}",
                f"{fmt} block size {BLOCK[fmt]}"):
        quantize(np.zeros((2, 3, C), np.float32), fmt)
    with raises(ValueError, "shape:", "axis 2", f"block size {BLOCK[fmt]}"):
        from_blocks(np.zeros(10, np.uint8), fmt, (2, 3, C))
    with raises(ValueError, "x:", "axis 1"):
        quantize_rows(np.zeros((2, C), np.float32), fmt)


def test_bad_blocks(rng):
    qw = quantize(rng.standard_normal((2, 3, 256)).astype(np.float32), "q4_k")
    flat = as_bytes(qw.blocks)
    with raises(ValueError, "blocks:", "truncated", str(qw.nbytes)):
        from_blocks(flat[:-1], "q4_k", qw.shape)
    with raises(ValueError, "blocks:", str(qw.nbytes)):
        from_blocks(qw.blocks[:, :2], "q4_k", qw.shape)
    with raises(TypeError, "blocks:", "uint8", "int8"):
        from_blocks(flat.view(np.int8), "q4_k", qw.shape)
    with raises(TypeError, "blocks:", "uint8", "float32"):
        from_blocks(np.zeros((2, 3, 36), np.float32), "q4_k", qw.shape)
    with raises(TypeError, "blocks:", "uint16"):
        from_blocks(np.zeros((2, 3, 256), np.int32), "bf16", qw.shape)
    with raises(ValueError, "blocks:", "C-contiguous"):
        from_blocks(np.zeros((2, 6, 144), np.uint8)[:, ::2].reshape(2, 3, 1, 144), "q4_k", qw.shape)
    with raises(ValueError, "blocks:", "contiguous"):
        from_blocks(np.zeros((2, 3, 288), np.uint8)[..., ::2], "q4_k", qw.shape)
    with raises(TypeError, "blocks:", "expected an array"):
        from_blocks([1, 2, 3], "q4_k", qw.shape)
    with raises(ValueError, "shape:", "3 integers"):
        from_blocks(flat, "q4_k", (2, 768))
    with raises(ValueError, "shape:", "non-negative"):
        from_blocks(flat, "q4_k", (2, -3, 256))
    with raises(TypeError, "shape:", "integer"):
        from_blocks(flat, "q4_k", (2, 3.0, 256))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_finite_refused(fmt):
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 3, 256), np.float32)
        x[1, 2, 100] = bad
        with raises(ValueError, "w:", "finite", "check_finite=False"):
            quantize(x, fmt)
    quantize(np.ones((1, 1, 256), np.float32), fmt, check_finite=False)


def test_non_finite_bf16_bits_refused():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.ones((1, 1, 32), np.float32)
    x[0, 0, 3] = np.nan
    for fmt in ("bf16", "q8_0"):
        with raises(ValueError, "w:", "finite"):
            quantize(x.astype(ml_dtypes.bfloat16), fmt)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q6_k"])
def test_too_large_refused(fmt):
    """Values whose fp16 block scales would overflow (ggml would write Inf, or for q6_k past
    ~1.8e19 a block of zeros) are refused; the range's edge itself quantizes."""
    edge = np.full((1, 1, 256), F.RANGE[fmt] * 0.97, np.float32)
    edge[..., ::2] *= -1
    assert np.isfinite(dequantize(quantize(edge, fmt))).all()
    for v in (F.RANGE[fmt] * 1.1, 1e20, 3e38):
        with raises(ValueError, "w:", "too large", fmt):
            quantize(np.full((1, 1, 256), v, np.float32), fmt)


def test_non_float_refused():
    for w in (np.zeros((1, 1, 32), np.int64), np.zeros((1, 1, 32), bool),
              np.zeros((1, 1, 32), np.complex64), np.zeros((1, 1, 32), np.uint8)):
        with raises(TypeError, "w:", "floating-point"):
            quantize(w, "q8_0")
    with raises(TypeError, "w:", "expected an array"):
        quantize([[[0.0] * 32]], "q8_0")
    with raises(TypeError, "x:", "floating-point"):
        quantize_rows(np.zeros(32, np.int32), "q8_0")
    with raises(ValueError, "w:", "3-D"):
        quantize(np.zeros((4, 32), np.float32), "q8_0")


def test_bad_dequantize_arguments(rng):
    qw = quantize(rng.standard_normal((3, 2, 32)).astype(np.float32), "q8_0")
    with raises(TypeError, "qw:", "QuantizedWeights"):
        dequantize(qw.blocks)
    with raises(ValueError, "experts:", "0..2"):
        dequantize(qw, 3)
    with raises(ValueError, "experts:", "0..2"):
        dequantize(qw, [0, -1])
    with raises(TypeError, "experts:"):
        dequantize(qw, [[0]])
    with raises(TypeError, "experts:"):
        dequantize(qw, [0.5])
    with raises(ValueError, "out:", "shape"):
        dequantize(qw, 0, out=np.empty((3, 2, 32), np.float32))
    with raises(TypeError, "out:", "float32"):
        dequantize(qw, out=np.empty((3, 2, 32), np.float64))
    with raises(ValueError, "e:", "0..2"):
        qw.expert(3)
    with raises(ValueError, "blocks:", "multiple", "34"):
        dequantize_rows(np.zeros((2, 35), np.uint8), "q8_0")
