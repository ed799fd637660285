"""Validation of the public ops' operands, below every other layer: grouped-GEMM operands,
plans, expert ids, router options, and one description of an MoE layer (check_layer -> Layer)
that moe_forward, routed_experts, expert parallelism, soft MoE and the HF bridge share.

Every check raises ValueError / TypeError naming the argument and what was expected (the
primitives are in errors.py). What passes is returned on its backend's side — NumPy views for
host arrays — so the backends below trust their inputs.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import numpy as np

from . import errors as chk
from .backend import CUDA, as_host, backend_of, to_host
from .kernels.common import ACTIVATION_CODES, SWIGLU
from .kernels.cpu import dispatch as kd
from .kernels.cpu.config import HN, NR
from .kernels.cuda import WEIGHT_FORMATS as CUDA_WEIGHT_FORMATS
from .formats import QuantizedWeights
from .types import PackedWeights, Plan

ACTIVATIONS = tuple(ACTIVATION_CODES)
MAX_EXPERTS = 2**31 - 1   # expert ids are int32


def on_side(be):
    """The array view of a backend: host arrays as NumPy views, device arrays as they are."""
    return (lambda n, a: a) if be == CUDA else as_host


# --------------------------------------------------------------------------- scalars

def activation_code(activation):
    """The kernels' code of an activation name."""
    return ACTIVATION_CODES[chk.check_choice("activation", activation, ACTIVATIONS)]


def hidden_width(h_pre_width, activation, name="w1"):
    """The hidden width h after the activation of an (.., h_pre_width) first GEMM."""
    if activation == "swiglu":
        if h_pre_width % 2:
            raise ValueError(f"{name}: swiglu expects an even hidden width holding [gate | up] "
                             f"halves, got {h_pre_width}")
        return h_pre_width // 2
    return h_pre_width


def check_k(k, E, name="k"):
    return chk.check_int(name, k, 1, E, what=f"1..E = 1..{E}")


def check_capacity(capacity, what="a non-negative integer or None"):
    if capacity is None:
        return None
    return chk.check_int("capacity", capacity, 0, None, what=what)


def check_num_experts(num_experts):
    return chk.check_int("num_experts", num_experts, 1, MAX_EXPERTS,
                         what=f"an integer in 1..{MAX_EXPERTS} (expert ids are int32)")


def check_sigmoid_options(E, k, bias, n_group, topk_group, scale, dtype):
    """Validate DeepSeek-V3 router options against E experts; returns (k, n_group, topk_group,
    scale)."""
    n_group = chk.check_int("n_group", n_group, 1, E, what=f"1..E = 1..{E}")
    if E % n_group:
        raise ValueError(f"n_group: expected a divisor of E = {E}, got {n_group}")
    topk_group = chk.check_int("topk_group", topk_group, 1, n_group,
                               what=f"1..n_group = 1..{n_group}")
    if n_group == 1:
        topk_group = 1
    avail = topk_group * (E // n_group)
    k = chk.check_int("k", k, 1, avail,
                      what=f"1..{avail} (the experts in the topk_group kept groups)")
    scale = chk.check_real("scale", scale)
    if bias is not None:
        chk.check_float("bias", bias, shape=(E,), dtype=dtype)
    return k, n_group, topk_group, scale


# --------------------------------------------------------------------------- routing operands

def check_scores(name, x, check_finite):
    """A (T, E) score matrix -> (x contiguous on the host or as is on the device, backend)."""
    if backend_of(**{name: x}) == CUDA:
        chk.check_float(name, x, ndim=2)
        return x, CUDA
    x = chk.check_float(name, as_host(name, x), ndim=2)
    if check_finite:
        chk.check_finite(name, x)
    return np.ascontiguousarray(x), "cpu"


def check_grad(name, g, shape, dtype):
    """A host upstream gradient of the given shape and dtype, contiguous."""
    return np.ascontiguousarray(chk.check_float(name, as_host(name, g), shape=shape, dtype=dtype))


def check_experts(experts, T, E, name="experts"):
    """experts: (T, k) distinct expert ids per row in 0..E-1, as a router returns (host)."""
    experts = chk.check_int_array(name, as_host(name, experts), ndim=2)
    if experts.shape[0] != T:
        raise ValueError(f"{name}: expected shape ({T}, k) (one row per token of the logits), "
                         f"got {tuple(experts.shape)}")
    check_k(experts.shape[1], E, f"{name}.shape[1]")
    if experts.size:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"{name}: expected expert ids in 0..E-1 = 0..{E - 1}, found "
                             f"{lo if lo < 0 else hi}")
        if experts.shape[1] > 1 and (np.diff(np.sort(experts, axis=1), axis=1) == 0).any():
            raise ValueError(f"{name}: expected distinct experts in each row, as a router "
                             "returns, found a repeated id")
    return np.ascontiguousarray(experts, dtype=np.int32)


