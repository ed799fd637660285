"""ggml's MoE experts as a baseline: llama.cpp's kernels on the same weights, quantized by ggml.

GgmlExperts runs the graph llama.cpp's build_moe_ffn builds for SwiGLU experts: gate and up
`ggml_mul_mat_id` on the token rows, silu(gate) * up, the down `ggml_mul_mat_id`, each of
the k outputs scaled by its routing weight and the k summed. The weights are handed to ggml
in float32 and quantized by ggml itself (`ggml_quantize_chunk`), so what is timed is ggml's
own format and its own kernels; the activations are rounded as ggml's kernels round them
(to 8 bits for q8_0 / q4_0 / q4_k / q6_k, to bf16 for bf16), which fastmoe_nb does not do.

Where the library comes from (no Python package of ggml is required by fastmoe_nb):
- ggml-python (`pip install fastmoe-nb[ggml]`): its bundled libggml, the ggml of mid-2024.
  It has mul_mat_id with per-token expert ids and the bf16 type, but its CPU backend has
  no repacked ("CPU_REPACK") buffer type yet: Q4_0 runs on its plain rows.
  Its build compiles for AVX2 unless asked for more, e.g. CMAKE_ARGS="-DCMAKE_C_FLAGS=
  -march=native" (the AVX-512 options of that ggml only reach MSVC). Its silu is a table
  of float16 inputs and outputs, and its q4_k / q6_k quantizer chooses other scales than today's
  llama.cpp (and formats.quantize) on some blocks; f32 / bf16 / q8_0 / q4_0 bytes are equal.
- FASTMOE_NB_LIBGGML_DIR=<dir>, a directory holding a recent ggml's libggml-base.so,
  libggml-cpu.so and libggml.so (cmake -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON of llama.cpp's
  ggml/): taken before ggml-python when set. There the weights go where llama.cpp places them
  by default: Q4_0 and Q4_K in the CPU backend's repack buffer (rows interleaved 8 by 8 for
  the AVX2 / AVX-512 kernels) when their row count allows it, every other format in the
  plain CPU buffer; the graph runs on a persistent threadpool (llama.cpp without OpenMP)
  whose threads poll for the next graph for a while after each call, as llama.cpp's do
  between tokens (poll=False pauses them after each call instead).

The first call with a new token count T builds its graph (a benchmark calls once before
timing); later calls copy x, the expert ids and the routing weights in, compute, and copy y out.

Only ggml's C functions are called, through ctypes with prototypes of our own, so one code
path serves both libraries; no field of ggml's structs is read.

    from fastmoe_nb.benchmark import ggml
    if ggml.available():
        layer = ggml.GgmlExperts(w1, w2, "q4_0", threads=2)   # w1 (E, 2h, d), w2 (E, d, h)
        y = layer(x, experts, weights)                         # (T, d) float32
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections import OrderedDict

import numpy as np

from .. import errors as chk
from .. import formats as fmts

ENV_DIR = "FASTMOE_NB_LIBGGML_DIR"
FORMATS = ("f32", "bf16", "q8_0", "q4_0", "q4_k", "q6_k")
_REPACKED = ("q4_0", "q4_k")      # the formats ggml's x86 CPU backend repacks (8 x 8 rows)
_GRAPHS_KEPT = 4                  # graphs (one per token count T) kept for repeated calls
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class _InitParams(ctypes.Structure):
    """struct ggml_init_params, the same in every ggml version."""
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _P), ("no_alloc", ctypes.c_bool)]


# name: (result type, argument types); those marked optional exist only in some versions
_PROTOTYPES = {
    "ggml_init": (_P, [_InitParams]),
    "ggml_free": (None, [_P]),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_graph_overhead": (ctypes.c_size_t, []),
    "ggml_new_tensor_2d": (_P, [_P, ctypes.c_int, _I64, _I64]),
    "ggml_new_tensor_3d": (_P, [_P, ctypes.c_int, _I64, _I64, _I64]),
    "ggml_get_data": (_P, [_P]),
    "ggml_nbytes": (ctypes.c_size_t, [_P]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, _I64]),
    "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, _P, _P, _I64, _I64, _I64, _P]),
    "ggml_mul_mat_id": (_P, [_P, _P, _P, _P]),
    "ggml_silu": (_P, [_P, _P]),
    "ggml_mul": (_P, [_P, _P, _P]),
    "ggml_add": (_P, [_P, _P, _P]),
    "ggml_cont": (_P, [_P, _P]),
    "ggml_view_2d": (_P, [_P, _P, _I64, _I64, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_new_graph": (_P, [_P]),
    "ggml_build_forward_expand": (None, [_P, _P]),
    "ggml_backend_cpu_init": (_P, []),
    "ggml_backend_cpu_set_n_threads": (None, [_P, ctypes.c_int]),
    "ggml_backend_graph_compute": (ctypes.c_int, [_P, _P]),
    "ggml_backend_free": (None, [_P]),
    "ggml_backend_cpu_buffer_type": (_P, []),
    "ggml_backend_alloc_ctx_tensors_from_buft": (_P, [_P, _P]),
    "ggml_backend_tensor_set": (None, [_P, _P, ctypes.c_size_t, ctypes.c_size_t]),
    "ggml_backend_buffer_free": (None, [_P]),
}
_OPTIONAL = {
    "ggml_swiglu_split": (_P, [_P, _P, _P]),
    "ggml_log_set": (None, [_P, _P]),
    "ggml_backend_cpu_reg": (_P, []),
    "ggml_backend_reg_dev_get": (_P, [_P, ctypes.c_size_t]),
    "ggml_backend_reg_get_proc_address": (_P, [_P, ctypes.c_char_p]),
    "ggml_backend_buft_name": (ctypes.c_char_p, [_P]),
    "ggml_backend_dev_supports_op": (ctypes.c_bool, [_P, _P]),
    "ggml_threadpool_params_init": (None, [_P, ctypes.c_int]),
    "ggml_threadpool_new": (_P, [_P]),
    "ggml_threadpool_free": (None, [_P]),
    "ggml_threadpool_pause": (None, [_P]),
    "ggml_backend_cpu_set_threadpool": (None, [_P, _P]),
}
_THREADPOOL_PARAMS_BYTES = 4096   # > sizeof(struct ggml_threadpool_params) (512 + 20 bytes)


class _Api:
    """ggml's C functions with our prototypes (fresh function objects: the prototypes that
    ggml-python sets on its own CDLL are left as they are)."""

    def __init__(self, libs, source):
        self.source = source
        for name, proto in list(_PROTOTYPES.items()) + list(_OPTIONAL.items()):
            fn = None
            for lib in libs:
                try:
                    fn = ctypes.CFUNCTYPE(proto[0], *proto[1])((name, lib))
                    break
                except AttributeError:
                    continue
            if fn is None and name in _PROTOTYPES:
                raise AttributeError(f"{source} has no {name}")
            setattr(self, name[5:], fn)    # ggml_mul_mat_id -> api.mul_mat_id

    def has(self, name):
        return getattr(self, name) is not None


_API = []   # [the _Api, or None when no library loads], filled once


def _load_dir(path):
    """The libraries of a ggml build directory, dependencies first."""
    libs = []
    for stem in ("libggml-base", "libggml-cpu", "libggml"):
        f = os.path.join(path, stem + ".so")
        if os.path.exists(f):
            libs.append(ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL))
    if not libs:
        raise OSError(f"{ENV_DIR}={path}: no libggml*.so there")
    return _Api(libs, f"libggml in {path}")


def _load_ggml_python():
    """ggml-python's bundled libggml (importing ggml.ggml loads it)."""
    import ggml
    import ggml.ggml as gp

    version = getattr(ggml, "__version__", "?")
    return _Api([gp.lib], f"ggml-python {version} ({gp.lib._name})")


