"""What fastmoe_nb is measured against, in the same process and on the same data.

Used by `fastmoe-nb bench --compare` and by bench/compare.py:

- inputs:     `layer_inputs(preset, ...)` random weights and tokens for a Preset, routing
              optionally Zipf-skewed (`zipf_probs`, `zipf_experts`);
- NumPy:      `numpy_grouped_gemm` and `numpy_moe_forward`, the per-expert loop one writes today;
              `dense_operands`, a single dense matmul of the same FLOPs;
- machine:    `matmul_rate` (dense fp32 GEMM GFLOP/s) and `read_bandwidth` (GB/s), the ceilings
              a kernel's figure is divided by;
- HF:         `hf_mixtral_block`, transformers' Mixtral sparse-MoE block with the 'eager' or
              'grouped_mm' experts implementation, on the same weights and tokens (optional:
              torch and transformers);
- timing:     `thread_limits` (numba, BLAS and torch threads) and `time_calls`.
"""
from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
from numba import njit, prange

from . import reference as ref
from .presets import Preset

HF_IMPLEMENTATIONS = ("eager", "grouped_mm")
MATMUL_SHAPE = (2048, 1024, 2048)   # (m, K, n) of the machine-rate GEMM: 8.6 GFLOP


# --------------------------------------------------------------------------- timing

@contextlib.contextmanager
def thread_limits(threads=None):
    """Run numba kernels, BLAS and torch with `threads` threads (None: leave as they are).
    A torch imported later (hf_mixtral_block) takes numba's thread count."""
    if threads is None:
        yield
        return
    import numba  # noqa: PLC0415

    prev = numba.get_num_threads()
    numba.set_num_threads(int(threads))
    torch_prev = None
    torch = sys.modules.get("torch")   # never imported here just to set its threads
    if torch is not None:
        torch_prev = torch.get_num_threads()
        torch.set_num_threads(int(threads))
    try:
        tpc = _optional("threadpoolctl")
        with (tpc.threadpool_limits(int(threads)) if tpc else contextlib.nullcontext()):
            yield
    finally:
        numba.set_num_threads(prev)
        if torch_prev is not None:
            torch.set_num_threads(torch_prev)


# OpenBLAS's worker threads keep spinning for a while (2^28 cycles by default, OPENBLAS_THREAD_
# TIMEOUT) after each multi-threaded BLAS call, and a parallel kernel started meanwhile shares
# its cores with them and runs markedly slower (docs/performance.md, "Benchmark harness").
# Timings start after this pause, so that one measurement does not pay for the BLAS baseline
# timed before it.
SETTLE_S = 0.3


def settle():
    """Wait until BLAS worker threads woken by an earlier call have gone back to sleep."""
    time.sleep(SETTLE_S)


def time_calls(fn, repeat=5, warmup=1):
    """Seconds of `repeat` calls of fn() after `warmup` untimed ones (and settle()) ->
    (repeat,) float64."""
    settle()
    for _ in range(warmup):
        fn()
    out = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


def time_interleaved(fns, repeat=5, warmup=1, after=None):
    """Seconds of `repeat` rounds of calls, each round every fn in turn: settle(), `warmup`
    untimed calls, one timed call -> (len(fns), repeat) float64. after(j), if given, runs
    after fns[j]'s timed call, outside the timing (a progress bar).
    A shared machine's speed drifts by 20-30% within minutes here; interleaved, the drift
    hits every fn alike, so the ratios of their medians are steadier than from runs one
    after the other. The untimed calls wake the threads (and caches) that the pause put
    to sleep, so each timed call runs as it would among back-to-back calls."""
    out = np.empty((len(fns), repeat))
    for i in range(repeat):
        for j, fn in enumerate(fns):
            settle()
            for _ in range(warmup):
                fn()
            t0 = time.perf_counter()
            fn()
            out[j, i] = time.perf_counter() - t0
            if after is not None:
                after(j)
    return out


def _optional(module):
    """The module, or None when it is not installed."""
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# --------------------------------------------------------------------------- inputs

def zipf_probs(num_experts, a):
    """(E,) float64 expert popularity p_e proportional to 1 / (e+1)^a (a = 0: uniform)."""
    p = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** float(a)
    return p / p.sum()


def zipf_experts(tokens, num_experts, k, a, seed=0):
    """(T, k) int32 expert ids, k distinct per token, drawn without replacement from
    zipf_probs(E, a) (the Gumbel top-k trick: the k largest of log p + Gumbel noise)."""
    rng = np.random.default_rng(seed)
    g = np.log(zipf_probs(num_experts, a))[None, :] + rng.gumbel(size=(tokens, num_experts))
    return np.argsort(-g, axis=1, kind="stable")[:, :k].astype(np.int32)


