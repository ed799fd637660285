"""Checkpoint readers: an MoE layer's tensors from a file, ready for fastmoe_nb.moe_forward.

    from fastmoe_nb.io import read_gguf_moe
    layer = read_gguf_moe("model.gguf", 3)      # blk.3: router, experts (memory maps), shared
    y = layer.forward(x)                          # fm.moe_forward(x, **layer.kwargs())

GGUF (llama.cpp's files) needs the `gguf` package (pip install gguf); it is imported when a
file is read, so `import fastmoe_nb.io` works without it.
"""
from .gguf import GGUFMoELayer, gguf_moe_layers, read_gguf_moe

__all__ = ["GGUFMoELayer", "gguf_moe_layers", "read_gguf_moe"]
