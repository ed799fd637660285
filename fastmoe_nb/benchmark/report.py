"""Result rows as text: the command's block per result (print_result), one table over many
results for the bench/ scripts (table), and the plot of a sweep."""
from __future__ import annotations

import sys


def ms(t):
    """Seconds as milliseconds, never with an exponent: whole milliseconds for long calls, one
    decimal for calls of a millisecond or more, three below."""
    if t is None:
        return "-"
    m = t * 1e3
    return f"{m:.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def num(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _err(check):
    return "inf" if check["max_rel_err"] is None else f"{check['max_rel_err']:.1e}"


def print_result(res, out=None):
    """One result of `fastmoe-nb bench`: the configuration, the check, the routing, and the
    timings of fastmoe_nb and each baseline."""
    s = res["shape"]
    w = (out or sys.stdout).write
    w(f"\n{res['op']}  preset {res['name']}  T={s['tokens']} d={s['d']} h={s['h']} "
      f"E={s['experts']} k={s['k']}  {res['activation']} {res['router']}  {res['dtype']}  "
      f"{res['backend']}  {res['threads']} threads"
      + (f"  skew {res['skew']}" if res["skew"] else "") + "\n")
    c = res["check"]
    w(f"check vs {c['reference']}: max rel err {_err(c)} (tolerance {c['tolerance']:.0e}, "
      f"{c['checked']}) {'OK' if res['correct'] else 'WRONG: not timed'}\n")
    if not res["correct"]:
        return
    r = res["routing"]
    w(f"first call {res['first_call_s']:.2f} s (compile or cache load, ~{res['compile_s']:.2f}"
      f" s over a timed call); routed rows N={r['rows']}, dropped {r['dropped']}, "
      f"busiest expert {num(r['max_over_mean'], '{:.2f}')}x the mean, "
      f"{r['empty_experts']} empty\n")
    rows = [("fastmoe_nb", res)] + [(b["name"], b) for b in res["baselines"]]
    w(f"{'impl':<15}{'median ms':>10}{'min ms':>9}{'max ms':>9}{'GFLOP/s':>9}{'GB/s':>8}"
      f"{'of peak':>9}  {'bound':<8}{'time/ours':>9}\n")
    for name, e in rows:
        frac = "-" if e["fraction_of_peak"] is None else f"{e['fraction_of_peak']:.0%}"
        ratio = e.get("time_vs_fastmoe_nb", 1.0)
        w(f"{name:<15}{ms(e['median_s']):>10}{ms(e['min_s']):>9}{ms(e['max_s']):>9}"
          f"{num(e['gflops']):>9}{num(e['gbs']):>8}{frac:>9}  {e['bound'] or '-':<8}"
          f"{ratio:>8.2f}x\n")
    for name, why in res.get("skipped_baselines", {}).items():
        w(f"  {name}: skipped ({why})\n")


