"""Gradual pruning during fine-tuning with a transformers Trainer: MiniLM + a classification head on BBC News.

    python examples/trainer_minilm_bbc.py [--methods dense obs_iht cs bip magnitude] [--sparsity 0.7]

all-MiniLM-L6-v2 (BERT encoder) gets a fresh 5-way head and is fine-tuned on a fixed subset of BBC News
(split once with seed 0 into train / validation / test; 128 tokens per article).  Every run trains the same
number of steps with the same optimizer; pruned runs add ``PruningCallback``: OBS-IHT (and magnitude) on a cubic
schedule to ``--sparsity`` over the first 60% of the steps (OBS-IHT re-collects layer curvature from
``--curvature-batches`` training batches at each pruning step: every ceil(ramp / ``--prune-steps``) steps and at
the ramp's end, so ``--prune-steps`` or slightly fewer in all), Continuous Sparsification with
its temperature schedule over the same span (scores started from the |w| ranking with tempered gates, the callback's
default since issue 15; ``--cs-score-init constant`` is the paper's start from ties, which fails here), BiP (a mask of exactly ``--sparsity`` from the start, one implicit-gradient
score step after every optimizer step, cut at the end of the span), then fine-tuning with fixed masks.  Masks cover every encoder Linear (36 tensors; embeddings, pooler and head stay
dense).  Validation accuracy is printed for choosing settings; the test accuracy is the reported figure.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch


def split(n, seed, sizes):
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out, i = [], 0
    for s in sizes:
        out.append(idx[i:i + s])
        i += s
    return out


class Encoded(torch.utils.data.Dataset):
    def __init__(self, enc, labels, idx):
        self.enc, self.labels, self.idx = enc, labels, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        j = self.idx[i]
        return {"input_ids": self.enc["input_ids"][j], "attention_mask": self.enc["attention_mask"][j],
                "labels": torch.tensor(self.labels[j])}


@torch.no_grad()
def accuracy(model, ds, batch_size=64):
    model.eval()
    correct = 0
    for i in range(0, len(ds), batch_size):
        items = [ds[j] for j in range(i, min(i + batch_size, len(ds)))]
        b = {k: torch.stack([x[k] for x in items]) for k in items[0]}
        y = b.pop("labels")
        correct += int((model(**b).logits.argmax(-1) == y).sum())
    return correct / len(ds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["dense", "obs_iht", "cs"])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--train", type=int, default=480)
    ap.add_argument("--val", type=int, default=150)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prune-steps", type=int, default=4, help="pruning steps of the cubic schedule (one every "
                    "ceil(ramp / N) steps and one at the ramp's end)")
    ap.add_argument("--curvature-batches", type=int, default=1, help="training batches per OBS-IHT curvature")
    ap.add_argument("--cs-penalty", type=float, default=1e-7)
    ap.add_argument("--cs-mask-lr", type=float, default=1e-2)
    ap.add_argument("--cs-score-init", default="auto", choices=["auto", "constant", "magnitude"],
                    help="CS score init (auto = magnitude in PruningCallback; constant = every score 0, the paper)")
    ap.add_argument("--cs-spread", type=float, default=1.0, help="CS score_init_spread (magnitude init)")
    ap.add_argument("--cs-quantile", type=float, default=None,
                    help="CS score_init_quantile (magnitude init; default: the target sparsity)")
    ap.add_argument("--cs-allocation", default="global", choices=["global", "uniform"])
    ap.add_argument("--cs-mask-scale", default="auto", choices=["auto", "paper", "tempered", "none"],
                    help="CS gate scale (auto = tempered in PruningCallback; paper = 1/sigmoid(s0))")
    ap.add_argument("--bip-mask-lr", type=float, default=10.0, help="BiP score learning rate (SGD, momentum 0.9)")
    ap.add_argument("--bip-gamma", type=float, default=1.0, help="BiP lower-level ridge weight (implicit-gradient scale)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for name in ("train", "val", "test", "batch_size", "seq_len", "prune_steps", "curvature_batches", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.train + args.val + args.test > 2225:
        ap.error(f"--train + --val + --test: BBC News has 2,225 articles, asked for {args.train + args.val + args.test}")
    if not args.epochs > 0 or not args.lr > 0:
        ap.error("--epochs and --lr: must be > 0")
    steps = int(args.epochs * args.train / args.batch_size)
    ramp_end = int(0.6 * steps)
    if ramp_end < 4:   # CS spreads its 4 temperature epochs over the ramp; the others need at least one step
        ap.error(f"--train / --batch-size / --epochs: {steps} training steps leave a pruning ramp of {ramp_end} steps; "
                 "give at least 4 (7 training steps)")
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    import obs_plugins
    from obs_plugins.data import load_bbc_news, minilm_dir
    from obs_plugins.errors import PruningInputError
    from obs_plugins.integrations.optimum import PruningCallback, PruningConfig, normalize_method, select_targets

    configs = {}   # every method's config built (and so checked) before anything trains
    for method in args.methods:
        if method == "dense":
            configs[method] = None
            continue
        try:
            name = normalize_method(method)
            mc = None
            if name == "continuous_sparsification":
                mc = obs_plugins.CSConfig(rounds=1, epochs=4, penalty=args.cs_penalty, mask_lr=args.cs_mask_lr,
                                          score_init=args.cs_score_init, score_init_spread=args.cs_spread,
                                          score_init_quantile=args.cs_quantile, allocation=args.cs_allocation,
                                          mask_scale=args.cs_mask_scale, progress=False)
            elif name == "bip":
                mc = obs_plugins.BiPConfig(mask_lr=args.bip_mask_lr, gamma=args.bip_gamma, progress=False)
            configs[method] = PruningConfig(method=name, sparsity=args.sparsity, end_step=ramp_end,
                                            frequency=math.ceil(ramp_end / args.prune_steps),
                                            curvature_batches=args.curvature_batches, method_config=mc)
            if configs[method].route.gradual is None:
                raise PruningInputError(f"method: {name} has no gradual schedule in PruningCallback")
        except PruningInputError as e:
            ap.error(f"--methods {method}: {e}")

    transformers.logging.set_verbosity_error()
    texts, labels, classes = load_bbc_news()
    tr, va, te = split(len(texts), 0, [args.train, args.val, args.test])
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    used = tr + va + te
    enc_all = tok([texts[i] for i in used], truncation=True, max_length=args.seq_len, padding="max_length",
                  return_tensors="pt")
    pos = {j: k for k, j in enumerate(used)}
    lab = {pos[j]: labels[j] for j in used}
    train_ds, val_ds, test_ds = (Encoded(enc_all, lab, [pos[j] for j in s]) for s in (tr, va, te))

    rows = []
    for method in args.methods:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(classes))
        cfg = configs[method]
        callbacks = [PruningCallback(cfg)] if cfg is not None else []
        out_dir = tempfile.TemporaryDirectory(prefix=f"minilm_bbc_{method}_")   # nothing is saved there
        targs = TrainingArguments(output_dir=out_dir.name, max_steps=steps,
                                  per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                  warmup_steps=int(0.06 * steps), save_strategy="no", report_to=[], use_cpu=True,
                                  disable_tqdm=True, logging_steps=max(1, steps // 10), seed=0)
        t0 = time.perf_counter()
        Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=callbacks).train()
        secs = time.perf_counter() - t0
        sel = select_targets(model, cfg or PruningConfig())
        sp = sum(int((t.orig() == 0).sum()) for t in sel) / sum(t.orig().numel() for t in sel)
        row = {"method": method, "sparsity": sp, "val_acc": accuracy(model, val_ds), "test_acc": accuracy(model, test_ds),
               "train_seconds": secs}
        if callbacks:
            row["schedule"] = [{k: h[k] for k in ("step", "sparsity")} for h in callbacks[0].history if "sparsity" in h]
        rows.append(row)
        out_dir.cleanup()
        if args.json:   # after every run: finished rows survive a later failure
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "steps": steps, "ramp_end": ramp_end, "rows": rows}, f, indent=1)
        print(f"{method:>10}: encoder-Linear sparsity {sp:.4f}  val acc {row['val_acc']:.4f}  test acc "
              f"{row['test_acc']:.4f}  ({secs:.0f} s)", flush=True)

    print(f"\nMiniLM-L6 + 5-way head on BBC News: train {len(train_ds)} / val {len(val_ds)} / test {len(test_ds)} "
          f"articles, {args.seq_len} tokens, {steps} steps (batch {args.batch_size}, lr {args.lr}), pruning ramp to "
          f"step {ramp_end}, {args.threads} thread(s)")
    print("| method | sparsity | val acc | test acc | train s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['sparsity']:.3f} | {r['val_acc']:.4f} | {r['test_acc']:.4f} | "
              f"{r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
