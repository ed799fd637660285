"""Fixtures shared by the tests; helper functions live in helpers.py."""
import numba
import numpy as np
import pytest


def pytest_collection_modifyitems(items):
    # tests marked `background` wait for subprocesses their module starts: they run last, and
    # pytest_collection_finish starts the subprocesses, so that they run beside the others
    late = [i for i in items if i.get_closest_marker("background")]
    items[:] = [i for i in items if not i.get_closest_marker("background")] + late


def pytest_collection_finish(session):
    # the modules of the selected `background` tests start their subprocesses now
    if session.config.option.collectonly:
        return
    for mod in {i.module for i in session.items if i.get_closest_marker("background")}:
        mod.start_background()


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
