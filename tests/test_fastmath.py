"""kernels/cpu/fastmath.py: the vectorizable exp against np.exp on dense grids, random bit
patterns and edge values; the branch-free activations at the extremes; and that a loop over
them is vectorized (what the module is for)."""
import numpy as np
import pytest
from numba import njit

from fastmoe_nb.kernels.cpu import activations as ka
from fastmoe_nb.kernels.cpu import fastmath as fmath

# max relative error allowed for normal results (float32: ~2.5 ulp; float64: ~4.5 ulp)
REL = {np.float32: 3e-7, np.float64: 1e-15}


@njit
def _exp_array(x, out):
    for i in range(x.shape[0]):
        out[i] = fmath.exp(x[i])


def fast_exp(x):
    out = np.empty_like(x)
    _exp_array(x, out)
    return out


def _inputs(dtype, lo, hi, rng):
    """A dense grid over [lo, hi], random bit patterns (every exponent, NaNs, infs
    included), and the edge values."""
    f = np.finfo(dtype)
    itype = np.uint32 if dtype == np.float32 else np.uint64
    bits = rng.integers(0, np.iinfo(itype).max, 1 << 20, dtype=itype, endpoint=True)
    sub = f.smallest_subnormal
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, f.max, -f.max, f.tiny, sub, 1.0, -1.0,
             np.log(f.max), np.log(f.tiny), np.log(sub), np.log(sub) - 0.7, 0.5 * np.log(2.0),
             -0.5 * np.log(2.0)]
    edges = np.array(edges, dtype)
    with np.errstate(over="ignore"):
        near = np.concatenate([np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    return np.concatenate([np.linspace(lo, hi, 3_000_001, dtype=np.float64).astype(dtype),
                           bits.view(dtype), edges, near])


@pytest.mark.parametrize("dtype,lo,hi", [(np.float32, -110.0, 95.0),
                                         (np.float64, -760.0, 720.0)])
def test_exp_matches_numpy(rng, dtype, lo, hi):
    x = _inputs(dtype, lo, hi, rng)
    got = fast_exp(x)
    assert got.dtype == dtype
    f = np.finfo(dtype)
    with np.errstate(over="ignore", invalid="ignore"):   # signalling NaNs among the bits
        # float64 reference for float32; for float64, np.exp (< 1 ulp)
        want = np.exp(x.astype(np.float64))
    nan = np.isnan(x)
    assert np.isnan(got[nan]).all()
    assert not np.isnan(got[~nan]).any()
    slack = 1 + REL[dtype]
    over = want / slack > f.max
    assert (got[over] == np.inf).all()
    normal = (want >= f.tiny) & (want <= f.max / slack)
    rel = np.abs(got[normal].astype(np.float64) - want[normal]) / want[normal]
    assert rel.max() <= REL[dtype], (rel.max(), x[normal][rel.argmax()])
    # subnormal results and underflow to 0: within one subnormal step, never negative
    small = ~nan & (want < f.tiny)
    assert (got[small] >= 0).all()
    assert np.abs(got[small].astype(np.float64) - want[small]).max() <= f.smallest_subnormal
    assert (got[x == -np.inf] == 0).all() and (got[x == np.inf] == np.inf).all()


def test_exp_is_exact_at_zero_and_monotone_on_a_grid():
    for dtype in (np.float32, np.float64):
        assert fast_exp(np.zeros(3, dtype)).tolist() == [1.0, 1.0, 1.0]
        g = fast_exp(np.linspace(-20, 20, 200_001, dtype=dtype))
        assert (np.diff(g) >= 0).all(), dtype


@njit
def _scalars(x):
    out = np.empty((7, x.shape[0]), x.dtype)
    for i in range(x.shape[0]):
        out[0, i] = fmath.sigmoid(x[i])
        out[1, i] = fmath.silu(x[i])
        out[2, i] = fmath.silu_grad(x[i])
        out[3, i] = fmath.gelu_tanh(x[i])
        out[4, i] = fmath.gelu_tanh_grad(x[i])
        out[5, i] = fmath.gelu_grad(x[i])
        out[6, i] = fmath.relu(x[i])
    return out


def _reference_scalars(x):
    """The same functions in float64 NumPy, written the textbook way."""
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-x))
        c = np.sqrt(2.0 / np.pi)
        u = c * (x + 0.044715 * x ** 3)
        th = np.tanh(u)
    from scipy.special import erf
    return np.stack([s, x * s, s * (1 + x * (1 - s)), 0.5 * x * (1 + th),
                     0.5 * (1 + th) + 0.5 * x * (1 - th * th) * c * (1 + 3 * 0.044715 * x * x),
                     0.5 * (1 + erf(x / np.sqrt(2))) + x * np.exp(-0.5 * x * x) / np.sqrt(
                         2 * np.pi),
                     np.maximum(x, 0)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_scalars_over_their_range(dtype):
    x = np.concatenate([np.linspace(-30, 30, 60_001), [-1e6, -1e4, -800, -100, -88, 88, 100,
                                                       800, 1e4, 1e6, 0.0, -0.0]]).astype(dtype)
    got = _scalars(x)
    want = _reference_scalars(x)
    assert got.dtype == dtype and np.isfinite(got).all()
    # per element: relative where the value is not tiny, absolute near 0
    tol = 30 * np.finfo(dtype).eps
    err = np.abs(got - want) / np.maximum(np.abs(want), 1.0)
    assert err.max() <= tol, (err.max(axis=1), tol)
    assert np.array_equal(got[6], np.maximum(x, 0))


def test_relu_keeps_nan_and_sigmoid_saturates():
    x = np.array([np.nan, -np.inf, np.inf], np.float32)
    got = _scalars(x)
    assert np.isnan(got[6, 0]) and got[6, 1] == 0 and got[6, 2] == np.inf
    assert got[0].tolist()[1:] == [0.0, 1.0] and np.isnan(got[0, 0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_loops_are_vectorized(dtype):
    """The point of fastmath: these loops compile to vector maths with no libm exp call.
    (Compiled afresh: numba cannot inspect code loaded from its cache.)"""
    from fastmoe_nb.kernels.cpu import routing as kr
    x = np.ones(16, dtype)
    lane = "float" if dtype == np.float32 else "double"
    for loop, args, lanes in ((ka._silu, (x, x.copy()), lane),
                              (ka._swiglu, (x, x, x.copy()), lane),
                              (ka._gelu_tanh_bwd, (x, x, x.copy()), lane),
                              (ka._swiglu_backward, (x, x, x, x.copy(), x.copy()), lane),
                              (kr.row_exp_sum, (x, 1.0, np.empty(16)), "double")):
        fresh = njit(loop.py_func)
        fresh(*args)
        ir = fresh.inspect_llvm(fresh.signatures[0])
        assert f"x {lanes}>" in ir, loop.py_func
        assert "@exp" not in ir and "@llvm.exp" not in ir, loop.py_func
