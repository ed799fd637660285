"""Named MoE layer shapes: real models at full size (GPU scale), the same models scaled for a
laptop CPU, the four CPU-performance presets of the benchmarks, and the decoding presets
(a few tokens a call: bound by reading the selected experts' weights).

A Preset is a shape (T, d, h, E, k) plus the model's router and expert options; it knows its
FLOPs and turns itself into `moe_forward` keyword arguments.

    from fastmoe_nb.presets import PRESETS, get_preset
    p = get_preset("mixtral-mini")      # Preset(T=2048, d=1024, h=3584, E=8, k=2, swiglu)
    p.flops()                           # forward FLOPs of the routed experts

Sources of the full-size shapes (HF transformers configs): Mixtral-8x7B, Qwen3-30B-A3B,
OLMoE-1B-7B, DeepSeek-V3 (one shared expert, sigmoid router with 8 groups / 4 kept, scale
2.5), Switch-Base-128 (T5 ReLU experts, top-1, capacity factor 1.25). T is a batch of tokens
chosen for the benchmark, not a model property.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Preset:
    """One MoE layer's shape and options.

    tokens T, d model width, h expert hidden width (swiglu experts hold 2h), experts E, k
    experts per token; shared_h: hidden width of the shared (always-on) expert, 0 if none.
    capacity_factor: Switch-style per-expert capacity ceil(cf * T * k / E), None = dropless.
    """

    name: str
    tokens: int
    d: int
    h: int
    experts: int
    k: int
    activation: str = "swiglu"
    router: str = "softmax_topk"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    capacity_factor: Optional[float] = None
    shared_h: int = 0
    shared_gate: bool = False
    description: str = ""

    @property
    def shape(self):
        """(T, d, h, E, k)."""
        return (self.tokens, self.d, self.h, self.experts, self.k)

    @property
    def h1(self):
        """Width of the first expert GEMM's output: 2h for swiglu ([gate | up]), else h."""
        return 2 * self.h if self.activation == "swiglu" else self.h

    def capacity(self):
        """The per-expert capacity, or None (dropless)."""
        if self.capacity_factor is None:
            return None
        return int(math.ceil(self.capacity_factor * self.tokens * self.k / self.experts))

    def flops(self, rows=None):
        """Forward FLOPs of the routed expert GEMMs: 2 * N * d * (h1 + h), N = rows or T*k.
        Routing, the shared expert and the activation are not counted."""
        n = self.tokens * self.k if rows is None else rows
        return 2.0 * n * self.d * (self.h1 + self.h)

    def weight_bytes(self, itemsize=4):
        """Bytes of all expert weights (w1 and w2), what a decode step must read."""
        return itemsize * self.experts * self.d * (self.h1 + self.h)

    def router_kwargs(self):
        """The router options of `moe_forward` / `sigmoid_topk` beside k."""
        kw = {"router": self.router, "renormalize": self.renormalize}
        if self.router == "sigmoid_topk":
            kw.update(n_group=self.n_group, topk_group=self.topk_group, scale=self.scale)
        return kw

    def replace(self, **changes):
        """A copy with some fields replaced: p.replace(tokens=256)."""
        return replace(self, **changes)

    def as_dict(self):
        return asdict(self)


def _scaled(full: Preset, name, tokens, d, h):
    """The same model (E, k, router, options) with a smaller T, d, h for a laptop CPU."""
    return replace(full, name=name, tokens=tokens, d=d, h=h,
                   shared_h=h if full.shared_h else 0,
                   description=f"{full.name} scaled for a laptop CPU")


