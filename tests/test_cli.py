"""The `fastmoe-nb` command, its presets and baselines.

A few tests run the real command in a subprocess (exit codes, the JSON it writes, one-line
errors with no traceback); the rest call cli.main(argv) in this process on tiny shapes, with
the machine ceilings stubbed (they are measured for real in the subprocess test). No test
asserts a time.
"""
import io
import json
import os
import subprocess
import sys
import time
from importlib import metadata

import numpy as np
import pytest

from fastmoe_nb import baselines as B
from fastmoe_nb import benchmark as bm
from fastmoe_nb import cli
from fastmoe_nb import presets as P
from fastmoe_nb import reference as ref


TINY = ["--tokens", "48", "--d", "24", "--h", "40", "--experts", "4", "--k", "2",
        "--repeat", "2", "--quiet"]
FAKE_MACHINE = {"matmul_gflops": 100.0, "matmul_shape": [1, 1, 1], "read_gbs": 10.0,
                "threads": 1}


def assert_close(got, want, rtol=1e-5):
    """Max abs error relative to the largest |want|, same shape and dtype."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def run_cmd(*args, env=None):
    """The command in a fresh interpreter -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "fastmoe_nb.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def one_line_error(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastmoe-nb: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def stub_machine(monkeypatch):
    monkeypatch.setattr(cli, "measure_machine", lambda dtype, threads: dict(FAKE_MACHINE))


def bench_json(tmp_path, *args):
    """cli.main(['bench', *args, '--json', path]) -> (exit status, the JSON document)."""
    path = tmp_path / "out.json"
    status = cli.main(["bench", *args, "--json", str(path)])
    return status, (json.loads(path.read_text()) if path.exists() else None)


# --------------------------------------------------------------------------- the command

def test_console_script_is_installed():
    eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "fastmoe-nb"]
    assert [e.value for e in eps] == ["fastmoe_nb.cli:main"]


