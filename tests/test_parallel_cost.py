"""The expert-parallel cost model (fastmoe_nb.parallel.cost_model): its formulas by hand, its
fit on synthetic data, its stored fit and its printout. No MPI needed."""
import math

import numpy as np
import pytest

from fastmoe_nb.parallel import cost_model as cm
from fastmoe_nb.presets import PRESETS, Preset


def params(alpha=1e-5, beta=1e9, gflops=100.0):
    one = {"alpha": alpha, "beta": beta, "rel_rms": 0.0}
    return {"alltoall": {a: dict(one) for a in cm.ALGORITHMS}, "allreduce": dict(one),
            "gflops": gflops}


def test_formulas_by_hand():
    a, b, m = 3e-6, 2e9, 4096.0
    # two ranks: every algorithm is one message of m bytes
    for alg in cm.ALGORITHMS:
        assert cm.cost(cm.alltoall_terms(alg, 2, m), a, b) == pytest.approx(a + m / b)
        assert cm.alltoall_terms(alg, 1, m) == (0.0, 0.0)
    assert cm.alltoall_terms("pairwise", 8, m) == (7.0, 7 * m)
    assert cm.alltoall_terms("bruck", 8, m) == (3.0, 3 * 4 * m)
    assert cm.alltoall_terms("bruck", 5, m) == (3.0, 3 * 2.5 * m)
    assert cm.allreduce_terms(8, 800.0) == (6.0, 2 * 7 / 8 * 800.0)
    with pytest.raises(ValueError, match="algorithm"):
        cm.alltoall_terms("ring", 4, m)


def test_fit_recovers_known_alpha_beta():
    alpha, beta = 7e-6, 3.5e9
    runs = []
    for P in (2, 4):
        a2a = [[m, cm.cost(cm.alltoall_terms("pairwise", P, m), alpha, beta)]
               for m in (64, 4096, 1 << 20)]
        ar = [[n, cm.cost(cm.allreduce_terms(P, n), alpha, beta)] for n in (64, 1 << 20)]
        runs.append({"P": P, "alltoallv": a2a, "allreduce": ar,
                     "step": {"gflops_local": 50.0}})
    f = cm.fit(runs)
    pw = f["alltoall"]["pairwise"]
    assert pw["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert pw["beta"] == pytest.approx(beta, rel=1e-6)
    assert pw["rel_rms"] < 1e-6
    assert f["allreduce"]["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert f["alltoall"]["bruck"]["rel_rms"] > 1e-3     # the wrong model does not fit exactly
    assert f["gflops"] == 50.0 and f["ranks"] == [2, 4]


def test_groups():
    assert cm.groups(8, 256) == (8, 1)
    assert cm.groups(4096, 8) == (8, 512)
    assert cm.groups(12, 8) == (4, 3)                     # G divides both E and P


def test_step_cost_parts():
    p = PRESETS["mixtral"]
    c = cm.step_cost(p, 8, params())
    T, d, E, k = p.tokens, p.d, p.experts, p.k
    flops = 3 * (2.0 * T * k * d * (p.h1 + p.h) + 2.0 * T * d * E)
    assert c["compute"] == pytest.approx(flops / 100e9)
    m = T * k * d * 4 / 8
    assert c["alltoall"] == pytest.approx(4 * 7 * (1e-5 + m / 1e9))
    assert c["total"] == pytest.approx(c["compute"] + c["comm"])
    assert 0 < c["share"] < 1
    # replicas add the expert-gradient allreduce; a slower network raises the share
    assert cm.step_cost(p, 64, params())["allreduce"] > c["allreduce"]
    assert cm.step_cost(p, 8, params(beta=1e8))["share"] > c["share"]
    # capacity (Switch) adds latency-only collectives
    sw = PRESETS["switch"]
    assert cm.step_cost(sw, 8, params())["latency"] > cm.step_cost(
        sw.replace(capacity_factor=None), 8, params())["latency"]


def test_stored_fit_comes_from_2_and_4_ranks():
    fit, runs = cm.load_fit()
    assert sorted(r["P"] for r in runs) == [2, 4]
    for r in runs:
        assert len(r["alltoallv"]) >= 3 and all(t > 0 for _, t in r["alltoallv"])
    for alg in cm.ALGORITHMS:
        a = fit["alltoall"][alg]
        assert a["alpha"] >= 0 and a["beta"] > 0 and math.isfinite(a["rel_rms"])
    assert fit["gflops"] > 0


def test_main_prints_8_to_4096_ranks(capsys):
    cm.main([])
    out = capsys.readouterr().out
    for name in ("mixtral", "deepseek-v3", "switch"):
        assert f"\n{name}:" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert {int(r[0]) for r in rows} == set(cm.RANKS)
    assert "measured / predicted" in out


def test_main_overrides_and_errors(capsys):
    cm.main(["--presets", "fine-128", "--ranks", "8,16", "--alpha", "2e-6", "--beta", "25e9",
             "--gflops", "1e5"])
    out = capsys.readouterr().out
    assert "overridden" in out and "2.00 us" in out and "25.00 GB/s" in out
    shares = [float(t.rstrip("%")) for ln in out.splitlines()
              if ln.split() and ln.split()[0] in ("8", "16") for t in ln.split() if t[-1] == "%"]
    assert len(shares) == 2 * len(cm.ALGORITHMS) and all(0 < s < 100 for s in shares)
    with pytest.raises(SystemExit):
        cm.main(["--presets", "nope"])
    with pytest.raises(SystemExit):
        cm.main(["--ranks", "0"])
    assert "--presets" in capsys.readouterr().err


def test_fit_file_round_trips_and_ships_with_the_package(tmp_path):
    import json
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")      # Python 3.11+

    fit, runs = cm.load_fit()
    path = tmp_path / cm.FIT_FILE
    cm.write_fit(fit, runs, str(path))
    assert json.loads(path.read_text()) == {"params": fit, "runs": runs}
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert cm.FIT_FILE in pyproject["tool"]["setuptools"]["package-data"]["fastmoe_nb.parallel"]
