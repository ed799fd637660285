"""The ggml baseline (fastmoe_nb.benchmark.ggml) against reference.py on ggml's own weights.

Skipped where no ggml library loads (ggml-python not installed, FASTMOE_NB_LIBGGML_DIR unset):
it is an optional extra, kept out of CI's install.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from fastmoe_nb import formats, reference
from fastmoe_nb.benchmark import ggml

needs_ggml = pytest.mark.skipif(not ggml.available(), reason="ggml not available "
                                "(pip install fastmoe-nb[ggml] or FASTMOE_NB_LIBGGML_DIR)")

# Relative Frobenius error of ggml's layer against the float64 reference on the float32
# values of ggml's own quantized weights: what is left is ggml's rounding of the
# activations (x, and silu(gate) * up before the down matrix) in its kernels.
# - 8-bit blocks of 32 (q8_0 / q4_0 kernels take q8_0 activations): a value's error is
#   uniform within half a step of amax / 127; Gaussian x has amax ~ 2 sigma per block, the
#   heavier-tailed silu(gate) * up ~ 4-5: ~0.5% and ~1% rms, ~1.2% together. 3% bounds it.
# - 8-bit blocks of 256 (q4_k / q6_k kernels take q8_K activations): the larger block's
#   amax is ~1.4x larger: ~2%; 5%.
# - bf16 activations: half an 8-bit mantissa's step, 2^-9 at most, on x and on the hidden
#   values: ~0.3%; 1%.
# - f32: float32 accumulation only in recent ggml (~3e-7), but ggml-python's mid-2024 ggml
#   evaluates silu through a table of float16 inputs and outputs (2^-11 relative each,
#   ~3e-4 on the layer): 1e-3.
# Any layout error (a transposed matrix, gate and up swapped, the wrong expert) is O(1).
TOLERANCE = {"f32": 1e-3, "bf16": 1e-2, "q8_0": 3e-2, "q4_0": 3e-2, "q4_k": 5e-2,
             "q6_k": 5e-2}


def rel_err(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def make_layer_inputs(seed, E, T, k, d, h):
    """Normal weights scaled to unit-variance outputs, x (T, d), a top-k routing of distinct
    experts with expert E-1 left without tokens when E > k (an empty expert)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((E, 2 * h, d)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((E, d, h)) / np.sqrt(h)).astype(np.float32)
    x = rng.standard_normal((T, d)).astype(np.float32)
    pool = E - 1 if E > k else E
    experts = np.argsort(rng.random((T, pool)), axis=1)[:, :k].astype(np.int32)
    weights = rng.random((T, k)).astype(np.float32)
    return w1, w2, x, experts, weights


def shape_of(fmt):
    """(d, h): multiples of the format's block, not of any power of two above it."""
    return (256, 256) if formats.BLOCK[fmt] == 256 else (96, 160)


