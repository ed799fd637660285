"""HF transformers: experts_implementation="fastmoe_nb" gives the logits and every gradient of
"eager" on tiny random Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 models (no hub downloads)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastmoe_nb.interop.hf as hf  # noqa: E402
from fastmoe_nb.interop import register_hf_experts  # noqa: E402
from helpers import assert_close  # noqa: E402

V = 64          # vocabulary
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(moe_intermediate_size=24, intermediate_size=48,
                                         num_experts=4, num_experts_per_tok=2, head_dim=8,
                                         decoder_sparse_step=1, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=4,
                                  num_experts_per_tok=2)),       # renormalize=False router
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=3, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert register_hf_experts() == "fastmoe_nb"


@pytest.fixture
def calls(monkeypatch):
    """Counts the experts calls that reach fastmoe_nb (equality alone could be eager twice)."""
    n = []
    real = hf._experts
    monkeypatch.setattr(hf, "_experts", lambda *a, **kw: (n.append(1), real(*a, **kw))[1])
    return n


def _config(name):
    cls, extra = CONFIGS[name]
    return getattr(transformers, cls)(**{**COMMON, **extra})


def _train_step(model, ids):
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def _pair(name, dtype, **kw):
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(
        _config(name), experts_implementation="eager", dtype=dtype)
    ours = transformers.AutoModelForCausalLM.from_config(
        _config(name), experts_implementation="fastmoe_nb", dtype=dtype, **kw)
    ours.load_state_dict(eager.state_dict())
    assert ours.config._experts_implementation == "fastmoe_nb"
    return eager, ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_every_gradient_equal_eager_float64(name, calls):
    eager, ours = _pair(name, torch.float64)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = _train_step(eager, ids)
    assert not calls
    got_logits, got_grads = _train_step(ours, ids)
    assert len(calls) == sum("experts" in n for n, m in ours.named_modules()
                             if type(m).__name__.endswith("Experts"))
    assert_close(got_logits.numpy(), want_logits.numpy())
    assert got_grads.keys() == want_grads.keys()
    for n, g in want_grads.items():
        assert g is not None and got_grads[n] is not None, n
        # a model's gradients are far below O(1) (some parameters' down to 1e-5) and none is a
        # cancelled zero: relative to each one's own scale (floor=0), not helpers.FLOOR
        assert_close(got_grads[n].numpy(), g.numpy(), rtol=1e-11, floor=0)
    experts_grads = [n for n in got_grads if "experts.gate_up_proj" in n]
    assert experts_grads and all(got_grads[n].abs().sum() > 0 for n in experts_grads)


def test_mixtral_float32_and_switching_implementations(calls):
    eager, ours = _pair("mixtral", torch.float32)
    ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(2))
    want_logits, want_grads = _train_step(eager, ids)
    got_logits, got_grads = _train_step(ours, ids)
    assert calls
    assert_close(got_logits.numpy(), want_logits.numpy(), rtol=1e-5)
    for n, g in want_grads.items():   # relative to each one's own scale, as above
        assert_close(got_grads[n].numpy(), g.numpy(), rtol=1e-4, floor=0)
    eager.set_experts_implementation("fastmoe_nb")            # switch an existing model
    with torch.no_grad():
        switched = eager(input_ids=ids).logits
    assert_close(switched.numpy(), want_logits.numpy(), rtol=1e-5)


def test_unsupported_experts_are_a_clear_error():
    _, ours = _pair("mixtral", torch.float32)
    ids = torch.zeros((1, 3), dtype=torch.long)
    for attr, value, match in [("has_bias", True, "has_bias=True"),
                               ("has_gate", False, "has_gate=False")]:
        module = ours.model.layers[0].mlp.experts
        setattr(module, attr, value)
        with pytest.raises(ValueError, match=match):
            ours(input_ids=ids)
        setattr(module, attr, not value)
    with pytest.raises(TypeError, match="name: expected a non-empty string"):
        register_hf_experts("")
    np.testing.assert_equal(ours.config._experts_implementation, "fastmoe_nb")
