"""pytest-benchmark suite of the whole layer (not part of the test run):

    python -m pytest bench/test_bench_moe.py --benchmark-columns=median,ops

moe_forward on the CPU-performance presets (uniform and Zipf-skewed routing), next to the
NumPy per-expert loop and, when torch and transformers are installed, HF's Mixtral block.
"""
import pytest

import fastmoe_nb as fm
from fastmoe_nb import baselines as bl
from fastmoe_nb.presets import CPU_PERF_PRESETS, get_preset

CASES = [(name, None) for name in CPU_PERF_PRESETS] + [
    (name, 1.2) for name in CPU_PERF_PRESETS if get_preset(name).tokens > 64]


def layer(name, zipf):
    p = get_preset(name)
    inp = bl.layer_inputs(p, zipf=zipf)
    return p, inp, bl.layer_kwargs(p, inp)


@pytest.mark.parametrize("name,zipf", CASES)
def test_moe_forward(benchmark, name, zipf):
    p, inp, kw = layer(name, zipf)
    y = benchmark(fm.moe_forward, inp["x"], inp["router_w"], inp["w1"], inp["w2"], **kw)
    assert y.shape == (p.tokens, p.d)


@pytest.mark.parametrize("name,zipf", CASES)
def test_experts_forward_packed(benchmark, name, zipf):
    """The expert MLPs with weights packed once (routing and dispatch excluded)."""
    p, inp, kw = layer(name, zipf)
    r = fm.softmax_topk(inp["x"] @ inp["router_w"], p.k)
    plan = fm.make_plan(r.experts, p.experts)
    xs = fm.permute(inp["x"], plan)
    w1, w2 = fm.pack_weights(inp["w1"], swiglu=True), fm.pack_weights(inp["w2"])
    benchmark(fm.experts_forward, xs, w1, w2, plan.offsets, p.activation)


@pytest.mark.parametrize("name,zipf", CASES)
def test_numpy_moe_forward(benchmark, name, zipf):
    p, inp, kw = layer(name, zipf)
    benchmark(bl.numpy_moe_forward, inp["x"], inp["router_w"], inp["w1"], inp["w2"], **kw)


@pytest.mark.parametrize("impl", bl.HF_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", CPU_PERF_PRESETS)
def test_hf_mixtral_block(benchmark, name, impl):
    ok, why = bl.hf_status()
    if not ok:
        pytest.skip(why)
    p, inp, _ = layer(name, None)
    fwd, _ = bl.hf_mixtral_block(inp, p.k, impl)
    benchmark(fwd)
