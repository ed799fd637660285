"""The small types every op shares: Routing, Plan, PackedWeights, MoEContext.

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


class PackedWeights:
    """Expert weights packed once into the CPU kernel's panels: pass it instead of w.

    A snapshot, not a view: after an in-place update of w, call pack_weights again (nothing
    is cached behind the caller's back, so stale panels can never be served silently).
    panels: (E, P, K, NR); shape/trans_w: those of the w it was packed from; swiglu: panels
    interleave the [gate | up] halves so the activation can run in the GEMM's epilogue.
    """

    def __init__(self, panels, shape, trans_w, swiglu):
        self.panels, self.shape, self.trans_w, self.swiglu = panels, shape, trans_w, swiglu

    @property
    def dtype(self):
        return self.panels.dtype

    @property
    def num_experts(self):
        return self.shape[0]

    @property
    def in_features(self):
        """K, the depth of the product."""
        return self.shape[2] if self.trans_w else self.shape[1]

    @property
    def out_features(self):
        """M, the columns of the product."""
        return self.shape[1] if self.trans_w else self.shape[2]

    def __repr__(self):
        return (f"PackedWeights(E={self.num_experts}, K={self.in_features}, "
                f"M={self.out_features}, dtype={self.dtype}, trans_w={self.trans_w}, "
                f"swiglu={self.swiglu})")


@dataclass
class MoEContext:
    """What moe_forward(..., return_context=True) hands back beside y.

    It holds the routing, the plan, the per-expert counts and every activation the backward
    pass needs (see moe_backward). Arrays are those of the forward's backend. layer is the
    validated layer (fastmoe_nb.checks.Layer: weights and options), router_state what the
    router keeps for its backward.
    """

    x: Any                     # (T, d)       layer input
    logits: Any                # (T, E)       router logits x @ router_w [+ router_b]
    routing: Routing           # (T, k) weights and experts
    plan: Plan
    xs: Any                    # (N, d)       permuted tokens
    h_pre: Any                 # (N, h | 2h)  first expert GEMM, before the activation
    h_act: Any                 # (N, h)       after the activation
    ys: Any                    # (N, d)       expert outputs, before the routing weights
    layer: Any = None          # checks.Layer
    router_state: dict = field(default_factory=dict)
    shared: Optional[dict] = None                # shared-expert activations, when present

    @property
    def counts(self):
        """(E,) tokens kept per expert."""
        return self.plan.counts

    @property
    def params(self):
        """The weights and options of the call as one dict, as 0.1.0 kept them (an alias for
        one release; read ctx.layer instead)."""
        ly = self.layer
        return dict(router_w=ly.router_w, w1=ly.w1, w2=ly.w2, k=ly.k,
                    activation=ly.activation, router=ly.router, capacity=ly.capacity,
                    trans_w=ly.trans_w, shared_w1=ly.shared_w1, shared_w2=ly.shared_w2,
                    shared_gate_w=ly.shared_gate_w, router_b=ly.router_b,
                    shared_gate_shape=ly.shared_gate_shape, router_state=self.router_state,
                    **ly.router_options)
