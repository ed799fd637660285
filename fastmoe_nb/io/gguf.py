"""Read one MoE layer of a GGUF file (llama.cpp's format) and run it with fastmoe_nb.

A layer blk.N of an MoE model holds (GGUF lists dimensions innermost first; the shapes here
are NumPy's, outermost first, as gguf's reader gives them):

    blk.N.ffn_gate_inp.weight        (E, d)    the router; router_w = its transpose (d, E)
    blk.N.ffn_gate_exps.weight       (E, h, d) gate   \\  w1 = formats.stack(gate, up):
    blk.N.ffn_up_exps.weight         (E, h, d) up     /   (E, 2h, d), trans_w=True
    blk.N.ffn_gate_up_exps.weight    (E, 2h, d)       or both in one tensor, [gate | up]
    blk.N.ffn_down_exps.weight       (E, d, h)        w2, trans_w=True
    blk.N.exp_probs_b.bias           (E,)      DeepSeek-V3's choice bias (sigmoid router)
    blk.N.ffn_{gate,up,down}_shexp.weight  (hs, d), (hs, d), (d, hs): a shared expert
    blk.N.ffn_gate_inp_shexp.weight  (d,)      its sigmoid gate (Qwen2-MoE)

Expert tensors stay memory maps of the file: their blocks become QuantizedWeights
(formats.from_blocks) without a copy, gate and up stacked without one. The router, the
choice bias and the shared expert are small and are copied to float32 (dequantized when
stored in a format).

Routing follows llama.cpp's build_moe_ffn: k = <arch>.expert_used_count; the gating function,
whether the chosen weights are renormalized and their scale come from
<arch>.expert_gating_func / expert_weights_norm / expert_weights_scale where the file has them,
and from what llama.cpp's code fixes per architecture for llama (Mixtral), qwen2moe, qwen3moe
and deepseek2; groups from expert_group_count / expert_group_used_count. Where that maps onto
a router of fastmoe_nb (softmax_topk, sigmoid_topk) the layer carries it; where it does not
(another gating function, a scale or groups with softmax, an architecture whose routing only
llama.cpp's code knows), the layer's router is None and the caller names one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .. import formats

# llama.cpp's llama_expert_gating_func_type
SOFTMAX, SIGMOID, SOFTMAX_WEIGHT = 1, 2, 3
_GATING = {SOFTMAX: "softmax", SIGMOID: "sigmoid", SOFTMAX_WEIGHT: "softmax_weight"}

# What llama.cpp's graph code fixes per architecture (src/models/<arch>.cpp): the gating
# function (None: the file's expert_gating_func, softmax when absent) and whether the chosen
# weights are renormalized (None: the file's expert_weights_norm, False when absent).
ARCH_ROUTING = {
    "llama": (SOFTMAX, True),        # Mixtral
    "qwen2moe": (SOFTMAX, False),
    "qwen3moe": (SOFTMAX, True),
    "deepseek2": (None, None),       # V2 / V2.5 (softmax), V3 (sigmoid, bias, groups)
}
_F16 = 1   # GGML_TYPE_F16: not a fastmoe_nb format, read as float32 where a copy is small


@dataclass(frozen=True, eq=False)
class GGUFMoELayer:
    """One MoE layer read from a GGUF file, the arguments of fastmoe_nb.moe_forward.

    router_w: (d, E) float32; w1: QuantizedWeights (E, 2h, d) [gate | up] (or (E, h, d) up
    with activation "silu" when the file has no gate); w2: QuantizedWeights (E, d, h); both
    trans_w=True, blocks memory-mapped from the file. k: experts per token. router: "softmax_topk"
    / "sigmoid_topk" with router_options (renormalize, and for sigmoid bias / n_group /
    topk_group / scale), or None when llama.cpp's routing has no fastmoe_nb router (why in
    router_note). shared_w1 (d, 2hs) / shared_w2 (hs, d) / shared_gate_w (d,): float32 or None.
    metadata: the GGUF keys read, as stored.
    """

    arch: str
    layer: int
    router_w: np.ndarray
    w1: formats.QuantizedWeights
    w2: formats.QuantizedWeights
    k: int
    activation: str = "swiglu"
    router: Optional[str] = None
    router_options: dict = field(default_factory=dict)
    router_note: str = ""
    shared_w1: Optional[np.ndarray] = None
    shared_w2: Optional[np.ndarray] = None
    shared_gate_w: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)
    reader: Any = field(default=None, repr=False)   # keeps the file's memory map open

    @property
    def num_experts(self) -> int:
        return self.w1.num_experts

    @property
    def d(self) -> int:
        return self.router_w.shape[0]

    def kwargs(self, **overrides) -> dict:
        """moe_forward's keyword arguments for this layer, overrides applied (e.g.
        renormalize=, return_context=True): fm.moe_forward(x, **layer.kwargs()). router=
        replaces the file's router and its options (give the new router's own)."""
        kw = dict(router_w=self.router_w, w1=self.w1, w2=self.w2, k=self.k,
                  activation=self.activation, trans_w=True, shared_w1=self.shared_w1,
                  shared_w2=self.shared_w2, shared_gate_w=self.shared_gate_w)
        if self.router is not None and "router" not in overrides:
            kw.update(router=self.router, **self.router_options)
        elif "router" not in overrides:
            raise ValueError(f"router: blk.{self.layer} of this {self.arch!r} file has no "
                             f"fastmoe_nb router ({self.router_note}); pass router= (and its "
                             f"options) to forward() / kwargs()")
        kw.update(overrides)
        return kw

    def forward(self, x, **overrides):
        """x: (T, d) float32 -> fm.moe_forward(x, **self.kwargs(**overrides))."""
        from ..moe import moe_forward
        return moe_forward(x, **self.kwargs(**overrides))


def read_gguf_moe(source, layer, *, k=None) -> GGUFMoELayer:
    """MoE layer `layer` (the N of blk.N) of a GGUF file -> GGUFMoELayer.

    source: a path or a gguf.GGUFReader (its memory map is shared, not reopened).
    k: experts per token, when the file has no <arch>.expert_used_count (or to override it).
    A missing tensor, a layer that is not MoE, shapes that disagree, a tensor type without a
    fastmoe_nb format: ValueError naming the tensor.
    """
    reader = _reader(source)
    arch = _arch(reader)
    fields = {n: reader.fields[n] for n in reader.fields}
    tensors = {t.name: t for t in reader.tensors}
    n = _check_layer(layer, tensors, fields, arch)
    p = f"blk.{n}."

    def get(name, required=True):
        t = tensors.get(p + name)
        if t is None and required:
            raise ValueError(f"{p + name}: missing from the file; blk.{n} has "
                             f"{', '.join(sorted(s[len(p):] for s in tensors if s.startswith(p)))}")
        return t

    meta = {key: _value(f) for key, f in fields.items() if key.startswith(arch + ".expert")}
    gate_inp = get("ffn_gate_inp.weight")
    E, d = _dims(gate_inp, 2)
    count = meta.get(f"{arch}.expert_count")
    if count is not None and int(count) != E:
        raise ValueError(f"{gate_inp.name}: expected {arch}.expert_count = {count} expert "
                         f"rows, got shape {(E, d)}")
    router_w = np.ascontiguousarray(_float32(gate_inp).T)

    gate_up = get("ffn_gate_up_exps.weight", required=False)
    if gate_up is not None:
        w1 = _experts(gate_up, E, None, d)
        h, activation = w1.shape[1] // 2, "swiglu"
        if w1.shape[1] % 2:
            raise ValueError(f"{gate_up.name}: expected an even number of rows [gate | up], "
                             f"got shape {w1.shape}")
    else:
        up = _experts(get("ffn_up_exps.weight"), E, None, d)
        h = up.shape[1]
        gate = get("ffn_gate_exps.weight", required=False)
        if gate is None:                  # llama.cpp: no gate tensor -> silu(up)
            w1, activation = up, "silu"
        else:
            w1, activation = formats.stack(_experts(gate, E, h, d), up), "swiglu"
    down = get("ffn_down_exps.weight")
    w2 = _experts(down, E, d, h)

    if k is None:
        k = meta.get(f"{arch}.expert_used_count")
        if k is None:
            raise ValueError(f"k: the file has no {arch}.expert_used_count; pass k=")
    k = int(k)
    if not 1 <= k <= E:
        raise ValueError(f"k: expected 1..E = {E} experts per token, got {k}")
    bias_t = get("exp_probs_b.bias", required=False)
    bias = None
    if bias_t is not None:
        if _dims(bias_t, 1) != (E,):
            raise ValueError(f"{bias_t.name}: expected shape ({E},), got {_dims(bias_t, 1)}")
        bias = _float32(bias_t)
    router, options, note = _routing(arch, meta, E, bias)
    s1, s2, sg = _shared(get, p, d)
    return GGUFMoELayer(arch, n, router_w, w1, w2, k, activation, router, options, note,
                        s1, s2, sg, meta, reader)


def gguf_moe_layers(source) -> list:
    """The N of every blk.N of a GGUF file that has a router (blk.N.ffn_gate_inp.weight)."""
    return _moe_layers({t.name: t for t in _reader(source).tensors})


# --------------------------------------------------------------------------- the file

def _reader(source):
    """source -> gguf.GGUFReader (a path is opened read-only; its tensors are memory maps)."""
    try:
        import gguf
    except ImportError as err:   # an optional dependency
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") \
            from err
    if isinstance(source, gguf.GGUFReader):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a path or a gguf.GGUFReader, got "
                        f"{type(source).__name__}")
    return gguf.GGUFReader(source, "r")


def _value(f):
    """A GGUF metadata field's value (str, int, float, bool or a list of them)."""
    return f.contents()


