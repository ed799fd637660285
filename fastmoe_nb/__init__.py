"""fastmoe_nb: Mixture-of-Experts building blocks — routing, token dispatch and grouped
expert GEMMs — as plain NumPy calls over hand-written Numba kernels (@njit on the CPU,
@cuda.jit on NVIDIA GPUs)."""
from .ops.activations import ACTIVATIONS, activate
from .ops.dispatch import combine, make_plan, permute
from .ops.gemm import grouped_gemm, grouped_gemm_backward
from .ops.moe import ROUTERS, experts_forward, moe_forward, shared_forward
from .ops.routing import sigmoid_topk, softmax, softmax_topk, topk
from .types import MoEContext, Plan, Routing

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "ROUTERS", "MoEContext", "Plan", "Routing", "__version__", "activate",
    "combine", "experts_forward", "grouped_gemm", "grouped_gemm_backward", "make_plan",
    "moe_forward", "permute",
    "shared_forward", "sigmoid_topk", "softmax", "softmax_topk", "topk",
]
