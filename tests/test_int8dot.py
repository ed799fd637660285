"""kernels/cpu/int8dot.py: q8_0 / q4_0 / q4_k / q6_k weights times activations rounded to 8 bits (the opt-in
activations="q8_0"), in the decoding GEMM's (M, K) layout.

- The rounding equals reference.q8_0_activations bit for bit (ties, zeros, NaN / Inf blocks).
- The integer dot products are exact, so the kernel's result is the float32 sum of the rounded
  operands' exact block products: judged against the float64 product of the values the
  rounded activations stand for and dequantize(w), within float32 rounding of sum |terms|.
- The plain path (CPUs without AVX512_VNNI) gives the same bits as vpdpbusd, and any thread
  count the same bits.
- Through the ops: only streamed experts of the (M, K) layout take it; everything else is the
  exact path, bit for bit. A decoding step's whole MLP in one call (run_mlp) gives the bits
  of its products and activation run one by one.
"""
import numba
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import formats as F
from fastmoe_nb import reference as ref
from fastmoe_nb.kernels.cpu import config as kconfig
from fastmoe_nb.kernels.cpu import int8dot as ki
from fastmoe_nb.kernels.cpu import quant as kq

FORMATS = ("q8_0", "q4_0", "q4_k", "q6_k")


def offsets_of(counts):
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def rounded(x):
    """float64 values the rounded activations stand for (reference.q8_0_activations)."""
    q, d = ref.q8_0_activations(x)
    return (q.astype(np.float64).reshape(*d.shape, 32) * d[..., None]).reshape(x.shape)


