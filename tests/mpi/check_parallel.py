"""Run under mpiexec (-n 2 or -n 4) by tests/test_parallel.py: the expert-parallel layer on P
ranks against the single-process layer on the same global batch, collective validation, and
the nn form. Every rank checks its own part; rank 0 prints "ALL OK <checks>" or the failures
of every rank and the script exits 1."""
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import fastmoe_nb as fm
from fastmoe_nb import parallel as ep
from fastmoe_nb.parallel.comm import mpi

MPI = mpi()
comm = MPI.COMM_WORLD
P, rank = comm.Get_size(), comm.Get_rank()
failures, checks = [], [0]
stats = {"bitwise": 0, "close": 0}


def check(name, ok, detail=""):
    checks[0] += 1
    if not ok:
        failures.append(f"rank {rank}: {name} {detail}")


def same(name, got, want):
    """Bitwise equality (index outputs, and floats whose summation order is the same)."""
    got, want = np.asarray(got), np.asarray(want)
    ok = got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)
    err = "" if ok or got.shape != want.shape else np.abs(got.astype(float) - want).max()
    check(name, ok, f"not bitwise equal: shapes {got.shape} {want.shape}, max err {err}")


def close(name, got, want, rtol=1e-6):
    """Relative to the largest |want| (the summation order differs: an Allreduce)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return check(name, False, f"shape/dtype {got.shape} {got.dtype} vs {want.shape} "
                                  f"{want.dtype}")
    if want.size == 0:
        return check(name, True)
    err = np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30)
    check(name, err <= rtol, f"relative error {err:.2e} > {rtol:.0e}")


def global_case(seed, tokens, d, h, E, dtype, swiglu=True, shared=False, gate=False,
                sigmoid=False, exact=False):
    """The same global batch and full weights on every rank; tokens: T_r of each rank.
    exact: x and router_w on a coarse grid (multiples of 1/4 and 1/64), so that the router
    GEMM's sums are exact whatever BLAS's summation order."""
    rng = np.random.default_rng(seed)
    T = sum(tokens)
    H1 = 2 * h if swiglu else h
    f = lambda *s, sc=1.0: (rng.standard_normal(s) * sc).astype(dtype)  # noqa: E731
    w = dict(x=f(T, d), router_w=f(d, E, sc=d ** -0.5), w1=f(E, d, H1, sc=d ** -0.5),
             w2=f(E, h, d, sc=h ** -0.5), dy=f(T, d))
    if exact:
        w["x"] = (rng.integers(-4, 5, (T, d)) / 4).astype(dtype)
        w["router_w"] = (rng.integers(-8, 9, (d, E)) / 64).astype(dtype)
    if shared:
        w.update(shared_w1=f(d, H1, sc=d ** -0.5), shared_w2=f(h, d, sc=h ** -0.5))
    if gate:
        w["shared_gate_w"] = f(d, sc=d ** -0.5)
    if sigmoid:
        w["bias"] = f(E, sc=0.1)
    return w


def run_case(name, tokens, d, h, E, k, dtype=np.float32, activation="swiglu", trans_w=False,
             capacity=None, shared=False, gate=False, sigmoid=None, seed=0, exact=False):
    tokens = tokens[:P]
    w = global_case(seed, tokens, d, h, E, dtype, activation == "swiglu", shared, gate,
                    sigmoid is not None, exact)
    opts = dict(k=k, activation=activation, capacity=capacity, trans_w=trans_w)
    if sigmoid is not None:
        opts.update(router="sigmoid_topk", bias=w["bias"], **sigmoid)
    w1, w2 = w["w1"], w["w2"]
    if trans_w:
        w1, w2 = (np.ascontiguousarray(a.transpose(0, 2, 1)) for a in (w1, w2))
    sh = {n: w[n] for n in ("shared_w1", "shared_w2", "shared_gate_w") if n in w}
    # the single-process layer on the concatenated batch
    y_ref, ctx = fm.moe_forward(w["x"], w["router_w"], w1, w2, return_context=True, **sh,
                                **opts)
    dx_ref, g_ref = fm.moe_backward(w["dy"], ctx)
    # this rank's tokens and experts
    lo = sum(tokens[:rank])
    mine = slice(lo, lo + tokens[rank])
    x, dy = w["x"][mine].copy(), w["dy"][mine].copy()
    x0 = x.copy()
    w1l, w2l = ep.shard_experts(w1, comm), ep.shard_experts(w2, comm)
    y, ectx = ep.ep_moe_forward(x, w["router_w"], w1l, w2l, comm=comm, return_context=True,
                                **sh, **opts)
    dx, g = ep.ep_moe_backward(dy, ectx)
    same(f"{name}: x unchanged", x, x0)
    same(f"{name}: experts", ectx.routing.experts, ctx.routing.experts[mine])
    # Router logits are one FMA chain each (ops/routing.py: router_logits), the same for a
    # (T_r, d) block as for the (T, d) batch: bitwise on every rank. The shared expert's dense
    # BLAS products may sum a (T_r, d) block differently than the batch (a 1-row product takes
    # its gemv path): with one, everything downstream is compared at 1e-6; without, the
    # exchange changes no summation: bitwise.
    logits_same = comm.allreduce(bool(np.array_equal(ectx.logits, ctx.logits[mine])),
                                 op=MPI.LAND)
    check(f"{name}: router logits bitwise on every rank", logits_same)
    bitwise = logits_same and not shared
    alike = same if bitwise else close
    stats["bitwise" if bitwise else "close"] += 1
    alike(f"{name}: y", y, y_ref[mine])
    same(f"{name}: dropped (global)", ectx.dropped, ctx.plan.dropped)
    e0, e1 = ep.expert_range(E, comm)
    same(f"{name}: expert counts", ectx.counts, ctx.plan.counts[e0:e1])
    alike(f"{name}: dw1", g["w1"], g_ref["w1"][e0:e1])
    alike(f"{name}: dw2", g["w2"], g_ref["w2"][e0:e1])
    close(f"{name}: dx", dx, dx_ref[mine])
    for n in g_ref:
        if n not in ("w1", "w2"):
            close(f"{name}: d{n}", g[n], g_ref[n])
    same(f"{name}: grad keys", sorted(g), sorted(g_ref))
    # reduce="mean" and None
    _, gm = ep.ep_moe_backward(dy, ectx, reduce="mean")
    close(f"{name}: mean dw1", gm["w1"], g["w1"] / dtype(P))
    close(f"{name}: mean drouter_w", gm["router_w"], g["router_w"] / dtype(P))
    _, gn = ep.ep_moe_backward(dy, ectx, reduce=None)
    close(f"{name}: unreduced drouter_w", ep.allreduce_grads(comm, {"r": gn["router_w"]})["r"],
          g["router_w"])


def expect_error(name, fn, cls, words):
    """fn() must raise cls on this rank, its message holding every word."""
    try:
        fn()
    except cls as e:
        check(name, all(wd in str(e) for wd in words), f"message {str(e)!r} lacks {words}")
    except Exception as e:  # noqa: BLE001
        check(name, False, f"raised {type(e).__name__}: {e}")
    else:
        check(name, False, "did not raise")


def validation_cases():
    d, h, E = 8, 4, 2 * P
    w = global_case(1, [3] * P, d, h, E, np.float32)
    x = w["x"][:3]
    w1l, w2l = ep.shard_experts(w["w1"], comm), ep.shard_experts(w["w2"], comm)
    call = lambda **kw: ep.ep_moe_forward(**{**dict(x=x, router_w=w["router_w"], w1=w1l,  # noqa
                                                     w2=w2l, k=2, comm=comm), **kw})
    # E not divisible by P: every rank says so
    bad_E = np.zeros((d, P + 1), np.float32)
    expect_error("E not divisible", lambda: call(router_w=bad_E), ValueError,
                 ["router_w", "divisible", str(P)])
    # one rank passes a float64 x: a TypeError there, and on every other rank
    xr = x.astype(np.float64) if rank == 1 else x
    expect_error("dtype on one rank", lambda: call(x=xr), TypeError,
                 ["x"] if rank == 1 else ["rank 1", "x"])
    # a width differing between ranks, each rank consistent on its own
    dd = d + 1 if rank == P - 1 else d
    wd = global_case(2, [3], dd, h, E, np.float32)
    expect_error("d differs between ranks",
                 lambda: call(x=wd["x"], router_w=wd["router_w"],
                              w1=ep.shard_experts(wd["w1"], comm),
                              w2=ep.shard_experts(wd["w2"], comm)), ValueError,
                 ["same", "d = "])
    # an option differing between ranks
    expect_error("k differs", lambda: call(k=1 + (rank == 0)), ValueError, ["k = "])
    expect_error("capacity differs", lambda: call(capacity=3 if rank else None), ValueError,
                 ["capacity"])
    # non-finite logits on one rank
    xn = x.copy()
    if rank == 0:
        xn[0, 0] = np.nan
    expect_error("NaN on one rank", lambda: call(x=xn), ValueError,
                 ["finite"] if rank == 0 else ["rank 0", "finite"])
    # wrong local expert count
    expect_error("w1 all experts", lambda: call(w1=w["w1"]), ValueError, ["w1", "E/P"])
    # backward: a wrong dy on one rank
    y, ctx = call(return_context=True)
    dyb = np.zeros((4, d), np.float32) if rank == P - 1 else np.zeros_like(y)
    expect_error("dy shape on one rank", lambda: ep.ep_moe_backward(dyb, ctx), ValueError,
                 ["dy"])
    expect_error("reduce", lambda: ep.ep_moe_backward(y, ctx, reduce="max"), ValueError,
                 ["reduce"])
    expect_error("reduce differs", lambda: ep.ep_moe_backward(
        y, ctx, reduce=None if rank == 0 else "sum"), ValueError, ["reduce"])
    expect_error("comm", lambda: call(comm=object()), TypeError, ["comm"])
    # the communicator still works after every error
    same("usable after errors", call(), call())


def nn_cases():
    """ExpertParallelMoE against nn.MoE on the global batch; sync_gradients; norms."""
    from fastmoe_nb import nn

    d, h, E, k, tokens = 12, 6, 2 * P, 2, [4, 1, 0, 3][:P]
    opts = dict(activation="silu", capacity=3, shared_h=5, shared_gate=True,
                dtype=np.float64, rng=7)
    moe = nn.MoE(d, h, E, k, **opts)
    layer = ep.ExpertParallelMoE(d, h, E, k, comm=comm, **opts)
    lo, hi = ep.expert_range(E, comm)
    same("nn: w1 is this rank's slice of nn.MoE's", layer.w1.value, moe.w1.value[lo:hi])
    same("nn: from_moe", ep.ExpertParallelMoE.from_moe(moe, comm).w2.value, layer.w2.value)
    rng = np.random.default_rng(11)
    X, dY = rng.standard_normal((2, sum(tokens), d))
    start = sum(tokens[:rank])
    mine = slice(start, start + tokens[rank])
    Y = moe.forward(X)
    DX = moe.backward(dY)
    model = nn.Sequential(layer)
    y = model.forward(X[mine].copy())
    dx = model.backward(dY[mine].copy())
    close("nn: y", y, Y[mine])
    close("nn: dx", dx, DX[mine])
    same("nn: dropped", layer.dropped, moe.ctx.plan.dropped)
    rep, exp = ep.split_parameters(model)
    check("nn: split", [id(p) for p in exp] == [id(layer.w1), id(layer.w2)])
    ep.sync_gradients(model, comm, average=False)
    for n in ("router_w", "shared_w1", "shared_w2", "shared_gate_w"):
        close(f"nn: {n}.grad", getattr(layer, n).grad, getattr(moe, n).grad)
    close("nn: w1.grad", layer.w1.grad, moe.w1.grad[lo:hi])
    close("nn: global norm", np.array(ep.global_grad_norm(model, comm)),
          np.array(nn.global_grad_norm(moe)))
    g = layer.router_w.grad.copy()
    w1g = layer.w1.grad.copy()
    ep.sync_gradients(model, comm)            # summed again (P g), then averaged: g
    close("nn: averaged router_w.grad", layer.router_w.grad, g)
    close("nn: averaged w1.grad", layer.w1.grad, w1g / P)
    other = nn.Sequential(layer, nn.Linear(d, d, rng=0)) if rank == P - 1 else model
    expect_error("nn: sync_gradients of different models", lambda: ep.sync_gradients(other, comm),
                 ValueError, ["replicated parameters"])
    expect_error("nn: from_moe with a balancing loss", lambda: ep.ExpertParallelMoE.from_moe(
        nn.MoE(d, h, E, k, aux_loss_coef=0.01), comm), ValueError, ["aux_loss_coef"])
    expect_error("nn: E not divisible", lambda: ep.ExpertParallelMoE(d, h, P + 1, 1, comm=comm),
                 ValueError, ["divisible"])


def training_cases():
    """The training example on every sub-communicator size 1, 2, .., P at once: the same
    losses (float64: to 1e-9; float32: to 1e-5)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from train_expert_parallel import train

    sizes = [s for s in (1, 2, 4) if s <= P]
    for dt, rtol in ((np.float64, 1e-9), (np.float32, 1e-5)):
        runs = {}
        for s in sizes:
            sub = comm.Split(rank // s, rank)
            losses, model = train(sub, steps=8, batch=64, dtype=dt, return_model=True)
            runs[s] = np.array(losses)
            # replicated weights stay bitwise identical on every rank of the group
            for name, p in model.named_parameters():
                if not name.endswith((".w1", ".w2")):
                    same(f"training {dt.__name__} on {s}: {name} as on the group's rank 0",
                         p.value, sub.bcast(p.value, root=0))
            sub.Free()
        check(f"training {dt.__name__}: loss decreases", runs[1][-1] < runs[1][0] - 0.1,
              f"{runs[1][0]} -> {runs[1][-1]}")
        for s in sizes[1:]:
            close(f"training {dt.__name__}: {s} ranks vs 1", runs[s], runs[1], rtol)


def short_traceback():
    return traceback.format_exc(limit=-4)[-1500:]


def main():
    cases = [
        # name, T_r per rank (a rank with no token), d, h, E, k, options
        dict(name="f32 swiglu", tokens=[5, 0, 3, 1], d=100, h=8, E=2 * P, k=2),
        dict(name="f32 exact router", tokens=[5, 0, 3, 1], d=100, h=8, E=2 * P, k=2,
             exact=True, capacity=2),
        dict(name="f32 exact router T=1 k=E", tokens=[1, 1, 1, 1], d=64, h=4, E=P, k=P,
             exact=True, activation="gelu_tanh", seed=5),
        dict(name="f32 T=1 empty experts trans_w gelu", tokens=[1, 1, 1, 1], d=781, h=5,
             E=4 * P, k=1, activation="gelu", trans_w=True),
        dict(name="f64 k=E=P capacity shared", tokens=[4, 3, 0, 5], d=12, h=6, E=P, k=P,
             dtype=np.float64, capacity=3, shared=True, gate=True),
        dict(name="f32 E=P k=1 capacity 0", tokens=[2, 2, 2, 2], d=16, h=4, E=P, k=1,
             capacity=0, activation="relu"),
        dict(name="f64 sigmoid groups capacity", tokens=[6, 2, 5, 3], d=20, h=4, E=4 * P,
             k=3, dtype=np.float64, capacity=2, shared=True,
             sigmoid=dict(n_group=2, topk_group=1, scale=2.5)),
        dict(name="f32 uneven d=600", tokens=[7, 1, 0, 2], d=600, h=3, E=2 * P, k=2,
             activation="silu", seed=3),
    ]
    phases = [(c["name"], lambda c=c: run_case(**c)) for c in cases]
    phases += [("nn", nn_cases), ("training", training_cases), ("validation", validation_cases)]
    seconds = {}
    for name, fn in phases:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001
            failures.append(f"rank {rank}: {name} raised\n{short_traceback()}")
        seconds[name] = time.perf_counter() - t0
    everything = comm.gather((checks[0], failures), root=0)
    if rank == 0:
        bad = [f for _, fs in everything for f in fs]
        if bad:
            print("\n".join(bad))
            sys.stdout.flush()
        else:
            print(f"ALL OK {sum(n for n, _ in everything)} checks on {P} ranks "
                  f"({stats['bitwise']} cases bitwise, {stats['close']} within 1e-6); seconds: "
                  + ", ".join(f"{n} {t:.1f}" for n, t in seconds.items()))
    ok = comm.bcast(rank == 0 and not bad if rank == 0 else None, root=0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
