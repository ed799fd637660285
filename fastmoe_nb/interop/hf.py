"""HF transformers: fastmoe_nb as an experts implementation.

    from fastmoe_nb.interop import register_hf_experts
    register_hf_experts()
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="fastmoe_nb")

transformers (5.x) routes with its own router and calls the experts module as
`experts(hidden_states (T, d), top_k_index (T, k), top_k_weights (T, k))`; a registered
implementation replaces that call (transformers.integrations.moe.ExpertsInterface). Ours runs
fastmoe_nb's plan, permute, grouped GEMMs, activation and combine forward and backward
(ExpertsFunction), on the module's own `gate_up_proj` (E, 2h, d) and `down_proj` (E, d, h)
without copying them. Gradients reach hidden_states, the weights (so HF's router trains) and
both projections. Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V3 experts qualify: SwiGLU
(`hidden_act` silu), [gate | up] concatenated, no biases, no expert parallelism.

A bfloat16 model (CPU) runs too: its expert weights are read as fastmoe_nb's bf16 format over
the parameters' own memory, the hidden states are cast to float32 (float32 compute and
accumulation) and the result back to the model's dtype. Those experts are frozen: backward
gives hidden_states' and the routing weights' gradients, and raises if the expert parameters
require grad (param.requires_grad_(False) freezes them). float16 models are a TypeError.
"""
from __future__ import annotations

import torch

from .pytorch import experts as _experts

NAME = "fastmoe_nb"
_SILU = ("silu", "swish")


def _check_module(module):
    """The HF experts module must be one fastmoe_nb computes exactly; else a ValueError naming
    the attribute (a TypeError for float16 weights)."""
    from transformers.integrations.moe import _default_apply_gate  # noqa: PLC0415

    if torch.float16 in (module.gate_up_proj.dtype, module.down_proj.dtype):
        raise TypeError(f"experts_implementation={NAME!r}: {type(module).__name__} holds "
                        f"float16 weights, which fastmoe_nb neither computes in nor stores "
                        f"experts in; load the model with dtype=torch.bfloat16 (frozen experts) "
                        f"or torch.float32")
    act = getattr(module.config, "hidden_act", None)
    unsupported = [
        (not getattr(module, "has_gate", False), "has_gate=False (ungated experts, up_proj)"),
        (getattr(module, "has_bias", False), "has_bias=True (expert biases)"),
        (not getattr(module, "is_concatenated", True), "is_concatenated=False (interleaved "
                                                       "gate/up)"),
        (getattr(module, "has_post_expert_norm", False), "has_post_expert_norm=True"),
        (getattr(module, "_is_expert_parallel", False), "expert parallelism"),
        (getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate,
         f"a custom _apply_gate ({type(module).__name__})"),
        (act not in _SILU, f"hidden_act={act!r} (only silu/swish gates: SwiGLU)"),
    ]
    bad = [why for cond, why in unsupported if cond]
    if bad:
        raise ValueError(f"experts_implementation={NAME!r}: {type(module).__name__} has "
                         f"{'; '.join(bad)}; fastmoe_nb runs SwiGLU experts with [gate | up] "
                         f"weights and no biases. Use experts_implementation='grouped_mm' for "
                         f"this model")


def fastmoe_nb_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The registered experts forward. self: the HF experts module (gate_up_proj, down_proj),
    hidden_states: (T, d), top_k_index: (T, k), top_k_weights: (T, k) -> (T, d).

    HF's is_transposed=False layout, gate_up_proj (E, 2h, d) and down_proj (E, d, h), is
    fastmoe_nb's trans_w=True; is_transposed=True, (E, d, 2h) and (E, h, d), is trans_w=False.
    top_k_weights (HF routers return float32) are cast to the compute dtype: hidden_states',
    or float32 for a bfloat16 model, whose result comes back in bfloat16."""
    _check_module(self)
    return _experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                    self.down_proj, activation="swiglu",
                    trans_w=not getattr(self, "is_transposed", False))


def register_hf_experts(name=NAME):
    """Register fastmoe_nb in transformers' experts registry under `name` ("fastmoe_nb"), so
    `from_config(cfg, experts_implementation=name)` / `from_pretrained(...)` /
    `model.set_experts_implementation(name)` run the experts through fastmoe_nb. Idempotent;
    returns the name."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty string, got {name!r}")
    from transformers.integrations.moe import ExpertsInterface  # noqa: PLC0415

    ExpertsInterface.register(name, fastmoe_nb_experts_forward)
    return name


__all__ = ["NAME", "fastmoe_nb_experts_forward", "register_hf_experts"]