def test_unavailable_library_is_false_not_an_error(tmp_path):
    # a directory without libggml: available() is False, the module imports, nothing raises
    env = dict(os.environ, FASTMOE_NB_LIBGGML_DIR=str(tmp_path))
    code = ("from fastmoe_nb.benchmark import ggml; "
            "print(ggml.available(), ggml.library())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["False", "None"]


@needs_ggml
@pytest.mark.parametrize("fmt", ggml.FORMATS)
def test_layer_matches_reference_on_ggml_weights(fmt):
    d, h = shape_of(fmt)
    w1, w2, x, experts, weights = make_layer_inputs(0, E=4, T=7, k=2, d=d, h=h)
    copies = [a.copy() for a in (w1, w2, x, experts, weights)]
    layer = ggml.GgmlExperts(w1, w2, fmt, threads=2)
    y = layer(x, experts, weights)
    assert y.dtype == np.float32 and y.shape == x.shape
    q1, q2 = ggml.dequantize_like_ggml(w1, fmt), ggml.dequantize_like_ggml(w2, fmt)
    ref = reference.routed_experts(x, experts, weights, q1, q2, trans_w=True)
    assert rel_err(y, ref) < TOLERANCE[fmt]
    for a, b in zip((w1, w2, x, experts, weights), copies):
        assert np.array_equal(a, b)   # nothing handed in is modified


@needs_ggml
def test_graphs_are_reused_per_token_count():
    # T = 5, then 1 with k = 1 (the sum of one view), then 5 again: the kept graph gives
    # bitwise the first result; a new T gets its own graph
    d, h = shape_of("q4_0")
    w1, w2, x, experts, weights = make_layer_inputs(1, E=3, T=5, k=3, d=d, h=h)
    layer = ggml.GgmlExperts(w1, w2, "q4_0", threads=2, poll=False)
    y5 = layer(x, experts, weights)
    y1 = layer(x[:1], experts[:1, :1], weights[:1, :1])
    q1, q2 = ggml.dequantize_like_ggml(w1, "q4_0"), ggml.dequantize_like_ggml(w2, "q4_0")
    ref1 = reference.routed_experts(x[:1], experts[:1, :1], weights[:1, :1], q1, q2,
                                    trans_w=True)
    assert rel_err(y1, ref1) < TOLERANCE["q4_0"]
    assert np.array_equal(layer(x, experts, weights), y5)
    assert layer(x[:0], experts[:0], weights[:0]).shape == (0, d)
    layer.close()
    with pytest.raises(RuntimeError, match="closed"):
        layer(x, experts, weights)


@needs_ggml
@pytest.mark.parametrize("fmt", ["f32", "bf16", "q8_0", "q4_0"])
def test_ggml_quantizes_to_fastmoe_nb_bytes(fmt):
    # both are bit-compatible with llama.cpp: the two layers run on the same weights. (The
    # k-quants' search for scales differs between ggml versions, so only these four.)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((2, 8, 96)).astype(np.float32)
    w[0, 0, :32] = 0.0                      # an all-zero block: scale 0
    w[1, 3, 40] = 50.0                      # one outlier sets its block's scale
    got = ggml.dequantize_like_ggml(w, fmt)
    assert np.array_equal(got, formats.dequantize(formats.quantize(w, fmt)))


@needs_ggml
def test_bad_input_names_the_argument():
    d, h = shape_of("q8_0")
    w1, w2, x, experts, weights = make_layer_inputs(3, E=2, T=3, k=1, d=d, h=h)
    with pytest.raises(ValueError, match="fmt"):
        ggml.GgmlExperts(w1, w2, "q5_0")
    with pytest.raises(ValueError, match="block of 256"):
        ggml.GgmlExperts(w1, w2, "q4_k")
    with pytest.raises(ValueError, match="w2"):
        ggml.GgmlExperts(w1, w2[:, :, :32], "q8_0")
    with pytest.raises(TypeError, match="w1"):
        ggml.GgmlExperts(w1.astype(np.float64), w2, "q8_0")
    bad = w2.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="w2"):
        ggml.GgmlExperts(w1, bad, "q8_0")
    with pytest.raises(ValueError, match="threads"):
        ggml.GgmlExperts(w1, w2, "q8_0", threads=0)
    with pytest.raises(TypeError, match="poll"):
        ggml.GgmlExperts(w1, w2, "q8_0", poll="yes")
    layer = ggml.GgmlExperts(w1, w2, "q8_0")
    with pytest.raises(ValueError, match="experts"):
        layer(x, experts + 2, weights)
    with pytest.raises(TypeError, match="x"):
        layer(x.astype(np.float64), experts, weights)
    with pytest.raises(ValueError, match="weights"):
        layer(x, experts, weights[:2])
    with pytest.raises(ValueError, match=r"k: .*1\.\.E"):
        layer(x, np.zeros((3, 3), np.int32), np.ones((3, 3), np.float32))
