"""fastmoe_nb.parallel: expert parallelism across processes with MPI (mpi4py).

E experts are split over the P ranks of a communicator; each rank routes its own tokens and
exchanges rows with an Alltoall of counts and an Alltoallv of rows per direction::

    mpiexec -n 4 python train.py

    from fastmoe_nb import parallel as ep
    w1_local = ep.shard_experts(w1, comm)                     # (E/P, d, 2h) of (E, d, 2h)
    y, ctx = ep.ep_moe_forward(x, router_w, w1_local, w2_local, k=2, comm=comm,
                               return_context=True)
    dx, grads = ep.ep_moe_backward(dy, ctx)

    layer = ep.ExpertParallelMoE(d, h, num_experts=8, k=2, comm=comm, rng=0)   # nn form
    ...; model.backward(dlogits); ep.sync_gradients(model, comm); opt.step()

mpi4py is imported on first use (pip install "fastmoe-nb[mpi]").
"""
from .moe import (ROUTERS, EPContext, allreduce_grads, capped_plan, ep_moe_backward, ep_moe_forward,
                  exchange_plan, expert_range, shard_experts)
from .nn import (ExpertParallelMoE, clip_grad_norm, global_grad_norm, split_parameters,
                 sync_gradients)

__all__ = ["ROUTERS", "EPContext", "ExpertParallelMoE", "allreduce_grads", "capped_plan",
           "clip_grad_norm", "ep_moe_backward", "ep_moe_forward", "exchange_plan",
           "expert_range", "global_grad_norm", "shard_experts", "split_parameters",
           "sync_gradients"]
