"""Which of MiniLM's two passes loses when the network-scope ranking is re-linearised?  A diagnosis, not a choice.

``benchmarks/structured.py`` prunes MiniLM in two Torch-Pruning passes (``prune_transformer``: whole heads, then
FFN channels, per layer), and the 8-round ranking (``OBSImportance(scope="network", relinearize=8)``) lost its
removal-only cells there.  This script reruns the 50% removal-only prune of that benchmark (same split, frozen
head, 128 calibration articles; removal only, so the damping does not enter) with the rounds set per pass:
``K1-K2`` re-linearises the heads pass in ``K1`` rounds and the FFN pass in ``K2``.  Test accuracy on the same 500
articles.  Writes ``benchmarks/results/structured_minilm_passes.{md,json}`` (``--out``).

    OMP_NUM_THREADS=1 python benchmarks/structured_minilm_passes.py
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structured as S  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plans", nargs="+", default=["1-1", "8-1", "1-8"],
                    help="rounds of the heads pass - rounds of the FFN pass")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(S.RESULTS / "structured_minilm_passes"))
    args = ap.parse_args(argv)
    try:
        plans = [[int(x) for x in p.split("-")] for p in args.plans]
    except ValueError:
        ap.error(f"--plans: each 'K1-K2' with positive integers, got {args.plans}")
    if any(len(p) != 2 or min(p) < 1 for p in plans):
        ap.error(f"--plans: each 'K1-K2' with positive integers, got {args.plans}")
    if not 0.0 < args.ratio < 1.0:
        ap.error(f"--ratio: in (0, 1), got {args.ratio}")
    torch.set_num_threads(args.threads)
    from obs_plugins import Curvature, prunable_linear_targets
    from obs_plugins.data import load_minilm
    from obs_plugins.integrations.torch_pruning import OBSImportance, prune_transformer
    dense, tok = load_minilm()
    texts, labels, classes, parts = S.bbc_split(0)
    enc = tok(texts, truncation=True, max_length=128, padding="max_length", return_tensors="pt")
    parts = {"train": parts["train"][:1425], "val": parts["val"][:300], "test": parts["test"][:500]}
    E = S.embed(dense, enc, parts["train"] + parts["val"] + parts["test"])   # as structured.py (same batches)
    head = S.fit_head(E[:len(parts["train"])], labels[parts["train"]], len(classes))
    yte = labels[parts["test"]]
    g = torch.Generator().manual_seed(1)
    calib = [parts["train"][i] for i in torch.randperm(len(parts["train"]), generator=g)[:128].tolist()]
    batches = [{"input_ids": enc["input_ids"][calib[i:i + 16]], "attention_mask": enc["attention_mask"][calib[i:i + 16]],
                "labels": labels[calib[i:i + 16]]} for i in range(0, len(calib), 16)]
    logits = lambda out, b: head(S.mean_pool(out, b["attention_mask"]))  # noqa: E731
    rows = []
    for (k_heads, k_ffn), name in zip(plans, args.plans):
        m = copy.deepcopy(dense).eval()
        curv = Curvature.layerwise(m, [(t.module, t.name) for t in prunable_linear_targets(m, exclude=("pooler",))],
                                   batches, loss_fn=lambda out, b: F.cross_entropy(logits(out, b), b["labels"]),
                                   forward_fn=lambda model, b: model(input_ids=b["input_ids"],
                                                                     attention_mask=b["attention_mask"]),
                                   progress=False)
        imp = OBSImportance(curv, scope="network", logits_fn=logits)
        passes = []

        def before(model):
            imp.relinearize = (k_heads, k_ffn)[min(len(passes), 1)]
            passes.append(imp.relinearize)

        t0 = time.perf_counter()
        prune_transformer(m, {"input_ids": enc["input_ids"][:2], "attention_mask": enc["attention_mask"][:2]}, imp,
                          args.ratio, update=False, before_pass=before)
        acc = float((head(S.embed(m, enc, parts["test"])).argmax(1) == yte).float().mean())
        rows.append({"plan": name, "rounds_per_pass": passes, "test": acc, "seconds": time.perf_counter() - t0,
                     "heads": [int(l.attention.self.num_attention_heads) for l in m.encoder.layer],
                     "ffn": [int(l.intermediate.dense.out_features) for l in m.encoder.layer]})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "argv": sys.argv[1:], "threads": args.threads},
                                                   indent=1))
    lines = ["# MiniLM, network-scope ranking re-linearised per pass (removal only)", "",
             f"`python benchmarks/structured_minilm_passes.py {' '.join(sys.argv[1:])}`; {args.ratio:.0%} of the heads "
             f"and FFN channels per layer; {args.threads} thread(s); 500 test articles.", "",
             "| rounds: heads pass - FFN pass | test accuracy | seconds |", "|---|---|---|"]
    lines += [f"| {z['plan']} | {z['test']:.4f} | {z['seconds']:.0f} |" for z in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
