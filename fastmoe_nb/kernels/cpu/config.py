"""Every CPU tuning constant, in one place, chosen from what this CPU has.

The kernels (kernels/cpu/*.py) and the CPU backend (backends/cpu.py, backends/pool.py) read
their block sizes and route thresholds from here, never from literals of their own. The host's
class (ISA: "avx512", "avx2" or "portable") is LLVM's view of the CPU, the one Numba compiles
for; each class has a row of SETTINGS. Numba's cache is keyed by the host CPU as well, so a
kernel compiled on one class never runs with another class's constants.

A row repeats another where no measurement has shown a better value for that class
(docs/performance.md records what was measured on which host, and the command that re-derives
each value). Constants marked "shape-fixed" decide how sums are cut, and so the rounding of
results: they depend on the shapes alone, never on the thread count, so outputs stay bitwise
the same for any number of threads.
"""
from __future__ import annotations


def host_features():
    """The CPU features LLVM sees on this host ({name: bool}); empty if LLVM cannot tell."""
    try:
        from llvmlite import binding as llvm  # noqa: PLC0415  (numba's own LLVM binding)
        return dict(llvm.get_host_cpu_features())
    except Exception:  # noqa: BLE001 (unknown host: the portable row)
        return {}


def host_isa(features=None):
    """'avx512' (AVX-512 F/VL with FMA), 'avx2' (AVX2 with FMA) or 'portable' (anything else,
    ARM included): the class of the widest vector unit the kernels can use here."""
    f = host_features() if features is None else features
    if f.get("avx512f") and f.get("avx512vl") and f.get("fma"):
        return "avx512"
    if f.get("avx2") and f.get("fma"):
        return "avx2"
    return "portable"


_AVX2 = dict(
    # kernels/cpu/gemm.py: the register-blocked micro-kernel. A micro-tile MR x NR of C stays
    # in registers (6 x 16 fp32: 12 of AVX2's 16 vector registers, the rest for A and B); a
    # KC x NR panel of B stays in L1, an MC x KC block of A in L2; a tile is at most
    # TILE_ROWS rows (B's panels packed once per tile) and NC columns.
    MR=6,            # pack_rows spells its six rows out: changing MR means editing it
    NR=16,
    KC=256,
    MC=96,
    NC=256,
    TILE_ROWS=4 * 96,
    # kernels/cpu/gemm.py: streaming a few rows an expert. A task takes STREAM_KC depth rows of
    # an expert's weights (shape-fixed: the partial sums are added in a fixed order), its
    # products in an accumulator of at most STREAM_ACC elements (in L2); transposed weights are
    # read in blocks of STREAM_CT columns; STREAM_SUB columns of four depth rows stay in L1.
    STREAM_KC=256,
    STREAM_ACC=65536,
    STREAM_CT=256,
    STREAM_SUB=512,
    # backends/cpu.py: the route policy (route()). An expert with at most STREAM_ROWS rows has
    # its weights streamed once; from BLAS_MIN_ROWS rows an expert on average, every expert
    # goes to single-threaded BLAS per block of its rows; re-derive both with
    # `python bench/compare.py` at 8-512 tokens.
    STREAM_ROWS=12,
    BLAS_MIN_ROWS=16,
    # backends/cpu.py, weights in a format: an expert with at most QSTREAM_ROWS rows is decoded
    # in registers by the decoding GEMM, a larger one decodes panels for BLAS. Decoding a
    # panel to float32 costs far more than in-register decoding, so the break-even lies well
    # past STREAM_ROWS; re-derive with `python bench/bench_quant_route.py`.
    QSTREAM_ROWS=32,
    # backends/cpu.py: an expert with at most FUSED_MAX_ROWS rows is one backward task (all
    # its products while its rows are in cache); a larger one is cut so it alone keeps every
    # thread busy (shape-fixed).
    FUSED_MAX_ROWS=512,
    # backends/pool.py: rows of a BLAS task, and columns of a weight-gradient task
    # (shape-fixed).
    TASK_ROWS=256,
    TASK_COLS=512,
    # backends/cpu.py: columns of a weight in a format decoded per task (a multiple of every
    # format's block; the panel, K x QUANT_COLS floats, stays in L2 for BLAS) (shape-fixed).
    QUANT_COLS=256,
    # backends/cpu.py: up to this many tokens the router's logits run on a plain loop (the
    # GEMM kernel's setup outweighs a few rows; `fastmoe-nb bench layer --preset decode-8`).
    LOGITS_LOOP_ROWS=64,
)

