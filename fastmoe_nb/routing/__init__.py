"""Routers of real models and of the literature, balancing losses and updates, and routing
statistics. Every router returns the library's Routing (and a Plan when it decides what is
dropped); every differentiable one has its backward beside it. CPU (NumPy) arrays.

| router / loss | function |
|---|---|
| Switch top-1 with capacity | switch_top1 |
| GShard top-2 with capacity, random routing | gshard_top2 |
| expert choice | expert_choice |
| noisy top-k, cv^2 importance + load loss | noisy_topk, noisy_topk_loss |
| Soft MoE | soft_moe_weights, soft_moe |
| hash routing | hash_routing, balanced_hash_table |
| dense gating (k = E) | dense_gating |
| auxiliary losses | load_balancing_loss, z_loss, sequence_balance_loss |
| DeepSeek-V3 bias update | update_bias |
"""
from .capacity import PRIORITIES, capacity_plan, expert_capacity
from .dense import dense_gating, dense_gating_backward
from .expert_choice import expert_choice, expert_choice_backward
from .gshard import gshard_top2, gshard_top2_backward
from .hash import balanced_hash_table, hash_routing
from .losses import (NORMALIZATIONS, load_balancing_loss, load_balancing_loss_backward,
                     sequence_balance_loss, sequence_balance_loss_backward, update_bias, z_loss,
                     z_loss_backward)
from .noisy import (cv_squared, cv_squared_backward, expert_importance, noisy_topk,
                    noisy_topk_backward, noisy_topk_loss, noisy_topk_loss_backward)
from .soft import soft_moe, soft_moe_backward, soft_moe_weights, soft_moe_weights_backward
from .stats import RoutingMonitor, RoutingStats, load_cv, router_entropy, routing_stats
from .switch import switch_top1, switch_top1_backward

__all__ = [
    "NORMALIZATIONS", "PRIORITIES", "RoutingMonitor", "RoutingStats", "balanced_hash_table",
    "capacity_plan", "cv_squared", "cv_squared_backward", "dense_gating",
    "dense_gating_backward", "expert_capacity", "expert_choice", "expert_choice_backward",
    "expert_importance", "gshard_top2", "gshard_top2_backward", "hash_routing",
    "load_balancing_loss", "load_balancing_loss_backward", "load_cv", "noisy_topk",
    "noisy_topk_backward", "noisy_topk_loss", "noisy_topk_loss_backward", "router_entropy",
    "routing_stats", "sequence_balance_loss", "sequence_balance_loss_backward", "soft_moe",
    "soft_moe_backward", "soft_moe_weights", "soft_moe_weights_backward", "switch_top1",
    "switch_top1_backward", "update_bias", "z_loss", "z_loss_backward",
]
