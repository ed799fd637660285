"""A cost model of expert-parallel training: what one step costs on P ranks, and how much of
it is communication, for 8 to 4096 ranks at the presets' sizes.

    python -m fastmoe_nb.parallel.cost_model                  # the table, from the stored fit
    python -m fastmoe_nb.parallel.cost_model --fit            # re-measure (mpiexec -n 2, 4)
    python -m fastmoe_nb.parallel.cost_model --alpha 2e-6 --beta 25e9 --gflops 400000

Messages cost alpha + bytes / beta (latency alpha seconds, bandwidth beta bytes/s). An
all-to-all in which every rank sends m bytes to each of the other P - 1 ranks costs, by
algorithm:

- pairwise (linear / scattered: MPICH's Alltoallv, what fastmoe_nb.parallel calls):
  (P - 1) * (alpha + m / beta)
- bruck (store-and-forward in ceil(log2 P) rounds, each moving about half the blocks):
  ceil(log2 P) * (alpha + (P / 2) * m / beta) — fewer messages, more bytes.

An Allreduce of n bytes (reduce-scatter + allgather, Rabenseifner) costs
2 * ceil(log2 P) * alpha + 2 * (P - 1) / P * n / beta.

One training step of the layer (forward + backward, as ep_moe_forward / ep_moe_backward do
it, nothing overlapped) on P ranks, each holding the preset's T tokens (weak scaling):

- the experts form groups of G = min(P, E) ranks (E / G experts each); with P > E the
  R = P / G groups are data-parallel replicas of one another;
- compute: 3x the forward FLOPs (backward = 2x) of the routed expert GEMMs (T * k rows per
  rank: balanced routing), the router and the shared expert, at `gflops` per rank;
- exchanges: 4 all-to-alls of the rows (dispatch and return, forward and backward), m =
  T * k * d * itemsize / G bytes per destination; an all-to-all of the E / G counts and two
  collective checks (latency); with a capacity, an Exscan and an Allreduce of E counts;
- gradients: an Allreduce over the P ranks of the replicated weights (router, shared
  expert) and, when R > 1, one over the R replicas of each rank's expert weights.

alpha and beta are fitted (non-negative least squares on relative error) per algorithm to
Alltoallv and Allreduce times measured on 2 and 4 ranks of this machine (shared memory; 4
ranks oversubscribe its 2 cores), and gflops is the rate of one rank (one thread) computing
the same layer there. They describe this machine's ranks and transport: for a cluster,
pass its network's --alpha / --beta and its device's --gflops. What is not modelled:
routing imbalance (the busiest rank sets the pace), overlap of compute and communication,
topology (an all-to-all across nodes shares links), the expert weights' memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from importlib import resources

import numpy as np

from ..presets import MODEL_PRESETS, PRESETS, Preset

ALGORITHMS = ("pairwise", "bruck")
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def _log2(P):
    return math.ceil(math.log2(P)) if P > 1 else 0


def alltoall_terms(algorithm, P, m):
    """(messages, bytes) on one rank's critical path: the time is messages * alpha +
    bytes / beta. m: bytes each rank sends to each other rank."""
    if P <= 1:
        return 0.0, 0.0
    if algorithm == "pairwise":
        return float(P - 1), float(P - 1) * m
    if algorithm == "bruck":
        L = _log2(P)
        return float(L), L * (P / 2.0) * m
    raise ValueError(f"algorithm: expected one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def allreduce_terms(P, n):
    """(messages, bytes) of an Allreduce of n bytes on P ranks (Rabenseifner)."""
    if P <= 1:
        return 0.0, 0.0
    return 2.0 * _log2(P), 2.0 * (P - 1) / P * n


def cost(terms, alpha, beta):
    messages, nbytes = terms
    return messages * alpha + nbytes / beta


def fit_alpha_beta(terms, times):
    """terms: [(messages, bytes)], times: seconds -> (alpha, beta, relative rms error).
    Non-negative least squares on the relative error of t = messages * alpha + bytes / beta."""
    from scipy.optimize import nnls  # noqa: PLC0415

    A = np.array(terms, np.float64)
    t = np.asarray(times, np.float64)
    w = 1.0 / t
    (alpha, inv_beta), _ = nnls(A * w[:, None], np.ones_like(t))
    pred = A @ np.array([alpha, inv_beta])
    rms = float(np.sqrt(np.mean(((pred - t) / t) ** 2)))
    return float(alpha), (float(1.0 / inv_beta) if inv_beta > 0 else math.inf), rms


def fit(runs):
    """runs: the measure.py results of 2 and 4 ranks -> the fitted model parameters."""
    out = {"alltoall": {}, "ranks": sorted(r["P"] for r in runs)}
    for alg in ALGORITHMS:
        terms = [alltoall_terms(alg, r["P"], m) for r in runs for m, _ in r["alltoallv"]]
        times = [t for r in runs for _, t in r["alltoallv"]]
        a, b, rms = fit_alpha_beta(terms, times)
        out["alltoall"][alg] = {"alpha": a, "beta": b, "rel_rms": rms}
    terms = [allreduce_terms(r["P"], n) for r in runs for n, _ in r["allreduce"]]
    a, b, rms = fit_alpha_beta(terms, [t for r in runs for _, t in r["allreduce"]])
    out["allreduce"] = {"alpha": a, "beta": b, "rel_rms": rms}
    for r in runs:                                  # each rank count on its own
        a, b, rms = fit_alpha_beta([alltoall_terms("pairwise", r["P"], m)
                                    for m, _ in r["alltoallv"]],
                                   [t for _, t in r["alltoallv"]])
        out[f"pairwise_P{r['P']}"] = {"alpha": a, "beta": b, "rel_rms": rms}
    two = min(runs, key=lambda r: r["P"])           # one thread per core: a rank's rate
    out["gflops"] = two["step"]["gflops_local"]
    return out


def groups(P, E):
    """(G, R): expert-parallel group size (the largest divisor of E not above P that
    divides P) and the number of data-parallel replicas R = P / G."""
    G = max(g for g in range(1, min(P, E) + 1) if E % g == 0 and P % g == 0)
    return G, P // G


def step_cost(preset: Preset, P, params, algorithm="pairwise", itemsize=4):
    """Seconds of one training step of preset's layer on P ranks -> dict of the parts:
    compute, alltoall (rows), latency (counts, checks, capacity), allreduce, total, share."""
    T, d, E, k = preset.tokens, preset.d, preset.experts, preset.k
    G, R = groups(P, E)
    a2a = params["alltoall"][algorithm]
    ar = params["allreduce"]
    flops = preset.flops() + 2.0 * T * d * E
    if preset.shared_h:
        sh1 = 2 * preset.shared_h if preset.activation == "swiglu" else preset.shared_h
        flops += 2.0 * T * d * (sh1 + preset.shared_h)
    compute = 3.0 * flops / (params["gflops"] * 1e9)
    m = T * k * d * itemsize / G
    rows = 4 * cost(alltoall_terms(algorithm, G, m), a2a["alpha"], a2a["beta"])
    latency = cost(alltoall_terms(algorithm, G, 8.0 * E / G), a2a["alpha"], a2a["beta"])
    latency += 2 * cost(allreduce_terms(G, 64.0), ar["alpha"], ar["beta"])   # checks
    if preset.capacity_factor is not None:
        latency += 2 * cost(allreduce_terms(G, 8.0 * E), ar["alpha"], ar["beta"])
    replicated = d * E + (d * (sh1 + preset.shared_h) if preset.shared_h else 0)
    grads = cost(allreduce_terms(P, replicated * itemsize), ar["alpha"], ar["beta"])
    if R > 1:
        expert_bytes = (E // G) * d * (preset.h1 + preset.h) * itemsize
        grads += cost(allreduce_terms(R, expert_bytes), ar["alpha"], ar["beta"])
    comm = rows + latency + grads
    total = compute + comm
    return dict(P=P, G=G, R=R, compute=compute, alltoall=rows, latency=latency,
                allreduce=grads, comm=comm, total=total, share=comm / total)


def table(params, presets=MODEL_PRESETS, ranks=RANKS):
    """The prediction as text: per preset and rank count, each algorithm's step time and
    communication share."""
    lines = []
    for name in presets:
        p = PRESETS[name]
        lines.append(f"\n{name}: T={p.tokens} tokens/rank, d={p.d}, h={p.h}, E={p.experts}, "
                     f"k={p.k}" + (f", capacity factor {p.capacity_factor}"
                                   if p.capacity_factor else ""))
        lines.append(f"{'ranks':>6} {'G x R':>10} {'compute':>10} "
                     + " ".join(f"{a + ' step':>14} {'comm':>6}" for a in ALGORITHMS)
                     + f" {'best':>9}")
        for P in ranks:
            c = {a: step_cost(p, P, params, a) for a in ALGORITHMS}
            best = min(ALGORITHMS, key=lambda a: c[a]["total"])  # noqa: B023
            first = c[ALGORITHMS[0]]
            lines.append(f"{P:>6} {first['G']:>4} x {first['R']:<4} "
                         f"{_fmt(first['compute']):>10} "
                         + " ".join(f"{_fmt(c[a]['total']):>14} {c[a]['share']:>6.1%}"
                                    for a in ALGORITHMS) + f" {best:>9}")
    return "\n".join(lines)


def _fmt(s):
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def check_against_runs(params, runs):
    """The fitted model against the measured expert-parallel steps of the fit's runs: the
    measured local compute plus the modelled exchanges vs the measured step."""
    lines = []
    for r in sorted(runs, key=lambda r: r["P"]):
        s = r["step"]
        pre = Preset("measured", s["T"], s["d"], s["h"], s["E"], s["k"])
        model = step_cost(pre, r["P"], params, "pairwise")
        pred = s["local"] + model["comm"]
        lines.append(f"  P={r['P']}: measured step {_fmt(s['ep'])}, local compute "
                     f"{_fmt(s['local'])} + modelled exchanges {_fmt(model['comm'])} = "
                     f"{_fmt(pred)} (measured / predicted {s['ep'] / pred:.2f})")
    return "\n".join(lines)


def describe(params):
    a = params["alltoall"]
    lines = [f"fit: {params.get('source', 'given on the command line')}"]
    for alg in ALGORITHMS:
        lines.append(f"  all-to-all {alg:9s} alpha {a[alg]['alpha'] * 1e6:8.2f} us, beta "
                     f"{a[alg]['beta'] / 1e9:7.2f} GB/s (relative rms error "
                     f"{a[alg]['rel_rms']:.0%})")
    for P in params.get("ranks", ()):
        f = params.get(f"pairwise_P{P}")
        if f:
            lines.append(f"    pairwise on {P} ranks alone: alpha {f['alpha'] * 1e6:8.2f} us, "
                         f"beta {f['beta'] / 1e9:7.2f} GB/s (relative rms error "
                         f"{f['rel_rms']:.0%})")
    ar = params["allreduce"]
    lines.append(f"  allreduce            alpha {ar['alpha'] * 1e6:8.2f} us, beta "
                 f"{ar['beta'] / 1e9:7.2f} GB/s (relative rms error {ar['rel_rms']:.0%})")
    lines.append(f"  compute {params['gflops']:.1f} GFLOP/s per rank")
    return "\n".join(lines)


def measure(ranks=(2, 4), timeout=900):
    """Run measure.py under mpiexec -n P for each P (one thread per rank) -> results."""
    mpiexec = shutil.which("mpiexec")
    if not mpiexec:
        raise RuntimeError("mpiexec not found: pip install 'fastmoe-nb[mpi]'")
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    runs = []
    for P in ranks:
        out = subprocess.run([mpiexec, "-n", str(P), sys.executable, "-m",
                              "fastmoe_nb.parallel.measure"], env=env, capture_output=True,
                             text=True, timeout=timeout, check=True).stdout
        runs.append(json.loads(out.split("MEASURE ", 1)[1].splitlines()[0]))
    return runs


FIT_FILE = "cost_fit.json"   # beside this module, shipped as package data


def load_fit():
    """The stored fit (cost_fit.json, written by --fit) -> (params, runs)."""
    fit = json.loads(resources.files(__package__).joinpath(FIT_FILE).read_text())
    return fit["params"], fit["runs"]


def write_fit(params, runs, path=None):
    """Store a fit as JSON (cost_fit.json beside this module by default). JSON has no
    infinity: an unbounded beta is written as 1e308."""
    path = path or os.path.join(os.path.dirname(__file__), FIT_FILE)
    body = json.dumps({"params": params, "runs": runs}, indent=1).replace("Infinity", "1e308")
    with open(path, "w") as f:
        f.write(body + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastmoe_nb.parallel.cost_model",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true",
                    help="measure on 2 and 4 ranks (mpiexec) and store the fit first")
    ap.add_argument("--alpha", type=float, help="latency per message, seconds (all collectives)")
    ap.add_argument("--beta", type=float, help="bandwidth, bytes/s (all collectives)")
    ap.add_argument("--gflops", type=float, help="compute rate of one rank, GFLOP/s")
    ap.add_argument("--presets", default=",".join(MODEL_PRESETS),
                    help="comma-separated preset names (default: the full-size models)")
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)),
                    help="comma-separated rank counts")
    a = ap.parse_args(argv)
    names = [n for n in a.presets.split(",") if n]
    for n in names:
        if n not in PRESETS:
            ap.error(f"--presets: expected names among {', '.join(PRESETS)}, got {n!r}")
    try:
        ranks = [int(r) for r in a.ranks.split(",") if r]
    except ValueError:
        ap.error(f"--ranks: expected comma-separated integers, got {a.ranks!r}")
    if not ranks or min(ranks) < 1:
        ap.error("--ranks: expected positive rank counts")
    if a.fit:
        runs = measure()
        params = fit(runs)
        params["source"] = (f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
                            f"on 2 and 4 ranks, load average {os.getloadavg()[0]:.1f}")
        write_fit(params, runs)
    params, runs = load_fit()
    params = json.loads(json.dumps(params))       # a copy to override
    for coll in [*params["alltoall"].values(), params["allreduce"]]:
        if a.alpha is not None:
            coll["alpha"] = a.alpha
        if a.beta is not None:
            coll["beta"] = a.beta
    if a.gflops is not None:
        params["gflops"] = a.gflops
    if a.alpha is not None or a.beta is not None or a.gflops is not None:
        params["source"] = params.get("source", "") + "; overridden on the command line"
    print(describe(params))
    print("check against the measured layer steps (pairwise model, stored fit):")
    print(check_against_runs(load_fit()[0], runs))
    print(table(params, names, ranks))


if __name__ == "__main__":
    main()
