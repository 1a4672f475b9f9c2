"""How far Continuous Sparsification's gates move MiniLM away from the dense network at each temperature of the
PruningCallback schedule, before any training (issue 15): mean cosine similarity between the mean-pooled encoder
outputs of the gated and the dense model on 16 BBC News articles (128 tokens), for the 36 encoder Linear weights,
scores untouched (the initial scores: what the search starts from at each beta).

    python benchmarks/cs_gate_drift.py        # 1 thread, ~1 min

Rows: the magnitude-ranked scores (score_init="magnitude", q = 0.7) with the "tempered" scale (the callback's
default), with the "paper" scale 1/sigmoid(s0) = 2, and hard 70% magnitude masks with the kept weights at 1x and 2x
(what the "paper" gates tend to at high beta).
"""
from __future__ import annotations

import argparse

import torch

from _common import add_threads_argument, command_line, set_threads, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--articles", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--epochs", type=int, default=4, help="temperature epochs (beta 1 -> 200), as in the example")
    ap.add_argument("--out", default="benchmarks/results/cs_gate_drift")
    add_threads_argument(ap)
    args = ap.parse_args()
    set_threads(args.threads)
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from obs_plugins import ContinuousSparsifier
    from obs_plugins.data import load_bbc_news, minilm_dir
    from obs_plugins.integrations.optimum import PruningConfig, select_targets

    transformers.logging.set_verbosity_error()
    texts, _, _ = load_bbc_news()
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    enc = tok(texts[:args.articles], truncation=True, max_length=128, padding="max_length", return_tensors="pt")
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5).eval()

    @torch.no_grad()
    def pooled():
        h = model.bert(**enc).last_hidden_state
        am = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * am).sum(1) / am.sum(1)

    dense = pooled()

    def cosine() -> float:
        return float(torch.nn.functional.cosine_similarity(pooled(), dense).mean())

    targets = select_targets(model, PruningConfig(method="cs", sparsity=args.sparsity))
    params = [(t.module, t.name) for t in targets]
    rows = []
    for scale in ("tempered", "paper"):
        cs = ContinuousSparsifier(model, params, score_init="magnitude", score_init_quantile=args.sparsity,
                                  mask_scale=scale, rounds=1, epochs=args.epochs, progress=False)
        for e in range(args.epochs):
            cs.epoch = e  # the schedule's temperature for epoch e; the scores stay at their initial values
            rows.append({"gates": f"magnitude-ranked scores, {scale} scale", "beta": cs.temperature,
                         "gate_factor": cs.scale_at(cs.temperature), "cosine": cosine()})
        cs.finish(rewind=False)
    cs = ContinuousSparsifier(model, params, score_init="magnitude", progress=False)
    cs.finish(rewind=False)
    masks = cs.masks(args.sparsity)  # = global magnitude pruning (tested)
    saved = {t.key: t.orig().detach().clone() for t in targets}
    for factor in (1.0, 2.0):
        with torch.no_grad():
            for t in targets:
                t.orig().copy_(saved[t.key] * masks[t.key] * factor)
        rows.append({"gates": f"hard {args.sparsity:.0%} magnitude mask, kept x{factor:g}", "beta": None,
                     "gate_factor": factor, "cosine": cosine()})
        with torch.no_grad():
            for t in targets:
                t.orig().copy_(saved[t.key])
    assert cosine() > 0.9999  # restored
    md = [f"`{command_line()}`", "",
          f"MiniLM-L6 (36 encoder Linear weights), {args.articles} BBC News articles: cosine similarity of the "
          "mean-pooled encoder output with the dense model's, initial scores", "",
          "| gates | beta | gate factor | cosine |", "|---|---|---|---|"]
    for r in rows:
        beta = "-" if r["beta"] is None else f"{r['beta']:.1f}"
        md.append(f"| {r['gates']} | {beta} | {r['gate_factor']:.3f} | {r['cosine']:.3f} |")
    print("\n".join(md))
    write_results(args.out, md, {"command": command_line(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
