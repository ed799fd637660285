"""The routed experts alone, the routing given: what a framework that keeps its own router
(HF transformers' experts interface) hands to fastmoe_nb.

    y[t] = sum over j of weights[t, j] * MLP_{experts[t, j]}(x[t])

routed_experts is the second half of the MoE layer's one pipeline (fastmoe_nb.moe), fused fast
path included; it is re-exported here, where the PyTorch Function and the HF glue find it.
"""
from ..checks import check_expert_weights
from ..moe import ExpertsContext, routed_experts, routed_experts_backward

__all__ = ["ExpertsContext", "check_expert_weights", "routed_experts",
           "routed_experts_backward"]
