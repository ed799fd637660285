"""Hash routing (Roller et al. 2021, "Hash Layers"): a fixed map from token id to expert, no
router parameters, nothing to learn or balance."""
from __future__ import annotations

import numpy as np

from .. import errors as chk
from ..types import Routing
from . import _checks


def balanced_hash_table(vocab_size, num_experts, k=1, seed=0):
    """A random, balanced token-id -> expert table: (V,) int32 for k = 1, else (V, k) with k
    distinct experts per id. The ids are shuffled with numpy's default_rng(seed) and dealt to
    the experts in turn, so every expert gets floor or ceil of V / E ids (per column)."""
    V = chk.check_int("vocab_size", vocab_size, 1, None, what="a positive integer")
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    k = chk.check_int("k", k, 1, E, what=f"1..E = 1..{E}")
    seed = chk.check_int("seed", seed, 0, None, what="a non-negative integer")
    perm = np.random.default_rng(seed).permutation(V)
    table = np.empty((V, k), np.int32)
    table[perm] = (np.arange(V)[:, None] + np.arange(k)[None, :]) % E
    return table[:, 0].copy() if k == 1 else table


def hash_routing(token_ids, table, num_experts, dtype=np.float32):
    """token_ids: (T,) ints in 0..V-1, table: (V,) or (V, k) expert ids
    -> Routing(weights (T, k) = 1/k, experts (T, k) int32 = table[token_ids]).

    The weights are constants (no gradient); with k > 1 the experts' outputs are averaged."""
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    table = chk.check_int_array("table", _checks.host("table", table))
    if table.ndim not in (1, 2) or table.shape[0] < 1:
        raise ValueError(f"table: expected shape (V,) or (V, k) with V >= 1, got "
                         f"{tuple(table.shape)}")
    tab = table.reshape(table.shape[0], -1)
    _checks.experts("table", tab, tab.shape[0], E)
    ids = chk.check_int_array("token_ids", _checks.host("token_ids", token_ids), ndim=1)
    V = tab.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"token_ids: expected ids in 0..V-1 = 0..{V - 1} (the table's rows), "
                         f"found {bad}")
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    k = tab.shape[1]
    experts = np.ascontiguousarray(tab[ids], dtype=np.int32)
    return Routing(np.full((ids.shape[0], k), 1.0 / k, dt), experts)
