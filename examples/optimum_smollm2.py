"""The Optimum-style route on SmolLM2-135M: config -> prune -> save -> reload with plain AutoModel -> perplexity.

    python examples/optimum_smollm2.py [--method obs_iht] [--sparsity 0.5] [--calib 16] [--seq-len 128]

Calibration: ``--calib`` windows of ``--seq-len`` tokens from Shakespeare plays (strings, tokenized by the
Pruner); held-out perplexity on ``--eval`` windows of four other plays (Hamlet, Macbeth, Tempest, Othello).
The saved folder holds ``model.safetensors`` (zeros baked in), the tokenizer, ``pruning_config.json`` and
``prune_report.json``; it reloads with ``AutoModelForCausalLM.from_pretrained`` and must give the same logits.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

HELDOUT = ["hamlet", "macbeth", "tempest", "othello"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="obs_iht", choices=["obs_iht", "wanda", "magnitude"],
                    help="a one-shot method (default obs_iht)")
    ap.add_argument("--sparsity", default="0.5", help="a fraction (0.5) or an N:M pattern (2:4)")
    ap.add_argument("--iterations", type=int, default=1, help="OBS-IHT iterations T (1 = the OBS sweep)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows")
    ap.add_argument("--eval", type=int, default=16, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    for name in ("iterations", "calib", "eval", "seq_len", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")

    from obs_plugins.errors import PruningInputError
    from obs_plugins.experiment import sparsity_args
    from obs_plugins.integrations.optimum import Pruner, PruningConfig

    # the config is built (and so checked) before the model loads
    try:
        amount, nm = sparsity_args(args.sparsity)
        mc = {"iterations": args.iterations} if args.method == "obs_iht" else None
        config = PruningConfig(method=args.method, sparsity=amount, pattern=nm or "unstructured",
                               num_samples=args.calib, seq_len=args.seq_len, batch_size=min(4, args.calib),
                               method_config=mc)
        if args.method == "obs_iht" and args.iterations > 1 and args.calib <= 4:
            raise PruningInputError("--calib: OBS-IHT iterations > 1 hold out calibration batches for the step "
                                    "search, so they need at least 2 batches of 4 windows: give at least 5")
    except PruningInputError as e:
        msg = str(e)
        ap.error("--" + msg if msg.startswith(("sparsity", "iterations")) else msg)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    from obs_plugins.data import load_shakespeare, load_smollm2, shakespeare_plays, token_windows
    from obs_plugins.lm import causal_lm_batches, perplexity

    progress = not args.quiet
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    calib_texts = [load_shakespeare([p]) for p in shakespeare_plays() if p not in HELDOUT]
    heldout = causal_lm_batches(token_windows(tok, load_shakespeare(HELDOUT), args.eval, args.seq_len), 4)
    out = args.out or tempfile.mkdtemp(prefix="smollm2_pruned_")

    dense_ppl = perplexity(model, heldout, progress=progress, desc="perplexity dense")
    res = Pruner.from_pretrained(model, tokenizer=tok).prune(config, calibration_dataset=calib_texts, save_dir=out,
                                                             progress=progress)
    pruned_ppl = perplexity(model, heldout, progress=progress, desc="perplexity pruned")

    t1 = time.perf_counter()
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reload_s = time.perf_counter() - t1
    reload_ppl = perplexity(back, heldout, progress=progress, desc="perplexity reloaded")
    x = heldout[0]["input_ids"][:2]
    with torch.no_grad():
        max_diff = float((model(input_ids=x).logits - back(input_ids=x).logits).abs().max())
    assert PruningConfig.from_pretrained(out) == config

    fig = {"method": config.method, "pattern": config.pattern, "sparsity": res.sparsity, "pruned": res.pruned,
           "weights": res.weights, "tensors": len(res.targets), "dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl,
           "reloaded_ppl": reload_ppl, "reload_max_abs_logit_diff": max_diff, "prune_seconds": res.seconds,
           "load_seconds": load_s, "reload_seconds": reload_s, "total_seconds": time.perf_counter() - t0,
           "calibration": f"{args.calib} x {args.seq_len} tokens", "heldout": f"{args.eval} x {args.seq_len} tokens",
           "threads": args.threads, "out": out}
    print(f"\nSmolLM2-135M, {config.method} {config.pattern} {res.sparsity:.4f} of {res.weights} weights "
          f"({len(res.targets)} tensors), calibration {fig['calibration']}, held-out {fig['heldout']}:")
    print(f"  perplexity dense {dense_ppl:.2f} -> pruned {pruned_ppl:.2f} -> reloaded from {out} {reload_ppl:.2f} "
          f"(max |logit diff| {max_diff:.2e})")
    print(f"  prune {res.seconds:.1f} s, total {fig['total_seconds']:.1f} s on {args.threads} thread(s)")
    print("  files:", ", ".join(sorted(os.listdir(out))))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)


if __name__ == "__main__":
    main()
