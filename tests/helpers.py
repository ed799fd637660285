"""The test helpers: one comparison (assert_close), one op checker (check_op), one shape table
(SHAPES), one layer factory (make_layer), and the few small factories the op families share.

Import them with `from helpers import ...`: pytest puts tests/ on sys.path (the rootdir
conftest), and tests/cuda_sim/conftest.py does the same for that folder. Fixtures (rng,
one_thread) live in tests/conftest.py.

check_op follows tinygrad's helper_test_op and PyTorch's OpInfo: an op, its reference, a
function that makes its inputs, a table of shapes; it runs the forward against the reference,
the backward against the reference's backward and against float64 central differences, and
checks that no input was modified.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import numpy as np

import fastmoe_nb as fm
from fastmoe_nb.nn.gradcheck import gradcheck

# --------------------------------------------------------------------------- comparing

# float32 results are compared with the float64-accumulating reference at a few hundred ulps of
# the largest magnitude (eps = 6e-8); float64 at rounding level (eps = 1.1e-16, rtol/eps = 9e3).
RTOL = {np.float32: 1e-5, np.float64: 1e-12}

# The absolute floor of the comparison's scale. Every factory here draws its arrays O(1) (inputs
# standard normal, weights scaled by 1/sqrt(fan-in) so that activations stay O(1)), so a result
# is a sum of O(1) terms; where that sum is mathematically zero (a k = E balancing gradient, the
# router gradient of a one-expert layer) rounding leaves noise of ~eps * sqrt(terms), and a
# floor of 1 keeps it below rtol: 170 float32 rounding errors fit in rtol=1e-5, 9000 float64 ones
# in 1e-12. A test whose values are far from O(1) passes the scale of its own terms.
FLOOR = 1.0


def _each(f, a):
    """f over the entries of a tuple (a namedtuple keeps its type), list or dict."""
    if isinstance(a, tuple):
        items = [f(v) for v in a]
        return type(a)(*items) if hasattr(a, "_fields") else tuple(items)
    if isinstance(a, list):
        return [f(v) for v in a]
    return {n: f(v) for n, v in a.items()}


def to_host(a):
    """A device array (Numba's, or anything with copy_to_host) on the host, also inside
    tuples such as a Plan, lists and dicts; others unchanged."""
    if isinstance(a, (tuple, list, dict)):
        return _each(to_host, a)
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def is_device(a):
    """Whether a is a CUDA device array (Numba's device arrays, the simulator's, CuPy, PyTorch
    CUDA tensors)."""
    return hasattr(a, "__cuda_array_interface__") or bool(getattr(a, "__cuda_ndarray__", False))


def to_device(a):
    """A host array on the CUDA device (simulator or GPU), also inside tuples such as a Plan,
    lists and dicts (keyword options); None and non-arrays unchanged."""
    if isinstance(a, (tuple, list, dict)):
        return _each(to_device, a)
    if not isinstance(a, np.ndarray):
        return a
    from numba import cuda   # noqa: PLC0415  (only where the CUDA target was set up)
    return cuda.to_device(np.ascontiguousarray(a))


def assert_close(got, want, dtype=None, rtol=None, floor=FLOOR, err_msg=""):
    """got equals want: max |got - want| <= rtol * max(max |want|, floor).

    Shapes and dtypes must be equal; integer and boolean arrays (expert ids, plans) compare
    exactly, and so do non-finite entries (same place, same value); 0-size arrays by shape.
    Tuples (Routing, Plan, a function's several outputs) and dicts compare entry by entry,
    None only with None; device arrays are copied to the host first.
    rtol: RTOL of dtype (want's when None); floor: see FLOOR above."""
    where = f"{err_msg}: " if err_msg else ""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), \
            f"{where}keys {sorted(got) if isinstance(got, dict) else type(got)} != {sorted(want)}"
        for name in want:
            assert_close(got[name], want[name], dtype, rtol, floor, f"{err_msg}[{name!r}]")
        return
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), \
            f"{where}expected a sequence of {len(want)}, got {type(got).__name__}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, dtype, rtol, floor, f"{err_msg}[{i}]")
        return
    if want is None or got is None:
        assert got is None and want is None, f"{where}{got!r} != {want!r}"
        return
    got, want = np.asarray(to_host(got)), np.asarray(to_host(want))
    assert got.shape == want.shape, f"{where}shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{where}dtype {got.dtype} != {want.dtype}"
    if want.dtype.kind in "iub":
        np.testing.assert_array_equal(got, want, err_msg=err_msg)
        return
    if got.size == 0:
        return
    finite = np.isfinite(want)
    if not finite.all():
        np.testing.assert_array_equal(got[~finite], want[~finite], err_msg=f"{where}non-finite")
        got, want = got[finite], want[finite]
        if not want.size:
            return
    rtol = RTOL[np.dtype(dtype or want.dtype).type] if rtol is None else rtol
    scale = max(float(np.abs(want).max()), floor)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    err = float(diff.max()) / scale if scale > 0 else float(diff.max())   # floor=0: zeros
    if not err <= rtol:   # also catches NaN in got
        i = np.unravel_index(int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0,
                             diff.shape)
        raise AssertionError(f"{where}relative error {err:.3e} > {rtol:.1e} (scale {scale:.3e}; "
                             f"worst at {tuple(int(v) for v in i)}: got {got[i]!r}, "
                             f"want {want[i]!r})")


def assert_plan_equal(got, want):
    """Two Plans field by field, dtypes too."""
    for name in ("rows", "offsets", "counts", "slots", "dropped"):
        g, w = np.asarray(to_host(getattr(got, name))), getattr(want, name)
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert got.capacity == want.capacity


def snapshot(value):
    """A deep copy of every array in value (arrays, tuples such as Plan, lists, dicts)."""
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, (tuple, list, dict)):
        return _each(snapshot, value)
    return value


