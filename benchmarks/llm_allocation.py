"""How the sparsity is spread over SmolLM2's 210 decoder weights, and what it does to held-out perplexity
(issue 19): OBS-IHT T=1 (sequential calibration) with ``allocation`` "uniform" (every weight the same fraction),
"global" (one ranking of sigma_i w^2/[H^-1]_jj under the per-layer cap) and "owl" (outlier-weighted layer-wise
sparsity, Yin et al. 2023: block sparsities within s +- owl_lambda), on the mixed calibration set, perplexity on
Shakespeare plays and Jane Austen (never used for a choice).  OWL's lambda and M are the paper's defaults
(0.08, 5), not tuned here.  Writes a table, the JSON (with every weight's sparsity) and a plot of the per-block
sparsities.

    python benchmarks/llm_allocation.py --sparsities 0.7 --calib 32 --eval 16
"""
from __future__ import annotations

import argparse
import re
import time

import torch

from _common import add_threads_argument, command_line, pyplot, save_figure, set_threads, write_results

from obs_plugins import Curvature, OBSIHTConfig, api
from obs_plugins.methods.obs_iht import solve
from obs_plugins.experiment import (WINDOW_CHARS, per_source, dense_row, load_texts, setup_smollm2, window_starts,
                                    windows_at)
from obs_plugins.lm import causal_lm_batches, causal_lm_loss, perplexity

SELECT_DRAW = 1000   # the selection windows' draw (fixed, so every calibration draw is judged on the same text)


def selection_windows(tokenizer, calib_text: dict, n: int, n_calib: int, calib_draw: int, seq_len: int = 256):
    """``n`` windows spread over the calibration sources (as the calibration set is), none overlapping a
    calibration window of ``calib_draw``: candidates of draw ``SELECT_DRAW``, two spare per source."""
    chars = seq_len * WINDOW_CHARS
    out = []
    for (src, text), n_cal, n_sel in zip(calib_text.items(), per_source(n_calib, len(calib_text)),
                                         per_source(n, len(calib_text))):
        if not n_sel:
            continue
        used = window_starts(len(text), n_cal, seq_len, calib_draw)
        free = [s for s in window_starts(len(text), n_sel + 2, seq_len, SELECT_DRAW)
                if all(abs(s - u) >= chars for u in used)]
        if len(free) < n_sel:
            raise RuntimeError(f"--select: only {len(free)} windows of {src!r} clear of the calibration windows")
        out.append(windows_at(tokenizer, text, free[:n_sel], seq_len))
    return torch.cat(out)


def block_of(key: str) -> int:
    return int(key.split("model.layers.")[1].split(".")[0])


def _stage(row: dict) -> str:
    """"T=1", or "best T<=N" for a row continued by N - 1 OBS-IHT iterations (runs before --iterations: T=1)."""
    return row.get("stage", "T=1")