def _arch(reader):
    f = reader.fields.get("general.architecture")
    if f is None:
        raise ValueError("general.architecture: missing from the file (not a model's GGUF?)")
    return str(_value(f))


def _check_layer(layer, tensors, fields, arch):
    """layer -> the int N of a blk.N with a router; ValueError otherwise."""
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"layer: expected a block number N (blk.N), got {layer!r}")
    n = int(layer)
    blocks = fields.get(f"{arch}.block_count")
    count = int(_value(blocks)) if blocks is not None else None
    if n < 0 or (count is not None and n >= count):
        raise ValueError(f"layer: expected a block number in 0..{(count or 1) - 1} "
                         f"({arch}.block_count = {count}), got {n}")
    p = f"blk.{n}."
    if p + "ffn_gate_inp.weight" not in tensors:
        have = sorted(s[len(p):] for s in tensors if s.startswith(p))
        moe = _moe_layers(tensors)
        raise ValueError(f"layer: blk.{n} is not an MoE layer: no {p}ffn_gate_inp.weight "
                         f"(its tensors: {', '.join(have) or 'none'}; MoE layers: "
                         f"{', '.join(map(str, moe)) or 'none'})")
    return n


def _moe_layers(tensors):
    """The block numbers with a router among a {name: tensor} table."""
    return sorted({int(s.split(".")[1]) for s in tensors
                   if s.startswith("blk.") and s.endswith(".ffn_gate_inp.weight")})