def check_expert_ids(experts, E):
    """make_plan's experts: (T, k) integer ids in 0..E-1 (host) -> flat int32 ids."""
    experts = chk.check_int_array("experts", as_host("experts", experts), ndim=2)
    if experts.size:
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"experts: expected expert ids in 0..num_experts-1 = 0..{E - 1}, "
                             f"found {lo if lo < 0 else hi}")
    return experts


# --------------------------------------------------------------------------- plans

_PLAN_DTYPES = {"rows": np.int32, "offsets": np.int64, "counts": np.int64, "slots": np.int32,
                "dropped": np.int64}


def _plan_error(name, code, i, v, N, E, n):
    f = {kd.PLAN_OFFSET0: ("offsets", f"offsets[0] = 0, got {v}"),
         kd.PLAN_OFFSET_ORDER: ("offsets", f"non-decreasing offsets, but offsets[{i}] = {v} "
                                           f"is below offsets[{i - 1}]"),
         kd.PLAN_OFFSET_END: ("offsets", f"offsets[E] = N = {N} (the length of rows), got {v}"),
         kd.PLAN_COUNT: ("counts", f"counts[e] = offsets[e+1] - offsets[e], but counts[{i}] "
                                   f"= {v}"),
         kd.PLAN_DROPPED: ("dropped", f"non-negative counts, got dropped[{i}] = {v}"),
         kd.PLAN_ROW_RANGE: ("rows", f"assignment ids in 0..T*k-1 = 0..{n - 1}, got "
                                     f"rows[{i}] = {v}"),
         kd.PLAN_SLOT_RANGE: ("slots", f"slots in -1..N-1 = -1..{N - 1}, got {v} at flat "
                                       f"index {i}"),
         kd.PLAN_ROW_SLOT: ("rows", f"rows and slots to be inverses (slots[rows[i]] == i), "
                                    f"but rows[{i}] = {v} and slots there is not {i}"),
         kd.PLAN_KEPT: ("slots", f"N = {N} kept slots (one per row), found {v}")}[code]
    return ValueError(f"{name}.{f[0]}: expected {f[1]}; pass a Plan from make_plan, or keep "
                      f"its fields consistent")