_MODELS = [
    Preset("mixtral", 4096, 4096, 14336, 8, 2,
           description="Mixtral-8x7B: softmax top-2, renormalized, SwiGLU"),
    Preset("qwen3-moe", 4096, 2048, 768, 128, 8,
           description="Qwen3-30B-A3B: softmax top-8 of 128, renormalized, SwiGLU"),
    Preset("olmoe", 4096, 2048, 1024, 64, 8, renormalize=False,
           description="OLMoE-1B-7B: softmax top-8 of 64, not renormalized, SwiGLU"),
    Preset("deepseek-v3", 4096, 7168, 2048, 256, 8, router="sigmoid_topk", n_group=8,
           topk_group=4, scale=2.5, shared_h=2048,
           description="DeepSeek-V3: sigmoid top-8 of 256, 8 groups / 4 kept, scale 2.5, "
                       "one shared expert"),
    Preset("switch", 4096, 768, 3072, 128, 1, activation="relu", renormalize=False,
           capacity_factor=1.25,
           description="Switch-Base-128: top-1 of 128, ReLU experts, capacity factor 1.25"),
]
_FULL = {p.name: p for p in _MODELS}

_LAPTOP = [
    _scaled(_FULL["mixtral"], "mixtral-laptop", 1024, 1024, 3584),
    _scaled(_FULL["qwen3-moe"], "qwen3-moe-laptop", 1024, 512, 192),
    _scaled(_FULL["olmoe"], "olmoe-laptop", 1024, 512, 256),
    _scaled(_FULL["deepseek-v3"], "deepseek-v3-laptop", 1024, 1024, 256),
    _scaled(_FULL["switch"], "switch-laptop", 1024, 384, 1536),
]

# The CPU-performance presets (T, d, h, E, k), SwiGLU, Mixtral's router.
_CPU_PERF = [
    Preset("mixtral-mini", 2048, 1024, 3584, 8, 2,
           description="CPU performance: few large experts (Mixtral-like)"),
    Preset("deepseek-mini", 2048, 1024, 512, 64, 6,
           description="CPU performance: many small experts (DeepSeek-like, softmax router)"),
    Preset("fine-128", 2048, 512, 256, 128, 8,
           description="CPU performance: fine-grained, 128 tiny experts"),
    Preset("decode-8", 8, 1024, 3584, 8, 2,
           description="CPU performance: decoding 8 tokens, bound by reading the weights"),
]

# Decoding: T = 1, 8, 64 of the Mixtral-like shape (decode-8 is above), and 8-token batches of
# deepseek-mini's and fine-128's shapes; the shapes of issue #20's decoding targets.
_DECODE = [
    Preset("decode-1", 1, 1024, 3584, 8, 2,
           description="decoding one token, Mixtral-like: bound by reading two experts"),
    Preset("decode-64", 64, 1024, 3584, 8, 2,
           description="decoding 64 tokens, Mixtral-like: every expert read once"),
    Preset("deepseek-decode-8", 8, 1024, 512, 64, 6,
           description="decoding 8 tokens of deepseek-mini's shape (64 small experts, top-6)"),
    Preset("fine-decode-8", 8, 512, 256, 128, 8,
           description="decoding 8 tokens of fine-128's shape (128 tiny experts, top-8)"),
]

PRESETS = {p.name: p for p in _MODELS + _LAPTOP + _CPU_PERF + _DECODE}
MODEL_PRESETS = tuple(p.name for p in _MODELS)
LAPTOP_PRESETS = tuple(p.name for p in _LAPTOP)
CPU_PERF_PRESETS = tuple(p.name for p in _CPU_PERF)
DECODE_PRESETS = ("decode-1", "decode-8", "decode-64", "deepseek-decode-8", "fine-decode-8")
DEFAULT_PRESET = "mixtral-mini"


def get_preset(name) -> Preset:
    """The preset called name; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def custom_preset(tokens, d, h, experts, k, base=None, **options) -> Preset:
    """A preset from explicit sizes, taking router/activation options from base (a Preset or
    a preset name; default: Mixtral's options), overridden by options."""
    if isinstance(base, str):
        base = get_preset(base)
    base = base or PRESETS[DEFAULT_PRESET]
    return replace(base, name="custom", tokens=tokens, d=d, h=h, experts=experts, k=k,
                   description="explicit sizes", **options)


__all__ = ["CPU_PERF_PRESETS", "DECODE_PRESETS", "DEFAULT_PRESET", "LAPTOP_PRESETS", "MODEL_PRESETS", "PRESETS",
           "Preset", "custom_preset", "get_preset"]
