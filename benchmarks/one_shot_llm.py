"""One-shot LLM pruning benchmark: SmolLM2-135M, mixed English calibration (Shakespeare plays, the King James
Bible, BBC News; or one source), perplexity on two held-out texts: other Shakespeare plays and Jane Austen's novels
(an author no setting saw).

Rows per sparsity (unstructured 50% / 70%, 2:4): dense, magnitude (per-tensor |w|, torch's L1Unstructured rule),
Wanda (ours, sequentially calibrated), OBS-IHT T=1 on one-pass Grams and on sequential calibration (the
SparseGPT order), OBS-IHT best T (chosen on held-out calibration batches), with prune wall time (calibration
included).  Writes benchmarks/results/one_shot_llm.{md,json}
and a plot.

    python benchmarks/one_shot_llm.py                       # full run (see the README for the figures)
    python benchmarks/one_shot_llm.py --calib 8 --eval 8    # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from obs_plugins.experiment import dense_row, run_rows, setup_smollm2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--methods", default="magnitude,wanda,obs_iht_onepass,obs_iht")
    ap.add_argument("--calib-sources", default="shakespeare,kjv,bbc",
                    help="calibration sources, interleaved (shakespeare = the single-author set)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/one_shot_llm")
    ap.add_argument("--fresh", action="store_true",
                    help="ignore rows saved by an interrupted run with the same settings (<out>.partial.jsonl)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    setup = setup_smollm2(n_calib=args.calib, n_eval=args.eval, seq_len=args.seq_len,
                          calib_sources=tuple(args.calib_sources.split(",")))
    dense = dense_row(setup)
    rows = [dense]
    curv = None
    settings = {k: getattr(args, k) for k in ("methods", "iterations", "calib", "eval", "seq_len", "calib_sources")}
    done = _load_partial(args.out + ".partial.jsonl", settings) if not args.fresh else {}
    for sp in args.sparsities.split(","):
        if sp in done:  # finished by an earlier, interrupted run with the same settings
            print(f"sparsity {sp}: reusing the rows of {args.out}.partial.jsonl", flush=True)
            rows += done[sp]
            continue
        more, curv = run_rows(setup, sp, args.methods.split(","), iterations=args.iterations, curvature=curv)
        rows += more
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".partial.jsonl", "a") as f:
            f.write(json.dumps({"settings": settings, "sparsity": sp, "rows": more}, default=str) + "\n")
        print(json.dumps(more, default=str), flush=True)
    texts = list(setup.heldout)
    cmd = "python benchmarks/one_shot_llm.py " + " ".join(sys.argv[1:])
    lines = [f"SmolLM2-135M-Instruct (fp32 from the packaged GGUF), {len(setup.targets)} Linear weights of "
             f"model.layers pruned (embeddings/lm_head kept); calibration {setup.info['calib']}; held-out "
             f"{setup.info['heldout']}; 2-core CPU, {args.threads} torch threads. Prune times include each "
             "method's calibration pass (sequential: inside the plan).", "",
             f"Command: `{cmd.strip()}`", "",
             "| sparsity | method | " + " | ".join(f"ppl {h} | × dense" for h in texts) + " | prune time (s) |",
             "|---|---|" + "---|---|" * len(texts) + "---|"]
    for r in rows:
        cells = " | ".join(f"{r['ppl'][h]:.2f} | {r['ppl'][h] / dense['ppl'][h]:.3f}" for h in texts)
        lines.append(f"| {r['sparsity']} | {r['method']} | {cells} | {r['prune_seconds']:.0f} |")
    hist = [(r["sparsity"], h) for r in rows for h in r.get("history", [])]
    if hist:
        lines += ["", "OBS-IHT iterations (held-out calibration loss; step = relative step size ρ chosen):", "",
                  "| sparsity | iteration | held-out calib loss | step ρ | accepted |", "|---|---|---|---|---|"]
        for sp, h in hist:
            lines.append(f"| {sp} | {h['iteration']} | {h['holdout_loss']:.4f} | {h.get('step_size', 0)} | "
                         f"{h.get('accepted', '')} |")
    lines.append(f"\nTotal wall time {time.perf_counter() - t0:.0f} s.")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "setup": setup.info, "command": cmd}, f, indent=2, default=str)
    _plot(rows, args.out + ".png")
    print("\n".join(lines))
    return 0


def _load_partial(path, settings) -> dict:
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("settings") == settings:
                    out[rec["sparsity"]] = rec["rows"]
    return out


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    texts = list(rows[0]["ppl"])
    sps = [s for s in dict.fromkeys(r["sparsity"] for r in rows) if s != "0"]
    label = lambda r: r["method"].split(" best")[0] + (" best T" if "best" in r["method"] else "")  # noqa: E731
    methods = [m for m in dict.fromkeys(label(r) for r in rows) if m != "dense"]
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 4), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    for ax, h in zip(axes[0], texts):
        for i, m in enumerate(methods):
            ys = [next((r["ppl"][h] for r in rows if r["sparsity"] == s and label(r) == m), float("nan")) for s in sps]
            ax.bar([j + i * width for j in range(len(sps))], ys, width, label=m)
        ax.axhline(rows[0]["ppl"][h], color="k", ls="--", label="dense")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sps))], sps)
        ax.set_yscale("log")
        ax.set_ylabel(f"perplexity on {h} (log)")
        ax.set_title(f"SmolLM2-135M one-shot pruning — held-out {h}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
