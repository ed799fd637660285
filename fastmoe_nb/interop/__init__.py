"""fastmoe_nb inside other frameworks: PyTorch, HF transformers, JAX.

- `as_array`, `to_torch` (arrays.py): arrays across the boundary without copies.
- `routed_experts`, `routed_experts_backward` (experts.py): the experts with a routing chosen
  elsewhere, framework-neutral.
- `fastmoe_nb.interop.pytorch`: `MoEFunction`, `ExpertsFunction` (torch.autograd.Function),
  `moe`, `experts`, the `MoE` nn.Module.
- `register_hf_experts()` (hf.py): the "fastmoe_nb" experts implementation of transformers.
- `fastmoe_nb.interop.jax_moe.moe`: a jax.custom_vjp over jax.pure_callback.

Importing this package imports neither torch nor jax; `register_hf_experts` imports torch and
transformers when called.
"""
from .arrays import as_array, to_torch
from .experts import ExpertsContext, routed_experts, routed_experts_backward


def register_hf_experts(name="fastmoe_nb"):
    """Register fastmoe_nb as the HF transformers experts implementation `name` (see hf.py)."""
    from .hf import register_hf_experts as register  # noqa: PLC0415  (imports torch)

    return register(name)


__all__ = ["ExpertsContext", "as_array", "register_hf_experts", "routed_experts",
           "routed_experts_backward", "to_torch"]
