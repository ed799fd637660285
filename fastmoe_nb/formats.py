"""Expert weight formats: f32 / f64 (plain arrays), bf16, and llama.cpp's GGUF block formats
q8_0, q4_0, q4_k and q6_k — quantize, dequantize, and the bytes they take (docs/formats.md).

A weight of logical float shape (E, R, C) — w (E, K, M), or trans_w's (E, M, K), the PyTorch and
GGUF layout — is stored row by row along its LAST axis: each of the E*R rows of C values is
C / block blocks of `block_bytes` bytes, so C must be a multiple of the format's block (32, or
256 for the k-formats). GGUF's `ffn_*_exps` tensors are (E, M, K) with blocks along K.

    QuantizedWeights(format, shape=(E, R, C), blocks)
        blocks: (E, R, C // block * block_bytes) uint8   q8_0, q4_0, q4_k, q6_k
                (E, R, C) uint16 (the bf16 bits)           bf16
                (E, R, C) float32 / float64                f32 / f64
                or a tuple of such (E, R_i, ...) parts     stacked along axis 1 (stack())

A stacked weight is its parts one after another along axis 1, each the caller's own array:
GGUF stores a SwiGLU expert's gate and up as two tensors, and stack(gate, up) is the (E, 2h, d)
w1 = [gate | up] the layer takes, with neither copied.

The GGUF formats are bit-compatible with llama.cpp: `quantize` writes the bytes of ggml's
reference quantizers (quantize_row_*_ref, what llama-quantize writes without an importance
matrix; gguf.quants.quantize writes the same for q8_0 and bf16, and for q4_0 but for the sign
of an all-zero block's scale), `dequantize` returns the float32 values of gguf.quants.dequantize. Everything is evaluated in float32 in ggml's order of operations —
sums left to right, a*b + c rounded twice (no fused multiply-add) — so the bytes are the same
on every host. Blocks handed in (a GGUF file's memory map) are never copied; the float work is
done a chunk of rows at a time, so no float32 copy of all experts is ever made.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import errors as chk

F32 = np.float32
CHUNK_VALUES = 1 << 18   # float values quantized / dequantized per step (~1 MB of float32)


# --------------------------------------------------------------------------- the formats

@dataclass(frozen=True)
class Format:
    """One weight format.

    block:       values per block along the last axis (1 for f32 / f64 / bf16)
    block_bytes: bytes per block, scales included
    storage:     dtype of the stored blocks (uint8 for the GGUF block formats)
    ggml_type:   GGUF's tensor type id (gguf.GGMLQuantizationType)
    """

    name: str
    block: int
    block_bytes: int
    storage: Any
    ggml_type: int

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.block_bytes / self.block

    @property
    def dtype(self):
        """What the format dequantizes to: float64 for f64, float32 for every other."""
        return np.dtype(np.float64 if self.name == "f64" else np.float32)

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of cols values (cols a multiple of block)."""
        return cols // self.block * self.block_bytes


FORMAT = {f.name: f for f in (
    Format("f32", 1, 4, np.dtype(np.float32), 0),
    Format("f64", 1, 8, np.dtype(np.float64), 28),
    Format("bf16", 1, 2, np.dtype(np.uint16), 30),
    Format("q8_0", 32, 34, np.dtype(np.uint8), 8),     # fp16 d, 32 x int8
    Format("q4_0", 32, 18, np.dtype(np.uint8), 2),     # fp16 d, 16 bytes of nibbles
    Format("q4_k", 256, 144, np.dtype(np.uint8), 12),  # fp16 d, dmin, 12 B scales, 128 B nibbles
    Format("q6_k", 256, 210, np.dtype(np.uint8), 14),  # 128 B low, 64 B high bits, 16 scales, d
)}
FORMATS = tuple(FORMAT)
BLOCK = {n: f.block for n, f in FORMAT.items()}
BLOCK_BYTES = {n: f.block_bytes for n, f in FORMAT.items()}
BLOCK_FORMATS = ("q8_0", "q4_0", "q4_k", "q6_k")   # stored as uint8 blocks with scales


def check_format(format, name="format") -> Format:
    """The Format of a name ("q4_0", or GGUF's "Q4_0"); ValueError naming the argument."""
    if isinstance(format, Format):
        return format
    key = format.lower() if isinstance(format, str) else format
    return FORMAT[chk.check_choice(name, key, FORMATS)]


def format_of_ggml_type(ggml_type) -> str:
    """The format name of a GGUF tensor type (an int or gguf.GGMLQuantizationType)."""
    for f in FORMAT.values():
        if isinstance(ggml_type, numbers.Integral) and f.ggml_type == int(ggml_type):
            return f.name
    raise ValueError(f"ggml_type: expected one of the types of {', '.join(FORMATS)} "
                     f"({', '.join(str(f.ggml_type) for f in FORMAT.values())}), got {ggml_type!r}")


# --------------------------------------------------------------------------- the weight type

