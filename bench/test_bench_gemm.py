"""pytest-benchmark suite of the grouped GEMM family (not part of the test run):

    python -m pytest bench/test_bench_gemm.py --benchmark-columns=median,ops

Shapes are the first expert GEMM of the CPU-performance presets (xs (N, d) @ w1 (E, d, 2h)),
uniform and Zipf-skewed routing; weights are packed once (pack_weights), as in training or
serving between weight updates.
"""
import numpy as np
import pytest

import fastmoe_nb as fm
from fastmoe_nb import baselines as bl
from fastmoe_nb.presets import CPU_PERF_PRESETS, get_preset

CASES = [(name, None) for name in CPU_PERF_PRESETS] + [
    (name, 1.2) for name in CPU_PERF_PRESETS if get_preset(name).tokens > 64]


def operands(name, zipf):
    p = get_preset(name)
    inp = bl.layer_inputs(p, zipf=zipf)
    r = fm.softmax_topk(inp["x"] @ inp["router_w"], p.k)
    plan = fm.make_plan(r.experts, p.experts)
    return p, fm.permute(inp["x"], plan), inp["w1"], plan.offsets


@pytest.mark.parametrize("name,zipf", CASES)
def test_grouped_gemm(benchmark, name, zipf):
    p, xs, w1, off = operands(name, zipf)
    pw = fm.pack_weights(w1, swiglu=True)
    benchmark.extra_info["gflop"] = 2.0 * xs.shape[0] * p.d * p.h1 / 1e9
    out = benchmark(fm.grouped_gemm, xs, pw, off)
    assert out.shape == (xs.shape[0], p.h1)


@pytest.mark.parametrize("name,zipf", CASES)
def test_numpy_per_expert_loop(benchmark, name, zipf):
    p, xs, w1, off = operands(name, zipf)
    benchmark(bl.numpy_grouped_gemm, xs, w1, off)


@pytest.mark.parametrize("name", CPU_PERF_PRESETS)
def test_dense_matmul_equal_flops(benchmark, name):
    p = get_preset(name)
    a, b = bl.dense_operands(p.tokens * p.k, p.d, p.h1)
    benchmark(np.matmul, a, b)


@pytest.mark.parametrize("name", ["mixtral-mini", "fine-128"])
def test_pack_weights(benchmark, name):
    p = get_preset(name)
    benchmark(fm.pack_weights, bl.layer_inputs(p)["w1"], False, True)


@pytest.mark.parametrize("name", ["deepseek-mini", "fine-128"])
def test_grouped_gemm_backward(benchmark, name):
    p, xs, w1, off = operands(name, None)
    dy = np.ones((xs.shape[0], p.h1), np.float32)
    benchmark(fm.grouped_gemm_backward, dy, xs, w1, off)
