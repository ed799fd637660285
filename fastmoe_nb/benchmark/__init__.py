"""The benchmark harness behind `fastmoe-nb bench` and the scripts in bench/.

A Case is one op on inputs made beforehand: run() (the call that is timed), check(outputs)
against reference.py (float64) or a float32 baseline, the FLOPs and bytes of one call, and
its baselines (other implementations of the same work, built only when asked for).
measure() checks the first call and refuses to time a result its check rejects; then it
times the case and its baselines with the one timer, in interleaved rounds. The result is a
dict (a row of the command's JSON), which report formats.

    core.py      Case, Baseline, measure(), the correctness gate (TOLERANCE)
    timer.py     the interleaved timer
    cases.py     the MoE layer and its ops on a preset (the command's cases), bench_op()
    routers.py   the routers and balancing losses of fastmoe_nb.routing against PyTorch
    kernels.py   the memory-bound kernels alone, outputs preallocated
    hf_model.py  a training step of an HF Mixtral model by experts implementation
    report.py    the command's result block, one table over many results, the sweep plot
    machine.py   the ceilings (measured), memory, versions, `fastmoe-nb info`
    weights.py   the layer with its experts in each weight format (`--weights`), with ggml's
                 MoE beside it (`--compare ggml`; ggml.py, optional), against the roofline floor

    from fastmoe_nb import benchmark as bm
    case = bm.make_case("grouped_gemm", preset, "float32", bm.Host(), 0, None, 1024)
    rows = bm.run_cases({"gemm": case}, repeat=5, baselines=["numpy", "dense"])
    bm.table(rows)
"""
from __future__ import annotations

from .cases import CASE_OPS, Cuda, Host, backend, bench_op, copy_baseline, make_case
from .core import TOLERANCE, Baseline, Case, UsageError, measure, rel_err, select_baselines
from .machine import check_memory, machine_info, measure_machine, memory_available, versions
from .report import print_result, print_weights, table, write_plot
from .timer import MIN_SAMPLE_S, Progress, no_sync, stats, timed, timed_cold
from .weights import WEIGHT_FORMATS, bench_weights


def run_cases(cases, repeat, baselines=None, tolerance=TOLERANCE["float32"], sync=no_sync,
              machine=None, cpu=True, quiet=True, stop_on_wrong=False):
    """cases: {name: Case} -> their result rows (each with "case": its name), every case
    checked, then timed with the baselines named (None: all that it has) if its check
    passes. A baseline that cannot run here is listed in the row's skipped_baselines."""
    rows = []
    for name, case in cases.items():
        names = list(case.baselines) if baselines is None else baselines
        wanted = select_baselines(case, names, False, name)
        res = {"case": name, "flops": case.flops, "bytes": case.nbytes}
        res.update(measure(case, repeat, tolerance, label=name, sync=sync, wanted=wanted,
                           machine=machine, cpu=cpu, quiet=quiet))
        rows.append(res)
        if stop_on_wrong and not res["correct"]:
            break
    return rows


def exit_status(results):
    """1 when a check refused a result (it was not timed), else 0."""
    return 0 if all(r["correct"] for r in results) else 1


__all__ = ["CASE_OPS", "MIN_SAMPLE_S", "TOLERANCE", "WEIGHT_FORMATS", "Baseline", "Case",
           "Cuda", "Host", "Progress", "UsageError", "backend", "bench_op", "bench_weights",
           "check_memory", "copy_baseline",
           "exit_status", "machine_info", "make_case", "measure", "measure_machine",
           "memory_available", "no_sync", "print_result", "print_weights", "rel_err",
           "run_cases", "select_baselines", "stats", "table", "timed", "timed_cold", "versions",
           "write_plot"]