def test_bench_layer_subprocess_writes_checked_json(tmp_path):
    out = tmp_path / "bench.json"
    p = run_cmd("bench", "layer", *TINY, "--compare", "numpy,dense", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "check vs reference.py" in p.stdout and "fastmoe_nb" in p.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == cli.SCHEMA
    assert doc["command"].startswith("fastmoe-nb bench layer --tokens 48")
    assert doc["machine"]["matmul_gflops"] > 0 and doc["machine"]["read_gbs"] > 0
    assert doc["versions"]["numba"] and doc["versions"]["fastmoe_nb"]
    (res,) = doc["results"]
    assert res["op"] == "layer" and res["preset"] == P.DEFAULT_PRESET
    assert res["shape"] == {"tokens": 48, "d": 24, "h": 40, "experts": 4, "k": 2}
    assert res["correct"] is True
    assert 0 <= res["check"]["max_rel_err"] <= res["check"]["tolerance"] == 1e-4
    assert len(res["times_s"]) == 2
    assert res["min_s"] <= res["median_s"] <= res["max_s"]
    assert res["first_call_s"] > 0 and res["compile_s"] >= 0
    T, d, h, E, k = 48, 24, 40, 4, 2
    assert res["routing"]["rows"] == T * k and res["routing"]["dropped"] == 0
    assert res["flops"] == 2.0 * (T * d * E + T * k * d * (2 * h + h))
    assert res["bound"] in ("compute", "memory") and res["fraction_of_peak"] > 0
    assert [b["name"] for b in res["baselines"]] == ["numpy", "dense"]
    assert res["baselines"][0]["max_rel_err"] <= 1e-4
    assert res["baselines"][1]["max_rel_err"] is None     # random operands: nothing to check
    for b in res["baselines"]:
        assert b["time_vs_fastmoe_nb"] == pytest.approx(b["median_s"] / res["median_s"])


def test_bad_input_subprocess_is_one_line_exit_2():
    p = run_cmd("bench", "--preset", "gpt-17")
    assert p.returncode == 2
    line = one_line_error(p.stderr)
    assert "preset" in line and "'gpt-17'" in line and "mixtral-mini" in line
    assert p.stdout == ""


def test_missing_torch_for_compare_hf_is_one_line_exit_2(tmp_path):
    blocked = tmp_path / "blocked"
    (blocked / "torch").mkdir(parents=True)
    (blocked / "torch" / "__init__.py").write_text("raise ImportError('torch blocked by test')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(blocked)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    p = run_cmd("bench", *TINY, "--compare", "hf", env=env)
    assert p.returncode == 2
    line = one_line_error(p.stderr)
    assert "--compare hf" in line and "torch" in line


def test_info_subprocess(tmp_path):
    out = tmp_path / "info.json"
    p = run_cmd("info", "--json", str(out))
    assert p.returncode == 0, p.stderr
    info = json.loads(out.read_text())
    assert {"versions", "cpu", "threads", "blas", "cuda", "numba_cache"} <= set(info)
    assert info["threads"]["numba_num_threads"] >= 1
    assert info["threads"]["threading_layer"] in ("omp", "tbb", "workqueue")
    assert isinstance(info["cpu"]["simd"], list) and info["cpu"]["name"]
    kernels = info["cpu"]["kernels"]
    assert kernels["isa"] in ("avx512", "avx2", "portable")
    assert kernels["q8_0_activations_vpdpbusd"] == ("avx512vnni" in info["cpu"]["simd"]
                                                    and kernels["isa"] == "avx512")
    assert isinstance(kernels["bf16_activations_vdpbf16ps"], bool)
    assert "fastmoe_nb_backend" in info["cuda"]
    assert "numba_cache" in p.stdout


def test_cuda_backend_in_the_simulator(tmp_path):
    pytest.importorskip("numba.cuda")
    out = tmp_path / "cuda.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    p = run_cmd("bench", "permute", "--backend", "cuda", "--tokens", "4", "--d", "4", "--h",
                "4", "--experts", "2", "--k", "1", "--repeat", "1", "--quiet", "--json",
                str(out), env=env)
    assert p.returncode == 0, p.stderr
    (res,) = json.loads(out.read_text())["results"]
    assert res["backend"] == "cuda" and res["correct"] is True
    assert res["check"]["max_rel_err"] == 0.0 and res["median_s"] > 0
    assert res["fraction_of_peak"] is None          # the ceilings are the CPU's


def test_presets_command_lists_every_preset(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in P.PRESETS:
        assert f"\n{name} " in out


# --------------------------------------------------------------------------- every op

@pytest.mark.parametrize("op, extra", [
    ("grouped_gemm", []),
    ("permute", []),
    ("combine", []),
    ("route", ["--preset", "deepseek-v3-laptop", "--experts", "16", "--k", "4"]),
    ("train-step", []),
    ("layer", []),
    ("layer", ["--preset", "switch-laptop", "--experts", "4", "--k", "1", "--dtype",
               "float64"]),
])
def test_each_op_is_checked_then_timed(tmp_path, stub_machine, op, extra):
    status, doc = bench_json(tmp_path, op, *TINY, *extra, "--compare")
    assert status == 0
    (res,) = doc["results"]
    assert res["op"] == op and res["correct"] is True
    assert res["check"]["max_rel_err"] <= res["check"]["tolerance"]
    assert res["check"]["tolerance"] == bm.TOLERANCE[res["dtype"]]
    assert len(res["times_s"]) == 2 and res["median_s"] > 0
    assert res["bound"] in ("compute", "memory")
    assert [b["name"] for b in res["baselines"]][0] == "dense" if op == "train-step" else "numpy"
    if op == "layer" and res["name"] == P.DEFAULT_PRESET:   # HF's Mixtral block applies
        names = [b["name"] for b in res["baselines"]]
        if B.hf_status()[0]:
            assert names == ["numpy", "dense", "hf-eager", "hf-grouped_mm"]
            assert all(b["max_rel_err"] <= 1e-4 for b in res["baselines"] if b["name"] != "dense")
        else:
            assert set(res["skipped_baselines"]) == {"hf-eager", "hf-grouped_mm"}
    if op == "permute":
        assert res["check"]["max_rel_err"] == 0.0 and res["bound"] == "memory"
    if op == "layer" and res["name"] != P.DEFAULT_PRESET:   # switch: top-1, capacity ceil(1.25 * 48 / 4) = 15 tokens per expert
        assert res["capacity"] == 15 and res["dtype"] == "float64"
        assert res["routing"]["rows"] + res["routing"]["dropped"] == 48
        assert "hf-eager" in res["skipped_baselines"]


def test_a_wrong_kernel_is_not_timed(tmp_path, stub_machine, monkeypatch, capsys):
    import fastmoe_nb as fm

    good = fm.permute
    monkeypatch.setattr(fm, "permute", lambda x, plan: good(x, plan)[::-1].copy())
    status, doc = bench_json(tmp_path, "permute", *TINY)
    assert status == cli.EXIT_WRONG
    (res,) = doc["results"]
    assert res["correct"] is False and res["check"]["max_rel_err"] is None
    assert "median_s" not in res and "times_s" not in res
    err = capsys.readouterr()
    assert "differs from reference.py" in err.err and "WRONG" in err.out


def test_sweep_runs_each_value(tmp_path, stub_machine):
    status, doc = bench_json(tmp_path, "grouped_gemm", *TINY, "--sweep", "tokens=16,40")
    assert status == 0 and doc["sweep"] == "tokens"
    assert [r["sweep_value"] for r in doc["results"]] == [16, 40]
    assert [r["shape"]["tokens"] for r in doc["results"]] == [16, 40]
    assert [r["routing"]["rows"] for r in doc["results"]] == [32, 80]


def test_plot_of_a_sweep(tmp_path, stub_machine):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    assert cli.main(["bench", "permute", *TINY, "--sweep", "d=8,16", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zipf_skew_reaches_the_routing(tmp_path, stub_machine):
    args = ["route", *TINY, "--experts", "8", "--tokens", "400"]
    _, flat = bench_json(tmp_path, *args)
    _, skew = bench_json(tmp_path, *args, "--skew", "zipf:2")
    assert skew["results"][0]["skew"] == "zipf:2"
    assert skew["results"][0]["routing"]["max_over_mean"] > \
        flat["results"][0]["routing"]["max_over_mean"] + 0.5


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, words", [
    (["bench", "softmax"], ["op", "'softmax'"]),
    (["bench", "--preset", "nope"], ["preset", "'nope'"]),
    (["bench", "--experts", "4", "--k", "5"], ["--k", "1..4"]),
    (["bench", "--tokens", "0"], ["--tokens", "positive"]),
    (["bench", "--d", "x"], ["--d", "'x'"]),
    (["bench", "--activation", "tanh"], ["--activation", "swiglu"]),
    (["bench", "--router", "top1"], ["--router", "softmax_topk"]),
    (["bench", "--skew", "pareto:1"], ["--skew", "zipf:A"]),
    (["bench", "--skew", "zipf:-1"], ["--skew"]),
    (["bench", "--sweep", "batch=1,2"], ["--sweep", "tokens"]),
    (["bench", "--sweep", "tokens=1,0"], ["--sweep", "positive"]),
    (["bench", "--threads", "4096"], ["--threads", "NUMBA_NUM_THREADS"]),
    (["bench", "--preset", "deepseek-v3-laptop", "--experts", "12"], ["n_group", "E = 12"]),
    (["bench", "--compare", "numpy,tf"], ["--compare", "'tf'"]),
    (["bench", "permute", "--compare", "dense"], ["--compare dense", "permute"]),
    (["bench", "--plot", "out.png"], ["--plot", "--sweep"]),
    (["bench", "--json", "/nonexistent-folder/x.json"], ["--json", "nonexistent-folder"]),
    (["bench", "--dtype", "float16"], ["--dtype", "float16"]),
    (["bench", "--weights", "q5_0"], ["--weights", "'q5_0'", "q4_k"]),
    (["bench", "--weights", "f32,"], ["--weights", "''"]),
    (["bench", "--weights", "q8_0"], ["--weights q8_0", "32", "d=24"]),
    (["bench", "permute", "--weights", "bf16"], ["--weights", "'permute'"]),
    (["bench", "--weights", "bf16", "--dtype", "float64"], ["--weights", "float64"]),
    (["bench", "--weights", "bf16", "--compare", "numpy"], ["--weights", "ggml", "numpy"]),
    (["bench", "--compare", "ggml,dense"], ["--compare ggml", "dense"]),
    (["bench", "--weights", "bf16", "--sweep", "d=8,16", "--plot", "x.png"], ["--plot"]),
    (["frobnicate"], ["'frobnicate'"]),
    ([], ["required"]),
])
def test_bad_input_is_one_line_exit_2(argv, words, capsys):
    if argv[:1] == ["bench"]:     # tiny shapes first: the argument under test overrides them
        argv = ["bench", *TINY, *argv[1:]]
    assert cli.main(argv) == 2
    err = capsys.readouterr()
    line = one_line_error(err.err)
    for w in words:
        assert w in line, line


def test_missing_matplotlib_for_plot(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert cli.main(["bench", *TINY, "--sweep", "tokens=8,16", "--plot", "x.png"]) == 2
    assert "matplotlib" in one_line_error(capsys.readouterr().err)


def test_too_big_for_memory(monkeypatch, capsys):
    monkeypatch.setattr(bm.machine, "memory_available", lambda: 2 << 30)
    assert cli.main(["bench", "--preset", "mixtral"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "mixtral" in line and "GB" in line and "-laptop" in line


def test_cuda_backend_without_cuda(monkeypatch, capsys):
    from fastmoe_nb.kernels import cuda as kc

    def missing():
        raise RuntimeError("no CUDA here (test)")

    monkeypatch.setattr(kc, "require", missing)
    assert cli.main(["bench", *TINY, "--backend", "cuda"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--backend cuda" in line and "no CUDA here" in line


# --------------------------------------------------------------------------- --weights

# d and h multiples of 256, the k-formats' block; 4 experts, 8 tokens: every format in seconds
TINY_Q = ["--tokens", "8", "--d", "256", "--h", "256", "--experts", "4", "--k", "2",
          "--repeat", "2", "--quiet"]


@pytest.fixture
def small_probes(monkeypatch):
    """The ceilings' probes and the cache flush shrunk, the pause between samples dropped:
    the --weights tests time tiny layers, not the machine (a real run measures it)."""
    from fastmoe_nb.benchmark import weights as W

    monkeypatch.setattr(B, "settle", lambda: None)
    monkeypatch.setattr(W, "FLUSH_BYTES", 1 << 20)
    monkeypatch.setattr(W, "READ_BYTES", 1 << 20)
    monkeypatch.setattr(B, "MATMUL_SHAPE", (64, 32, 48))


def fake_ggml(formats=("f32", "bf16", "q8_0", "q4_0"), available=True):
    """A stand-in for fastmoe_nb.benchmark.ggml with its interface: the experts computed by
    reference.py on weights put through our quantizer (ggml's own is bit-compatible)."""
    import types

    from fastmoe_nb import formats as F

    mod = types.ModuleType("fastmoe_nb.benchmark.ggml")
    mod.FORMATS, mod.available, mod.made = tuple(formats), (lambda: available), []

    class GgmlExperts:
        def __init__(self, w1, w2, fmt, threads):
            mod.made.append((w1.shape, w2.shape, fmt, threads))
            q = (lambda w: w) if fmt == "f32" else (lambda w: F.dequantize(F.quantize(w, fmt)))
            self.w1, self.w2 = q(w1), q(w2)

        def __call__(self, x, experts, weights):
            return ref.routed_experts(x, experts, weights, self.w1, self.w2,
                                      trans_w=True).astype(np.float32)

    mod.GgmlExperts = GgmlExperts
    return mod


def test_weights_every_format_is_checked_then_timed(tmp_path, small_probes, capsys):
    from fastmoe_nb import formats as F

    formats = list(bm.WEIGHT_FORMATS)
    status, doc = bench_json(tmp_path, *TINY_Q, "--weights", ",".join(formats))
    assert status == 0
    assert doc["machine"] is None          # the ceilings are the result's, from its rounds
    (res,) = doc["results"]
    assert res["correct"] is True and res["formats"] == formats and res["layout"] == "trans_w"
    assert res["check"]["max_rel_err"] <= res["check"]["tolerance"] == 1e-4
    c = res["ceilings"]
    assert c["read_gbs"] > 0 and c["matmul_gflops"] > 0 and c["matmul_shape"] == [64, 32, 48]
    assert [e["format"] for e in res["weights"]] == formats
    used = 4 - res["routing"]["empty_experts"]
    d = h = 256
    err = {}
    for e in res["weights"]:
        f = F.FORMAT[e["format"]]
        # w1 (E, 2h, d): 2h rows of d values; w2 (E, d, h): d rows of h values
        assert e["bytes"] == used * (2 * h * f.row_bytes(d) + d * f.row_bytes(h))
        assert e["check"]["max_rel_err"] <= 1e-4
        assert len(e["times_s"]) == 2 and e["calls_per_sample"] == 1
        assert e["min_s"] <= e["median_s"] <= e["max_s"]
        bw, rate = c["read_gbs"] * 1e9, c["matmul_gflops"] * 1e9
        assert e["floor_s"] == pytest.approx(max(e["bytes"] / bw, res["flops"] / rate))
        assert e["time_vs_floor"] == pytest.approx(e["median_s"] / e["floor_s"])
        assert e["fraction_of_read_bw"] == pytest.approx(e["bytes"] / e["median_s"] / bw)
        bw, rate = c["best_read_gbs"] * 1e9, c["best_matmul_gflops"] * 1e9
        assert e["best_floor_s"] == pytest.approx(max(e["bytes"] / bw, res["flops"] / rate))
        assert e["best_time_vs_floor"] == pytest.approx(e["min_s"] / e["best_floor_s"])
        err[e["format"]] = e["err_vs_f32"]
    # the float32 layer against reference.py's: float32 rounding; the formats in the order
    # of their bits (bf16 keeps 8 significant bits, q8_0 ~7, q6_k ~5, the 4-bit ones ~3)
    assert err["f32"] < 1e-5
    assert 1e-4 < err["bf16"] < err["q8_0"] < err["q6_k"] < min(err["q4_0"], err["q4_k"]) < 0.3
    out = capsys.readouterr().out
    for col in ("MB", "of read bw", "floor ms", "x floor", "best x floor", "rel RMS vs f32",
                "ceilings"):
        assert col in out, col
    assert "ours/ggml" not in out
    for f in formats:
        assert f"\n{f} " in out


def test_weights_check_refuses_a_wrong_quantized_layer(tmp_path, small_probes, monkeypatch,
                                                     capsys):
    import fastmoe_nb as fm
    from fastmoe_nb.formats import QuantizedWeights

    good = fm.moe_forward

    def off_when_quantized(x, router_w, w1, w2, **kw):
        y = good(x, router_w, w1, w2, **kw)
        return y * 1.01 if isinstance(w1, QuantizedWeights) else y

    monkeypatch.setattr(fm, "moe_forward", off_when_quantized)
    status, doc = bench_json(tmp_path, *TINY_Q, "--weights", "f32,q8_0,q4_0")
    assert status == cli.EXIT_WRONG
    (res,) = doc["results"]
    assert res["correct"] is False and res["check"]["format"] == "q8_0"
    assert res["check"]["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert [e["format"] for e in res["weights"]] == ["f32", "q8_0"]
    assert all("median_s" not in e for e in res["weights"])
    err = capsys.readouterr()
    assert "with q8_0 weights differs from reference.py" in err.err and "WRONG" in err.out


def test_compare_ggml_times_it_beside_each_format(tmp_path, small_probes, monkeypatch,
                                                  capsys):
    mod = fake_ggml(formats=("f32", "q4_0"))
    monkeypatch.setitem(sys.modules, "fastmoe_nb.benchmark.ggml", mod)
    status, doc = bench_json(tmp_path, *TINY_Q, "--weights", "q4_0,q8_0", "--compare", "ggml",
                             "--threads", "1")
    assert status == 0
    assert mod.made == [((4, 512, 256), (4, 256, 256), "q4_0", 1)]   # trans_w layout
    q4, q8 = doc["results"][0]["weights"]
    g = q4["ggml"]
    assert len(g["times_s"]) == 2 and g["median_s"] > 0
    assert q4["ours_vs_ggml"] == pytest.approx(q4["median_s"] / g["median_s"])
    assert q4["ours_vs_ggml_best"] == pytest.approx(q4["min_s"] / g["min_s"])
    assert g["err_vs_f32"] == pytest.approx(q4["err_vs_f32"], rel=1e-3)   # the same weights
    assert g["floor_s"] == q4["floor_s"]
    assert "ggml" not in q8 and "no q8_0" in q8["ggml_skipped"]
    out = capsys.readouterr().out
    assert "ours/ggml" in out and "\n       ggml " in out and "ggml q8_0: skipped" in out
    # a shape ggml's MoE does not compute, named explicitly: an error before anything runs
    assert cli.main(["bench", *TINY_Q, "--weights", "q4_0", "--compare", "ggml",
                     "--activation", "gelu"]) == 2
    assert "SwiGLU" in one_line_error(capsys.readouterr().err)
    # --compare ggml alone: the float32 layer against ggml's
    status, doc = bench_json(tmp_path, *TINY_Q, "--compare", "ggml")
    assert status == 0 and doc["results"][0]["formats"] == ["f32"]
    assert "ggml" in doc["results"][0]["weights"][0]


@pytest.mark.parametrize("module", [None, "unavailable"])
def test_compare_ggml_without_ggml_is_one_line_exit_2(monkeypatch, capsys, module):
    # None in sys.modules: `import fastmoe_nb.benchmark.ggml` raises ImportError
    mod = None if module is None else fake_ggml(available=False)
    monkeypatch.setitem(sys.modules, "fastmoe_nb.benchmark.ggml", mod)
    assert cli.main(["bench", *TINY_Q, "--weights", "q8_0", "--compare", "ggml"]) == 2
    err = capsys.readouterr()
    line = one_line_error(err.err)
    assert "--compare ggml" in line and "pip install 'fastmoe-nb[ggml]'" in line
    assert err.out == ""


def test_bare_compare_with_weights_skips_a_missing_ggml(tmp_path, small_probes, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastmoe_nb.benchmark.ggml", None)
    status, doc = bench_json(tmp_path, *TINY_Q, "--weights", "bf16", "--compare")
    assert status == 0
    (res,) = doc["results"]
    assert "fastmoe-nb[ggml]" in res["skipped_baselines"]["ggml"]
    assert "ggml" not in res["weights"][0]


def test_timed_cold_flushes_before_each_timed_call(monkeypatch):
    monkeypatch.setattr(B, "settle", lambda: None)
    log = []
    t = bm.timed_cold([("a", lambda: log.append("a")), ("b", lambda: log.append("b"))], 2,
                      lambda: log.append("flush"))
    assert log == ["a", "flush", "a", "b", "flush", "b"] * 2
    assert [n for _, n in t] == [1, 1] and all(x.shape == (2,) for x, _ in t)


# --------------------------------------------------------------------------- presets

def test_decode_presets_are_the_issue_shapes():
    want = {"decode-1": (1, 1024, 3584, 8, 2), "decode-8": (8, 1024, 3584, 8, 2),
            "decode-64": (64, 1024, 3584, 8, 2), "deepseek-decode-8": (8, 1024, 512, 64, 6),
            "fine-decode-8": (8, 512, 256, 128, 8)}
    assert {n: P.PRESETS[n].shape for n in P.DECODE_PRESETS} == want
    for n in want:   # every format's blocks fit: d and h multiples of 256
        p = P.PRESETS[n]
        assert p.activation == "swiglu" and p.d % 256 == 0 and p.h % 256 == 0


def test_cpu_performance_presets_are_the_issue_shapes():
    want = {"mixtral-mini": (2048, 1024, 3584, 8, 2), "deepseek-mini": (2048, 1024, 512, 64, 6),
            "fine-128": (2048, 512, 256, 128, 8), "decode-8": (8, 1024, 3584, 8, 2)}
    assert {n: P.PRESETS[n].shape for n in P.CPU_PERF_PRESETS} == want
    assert all(P.PRESETS[n].activation == "swiglu" for n in want)


def test_every_preset_is_a_valid_layer():
    from fastmoe_nb.ops.routing import check_sigmoid_options

    for name in P.MODEL_PRESETS:
        assert f"{name}-laptop" in P.PRESETS
    for p in P.PRESETS.values():
        assert 1 <= p.k <= p.experts
        if p.router == "sigmoid_topk":
            check_sigmoid_options(p.experts, p.k, None, p.n_group, p.topk_group, p.scale,
                                  np.float32)
    assert P.PRESETS["switch"].capacity() == 40     # ceil(1.25 * 4096 * 1 / 128)
    assert P.PRESETS["olmoe"].renormalize is False
    assert P.PRESETS["deepseek-v3"].router_kwargs() == {
        "router": "sigmoid_topk", "renormalize": True, "n_group": 8, "topk_group": 4,
        "scale": 2.5}


# --------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("name", ["deepseek-v3-laptop", "switch-laptop", "olmoe-laptop"])
def test_numpy_baseline_matches_the_reference(name):
    p = P.get_preset(name).replace(tokens=37, d=20, h=12, experts=8,
                                   **({"n_group": 4, "topk_group": 2} if "deepseek" in name
                                      else {}))
    p = p.replace(k=min(p.k, 4))
    inp = B.layer_inputs(p, dtype=np.float64, seed=3)
    kw = B.layer_kwargs(p, inp)
    got = B.numpy_moe_forward(inp["x"], inp["router_w"], inp["w1"], inp["w2"], **kw)
    want = ref.moe_forward(inp["x"], inp["router_w"], inp["w1"], inp["w2"], **kw)
    assert_close(got, want)


def test_numpy_grouped_gemm_matches_the_reference():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((11, 7)).astype(np.float32)
    w = rng.standard_normal((3, 7, 5)).astype(np.float32)
    offsets = np.array([0, 4, 4, 11])           # expert 1 has no row
    assert_close(B.numpy_grouped_gemm(a, w, offsets), ref.grouped_gemm(a, w, offsets))
    wt = np.ascontiguousarray(w.transpose(0, 2, 1))
    assert_close(B.numpy_grouped_gemm(a, wt, offsets, trans_w=True),
                 ref.grouped_gemm(a, w, offsets))


def test_hf_mixtral_block_matches_the_reference():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    p = P.get_preset("mixtral-mini").replace(tokens=19, d=16, h=24, experts=4, k=2)
    inp = B.layer_inputs(p, seed=5)
    want = ref.moe_forward(inp["x"], inp["router_w"], inp["w1"], inp["w2"], k=2)
    for impl in B.HF_IMPLEMENTATIONS:
        fwd, step = B.hf_mixtral_block(inp, 2, impl)
        assert_close(fwd(), want, rtol=1e-5)
        assert step().shape == (1, 19, 16)


def test_zipf_experts_are_distinct_and_skewed():
    e = B.zipf_experts(2000, 8, 3, a=1.5, seed=1)
    assert e.shape == (2000, 3) and e.dtype == np.int32
    assert all(len(set(row)) == 3 for row in e.tolist())
    counts = np.bincount(e.ravel(), minlength=8)
    assert np.all(np.diff(counts[:4]) < 0)           # popularity falls with the rank
    assert counts[0] > 3 * counts[7]
    assert np.allclose(B.zipf_probs(5, 0.0), 0.2)


def test_layer_inputs_skew_the_routing():
    p = P.get_preset("fine-128").replace(tokens=512, d=32, h=8, experts=16, k=2)
    inp = B.layer_inputs(p, seed=0, zipf=1.5)
    counts = np.bincount(ref.softmax_topk(inp["x"] @ inp["router_w"], 2).experts.ravel(),
                         minlength=16)
    assert counts[0] > 3 * counts.mean() > 3 * counts[15]


def test_machine_measurements_are_positive():
    assert B.read_bandwidth(nbytes=1 << 20, repeat=2) > 0
    assert B.matmul_rate(shape=(64, 32, 48), repeat=2) > 0


def test_time_interleaved_calls_each_fn_once_a_round(monkeypatch):
    monkeypatch.setattr(B, "settle", lambda: None)
    calls = []
    t = B.time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeat=3,
                           warmup=1)
    assert calls == ["a", "a", "b", "b"] * 3          # a warm-up call before each timed one
    assert t.shape == (2, 3) and np.all(t >= 0)


def test_bench_times_the_op_and_its_baselines_in_rounds(monkeypatch):
    # benchmark.timed: one n-choosing call each, then per round a warm-up sample and a timed
    # sample of every fn in turn; a fast fn is timed n calls (and one sync) a sample
    monkeypatch.setattr(B, "settle", lambda: None)
    log, steps = [], []

    def slow():
        log.append("op")
        time.sleep(bm.MIN_SAMPLE_S)

    progress = type("P", (), {"step": lambda self, what: steps.append(what)})()
    runs = [("op", slow, lambda: log.append("sync-op")),
            ("fast", lambda: log.append("fast"), lambda: log.append("sync-fast"))]
    (t_op, n_op), (t_fast, n_fast) = bm.timed(runs, 2, progress)
    assert n_op == 1 and n_fast > 1
    assert t_op.shape == t_fast.shape == (2,) and t_op.min() >= bm.MIN_SAMPLE_S
    first = ["op", "sync-op", "fast", "sync-fast"]
    one = (["op", "sync-op"] * 2 + (["fast"] * n_fast + ["sync-fast"]) * 2)
    assert log == first + one * 2
    assert steps == ["op", "fast"] * 2


# --------------------------------------------------------------------------- the harness

TINY_PRESET = P.get_preset("mixtral-mini").replace(tokens=48, d=24, h=40, experts=4, k=2)


@pytest.mark.parametrize("op", bm.CASE_OPS)
def test_every_case_passes_its_check_and_builds_its_baselines(op):
    case = bm.make_case(op, TINY_PRESET, "float32", bm.Host(), 0, None, 16)
    err, what = case.check(case.run())
    assert err <= bm.TOLERANCE["float32"], (op, what, err)
    for name, make in case.baselines.items():
        b = make if isinstance(make, str) else make()
        assert isinstance(b, (str, bm.Baseline)), name
        if isinstance(b, bm.Baseline) and b.check is not None:
            assert b.check(b.run()) <= bm.TOLERANCE["float32"], name


def test_router_and_kernel_cases_pass_their_checks():
    from fastmoe_nb.benchmark.kernels import cpu_kernel_cases
    from fastmoe_nb.benchmark.routers import router_cases

    cases, size = router_cases(tokens=64, experts=8, k=2)
    assert size["capacity"] >= 1
    cases.update(cpu_kernel_cases(TINY_PRESET))
    for name, case in cases.items():
        err, what = case.check(case.run())
        assert err <= bm.TOLERANCE["float32"], (name, what, err)


def test_run_cases_refuses_to_time_a_wrong_result(monkeypatch):
    monkeypatch.setattr(B, "settle", lambda: None)
    calls = []
    good = bm.Case(lambda: np.ones(3), lambda out: (bm.rel_err(out, np.ones(3)), "all"), 6.0,
                   24.0, {"twice": lambda: bm.Baseline(lambda: calls.append(1) or np.ones(3)),
                          "missing": "not here"})
    wrong = bm.Case(lambda: np.zeros(3), lambda out: (bm.rel_err(out, np.ones(3)), "all"), 0.0,
                    24.0, {"twice": lambda: bm.Baseline(lambda: calls.append(2))})
    rows = bm.run_cases({"good": good, "wrong": wrong}, repeat=2)
    assert [r["correct"] for r in rows] == [True, False]
    assert rows[0]["check"]["max_rel_err"] == 0.0 and len(rows[0]["times_s"]) == 2
    assert rows[0]["skipped_baselines"] == {"missing": "not here"}
    assert "times_s" not in rows[1] and 2 not in calls      # nothing of it was timed
    assert bm.exit_status(rows) == 1 and bm.exit_status(rows[:1]) == 0
    out = io.StringIO()
    bm.table(rows, out)
    text = out.getvalue()
    assert "WRONG: not timed" in text and "good missing: skipped (not here)" in text


def test_rel_err_compares_indices_exactly():
    assert bm.rel_err(np.array([1, 2]), np.array([1, 2])) == 0.0
    assert bm.rel_err(np.array([1, 3]), np.array([1, 2])) == float("inf")
    assert bm.rel_err(np.ones(2), np.ones(3)) == float("inf")
    assert bm.rel_err(np.array([1.0, 2.0]), np.array([1.0, 2.5])) == pytest.approx(0.2)
