"""fastmoe_nb: Mixture-of-Experts building blocks — routing, token dispatch and grouped
expert GEMMs — as plain NumPy calls over hand-written Numba kernels (@njit on the CPU,
@cuda.jit on NVIDIA GPUs)."""
from .ops.activations import ACTIVATIONS, activate, activate_backward
from .ops.dispatch import combine, combine_backward, make_plan, permute, permute_backward
from .ops.experts import experts_backward, experts_forward, shared_backward, shared_forward
from .ops.gemm import PackedWeights, grouped_gemm, grouped_gemm_backward, pack_weights
from .moe import ROUTERS, moe_backward, moe_forward, routed_experts, routed_experts_backward
from .ops.routing import (sigmoid_topk, sigmoid_topk_backward, softmax, softmax_backward,
                          softmax_topk, softmax_topk_backward, topk)
from .types import MoEContext, Plan, Routing
from .formats import QuantizedWeights, dequantize, quantize
from . import formats  # expert weight formats: bf16 and GGUF's q8_0 / q4_0 / q4_k / q6_k
from . import routing  # routers of models and papers, balancing losses, statistics
from . import io  # checkpoint readers: an MoE layer of a GGUF file (needs gguf)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "ROUTERS", "MoEContext", "Plan", "QuantizedWeights", "Routing", "__version__",
    "activate", "dequantize", "quantize",
    "combine", "experts_backward", "experts_forward", "grouped_gemm", "grouped_gemm_backward",
    "make_plan", "PackedWeights", "pack_weights", "moe_forward", "permute", "routed_experts",
    "shared_forward", "sigmoid_topk", "softmax", "softmax_topk", "topk",
    # backward of every op (training)
    "activate_backward", "combine_backward", "moe_backward", "permute_backward",
    "routed_experts_backward", "shared_backward", "sigmoid_topk_backward", "softmax_backward",
    "softmax_topk_backward",
]