def _dims(t, ndim):
    """A tensor's NumPy shape (outermost first: GGUF's dimensions reversed), ndim checked."""
    shape = tuple(int(s) for s in reversed(t.shape))
    if len(shape) != ndim:
        raise ValueError(f"{t.name}: expected a {ndim}-D tensor, got shape {shape}")
    return shape


def _type_name(t):
    try:
        import gguf
        return gguf.GGMLQuantizationType(int(t.tensor_type)).name
    except ValueError:
        return str(int(t.tensor_type))


def _format(t, what):
    """The fastmoe_nb format of a tensor's type; ValueError naming the tensor."""
    try:
        return formats.format_of_ggml_type(int(t.tensor_type))
    except ValueError:
        raise ValueError(f"{t.name}: tensor type {_type_name(t)} is not a fastmoe_nb weight "
                         f"format ({what}: {', '.join(formats.FORMATS)})") from None


# --------------------------------------------------------------------------- the tensors

def _experts(t, E, R, C):
    """An expert tensor (E, R, C) (R None: any) -> QuantizedWeights on the file's blocks."""
    shape = _dims(t, 3)
    want = (E, "R" if R is None else R, C)
    if shape[0] != E or shape[2] != C or (R is not None and shape[1] != R):
        raise ValueError(f"{t.name}: expected shape (E, R, C) = {want} (E from the router, "
                         f"the rest from the other expert tensors), got {shape}")
    fmt = _format(t, "expert tensors stay in their format, memory-mapped")
    try:
        return formats.from_blocks(t.data, fmt, shape)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{t.name}: {err}") from None


