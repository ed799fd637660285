"""fastmoe_nb.nn: a small manual-autograd layer in the style of micrograd / llm.c.

Modules have an explicit forward (which keeps what backward needs) and backward (which returns
the input's gradient and accumulates the parameters' gradients)::

    model = nn.Sequential(nn.Linear(d, d), nn.Residual(nn.MoE(d, h, num_experts=8, k=2)))
    opt = nn.AdamW(model, lr=1e-3)
    logits = model.forward(x)
    loss, dlogits = nn.cross_entropy(logits, targets)
    model.zero_grad(); model.backward(dlogits); nn.clip_grad_norm(model, 1.0); opt.step()
    nn.save("ckpt.npz", model, opt)
"""
from .checkpoint import load, save
from .gradcheck import GradcheckError, gradcheck, numerical_gradient
from .layers import MLP, Embedding, LayerNorm, Linear, RMSNorm
from .losses import cross_entropy, mse
from .moe import MoE
from .module import Module, Parameter, Residual, Sequential
from .optim import SGD, AdamW, Optimizer, clip_grad_norm, global_grad_norm

__all__ = [
    "MLP", "SGD", "AdamW", "Embedding", "GradcheckError", "LayerNorm", "Linear", "MoE", "Module",
    "Optimizer", "Parameter", "RMSNorm", "Residual", "Sequential", "clip_grad_norm",
    "cross_entropy", "global_grad_norm", "gradcheck", "load", "mse", "numerical_gradient",
    "save",
]
