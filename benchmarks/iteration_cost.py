"""Per-iteration cost of OBS-IHT against its T=1 prune, read from benchmark JSON files (issue 18).

    python benchmarks/iteration_cost.py benchmarks/results/vs_llmcompressor_T8.json [more.json ...] [--out STEM]

For every "best T" row (``history`` holds each iteration's ``seconds``: the gradient pass, direction and
projection, step search) it prints the phases, the iteration total and its ratio to the same sparsity's T=1
prune time (the sequential calibration + sweep, ``prune_seconds`` of the T=1 row of the same run).  Nothing is
re-run.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import emit


def cost_rows(path: str) -> list[dict]:
    d = json.loads(Path(path).read_text())
    rows = d["rows"]
    out = []
    for r in rows:
        if not r.get("history"):
            continue
        t1 = [x for x in rows if x["sparsity"] == r["sparsity"] and x["method"].endswith("OBS-IHT T=1")]
        base = t1[0]["prune_seconds"] if t1 else None
        mine = []
        for h in r["history"]:
            s = h.get("seconds")
            if not s:
                continue
            total = s["gradient"] + s["direction_and_projection"] + s["step_search"]
            mine.append({"run": Path(path).stem, "sparsity": r["sparsity"], "iteration": h["iteration"],
                         "gradient": s["gradient"], "projection": s["direction_and_projection"],
                         "search": s["step_search"], "trials": s["trials"], "total": total, "t1": base,
                         "ratio": total / base if base else None, "accepted": h.get("accepted")})
        # the row's time outside the iterations' phases and its own T=1 sweep (mostly the held-out loss of the
        # T=1 plan the iterations start from): in no iteration's total, so reported beside them
        outside = (r["prune_seconds"] - base - sum(m["total"] for m in mine)) if (base and mine and
                                                                                   r.get("prune_seconds")) else None
        for m in mine:
            m["outside"] = outside
            m["n_row"] = len(mine)
        out += mine
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None, help="also write the table to OUT.md")
    args = ap.parse_args(argv)
    rows = [r for p in args.runs for r in cost_rows(p)]
    if not rows:
        ap.error("runs: no row with an iteration history")
    lines = ["| run | sparsity | iteration | gradient s | direction + projection s | step search s (trials) | "
             "total s | T=1 prune s | total / T=1 | accepted |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['sparsity']} | {r['iteration']} | {r['gradient']:.1f} | "
                     f"{r['projection']:.1f} | {r['search']:.1f} ({r['trials']}) | {r['total']:.1f} | "
                     f"{r['t1']:.1f} | {r['ratio']:.2f} | {r['accepted']} |")
    ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
    lines.append(f"\n{len(ratios)} iterations: total / T=1 from {min(ratios):.2f} to {max(ratios):.2f}, "
                 f"median {statistics.median(ratios):.2f}; <= 1.0 for {sum(x <= 1.0 for x in ratios)} of "
                 f"{len(ratios)}")
    extra = [r for r in rows if r["ratio"] is not None and r.get("outside") is not None]
    if extra:
        spread = [(r["total"] + r["outside"] / r["n_row"]) / r["t1"] for r in extra]
        first_it = {}
        for r in extra:
            key = (r["run"], r["sparsity"])
            first_it[key] = min(first_it.get(key, r["iteration"]), r["iteration"])
        first = [(r["total"] + (r["outside"] if r["iteration"] == first_it[(r["run"], r["sparsity"])] else 0.0))
                 / r["t1"] for r in extra]
        out_s = sorted({(r["run"], r["sparsity"]): r["outside"] for r in extra}.values())
        lines.append(f"Time of the best-T rows outside the iterations' phases (their own T=1 sweep excluded; mostly "
                     f"the held-out loss of the starting plan): {out_s[0]:.1f} to {out_s[-1]:.1f} s per row. Spread "
                     f"over the row's iterations: <= 1.0 for {sum(x <= 1.0 for x in spread)} of {len(spread)} "
                     f"(max {max(spread):.3f}); charged to the first iteration: <= 1.0 for "
                     f"{sum(x <= 1.0 for x in first)} of {len(first)}")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
