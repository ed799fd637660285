"""The CUDA backend: the host side of every op over the kernels of kernels/cuda/.

Each function takes device arrays (anything with __cuda_array_interface__: Numba, CuPy,
PyTorch), allocates the outputs on the device, launches the kernels on the default stream and
returns Numba device arrays; the names and arguments mirror backends/cpu.py. The ops have
validated shapes and dtypes (fastmoe_nb.checks); what needs the data (expert ids in range,
finite logits, offsets) is checked here, on the device or on a small host copy, before any
output is written, and raised as the same ValueError as on the CPU.

Expert weights in a format (fastmoe_nb.formats: bf16, q8_0, q4_0; f32 / f64) are
QuantizedWeights whose blocks are a device array (to_device / on_device below make them): the
grouped GEMM reads the blocks as they are and decodes each weight in its load, accumulating in
float32. They are frozen: their backward gives the inputs' gradient only.
"""
from __future__ import annotations

import operator

import numpy as np
from numba import cuda

from .. import errors as chk
from ..backend import CUDA, is_device_array
from ..checks import check_experts, check_gemm_weights, check_offsets, check_quantized
from ..formats import QuantizedWeights, check_format
from ..kernels.common import SWIGLU
from ..kernels.cuda import WEIGHT_FORMATS
from ..kernels.cuda import activations as ka
from ..kernels.cuda import dispatch as kd
from ..kernels.cuda import gemm as kg
from ..kernels.cuda import routing as kr
from ..kernels.cuda.launch import CONFIG, blocks, gemm_threads, kernel
from ..types import Plan, Routing


def dev(a):
    """A Numba device-array view of any __cuda_array_interface__ array (no copy)."""
    return a if getattr(a, "__cuda_ndarray__", False) else cuda.as_cuda_array(a)


def _empty(shape, dtype):
    return cuda.device_array(shape, dtype=np.dtype(dtype))


def _launch(specs, name, dt, n, threads, *args):
    """Grid-stride launch of kernel `name` over n items (nothing to do: no launch)."""
    if n > 0:
        kernel(specs, name, np.dtype(dt))[blocks(n, threads), threads](*args)


def _per_row(specs, name, dt, rows, threads, *args):
    """Launch of a block-per-row kernel (grid-stride over rows; routers: a row is a token)."""
    if rows > 0:
        grid = max(1, min(rows, CONFIG["max_blocks"]))
        kernel(specs, name, np.dtype(dt))[grid, threads](*args)


def _rows(specs, name, dt, shape, *args):
    """A block-per-row elementwise kernel over a (rows, columns) output."""
    _per_row(specs, name, dt, shape[0] if shape[1] else 0, CONFIG["threads"], *args)


# --------------------------------------------------------------------------- routing

def _check_finite(name, x, check_finite):
    if not check_finite or x.size == 0:
        return
    flag = cuda.to_device(np.zeros(1, np.int32))
    _launch(kr.specs, "nonfinite", x.dtype, x.size, CONFIG["threads"], x, flag)
    if flag.copy_to_host()[0]:
        chk.check_finite(name, np.array([np.nan]))


def _check_k(name, k):
    if k > CONFIG["max_k"]:
        raise ValueError(f"{name}: the CUDA routers keep at most max_k = {CONFIG['max_k']} "
                         f"per token (fastmoe_nb.kernels.cuda.launch.configure), got {k}")


def _route(name, x, *args):
    """One block of route_threads per token."""
    _per_row(kr.specs, name, x.dtype, x.shape[0], CONFIG["route_threads"], x, *args)


def softmax(x, check_finite=True):
    # x: (T, E) -> (T, E)
    x = dev(x)
    _check_finite("x", x, check_finite)
    out = _empty(x.shape, x.dtype)
    _route("softmax", x, out)
    return out


def topk(x, k, check_finite=True):
    # x: (T, E) -> values (T, k), indices (T, k) int32
    x = dev(x)
    _check_k("k", k)
    _check_finite("x", x, check_finite)
    vals, idx = _empty((x.shape[0], k), x.dtype), _empty((x.shape[0], k), np.int32)
    _route("topk", x, k, vals, idx)
    return vals, idx


def softmax_topk(logits, k, renormalize=True, check_finite=True):
    # logits: (T, E) -> Routing(weights (T, k), experts (T, k) int32)
    logits = dev(logits)
    _check_k("k", k)
    _check_finite("logits", logits, check_finite)
    w, idx = _empty((logits.shape[0], k), logits.dtype), _empty((logits.shape[0], k), np.int32)
    _route("softmax_topk", logits, k, bool(renormalize), w, idx)
    return Routing(w, idx)