def assert_unchanged(value, before, what="input"):
    """value bit for bit as snapshot(value) was."""
    if isinstance(value, np.ndarray):
        np.testing.assert_array_equal(value, before, err_msg=f"{what} was modified")
        assert value.dtype == before.dtype, f"{what} changed dtype"
    elif isinstance(value, (tuple, list)):
        for i, (v, b) in enumerate(zip(value, before)):
            assert_unchanged(v, b, f"{what}[{i}]")
    elif isinstance(value, dict):
        for n in value:
            assert_unchanged(value[n], before[n], f"{what}[{n!r}]")


# --------------------------------------------------------------------------- the shape table

class Shape(NamedTuple):
    """One awkward case for every op family (DESIGN.md vocabulary): T tokens, model width d,
    expert hidden width h, E experts, k chosen per token; empty: expert E-1 gets no token
    (when E > k); capacity: a per-expert limit (None: dropless). Each family reads what it
    needs: activations act on (T, d), routers on (T, E) with k, dispatch on (T, k) of E with
    d columns, grouped GEMMs on the plan's blocks with K = d, M = h."""

    T: int
    d: int
    h: int
    E: int
    k: int
    empty: bool = False
    capacity: Optional[int] = None

    def __str__(self):   # test ids: T4-d5-h3-E3-k2-empty-cap3
        s = f"T{self.T}-d{self.d}-h{self.h}-E{self.E}-k{self.k}"
        return s + ("-empty" if self.empty else "") + (
            "" if self.capacity is None else f"-cap{self.capacity}")


SHAPES = {
    "T=0": Shape(0, 8, 4, 4, 2),
    "T=1,d=100": Shape(1, 100, 8, 4, 2),
    "d=600": Shape(5, 600, 6, 4, 2),
    "d=781,empty-expert": Shape(9, 781, 6, 5, 2, empty=True),
    "E=1,k=1": Shape(6, 16, 4, 1, 1),
    "k=E": Shape(5, 12, 4, 3, 3),
    "capacity": Shape(17, 24, 8, 4, 2, capacity=5),
    "T=64": Shape(64, 32, 16, 8, 2),
    "tiny": Shape(4, 5, 3, 3, 2, empty=True),          # small enough for finite differences
    "tiny,k=E": Shape(3, 4, 2, 2, 2),
    "tiny,E=1": Shape(3, 4, 2, 1, 1),
}