_LOG_DEBUG, _LOG_INFO, _LOG_CONT = 1, 2, 5     # enum ggml_log_level
_LOG_STATE = {"dropping": False}


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, _P)
def _log(level, text, user_data):
    """ggml's log without its debug and info lines (one per repacked tensor, ...)."""
    if level != _LOG_CONT:
        _LOG_STATE["dropping"] = level in (_LOG_DEBUG, _LOG_INFO)
    if not _LOG_STATE["dropping"] and text:
        sys.stderr.write(text.decode(errors="replace"))


def _api():
    """The loaded library, or None (then available() is False)."""
    if not _API:
        try:
            path = os.environ.get(ENV_DIR)
            _API.append(_load_dir(path) if path else _load_ggml_python())
        except (ImportError, OSError, AttributeError, RuntimeError):
            _API.append(None)
        if _API[0] is not None and _API[0].has("log_set"):
            _API[0].log_set(ctypes.cast(_log, _P), None)
    return _API[0]


def available() -> bool:
    """True when a ggml library loads (FASTMOE_NB_LIBGGML_DIR or ggml-python); never raises."""
    return _api() is not None


def library() -> str | None:
    """Which ggml is used: "ggml-python 0.0.37 (...)", "libggml in <dir>", or None."""
    api = _api()
    return None if api is None else api.source