_AVX2.update(
    # kernels/cpu/quant.py, (M, K) layout of the decoding GEMM: output columns a task takes,
    # and the row groups (rows sharing one decoded block) with their lane sets, largest first:
    # rows * sets * 32 lanes fill 16 AVX2 registers (shape-fixed: the sets cut the sums, so
    # this layout's float32 bits differ between ISA classes, not between runs).
    QSTREAM_CT=64,
    COL_GROUPS=((2, 1), (1, 2)),
    # kernels/cpu/quant.py, (K, M) layout: a task's partial products (rows x columns, float32)
    # at most this many, so that they stay in L1 while four depth rows at a time are added in
    # (bench/bench_quant.py re-derives it) (shape-fixed).
    QSTREAM_ACC=8192,
    # kernels/cpu/quant.py, (M, K) layout: how far ahead of its reads a task asks for lines
    # (the hardware prefetcher alone is slower on q8_0; bench/bench_quant.py re-derives it).
    PREFETCH_BYTES=2048,
)

SETTINGS = {
    "avx2": _AVX2,
    # 16 fp32 columns are one AVX-512 vector; Zen 4 runs 512-bit FMAs as two 256-bit halves,
    # so its fp32 peak per cycle is Zen 3's and the AVX2 blocking fits it (32 registers leave
    # room, a wider MR is not measured yet).
    "avx512": dict(_AVX2, COL_GROUPS=((4, 1), (2, 2), (1, 4))),   # 8 of 32 zmm registers
    # no wide vectors known: the same blocking is correct everywhere, merely slower.
    "portable": dict(_AVX2),
}

ISA = host_isa()
_S = SETTINGS[ISA]

MR, NR, KC, MC, NC, TILE_ROWS = (_S[n] for n in ("MR", "NR", "KC", "MC", "NC", "TILE_ROWS"))
HN = NR // 2       # swiglu-interleaved panels: HN gate columns, then HN up columns
MR_NR = MR * NR    # the micro-tile's size, a literal for the stack buffer
STREAM_KC, STREAM_ACC, STREAM_CT, STREAM_SUB = (_S[n] for n in ("STREAM_KC", "STREAM_ACC",
                                                                "STREAM_CT", "STREAM_SUB"))
STREAM_ROWS, QSTREAM_ROWS, BLAS_MIN_ROWS, FUSED_MAX_ROWS = (
    _S[n] for n in ("STREAM_ROWS", "QSTREAM_ROWS", "BLAS_MIN_ROWS", "FUSED_MAX_ROWS"))
QSTREAM_CT, COL_GROUPS, QSTREAM_ACC, PREFETCH_BYTES = (
    _S[n] for n in ("QSTREAM_CT", "COL_GROUPS", "QSTREAM_ACC", "PREFETCH_BYTES"))
TASK_ROWS, TASK_COLS, LOGITS_LOOP_ROWS, QUANT_COLS = (
    _S[n] for n in ("TASK_ROWS", "TASK_COLS", "LOGITS_LOOP_ROWS", "QUANT_COLS"))

# Row-parallel elementwise and routing kernels: rows a prange task takes (its scratch is
# allocated once per task; no effect on results).
ROW_BLOCK = 64
PERMUTE_ROWS = 64
# kernels/cpu/routing.py: sum_lanes' accumulators (shape-fixed, the same on every host so
# that float64 sums are bit-identical across hosts: one 512-bit or two 256-bit vectors).
LANES = 8
# kernels/cpu/routers.py: tokens per partial sum of the balancing statistics (shape-fixed).
TOKEN_BLOCK = 256
