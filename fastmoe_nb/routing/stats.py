"""Routing statistics: how evenly a router spreads tokens over experts, and whether it is
collapsing onto a few of them.

``routing_stats`` summarizes one forward; ``RoutingMonitor`` keeps a window of them and flags
collapse: an expert whose share of the assignments stays below a threshold for ``window``
consecutive steps.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

from .. import errors as chk


class RoutingStats(NamedTuple):
    """One forward's routing, summarized (E experts, T tokens, k choices each).

    tokens_per_expert: (E,) int64  kept assignments per expert
    load_cv:           std / mean of tokens_per_expert (0 = perfectly even; sqrt(E-1) = all
                       on one expert)
    max_load:          max / mean of tokens_per_expert (1 = even, E = all on one expert)
    dropped_fraction:  dropped assignments / (T*k)
    entropy:           mean over tokens of the router distribution's entropy, in nats
                       (log E = uniform), or NaN when no probabilities were given
    """

    tokens_per_expert: np.ndarray
    load_cv: float
    max_load: float
    dropped_fraction: float
    entropy: float

    @property
    def shares(self):
        """(E,) each expert's fraction of the kept assignments (zeros when none were kept)."""
        c = self.tokens_per_expert.astype(np.float64)
        total = c.sum()
        return c / total if total else c


def load_cv(counts):
    """Coefficient of variation std / mean of (E,) loads (population std; 0 for no load)."""
    c = np.asarray(counts, dtype=np.float64)
    m = c.mean() if c.size else 0.0
    return float(c.std() / m) if m > 0 else 0.0


def router_entropy(probs):
    """probs: (T, E) rows summing to 1 -> mean_t -sum_e p log p (nats; 0 log 0 = 0)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[0] == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


def routing_stats(experts, num_experts, probs=None, dropped=None):
    """Summarize one routing.

    experts: (T, k) int expert ids; num_experts: E; probs: (T, E) router probabilities or
    None; dropped: (E,) assignments each expert dropped for capacity (Plan.dropped) or None
    -> RoutingStats. tokens_per_expert counts the kept assignments (wanted minus dropped).
    """
    E = chk.check_int("num_experts", num_experts, 1, None, what="a positive integer")
    experts = chk.check_int_array("experts", np.asarray(experts), ndim=2)
    if experts.size and (experts.min() < 0 or experts.max() >= E):
        raise ValueError(f"experts: expected expert ids in 0..{E - 1}, found "
                         f"{experts.min() if experts.min() < 0 else experts.max()}")
    T, k = experts.shape
    if probs is not None:
        probs = chk.check_float("probs", np.asarray(probs), shape=(T, E))
    wanted = np.bincount(experts.ravel().astype(np.int64), minlength=E)
    if dropped is None:
        dropped = np.zeros(E, np.int64)
    else:
        dropped = chk.check_int_array("dropped", np.asarray(dropped), shape=(E,))
        if np.any(dropped < 0) or np.any(dropped > wanted):
            raise ValueError("dropped: expected 0 <= dropped[e] <= assignments to expert e")
    counts = (wanted - dropped).astype(np.int64)
    mean = counts.mean()
    return RoutingStats(
        tokens_per_expert=counts,
        load_cv=load_cv(counts),
        max_load=float(counts.max() / mean) if mean > 0 else 0.0,
        dropped_fraction=float(dropped.sum() / (T * k)) if T * k else 0.0,
        entropy=router_entropy(probs) if probs is not None else float("nan"),
    )


class RoutingMonitor:
    """Routing statistics over training steps, and a collapse flag.

    update(stats) records one step. An expert is *starved* at a step when its share of the
    kept assignments is below ``threshold / E`` (threshold is a fraction of the even share
    1/E); the router has *collapsed* when some expert has been starved for the last
    ``window`` steps in a row. ``history`` keeps every step's RoutingStats.
    """

    def __init__(self, num_experts, window=50, threshold=0.1):
        self.num_experts = chk.check_int("num_experts", num_experts, 1, None,
                                         what="a positive integer")
        self.window = chk.check_int("window", window, 1, None, what="a positive integer")
        self.threshold = chk.check_real("threshold", threshold, positive=True)
        self.history = []
        self._starved = deque(maxlen=self.window)

    def update(self, stats):
        if not isinstance(stats, RoutingStats):
            raise TypeError(f"stats: expected RoutingStats, got {type(stats).__name__}")
        if stats.tokens_per_expert.shape != (self.num_experts,):
            raise ValueError(f"stats: expected {self.num_experts} experts, got "
                             f"{stats.tokens_per_expert.shape[0]}")
        self.history.append(stats)
        if stats.tokens_per_expert.sum() > 0:   # a step with no token says nothing
            self._starved.append(stats.shares < self.threshold / self.num_experts)
        return self.collapsed

    @property
    def starved_experts(self):
        """Experts starved at every one of the last `window` steps (empty before that)."""
        if len(self._starved) < self.window:
            return []
        return [int(e) for e in np.flatnonzero(np.logical_and.reduce(list(self._starved)))]

    @property
    def collapsed(self):
        return bool(self.starved_experts)

    def mean(self, field, last=None):
        """The mean of one RoutingStats field over the last `last` steps (all by default): a
        float, or an (E,) array for tokens_per_expert."""
        h = self.history[-last:] if last else self.history
        if not h:
            return float("nan")
        m = np.mean([getattr(s, field) for s in h], axis=0)
        return float(m) if np.ndim(m) == 0 else m
