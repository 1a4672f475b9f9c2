"""Global allocation through ``prune.global_unstructured(..., pruning_method=OBSIHT)`` (issue 19).

A 784-300-100-10 MLP (as in examples/prune_fashion_mlp.py) and a small CNN trained on Fashion-MNIST (55k train /
5k validation held out of the training set / 10k test), pruned without fine-tuning at 80/90/95%:
magnitude (torch's global L1 ranking), OBS-IHT with allocation="uniform" and "global" (the default of
global_unstructured), each at T=1 and at best T (T<=3, the step and T chosen on held-out calibration batches).
Calibration: 4096 training images.  Reports test accuracy (validation beside it) and per-layer sparsity.

    OMP_NUM_THREADS=1 python benchmarks/allocation.py            # both models, ~10 min on a quiet 2-core machine
    python benchmarks/allocation.py --models mlp --sparsities 0.9
    python benchmarks/allocation.py --models mlp --calib-draw 3 --out ...   # another 4096 calibration images
    python benchmarks/allocation.py --mean A.json B.json ... --out ...       # mean (sd) over such runs
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import OBSIHT, Curvature
from obs_plugins.data import load_fashion_mnist


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


MODELS = {"mlp": mlp, "cnn": cnn}


class Stack(nn.Module):
    """The same layers (shared, not copied) as a stack of blocks in an ``nn.ModuleList``, one block per Linear /
    Conv2d with the parameter-free modules after it, so that ``Curvature.layerwise`` can calibrate block by block
    (``--sequential``: each layer's Gram collected on the outputs of the layers before it, as planned)."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        blocks, cur = [], []
        for m in seq:
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(isinstance(c, (nn.Linear, nn.Conv2d)) for c in cur):
                blocks.append(nn.Sequential(*cur))
                cur = []
            cur.append(m)
        blocks.append(nn.Sequential(*cur))
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


def data():
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    x, xt = x.float().div(255).unsqueeze(1), xt.float().div(255).unsqueeze(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:55000], perm[55000:]
    return (x[tr], y[tr]), (x[va], y[va]), (xt, yt)


def batches(x, y, bs, seed=None):
    idx = torch.arange(len(x)) if seed is None else torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[idx[i:i + bs]], y[idx[i:i + bs]]) for i in range(0, len(x), bs)]


def accuracy(model, x, y):
    with torch.no_grad():
        return sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches(x, y, 1000)) / len(y)


def train(model, tr, epochs):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for ep in range(epochs):
        for xb, yb in batches(*tr, 128, seed=ep):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def layers(model):
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def layer_sparsity(model):
    return [round(float((m.weight == 0).float().mean()), 4) for m, _ in layers(model)]