@dataclass(frozen=True, eq=False, repr=False)
class QuantizedWeights:
    """E experts' weights in one format, blocks along the last axis of `shape`.

    format: one of FORMATS
    shape:  (E, R, C) the logical float shape (what dequantize returns); C % block == 0
    blocks: (E, R, C // block * block_bytes) uint8 | (E, R, C) uint16 for bf16 | (E, R, C)
            float32 / float64 for f32 / f64 — the caller's array (a memmap stays a memmap);
            or a tuple of such arrays (E, R_i, ...) with sum(R_i) = R: the weight's rows
            R_0 + R_1 + ... stacked along axis 1, each part kept as it is (stack())
    activations: what the activations are multiplied as: "f32" (the default: exactly, in
            float32); for bf16 weights, "bf16" (rounded to bf16 once per product, for the
            CPU's native bf16 dot products where it has them); for the GGUF block formats,
            "q8_0" (rounded to blocks of 32 int8 with a float32 scale, for integer dot products
            in the decoding GEMM's (M, K) layout, as ggml multiplies them). docs/formats.md
    """

    format: str
    shape: tuple
    blocks: Any
    activations: str = "f32"

    def __post_init__(self):
        spec = check_format(self.format)
        shape = _check_shape(self.shape, spec)
        object.__setattr__(self, "format", spec.name)
        object.__setattr__(self, "activations", _check_activations(self.activations, spec))
        object.__setattr__(self, "shape", shape)
        if isinstance(self.blocks, tuple):
            blocks = _check_parts(self.blocks, spec, shape)
        else:
            blocks = _check_blocks(self.blocks, spec, shape)
        object.__setattr__(self, "blocks", blocks)

    @property
    def spec(self) -> Format:
        return FORMAT[self.format]

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def dtype(self):
        """What the weight dequantizes to (float32; float64 for f64)."""
        return self.spec.dtype

    @property
    def stacked(self) -> bool:
        """Whether the blocks are parts stacked along axis 1 (a tuple of arrays)."""
        return isinstance(self.blocks, tuple)

    @property
    def parts(self) -> tuple:
        """((r0, blocks), ...): each part's first row along axis 1 and its (E, R_i, ...)
        blocks; one part, (0, blocks), for a weight that is not stacked."""
        if not self.stacked:
            return ((0, self.blocks),)
        starts = np.cumsum([0] + [b.shape[1] for b in self.blocks[:-1]])
        return tuple((int(r0), b) for r0, b in zip(starts, self.blocks))

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks, scales included."""
        return sum(int(b.size) * b.dtype.itemsize for _, b in self.parts)

    @property
    def block(self) -> int:
        return self.spec.block

    @property
    def block_bytes(self) -> int:
        return self.spec.block_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of C values."""
        return self.spec.row_bytes(self.shape[2])

    def expert(self, e):
        """A view of expert e's blocks: (R, row_bytes) uint8, or (R, C) for f32 / f64 / bf16;
        for a stacked weight, a tuple of its parts' views (R_i, ...)."""
        e = chk.check_int("e", e, 0, self.num_experts - 1,
                          what=f"an expert id in 0..{self.num_experts - 1}")
        if self.stacked:
            return tuple(b[e] for b in self.blocks)
        return self.blocks[e]

    def with_activations(self, activations) -> QuantizedWeights:
        """The same blocks (not copied) with activations "f32", "bf16" (bf16 weights only) or
        "q8_0" (q8_0 / q4_0 / q4_k / q6_k weights only)."""
        return QuantizedWeights(self.format, self.shape, self.blocks, activations)

    def __repr__(self):
        kinds = sorted({type(b).__name__ for _, b in self.parts})
        kind = "/".join(kinds) + (f" x {len(self.blocks)} parts" if self.stacked else "")
        act = "" if self.activations == "f32" else f", activations={self.activations!r}"
        return (f"QuantizedWeights(format={self.format!r}, shape={self.shape}, "
                f"nbytes={self.nbytes}, blocks={kind}{act})")


# activations -> the weight formats they take
ACTIVATIONS = {"f32": FORMATS, "bf16": ("bf16",), "q8_0": ("q8_0", "q4_0", "q4_k", "q6_k")}


def _check_activations(activations, spec):
    """'f32', 'bf16' for a bf16 weight, 'q8_0' for a GGUF block format's; ValueError naming
    `activations` otherwise."""
    a = chk.check_choice("activations", activations, tuple(ACTIVATIONS))
    if spec.name not in ACTIVATIONS[a]:
        raise ValueError(f"activations: {a!r} activations take {', '.join(ACTIVATIONS[a])} "
                         f"weights, got a {spec.name} weight (use activations='f32')")
    return a