def layer_inputs(preset: Preset, dtype=np.float32, seed=0, zipf=None):
    """Random inputs of one MoE layer -> dict x (T, d), router_w (d, E), w1 (E, d, h|2h),
    w2 (E, h, d), and for presets with a shared expert shared_w1 (d, hs|2hs), shared_w2 (hs, d),
    plus bias (E,) zeros for the sigmoid router.

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1). With zipf=a the routing is
    skewed: the router sees a constant feature (x[:, 0] = 1) whose weights are log p_e of
    zipf_probs(E, a), and the random part of the logits has the spread of Gumbel noise, so
    expert e receives roughly a share p_e of the tokens (Zipf-like; the exact counts are
    whatever the router then chooses).
    """
    rng = np.random.default_rng(seed)
    T, d, h, E, _ = preset.shape
    dt = np.dtype(dtype)

    def rand(*shape, fan_in):
        return (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(dt)

    x = rng.standard_normal((T, d), dtype=np.float32).astype(dt)
    router_w = rand(d, E, fan_in=d)
    if zipf is not None and d > 1:
        x[:, 0] = 1
        router_w *= np.sqrt(d / (d - 1)) * (np.pi / np.sqrt(6.0))   # Gumbel's std
        router_w[0] = np.log(zipf_probs(E, zipf))
    inputs = {"x": x, "router_w": router_w, "w1": rand(E, d, preset.h1, fan_in=d),
              "w2": rand(E, h, d, fan_in=h)}
    if preset.shared_h:
        hs1 = 2 * preset.shared_h if preset.activation == "swiglu" else preset.shared_h
        inputs["shared_w1"] = rand(d, hs1, fan_in=d)
        inputs["shared_w2"] = rand(preset.shared_h, d, fan_in=preset.shared_h)
    if preset.router == "sigmoid_topk":
        inputs["bias"] = np.zeros(E, dt)
    return inputs


def layer_kwargs(preset: Preset, inputs):
    """moe_forward keyword arguments (beside x, router_w, w1, w2) for a preset and its
    layer_inputs."""
    kw = dict(k=preset.k, activation=preset.activation, capacity=preset.capacity(),
              **preset.router_kwargs())
    for name in ("bias", "shared_w1", "shared_w2"):
        if name in inputs:
            kw[name] = inputs[name]
    return kw


# --------------------------------------------------------------------------- NumPy

def numpy_grouped_gemm(a, w, offsets, trans_w=False):
    """a: (N, K), w: (E, K, M) [trans_w: (E, M, K)], offsets (E+1,) -> (N, M): one np.matmul
    per expert in the working dtype (multithreaded BLAS)."""
    M = w.shape[1] if trans_w else w.shape[2]
    out = np.empty((a.shape[0], M), a.dtype)
    for e in range(w.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if hi > lo:
            np.matmul(a[lo:hi], w[e].T if trans_w else w[e], out=out[lo:hi])
    return out


def numpy_moe_forward(x, router_w, w1, w2, k, activation="swiglu", router="softmax_topk",
                      renormalize=True, bias=None, n_group=1, topk_group=1, scale=1.0,
                      capacity=None, shared_w1=None, shared_w2=None):
    """The MoE layer as a plain NumPy per-expert loop (the code one writes without a kernel
    library): route with reference.py, gather each expert's tokens, two matmuls in the working
    dtype, scatter-add back. x: (T, d), router_w: (d, E), w1: (E, d, h|2h), w2: (E, h, d)
    -> y: (T, d)."""
    logits = x @ router_w
    if router == "softmax_topk":
        r = ref.softmax_topk(logits, k, renormalize)
    else:
        r = ref.sigmoid_topk(logits, k, bias, n_group, topk_group, renormalize, scale)
    plan = ref.make_plan(r.experts, router_w.shape[1], capacity)
    y = np.zeros_like(x)
    wflat = r.weights.reshape(-1)
    for e in range(w1.shape[0]):
        rows = plan.rows[plan.offsets[e]:plan.offsets[e + 1]]
        if rows.size == 0:
            continue
        t = rows // k   # distinct within one expert: fancy-index += is exact
        he = ref.activate(x[t] @ w1[e], activation)
        y[t] += wflat[rows, None] * (he @ w2[e])
    if shared_w1 is not None:
        y += ref.activate(x @ shared_w1, activation) @ shared_w2
    return y


def dense_operands(rows, K, M, dtype=np.float32, seed=0):
    """(rows, K) and (K, M) random operands: one dense matmul of 2*rows*K*M FLOPs, the
    equal-FLOPs yardstick of a grouped GEMM (rows = N) or a layer (M = h1 + h)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, K), dtype=np.float32).astype(dtype),
            rng.standard_normal((K, M), dtype=np.float32).astype(dtype))


# --------------------------------------------------------------------------- the machine

def matmul_rate(dtype=np.float32, shape=MATMUL_SHAPE, repeat=5):
    """The machine's dense GEMM rate in GFLOP/s: median of np.matmul (m, K) @ (K, n) with
    the current BLAS thread count (use thread_limits)."""
    m, K, n = shape
    a, b = dense_operands(m, K, n, dtype)
    out = np.empty((m, n), dtype)
    t = np.median(time_calls(lambda: np.matmul(a, b, out=out), repeat))
    return 2.0 * m * K * n / t / 1e9


@njit(parallel=True, cache=True)
def _read_kernel(words, chunks):
    # words: (n,) uint64 -> (chunks,) uint64 sums of equal slices (integer adds over unsigned
    # indices: the loop vectorizes — signed ones kept it scalar, 30% under the bandwidth the
    # decoding kernel reaches — and each slice's sum is the same whatever the thread count)
    n = words.shape[0]
    out = np.zeros(chunks, np.uint64)
    for c in prange(chunks):
        s = np.uint64(0)
        for i in range(np.uint64(c * n // chunks), np.uint64((c + 1) * n // chunks)):
            s += words[i]
        out[c] = s
    return out


def read_probe(nbytes=256 << 20):
    """(fn, nbytes): each call of fn makes numba's threads (see thread_limits) stream an
    nbytes array much larger than the caches; nbytes / its time is the read bandwidth."""
    words = np.ones(nbytes // 8, np.uint64)
    return (lambda: _read_kernel(words, 256)), words.nbytes


def read_bandwidth(nbytes=256 << 20, repeat=5):
    """The machine's read bandwidth in GB/s: median time of read_probe's call."""
    fn, n = read_probe(nbytes)
    return n / np.median(time_calls(fn, repeat)) / 1e9


# --------------------------------------------------------------------------- HF transformers

def hf_status():
    """(True, versions) when torch and transformers' Mixtral block can be built, else
    (False, what is missing)."""
    torch = _optional("torch")
    if torch is None:
        return False, "torch is not installed (pip install 'fastmoe-nb[bench]')"
    try:
        import transformers  # noqa: PLC0415
        from transformers.models.mixtral import modeling_mixtral  # noqa: F401, PLC0415
    except ImportError as e:
        return False, f"transformers' Mixtral model cannot be imported ({e})"
    return True, f"torch {torch.__version__}, transformers {transformers.__version__}"


def hf_supports(preset: Preset):
    """None when HF's Mixtral block computes this preset's layer, else the reason it cannot."""
    if preset.activation != "swiglu":
        return "HF's Mixtral experts are SwiGLU only"
    if preset.router != "softmax_topk" or not preset.renormalize:
        return "HF's Mixtral router is softmax top-k, renormalized"
    if preset.capacity_factor is not None or preset.shared_h:
        return "HF's Mixtral block has no capacity and no shared expert"
    return None


def hf_mixtral_module(inputs, k, implementation="eager"):
    """transformers' MixtralSparseMoeBlock (on the CPU, in the inputs' dtype) holding the
    weights of layer_inputs(...), copied once into PyTorch's Linear layout; experts
    implementation 'eager' or 'grouped_mm'. Callers move it where they run it."""
    import torch  # noqa: PLC0415
    from transformers import MixtralConfig  # noqa: PLC0415
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa

    if implementation not in HF_IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {HF_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    x, router_w, w1, w2 = (inputs[n] for n in ("x", "router_w", "w1", "w2"))
    d, E, h = x.shape[1], router_w.shape[1], w2.shape[1]
    cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E,
                        num_experts_per_tok=k, hidden_act="silu", router_jitter_noise=0.0)
    cfg._experts_implementation = implementation
    block = MixtralSparseMoeBlock(cfg).to(torch.from_numpy(x).dtype)
    with torch.no_grad():
        block.gate.weight.copy_(torch.from_numpy(np.ascontiguousarray(router_w.T)))
        block.experts.gate_up_proj.copy_(torch.from_numpy(np.ascontiguousarray(
            w1.transpose(0, 2, 1))))
        block.experts.down_proj.copy_(torch.from_numpy(np.ascontiguousarray(
            w2.transpose(0, 2, 1))))
    return block


def hf_mixtral_block(inputs, k, implementation="eager"):
    """hf_mixtral_module(...) on the CPU with PyTorch using Numba's thread count.

    Returns (forward, train_step): forward() -> y (T, d) as NumPy; train_step() runs
    forward and backward with dy = ones (the weights' and x's gradients)."""
    import numba  # noqa: PLC0415
    import torch  # noqa: PLC0415

    block = hf_mixtral_module(inputs, k, implementation)
    torch.set_num_threads(numba.get_num_threads())
    x = inputs["x"]
    T, d = x.shape
    block.eval()
    xt = torch.from_numpy(x).reshape(1, T, d)

    def forward():
        with torch.no_grad():
            return block(xt).reshape(T, d).numpy()

    xg = xt.clone().requires_grad_(True)

    def train_step():
        block.zero_grad(set_to_none=True)
        xg.grad = None
        block(xg).sum().backward()
        return xg.grad

    return forward, train_step


__all__ = ["HF_IMPLEMENTATIONS", "MATMUL_SHAPE", "SETTLE_S", "dense_operands",
           "hf_mixtral_block", "hf_mixtral_module", "hf_status", "hf_supports", "layer_inputs",
           "layer_kwargs", "matmul_rate", "numpy_grouped_gemm", "numpy_moe_forward",
           "read_bandwidth", "settle", "thread_limits", "time_calls", "zipf_experts",
           "zipf_probs"]