# --------------------------------------------------------------------------- factories

def make_experts(rng, T, E, k, empty=False):
    """(T, k) int32: k distinct experts per token (what routers return); with empty, expert
    E-1 never chosen (when E > k)."""
    pool = E - 1 if empty and E > k else E
    return np.argsort(rng.random((T, pool)), axis=1)[:, :k].astype(np.int32)


def plan_of(rng, shape):
    """A Plan of shape's routing (distinct experts per token, capacity)."""
    return fm.make_plan(make_experts(rng, shape.T, shape.E, shape.k, shape.empty), shape.E,
                        shape.capacity)


class Layer(NamedTuple):
    """The arrays of one MoE layer and its moe_forward keywords: fm.moe_forward(x, router_w,
    w1, w2, k, **kw)."""

    x: Any
    router_w: Any
    w1: Any
    w2: Any
    kw: dict

    @property
    def args(self):
        return self.x, self.router_w, self.w1, self.w2


def make_layer(rng, T, d, h, E, dtype=np.float32, activation="swiglu", trans_w=False,
               shared=False, gate=False, bias=False, router_b=False, hs=None):
    """One layer with O(1) values: x (T, d) standard normal, router_w (d, E) / sqrt(d), w1
    (E, d, h|2h) / sqrt(d), w2 (E, h, d) / sqrt(h) [trans_w: (E, h|2h, d), (E, d, h)]; kw holds
    activation and trans_w, and when asked: a shared expert of width hs (h by default),
    shared_w1 (d, hs|2hs) / sqrt(d), shared_w2 (hs, d) / sqrt(hs); its gate shared_gate_w (d,)
    / sqrt(d); the sigmoid router's choice bias (E,) * 0.3; a router bias router_b (E,) * 0.3."""
    f = lambda *s: rng.standard_normal(s).astype(dtype)   # noqa: E731
    H1 = 2 * h if activation == "swiglu" else h
    x, router_w = f(T, d), f(d, E) / dtype(np.sqrt(d))
    w1 = (f(E, H1, d) if trans_w else f(E, d, H1)) / dtype(np.sqrt(d))
    w2 = (f(E, d, h) if trans_w else f(E, h, d)) / dtype(np.sqrt(h))
    kw = dict(activation=activation, trans_w=trans_w)
    if shared:
        hs = hs or h
        kw["shared_w1"] = f(d, 2 * hs if activation == "swiglu" else hs) / dtype(np.sqrt(d))
        kw["shared_w2"] = f(hs, d) / dtype(np.sqrt(hs))
    if gate:
        kw["shared_gate_w"] = f(d) / dtype(np.sqrt(d))   # (d,): its gradient keeps that shape
    if bias:
        kw["bias"] = f(E) * dtype(0.3)
    if router_b:
        kw["router_b"] = f(E) * dtype(0.3)
    return Layer(x, router_w, w1, w2, kw)


def layer_logits(x, router_w, router_b=None):
    """The logits a layer routes by: moe_forward's context's, through the public API (one
    hidden unit an expert: the experts do not matter here)."""
    E = router_w.shape[1]
    w1 = np.zeros((E, x.shape[1], 2), x.dtype)
    w2 = np.zeros((E, 1, x.shape[1]), x.dtype)
    return fm.moe_forward(x, router_w, w1, w2, 1, router_b=router_b,
                          return_context=True)[1].logits


# --------------------------------------------------------------------------- check_op

CUDA = (os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
        or os.environ.get("FASTMOE_NB_CUDA_TESTS") == "1")
BACKENDS = ("cpu", "cuda") if CUDA else ("cpu",)
FD_MAX = 400       # central differences on cases whose float inputs hold at most this many entries


def _float_array(a):
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def _size(out):
    """Entries of a forward's float outputs."""
    if isinstance(out, tuple):
        return sum(_size(o) for o in out)
    out = to_host(out)
    return out.size if _float_array(out) else 0


