"""The whole layer on the CPU-performance presets, through the benchmark harness (not part of
the test run):

    python -m pytest bench/test_bench_moe.py -s [--bench-repeat 5] [--bench-threads 2]

moe_forward, uniform and Zipf-skewed routing, checked against reference.py, then timed beside
the expert MLPs alone on weights packed once, the NumPy per-expert loop and, when torch and
transformers are installed, HF's Mixtral block (eager and grouped_mm).
"""
import pytest

from fastmoe_nb.presets import CPU_PERF_PRESETS, get_preset

CASES = [(name, None) for name in CPU_PERF_PRESETS] + [
    (name, 1.2) for name in CPU_PERF_PRESETS if get_preset(name).tokens > 64]


@pytest.mark.parametrize("name,zipf", CASES)
def test_moe_forward(bench_case, name, zipf):
    bench_case("layer", name, zipf, ["experts-packed", "numpy", "hf-eager", "hf-grouped_mm"])
