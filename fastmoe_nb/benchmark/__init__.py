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
    report.py    the command's result block, the sweep plot
    machine.py   the ceilings (measured), memory, versions, `fastmoe-nb info`
"""
from __future__ import annotations

from .cases import Cuda, Host, backend, bench_op, make_case
from .core import TOLERANCE, Baseline, Case, UsageError, measure, rel_err, select_baselines
from .machine import check_memory, machine_info, measure_machine, memory_available, versions
from .report import print_result, write_plot
from .timer import MIN_SAMPLE_S, Progress, no_sync, stats, timed


__all__ = ["MIN_SAMPLE_S", "TOLERANCE", "Baseline", "Case", "Cuda", "Host", "Progress",
           "UsageError", "backend", "bench_op", "check_memory", "machine_info", "make_case",
           "measure", "measure_machine", "memory_available", "no_sync", "print_result",
           "rel_err", "select_baselines", "stats", "timed", "versions", "write_plot"]
