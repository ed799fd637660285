"""The small result types every op shares: Routing, Plan, MoEContext.

Shapes (DESIGN.md vocabulary): T tokens, k experts per token, E experts, N routed rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import numpy as np


class Routing(NamedTuple):
    """What a router chose.

    weights: (T, k) float   -- the gate value of each chosen expert (dtype of the logits)
    experts: (T, k) int32   -- the chosen expert ids, best first
    """

    weights: Any
    experts: Any


class Plan(NamedTuple):
    """A stable counting sort of the T*k assignments by expert (see make_plan).

    rows:      (N,) int32    flat assignment ids t*k + j, in expert order; within an expert in
                             increasing id (token order, then choice order)
    offsets:   (E+1,) int64  expert e owns rows[offsets[e]:offsets[e+1]]
    counts:    (E,) int64    kept assignments per expert (offsets' differences)
    slots:     (T, k) int32  where assignment (t, j) sits in rows, or -1 if it was dropped
    dropped:   (E,) int64    assignments each expert dropped because of capacity
    capacity:  the per-expert capacity used, or None (dropless)
    """

    rows: Any
    offsets: Any
    counts: Any
    slots: Any
    dropped: Any
    capacity: Optional[int]

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slots.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.slots.shape[1])

    @property
    def num_rows(self) -> int:
        """N: routed rows = T*k minus dropped assignments."""
        return int(self.rows.shape[0])

    @property
    def num_dropped(self) -> int:
        d = self.dropped
        if hasattr(d, "copy_to_host"):  # a Numba device array (E values)
            d = d.copy_to_host()
        return int(np.asarray(d).sum())


@dataclass
class MoEContext:
    """What moe_forward(..., return_context=True) hands back beside y.

    It holds the routing, the plan, the per-expert counts and every activation the backward
    pass needs (see moe_backward). Arrays are those of the forward's backend.
    """

    x: Any                     # (T, d)       layer input
    logits: Any                # (T, E)       router logits x @ router_w
    routing: Routing           # (T, k) weights and experts
    plan: Plan
    xs: Any                    # (N, d)       permuted tokens
    h_pre: Any                 # (N, h | 2h)  first expert GEMM, before the activation
    h_act: Any                 # (N, h)       after the activation
    ys: Any                    # (N, d)       expert outputs, before the routing weights
    params: dict = field(default_factory=dict)   # the weights and options of the call
    shared: Optional[dict] = None                # shared-expert activations, when present

    @property
    def counts(self):
        """(E,) tokens kept per expert."""
        return self.plan.counts