def sigmoid_topk(logits, k, bias=None, n_group=1, topk_group=1, renormalize=True, scale=1.0,
                 check_finite=True):
    # logits: (T, E), bias: (E,) or None -> Routing(weights (T, k), experts (T, k) int32)
    logits = dev(logits)
    _check_k("k", k)
    if n_group > 1:
        _check_k("topk_group", topk_group)
    _check_finite("logits", logits, check_finite)
    if bias is not None:
        bias = dev(bias)
        if check_finite and not np.isfinite(bias.copy_to_host()).all():
            chk.check_finite("bias", np.array([np.nan]))
    b = bias if bias is not None else _empty(1, logits.dtype)
    w, idx = _empty((logits.shape[0], k), logits.dtype), _empty((logits.shape[0], k), np.int32)
    _route("sigmoid_topk", logits, k, b, bias is not None, n_group, topk_group,
           bool(renormalize), float(scale), w, idx)
    return Routing(w, idx)


# --------------------------------------------------------------------------- dispatch

def _scan(a, n):
    """In place: a (n+1,) int64 -> exclusive prefix sums, a[n] the total (one block)."""
    P = CONFIG["scan_threads"]
    kernel(kd.specs, "scan", np.dtype(np.float32))[1, P](a, n)


def make_plan(experts, E, capacity=None):
    # experts: (T, k) int -> Plan of device arrays (rows, offsets, counts, slots, dropped)
    experts = dev(experts)
    T, k = experts.shape
    n = T * k
    threads = CONFIG["threads"]
    if experts.dtype != np.int32 or not experts.is_c_contiguous():
        flat = _empty(n, np.int32)
        _launch(kd.specs, "flatten", experts.dtype, n, threads, experts, flat)
    else:
        flat = experts.reshape(n)
    C = max(1, min(CONFIG["plan_chunks"], -(-n // CONFIG["plan_min_chunk"])))
    f32 = np.dtype(np.float32)  # the plan kernels hold no floats; one compiled copy
    hist = _empty(E * C + 1, np.int64)
    bad = _empty(C, np.int64)
    _launch(kd.specs, "plan_count", f32, C, threads, flat, E, C, hist, bad)
    bad_h = bad.copy_to_host()
    if bad_h.any():
        raise ValueError(f"experts: expected expert ids in 0..num_experts-1 = 0..{E - 1}, "
                         f"found {bad_h[np.flatnonzero(bad_h)[0]]}")
    _scan(hist, E * C)
    cap = -1 if capacity is None else min(int(capacity), n)   # above T*k it drops nothing
    first, offsets = _empty(E, np.int64), _empty(E + 1, np.int64)
    dropped = _empty(E, np.int64)
    _launch(kd.specs, "plan_sizes", f32, E + 1, threads, hist, C, cap, first, offsets, dropped)
    counts = _empty(E, np.int64)
    counts.copy_to_device(offsets[:E])
    _scan(offsets, E)
    N = n if capacity is None else int(offsets[E:].copy_to_host()[0])
    rows, slots = _empty(N, np.int32), _empty(n, np.int32)
    _launch(kd.specs, "plan_scatter", f32, C if n else 0, threads, flat, C, cap, hist, first,
            offsets, rows, slots)
    return Plan(rows, offsets, counts, slots.reshape(T, k), dropped, capacity)


def _plan(plan):
    return Plan(*(dev(a) for a in plan[:5]), plan.capacity)


def permute(x, plan):
    # x: (T, d) -> xs: (N, d)
    x, plan = dev(x), _plan(plan)
    out = _empty((plan.num_rows, x.shape[1]), x.dtype)
    _rows(kd.specs, "permute", x.dtype, out.shape, x, plan.rows, plan.top_k, out)
    return out


def combine(ys, plan, weights=None):
    # ys: (N, d), weights: (T, k) or None (ones) -> y: (T, d)
    ys, plan = dev(ys), _plan(plan)
    w = dev(weights) if weights is not None else _ones(plan.slots.shape, ys.dtype)
    out = _empty((plan.num_tokens, ys.shape[1]), ys.dtype)
    _rows(kd.specs, "combine", ys.dtype, out.shape, ys, plan.slots, w, out)
    return out


def _ones(shape, dtype):
    return cuda.to_device(np.ones(shape, dtype))


# --------------------------------------------------------------------------- experts

def activate(h, code):
    # h: (N, H) -> (N, H); swiglu: (N, 2H) -> (N, H)
    h = dev(h)
    H = h.shape[1] // 2 if code == SWIGLU else h.shape[1]
    out = _empty((h.shape[0], H), h.dtype)
    _rows(ka.specs, "activate", h.dtype, out.shape, h, code, out)
    return out


def sigmoid(z):
    # z: (T, M) -> (T, M)
    z = dev(z)
    out = _empty(z.shape, z.dtype)
    _launch(ka.specs, "sigmoid", z.dtype, out.size, CONFIG["threads"], z, out)
    return out


def add_rows(y, s, gate=None):
    # y (or None), s: (T, d) or (1, d) added to every row of y (a bias), gate: (T, 1) or None
    # -> [y +] s [* gate], a new array
    s = dev(s)
    out = _empty(s.shape if y is None else y.shape, s.dtype)
    y = out if y is None else dev(y)
    g = dev(gate) if gate is not None else out
    _rows(ka.specs, "add_rows", s.dtype, out.shape, y, y is not out, s, g, gate is not None, out)
    return out


def _host_offsets(offsets, E, N):
    """offsets (host or device) -> validated host int64 copy (one small copy from the GPU)."""
    o = dev(offsets).copy_to_host() if is_device_array(offsets) else np.asarray(offsets)
    return check_offsets(o, E, N)


def _gemm(a, w, offsets_h, trans_w, code, out):
    """The tiled grouped GEMM kernel (swiglu epilogue when code is SWIGLU); w a float device
    array or QuantizedWeights with device blocks (the kernel of its format)."""
    BM = CONFIG["gemm_bm"]
    counts = np.diff(offsets_h)
    tiles = np.zeros(offsets_h.shape[0], np.int64)
    np.cumsum(-(-counts // BM), out=tiles[1:])
    glu = code == SWIGLU
    ncol = -(-out.shape[1] // (CONFIG["gemm_bn"] // (2 if glu else 1)))
    total = int(tiles[-1]) * ncol
    if total == 0:
        return out
    name = "gemm_glu" if glu else "gemm"
    if isinstance(w, QuantizedWeights):
        name += "" if w.format in ("f32", "f64") else f"_{w.format}"
        w = dev(w.blocks)
    grid = max(1, min(total, CONFIG["max_blocks"]))
    kernel(kg.specs, name, np.dtype(a.dtype))[grid, gemm_threads()](
        a, w, bool(trans_w), cuda.to_device(offsets_h), cuda.to_device(tiles), code, out)
    return out


def _weights(name, w):
    """A float weight as a device array; QuantizedWeights checked for the CUDA kernels."""
    return check_quantized(name, w, CUDA) if isinstance(w, QuantizedWeights) else dev(w)


def grouped_gemm(a, w, offsets, trans_w=False, code=-1, name="w"):
    # a: (N, K), w: (E, K, M) [trans_w: (E, M, K)] (or QuantizedWeights of that logical shape),
    # offsets: (E+1,) -> (N, M), or act(.) with an activation code (swiglu: (N, M/2))
    a, w = dev(a), _weights(name, w)
    M = check_gemm_weights(a, w, trans_w, name)
    o = _host_offsets(offsets, w.shape[0], a.shape[0])
    Mo = M // 2 if code == SWIGLU else M
    return _gemm(a, w, o, trans_w, code, _empty((a.shape[0], Mo), a.dtype))


def _as3(b):
    """b: (K, M) -> (1, K, M), False; or (1, M, K), True: b as one expert without a copy."""
    if b.is_c_contiguous():
        return b.reshape(1, *b.shape), False
    if b.is_f_contiguous():
        return b.T.reshape(1, b.shape[1], b.shape[0]), True
    raise ValueError(f"b: expected a C- or F-contiguous (K, M) device array, got strides "
                     f"{b.strides}")


def matmul(a, b):
    # a: (T, K), b: (K, M) -> (T, M): the grouped GEMM with one expert
    a, b = dev(a), dev(b)
    chk.check_float("b", b, shape=(a.shape[1], None), dtype=a.dtype)
    w, trans = _as3(b)
    out = _empty((a.shape[0], b.shape[1]), a.dtype)
    return _gemm(a, w, np.array([0, a.shape[0]], np.int64), trans, -1, out)


def column_sums(a):
    # a: (T, M) -> (M,) = ones (1, T) @ a, the GEMM's order (T = 0: zeros); a bias's gradient
    a = dev(a)
    T, M = a.shape
    if T == 0:
        return cuda.to_device(np.zeros(M, a.dtype))
    return matmul(cuda.to_device(np.ones((1, T), a.dtype)), a).reshape(M)


# --------------------------------------------------------------------------- backward

def _zeros(shape, dtype):
    return cuda.to_device(np.zeros(shape, dtype))


def _per_token(specs, name, dt, T, *args):
    """A backward kernel with one thread per token, grid-stride."""
    _launch(specs, name, dt, T, CONFIG["threads"], *args)


def softmax_backward(dy, y):
    # dy: (T, E), y: (T, E) softmax output -> dx: (T, E)
    y = dev(chk.check_float("y", y, ndim=2))
    dy = dev(chk.check_float("dy", dy, shape=tuple(y.shape), dtype=y.dtype))
    dx = _empty(y.shape, y.dtype)
    _per_token(kr.specs, "softmax_backward", y.dtype, y.shape[0], dy, y, dx)
    return dx


def _router_grad_args(d_weights, logits, experts):
    """Validated (d_weights, logits, experts int32) device arrays; the expert ids are checked
    on a host copy (T*k ints) with the CPU path's check."""
    logits = dev(chk.check_float("logits", logits, ndim=2))
    T, E = logits.shape
    experts = dev(experts)
    checked = check_experts(experts.copy_to_host(), T, E)
    if experts.dtype != np.int32:
        experts = cuda.to_device(checked)
    d_weights = dev(chk.check_float("d_weights", d_weights, shape=tuple(experts.shape),
                                    dtype=logits.dtype))
    return d_weights, logits, experts


def softmax_topk_backward(d_weights, logits, experts, renormalize=True):
    # d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E)
    d_weights, logits, experts = _router_grad_args(d_weights, logits, experts)
    out = _empty(logits.shape, logits.dtype)
    _per_token(kr.specs, "softmax_topk_backward", logits.dtype, logits.shape[0], d_weights,
               logits, experts, bool(renormalize), out)
    return out


def sigmoid_topk_backward(d_weights, logits, experts, renormalize=True, scale=1.0):
    # d_weights: (T, k), logits: (T, E), experts: (T, k) -> d_logits: (T, E)
    d_weights, logits, experts = _router_grad_args(d_weights, logits, experts)
    scale = chk.check_real("scale", scale)
    out = _empty(logits.shape, logits.dtype)
    _per_token(kr.specs, "sigmoid_topk_backward", logits.dtype, logits.shape[0], d_weights,
               logits, experts, bool(renormalize), scale, out)
    return out


def permute_backward(d_xs, plan):
    # d_xs: (N, d) -> dx: (T, d), a combine with unit weights
    return combine(d_xs, plan, None)


def combine_backward(dy, ys, plan, weights=None):
    # dy: (T, d), ys: (N, d), weights: (T, k) or None -> (d_ys (N, d), d_weights (T, k))
    dy, ys, plan = dev(dy), dev(ys), _plan(plan)
    if weights is not None:
        chk.check_float("weights", weights, shape=tuple(plan.slots.shape), dtype=ys.dtype)
    w = dev(weights) if weights is not None else _ones(plan.slots.shape, ys.dtype)
    d_ys, d_w = _empty(ys.shape, ys.dtype), _zeros(plan.slots.shape, ys.dtype)
    _launch(kd.specs, "combine_backward", ys.dtype, plan.num_rows, CONFIG["threads"], dy, ys,
            plan.rows, w, d_ys, d_w)
    return d_ys, d_w


def activate_backward(dy, h, code):
    # dy: (N, H), h: (N, H) pre-activation [swiglu: (N, 2H)] -> dh: like h
    dy, h = dev(dy), dev(h)
    dh = _empty(h.shape, h.dtype)
    _rows(ka.specs, "activate_backward", h.dtype, dy.shape, dy, h, code, dh)
    return dh


def grouped_gemm_backward(dy, a, w, offsets, trans_w=False):
    # dy: (N, M), a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], offsets: (E+1,)
    # -> da (N, K) = the grouped GEMM of dy with w in the other layout, dw in w's layout
    a, w = dev(a), dev(w)
    M = check_gemm_weights(a, w, trans_w)
    dy = dev(chk.check_float("dy", dy, shape=(a.shape[0], M), dtype=a.dtype))
    o = _host_offsets(offsets, w.shape[0], a.shape[0])
    da = _gemm(dy, w, o, not trans_w, -1, _empty(a.shape, a.dtype))
    dw = _empty(w.shape, w.dtype)
    if dw.size:
        lhs, rhs = (dy, a) if trans_w else (a, dy)   # dw[e] = lhs[rows].T @ rhs[rows]
        BM, BN = CONFIG["gemm_bm"], CONFIG["gemm_bn"]
        total = w.shape[0] * -(-dw.shape[1] // BM) * -(-dw.shape[2] // BN)
        kernel(kg.specs, "gemm_dw", np.dtype(a.dtype))[
            max(1, min(total, CONFIG["max_blocks"])), gemm_threads()](
            lhs, rhs, cuda.to_device(o), dw)
    return da, dw


def rowdot_gate(dh, h, gate):
    # dh, h: (T, H), gate: (T, 1) -> (T, 1) = <dh[t], h[t]> * gate * (1 - gate)
    out = _empty(gate.shape, gate.dtype)
    _launch(ka.specs, "rowdot_gate", gate.dtype, gate.shape[0], CONFIG["threads"], dh, h, gate,
            out)
    return out


def scale_rows(s, gate):
    # s: (T, d), gate: (T, 1) -> s * gate
    return add_rows(None, s, gate)


def shared_backward(ds, x, w1, w2, gate_w, cache, code):
    # ds, x: (T, d), w1: (d, hs|2hs), w2: (hs, d), gate_w: (d, 1) or None, cache: shared_forward's
    # -> (dx (T, d), dw1, dw2, dgate_w (d, 1) or None); the CPU path's steps on the device
    ds, x, w1, w2 = dev(ds), dev(x), dev(w1), dev(w2)
    h_pre, h_act, gate = dev(cache["h_pre"]), dev(cache["h_act"]), cache["gate"]
    dh_act = matmul(ds, w2.T)                                       # (T, hs)
    dgate_w = dx_gate = None
    if gate_w is not None:
        gate, gate_w = dev(gate), dev(gate_w)
        dz = rowdot_gate(dh_act, h_act, gate)                       # (T, 1)
        dgate_w = matmul(x.T, dz)
        dx_gate = matmul(dz, gate_w.T)
        dh_act = scale_rows(dh_act, gate)
        ds = scale_rows(ds, gate)
    dw2 = matmul(h_act.T, ds)
    dh_pre = activate_backward(dh_act, h_pre, code)
    dw1 = matmul(x.T, dh_pre)
    dx = matmul(dh_pre, w1.T)
    if dx_gate is not None:
        dx = add_rows(dx, dx_gate)
    return dx, dw1, dw2, dgate_w


# --------------------------------------------------------------------------- the layer's steps

def router_logits(x, router_w, router_b=None):
    # x: (T, d), router_w: (d, E), router_b: (E,) or None -> (T, E) on the GEMM (one FMA
    # chain per logit, as on the CPU)
    logits = matmul(x, router_w)
    if router_b is None:
        return logits
    return add_rows(logits, dev(router_b).reshape(1, router_b.shape[0]))


def add_into(y, s):
    # y, s: (T, d) -> y + s (a new device array)
    return add_rows(y, s)


def experts_forward(xs, w1, w2, offsets, code, h, trans_w, keep, tokens=None):
    # xs: (N, d), w1: (E, d, H1), w2: (E, h, d) [trans_w: transposed] (either may be
    # QuantizedWeights) -> (h_pre or None, h_act, ys); not keeping h_pre, the activation runs
    # in the first GEMM's epilogue
    if not keep:
        h_act = grouped_gemm(xs, w1, offsets, trans_w, code, "w1")
        return None, h_act, grouped_gemm(h_act, w2, offsets, trans_w, name="w2")
    h_pre = grouped_gemm(xs, w1, offsets, trans_w, name="w1")
    h_act = activate(h_pre, code)
    return h_pre, h_act, grouped_gemm(h_act, w2, offsets, trans_w, name="w2")


def experts_backward(d_ys, xs, h_pre, h_act, w1, w2, offsets, code, trans_w, into=None):
    # the gradients of experts_forward -> (d_xs, dw1, dw2) (into: host accumulators only,
    # refused by the ops before this). Weights in a format are frozen: dw1 = dw2 = None, and
    # the inputs' gradient runs the forward kernel on the other layout of the same blocks.
    if isinstance(w1, QuantizedWeights) or isinstance(w2, QuantizedWeights):
        d_h_act = grouped_gemm(d_ys, w2, offsets, not trans_w, name="w2")
        d_h_pre = activate_backward(d_h_act, h_pre, code)
        return grouped_gemm(d_h_pre, w1, offsets, not trans_w, name="w1"), None, None
    d_h_act, dw2 = grouped_gemm_backward(d_ys, h_act, w2, offsets, trans_w)
    d_h_pre = activate_backward(d_h_act, h_pre, code)
    d_xs, dw1 = grouped_gemm_backward(d_h_pre, xs, w1, offsets, trans_w)
    return d_xs, dw1, dw2


def shared_forward(x, w1, w2, gate_w, code):
    # x: (T, d), w1: (d, hs|2hs), w2: (hs, d), gate_w: (d, 1) or None -> (s (T, d), cache)
    h_pre = matmul(x, w1)
    h_act = activate(h_pre, code)
    s = matmul(h_act, w2)
    gate = None
    if gate_w is not None:
        gate = sigmoid(matmul(x, gate_w))
        s = scale_rows(s, gate)
    return s, {"h_pre": h_pre, "h_act": h_act, "gate": gate}


# --------------------------------------------------------------------------- weights in a format

def to_device(qw):
    """QuantizedWeights with host blocks -> the same weights with their blocks copied to the
    device once (one array of the blocks' bytes: a q4_0 weight stays 4.5 bits a value), for
    layers on device arrays. The formats the CUDA kernels read: WEIGHT_FORMATS."""
    if not isinstance(qw, QuantizedWeights):
        raise TypeError(f"qw: expected QuantizedWeights (fastmoe_nb.formats.quantize), got "
                        f"{type(qw).__name__}")
    return on_device(cuda.to_device(np.ascontiguousarray(qw.blocks)), qw.format, qw.shape)


def on_device(blocks, format, shape):
    """blocks already on the device (a Numba device array, or any __cuda_array_interface__
    array: a torch CUDA bf16 tensor viewed as int16 / uint16, the uint8 blocks of a GGUF
    tensor) -> QuantizedWeights(format, shape, blocks) with those blocks, not copied.

    shape: the logical float shape (E, R, C), blocks along C, as in fastmoe_nb.formats;
    blocks: (E, R, C) uint16 (int16 is taken as the same bits) for bf16, (E, R, C/32 *
    block_bytes) uint8 for q8_0 / q4_0, (E, R, C) float for f32 / f64 — or a C-contiguous
    array of that many elements."""
    spec = check_format(format)
    if spec.name not in WEIGHT_FORMATS:
        raise ValueError(f"format: the CUDA kernels read {', '.join(WEIGHT_FORMATS)} weights, "
                         f"got {spec.name} (it runs on the CPU: pass host arrays)")
    if not is_device_array(blocks):
        raise TypeError(f"blocks: expected a device array (__cuda_array_interface__), got "
                        f"{type(blocks).__name__}; to_device(qw) copies host blocks over")
    # QuantizedWeights validates host blocks only: it checks the format and shape here on a
    # read-only stand-in of the blocks' layout (one row of zeros, repeated by zero strides),
    # and the device blocks are checked against the same layout below, then put in its place
    st = spec.storage
    qw = QuantizedWeights(spec.name, shape, _layout_stand_in(spec, shape))
    want = tuple(qw.blocks.shape)
    b = dev(blocks)
    if spec.name == "bf16" and b.dtype == np.int16:
        b = b.view(np.uint16)
    if b.dtype != st:
        raise TypeError(f"blocks: expected {st} blocks for a {spec.name} weight, got {b.dtype}")
    if tuple(b.shape) != want:
        if b.size != int(np.prod(want)) or not b.is_c_contiguous():
            raise ValueError(f"blocks: expected shape {want} (or a C-contiguous array of "
                             f"{int(np.prod(want))} elements) for a {spec.name} weight of "
                             f"shape {qw.shape}, got shape {tuple(b.shape)}")
        b = b.reshape(want)
    object.__setattr__(qw, "blocks", b)
    return qw


def _layout_stand_in(spec, shape):
    """A read-only host array of the (E, R, row) blocks shape and storage dtype of a weight
    of that shape, one row of zeros in memory, which formats.py accepts."""
    it = spec.storage.itemsize
    try:
        E, R, C = (operator.index(s) for s in shape)
        n = spec.row_bytes(C) // it
        return np.lib.stride_tricks.as_strided(np.zeros(max(n, 1), spec.storage), (E, R, n),
                                               (0, 0, it), writeable=False)
    except (TypeError, ValueError):
        return np.zeros(0, spec.storage)   # shape is wrong: QuantizedWeights says how
