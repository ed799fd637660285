"""Deprecated module path (0.1.0): the MoE layer moved to fastmoe_nb.moe (moe_forward,
moe_backward, ROUTERS) and the expert MLPs to fastmoe_nb.ops.experts. These names stay for one
release; import them from fastmoe_nb (fm.moe_forward, ...) instead."""
from ..moe import ROUTERS, moe_backward, moe_forward
from .experts import experts_backward, experts_forward, shared_backward, shared_forward

__all__ = ["ROUTERS", "experts_backward", "experts_forward", "moe_backward", "moe_forward",
           "shared_backward", "shared_forward"]