def check_plan(plan, name="plan"):
    """A Plan whose every indexing field is consistent, checked before any kernel reads it:
    dtypes and shapes, offsets from 0 to N non-decreasing, counts their differences, rows in
    0..T*k-1 and slots in -1..N-1 inverse to each other. A Plan is a public NamedTuple that
    users may build or _replace; an inconsistent one would otherwise make the kernels read or
    write out of bounds. O(T*k) in one Numba pass (device plans are copied to the host for it)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"{name}: expected a Plan from make_plan, got {type(plan).__name__}")
    fields = {}
    for f, dt in _PLAN_DTYPES.items():
        a = getattr(plan, f)
        chk.check_array(f"{name}.{f}", a, ndim=2 if f == "slots" else 1)
        if chk.dtype_of(a) != np.dtype(dt):
            raise TypeError(f"{name}.{f}: expected dtype {np.dtype(dt)}, got {chk.dtype_of(a)}")
        fields[f] = a
    E = fields["counts"].shape[0]
    if E < 1:
        raise ValueError(f"{name}.counts: expected at least one expert, got shape (0,)")
    for f, want in (("offsets", E + 1), ("dropped", E)):
        if fields[f].shape[0] != want:
            raise ValueError(f"{name}.{f}: expected shape ({want},) (E = {E} from "
                             f"{name}.counts), got {tuple(fields[f].shape)}")
    if plan.capacity is not None:
        chk.check_int(f"{name}.capacity", plan.capacity, 0, None,
                      what="a non-negative integer or None")
    if backend_of(**fields) == CUDA:
        fields = {f: to_host(a) for f, a in fields.items()}
    N = fields["rows"].shape[0]
    flat = np.ascontiguousarray(fields["slots"]).reshape(-1)
    code, i, v = kd.check_plan_kernel(np.ascontiguousarray(fields["rows"]),
                                      np.ascontiguousarray(fields["offsets"]),
                                      np.ascontiguousarray(fields["counts"]), flat,
                                      np.ascontiguousarray(fields["dropped"]))
    if code != kd.PLAN_OK:
        raise _plan_error(name, code, int(i), int(v), N, E, flat.shape[0])
    return plan


# --------------------------------------------------------------------------- grouped GEMMs

def check_offsets(offsets, E, N, name="offsets"):
    """offsets: (E+1,) integers, 0 = offsets[0] <= ... <= offsets[E] = N (host array)."""
    chk.check_int_array(name, offsets, shape=(E + 1,))
    o = np.asarray(offsets)
    if o[0] != 0 or o[-1] != N or (E and np.any(np.diff(o) < 0)):
        raise ValueError(f"{name}: expected non-decreasing offsets from 0 to N = {N} "
                         f"(E+1 = {E + 1} entries), got {o[0]}..{o[-1]}"
                         + ("" if E == 0 or not np.any(np.diff(o) < 0) else ", decreasing"))
    return np.ascontiguousarray(o, dtype=np.int64)


def check_format_dtype(name, w, dtype, operand):
    """Weights in a format compute in the dtype they decode to: the operand must have it."""
    if isinstance(w, QuantizedWeights) and w.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: {w.format} weights compute in {w.dtype} (float32 "
                        f"accumulation and activations); expected {operand} of {w.dtype}, got "
                        f"{np.dtype(dtype)}")


def check_gemm_weights(a, w, trans_w, name="w"):
    """w: (E, K, M) [trans_w: (E, M, K)] of a's dtype with K = a.shape[1] -> M."""
    check_format_dtype(name, w, a.dtype, "a")
    chk.check_float(name, w, ndim=3, dtype=a.dtype)
    K = a.shape[1]
    if (w.shape[2] if trans_w else w.shape[1]) != K:
        lay = "(E, M, K)" if trans_w else "(E, K, M)"
        raise ValueError(f"{name}: expected shape {lay} with K = a.shape[1] = {K} "
                         f"(trans_w={trans_w}), got {tuple(w.shape)}")
    return int(w.shape[1] if trans_w else w.shape[2])


def check_gemm_args(a, w, offsets, trans_w):
    """Validate a grouped GEMM's host operands; returns (a, w, offsets, M)."""
    a = chk.check_float("a", as_host("a", a), ndim=2)
    w = as_host("w", w)
    M = check_gemm_weights(a, w, trans_w)
    offsets = check_offsets(as_host("offsets", offsets), w.shape[0], a.shape[0])
    return a, w, offsets, M


