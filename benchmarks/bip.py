"""BiP (bi-level pruning) vs one-shot magnitude + fine-tuning vs IMP on the Fashion-MNIST LeNet-5 of tickets.py.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bip.py --no-progress        # ~20 min on one shared core
    .venv/bin/python benchmarks/bip.py --render benchmarks/results/bip.json    # table + plot only, no training

Same model, data pipeline, Adam learning rate and batch size as benchmarks/tickets.py (imported from it, not
copied).  Every method starts from the same dense run (``--dense-epochs``, counted in every method's compute).

* unstructured (``--targets``): all conv/linear weights, one global ranking, biases kept;
* channels (``--channel-targets``): output channels of conv1, conv2, fc1, fc2 (not the classifier), the same
  fraction of every layer, a removed channel's weights *and bias* zeroed.

Methods (per sparsity):

* one-shot magnitude + fine-tune: |w| (channels: mean |w| of the channel) of the dense weights, then
  ``--epochs`` of masked fine-tuning;
* IMP: 20% of the remaining weights (channels) per round by magnitude, rewinding to step ``--rewind-step`` of the
  dense run, ``--epochs`` of retraining per round (unstructured: tickets.run_imp itself); the round that would
  cross a target prunes to it exactly and the chain continues from it;
* BiP (paper IG) and BiP (first-order): ``obs_plugins.BiPTrainer`` from the dense weights for ``--bip-epochs``;
  each step = one Adam step on the weights (the lower level, mask fixed) on one batch and one SGD(momentum 0.9)
  step on the scores (the upper level, at the updated weights) on the next batch, so one BiP epoch is one
  forward+backward per training image, the same as one epoch of training.  The reported model is the search's own
  (mask, weights): no retraining.

Compute = forward+backward passes over training images / training-set size ("epochs"), everything that led to
the model counted (dense run, every IMP round, BiP's both levels; evaluation passes not counted).

BiP's settings (score lr, gamma) are chosen on the *validation* split (``--val`` images held out of the
training set), at one sparsity per mode (``--tune-at``, ``--tune-channel-at``), among a small grid; the test set
is evaluated only for the reported models.  One seed (``--seed``).  Writes benchmarks/results/bip.{md,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tickets as T  # noqa: E402  (LeNet5, data, training helpers, IMP)
from obs_plugins import BiPTrainer  # noqa: E402

CHANNEL_LAYERS = ("conv1", "conv2", "fc1", "fc2")


def data(args):
    xall, yall, xte, yte = T.load(args.train + args.val, args.test)
    tr = (xall[:args.train], yall[:args.train])
    return tr, {"val": (xall[args.train:], yall[args.train:]), "test": (xte, yte)}


def evaluate(model, ev, test=True):
    return {"val": T.accuracy(model, *ev["val"]), "test": T.accuracy(model, *ev["test"]) if test else None}


# ------------------------------------------------------------------------------------------------ channel helpers
@torch.no_grad()
def apply_channel_masks(model, keep):
    """keep: {layer: bool (C,)}; zero the weights and bias of every removed output channel."""
    for n, k in keep.items():
        mod = model.get_submodule(n)
        mod.weight.mul_(k.view(-1, *([1] * (mod.weight.dim() - 1))).to(mod.weight.dtype))
        mod.bias.mul_(k.to(mod.bias.dtype))


def train_channels(model, loader, epochs, lr, keep):
    """tickets.train with channel masks (weights and biases kept at zero for removed channels)."""
    loader.reset()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    apply_channel_masks(model, keep)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            apply_channel_masks(model, keep)


def channel_scores(model):
    return {n: model.get_submodule(n).weight.detach().abs().flatten(1).mean(1) for n in CHANNEL_LAYERS}


def channel_keep(scores, prev, target, step_fraction=1.0):
    """Per layer: remove ``step_fraction`` of the remaining channels (lowest score), not past ``target``."""
    out = {}
    for n, s in scores.items():
        c = s.numel()
        final_keep = c - round(target * c)
        kept = int(prev[n].sum())
        keep = max(final_keep, kept - round(step_fraction * kept))
        ranked = s.masked_fill(~prev[n], float("-inf"))
        k = torch.zeros(c, dtype=torch.bool)
        k[torch.topk(ranked, keep).indices] = True
        out[n] = k & prev[n]
    return out


def weight_sparsity_of_channels(model, keep):
    total = sum(model.get_submodule(n).weight.numel() for n in T.PRUNED)
    zero = sum(int((~keep[n]).sum()) * model.get_submodule(n).weight[0].numel() for n in keep)
    return zero / total


# ------------------------------------------------------------------------------------------------ methods
def one_shot(dense, loader, ev, args, target, structured):
    t0 = time.time()
    model = copy.deepcopy(dense)
    if structured:
        keep = channel_keep(channel_scores(model), {n: torch.ones(model.get_submodule(n).weight.shape[0],
                                                                  dtype=torch.bool) for n in CHANNEL_LAYERS}, target)
        train_channels(model, loader, args.epochs, args.lr, keep)
        sp = weight_sparsity_of_channels(model, keep)
    else:
        ones = {n: torch.ones_like(model.get_submodule(n).weight) for n in T.PRUNED}
        masks = T.global_magnitude_masks(model, ones, target, step_fraction=1.0)
        T.train(model, loader, args.epochs, args.lr, masks=masks)
        sp = T.sparsity_of(masks)
    return {**evaluate(model, ev), "epochs": args.dense_epochs + args.epochs, "weight_sparsity": sp,
            "seconds": time.time() - t0}


def imp_channels(init, dense, rewind, loader, ev, args, targets):
    model = copy.deepcopy(dense)
    keep = {n: torch.ones(model.get_submodule(n).weight.shape[0], dtype=torch.bool) for n in CHANNEL_LAYERS}
    epochs, rounds, out, t0 = args.dense_epochs, 0, {}, time.time()
    for target in sorted(targets):
        while any(int(keep[n].sum()) > keep[n].numel() - round(target * keep[n].numel()) for n in keep):
            keep = channel_keep(channel_scores(model), keep, target, step_fraction=0.2)
            rounds += 1
            model.load_state_dict(rewind)
            train_channels(model, loader, args.epochs, args.lr, keep)
            epochs += args.epochs
        r = evaluate(model, ev)
        print(f"  IMP channels {target:.0%}: {rounds} rounds, val {r['val']:.4f} test {r['test']:.4f}", flush=True)
        out[target] = {**r, "epochs": epochs, "rounds": rounds, "weight_sparsity": weight_sparsity_of_channels(model, keep),
                       "chain_seconds": time.time() - t0}
    return out


def run_bip(dense, loader, ev, args, target, structured, implicit, mask_lr, gamma, test=True):
    t0 = time.time()
    model = copy.deepcopy(dense)
    names = CHANNEL_LAYERS if structured else T.PRUNED
    params = [(model.get_submodule(n), "weight") for n in names]
    extra = {"granularity": "channel", "allocation": "uniform"} if structured else {}
    bip = BiPTrainer(model, params, sparsity=target, gamma=gamma, implicit_gradient=implicit, mask_lr=mask_lr,
                     progress=not args.no_progress, **extra)
    start = {k: m.clone() for k, m in bip.masks().items()}
    loader.reset()
    opt = torch.optim.Adam(bip.param_groups(args.lr))
    mopt = torch.optim.SGD(bip.score_groups(), lr=mask_lr, momentum=0.9)
    hist = bip.fit(loader, F.cross_entropy, epochs=args.bip_epochs, optimizer=opt, mask_optimizer=mopt, finish=False)
    r = evaluate(model, ev, test=test)   # the gated model: exactly the search's mask and weights
    masks = bip.masks()
    changed = sum(int((masks[k] != start[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())   # ones of the BiP masks, in weights
    kept += sum(model.get_submodule(n).weight.numel() for n in T.PRUNED if n not in names)   # dense layers
    sp = 1 - kept / sum(model.get_submodule(n).weight.numel() for n in T.PRUNED)
    return {**r, "epochs": args.dense_epochs + bip.samples_forward_backward / args.train,
            "weight_sparsity": sp, "mask_changed_vs_magnitude_init": changed, "history": hist,
            "mask_lr": mask_lr, "gamma": gamma, "implicit_gradient": implicit, "seconds": time.time() - t0}


def tune(dense, loader, ev, args, target, structured, grid_lr, log, grid_lr_fo=None):
    """Validation-only grid: first-order over score lrs (``grid_lr_fo``, default ``grid_lr``); paper IG over
    score lrs x gammas."""
    runs = []
    for implicit in (False, True):
        for lr in (grid_lr if implicit or not grid_lr_fo else grid_lr_fo):
            for gamma in (args.grid_gamma if implicit else [args.grid_gamma[0]]):
                r = run_bip(dense, loader, ev, args, target, structured, implicit, lr, gamma, test=False)
                runs.append({**{k: v for k, v in r.items() if k != "history"},
                             "mode": "channels" if structured else "unstructured", "target": target})
                print(f"  tune {'channels' if structured else 'unstructured'} {target:.0%} "
                      f"{'IG' if implicit else 'FO'} mask_lr={lr:g} gamma={gamma:g}: val {r['val']:.4f} "
                      f"(mask changed {r['mask_changed_vs_magnitude_init']:.3f}, {r['seconds']:.0f}s)", flush=True)
    best = {}
    for implicit in (False, True):
        cand = [r for r in runs if r["implicit_gradient"] == implicit]
        b = max(cand, key=lambda r: r["val"])
        best[implicit] = (b["mask_lr"], b["gamma"])
    log.extend(runs)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=12_000, help="training images (the first ones of the train split)")
    p.add_argument("--val", type=int, default=3_000, help="validation images, held out of training (the next ones)")
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--dense-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="epochs per IMP round and of one-shot fine-tuning (default: as long as the dense run)")
    p.add_argument("--bip-epochs", type=int, default=2)
    p.add_argument("--rewind-step", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of the weights (every method)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--channel-targets", type=float, nargs="*", default=[0.5, 0.7],
                   help="channel sparsities (none: unstructured only, e.g. for a multi-seed check of one point)")
    p.add_argument("--tune-at", type=float, default=0.9)
    p.add_argument("--tune-channel-at", type=float, default=0.7)
    p.add_argument("--grid-mask-lr", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--grid-fo-mask-lr", type=float, nargs="+", default=None,
                   help="unstructured first-order score lrs, when they should differ from --grid-mask-lr (e.g. to "
                        "fix each variant at its own earlier choice)")
    p.add_argument("--grid-channel-mask-lr", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--grid-gamma", type=float, nargs="+", default=[0.3, 3.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="train nothing: rewrite the table and plot from a results JSON this script wrote")
    args = p.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        for k, v in saved["settings"].items():
            if k not in ("out", "render"):
                setattr(args, k, v)
        res = dict(saved["results"])
        for mode in ("unstructured", "channels"):
            res[mode] = {float(t): v for t, v in res[mode].items()}
        n = saved.get("sizes", [args.train, args.val, args.test])
        write(res, args, saved["command"], saved["wall_seconds"], *n)
        return
    torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bip.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t_start = time.time()
    (xtr, ytr), ev = data(args)
    loader = T.Batches(xtr, ytr, args.batch_size, args.seed)
    torch.manual_seed(args.seed)
    init = T.LeNet5()
    dense = copy.deepcopy(init)
    print(f"dense training ({args.dense_epochs} epochs, rewind point at step {args.rewind_step})", flush=True)
    rewind = T.train(dense, loader, args.dense_epochs, args.lr, snapshot_at=args.rewind_step)
    if rewind is None:
        raise SystemExit(f"--rewind-step {args.rewind_step} is beyond the dense run")
    res = {"dense": evaluate(dense, ev), "unstructured": {}, "channels": {}, "tuning": []}
    print(f"  dense val {res['dense']['val']:.4f} test {res['dense']['test']:.4f}", flush=True)

    print("tuning BiP on validation", flush=True)
    best_u = tune(dense, loader, ev, args, args.tune_at, False, args.grid_mask_lr, res["tuning"],
                  grid_lr_fo=args.grid_fo_mask_lr)
    best_c = (tune(dense, loader, ev, args, args.tune_channel_at, True, args.grid_channel_mask_lr, res["tuning"])
              if args.channel_targets else {})
    res["chosen"] = {"unstructured": {("IG" if k else "FO"): v for k, v in best_u.items()},
                     "channels": {("IG" if k else "FO"): v for k, v in best_c.items()}}
    print(f"  chosen (mask_lr, gamma): {res['chosen']}", flush=True)

    print("IMP (unstructured, tickets.run_imp)", flush=True)
    t0 = time.time()
    imp_args = argparse.Namespace(epochs=args.epochs, lr=args.lr, dense_state=dense.state_dict())
    imp = T.run_imp(init, rewind, loader, {"val": ev["val"], "test": ev["test"]}, imp_args, sorted(args.targets))
    imp_s = time.time() - t0
    imp = {t: {"val": r["val_accuracy"], "test": r["accuracy"], "epochs": r["epochs"] - args.epochs + args.dense_epochs,
               "rounds": r["rounds"], "weight_sparsity": r["sparsity"], "chain_seconds": imp_s} for t, r in imp.items()}
    print("IMP (channels)", flush=True)
    imp_c = imp_channels(init, dense, rewind, loader, ev, args, args.channel_targets) if args.channel_targets else {}

    for mode, targets, best, imp_r in (("unstructured", args.targets, best_u, imp),
                                       ("channels", args.channel_targets, best_c, imp_c)):
        structured = mode == "channels"
        for t in sorted(targets):
            row = {"IMP": imp_r[t], "one-shot magnitude + FT": one_shot(dense, loader, ev, args, t, structured)}
            for implicit, name in ((True, "BiP (paper IG)"), (False, "BiP (first-order)")):
                lr, gamma = best[implicit]
                row[name] = run_bip(dense, loader, ev, args, t, structured, implicit, lr, gamma)
            res[mode][t] = row
            print(f"[{mode} {t:.0%}] " + "  ".join(f"{k}: test {v['test']:.4f} ({v['epochs']:.1f} ep)"
                                                  for k, v in row.items()), flush=True)
    wall = time.time() - t_start
    write(res, args, command, wall, len(xtr), len(ev["val"][0]), len(ev["test"][0]))


def write(res, args, command, wall, n_tr, n_val, n_te):
    methods = ["IMP", "one-shot magnitude + FT", "BiP (paper IG)", "BiP (first-order)"]
    lines = [
        "# BiP vs one-shot magnitude + fine-tune vs IMP (Fashion-MNIST LeNet-5)",
        "",
        f"LeNet-5 of benchmarks/tickets.py, {n_tr} training / {n_val} validation (held out of training) / {n_te} test "
        f"images, Adam lr={args.lr} for the weights, batch {args.batch_size}, seed {args.seed}, "
        f"{args.threads} thread.  Dense run {args.dense_epochs} epochs (val {res['dense']['val']:.4f}, test "
        f"{res['dense']['test']:.4f}); IMP rounds and one-shot fine-tuning {args.epochs} epoch(s) each, IMP "
        f"rewinds to step {args.rewind_step}; BiP searches {args.bip_epochs} epochs from the dense weights "
        "(lower level Adam on the weights, upper level SGD(0.9) on the scores, alternating batches) and is "
        "reported without retraining.  Epochs = forward+backward passes / training-set size, dense run included.",
        "",
        f"BiP settings chosen on validation only (unstructured at {args.tune_at:.0%}, channels at "
        f"{args.tune_channel_at:.0%}; grid: score lr {args.grid_mask_lr} / channels {args.grid_channel_mask_lr}, "
        f"gamma {args.grid_gamma} for the IG variant): "
        + "; ".join(f"{mode} {v}: mask_lr={res['chosen'][mode][v][0]:g}" + (
            f", γ={res['chosen'][mode][v][1]:g}" if v == "IG" else "") for mode in ("unstructured", "channels")
            if res["chosen"][mode] for v in ("IG", "FO")) + ".",
        "",
        "| mode | sparsity | " + " | ".join(f"{m} test acc (epochs)" for m in methods) + " | BiP-IG − IMP | "
        "IMP epochs / BiP-IG epochs |",
        "|---|---:|" + "---:|" * len(methods) + "---:|---:|",
    ]
    verdicts = []
    for mode in ("unstructured", "channels"):
        for t, row in sorted(res[mode].items()):
            cells = [f"{row[m]['test']:.4f} ({row[m]['epochs']:.1f})" for m in methods]
            d = row["BiP (paper IG)"]["test"] - row["IMP"]["test"]
            ratio = row["IMP"]["epochs"] / row["BiP (paper IG)"]["epochs"]
            best = max(methods, key=lambda m: row[m]["test"])
            cells = [f"**{c}**" if m == best else c for c, m in zip(cells, methods)]
            lines.append(f"| {mode} | {t:.0%} | " + " | ".join(cells) + f" | {d:+.4f} | {ratio:.1f}× |")
            reached = d >= 0
            verdicts.append(f"- {mode} {t:.0%}: BiP (paper IG) {row['BiP (paper IG)']['test']:.4f} vs IMP "
                            f"{row['IMP']['test']:.4f} with {ratio:.1f}× less compute — "
                            + ("met" if reached and ratio >= 2 else "NOT met") + (
                                "" if reached else " (below IMP's accuracy)") + (
                                "" if ratio >= 2 else " (less than 2× cheaper)")
                            + f"; first-order variant {row['BiP (first-order)']['test']:.4f} "
                            f"(IG − first-order {row['BiP (paper IG)']['test'] - row['BiP (first-order)']['test']:+.4f})")
    lines += ["", "Validation accuracy of the same models:", "",
              "| mode | sparsity | " + " | ".join(methods) + " | weight sparsity (IMP / BiP) |",
              "|---|---:|" + "---:|" * len(methods) + "---:|"]
    for mode in ("unstructured", "channels"):
        for t, row in sorted(res[mode].items()):
            lines.append(f"| {mode} | {t:.0%} | " + " | ".join(f"{row[m]['val']:.4f}" for m in methods)
                         + f" | {row['IMP']['weight_sparsity']:.3f} / {row['BiP (paper IG)']['weight_sparsity']:.3f} |")
    lines += ["", "Tuning runs (validation accuracy; the test set was not evaluated for them):", "",
              "| mode | sparsity | variant | score lr | γ | val acc | mask entries changed vs magnitude init |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in res["tuning"]:
        lines.append(f"| {r['mode']} | {r['target']:.0%} | {'IG' if r['implicit_gradient'] else 'first-order'} | "
                     f"{r['mask_lr']:g} | {format(r['gamma'], 'g') if r['implicit_gradient'] else '—'} | {r['val']:.4f} | "
                     f"{r['mask_changed_vs_magnitude_init']:.3f} |")
    lines += ["", "Target (paper): BiP reaches IMP's accuracy with ≥ 2× less compute:", *verdicts, "",
              f"Command: `{command}` ({wall / 60:.1f} min, torch {torch.__version__}, {args.threads} thread)", ""]
    md = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bip.md").write_text(md)
    (args.out / "bip.json").write_text(json.dumps({
        "command": command, "wall_seconds": wall, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "render")},
        "sizes": [n_tr, n_val, n_te],
        "results": {k: ({str(t): v for t, v in res[k].items()} if k in ("unstructured", "channels") else res[k])
                    for k in res}}, indent=2, default=str))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        marks = {"IMP": "o-", "one-shot magnitude + FT": "^-", "BiP (paper IG)": "s-", "BiP (first-order)": "x:"}
        for ax, mode in zip(axes, ("unstructured", "channels")):
            rows = sorted(res[mode].items())
            xs = [100 * t for t, _ in rows]
            for m in methods:
                ep = "/".join(f"{row[m]['epochs']:.0f}" for _, row in rows)
                ax.plot(xs, [row[m]["test"] for _, row in rows], marks[m], label=f"{m} ({ep} epochs)")
            ax.axhline(res["dense"]["test"], color="gray", ls="--", label=f"dense ({args.dense_epochs} epochs)")
            ax.set_xticks(xs)
            ax.set_xlabel(("weight" if mode == "unstructured" else "channel") + " sparsity (%)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{mode}: accuracy (training compute per point in the legend)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / "bip.png", dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print()
    print(md)


if __name__ == "__main__":
    main()
