"""T=1 against llm-compressor's SparseGPT over several calibration draws or orders (issue 23).

    python benchmarks/vs_llmcompressor_draws.py benchmarks/results/vs_llmcompressor_search.json \
        benchmarks/results/vs_llmcompressor_draw1.json ... [--out benchmarks/results/vs_llmcompressor_draws]

Each JSON is one run of ``benchmarks/vs_llmcompressor.py`` (both sides in the same run, on that run's calibration
draw, ``--calib-draw K``, or order of the same windows, ``--calib-order K``; the held-out windows are the same in
every run).  Per sparsity and held-out text it
prints ours T=1 / their SparseGPT for each draw, the mean ratio and its standard error, and says whether T=1 is
within 1% (mean ratio <= 1.01).  Because a mean of ratios leans upwards (Jensen) and a single run can move
either side by several percent, it also gives the geometric mean of the ratios (exp of the mean log ratio)
with a 95% interval (Student t on the mean log ratio), and in how many runs ours was the lower.  ``--vs FILE ...``: runs of another variant of
ours (e.g. ``--sequential sublayer``) on the same calibration windows and orders; each run is paired with the one
of the same calibration (``setup["calib"]``) and our two T=1 perplexities are compared the same way.  Nothing is
re-run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from _common import emit


def ratios(paths: list[str]) -> tuple[dict, dict, list[str]]:
    """{(sparsity, text): [ratio per run]}, {(sparsity, text): {"ours": [...], "theirs": [...]}} (each side's
    perplexity per run) and the runs' calibration descriptions."""
    out: dict = {}
    ppl: dict = {}
    calib = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        calib.append(d["setup"]["calib"])
        rows = d["rows"]
        for sp in dict.fromkeys(r["sparsity"] for r in rows if r["sparsity"] != "0"):
            theirs = [r for r in rows if r["sparsity"] == sp and r["method"] == "llmc SparseGPT"]
            ours = [r for r in rows if r["sparsity"] == sp and r["method"] == "ours OBS-IHT T=1"]
            if not (theirs and ours):
                continue
            for h, v in theirs[0]["ppl"].items():
                out.setdefault((sp, h), []).append(ours[0]["ppl"][h] / v)
                side = ppl.setdefault((sp, h), {"ours": [], "theirs": []})
                side["ours"].append(ours[0]["ppl"][h])
                side["theirs"].append(v)
    return out, ppl, calib


def _mean_sd(v: list) -> str:
    return f"{statistics.fmean(v):.2f} ({statistics.stdev(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (``p`` in (0.5, 1)) by bisection on the CDF, the CDF by Simpson's rule on the density
    (no scipy here; accurate to ~1e-9, far below the digits reported)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float, n: int = 4000) -> float:
        h = t / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def geometric(v: list) -> tuple[float, float, float]:
    """Geometric mean of the ratios and its 95% interval: Student t with n - 1 degrees of freedom on the mean log
    ratio (nan with one run).  (Before the eleventh session the interval used the normal 1.96, too narrow for
    few runs: 1.62x at n = 4.)"""
    logs = [math.log(x) for x in v]
    m = statistics.fmean(logs)
    n = len(logs)
    half = t_quantile(0.975, n - 1) * statistics.stdev(logs) / math.sqrt(n) if n > 1 else float("nan")
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def table(r: dict, n_runs: int, ppl: dict, per_run: bool = True) -> list[str]:
    lines = ["| sparsity | held-out | runs | " + ("ours T=1 / SparseGPT per run | " if per_run else "")
             + "mean | s.e. | within 1% (mean) | geometric mean [95%] | ours lower in "
             "| ppl ours, mean (sd) | ppl theirs, mean (sd) |",
             "|---|---|---|" + ("---|" if per_run else "") + "---|---|---|---|---|---|---|"]
    for (sp, h), v in r.items():
        m = statistics.fmean(v)
        se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        g, lo, hi = geometric(v)
        sides = f"{_mean_sd(ppl[(sp, h)]['ours'])} | {_mean_sd(ppl[(sp, h)]['theirs'])}"
        each = f"{' / '.join(f'{x:.3f}' for x in v)} | " if per_run else ""
        lines.append(f"| {sp} | {h} | {len(v)} | {each}{m:.4f} | {se:.4f} | {'yes' if m <= 1.01 else 'no'} | "
                     f"{g:.4f} [{lo:.4f}, {hi:.4f}] | {sum(x < 1 for x in v)} of {len(v)} | {sides} |")
    allv = [x for v in r.values() for x in v]
    lines.append(f"\nall {len(allv)} ratios ({n_runs} runs): mean {statistics.fmean(allv):.4f}, "
                 f"min {min(allv):.3f}, max {max(allv):.3f}; single ratios > 1.01: {sum(x > 1.01 for x in allv)}")
    return lines


def ours_by_calib(paths: list[str]) -> dict:
    """{calibration description: {(sparsity, text): our T=1 perplexity, (sparsity, "seconds"): its prune time}}."""
    out = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        row = out.setdefault(d["setup"]["calib"], {})
        for r in d["rows"]:
            if r["method"] == "ours OBS-IHT T=1":
                for h, v in r["ppl"].items():
                    row[(r["sparsity"], h)] = v
                row[(r["sparsity"], "seconds")] = r["prune_seconds"]
    return out


def paired(runs: list[str], vs: list[str]) -> list[str]:
    """Ours in ``runs`` against ours in ``vs``, paired by calibration."""
    a, b = ours_by_calib(runs), ours_by_calib(vs)
    both = [c for c in a if c in b]
    lines = [f"\nours ({len(both)} runs) / ours in --vs, paired by calibration:", "",
             "| sparsity | held-out | pairs | geometric mean [95%] | lower in |", "|---|---|---|---|---|"]
    keys = dict.fromkeys(k for c in both for k in a[c] if k in b[c])
    for k in keys:
        v = [a[c][k] / b[c][k] for c in both if k in a[c] and k in b[c]]
        if k[1] == "seconds":  # prune time: the median ratio and its range (times depend on the machine's load)
            lines.append(f"| {k[0]} | T=1 prune time | {len(v)} | median {statistics.median(v):.3f} "
                         f"({min(v):.3f} … {max(v):.3f}) | {sum(x < 1 for x in v)} of {len(v)} |")
            continue
        g, lo, hi = geometric(v)
        lines.append(f"| {k[0]} | {k[1]} | {len(v)} | {g:.4f} [{lo:.4f}, {hi:.4f}] | {sum(x < 1 for x in v)} of {len(v)} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="vs_llmcompressor JSON files, one per calibration draw / order")
    ap.add_argument("--out", default=None, help="write the table to OUT.md as well")
    ap.add_argument("--no-per-run", action="store_true", help="leave out the column listing every run's ratio")
    ap.add_argument("--vs", nargs="+", default=None, help="runs of another variant of ours to pair with (by calibration)")
    args = ap.parse_args(argv)
    r, ppl, calib = ratios(args.runs)
    if not r:
        ap.error("runs: no run holds both 'llmc SparseGPT' and 'ours OBS-IHT T=1' rows")
    lines = ["calibration: " + "; ".join(calib), ""] + table(r, len(args.runs), ppl, per_run=not args.no_per_run)
    if args.vs:
        lines += paired(args.runs, args.vs)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