def panels_of(M, swiglu):
    """(P, half) of PackedWeights with M output columns: P panels of NR columns (swiglu: HN
    gate and HN up columns each), half = M // 2 for swiglu, else 0."""
    half = M // 2 if swiglu else 0
    return -(-(half if half else M) // (HN if half else NR)), half


def check_packed(w, name):
    """PackedWeights' fields agree with each other (a user may build or edit one): panels a
    C-contiguous float (E, P, K, NR) array with P and NR those pack_weights makes for shape."""
    shape = w.shape
    if (not isinstance(shape, tuple) or len(shape) != 3
            or not all(isinstance(s, numbers.Integral) and s >= 0 for s in shape)):
        raise ValueError(f"{name}.shape: expected the (E, K, M) tuple of the packed weights, "
                         f"got {shape!r}")
    if not isinstance(w.panels, np.ndarray):
        raise TypeError(f"{name}.panels: expected a NumPy array from pack_weights, got "
                        f"{type(w.panels).__name__}")
    chk.check_float(f"{name}.panels", w.panels, ndim=4)
    M = w.out_features
    if w.swiglu and M % 2:
        raise ValueError(f"{name}.swiglu: expected an even number of output columns, got {M}")
    want = (shape[0], panels_of(M, w.swiglu)[0], w.in_features, NR)
    if tuple(w.panels.shape) != want or not w.panels.flags.c_contiguous:
        raise ValueError(f"{name}.panels: expected a C-contiguous array of shape {want} for "
                         f"{w!r}, got shape {tuple(w.panels.shape)}; pack again with "
                         f"pack_weights")


def check_weights(w, a, offsets, trans_w, name="w"):
    """w: a host array (as check_gemm_args), PackedWeights or QuantizedWeights (of a's dtype)
    -> (w, offsets, M)."""
    if isinstance(w, PackedWeights):
        check_packed(w, name)
        if w.dtype != a.dtype:
            raise TypeError(f"{name}: expected dtype {a.dtype} (the dtype of a; mixed dtypes "
                            f"are not cast), got PackedWeights of {w.dtype}")
        if w.in_features != a.shape[1]:
            raise ValueError(f"{name}: expected PackedWeights with K = a.shape[1] = "
                             f"{a.shape[1]}, got {w!r}")
        offsets = check_offsets(as_host("offsets", offsets), w.num_experts, a.shape[0])
        return w, offsets, w.out_features
    w = w if isinstance(w, QuantizedWeights) else as_host(name, w)
    M = check_gemm_weights(a, w, trans_w, name)
    return w, check_offsets(as_host("offsets", offsets), w.shape[0], a.shape[0]), M


def check_accumulator(name, a, shape, dtype, be):
    """An array gradients are added into in place: a writeable NumPy array of that shape and
    dtype (host arrays only)."""
    if be == CUDA:
        raise ValueError(f"{name}: gradients are added in place into host (NumPy) arrays only; "
                         "on CUDA use the returned gradients")
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array (added into in place), got "
                        f"{type(a).__name__}")
    chk.check_float(name, a, shape=tuple(shape), dtype=dtype)
    if not a.flags.writeable:
        raise ValueError(f"{name}: expected a writeable array (gradients are added into it)")
    return a


def check_into(into, w1, w2, like):
    """into of experts_backward: None or (dw1, dw2), each None or an accumulator of the
    weight's shape and like's dtype."""
    if into is None:
        return None
    if not isinstance(into, (tuple, list)) or len(into) != 2:
        raise TypeError(f"into: expected None or a pair (dw1, dw2), got {type(into).__name__}")
    be = backend_of(like=like)
    return tuple(None if a is None else check_accumulator(name, a, w.shape, like.dtype, be)
                 for name, a, w in (("into[0] (dw1)", into[0], w1),
                                    ("into[1] (dw2)", into[1], w2)))


# --------------------------------------------------------------------------- the layer

@dataclass(frozen=True)
class Layer:
    """One MoE layer, validated: its weights on their backend and its options.

    d model width, E experts (all ranks' under expert parallelism), k experts per token,
    H1 the first GEMM's width (2h for swiglu), h the hidden width; w1 (E_local, d, H1) and
    w2 (E_local, h, d), or with trans_w (E_local, H1, d) and (E_local, d, h). router_w (d, E)
    and router_b (E,) are None where the routing comes from elsewhere (routed_experts). The
    shared expert: shared_w1 (d, hs|2hs), shared_w2 (hs, d), shared_gate_w (d, 1) (given as
    shared_gate_shape). router / router_options / capacity are set by the router registry's
    check (routing/registry.py) for the layers that route.
    """

    backend: str
    dtype: Any
    d: int
    E: int
    H1: int
    h: int
    activation: str
    code: int
    trans_w: bool
    w1: Any
    w2: Any
    k: Optional[int] = None
    router_w: Any = None
    router_b: Any = None
    shared_w1: Any = None
    shared_w2: Any = None
    shared_gate_w: Any = None
    shared_gate_shape: Optional[tuple] = None
    router: Optional[str] = None
    router_options: dict = field(default_factory=dict)
    capacity: Optional[int] = None

    @property
    def has_shared(self):
        return self.shared_w1 is not None

    @property
    def quantized(self):
        """Whether the routed experts' weights are in a format (fastmoe_nb.formats): they are
        then frozen (no weight gradient)."""
        return isinstance(self.w1, QuantizedWeights) or isinstance(self.w2, QuantizedWeights)

    def with_router(self, router, k, options, capacity):
        """The layer with its router's validated name, k, options and capacity."""
        return replace(self, router=router, k=k, router_options=dict(options),
                       capacity=capacity)