def _float32(t):
    """A small tensor (router, bias, shared expert) as a float32 copy in its NumPy shape."""
    shape = tuple(int(s) for s in reversed(t.shape))
    if int(t.tensor_type) == _F16:
        return t.data.astype(np.float32).reshape(shape)
    values = formats.dequantize_rows(t.data, _format(t, "or F16"))   # (..., C), a new array
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _shared(get, p, d):
    """The shared expert -> (shared_w1 (d, 2hs), shared_w2 (hs, d), shared_gate_w (d,)) float32,
    or Nones."""
    names = ("ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
    ts = [get(n, required=False) for n in names]
    if all(t is None for t in ts):
        if get("ffn_gate_inp_shexp.weight", required=False) is not None:
            raise ValueError(f"{p}ffn_gate_inp_shexp.weight: a shared expert's gate without "
                             f"its {p}ffn_gate_shexp / ffn_up_shexp / ffn_down_shexp")
        return None, None, None
    for n, t in zip(names, ts):
        if t is None:
            raise ValueError(f"{p + n}: missing from the file; the shared expert has "
                             f"{', '.join(p + m for m, u in zip(names, ts) if u is not None)}")
    gate, up, down = (_float32(t) for t in ts)
    hs = up.shape[0] if up.ndim == 2 else -1
    for t, a, want in ((ts[0], gate, (hs, d)), (ts[1], up, (hs, d)), (ts[2], down, (d, hs))):
        if a.shape != want:
            raise ValueError(f"{t.name}: expected shape {want} (d = {d} from the router, hs "
                             f"from {ts[1].name}), got {a.shape}")
    w1 = np.ascontiguousarray(np.concatenate([gate, up], axis=0).T)
    w2 = np.ascontiguousarray(down.T)
    g = get("ffn_gate_inp_shexp.weight", required=False)
    sg = None
    if g is not None:
        sg = _float32(g).reshape(-1)
        if sg.shape != (d,):
            raise ValueError(f"{g.name}: expected shape ({d},), got {_float32(g).shape}")
    return w1, w2, sg


# --------------------------------------------------------------------------- the router

def _routing(arch, meta, E, bias):
    """llama.cpp's routing of this file -> (router, options, note): a fastmoe_nb router name
    and its moe_forward options, or (None, {}, why not)."""
    fixed = ARCH_ROUTING.get(arch)
    gating = meta.get(f"{arch}.expert_gating_func")
    norm = meta.get(f"{arch}.expert_weights_norm")
    if fixed is not None:
        gating = fixed[0] if fixed[0] is not None else (gating or SOFTMAX)
        norm = fixed[1] if fixed[1] is not None else bool(norm)
    elif gating is None or norm is None:
        missing = [k for k, v in (("expert_gating_func", gating),
                                  ("expert_weights_norm", norm)) if v is None]
        return None, {}, (f"llama.cpp fixes the routing of {arch!r} in its code, and the "
                          f"file has no {', '.join(arch + '.' + m for m in missing)}")
    scale = float(meta.get(f"{arch}.expert_weights_scale", 0.0) or 0.0)
    n_group = int(meta.get(f"{arch}.expert_group_count", 0) or 0)
    topk_group = int(meta.get(f"{arch}.expert_group_used_count", 0) or 0)
    if int(gating) == SIGMOID:
        opts = dict(renormalize=bool(norm), scale=scale if scale not in (0.0, 1.0) else 1.0)
        if bias is not None:
            opts["bias"] = bias
        if n_group > 1:
            opts.update(n_group=n_group, topk_group=topk_group or n_group)
        return "sigmoid_topk", opts, ""
    if int(gating) not in (SOFTMAX, SOFTMAX_WEIGHT):
        return None, {}, f"gating function {gating} ({arch}.expert_gating_func)"
    extra = [what for what, on in (("a weight scale", scale not in (0.0, 1.0)),
                                   ("expert groups", n_group > 1),
                                   ("a choice bias (exp_probs_b)", bias is not None)) if on]
    if extra:
        return None, {}, f"softmax gating with {' and '.join(extra)}"
    # softmax_weight: a softmax over the chosen logits, i.e. the renormalized softmax top-k
    renorm = True if int(gating) == SOFTMAX_WEIGHT else bool(norm)
    return "softmax_topk", dict(renormalize=renorm), ""