def _ggml_type(fmt):
    return fmts.FORMAT[fmt].ggml_type   # GGUF's type ids are ggml's enum ggml_type


# --------------------------------------------------------------------------- the layer

class GgmlExperts:
    """SwiGLU experts run by ggml, weights quantized by ggml to fmt.

    w1: (E, 2h, d) float32, [gate | up] rows (trans_w layout: HF Linear / GGUF), w2: (E, d, h)
    float32; fmt: one of FORMATS (d and h multiples of its block); threads: ggml's threads;
    poll: leave ggml's threadpool polling for work after a call (llama.cpp's default; the
    threads spin for a while) or pause it (False: the next call wakes them).
    The inputs are copied (quantized) into ggml's buffers; nothing handed in is modified.
    layer(x (T, d) float32, experts (T, k) int ids, weights (T, k) float32) -> (T, d) float32.
    Graphs are built once per token count T (the last few kept) and only computed on later
    calls. nbytes: the bytes of the three weight tensors in ggml's format, scales included;
    repacked: those ggml holds in its CPU repack buffer ("gate", "up", "down"), or ().
    """

    def __init__(self, w1, w2, fmt, threads=2, poll=True):
        api = _api()
        if api is None:
            raise RuntimeError("ggml is not available: pip install fastmoe-nb[ggml] "
                               f"(ggml-python), or set {ENV_DIR} to a libggml build")
        self._api = api
        self.format = chk.check_choice("fmt", fmt.lower() if isinstance(fmt, str) else fmt,
                                       FORMATS)
        self.threads = chk.check_int("threads", threads, 1, None, "a positive integer")
        if not isinstance(poll, (bool, np.bool_)):
            raise TypeError(f"poll: expected a bool, got {type(poll).__name__}")
        self.poll = bool(poll)
        chk.check_float("w1", w1, ndim=3, dtype=np.float32)
        E, h2, d = (int(s) for s in w1.shape)
        if h2 % 2:
            raise ValueError(f"w1: expected (E, 2h, d) with [gate | up] rows, got {w1.shape}")
        h = h2 // 2
        chk.check_float("w2", w2, shape=(E, d, h), dtype=np.float32)
        block = fmts.BLOCK[self.format]
        for name, n in (("d", d), ("h", h)):
            if n % block or n == 0:
                raise ValueError(f"w1/w2: {name} = {n} must be a positive multiple of "
                                 f"{self.format}'s block of {block}")
        for name, w in (("w1", w1), ("w2", w2)):
            if not np.isfinite(w).all():
                raise ValueError(f"{name}: expected finite values, found NaN or Inf")
        self.E, self.d, self.h = E, d, h
        self._graphs = OrderedDict()
        self._ctx = self._buffers = self._backend = self._pool = None
        try:
            self._setup(w1, w2)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ weights, backend

    def _setup(self, w1, w2):
        # ggml's (ne0, ne1, ne2) = (columns, rows, experts): w[e] row-major, as GGUF stores
        api, E, h = self._api, self.E, self.h
        gtype = _ggml_type(self.format)
        parts = {"gate": w1[:, :h], "up": w1[:, h:], "down": w2}
        self._ctx = api.init(_InitParams(api.tensor_overhead() * 8, None, True))
        tensors = {n: api.new_tensor_3d(self._ctx, gtype, w.shape[2], w.shape[1], E)
                   for n, w in parts.items()}
        self._backend = api.backend_cpu_init()
        if not self._backend:
            raise RuntimeError("ggml_backend_cpu_init failed")
        api.backend_cpu_set_n_threads(self._backend, self.threads)
        self._start_threadpool()
        self.repacked = self._allocate(tensors)
        self.nbytes = 0
        for n, w in parts.items():
            q = _quantize(api, w, gtype)
            if q.nbytes != api.nbytes(tensors[n]):
                raise RuntimeError(f"ggml_quantize_chunk wrote {q.nbytes} bytes for {n}, "
                                   f"the tensor holds {api.nbytes(tensors[n])}")
            api.backend_tensor_set(tensors[n], q.ctypes.data, 0, q.nbytes)
            self.nbytes += q.nbytes
        self._w = tensors

    def _repack_buffer_type(self):
        """The CPU backend's "CPU_REPACK" buffer type, or None (old ggml, or not built)."""
        api = self._api
        if not all(api.has(f) for f in ("backend_cpu_reg", "backend_reg_dev_get",
                                         "backend_reg_get_proc_address", "backend_buft_name")):
            return None
        reg = api.backend_cpu_reg()
        fn = api.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not fn:
            return None
        bufts = ctypes.CFUNCTYPE(ctypes.POINTER(_P), _P)(fn)(api.backend_reg_dev_get(reg, 0))
        i = 0
        while bufts[i]:
            if api.backend_buft_name(bufts[i]) == b"CPU_REPACK":
                return bufts[i]
            i += 1
        return None

    def _allocate(self, tensors):
        """Backend buffers for the weight tensors: the repack buffer for the formats ggml
        repacks (all three matrices have rows % 8 == 0 here or none is repacked), the plain
        CPU buffer otherwise -> the names of the repacked tensors."""
        api = self._api
        buft = self._repack_buffer_type() if self.format in _REPACKED else None
        if buft is not None and (self.d % 8 or self.h % 8):
            buft = None
        if buft is None:
            buft = api.backend_cpu_buffer_type()
        buf = api.backend_alloc_ctx_tensors_from_buft(self._ctx, buft)
        if not buf:
            raise MemoryError("ggml could not allocate the expert weights")
        self._buffers = [buf]
        repacked = buft != api.backend_cpu_buffer_type()
        return tuple(tensors) if repacked else ()

    def _start_threadpool(self):
        """A persistent threadpool where ggml has them (as llama.cpp runs without OpenMP)."""
        api = self._api
        if not all(api.has(f) for f in ("threadpool_params_init", "threadpool_new",
                                         "backend_cpu_set_threadpool", "threadpool_pause")):
            return
        params = ctypes.create_string_buffer(_THREADPOOL_PARAMS_BYTES)
        api.threadpool_params_init(params, self.threads)
        self._pool = api.threadpool_new(params)
        if self._pool:
            api.backend_cpu_set_threadpool(self._backend, self._pool)

    # ------------------------------------------------------------------ the graph

    def _graph(self, T, k):
        """The graph of T tokens, k experts each: (ctx, graph, x, ids, w, y views)."""
        key = (T, k)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        api, d, h = self._api, self.d, self.h
        f32, i32 = 0, 26                   # GGML_TYPE_F32, GGML_TYPE_I32
        floats = 4 * (d * T * 3 + 2 * k * T + h * k * T * 4 + d * k * T * 2 + d * T * k)
        n_tensors = 16 + 3 * k
        size = floats + n_tensors * (api.tensor_overhead() + 64) + api.graph_overhead()
        ctx = api.init(_InitParams(size, None, False))
        if not ctx:
            raise MemoryError(f"ggml_init could not allocate {size} bytes for T = {T}")
        try:
            x = api.new_tensor_3d(ctx, f32, d, 1, T)          # x (T, d) as (d, 1, T)
            ids = api.new_tensor_2d(ctx, i32, k, T)           # experts (T, k)
            wt = api.new_tensor_3d(ctx, f32, 1, k, T)         # weights (T, k)
            gate = api.mul_mat_id(ctx, self._w["gate"], x, ids)   # (h, k, T)
            up = api.mul_mat_id(ctx, self._w["up"], x, ids)
            if api.has("swiglu_split"):                       # llama.cpp's fused op
                act = api.swiglu_split(ctx, gate, up)
            else:
                act = api.mul(ctx, api.silu(ctx, gate), up)
            ys = api.mul(ctx, api.mul_mat_id(ctx, self._w["down"], act, ids), wt)  # (d, k, T)
            y = None
            for j in range(k):                                # build_moe_ffn's sum of views
                v = api.view_2d(ctx, ys, d, T, 4 * d * k, 4 * d * j)
                y = v if y is None else api.add(ctx, y, v)
            if k == 1:                                        # a view: give it its own rows
                y = api.cont(ctx, y)
            graph = api.new_graph(ctx)
            api.build_forward_expand(graph, y)
            if self.repacked and api.has("backend_dev_supports_op"):
                dev = api.backend_reg_dev_get(api.backend_cpu_reg(), 0)
                if not api.backend_dev_supports_op(dev, gate):
                    raise RuntimeError("ggml's repack buffer does not take this mul_mat_id")
        except BaseException:
            api.free(ctx)
            raise
        views = (_view(x, np.float32, (T, d), api), _view(ids, np.int32, (T, k), api),
                 _view(wt, np.float32, (T, k), api), _view(y, np.float32, (T, d), api))
        entry = (ctx, graph) + views
        self._graphs[key] = entry
        while len(self._graphs) > _GRAPHS_KEPT:
            api.free(self._graphs.popitem(last=False)[1][0])
        return entry

    def __call__(self, x, experts, weights):
        # x (T, d), experts (T, k), weights (T, k) -> y (T, d) float32
        if self._backend is None:
            raise RuntimeError("this GgmlExperts was closed")
        chk.check_float("x", x, ndim=2, shape=(None, self.d), dtype=np.float32)
        T = int(x.shape[0])
        chk.check_int_array("experts", experts, shape=(T, None))
        k = int(experts.shape[1])
        chk.check_int("k", k, 1, self.E, f"1..E = 1..{self.E}")
        chk.check_float("weights", weights, shape=(T, k), dtype=np.float32)
        if T and (np.min(experts) < 0 or np.max(experts) >= self.E):
            raise ValueError(f"experts: expected ids in 0..E-1 = 0..{self.E - 1}")
        if T == 0:
            return np.zeros((0, self.d), dtype=np.float32)
        _, graph, xv, idv, wv, yv = self._graph(T, k)
        xv[...] = x
        idv[...] = experts
        wv[...] = weights
        status = self._api.backend_graph_compute(self._backend, graph)
        if self._pool and not self.poll:
            self._api.threadpool_pause(self._pool)   # no spinning threads between calls
        if status != 0:
            raise RuntimeError(f"ggml_backend_graph_compute failed (status {status})")
        return yv.copy()

    # ------------------------------------------------------------------ lifetime

    def close(self):
        """Frees ggml's graphs, weights, backend and threadpool (also done when collected)."""
        api = self._api
        for entry in self._graphs.values():
            api.free(entry[0])
        self._graphs.clear()
        for buf in self._buffers or ():
            api.backend_buffer_free(buf)
        self._buffers = None
        if self._ctx:
            api.free(self._ctx)
        self._ctx = None
        if self._backend:
            api.backend_free(self._backend)
        self._backend = None
        if self._pool:
            api.threadpool_free(self._pool)
        self._pool = None

    def __del__(self):
        if getattr(self, "_api", None) is not None and hasattr(self, "_graphs"):
            self.close()


