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


# --------------------------------------------------------------------------- bfloat16 models

U = 2.0 ** -8       # bfloat16's unit roundoff (8 significant bits)


def _experts_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")
            and hasattr(m, "gate_up_proj")]


def _freeze_experts(model):
    for m in _experts_modules(model):
        m.gate_up_proj.requires_grad_(False)
        m.down_proj.requires_grad_(False)
    return model


def _bf16_trio(name):
    """One model's bf16-rounded weights three times: float32 "eager" (the reference), bf16
    "eager" and bf16 "fastmoe_nb"."""
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(
        _config(name), experts_implementation="eager", dtype=torch.float32)
    bits = {n: v.to(torch.bfloat16) for n, v in ref.state_dict().items()}
    ref.load_state_dict({n: v.float() for n, v in bits.items()})
    models = [ref]
    for impl in ("eager", "fastmoe_nb"):
        m = transformers.AutoModelForCausalLM.from_config(
            _config(name), experts_implementation=impl, dtype=torch.bfloat16)
        m.load_state_dict(bits)
        models.append(m)
    return models


def _rel(got, want):
    """Normwise relative error ||got - want|| / ||want||, in float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_model_within_bf16_of_float32_as_eager_is(name, calls):
    """A bf16 model with frozen experts: logits and every gradient that exists (embeddings,
    attention, norms, routers: d input embeddings and the routers' through top_k_weights)
    against the float32 model on the same bf16 values, as close as bf16 "eager" is.

    Neither bf16 model equals the float32 one: both round the non-expert compute (attention,
    norms, router, lm_head) and every activation between layers to bf16; eager also runs its
    experts' matmuls in bf16, fastmoe_nb in float32 with float32 accumulation. So each is off
    by a few bf16 roundings, and fastmoe_nb's error may not exceed eager's by more than the
    spread of two sums of many independent roundings (1.5x), nor a few u in absolute terms
    (logits 4u; a gradient passes more bf16 ops and some are 8-entry norm weights: 16u).
    A wrong expert (layout, weights misread, a dropped term) is an O(1) error."""
    ref, eager, ours = (_freeze_experts(m) for m in _bf16_trio(name))
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    (ref_logits, ref_grads), (e_logits, e_grads) = _train_step(ref, ids), _train_step(eager, ids)
    assert not calls
    logits, grads = _train_step(ours, ids)
    assert len(calls) == len(_experts_modules(ours)) and logits.dtype == torch.bfloat16
    e_eager, e_ours = _rel(e_logits, ref_logits), _rel(logits, ref_logits)
    assert e_ours <= 4 * U and e_ours <= 1.5 * e_eager, (e_ours, e_eager)
    have = sorted(n for n, g in ref_grads.items() if g is not None)
    assert have == sorted(n for n, g in grads.items() if g is not None)
    assert not any(".experts." in n for n in have) and any("embed" in n for n in have)
    assert any(n.endswith(("gate.weight", "router.weight")) for n in have)
    for n in have:
        assert grads[n].dtype == e_grads[n].dtype, n    # bf16 (DeepSeek keeps its router f32)
        assert _rel(grads[n], ref_grads[n]) <= 16 * U, n
    # all gradients together, each scaled by its own reference's norm (they differ by decades)
    def flat(g):
        return torch.cat([g[n].double().flatten() / ref_grads[n].double().norm() for n in have])
    e_eager, e_ours = _rel(flat(e_grads), flat(ref_grads)), _rel(flat(grads), flat(ref_grads))
    assert e_ours <= 1.5 * e_eager, (e_ours, e_eager)


def test_bf16_experts_are_read_in_place_and_frozen(monkeypatch):
    """The bf16 parameters reach fastmoe_nb as bf16 weights over their own memory (no copy),
    the activations as float32; with the experts requiring grad (from_config's default) the
    forward runs as without grad, and backward is a clear error until they are frozen."""
    import fastmoe_nb.interop.pytorch as pytorch   # noqa: PLC0415
    from fastmoe_nb.formats import QuantizedWeights  # noqa: PLC0415

    _, _, ours = _bf16_trio("mixtral")
    seen = []
    real = pytorch.routed_experts
    monkeypatch.setattr(pytorch, "routed_experts",
                        lambda *a, **kw: (seen.append(a), real(*a, **kw))[1])
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ours(input_ids=ids).logits
    out = ours(input_ids=ids, labels=ids)                # inference without no_grad
    assert out.logits.grad_fn is not None and torch.equal(out.logits, want)
    modules = _experts_modules(ours)
    assert len(seen) == 2 * len(modules)
    for (x, _, weights, w1, w2, *_), m in zip(seen, modules * 2):
        assert x.dtype == np.float32 and weights.dtype == np.float32
        for q, p in ((w1, m.gate_up_proj), (w2, m.down_proj)):
            assert isinstance(q, QuantizedWeights) and q.format == "bf16"
            assert q.shape == tuple(p.shape)
            assert np.shares_memory(q.blocks, p.detach().view(torch.int16).numpy())
    with pytest.raises(RuntimeError, match=r"w1, w2: fastmoe_nb's bfloat16 experts are frozen"
                                           r".*requires_grad_\(False\)"):
        out.loss.backward()
    ours.zero_grad()
    _freeze_experts(ours)
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(m.gate_up_proj.grad is None and m.down_proj.grad is None for m in modules)
    assert ours.model.embed_tokens.weight.grad is not None
    assert ours.model.layers[0].mlp.gate.weight.grad is not None


def test_float16_model_is_a_clear_type_error():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _config("mixtral"), experts_implementation="fastmoe_nb", dtype=torch.float16)
    with pytest.raises(TypeError, match="MixtralExperts holds float16 weights.*"
                                        "dtype=torch.bfloat16"):
        model(input_ids=torch.zeros((1, 3), dtype=torch.long))