def stack(*weights) -> QuantizedWeights:
    """QuantizedWeights (E, R_i, C) of one format and one `activations` -> their (E, sum R_i,
    C) stack along axis 1, keeping that setting, without a copy: the result's blocks are the
    parts' own arrays (a stacked part's parts).

    Stacking runs along the weight's rows, not its blocked last axis: stack(gate, up) of
    GGUF's (E, h, d) ffn_gate_exps / ffn_up_exps is the (E, 2h, d) SwiGLU w1 of trans_w=True.
    """
    if not weights:
        raise ValueError("weights: expected at least one QuantizedWeights to stack")
    for i, w in enumerate(weights):
        if not isinstance(w, QuantizedWeights):
            raise TypeError(f"weights[{i}]: expected a QuantizedWeights (quantize or "
                            f"from_blocks), got {type(w).__name__}")
    first = weights[0]
    for i, w in enumerate(weights[1:], 1):
        if w.format != first.format:
            raise ValueError(f"weights[{i}]: expected the format of weights[0], "
                             f"{first.format!r}, got {w.format!r} (one weight holds one "
                             f"format)")
        if w.activations != first.activations:
            raise ValueError(f"weights[{i}]: expected the activations of weights[0], "
                             f"{first.activations!r}, got {w.activations!r} (one weight "
                             f"computes one way)")
        if (w.shape[0], w.shape[2]) != (first.shape[0], first.shape[2]):
            raise ValueError(f"weights[{i}]: expected shape (E, R, C) = ({first.shape[0]}, *, "
                             f"{first.shape[2]}) as weights[0] {first.shape} (parts stack "
                             f"along axis 1), got {w.shape}")
    if len(weights) == 1:
        return first
    blocks = tuple(b for w in weights for _, b in w.parts)
    shape = (first.shape[0], sum(w.shape[1] for w in weights), first.shape[2])
    return QuantizedWeights(first.format, shape, blocks, first.activations)


def _check_shape(shape, spec):
    """shape: (E, R, C) non-negative ints with C a multiple of the block."""
    if not isinstance(shape, (tuple, list)) or len(shape) != 3:
        raise ValueError(f"shape: expected the logical float shape (E, R, C) of 3 integers, "
                         f"got {shape!r}")
    shape = tuple(chk.check_int("shape", s, 0, None, what="a non-negative integer")
                  for s in shape)
    _check_block_multiple("shape", shape, spec)
    return shape


def _check_block_multiple(name, shape, spec):
    c = shape[-1]
    if c % spec.block:
        raise ValueError(f"{name}: the last axis (axis {len(shape) - 1}, length {c}) must be a "
                         f"multiple of the {spec.name} block size {spec.block}, got shape "
                         f"{shape} (blocks run along the last axis; the transposed weight, "
                         f"trans_w's layout, runs them along the other)")


