"""T=1 against llm-compressor's SparseGPT over several calibration draws or orders (issue 23).

    python benchmarks/vs_llmcompressor_draws.py benchmarks/results/vs_llmcompressor_search.json \
        benchmarks/results/vs_llmcompressor_draw1.json ... [--out benchmarks/results/vs_llmcompressor_draws]

Each JSON is one run of ``benchmarks/vs_llmcompressor.py`` (both sides in the same run, on that run's calibration
draw, ``--calib-draw K``, or order of the same windows, ``--calib-order K``; the held-out windows are the same in
every run).  Per sparsity and held-out text it
prints ours T=1 / their SparseGPT for each draw, the mean ratio and its standard error, and says whether T=1 is
within 1% (mean ratio <= 1.01).  Nothing is re-run.
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


def table(r: dict, n_runs: int, ppl: dict) -> list[str]:
    lines = ["| sparsity | held-out | ours T=1 / SparseGPT per run | mean | s.e. | within 1% (mean) "
             "| ppl ours, mean (sd) | ppl theirs, mean (sd) |",
             "|---|---|---|---|---|---|---|---|"]
    for (sp, h), v in r.items():
        m = statistics.fmean(v)
        se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        sides = f"{_mean_sd(ppl[(sp, h)]['ours'])} | {_mean_sd(ppl[(sp, h)]['theirs'])}"
        lines.append(f"| {sp} | {h} | {' / '.join(f'{x:.3f}' for x in v)} | {m:.4f} | {se:.4f} | "
                     f"{'yes' if m <= 1.01 else 'no'} | {sides} |")
    allv = [x for v in r.values() for x in v]
    lines.append(f"\nall {len(allv)} ratios ({n_runs} runs): mean {statistics.fmean(allv):.4f}, "
                 f"min {min(allv):.3f}, max {max(allv):.3f}; single ratios > 1.01: {sum(x > 1.01 for x in allv)}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="vs_llmcompressor JSON files, one per calibration draw / order")
    ap.add_argument("--out", default=None, help="write the table to OUT.md as well")
    args = ap.parse_args(argv)
    r, ppl, calib = ratios(args.runs)
    if not r:
        ap.error("runs: no run holds both 'llmc SparseGPT' and 'ours OBS-IHT T=1' rows")
    lines = ["calibration: " + "; ".join(calib), ""] + table(r, len(args.runs), ppl)
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