def run(name, dense, tr, va, te, calib, sparsity, method, allocation=None, iterations=1, sequential=False):
    model = copy.deepcopy(dense)
    if sequential and method != "magnitude":
        model = Stack(model)
    params = layers(model)
    t0 = time.perf_counter()
    report = {}
    if method == "magnitude":
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        curv = Curvature.layerwise(model, params, calib, loss_fn=nn.functional.cross_entropy, progress=False,
                                   sequential=sequential)
        kw = {} if allocation is None else {"allocation": allocation}
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=sparsity, curvature=curv,
                                  iterations=iterations, progress=False, **kw)
    secs = time.perf_counter() - t0
    for m, n in params:
        prune.remove(m, n)
    label = "magnitude (global L1)" if method == "magnitude" else f"OBS-IHT {allocation} T{'=1' if iterations == 1 else '≤' + str(iterations)}"
    row = {"model": name, "sparsity": sparsity, "method": label, "test": accuracy(model, *te),
           "val": accuracy(model, *va), "layers": layer_sparsity(model), "seconds": secs, **report}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=3, help="best T is chosen among 1..this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-draw", type=int, default=0,
                    help="0 (default): the first 4096 training images; K >= 1: 4096 training images drawn at random "
                         "with seed K (the trained networks do not change)")
    ap.add_argument("--sequential", action="store_true",
                    help="calibrate layer by layer: each layer's Gram on the outputs of the layers before it as "
                         "planned (the layers run as a block stack); default: one pass on the dense model")
    ap.add_argument("--mean", nargs="+", metavar="JSON", help="only summarise earlier runs: mean (sd) per row")
    ap.add_argument("--out", default="benchmarks/results/allocation")
    args = ap.parse_args(argv)
    if args.mean:
        return mean(args.mean, args.out)
    if args.calib_draw < 0:
        ap.error("--calib-draw: must be >= 0")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    tr, va, te = data()
    if args.calib_draw == 0:
        pick = torch.arange(4096)
    else:
        pick = torch.randperm(len(tr[0]), generator=torch.Generator().manual_seed(args.calib_draw))[:4096]
    calib = batches(tr[0][pick], tr[1][pick], 256)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = train(MODELS[name](), tr, args.epochs)
        rows.append({"model": name, "sparsity": 0.0, "method": "dense", "test": accuracy(dense, *te),
                     "val": accuracy(dense, *va), "layers": layer_sparsity(dense), "seconds": 0.0})
        for sp in (float(s) for s in args.sparsities.split(",")):
            rows.append(run(name, dense, tr, va, te, calib, sp, "magnitude"))
            for alloc in ("uniform", "global"):
                for T in (1, args.iterations):
                    rows.append(run(name, dense, tr, va, te, calib, sp, "obs_iht", alloc, T, args.sequential))
    write(rows, args, time.perf_counter() - t_all)
    return 0


def write(rows, args, secs):
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    cmd = "python benchmarks/allocation.py " + " ".join(sys.argv[1:])
    draw = "the first" if args.calib_draw == 0 else f"draw {args.calib_draw} of"
    how = "sequential (layer by layer)" if args.sequential else "one pass"
    lines = [f"Fashion-MNIST, no fine-tuning after pruning; calibration {draw} 4096 training images, {how}; {args.epochs} training "
             f"epochs; {args.threads} torch thread(s). Command: `{cmd.strip()}`. Total {secs:.0f} s.", "",
             "| model | sparsity | method | test acc | val acc | per-layer sparsity | prune s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['method']} | {r['test']:.4f} | {r['val']:.4f} | "
                     f"{' / '.join(f'{x:.2f}' for x in r['layers'])} | {r['seconds']:.1f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "command": cmd}, f, indent=2)
    plot(rows, args.out + ".png")
    print("\n".join(lines))


def mean(paths, out):
    """Mean (sd) of test and validation accuracy per (model, sparsity, method) over runs (e.g. calibration draws)."""
    import statistics
    runs = [json.load(open(p))["rows"] for p in paths]
    keys = [(r["model"], r["sparsity"], r["method"]) for r in runs[0]]
    for p, rs in zip(paths, runs):
        if [(r["model"], r["sparsity"], r["method"]) for r in rs] != keys:
            raise SystemExit(f"--mean: {p} has other rows than {paths[0]}")

    def ms(vals):
        return f"{statistics.mean(vals):.4f} ({statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f})"
    lines = [f"Mean (sd) over {len(paths)} runs: {', '.join(paths)}", "",
             "| model | sparsity | method | test acc | val acc | test acc min … max |", "|---|---|---|---|---|---|"]
    for i, (m, sp, meth) in enumerate(keys):
        te = [rs[i]["test"] for rs in runs]
        va = [rs[i]["val"] for rs in runs]
        lines.append(f"| {m} | {sp:.0%} | {meth} | {ms(te)} | {ms(va)} | {min(te):.4f} … {max(te):.4f} |")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m and r["method"] != "dense"]
        for meth in dict.fromkeys(r["method"] for r in rs):
            pts = [(r["sparsity"], r["test"]) for r in rs if r["method"] == meth]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=meth)
        dense = [r for r in rows if r["model"] == m and r["method"] == "dense"][0]["test"]
        ax.axhline(dense, color="k", ls="--", label="dense")
        ax.set_title(f"{m}: test accuracy, no fine-tuning")
        ax.set_xlabel("sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