def check_quantized(name, w, be):
    """Quantized expert weights (fastmoe_nb.formats) as they are: on the CPU every format, with
    device arrays (blocks on the device: fastmoe_nb.backends.cuda.to_device / on_device, which
    check them) the formats the CUDA kernels decode."""
    if be == CUDA and w.format not in CUDA_WEIGHT_FORMATS:
        raise TypeError(f"{name}: {w.format} weights run on the CPU only; on CUDA pass weights "
                        f"in one of {', '.join(CUDA_WEIGHT_FORMATS)} (or host arrays)")
    return w


def check_shards(E, P, name="router_w"):
    """E experts split evenly over P ranks (expert parallelism)."""
    if E % P:
        raise ValueError(f"{name}: E = {E} experts cannot be split evenly over the {P} ranks "
                         f"of comm; expected a number of experts divisible by {P}")


def check_expert_weights(w1, w2, d, dtype, activation, trans_w, num_experts=None,
                         shard=None):
    """w1: (E, d, h|2h), w2: (E, h, d) [trans_w: (E, h|2h, d), (E, d, h)] of the given dtype;
    returns (E, H1, h). Only shapes and dtypes are read (JAX tracers qualify). num_experts:
    the E w1 must hold (router_w's); shard: (E_local, P) when each rank holds E / P experts."""
    activation_code(activation)
    for name, w in (("w1", w1), ("w2", w2)):
        check_format_dtype(name, w, dtype, "x")
    chk.check_float("w1", w1, ndim=3, dtype=dtype)
    E = int(w1.shape[0])
    H1 = int(w1.shape[1] if trans_w else w1.shape[2])
    if shard is not None:
        El = shard[0]
        lay = f"(E/P = {El}, {'h|2h, d' if trans_w else 'd, h|2h'}), this rank's experts"
        if E != El or (w1.shape[2] if trans_w else w1.shape[1]) != d:
            raise ValueError(f"w1: expected shape {lay}, got {tuple(w1.shape)}")
    elif num_experts is not None and E != num_experts:
        raise ValueError(f"router_w, w1: router_w has {num_experts} expert columns but w1 "
                         f"holds {E} experts; expected the same E in both")
    chk.check_array("w1", w1, shape=(E, H1, d) if trans_w else (E, d, H1))
    h = hidden_width(H1, activation)
    chk.check_float("w2", w2, shape=(E, d, h) if trans_w else (E, h, d), dtype=dtype)
    if E < 1:
        raise ValueError(f"w1: expected at least one expert, got shape {tuple(w1.shape)}")
    return E, H1, h


def check_shared(shared_w1, shared_w2, shared_gate_w, d, dtype, activation, side):
    """The shared expert's weights -> (shared_w1, shared_w2, shared_gate_w (d, 1), the gate's
    given shape); all None without one."""
    if (shared_w1 is None) != (shared_w2 is None):
        raise ValueError("shared_w1, shared_w2: expected both (a shared expert) or neither")
    if shared_gate_w is not None and shared_w1 is None:
        raise ValueError("shared_gate_w: given without shared_w1 / shared_w2")
    gate_shape = None
    if shared_w1 is not None:
        shared_w1 = chk.check_float("shared_w1", side("shared_w1", shared_w1), shape=(d, None),
                                    dtype=dtype)
        hs = hidden_width(shared_w1.shape[1], activation, "shared_w1")
        shared_w2 = chk.check_float("shared_w2", side("shared_w2", shared_w2), shape=(hs, d),
                                    dtype=dtype)
    if shared_gate_w is not None:
        shared_gate_w = chk.check_float("shared_gate_w", side("shared_gate_w", shared_gate_w),
                                        dtype=dtype)
        gate_shape = tuple(shared_gate_w.shape)
        if gate_shape not in ((d,), (d, 1)):
            raise ValueError(f"shared_gate_w: expected shape ({d},) or ({d}, 1), got "
                             f"{gate_shape}")
        shared_gate_w = shared_gate_w.reshape(d, 1)
    return shared_w1, shared_w2, shared_gate_w, gate_shape