def _quantize(api, w, gtype):
    """w: (E, R, C) float32 -> ggml's blocks of its rows (E*R*row bytes uint8)."""
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = src.shape[0] * src.shape[1], src.shape[2]
    out = np.empty(rows * api.row_size(gtype, cols), dtype=np.uint8)
    n = api.quantize_chunk(gtype, src.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    if n != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk returned {n} bytes, expected {out.nbytes}")
    return out


def _view(tensor, dtype, shape, api):
    """A NumPy view of a tensor's data (allocated in a ggml context: host memory)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if api.nbytes(tensor) != n:
        raise RuntimeError(f"ggml tensor holds {api.nbytes(tensor)} bytes, expected {n}")
    buf = (ctypes.c_uint8 * n).from_address(api.get_data(tensor))
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def dequantize_like_ggml(w, fmt):
    """w: (E, R, C) float32 -> the float32 values ggml holds for w in fmt (ggml's quantizer,
    then fastmoe_nb's bit-compatible dequantize): the weights GgmlExperts computes with."""
    api = _api()
    if api is None:
        raise RuntimeError("ggml is not available")
    fmt = chk.check_choice("fmt", fmt, FORMATS)
    chk.check_float("w", w, ndim=3, dtype=np.float32)
    raw = _quantize(api, w, _ggml_type(fmt))
    if fmt == "f32":
        return raw.view(np.float32).reshape(w.shape).copy()
    spec = fmts.FORMAT[fmt]
    blocks = raw.view(spec.storage).reshape(w.shape[0], w.shape[1], -1)
    return fmts.dequantize(fmts.from_blocks(blocks, fmt, w.shape))


__all__ = ["ENV_DIR", "FORMATS", "GgmlExperts", "available", "dequantize_like_ggml", "library"]
