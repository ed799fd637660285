"""fastmoe_nb.parallel: expert parallelism across processes with MPI (mpi4py).

E experts are split over the P ranks of a communicator; each rank routes its own tokens and
exchanges rows with an Alltoall of counts and an Alltoallv of rows per direction::

    mpiexec -n 4 python train.py

    from fastmoe_nb import parallel as ep
    w1_local = ep.shard_experts(w1, comm)                     # (E/P, d, 2h) of (E, d, 2h)
    y, ctx = ep.ep_moe_forward(x, router_w, w1_local, w2_local, k=2, comm=comm,
                               return_context=True)
    dx, grads = ep.ep_moe_backward(dy, ctx)

mpi4py is imported on first use (pip install "fastmoe-nb[mpi]").
"""
from .moe import (EPContext, allreduce_grads, capped_plan, ep_moe_backward, ep_moe_forward,
                  exchange_plan, expert_range, shard_experts)

__all__ = ["EPContext", "allreduce_grads", "capped_plan", "ep_moe_backward", "ep_moe_forward",
           "exchange_plan", "expert_range", "shard_experts"]
