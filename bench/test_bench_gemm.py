"""The grouped GEMM family on the CPU-performance presets, through the benchmark harness (not
part of the test run):

    python -m pytest bench/test_bench_gemm.py -s [--bench-repeat 5] [--bench-threads 2]

Shapes are the first expert GEMM of the presets (xs (N, d) @ w1 (E, d, 2h)), uniform and
Zipf-skewed routing, each checked against reference.py, then timed beside the Numba kernel on
weights packed once (pack_weights), a NumPy per-expert loop and a dense np.matmul of equal
FLOPs; packing itself and the backward on two presets.
"""
import pytest

from fastmoe_nb.presets import CPU_PERF_PRESETS, get_preset

CASES = [(name, None) for name in CPU_PERF_PRESETS] + [
    (name, 1.2) for name in CPU_PERF_PRESETS if get_preset(name).tokens > 64]


@pytest.mark.parametrize("name,zipf", CASES)
def test_grouped_gemm(bench_case, name, zipf):
    bench_case("grouped_gemm", name, zipf, ["packed", "numpy", "dense"])


@pytest.mark.parametrize("name", ["mixtral-mini", "fine-128"])
def test_pack_weights(bench_case, name):
    bench_case("pack_weights", name, None, ["copy"])


@pytest.mark.parametrize("name", ["deepseek-mini", "fine-128"])
def test_grouped_gemm_backward(bench_case, name):
    bench_case("grouped_gemm_backward", name, None, ["dense"])
