"""The capacity routers against HF transformers' own router modules on the same logits (skipped
without torch + transformers): SwitchTransformersTop1Router (Switch top-1, first come) and
NllbMoeTop2Router (GShard top-2, gates normalized before dropping, position or
batch-prioritized)."""
import numpy as np
import pytest

import fastmoe_nb.routing as R

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _logits(T, E, seed):
    return np.random.default_rng(seed).standard_normal((T, E)).astype(np.float32)


def _gate_matrix(r, plan, E):
    """(T, E): each kept assignment's gate at its expert, 0 elsewhere (HF's combine weights)."""
    T, k = r.experts.shape
    G = np.zeros((T, E), np.float32)
    for t in range(T):
        for j in range(k):
            if plan.slots[t, j] >= 0:
                G[t, r.experts[t, j]] = r.weights[t, j]
    return G


@pytest.mark.parametrize("T,E,cap", [(40, 4, 7), (33, 8, 2), (16, 3, 0), (12, 2, 12)])
def test_switch_top1_matches_hf_switch_router(T, E, cap):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersTop1Router)

    cfg = SwitchTransformersConfig(num_experts=E, expert_capacity=cap, d_model=E,
                                   router_bias=False, router_jitter_noise=0.0,
                                   router_dtype="float32")
    cfg.hidden_size = E
    router = SwitchTransformersTop1Router(cfg).eval()
    logits = _logits(T, E, T)
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(E))   # its logits are ours
        mask, probs, _ = router(torch.from_numpy(logits)[None])
    r, plan = R.switch_top1(logits, capacity=cap)
    mask = mask[0].numpy()
    np.testing.assert_array_equal(mask.sum(axis=1) > 0, plan.slots[:, 0] >= 0)
    kept = plan.slots[:, 0] >= 0
    np.testing.assert_array_equal(mask[kept].argmax(axis=1), r.experts[kept, 0])
    np.testing.assert_allclose(probs[0, :, 0].numpy(), r.weights[:, 0], rtol=1e-6)


@pytest.mark.parametrize("T,E,cap", [(40, 4, 9), (33, 8, 3), (20, 5, 20)])
@pytest.mark.parametrize("prioritized", [False, True])
def test_gshard_top2_matches_hf_nllb_router(T, E, cap, prioritized):
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router

    cfg = NllbMoeConfig(num_experts=E, expert_capacity=cap, d_model=E, router_bias=False,
                        router_dtype="float32", second_expert_policy="all",
                        normalize_router_prob_before_dropping=True,
                        batch_prioritized_routing=prioritized)
    router = NllbMoeTop2Router(cfg).train()
    logits = _logits(T, E, T + 1)
    with torch.no_grad():
        top1, gates = router.route_tokens(torch.from_numpy(logits))
    r, plan = R.gshard_top2(logits, capacity=cap,
                            priority="score" if prioritized else "position")
    np.testing.assert_array_equal(top1.numpy().sum(axis=1) > 0, plan.slots[:, 0] >= 0)
    np.testing.assert_allclose(gates.numpy(), _gate_matrix(r, plan, E), rtol=1e-6, atol=1e-7)