def _ratio(r):
    """A time ratio: two decimals, three below 0.1."""
    return "" if r is None else f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def print_weights(res, out=None):
    """One result of `fastmoe-nb bench --weights`: the configuration, the check of every
    format, the ceilings measured in its rounds, and per format (and ggml's MoE on it) the
    selected experts' MB, median / min ms, the fraction of the read bandwidth, the roofline
    floor, time over floor, the error against the float32 layer and our time over ggml's."""
    s = res["shape"]
    w = (out or sys.stdout).write
    w(f"\n{res['op']}  preset {res['name']}  T={s['tokens']} d={s['d']} h={s['h']} "
      f"E={s['experts']} k={s['k']}  {res['activation']} {res['router']}  weights "
      f"{','.join(res['formats'])} (trans_w, GGUF's layout)  {res['backend']}  "
      f"{res['threads']} threads" + (f"  skew {res['skew']}" if res["skew"] else "") + "\n")
    c = res["check"]
    what = f" in {c['format']}" if "format" in c else ""
    w(f"check vs {c['reference']}: max rel err {_err(c)}{what} (tolerance "
      f"{c['tolerance']:.0e}, {c['checked']}) {'OK' if res['correct'] else 'WRONG: not timed'}"
      "\n")
    if not res["correct"]:
        return
    r, m = res["routing"], res["ceilings"]
    w(f"routed rows N={r['rows']}, dropped {r['dropped']}, {r['empty_experts']} experts empty; "
      f"first calls " + ", ".join(f"{e['format']} {e['first_call_s']:.2f} s"
                                  for e in res["weights"]) + "\n")
    w(f"ceilings in the same rounds (median, best): read {m['read_gbs']:.1f}, "
      f"{m['best_read_gbs']:.1f} GB/s, dense float32 matmul {m['matmul_gflops']:.0f}, "
      f"{m['best_matmul_gflops']:.0f} GFLOP/s; every call after a {m['flushed_bytes'] >> 20} "
      "MiB read (caches flushed)\n")
    ggml = any("ggml" in e for e in res["weights"])
    w(f"{'format':<7}{'impl':<12}{'MB':>8}{'median ms':>11}{'min ms':>9}{'of read bw':>11}"
      f"{'floor ms':>10}{'x floor':>9}{'best x floor':>14}{'rel RMS vs f32':>16}"
      + (f"{'ours/ggml':>11}{'best':>7}" if ggml else "") + "\n")
    for e in res["weights"]:
        rows = [("fastmoe_nb", e, f"{_ratio(e.get('ours_vs_ggml')):>11}"
                 f"{_ratio(e.get('ours_vs_ggml_best')):>7}")]
        if "ggml" in e:
            rows.append(("ggml", e["ggml"], ""))
        for i, (name, t, ratio) in enumerate(rows):
            mb = f"{e['bytes'] / 1e6:.1f}" if i == 0 else ""   # the same bytes for ggml
            w(f"{e['format'] if i == 0 else '':<7}{name:<12}{mb:>8}"
              f"{ms(t['median_s']):>11}{ms(t['min_s']):>9}{t['fraction_of_read_bw']:>11.2f}"
              f"{ms(t['floor_s']):>10}{t['time_vs_floor']:>9.2f}"
              f"{t['best_time_vs_floor']:>14.2f}{t['err_vs_f32']:>16.1e}"
              + (ratio if ggml else "") + "\n")
    for e in res["weights"]:
        if "ggml_skipped" in e:
            w(f"  ggml {e['format']}: skipped ({e['ggml_skipped']})\n")
    for name, why in res.get("skipped_baselines", {}).items():
        w(f"  {name}: skipped ({why})\n")


def table(results, out=None):
    """Many results (each with a "case" name) as one table: a line per implementation with
    the check's error, median and min ms, GFLOP/s, GB/s and the time relative to
    fastmoe_nb's (a case refused as wrong: one line, not timed); then the baselines that
    could not run here."""
    w = (out or sys.stdout).write
    width = max([len(r["case"]) for r in results] + [4]) + 2
    w(f"{'case':<{width}}{'impl':<20}{'rel err':>9}{'median ms':>11}{'min ms':>9}"
      f"{'GFLOP/s':>9}{'GB/s':>8}{'time/ours':>10}\n")
    for r in results:
        if not r["correct"]:
            w(f"{r['case']:<{width}}{'fastmoe_nb':<20}{_err(r['check']):>9}  WRONG: not timed "
              f"({r['check']['checked']} vs {r['check']['reference']})\n")
            continue
        rows = [("fastmoe_nb", r, _err(r["check"]))] + [
            (b["name"], b, "-" if b["max_rel_err"] is None else f"{b['max_rel_err']:.1e}")
            for b in r["baselines"]]
        for i, (name, e, err) in enumerate(rows):
            w(f"{r['case'] if i == 0 else '':<{width}}{name:<20}{err:>9}{ms(e['median_s']):>11}"
              f"{ms(e['min_s']):>9}{num(e['gflops']):>9}{num(e['gbs']):>8}"
              f"{e.get('time_vs_fastmoe_nb', 1.0):>9.2f}x\n")
    for r in results:
        for name, why in r.get("skipped_baselines", {}).items():
            w(f"  {r['case']} {name}: skipped ({why})\n")


def write_plot(path, results, key, machine):
    import matplotlib  # noqa: PLC0415  (optional: the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ok = [r for r in results if r.get("correct")]
    xs = [r["sweep_value"] for r in ok]
    compute = any(r.get("bound") == "compute" for r in ok)
    metric, label = ("gflops", "GFLOP/s") if compute else ("gbs", "GB/s")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r[metric] for r in ok], "o-", label="fastmoe_nb")
    names = list(dict.fromkeys(b["name"] for r in ok for b in r.get("baselines", [])))
    for n in names:
        pts = [(r["sweep_value"], b[metric]) for r in ok for b in r["baselines"]
               if b["name"] == n and b.get(metric) is not None]
        if pts:
            ax.plot(*zip(*pts), "s--", label=n)
    if machine and ok and ok[0]["backend"] == "cpu":
        ceiling = machine["matmul_gflops"] if compute else machine["read_gbs"]
        ax.axhline(ceiling, color="grey", ls=":", label=f"machine {label} (measured)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel(label)
    r0 = ok[0] if ok else results[0]
    ax.set_title(f"fastmoe-nb bench {r0['op']} ({r0['preset']}, {r0['dtype']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