def summary(paths: list[str], out: str | None = None) -> str:
    """Per run (calibration draw) and sparsity: each allocation's perplexity over uniform's on every text, and
    the geometric mean of those ratios over the runs (a markdown table; also written to ``out`` + .md)."""
    import json
    import math
    runs = [json.load(open(p)) for p in paths]
    texts = list(runs[0]["rows"][0]["ppl"])
    ratios: dict[tuple, list[float]] = {}
    lines = [f"Runs: {', '.join(paths)}", "",
             "| run | sparsity | allocation | " + " | ".join(f"ppl {h} (/ uniform)" for h in texts) + " | prune s |",
             "|---|---|---|" + "---|" * len(texts) + "---|"]
    for path, run in zip(paths, runs):
        rows = [r for r in run["rows"] if r["allocation"] != "-"]
        uni = {(r["sparsity"], _stage(r)): r for r in rows if r["allocation"] == "uniform"}
        for r in rows:
            base = uni.get((r["sparsity"], _stage(r)))   # best T is compared with uniform's best T
            cells = []
            label = r["allocation"] + ("" if _stage(r) == "T=1" else f", {_stage(r)}")
            for h in texts:
                q = r["ppl"][h] / base["ppl"][h] if base else float("nan")
                ratios.setdefault((r["sparsity"], label, h), []).append(q)
                cells.append(f"{r['ppl'][h]:.2f} ({q:.3f})")
            draw = re.search(r"\(draw (\d+)\)", run["setup"]["calib"])
            chosen = f" (T={r['best_iteration']})" if "best_iteration" in r else ""
            lines.append(f"| draw {draw.group(1) if draw else 0} | {r['sparsity']} | {label}{chosen} | "
                         + " | ".join(cells) + f" | {r['prune_seconds']:.0f} |")
    lines += ["", "| sparsity | allocation | " + " | ".join(f"{h}: geometric mean / uniform, lower in" for h in texts)
              + " |", "|---|---|" + "---|" * len(texts)]
    for sp in sorted({k[0] for k in ratios}):
        for alloc in sorted({k[1] for k in ratios if k[0] == sp}):
            if alloc.split(",")[0] == "uniform":
                continue
            cells = []
            for h in texts:
                v = ratios[(sp, alloc, h)]
                g = math.exp(sum(math.log(x) for x in v) / len(v))
                cells.append(f"{g:.3f}, {sum(x < 1 for x in v)} of {len(v)}")
            lines.append(f"| {sp} | {alloc} | " + " | ".join(cells) + " |")
    md = "\n".join(lines) + "\n"
    if out:
        with open(out + ".md", "w") as f:
            f.write(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.7")
    ap.add_argument("--allocations", default="uniform,global,owl")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--calib-draw", type=int, default=0,
                    help="another set of calibration windows from the same texts (0: the default set); the "
                         "held-out windows are the same for every draw")
    ap.add_argument("--select", type=int, default=0,
                    help="N > 0: perplexity also on N windows of the calibration sources clear of every calibration "
                         "window (the set to choose an allocation on)")
    ap.add_argument("--out", default="benchmarks/results/llm_allocation")
    ap.add_argument("--iterations", type=int, default=1,
                    help="T > 1: also continue each T=1 plan with OBS-IHT iterations and report the best T <= this "
                         "(chosen on the calibration hold-out, as the main job does)")
    ap.add_argument("--blocks", type=int, default=None, help="prune only the first N decoder blocks (smoke test)")
    ap.add_argument("--no-progress", action="store_true")
    add_threads_argument(ap, default=2)
    ap.add_argument("--summary", nargs="+", default=None, metavar="JSON",
                    help="summarise earlier runs' JSON files (ratios to uniform per run, geometric means); with "
                         "--out also written to <out>.md")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary, args.out if args.out != ap.get_default("out") else None))
        return 0
    set_threads(args.threads)
    progress = not args.no_progress
    t_all = time.perf_counter()
    if args.calib_draw < 0:
        ap.error(f"--calib-draw: 0 (the default windows) or a positive draw, got {args.calib_draw}")
    texts = load_texts()
    setup = setup_smollm2(n_calib=args.calib, n_eval=args.eval, blocks=args.blocks, calib_draw=args.calib_draw,
                          texts=texts)
    if args.select:
        setup.heldout = {"select": causal_lm_batches(selection_windows(setup.tokenizer, texts[0], args.select,
                                                                       args.calib, args.calib_draw)),
                         **setup.heldout}
        setup.info["heldout"] = (f"{args.select}x256 tokens of the calibration sources clear of the calibration "
                                 f"windows (select); " + setup.info["heldout"])
    snap = api.snapshot(setup.targets)
    rows = [dict(dense_row(setup, progress), allocation="-")]
    print(rows[-1], flush=True)
    curv = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets], setup.calib,
                               loss_fn=causal_lm_loss, progress=progress)
    def record(sp, alloc, stage, plan, secs, **extra):
        ppl = {h: perplexity(setup.model, b, progress=progress) for h, b in setup.heldout.items()}
        ls = plan.report["layer_sparsity"]
        per_block = {}
        for k, v in ls.items():
            per_block.setdefault(block_of(k), []).append(v)
        rows.append({"sparsity": sp, "allocation": alloc, "stage": stage, "ppl": ppl, "prune_seconds": secs,
                     "measured_sparsity": plan.sparsity(), "layer_sparsity": ls,
                     "block_sparsity": {b: sum(v) / len(v) for b, v in sorted(per_block.items())},
                     "owl": {k: plan.report[k] for k in ("owl_outlier_ratio", "owl_block_sparsity")
                             if k in plan.report}, **extra})
        print({k: v for k, v in rows[-1].items() if k not in ("layer_sparsity", "block_sparsity", "owl", "history")},
              flush=True)

    for sp in [float(s) for s in args.sparsities.split(",")]:
        for alloc in args.allocations.split(","):
            t0 = time.perf_counter()
            plan = api.prune(OBSIHTConfig(iterations=1, allocation=alloc, progress=progress), curvature=curv,
                             amount=sp)
            secs = time.perf_counter() - t0
            record(sp, alloc, "T=1", plan, secs)
            api.restore(setup.targets, snap)
            if args.iterations > 1:   # continue from this T=1 plan (as the main job does): its supports and counts
                t1 = time.perf_counter()
                best = solve(curv, None, OBSIHTConfig(iterations=args.iterations, allocation=alloc,
                                                      progress=progress), initial=plan)
                best.apply(reparametrize=False)
                record(sp, alloc, f"best T<={args.iterations}", best, secs + time.perf_counter() - t1,
                       best_iteration=best.report["best_iteration"], history=best.report["history"])
                api.restore(setup.targets, snap)
    total = time.perf_counter() - t_all
    texts = list(setup.heldout)
    md = [f"SmolLM2-135M-Instruct, {len(setup.targets)} decoder Linear weights; calibration {setup.info['calib']}; held-out "
          f"{setup.info['heldout']}. OBS-IHT T=1" + (f" and best T <= {args.iterations} (continued from it)"
                                                    if args.iterations > 1 else "")
          + ", sequential calibration; only the allocation differs.", "",
          f"Command: `{command_line()}` ({total:.0f} s).", "",
          "| sparsity | allocation | " + " | ".join(f"ppl {h}" for h in texts)
          + " | min / max weight sparsity | min / max block sparsity | prune s |",
          "|---|---|" + "---|" * len(texts) + "---|---|---|"]
    for r in rows:
        if r["allocation"] == "-":
            md.append("| 0 | dense | " + " | ".join(f"{r['ppl'][h]:.2f}" for h in texts) + " | - | - | - |")
            continue
        lv, bv = list(r["layer_sparsity"].values()), list(r["block_sparsity"].values())
        label = r["allocation"] + ("" if _stage(r) == "T=1" else f", {_stage(r)} (T={r['best_iteration']})")
        md.append(f"| {r['sparsity']} | {label} | " + " | ".join(f"{r['ppl'][h]:.2f}" for h in texts)
                  + f" | {min(lv):.3f} / {max(lv):.3f} | {min(bv):.3f} / {max(bv):.3f} | {r['prune_seconds']:.0f} |")
    write_results(args.out, "\n".join(md) + "\n", {"rows": rows, "setup": setup.info, "command": command_line(),
                                                    "total_seconds": total})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for r in rows[1:]:
        if _stage(r) != "T=1" and r["best_iteration"] == 1:
            continue   # the same weights as the T=1 row
        b = list(r["block_sparsity"])
        ax.plot(b, [r["block_sparsity"][i] for i in b], marker="o", ms=3,
                label=f"{r['allocation']} {_stage(r)} {r['sparsity']:.0%} (ppl " + " / ".join(f"{r['ppl'][h]:.1f}" for h in texts)
                + ")")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity of the block's weights")
    ax.set_title("SmolLM2-135M: per-block sparsity by allocation (OBS-IHT)")
    ax.legend(fontsize=7)
    save_figure(fig, args.out + ".png")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
