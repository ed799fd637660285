"""fastmoe_nb.reference itself: it covers every public op with the same arguments, imports no
implementation, and its one bit-exact piece (the router logits' fused multiply-add chain)
is exact."""
import ast
import inspect
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmoe_nb as fm
import fastmoe_nb.interop as interop
from fastmoe_nb import reference as ref

from helpers import make_layer

# quantize / dequantize are the weight codec, whose reference is llama.cpp's (gguf.quants and
# ggml's bytes: tests/test_formats.py), not an op of the layer
CODEC = {"quantize", "dequantize"}
PUBLIC_OPS = sorted(n for n in fm.__all__ if inspect.isfunction(getattr(fm, n)) and n not in CODEC)
INTEROP_OPS = ["routed_experts", "routed_experts_backward"]


def _op(name):
    return getattr(interop if name in INTEROP_OPS else fm, name)


@pytest.mark.parametrize("name", PUBLIC_OPS + INTEROP_OPS)
def test_every_public_op_has_a_reference_taking_its_arguments(name):
    """Every call the library's signature accepts, positionally or by keyword, binds to the
    reference's (it may accept more: the explicit form of moe_backward)."""
    assert hasattr(ref, name), f"fastmoe_nb.reference has no {name}"
    lib, spec = inspect.signature(_op(name)), inspect.signature(getattr(ref, name))
    params = [p for p in lib.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    spec.bind(*[object() for _ in params])
    spec.bind(**{p.name: object() for p in params})
    required = [p.name for p in spec.parameters.values()
                if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
    assert [p.name for p in params if p.default is p.empty] == required


def test_the_reference_imports_no_implementation():
    """Only NumPy, SciPy and the result types: a reference that calls the code it judges
    cannot catch that code's mistakes."""
    tree = ast.parse(Path(ref.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    assert found <= {"__future__", "typing", "numpy", "scipy.special", ".types", ".errors"}, \
        found


# --------------------------------------------------------------------------- fma

def _round(value, dtype):
    """A Fraction rounded to nearest (ties to even) in dtype, exactly."""
    r = dtype(float(value))          # float64 rounding first: within one ulp of the answer
    cands = [np.nextafter(r, dtype(-np.inf)), r, np.nextafter(r, dtype(np.inf))]
    dist = [abs(Fraction(float(c)) - value) for c in cands]
    best = min(dist)
    ties = [c for c, dd in zip(cands, dist) if dd == best]
    ints = np.int32 if dtype == np.float32 else np.int64
    return min(ties, key=lambda c: int(np.array(c).view(ints)) & 1)


def _floats(dtype):
    width = 32 if dtype == np.float32 else 64
    # away from overflow and underflow, where Dekker's split and the theorem's bounds hold
    return st.floats(-2.0 ** 50, 2.0 ** 50, allow_nan=False, width=width).filter(
        lambda v: v == 0 or abs(v) > 2.0 ** -50)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_rounds_once(dtype):
    @settings(max_examples=300, deadline=None)
    @given(a=_floats(dtype), b=_floats(dtype), c=_floats(dtype), cancel=st.booleans())
    def check(a, b, c, cancel):
        a_, b_, c_ = (np.array([v], dtype) for v in (a, b, c))
        if cancel:                   # c = -round(a * b): the result is the product's error
            c_ = -(a_ * b_)
        got = ref.fma(a_, b_, c_)[0]
        exact = Fraction(float(a_[0])) * Fraction(float(b_[0])) + Fraction(float(c_[0]))
        assert got == _round(exact, dtype), (a, b, c)

    check()


# (a, b, c) where a * b + c rounded twice is wrong: float32 through a float64 sum lands exactly
# on a float32 midpoint (a * b = 2^-24 (1 + 4688 * 2^-46)); float64 without fusing loses the
# product's error to cancellation
TWICE_ROUNDED = {
    np.float32: [(1 + 2896 * 2.0 ** -23, 2.0 ** -24 * (1 - 2895 * 2.0 ** -23), 1.0),
                 (-(1 + 2896 * 2.0 ** -23), 2.0 ** -24 * (1 - 2895 * 2.0 ** -23), -1.0)],
    np.float64: [(float.fromhex("0x1.460aa170de33fp+0"), float.fromhex("0x1.412116a927b64p+0"),
                  float.fromhex("-0x1.98fd78a9afa3cp+0"))],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_where_rounding_twice_is_wrong(dtype):
    for a, b, c in TWICE_ROUNDED[dtype]:
        a_, b_, c_ = (np.array([v], dtype) for v in (a, b, c))
        exact = _round(Fraction(float(a_[0])) * Fraction(float(b_[0])) + Fraction(float(c_[0])),
                       dtype)
        twice = dtype(np.float64(a_[0]) * np.float64(b_[0]) + np.float64(c_[0])) \
            if dtype == np.float32 else a_[0] * b_[0] + c_[0]
        assert twice != exact                         # the case is what it claims
        assert ref.fma(a_, b_, c_)[0] == exact


@pytest.mark.parametrize("T", [1, 64, 65, 300])      # both of the library's logits paths
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_router_logits_are_the_librarys_bit_for_bit(rng, T, dtype):
    """The logits a layer routes by (moe_forward's context) are reference.router_logits
    exactly: one FMA chain per logit over d in order, then + router_b."""
    layer = make_layer(rng, T, 781 if T < 100 else 100, 4, 8, dtype, router_b=True)
    _, ctx = fm.moe_forward(*layer.args, 2, router_b=layer.kw["router_b"], return_context=True)
    want = ref.router_logits(layer.x, layer.router_w, layer.kw["router_b"])
    np.testing.assert_array_equal(ctx.logits, want)
    plain = layer.x.astype(np.float64) @ layer.router_w + layer.kw["router_b"]
    np.testing.assert_allclose(want, plain, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-13)