def _check_blocks(blocks, spec, shape):
    """The caller's blocks as spec.storage of (E, R, row) shape, viewed, never copied."""
    blocks, bf16 = _host_view("blocks", blocks)
    want = (shape[0], shape[1], spec.row_bytes(shape[2]) // spec.storage.itemsize)
    if blocks.dtype == np.uint8 and spec.storage != np.uint8:   # raw bytes (GGUF bf16 / f32)
        blocks = _view_last_axis("blocks", blocks, spec.storage)
    elif blocks.dtype != spec.storage or (bf16 and spec.name != "bf16"):
        got = "bfloat16" if bf16 else blocks.dtype
        raise TypeError(f"blocks: expected {spec.storage} blocks for a {spec.name} weight "
                        f"(or their raw uint8 bytes), got {got}")
    have, need = blocks.size * spec.storage.itemsize, int(np.prod(want)) * spec.storage.itemsize
    if have != need:
        raise ValueError(f"blocks: expected {need} bytes for a {spec.name} weight of shape "
                         f"{shape} ({spec.row_bytes(shape[2])} bytes per row), got {have} "
                         f"bytes (shape {blocks.shape}): truncated, or of another shape")
    if blocks.shape != want:
        if blocks.size and not blocks.flags.c_contiguous:
            raise ValueError(f"blocks: expected shape {want} or a C-contiguous array of that "
                             f"size (blocks are viewed, never copied), got a strided "
                             f"{blocks.shape} array")
        blocks = blocks.reshape(want)
    if blocks.size and want[2] > 1 and blocks.strides[2] != spec.storage.itemsize:
        raise ValueError(f"blocks: expected each row contiguous (last-axis stride "
                         f"{spec.storage.itemsize}), got strides {blocks.strides}")
    return blocks


def _check_parts(parts, spec, shape):
    """A tuple of (E, R_i, row) part blocks, each checked as _check_blocks does (viewed, never
    copied), with sum(R_i) = R; one part is that part's array itself."""
    if not parts:
        raise ValueError("blocks: expected an array or a non-empty tuple of part arrays, got "
                         "an empty tuple")
    E, R, C = shape
    out = []
    for i, b in enumerate(parts):
        name = f"blocks[{i}]"
        b, _ = _host_view(name, b)
        if getattr(b, "ndim", 0) != 3 or b.shape[0] != E:
            raise ValueError(f"{name}: expected a part's blocks of shape (E = {E}, R_i, row) "
                             f"(a stacked weight's parts are 3-D), got shape "
                             f"{getattr(b, 'shape', None)}")
        try:
            out.append(_check_blocks(b, spec, (E, b.shape[1], C)))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {str(err).partition(': ')[2]}") from None
    if sum(b.shape[1] for b in out) != R:
        raise ValueError(f"blocks: the parts hold {sum(b.shape[1] for b in out)} rows along "
                         f"axis 1 ({' + '.join(str(b.shape[1]) for b in out)}), expected "
                         f"R = {R} of shape {shape}")
    return out[0] if len(out) == 1 else tuple(out)


def _view_last_axis(name, a, dtype):
    """Raw uint8 bytes (..., n) viewed as dtype (..., n // itemsize), no copy."""
    if a.ndim == 0 or (a.shape[-1] > 1 and a.strides[-1] != 1) or a.shape[-1] % dtype.itemsize:
        raise ValueError(f"{name}: raw bytes must be contiguous along the last axis and a "
                         f"multiple of {dtype.itemsize} bytes long, got shape {a.shape}")
    return a.view(dtype)


def _host_view(name, a):
    """a -> (NumPy view, bf16): NumPy arrays (memmaps included) as they are; CPU torch tensors
    without a copy; bfloat16 (ml_dtypes or torch) as its uint16 bits with bf16 = True."""
    if type(a).__module__.split(".")[0] == "torch":
        if a.device.type != "cpu":
            raise TypeError(f"{name}: expected a host (CPU) array, got a tensor on {a.device}")
        a = a.detach()
        if str(a.dtype) == "torch.bfloat16":
            import torch
            return a.view(torch.int16).numpy().view(np.uint16), True
        return a.numpy(), False
    if not isinstance(a, np.ndarray):
        chk.check_array(name, a)
        if hasattr(a, "__cuda_array_interface__"):
            raise TypeError(f"{name}: expected a host (CPU) array, got a device array")
        a = np.asarray(a)
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:   # ml_dtypes.bfloat16
        return a.view(np.uint16), True
    return a, False


# --------------------------------------------------------------------------- public API

def quantize(w, format, *, check_finite=True, activations="f32") -> QuantizedWeights:
    """w: (E, R, C) float -> QuantizedWeights in `format`, blocks along the last axis.

    w may be float32, float64, float16 or bfloat16 (ml_dtypes, or a CPU torch tensor). The GGUF
    formats and bf16 round from float32, as gguf.quants does (float64 is rounded to float32
    first). A weight already in the format's type (f32, f64, bf16) is kept, not copied.
    NaN / Inf are refused, and so are values whose scales would overflow float16 (RANGE, and
    docs/formats.md, give each format's range); check_finite=False skips these scans, and
    then such values get what ggml would write. activations: QuantizedWeights.activations.
    """
    spec = check_format(format)
    _check_activations(activations, spec)
    w, bf16 = _check_weights("w", w)
    if w.ndim != 3:
        raise ValueError(f"w: expected a 3-D expert weight (E, R, C) (one matrix is "
                         f"(1, R, C)), got shape {w.shape}")
    qw = _quantize("w", w, bf16, spec, check_finite)
    return qw if activations == "f32" else qw.with_activations(activations)


def _quantize(name, w, bf16, spec, check_finite):
    """w: (E, R, C) checked float (bf16: its uint16 bits) -> QuantizedWeights; errors name
    the caller's argument."""
    _check_block_multiple(name, w.shape, spec)
    kept = _kept_as_is(w, bf16, spec)
    if kept is not None:
        if check_finite:
            _for_chunks(w.shape, lambda e, r0, r1: _check_finite(name, kept[e, r0:r1], bf16))
        return QuantizedWeights(spec.name, w.shape, kept)
    E, R, C = w.shape
    blocks = np.empty((E, R, spec.row_bytes(C) // spec.storage.itemsize), spec.storage)

    def one(e, r0, r1):
        if check_finite:
            _check_finite(name, w[e, r0:r1], bf16)
        x = _as_float(w[e, r0:r1], bf16, spec)
        if check_finite:
            _check_range(name, x, spec)
        blocks[e, r0:r1] = _encode(x, spec)
        if check_finite:
            _check_scales(name, blocks[e, r0:r1], spec)
    _for_chunks(w.shape, one)
    return QuantizedWeights(spec.name, w.shape, blocks)


def from_blocks(blocks, format, shape) -> QuantizedWeights:
    """Raw blocks (a GGUF tensor's data) as a weight of logical float shape (E, R, C), no copy.

    blocks: (E, R, row_bytes) uint8, or any C-contiguous array of those bytes (a flat GGUF
            buffer); bf16 also as uint16 bits, an ml_dtypes.bfloat16 array or a torch bf16
            tensor; f32 / f64 as float32 / float64 (E, R, C); or a tuple of (E, R_i, ...)
            part arrays stacked along axis 1 (as stack() makes).
    """
    return QuantizedWeights(format, shape, blocks)


def dequantize(qw, experts=None, out=None):
    """qw: QuantizedWeights (E, R, C) -> float32 (float64 for f64) values, gguf's bit for bit.

    experts: None (all: (E, R, C)), an expert id (that expert: (R, C)), a slice or a sequence of
             ids ((n, R, C)); decoding one expert at a time never needs all of them in float32.
    out:     optional array of that shape and dtype to write into.
    """
    if not isinstance(qw, QuantizedWeights):
        raise TypeError(f"qw: expected a QuantizedWeights (fastmoe_nb.formats.quantize or "
                        f"from_blocks), got {type(qw).__name__}")
    ids, single = _expert_ids(experts, qw.num_experts)
    E, R, C = qw.shape
    want = (R, C) if single else (len(ids), R, C)
    if out is None:
        out = np.empty(want, qw.dtype)
    else:
        chk.check_float("out", out, shape=want, dtype=qw.dtype)
        if not out.flags.writeable:
            raise ValueError("out: expected a writeable array")
    view = out[None] if single else out
    step = _chunk_rows(C)
    for p0, b in qw.parts:                       # a stacked weight part by part, in place
        for i, e in enumerate(ids):
            for r0 in range(0, b.shape[1], step):
                r1 = min(b.shape[1], r0 + step)
                view[i, p0 + r0:p0 + r1] = _decode(b[e, r0:r1], qw.spec, C)
    return out


def quantize_rows(x, format, *, check_finite=True):
    """x: (..., C) float -> (..., C // block * block_bytes) uint8 blocks (bf16: (..., C) uint16
    bits; f32 / f64: float32 / float64): the row codec, gguf.quants.quantize's layout."""
    spec = check_format(format)
    x, bf16 = _check_weights("x", x)
    if x.ndim == 0:
        raise ValueError("x: expected an array of rows (..., C), got a 0-d array")
    _check_block_multiple("x", x.shape, spec)
    rows = x.reshape(1, int(np.prod(x.shape[:-1])), x.shape[-1])
    qw = _quantize("x", rows, bf16, spec, check_finite)
    return qw.blocks.reshape(*x.shape[:-1], qw.blocks.shape[-1])


def dequantize_rows(blocks, format):
    """blocks: (..., row_bytes) uint8 (bf16: (..., C) uint16; f32 / f64: floats) -> (..., C)
    float32 (float64 for f64): gguf.quants.dequantize's values."""
    spec = check_format(format)
    b, _ = _host_view("blocks", blocks)
    if b.ndim == 0:
        raise ValueError("blocks: expected an array of rows (..., row_bytes), got a 0-d array")
    if b.dtype == np.uint8:
        if b.shape[-1] % spec.block_bytes:
            raise ValueError(f"blocks: the last axis ({b.shape[-1]} bytes) must be a multiple "
                             f"of the {spec.name} block of {spec.block_bytes} bytes")
        cols = b.shape[-1] // spec.block_bytes * spec.block
    else:
        cols = b.shape[-1]
    lead = b.shape[:-1]
    rows = b.reshape(1, int(np.prod(lead)), b.shape[-1])
    return dequantize(from_blocks(rows, spec, (1, rows.shape[1], cols)), 0).reshape(*lead, cols)


# --------------------------------------------------------------------------- input checks

def _check_weights(name, w):
    """w -> (host float array, bf16): float16/32/64, or bfloat16 as its uint16 bits."""
    a, bf16 = _host_view(name, w)
    if bf16 or a.dtype in (np.float16, np.float32, np.float64):
        return a, bf16
    raise TypeError(f"{name}: expected a floating-point array (float32, float64, float16 or "
                    f"bfloat16), got {a.dtype}")


def _kept_as_is(w, bf16, spec):
    """w itself when it already is in spec's storage with contiguous rows: f32, f64, bf16."""
    same = (spec.name == "bf16" and bf16) or (not bf16 and w.dtype == spec.storage
                                              and spec.name in ("f32", "f64"))
    if same and (w.shape[-1] <= 1 or w.strides[-1] == w.dtype.itemsize):
        return w
    return None


def _as_float(x, bf16, spec):
    """x: (r, C) chunk -> float32 (float64 for the f64 format), C-contiguous."""
    if bf16:
        x = (x.astype(np.uint32) << 16).view(F32)
    return np.ascontiguousarray(x, dtype=spec.dtype)


def _check_finite(name, x, bf16):
    """x: a chunk of floats (bf16: uint16 bits); ValueError on NaN / Inf."""
    if bf16:
        if ((x & 0x7F80) == 0x7F80).any():
            raise ValueError(f"{name}: expected finite values, found NaN or Inf "
                             f"(pass check_finite=False to skip this check)")
    else:
        chk.check_finite(name, x)


_SCALE_BYTES = {"q8_0": (0,), "q4_0": (0,), "q4_k": (0, 2), "q6_k": (208,)}  # fp16 offsets
_F16_MAX = 65504.0
RANGE = {   # the largest |w| each format holds: its float16 scales' (bf16's, f32's) limit
    "f32": float(np.finfo(np.float32).max), "f64": float(np.finfo(np.float64).max),
    "bf16": float(np.uint32(0x7F7F7FFF).view(np.float32)),   # rounds to bf16's largest
    "q8_0": _F16_MAX * 127,        # d = amax / 127
    "q4_0": _F16_MAX * 8,          # d = amax / 8
    "q4_k": _F16_MAX * 60,         # dmin = max group min / 63; a fitted min reaches ~3% past
    "q6_k": _F16_MAX * 128 * 31,   # d = max group scale / 128, a group scale ~ amax / 31
}


def _check_range(name, x, spec):
    """x: (r, C) float chunk; ValueError where |x| is beyond what the format's scales hold
    (ggml would write an Inf scale, or, past ~1.8e19 for q6_k, a block of zeros)."""
    m = float(np.abs(x).max()) if x.size else 0.0
    if m > RANGE[spec.name]:
        _too_large(name, spec, f"max |{name}| = {m:.4g}")


def _check_scales(name, b, spec):
    """b: (r, row) encoded chunk; ValueError where a block scale (a value) rounded to Inf:
    near the range's edge a fitted q4_k min or q6_k scale may overflow."""
    if spec.name == "bf16":
        bad = ((b & 0x7F80) == 0x7F80).any()
    elif spec.name in _SCALE_BYTES:
        blk = b.reshape(b.size // spec.block_bytes, spec.block_bytes)
        bad = any(((blk[..., o + 1] & 0x7C) == 0x7C).any() for o in _SCALE_BYTES[spec.name])
    else:
        bad = not np.isfinite(b).all()
    if bad:
        _too_large(name, spec, "a value that rounds to Inf" if spec.name in ("bf16", "f32")
                   else "a block whose fitted scale overflows float16")


def _too_large(name, spec, got):
    what = {"bf16": "bfloat16 values", "f32": "float32 values", "f64": "float64 values"}
    raise ValueError(f"{name}: values too large for {spec.name}: "
                     f"{what.get(spec.name, 'its float16 block scales')} hold |{name}| up to "
                     f"about {RANGE[spec.name]:.3g}, got {got}")


def _expert_ids(experts, E):
    """experts -> (ids, single): None -> all; int -> [e], True; slice / sequence -> ids."""
    if experts is None:
        return range(E), False
    if isinstance(experts, numbers.Integral) and not isinstance(experts, (bool, np.bool_)):
        return [chk.check_int("experts", experts, 0, E - 1,
                              what=f"an expert id in 0..{E - 1}")], True
    if isinstance(experts, slice):
        return range(E)[experts], False
    ids = np.asarray(experts)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise TypeError(f"experts: expected None, an expert id, a slice or a 1-D sequence of "
                        f"expert ids, got {experts!r}")
    if ids.size and (ids.min() < 0 or ids.max() >= E):
        raise ValueError(f"experts: expected expert ids in 0..{E - 1}, got {ids.tolist()}")
    return [int(i) for i in ids], False


def _chunk_rows(C):
    return max(1, CHUNK_VALUES // max(C, 1))


def _for_chunks(shape, fn):
    """Call fn(e, r0, r1) over every expert's rows, CHUNK_VALUES values at a time."""
    E, R, C = shape
    step = _chunk_rows(C)
    for e in range(E):
        for r0 in range(0, R, step):
            fn(e, r0, min(R, r0 + step))


# --------------------------------------------------------------------------- codec dispatch

def _encode(x, spec):
    """x: (r, C) float32 (float64 for f64) -> (r, row) spec.storage."""
    if spec.name in ("f32", "f64"):
        return x
    if spec.name == "bf16":
        return _bf16_bits(x)
    r, C = x.shape
    enc = {"q8_0": _enc_q8_0, "q4_0": _enc_q4_0, "q4_k": _enc_q4_k, "q6_k": _enc_q6_k}
    with np.errstate(all="ignore"):   # ggml's float32 arithmetic, overflow included
        out = enc[spec.name](x.reshape(r * C // spec.block, spec.block))
    return out.reshape(r, spec.row_bytes(C))


def _decode(b, spec, C):
    """b: (r, row) spec.storage -> (r, C) float32 (float64 for f64)."""
    if spec.name in ("f32", "f64"):
        return b
    if spec.name == "bf16":
        return (b.astype(np.uint32) << 16).view(F32)
    r = b.shape[0]
    dec = {"q8_0": _dec_q8_0, "q4_0": _dec_q4_0, "q4_k": _dec_q4_k, "q6_k": _dec_q6_k}
    with np.errstate(all="ignore"):
        out = dec[spec.name](np.ascontiguousarray(b).reshape(b.size // spec.block_bytes,
                                                             spec.block_bytes))
    return out.reshape(r, C)


# --------------------------------------------------------------------------- float helpers

def _bf16_bits(x):
    """x: (...) float32 -> (...) uint16, round to nearest, ties to even; a NaN (let through by
    check_finite=False) made quiet, as ggml's fp32_to_bf16 does."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    rne = (u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, (u >> 16) | 64, rne).astype(np.uint16)


def _f16(x):
    """x: (n,) float32 -> (n, 2) uint8, the little-endian float16 bits (round to nearest even)."""
    return x.astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_value(b):
    """b: (n, 2) uint8 little-endian float16 -> (n,) float32."""
    return np.ascontiguousarray(b).view("<f2").reshape(-1).astype(F32)


def _nearest_int(f):
    """f: float32 array -> int32, ggml's nearest_int: add 1.5 * 2**23 and read the mantissa
    (round half to even for |f| < 2**22; ggml's bits, not an error, beyond it)."""
    v = (np.asarray(f, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (v & 0x7FFFFF) - 0x400000


def _round_away(v):
    """v: float32 -> float32 rounded half away from zero (C's roundf); exact, no v + 0.5."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0))


def _seqsum(t):
    """t: (..., n) float32 -> (...) the sum t[..., 0] + t[..., 1] + ... left to right (a C
    loop's order; NumPy's sum adds pairwise and rounds differently)."""
    s = t[..., 0] + F32(0)   # a fresh array; -0.0 -> +0.0 like C's `float s = 0; s += t0`
    for i in range(1, t.shape[-1]):
        s += t[..., i]
    return s


def _to_int(v):
    """float32 -> int32 as x86's conversion does: NaN / Inf / out of range -> 0 after the
    int8 / uint8 truncation ggml and gguf apply (both give 0 there)."""
    ok = np.isfinite(v) & (np.abs(v) < F32(2**31))
    return np.where(ok, v, F32(0)).astype(np.int32)


def _first_max(v, init=F32(0)):
    """v: (n, k) float32 -> (max, index): C's `if (v[i] > best) best = v[i]` from best = init
    (NaN never wins; ties keep the first); index -1 where nothing beat init."""
    m = np.where(np.isnan(v), -np.inf, v).astype(F32)
    i = m.argmax(axis=1)
    best = np.take_along_axis(m, i[:, None], axis=1)[:, 0]
    won = best > init
    return np.where(won, best, init).astype(F32), np.where(won, i, -1)


# --------------------------------------------------------------------------- q8_0

def _enc_q8_0(x):
    """x: (n, 32) float32 -> (n, 34) uint8: fp16 d = amax / 127, then 32 int8 round(x / d)."""
    d = np.abs(x).max(axis=1) / F32(127)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    q = _to_int(_round_away(x * inv[:, None])).astype(np.int8)
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=1)


def _dec_q8_0(b):
    """b: (n, 34) uint8 -> (n, 32) float32: v = q * d."""
    d = _f16_value(b[:, :2])
    return b[:, 2:].view(np.int8).astype(F32) * d[:, None]


# --------------------------------------------------------------------------- q4_0

def _enc_q4_0(x):
    """x: (n, 32) float32 -> (n, 18) uint8: fp16 d = max / -8 (max: the value of largest
    magnitude, first wins; +0 in an all-zero block, so d = -0 as ggml writes it, where
    gguf.quants writes +0 after a leading -0.0), q = min(15, trunc(x / d + 8.5));
    byte j = q[j] | q[j + 16] << 4."""
    ax = np.abs(x)
    i = ax.argmax(axis=1)[:, None]
    big = np.take_along_axis(ax, i, axis=1)[:, 0] > 0
    d = np.where(big, np.take_along_axis(x, i, axis=1)[:, 0], F32(0)) / F32(-8)
    inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    q = np.minimum(15, _to_int(np.trunc(x * inv[:, None] + F32(8.5))) & 0xFF).astype(np.uint8)
    return np.concatenate([_f16(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _dec_q4_0(b):
    """b: (n, 18) uint8 -> (n, 32) float32: v = (q - 8) * d, low nibbles first."""
    d = _f16_value(b[:, :2])
    qs = b[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return q.astype(F32) * d[:, None]


# --------------------------------------------------------------------------- q4_k

def _enc_q4_k(x):
    """x: (n, 256) float32 -> (n, 144) uint8: fp16 d, fp16 dmin, 12 bytes of eight 6-bit scale /
    min pairs, 128 bytes of nibbles; v = d * sc * q - dmin * m (ggml's quantize_row_q4_K_ref)."""
    n = x.shape[0]
    xs = x.reshape(n, 8, 32)
    av = np.sqrt(_seqsum(xs * xs) / F32(32))
    scales, mins, L = _qkx2(xs, av[..., None] + np.abs(xs))
    ls, d = _scale_codes(scales)
    lm, dmin = _scale_codes(mins)
    packed = _pack_k4_scales(ls, lm)
    dq = (_f16_value(_f16(d))[:, None] * ls.astype(F32))[..., None]
    mq = (_f16_value(_f16(dmin))[:, None] * lm.astype(F32))[..., None]
    requant = np.clip(_nearest_int((xs + mq) / dq), 0, 15)
    L = np.where(dq != 0, requant, L).astype(np.uint8)
    qs = (L[:, 0::2] | (L[:, 1::2] << 4)).reshape(n, 128)
    return np.concatenate([_f16(d), _f16(dmin), packed, qs], axis=1)


def _scale_codes(v):
    """v: (n, 8) float32 group scales (or mins) -> (6-bit codes (n, 8) uint8, the float32 super
    scale max / 63): code = min(63, nearest_int(63 / max * v)), max over the groups from 0."""
    vmax, _ = _first_max(v)
    inv = np.where(vmax > 0, F32(63) / vmax, F32(0)).astype(F32)
    codes = np.minimum(63, _nearest_int(inv[:, None] * v) & 0xFF).astype(np.uint8)
    return codes, vmax / F32(63)


def _pack_k4_scales(ls, lm):
    """ls, lm: (n, 8) 6-bit codes -> (n, 12) bytes: groups 0-3 in bytes 0-3 / 4-7 (6 bits), groups
    4-7 as nibbles in bytes 8-11 with their top 2 bits in bits 6-7 of bytes 0-3 / 4-7."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return np.concatenate([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6),
                           (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)], axis=1)


def _unpack_k4_scales(s):
    """s: (n, 12) uint8 -> (scales, mins) (n, 8) uint8 6-bit codes."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _qkx2(x, w, nmax=15, rmin=F32(-1), rdelta=F32(0.1), nstep=20):
    """ggml's make_qkx2_quants for 4-bit groups with a min: x, w (n, g, 32) float32 ->
    (scale (n, g), -min (n, g), L (n, g, 32) int32 in 0..nmax), the weighted least-squares fit
    v = scale * L + min (min <= 0), the best of nstep + 1 trial scales; each trial is taken
    around the best (scale, min) found so far, as ggml's loop does."""
    mn0 = np.minimum(x.min(axis=-1), F32(0))
    mx = x.max(axis=-1)
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    mn = mn0
    iscale = F32(nmax) / (mx - mn)[..., None]
    scale = (F32(1) / iscale)[..., 0]
    L = np.clip(_nearest_int(iscale * (x - mn[..., None])), 0, nmax)
    best = _fit_error(x, w, L, scale, mn)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + F32(nmax)) / (mx - mn)[..., None]
        La = np.clip(_nearest_int(iscale * (x - mn[..., None])), 0, nmax)
        lf = La.astype(F32)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = np.where(pos, F32(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        cur = _fit_error(x, w, La, this_scale, this_min)
        better = (D > 0) & (cur < best)
        L = np.where(better[..., None], La, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    flat = mx == mn0   # all values equal (and <= 0): L = 0, scale 0, the value as the min
    scale = np.where(flat, F32(0), scale).astype(F32)
    mn = np.where(flat, mn0, mn)
    return scale, (-mn).astype(F32), np.where(flat[..., None], 0, L)


def _fit_error(x, w, L, scale, mn):
    """(n, g) sum over the group of w * (scale * L + min - x)^2, left to right."""
    diff = scale[..., None] * L.astype(F32) + mn[..., None] - x
    return _seqsum(w * (diff * diff))


def _dec_q4_k(b):
    """b: (n, 144) uint8 -> (n, 256) float32: group g of 32 values: d * sc[g] * q - dmin * m[g],
    groups 2c / 2c + 1 the low / high nibbles of bytes 32c..32c + 31."""
    n = b.shape[0]
    d, dmin = _f16_value(b[:, 0:2]), _f16_value(b[:, 2:4])
    sc, mn = _unpack_k4_scales(b[:, 4:16])
    ds = (d[:, None] * sc.astype(F32))[..., None]
    dm = (dmin[:, None] * mn.astype(F32))[..., None]
    qs = b[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32).astype(F32)
    return (ds * q - dm).reshape(n, 256)


# --------------------------------------------------------------------------- q6_k

def _enc_q6_k(x):
    """x: (n, 256) float32 -> (n, 210) uint8: 128 bytes of low nibbles, 64 bytes of high 2-bit
    pairs, 16 int8 group scales, fp16 d; v = d * sc * (q - 32) (ggml's quantize_row_q6_K_ref)."""
    n = x.shape[0]
    xs = x.reshape(n, 16, 16)
    scales, L = _qx(xs, 32)
    amax, i = _first_max(np.abs(scales))
    smax = np.where(i >= 0, np.take_along_axis(scales, np.maximum(i, 0)[:, None], 1)[:, 0], F32(0))
    zero = amax < F32(1e-15)
    iscale = np.where(zero, F32(1), F32(-128) / smax).astype(F32)
    d = np.where(zero, F32(0), F32(1) / iscale).astype(F32)
    sc = (np.minimum(127, _nearest_int(iscale[:, None] * scales)) & 0xFF).astype(np.uint8)
    dq = (_f16_value(_f16(d))[:, None] * sc.view(np.int8).astype(F32))[..., None]
    requant = np.clip(_nearest_int(xs / dq), -32, 31) + 32
    L = np.where(dq != 0, requant, L).astype(np.uint8).reshape(n, 2, 4, 32)
    ql = (L[:, :, 0:2] & 0x0F) | ((L[:, :, 2:4] & 0x0F) << 4)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) \
        | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc, _f16(d)], axis=1)
    out[zero] = 0
    return out


def _qx(x, nmax):
    """ggml's make_qx_quants(rmse_type=1, no weights) for symmetric groups: x (n, g, k) float32 ->
    (scale (n, g), L (n, g, k) int32 in 0..2 nmax - 1): v = scale * (L - nmax), weighted by x^2,
    the best of 19 trial scales."""
    ax = np.abs(x)
    i = ax.argmax(axis=-1)
    amax = np.take_along_axis(ax, i[..., None], -1)[..., 0]
    mx = np.take_along_axis(x, i[..., None], -1)[..., 0][..., None]
    w = x * x

    def trial(iscale):
        ll = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = ll.astype(F32)
        return ll, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    L, sumlx, suml2 = trial(F32(-nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best = scale * sumlx
    for step in list(range(-9, 0)) + list(range(1, 10)):
        ll, sumlx, suml2 = trial(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[..., None], ll, L)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    zero = amax < F32(1e-15)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[..., None], 0, L + nmax)


def _dec_q6_k(b):
    """b: (n, 210) uint8 -> (n, 256) float32: v = d * sc[v // 16] * (q - 32), q 6 bits: a low
    nibble of ql and 2 bits of qh (each 128-value half: ql 64 bytes, qh 32)."""
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(F32)
    d = _f16_value(b[:, 208:210])
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 4, 32)
    hi = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    ds = (d[:, None] * sc)[..., None]
    return (ds * q.reshape(n, 16, 16).astype(F32)).reshape(n, 256)
