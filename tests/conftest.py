"""Fixtures shared by the tests; helper functions live in helpers.py."""
import numba
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def one_thread():
    """Gradient checks call tiny kernels thousands of times: one thread avoids the parallel
    launch cost (results are the same for any thread count, see
    test_moe.py::test_moe_backward_is_deterministic_for_any_thread_count)."""
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(n)
