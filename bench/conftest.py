"""What the pytest suites of bench/ share: one fixture, bench_case, that builds a case of the
benchmark harness (fastmoe_nb.benchmark), checks it against reference.py, times it with its
baselines in interleaved rounds, prints the table (pytest -s shows it), records the result row
as the test's "result" property (--junitxml keeps it) and fails when the check fails."""
import json

import pytest

from fastmoe_nb import baselines as bl
from fastmoe_nb import benchmark as bm
from fastmoe_nb.presets import get_preset


def pytest_addoption(parser):
    parser.addoption("--bench-repeat", type=int, default=5, help="interleaved rounds")
    parser.addoption("--bench-threads", type=int, default=None,
                     help="numba and BLAS threads (default: as they are)")


@pytest.fixture
def bench_case(request, record_property):
    def run(op, preset, zipf=None, baselines=()):
        with bl.thread_limits(request.config.getoption("--bench-threads")):
            case = bm.make_case(op, get_preset(preset), "float32", bm.Host(), 0, zipf, 1024)
            name = f"{preset}{f' zipf{zipf}' if zipf else ''} {op}"
            (row,) = bm.run_cases({name: case}, request.config.getoption("--bench-repeat"),
                                  list(baselines))
        print()
        bm.table([row])
        record_property("result", json.dumps(row))
        assert row["correct"], row["check"]
        return row
    return run