def test_rounding_equals_the_reference(rng):
    K = 96
    x = (rng.standard_normal((6, K)) * 3).astype(np.float32)
    x[1, :32] = 0.0                                    # a block of zeros: d = 0
    x[1, 32:64] = np.float32(1e-37) * rng.standard_normal(32).astype(np.float32)  # 1/d overflows
    x[1, 64:96] = 0.0
    x[1, 64] = np.float32(2e-36)                                                # 1/d does not
    x[2, 5] = np.nan                                   # a block with a NaN, one with an Inf
    x[3, 40] = np.inf
    x[4, :32] = np.arange(-16, 16) / 2.0               # halves: ties for d = 1
    x[4, 0] = 127.0                                    # amax 127: d = 1
    rows = np.array([5, 0, 1, 2, 3, 4], np.int64)      # gathered out of order
    offsets = np.array([0, 6], np.int64)
    xq, xc, xs, xm, qidx = ki.quantize_rows(x, rows, offsets, np.ones(1, np.bool_), np.int32(8))
    q, d = ref.q8_0_activations(x[rows])
    assert xq.shape == (6, ki.padded(K)) == (6, 128)
    np.testing.assert_array_equal(xq[:, :K].view(np.int8), q)
    np.testing.assert_array_equal(xq[:, K:], 0)
    np.testing.assert_array_equal(xs[:, :K // 4], np.repeat(d, 8, axis=1))
    np.testing.assert_array_equal(xs[:, K // 4:], 0)
    sums = q.astype(np.int32).reshape(6, -1, 4).sum(2)
    np.testing.assert_array_equal(xc[:, :K // 4], -8 * sums)
    np.testing.assert_array_equal(xm[:, :K // 4], np.repeat(d, 8, axis=1) * sums.astype(np.float32))
    np.testing.assert_array_equal(qidx, np.arange(6))
    assert np.isnan(d[3, 0]) and np.isnan(d[4, 1]) and d[2, 0] == 0 and d[5, 0] == 1
    assert d[2, 1] == 0 and (q[2, 32:64] == 0).all() and d[2, 2] > 0 and q[2, 64] == 127
    # ties round away from zero (C's roundf, as ggml rounds): -7.5 -> -8, 0.5 -> 1, 7.5 -> 8
    j = np.arange(-15, 16) / 2.0
    np.testing.assert_array_equal(q[5, 1:32], np.sign(j) * np.floor(np.abs(j) + 0.5))
    assert q[5, 0] == 127


def run(src, ridx, qw, offsets, experts=None):
    N, M = int(offsets[-1]), qw.shape[1]
    out = np.full((N, M), np.nan, np.float32)
    if experts is None:
        experts = np.ones(offsets.shape[0] - 1, np.bool_)
    ki.run_qstream(src, qw.blocks, kq.FORMATS[qw.format], True, offsets, out, experts, ridx)
    return out


# rows an expert (an empty expert, and the row groups 4, 2, 1 and their sums), K: one block
# (half a pair), three blocks, 32 blocks (q4_k: one and four super-blocks); M a partial last
# task of columns
CASES = [(f, *c) for f in ("q8_0", "q4_0") for c in (((1,), 32, 40), ((3, 0, 7, 1), 96, 70),
                                                      ((2, 5), 1024, 130))]
CASES += [(f, *c) for f in ("q4_k", "q6_k") for c in (((3, 0, 7, 1), 256, 70),
                                                      ((2, 5), 1024, 130))]


@pytest.mark.parametrize("fmt,counts,K,M", CASES)
def test_kernel_against_float64_products_of_the_rounded_activations(rng, fmt, counts, K, M):
    offsets = offsets_of(counts)
    N = int(offsets[-1])
    w = rng.standard_normal((len(counts), M, K)).astype(np.float32)
    qw = F.quantize(w, fmt)
    W = F.dequantize(qw).astype(np.float64)
    src = (rng.standard_normal((N + 4, K)) * 2).astype(np.float32)
    ridx = rng.permutation(N + 4)[:N].astype(np.int64)
    experts = np.array(counts) > 0
    experts[-1] = False if len(counts) > 2 else experts[-1]     # an expert left out
    got = run(src, ridx, qw, offsets, experts)
    xh = rounded(src[ridx])
    for e in range(len(counts)):
        lo, hi = offsets[e], offsets[e + 1]
        if not experts[e]:
            assert np.isnan(got[lo:hi]).all()                   # rows not written
            continue
        want = xh[lo:hi] @ W[e].T
        scale = np.abs(xh[lo:hi]) @ np.abs(W[e]).T
        assert (np.abs(got[lo:hi] - want) <= 1e-5 * scale + 1e-30).all()


def test_nan_activations_give_nan_rows(rng):
    qw = F.quantize(rng.standard_normal((1, 8, 64)).astype(np.float32), "q4_0")
    src = rng.standard_normal((2, 64)).astype(np.float32)
    src[1, 3] = np.nan
    got = run(src, np.arange(2, dtype=np.int64), qw, np.array([0, 2], np.int64))
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()


def test_plain_path_gives_the_same_bits_as_vpdpbusd(rng):
    """The kernel without vpdpbusd (built here from the same factory and row groups, any
    host) and the host's own kernel (with vpdpbusd where the CPU has AVX512_VNNI) agree bit
    for bit."""
    plain = kq._make_cols_kernel(kq._make_cols_task(tuple(
        (r, ki._make_group(*ki._PAIRS[kq.Q4_0], r, s, vnni=False))
        for r, s in kconfig.COL_GROUPS)))
    counts = (3, 1)
    offsets = offsets_of(counts)
    K, M = 160, 24
    qw = F.quantize(rng.standard_normal((2, M, K)).astype(np.float32), "q4_0")
    src = (rng.standard_normal((4, K)) * 5).astype(np.float32)
    ridx = np.arange(4, dtype=np.int64)
    experts = np.ones(2, np.bool_)
    tasks, _, _ = kq.qstream_plan(offsets, experts, K, M, True, fmt=kq.Q4_0)
    *rounded_rows, qidx = ki.quantize_rows(src, ridx, offsets, experts,
                                           np.int32(ki.OFFSET[kq.Q4_0]))
    got = np.full((4, M), np.nan, np.float32)
    plain(tuple(rounded_rows), qidx, qw.blocks, offsets, tasks, got)
    np.testing.assert_array_equal(got, run(src, ridx, qw, offsets))


def _weights(rng, E, d, h, fmt):
    w1 = F.quantize((rng.standard_normal((E, 2 * h, d)) / np.sqrt(d)).astype(np.float32), fmt)
    w2 = F.quantize((rng.standard_normal((E, d, h)) / np.sqrt(h)).astype(np.float32), fmt)
    return w1, w2


@pytest.mark.parametrize("fmt,d,h", [("q8_0", 96, 64), ("q4_0", 96, 64), ("q4_k", 256, 256),
                                     ("q6_k", 256, 512)])
def test_moe_forward_decoding_with_q8_0_activations(rng, fmt, d, h):
    """A decoding step: every expert streamed, each product within float32 rounding of the
    rounded activations' product; near the exact layer (rounding moves a value by up to
    amax / 254 of its block: about 0.5% RMS a product, two products here); bitwise the same
    for 1 and 2 threads."""
    T, E, k = 5, 4, 2
    x = rng.standard_normal((T, d)).astype(np.float32)
    router_w = rng.standard_normal((d, E)).astype(np.float32)
    w1, w2 = _weights(rng, E, d, h, fmt)
    n1, n2 = w1.with_activations("q8_0"), w2.with_activations("q8_0")
    kw = dict(k=k, trans_w=True)
    y, ctx = fm.moe_forward(x, router_w, n1, n2, return_context=True, **kw)
    exact = fm.moe_forward(x, router_w, w1, w2, **kw)
    err = np.sqrt(np.sum((y - exact) ** 2) / np.sum(exact ** 2))
    assert 0 < err < 3e-2
    # the first product alone, against the rounded activations' float64 product
    plan = ctx.plan
    xs = x[np.asarray(plan.rows) // k]
    h1 = fm.grouped_gemm(xs, n1, plan.offsets, trans_w=True)
    W1 = F.dequantize(w1).astype(np.float64)
    xh = rounded(xs)
    for e in range(E):
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        want = xh[lo:hi] @ W1[e].T
        scale = np.abs(xh[lo:hi]) @ np.abs(W1[e]).T
        assert (np.abs(h1[lo:hi] - want) <= 1e-5 * scale + 1e-30).all()
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = fm.moe_forward(x, router_w, n1, n2, **kw)
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(y, y1)


@pytest.mark.parametrize("f1,f2,counts", [
    ("q4_k", "q6_k", (2, 0, 3, 1)),                         # a decoding step: one fused call
    ("q8_0", "q4_0", (kconfig.QSTREAM_ROWS + 1, 0, 2, 1)),  # one expert on panels: product by product
])
def test_decoding_mlp_in_one_call_gives_the_products_bits(rng, monkeypatch, f1, f2, counts):
    """The decoding step's fused MLP (int8dot.run_mlp: a stacked [gate | up] w1 and a w2 of
    another format) gives h_pre, h_act and ys bit for bit as grouped_gemm, the activation
    and grouped_gemm do one after the other, and the layer's y the same bits for 1 and 2
    threads."""
    run_mlp = ki.run_mlp
    E, d, h = len(counts), 256, 256
    gate, up = (F.quantize((rng.standard_normal((E, h, d)) / 16).astype(np.float32), f1,
                           activations="q8_0") for _ in range(2))
    w1 = F.stack(gate, up)
    w2 = F.quantize((rng.standard_normal((E, d, h)) / 16).astype(np.float32), f2,
                    activations="q8_0")
    T = int(sum(counts))
    x = rng.standard_normal((T, d)).astype(np.float32)
    experts = np.repeat(np.arange(E, dtype=np.int32), counts)[rng.permutation(T)][:, None]
    weights = rng.random((T, 1)).astype(np.float32)
    calls = []
    monkeypatch.setattr(ki, "run_mlp", lambda *a: calls.append(1) or run_mlp(*a))
    y, ctx = fm.routed_experts(x, experts, weights, w1, w2, trans_w=True, return_context=True)
    assert len(calls) == (max(counts) <= kconfig.QSTREAM_ROWS)
    offsets = ctx.plan.offsets
    h_pre = fm.grouped_gemm(ctx.xs, w1, offsets, trans_w=True)
    h_act = fm.activate(h_pre, "swiglu")
    np.testing.assert_array_equal(ctx.h_pre, h_pre)
    np.testing.assert_array_equal(ctx.h_act, h_act)
    np.testing.assert_array_equal(ctx.ys, fm.grouped_gemm(h_act, w2, offsets, trans_w=True))
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y1 = fm.routed_experts(x, experts, weights, w1, w2, trans_w=True)
    finally:
        numba.set_num_threads(n)
    np.testing.assert_array_equal(y, y1)
    np.testing.assert_array_equal(y, fm.routed_experts(x, experts, weights, w1, w2,
                                                       trans_w=True))


def test_other_paths_stay_exact(rng):
    """Experts past QSTREAM_ROWS rows (decoded panels for BLAS) and the (K, M) layout keep
    float32 activations: the same bits as the weight without the setting."""
    E, K, M = 2, 64, 96
    counts = (40, 2)
    offsets = offsets_of(counts)
    a = rng.standard_normal((int(offsets[-1]), K)).astype(np.float32)
    for trans in (True, False):
        shape = (E, M, K) if trans else (E, K, M)
        q = F.quantize(rng.standard_normal(shape).astype(np.float32), "q8_0")
        got = fm.grouped_gemm(a, q.with_activations("q8_0"), offsets, trans_w=trans)
        exact = fm.grouped_gemm(a, q, offsets, trans_w=trans)
        big = slice(0, counts[0])
        np.testing.assert_array_equal(got[big], exact[big])
        if not trans:
            np.testing.assert_array_equal(got, exact)
        else:
            assert not np.array_equal(got[counts[0]:], exact[counts[0]:])


def test_activations_argument(rng):
    w256 = rng.standard_normal((1, 4, 256)).astype(np.float32)
    for fmt in FORMATS:
        q = F.quantize(w256, fmt, activations="q8_0")
        assert q.activations == "q8_0" and "activations='q8_0'" in repr(q)
    for fmt in ("bf16", "f32"):
        with pytest.raises(ValueError, match="activations: 'q8_0' activations take q8_0, q4_0, "
                                             "q4_k, q6_k weights"):
            F.quantize(w256, fmt, activations="q8_0")


_CACHE_KEYS = """
import numpy as np
from numba.core.registry import cpu_target
from fastmoe_nb import formats as F
from fastmoe_nb.kernels.cpu import int8dot as ki
codegen = cpu_target.target_context.codegen()
def keys():
    return [str(k._cache._index_key(("sig",), codegen)[2])
            for k in [ki._COLS_KERNELS[f] for f in sorted(ki._COLS_KERNELS)]
            + [ki._make_mlp_kernel(f1, f2) for f1, f2 in MLP_PAIRS]]
MLP_PAIRS = ((ki.Q4_K, ki.Q6_K), (ki.Q6_K, ki.Q4_K), (ki.Q8_0, ki.Q8_0))
before = keys()
q = F.quantize(np.ones((1, 32, 64), np.float32), "q8_0")
out = np.empty((2, 32), np.float32)
ki.run_qstream(np.ones((2, 64), np.float32), q.blocks, ki.Q8_0, True, np.array([0, 2]), out,
               np.ones(1, np.bool_))
assert keys() == before, "a kernel's cache key changed once it ran"
print("\\n".join(before))
"""


def test_kernels_keep_one_disk_cache_key_across_processes():
    """The per-format kernels and the fused MLPs of a pair of formats (closures over jitted
    functions and the dot @intrinsic) are found in Numba's disk cache by a new process
    (cache.cached's key does not change once an @intrinsic has run), and the keys of
    different formats, or of a pair in the other order, differ."""
    import subprocess
    import sys
    runs = [subprocess.run([sys.executable, "-c", _CACHE_KEYS], capture_output=True, text=True,
                           check=True).stdout for _ in range(2)]
    assert runs[0] == runs[1]
    keys = [k for k in runs[0].split("\n") if k]
    assert len(keys) == len(ki.FORMATS) + 3 and len(set(keys)) == len(keys)
