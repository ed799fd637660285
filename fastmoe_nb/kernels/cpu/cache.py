"""Numba's disk cache for kernels a factory makes (closures over other jitted functions).

Numba keys a cached closure by the pickle of its cells, and a dispatcher pickles with an id
made anew in each process: a factory's kernels (kernels/cpu/quant.py makes one per weight
format) would miss the cache in every new process and compile again. `cached` gives such a
kernel a key built from what its cells are: a jitted or Python function by its module, name,
code and, recursively, its own cells (an @intrinsic by its defining function); any other value
by its pickle.
"""
from __future__ import annotations

import hashlib
import pickle
import types

from numba.core.caching import FunctionCache, NullCache
from numba.core.dispatcher import Dispatcher
from numba.core.extending import _Intrinsic


def _code(c):
    # a code object by its bytecode, names and constants (marshal.dumps would also write the
    # state Python's adaptive interpreter leaves in a function that has run: an @intrinsic's)
    return (c.co_code, c.co_names, tuple(_code(k) if isinstance(k, types.CodeType) else k
                                         for k in c.co_consts))


def describe(x):
    """A value that pickles the same in every process for the same closure contents."""
    if isinstance(x, Dispatcher):
        x = x.py_func
    if isinstance(x, _Intrinsic):             # by the function that defines it
        x = x._defn
    if isinstance(x, types.FunctionType):
        return ("function", x.__module__, x.__qualname__, _code(x.__code__),
                tuple(describe(c.cell_contents) for c in x.__closure__ or ()))
    if isinstance(x, (tuple, list)):
        return (type(x).__name__,) + tuple(describe(v) for v in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((describe(k), describe(v)) for k, v in x.items())
    return x


class _ClosureCache(FunctionCache):
    """Numba's function cache, its index keyed by `describe` of the closure's cells."""

    def _index_key(self, sig, codegen):
        f = self._py_func
        cells = tuple(c.cell_contents for c in f.__closure__ or ())
        digest = hashlib.sha256(pickle.dumps(describe(cells), protocol=4)).hexdigest()
        return (sig, codegen.magic_tuple(),
                (hashlib.sha256(f.__code__.co_code).hexdigest(), digest))


def cached(dispatcher):
    """dispatcher (made with njit(cache=True) inside a factory), cached on disk under a key
    that is the same in every process."""
    if not isinstance(dispatcher, Dispatcher) or isinstance(dispatcher._cache, NullCache):
        raise TypeError("cached: expected a dispatcher made with njit(cache=True)")
    dispatcher._cache = _ClosureCache(dispatcher.py_func)
    return dispatcher