def check_layer(x, w1, w2, activation="swiglu", trans_w=False, router_w=None, k=None,
                router_b=None, shared_w1=None, shared_w2=None, shared_gate_w=None,
                num_shards=1, host_only=False, backend_arrays=None):
    """Validate an MoE layer's input and weights -> (x, Layer).

    x: (T, d); router_w: (d, E) or None (the routing comes from elsewhere: E is w1's);
    k: 1..E, or None when the router decides; num_shards: P ranks holding E / P experts each
    (w1, w2 then hold this rank's); host_only: device arrays are an error (expert
    parallelism, soft MoE); backend_arrays: more {name: array} that must share the backend.
    Nothing is copied; x comes back contiguous on the host.
    """
    named = dict(x=x, router_w=router_w, w1=w1, w2=w2, shared_w1=shared_w1,
                 shared_w2=shared_w2, shared_gate_w=shared_gate_w, router_b=router_b,
                 **(backend_arrays or {}))
    be = backend_of(**named)
    if host_only and be == CUDA:
        raise TypeError("x: expected host (NumPy) arrays; this layer runs on the CPU")
    side = on_side(be)
    trans_w = bool(trans_w)
    x = chk.check_float("x", side("x", x), ndim=2)
    d, dt = x.shape[1], x.dtype
    E = num_experts = None
    if router_w is not None:
        router_w = chk.check_float("router_w", side("router_w", router_w), shape=(d, None),
                                   dtype=dt)
        E = num_experts = int(router_w.shape[1])
        if E < 1:
            raise ValueError("router_w: expected at least one expert column, got shape "
                             f"{tuple(router_w.shape)}")
        check_shards(E, num_shards)
        if k is not None:
            k = check_k(k, E)
        if router_b is not None:
            router_b = chk.check_float("router_b", side("router_b", router_b), shape=(E,),
                                       dtype=dt)
            chk.check_finite("router_b", to_host(router_b))
    w1, w2 = (check_quantized(n, w, be) if isinstance(w, QuantizedWeights) else side(n, w)
              for n, w in (("w1", w1), ("w2", w2)))
    shard = (E // num_shards, num_shards) if num_shards > 1 else None
    El, H1, h = check_expert_weights(w1, w2, d, dt, activation, trans_w, num_experts, shard)
    E = El * num_shards if E is None else E
    if k is not None and router_w is None:
        k = check_k(k, E)
    s1, s2, sg, gate_shape = check_shared(shared_w1, shared_w2, shared_gate_w, d, dt,
                                          activation, side)
    if be != CUDA:
        x = np.ascontiguousarray(x)
    return x, Layer(be, dt, d, E, H1, h, activation, activation_code(activation), trans_w,
                    w1, w2, k, router_w, router_b, s1, s2, sg, gate_shape)


def check_routing(experts, weights, T, dtype, be):
    """routed_experts' routing: experts (T, k) integer ids, weights (T, k) of the layer's
    dtype -> (experts, weights) on the backend's side (make_plan checks the ids' range)."""
    side = on_side(be)
    experts = chk.check_int_array("experts", side("experts", experts), shape=(T, None))
    weights = chk.check_float("weights", side("weights", weights),
                              shape=(T, experts.shape[1]), dtype=dtype)
    return experts, weights


__all__ = ["ACTIVATIONS", "Layer", "SWIGLU", "activation_code", "check_layer",
           "check_expert_weights", "check_plan", "check_weights", "hidden_width"]
