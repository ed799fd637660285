"""The case of one training step of a small HF transformers Mixtral model (forward, backward,
AdamW) with fastmoe_nb's experts (register_hf_experts) against the same model with HF's own
experts implementations, on the same weights and batch (needs torch and transformers).

The check, before any step: the logits and every parameter's gradient of the fastmoe_nb
model against those of the "eager" model (HF's per-expert loop, float32), relative to each
array's largest value. Only the experts differ; attention, router, norms and the optimizer
are torch's in all of them.
"""
from __future__ import annotations

import copy

import numpy as np

from .core import Baseline, Case, rel_err

HF_EXPERTS = ("eager", "grouped_mm")


def _build(cfg, impl, state=None):
    import torch  # noqa: PLC0415  (optional: the bench extra)
    import transformers  # noqa: PLC0415

    torch.manual_seed(0)
    # a config of its own: the model keeps it, and from_config records the experts
    # implementation in it, so a shared one would switch the other models too
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                                          experts_implementation=impl,
                                                          dtype=torch.float32)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    return model


def _logits_and_grads(model, ids):
    """The logits and {name: gradient} of the loss, as NumPy; the gradients are cleared."""
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.logits.detach().numpy().copy(), grads


def _stepper(model, ids):
    import torch  # noqa: PLC0415

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():   # forward, backward, AdamW -> the loss
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def train_step_case(d=512, h=1024, experts=8, k=2, layers=2, vocab=1024, seq=256,
                    tokens=1024, baselines=HF_EXPERTS):
    """-> (Case of the fastmoe_nb model's step with baselines {impl: ...}, a description)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from ..interop import register_hf_experts  # noqa: PLC0415  (imports torch)

    register_hf_experts()
    cfg = transformers.MixtralConfig(
        vocab_size=vocab, hidden_size=d, intermediate_size=h, num_local_experts=experts,
        num_experts_per_tok=k, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=seq, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)
    eager = _build(cfg, "eager")
    state = eager.state_dict()
    B = max(1, tokens // seq)
    ids = torch.randint(0, vocab, (B, min(seq, tokens)),
                        generator=torch.Generator().manual_seed(1))
    ours = _build(cfg, "fastmoe_nb", state)
    want_logits, want_grads = _logits_and_grads(eager, ids)
    got_logits, got_grads = _logits_and_grads(ours, ids)

    def check(loss):
        if not np.isfinite(loss):
            return float("inf"), "the step's loss is not finite"
        if set(got_grads) != set(want_grads):
            return float("inf"), "the gradients' parameters differ"
        errs = [rel_err(got_logits, want_logits)]
        errs += [rel_err(got_grads[n], want_grads[n]) for n in want_grads]
        return max(errs), f"logits and {len(want_grads)} parameters' gradients, one batch"

    def baseline(impl):
        return lambda: Baseline(_stepper(eager if impl == "eager" else _build(cfg, impl, state),
                                         ids))

    what = (f"Mixtral d={d} h={h} E={experts} k={k} layers={layers} T={ids.numel()}; torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
            f"{transformers.__version__}")
    return Case(_stepper(ours, ids), check, 0.0, 0.0, {b: baseline(b) for b in baselines},
                reference="HF eager experts (float32)"), what