def _cotangent(rng, out):
    """A random gradient for each float output of a forward (None for the others), shaped as
    nn.gradcheck passes it: an array for one output, a tuple for several."""
    if isinstance(out, tuple):
        return tuple(_cotangent(rng, o) for o in out)
    out = to_host(out)
    if not _float_array(out):
        return None
    return rng.standard_normal(out.shape).astype(out.dtype)


def _pair(f, grads, what):
    if grads:
        assert isinstance(f, tuple) and len(f) == 2 and all(map(callable, f)), \
            f"{what}: expected (forward, backward) with grads=True"
        return f
    return (f[0], None) if isinstance(f, tuple) else (f, None)


def check_op(op, ref, make_inputs, shapes, grads=True, backends=None,
             dtypes=(np.float32, np.float64), rtol=None, grad_rtol=None, floor=FLOOR,
             fd_max=FD_MAX, seed=0):
    """Check one op against its reference on every shape x dtype x backend.

    op, ref: forward(*args) -> an array or a tuple of them (Routing, Plan, several outputs);
      with grads, each a pair (forward, backward), backward(dy, *args) -> one gradient or None
      per entry of args, dy holding the gradient of each float output (an array for one
      output, a tuple with None at the non-float ones), as nn.gradcheck passes it.
    make_inputs(rng, shape, dtype) -> args, the list of arguments (arrays and options).
    shapes: Shape entries (or anything make_inputs reads); backends: "cpu" and / or "cuda"
      (BACKENDS: the CUDA entries where the simulator or a GPU is set up); a "cuda" case moves
      every array argument to the device and reads the results back.

    Each case checks: the forward against ref's (integer outputs exactly, floats by
    assert_close at rtol); no argument modified; with grads, the backward against ref's
    backward on one random dy (at grad_rtol; both default to RTOL of the dtype) and, in
    float64 on the host for the cases whose float inputs hold at most fd_max entries, against
    central differences of the op's forward (nn.gradcheck: every entry, rtol 1e-6). Returns
    how many cases were checked by central differences (a caller that needs them asserts it
    is not 0).
    """
    op_f, op_b = _pair(op, grads, "op")
    ref_f, ref_b = _pair(ref, grads, "ref")
    backends = BACKENDS if backends is None else backends
    fd_runs = 0
    for n, shape in enumerate(shapes):
        for dtype in dtypes:
            for backend in backends:
                where = f"{getattr(op_f, '__name__', 'op')} {shape} {np.dtype(dtype).name} " \
                        f"{backend}"
                if backend == "cuda" and not CUDA:
                    continue
                rng = np.random.default_rng([seed, n])
                args = list(make_inputs(rng, shape, dtype))
                before = snapshot(args)
                call = [to_device(a) for a in args] if backend == "cuda" else args
                got = op_f(*call)
                want = ref_f(*args)
                assert_close(got, want, rtol=rtol, floor=floor, err_msg=f"{where} forward")
                if grads:
                    dy = _cotangent(rng, want)
                    dy_before = snapshot(dy)
                    dcall = to_device(dy) if backend == "cuda" else dy
                    g = op_b(dcall, *call)
                    gw = ref_b(dy, *args)
                    assert_close(list(g), list(gw), rtol=grad_rtol, floor=floor,
                                 err_msg=f"{where} backward")
                    if backend == "cpu":
                        assert_unchanged(dy, dy_before, f"{where}: dy")
                for i, (a, b) in enumerate(zip(args, before)):
                    assert_unchanged(to_host(call[i]) if backend == "cuda" else a, b,
                                     f"{where}: argument {i}")
                if (grads and backend == "cpu" and np.dtype(dtype) == np.float64
                        and sum(a.size for a in args if _float_array(a)) <= fd_max
                        and _size(want) > 0):       # an empty output has nothing to differ
                    fd_runs += 1
                    gradcheck(op_f, args, lambda dy, args=args: list(op_b(dy, *args)))
    return fd_runs
