"""Pruning-limit estimate vs the measured limit on Fashion-MNIST (Zhang et al., NeurIPS 2024; obs_plugins.limit).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/limit.py            # MLP and CNN, each plain and l1 (~25 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/limit.py --quick    # smaller everything, a few minutes

For each model (an MLP and a small CNN), trained plain and with the paper's l1 penalty (``lambda * sum |w|``
over the conv/linear weights added to the cross-entropy): train ``--epochs`` epochs (Adam 1e-3, or with
``--optimizer sgd`` the reference code's SGD 1e-2 momentum 0.9; batch 128) on
55k training images (the last 5k held out, unused here), then

* predicted: ``obs_plugins.limit.estimate`` — eps = std of the dense per-batch training loss over
  ``--eps-batches`` batches of 128 training images; Hessian spectrum by SLQ (``--steps`` Lanczos steps, full
  re-orthogonalisation, ``--probes`` Rademacher probes averaged) with HVPs averaged over ``--hvp-samples``
  training images; s* solves G(R(s)) = s on the exact global-magnitude path;
* measured: global one-shot magnitude pruning (one threshold over every conv/linear weight, no fine-tuning) at
  sparsities 0.01 … 0.99; the limit is the largest sparsity whose *test* accuracy stays >= dense − tol for
  tol in ``--tolerances`` (the first one is the headline), and the largest whose training loss (the same
  batches as eps) stays <= dense + eps — the quantity the theory is about;
* with ``--refit-epochs E``, also the limit when the kept weights are re-fit: the same masks, then E epochs of
  masked cross-entropy training (the theory asks whether *some* s-sparse point lies in the sublevel set; magnitude
  pruning without re-fitting finds one only when training made the small weights negligible, e.g. strong l1).

Nothing is tuned on the test set (no setting here was chosen by looking at it).  Writes
benchmarks/results/limit.{md,json,png}; ``--render`` rebuilds the table/plot from the JSON.
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from obs_plugins.data import load_fashion_mnist  # noqa: E402
from obs_plugins.limit import LimitReport, estimate, magnitude_path, path_limit  # noqa: E402
from obs_plugins.masks import count_to_prune  # noqa: E402

MEAN, STD = 0.2860, 0.3530
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2}


class MLP(nn.Module):
    def __init__(self, hidden=(128,)):
        super().__init__()
        dims = (784, *hidden, 10)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class SmallCNN(nn.Module):
    """conv 1->8 (5x5) -> pool -> conv 8->16 (5x5) -> pool -> fc 256->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def prunable(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def l1_of(model):
    return sum(m.weight.abs().sum() for m in prunable(model))


def train(model, x, y, *, epochs, l1, seed, lr=1e-3, bs=128, progress=True, optimizer="adam", masks=None):
    """``optimizer="adam"``: Adam(lr); ``"sgd"``: the reference code's recipe, SGD(lr, momentum 0.9), constant lr
    (its FC configs).  ``masks``: {module: 0/1 tensor} re-applied to the weights after every step (re-fitting the
    kept weights of a pruned model)."""
    from tqdm.auto import tqdm
    opt = torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in tqdm(range(0, len(x), bs), desc=f"train epoch {ep + 1}", disable=not progress, leave=False):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if l1:
                loss = loss + l1 * l1_of(model)  # the paper's l1 term (LOMP), on the conv/linear weights
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks:
                with torch.no_grad():
                    for m, keep in masks.items():
                        m.weight.mul_(keep)
    model.eval()
    return model


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


@torch.no_grad()
def accuracy_and_loss(model, x_batches):
    correct = total = 0
    loss = 0.0
    for xb, yb in x_batches:
        out = model(xb)
        correct += int((out.argmax(-1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        total += len(yb)
    return correct / total, loss / total


def refit_limits(model, args, data, eps_b, test_b, rep):
    """The limit when the kept weights may be re-fit (what the theory asks: does an s-sparse point lie in the
    sublevel set ``L <= L(w*) + eps``?).  At each sparsity: the sweep's exact global-magnitude mask, then
    ``--refit-epochs`` epochs of cross-entropy training of the kept weights only (the training optimizer and lr,
    no l1, the mask re-applied after every step, the same data order at every sparsity).  Scans 0.99, 0.98, ...
    down until every criterion has passed; a criterion's limit is the largest sparsity passing it.  Two
    references: the trained dense model the estimate saw (accuracy >= dense - tol, loss <= L(w*) + eps — the
    theory's set) and the dense model trained the same extra epochs (so extra training alone earns nothing)."""
    xtr, ytr = data[0], data[1]
    mods = prunable(model)
    flat = torch.cat([m.weight.detach().reshape(-1) for m in mods])
    order, _ = magnitude_path(flat)
    D = flat.numel()
    tol = args.tolerances[0]

    def fit(s):
        m2 = copy.deepcopy(model)
        keep = torch.ones(D)
        keep[order[:count_to_prune(s, D)]] = 0
        masks, i = {}, 0
        for m in prunable(m2):
            n = m.weight.numel()
            masks[m] = keep[i:i + n].view_as(m.weight)
            i += n
        with torch.no_grad():
            for m, k in masks.items():
                m.weight.mul_(k)
        train(m2, xtr, ytr, epochs=args.refit_epochs, l1=0.0, seed=args.seed + 2, lr=args.lr, progress=False,
              optimizer=args.optimizer, masks=masks)
        assert all(int((m.weight[k == 0] != 0).sum()) == 0 for m, k in masks.items())
        acc, _ = accuracy_and_loss(m2, test_b)
        _, loss = accuracy_and_loss(m2, eps_b)
        return acc, loss

    dense_acc, dense_loss = rep.sweep["dense_accuracy"], rep.dense_loss
    ref_acc, ref_loss = fit(0.0)
    crit = {"acc_dense": lambda a, l: a >= dense_acc - tol, "loss_dense": lambda a, l: l <= dense_loss + rep.epsilon,
            "acc_refit": lambda a, l: a >= ref_acc - tol, "loss_refit": lambda a, l: l <= ref_loss + rep.epsilon}
    limits = {k: None for k in crit}
    curve = []
    for i in range(99, 0, -1):
        s = i / 100
        acc, loss = fit(s)
        curve.append(dict(sparsity=s, accuracy=acc, train_loss=loss))
        for k, ok in crit.items():
            if limits[k] is None and ok(acc, loss):
                limits[k] = s
        if all(v is not None for v in limits.values()):
            break
    return dict(epochs=args.refit_epochs, tolerance=tol, dense_refit_accuracy=ref_acc, dense_refit_loss=ref_loss,
                limits={k: (v if v is not None else 0.0) for k, v in limits.items()}, curve=curve)


def direct_path(model, rep, hvp_b):
    """The quantity the path model approximates, evaluated directly: the first sparsity on the very counts of
    ``rep.path`` (grid, then bisection) where the actual loss on the HVP images, with the k smallest weights
    zeroed, exceeds the dense loss there by eps.  One forward pass over the HVP images per count, against one
    Hessian-vector product per count for the path model.  Returns (limit, forward passes, seconds)."""
    t0 = time.perf_counter()
    mods = prunable(model)
    flat = torch.cat([m.weight.detach().reshape(-1) for m in mods])
    order, _ = magnitude_path(flat)
    D = flat.numel()
    _, base = accuracy_and_loss(model, hvp_b)
    seen = {}

    def increase(k):
        if k not in seen:
            w = flat.clone()
            w[order[:k]] = 0
            m2, i = copy.deepcopy(model), 0
            with torch.no_grad():
                for m in prunable(m2):
                    n = m.weight.numel()
                    m.weight.copy_(w[i:i + n].view_as(m.weight))
                    i += n
            seen[k] = accuracy_and_loss(m2, hvp_b)[1] - base
        return seen[k]

    counts = [round(s * D) for s in rep.path["sparsity"]]
    limit = path_limit(increase, D, rep.epsilon, counts)
    return limit, len(seen), time.perf_counter() - t0


def run_one(name, l1, args, data):
    torch.manual_seed(args.seed)
    model = MLP(tuple(args.mlp_hidden)) if name == "mlp" else SmallCNN()
    xtr, ytr, xte, yte = data
    t0 = time.perf_counter()
    train(model, xtr, ytr, epochs=args.epochs, l1=l1, seed=args.seed, progress=args.progress,
          optimizer=args.optimizer, lr=args.lr)
    t_train = time.perf_counter() - t0
    g = torch.Generator().manual_seed(args.seed + 1)
    pick = torch.randperm(len(xtr), generator=g)
    eps_idx = pick[:args.eps_batches * 128]
    steps, probes, n_hvp = ((args.steps, args.probes, args.hvp_samples) if name == "mlp" else
                            (args.cnn_steps, args.cnn_probes, args.cnn_hvp_samples))
    hvp_idx = pick[:n_hvp]
    data_b = batches(xtr[eps_idx], ytr[eps_idx], 128)
    hvp_b = batches(xtr[hvp_idx], ytr[hvp_idx], 512)
    test_b = batches(xte, yte, 1000)
    label = f"{name}{' + l1' if l1 else ''}"
    t0 = time.perf_counter()
    rep = estimate(model, data_b, F.cross_entropy, hvp_data=hvp_b, steps=steps, probes=probes,
                   seed=args.seed, sweep=True, eval_data=test_b, acc_tolerance=args.tolerances[0], label=label,
                   progress=args.progress)
    t_est = time.perf_counter() - t0
    refit = None
    if args.refit_epochs:
        t0 = time.perf_counter()
        refit = refit_limits(model, args, data, data_b, test_b, rep)
        refit["seconds"] = time.perf_counter() - t0
        print(f"{label}: re-fit ({args.refit_epochs} epoch(s)) limits {refit['limits']}, dense re-fit acc "
              f"{refit['dense_refit_accuracy']:.4f}; {refit['seconds']:.0f} s", flush=True)
    direct = None
    if args.direct_path:
        lim, n_fwd, sec = direct_path(model, rep, hvp_b)
        direct = dict(limit=lim, forward_passes=n_fwd, seconds=sec, path_seconds=rep.seconds["path"],
                      path_hvps=rep.path["hvps"])
        print(f"{label}: the loss on the HVP images itself along the path leaves eps at {lim:.3f} ({n_fwd} forward "
              f"passes, {sec:.1f} s) -- the path model {rep.path['predicted']:.3f} ({rep.path['hvps']} HVPs, "
              f"{rep.seconds['path']:.1f} s)", flush=True)
    w = torch.cat([m.weight.detach().abs().reshape(-1) for m in prunable(model)])
    row = dict(direct_path=direct, model=name, l1=l1, label=label, predicted=rep.predicted,
               measured={str(t): rep.measured_limit(t) for t in args.tolerances},
               measured_loss=rep.measured_loss_limit(), dense_accuracy=rep.sweep["dense_accuracy"],
               epsilon=rep.epsilon, num_weights=rep.num_weights, slq=f"{steps}×{probes} @ {n_hvp}",
               small_weights=float((w < 1e-3).float().mean()),
               path=rep.path["predicted"], path_second_order=rep.path["predicted_second_order"],
               train_seconds=t_train, estimate_seconds=t_est, seconds=rep.seconds, refit=refit)
    print(f"{label}: predicted {rep.predicted:.3f} (quadratic along the path {rep.path['predicted']:.3f}), "
          f"measured (acc, tol {args.tolerances[0]}) "
          f"{row['measured'][str(args.tolerances[0])]:.2f}, measured (loss) {row['measured_loss']:.2f}, "
          f"dense acc {row['dense_accuracy']:.4f}, eps {rep.epsilon:.4f}; train {t_train:.0f} s, "
          f"estimate {t_est:.0f} s ({', '.join(f'{k} {v:.0f}' for k, v in rep.seconds.items())})", flush=True)
    return row, rep


def first_failure_limits(res, i, tol) -> tuple[float, float]:
    """Row ``i``'s measured limits up to the first failing sparsity (accuracy at ``tol``, loss), from the run's
    stored sweep (every run of this script stores its reports)."""
    rep = LimitReport(**res["reports"][i])
    return rep.measured_limit(tol, first_failure=True), rep.measured_loss_limit(first_failure=True)


def render(res, out: Path):
    args = res["args"]
    tols = args["tolerances"]
    head = ("| model | D | SLQ steps×probes @ HVP images | dense test acc | ε | share abs(w) < 1e-3 | predicted s* | "
            + " | ".join(f"measured, acc ≥ dense−{t:g}" for t in tols)
            + " | measured, loss ≤ dense+ε | pred − meas (acc, tol " + f"{tols[0]:g}) | pred − meas (loss) |"
            + " quadratic along the path (½dᵀHd alone) | path − meas up to the first failure (acc / loss) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(res["rows"]):
        m0 = r["measured"][str(tols[0])]
        f0 = first_failure_limits(res, i, tols[0])
        lines.append(f"| {r['label']} | {r['num_weights']:,} | {r['slq']} | {r['dense_accuracy']:.4f} | {r['epsilon']:.4f} | "
                     f"{r['small_weights']:.2f} | **{r['predicted']:.3f}** | "
                     + " | ".join(f"{r['measured'][str(t)]:.2f}" for t in tols)
                     + f" | {r['measured_loss']:.2f} | {100 * (r['predicted'] - m0):+.1f} pts | "
                     f"{100 * (r['predicted'] - r['measured_loss']):+.1f} pts | "
                     + (f"{r['path']:.3f} ({r['path_second_order']:.3f}) | {100 * (r['path'] - f0[0]):+.1f} / "
                        f"{100 * (r['path'] - f0[1]):+.1f} pts |" if "path" in r else "— | — |"))
    refit_rows = [r for r in res["rows"] if r.get("refit")]
    if refit_rows:
        e = refit_rows[0]["refit"]["epochs"]
        lines += ["", f"Re-fit limits: the same masks, then {e} epoch(s) of training of the kept weights only "
                  "(cross-entropy, the training optimizer, no l1); reference = the trained dense model (the "
                  "theory's sublevel set) / the dense model trained the same extra epoch(s):", "",
                  "| model | predicted s* | no re-fit, acc / loss | re-fit vs dense, acc ≥ dense−"
                  f"{tols[0]:g} / loss ≤ L(w*)+ε | re-fit vs dense re-fit (its accuracy), acc / loss | "
                  "pred − re-fit (vs dense: acc / loss) |", "|---|---|---|---|---|---|"]
        for r in refit_rows:
            f = r["refit"]["limits"]
            lines.append(f"| {r['label']} | **{r['predicted']:.3f}** | {r['measured'][str(tols[0])]:.2f} / "
                         f"{r['measured_loss']:.2f} | {f['acc_dense']:.2f} / {f['loss_dense']:.2f} | "
                         f"{f['acc_refit']:.2f} / {f['loss_refit']:.2f} ({r['refit']['dense_refit_accuracy']:.4f}) | "
                         f"{100 * (r['predicted'] - f['acc_dense']):+.1f} / {100 * (r['predicted'] - f['loss_dense']):+.1f} pts |")
    ok_acc = sum(abs(r["predicted"] - r["measured"][str(tols[0])]) <= 0.05 for r in res["rows"])
    ok_loss = sum(abs(r["predicted"] - r["measured_loss"]) <= 0.05 for r in res["rows"])
    path_rows = [(r, first_failure_limits(res, i, tols[0])) for i, r in enumerate(res["rows"]) if "path" in r]
    path_ok = (f" The quadratic model along the path (a first crossing), against the measured limits up to their "
               f"first failure: {sum(abs(r['path'] - f[0]) <= 0.05 for r, f in path_rows)}"
               f"/{len(path_rows)} (accuracy), {sum(abs(r['path'] - f[1]) <= 0.05 for r, f in path_rows)}"
               f"/{len(path_rows)} (loss).") if path_rows else ""
    direct = [r for r in res["rows"] if r.get("direct_path")]
    if direct:
        lines += ["", "The path model against the quantity it approximates, evaluated directly (`--direct-path`): "
                  "the actual loss on the HVP images at the same counts (grid, then bisection), one forward pass "
                  "per count:", "",
                  "| model | path model | its HVPs / seconds | actual loss on the HVP images: limit | forward "
                  "passes / seconds | measured, acc / loss |", "|---|---|---|---|---|---|"]
        for r in direct:
            d = r["direct_path"]
            lines.append(f"| {r['label']} | {r['path']:.3f} | {d['path_hvps']} / {d['path_seconds']:.1f} | "
                         f"{d['limit']:.3f} | {d['forward_passes']} / {d['seconds']:.1f} | "
                         f"{r['measured'][str(tols[0])]:.2f} / {r['measured_loss']:.2f} |")
    text = "\n".join([
        "# Pruning-limit estimate vs measured limit (Fashion-MNIST)", "",
        f"Command: `{res['command']}` — {res['seconds'] / 60:.1f} min on {args['threads']} thread(s).", "",
        f"Training: {args['epochs']} epochs " + (   # lr None: a run from before the default was resolved in main
            f"Adam {args.get('lr') or DEFAULT_LR['adam']:g}" if args.get("optimizer", "adam") == "adam" else
            f"SGD {args.get('lr') or DEFAULT_LR['sgd']:g} momentum 0.9 (constant lr, the reference code's recipe)")
        + " batch 128 on 55k images; l1 rows add "
        f"λ·Σ|w| (λ = {args['l1_mlp']:g} MLP, {args['l1_cnn']:g} CNN). "
        f"Estimate: ε = std of the dense per-batch training loss over {args['eps_batches']} batches of 128; "
        "SLQ with full re-orthogonalisation, Rademacher probes averaged, HVPs over a fixed random subset of the "
        "training images (per row below; the CNN's HVPs cost ~15× the MLP's, so it gets fewer steps). "
        "Measured: global one-shot magnitude pruning of every conv/linear weight, no fine-tuning, sparsity grid "
        "0.01 … 0.99 (step 0.01); test accuracy vs dense minus the tolerance, and training loss (the ε batches) "
        "vs dense + ε. 'share abs(w) < 1e-3' = fraction of the weights below 1e-3 after training.", "",
        *lines, "",
        f"Within 5 points of the measured limit: {ok_acc}/{len(res['rows'])} against the accuracy limit "
        f"(tolerance {tols[0]:g}), {ok_loss}/{len(res['rows'])} against the loss limit.{path_ok}", ""])
    (out.with_suffix(".md")).write_text(text)
    return text


def collect(paths, out: Path):
    """One table over several runs' JSON (e.g. seeds): every row with its seed and λ, the gaps, and the re-fit
    limits where the run measured them."""
    lines = ["| run | model | λ | seed | share abs(w) < 1e-3 | dense test acc | predicted s* | measured, acc ≥ dense−tol "
             "/ loss ≤ dense+ε | pred − meas (acc / loss) | path model (½dᵀHd alone) | measured up to the first "
             "failure, acc / loss | path − meas up to the first failure (acc / loss) | "
             "re-fit vs dense, acc / loss | pred − re-fit (acc / loss) | re-fit vs dense re-fit, acc / loss |",
             "|" + "---|" * 15]
    for path in paths:
        res = json.loads(Path(path).read_text())
        tol = str(res["args"]["tolerances"][0])
        for i, r in enumerate(res["rows"]):
            m, ml = r["measured"][tol], r["measured_loss"]
            fa, fl = first_failure_limits(res, i, res["args"]["tolerances"][0])
            f = (r.get("refit") or {}).get("limits")
            cells = ([f"{f['acc_dense']:.2f} / {f['loss_dense']:.2f}",
                      f"{100 * (r['predicted'] - f['acc_dense']):+.1f} / {100 * (r['predicted'] - f['loss_dense']):+.1f}",
                      f"{f['acc_refit']:.2f} / {f['loss_refit']:.2f}"] if f else ["—"] * 3)
            lines.append(f"| {Path(path).stem} | {r['model']} | {r['l1']:g} | {res['args']['seed']} | "
                         f"{r['small_weights']:.2f} | {r['dense_accuracy']:.4f} | **{r['predicted']:.3f}** | "
                         f"{m:.2f} / {ml:.2f} | {100 * (r['predicted'] - m):+.1f} / {100 * (r['predicted'] - ml):+.1f} | "
                         + (f"{r['path']:.3f} ({r['path_second_order']:.3f}) | {fa:.2f} / {fl:.2f} | "
                            f"{100 * (r['path'] - fa):+.1f} / {100 * (r['path'] - fl):+.1f} | " if "path" in r
                            else "— | — | — | ")
                         + " | ".join(cells) + " |")
    text = "\n".join(["# Pruning-limit estimate: runs collected", "",
                      f"`python benchmarks/limit.py --collect {' '.join(str(p) for p in paths)} --out {out}`", "",
                      "Gaps in percentage points; tolerance = each run's first (0.01 by default).", "", *lines, ""])
    out.with_suffix(".md").write_text(text)
    return text


def plot(reps, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(reps), 3, figsize=(16, 3.6 * len(reps)), squeeze=False)
    for rep, row in zip(reps, axes):
        rep.plot(axes=row)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    ap.add_argument("--l1-mlp", type=float, default=1e-4, help="l1 strength for the MLP (default 1e-4)")
    ap.add_argument("--l1-cnn", type=float, default=1e-4, help="l1 strength for the CNN (default 1e-4)")
    ap.add_argument("--no-plain", action="store_true", help="only the l1 runs")
    ap.add_argument("--no-l1", action="store_true", help="only the plain runs")
    ap.add_argument("--mlp-hidden", type=int, nargs="+", default=[32])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="adam (lr 1e-3) or the reference code's sgd (lr 1e-2, momentum 0.9, constant)")
    ap.add_argument("--lr", type=float, default=None, help="default 1e-3 (adam) / 1e-2 (sgd)")  # DEFAULT_LR
    ap.add_argument("--steps", type=int, default=128, help="MLP: Lanczos steps (default 128)")
    ap.add_argument("--probes", type=int, default=4, help="MLP: SLQ probes (default 4)")
    ap.add_argument("--hvp-samples", type=int, default=4096, help="MLP: HVP images (default 4096)")
    ap.add_argument("--cnn-steps", type=int, default=64, help="CNN: Lanczos steps (default 64)")
    ap.add_argument("--cnn-probes", type=int, default=2, help="CNN: SLQ probes (default 2)")
    ap.add_argument("--cnn-hvp-samples", type=int, default=1024, help="CNN: HVP images (default 1024)")
    ap.add_argument("--eps-batches", type=int, default=20)
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.0, 0.005, 0.02])
    ap.add_argument("--refit-epochs", type=int, default=0,
                    help="also measure the limit with the kept weights re-fit for this many epochs (default 0: off)")
    ap.add_argument("--direct-path", action="store_true",
                    help="also evaluate the actual loss on the HVP images along the magnitude path at the path "
                         "model's counts (its limit, forward passes and time next to the path model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch, 32 steps, 1 probe, 1024 HVP images")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "limit"))
    ap.add_argument("--render", action="store_true", help="rebuild the table and plot from <out>.json")
    ap.add_argument("--collect", nargs="+", metavar="JSON", help="one table over these runs' JSON files -> <out>.md")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    out = Path(args.out)
    if args.collect:
        print(collect(args.collect, out))
        return 0
    if args.render:
        res = json.loads(out.with_suffix(".json").read_text())
        print(render(res, out))
        plot([LimitReport(**r) for r in res["reports"]], out)
        return 0
    if args.quick:
        args.epochs, args.steps, args.probes, args.hvp_samples, args.eps_batches = 1, 32, 1, 1024, 10
        args.cnn_steps, args.cnn_probes, args.cnn_hvp_samples = 16, 1, 512
        if args.out == str(ROOT / "benchmarks" / "results" / "limit"):
            out = out.with_name("limit_quick")
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    x, y = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    norm = lambda a: (a.float().div(255) - MEAN).div(STD).unsqueeze(1)  # noqa: E731
    data = (norm(x[:55000]), y[:55000], norm(xte), yte)  # the last 5k training images stay out (unused)
    rows, reps = [], []
    for name in args.models:
        for l1 in ([] if args.no_plain else [0.0]) + ([] if args.no_l1 else
                                                      [args.l1_mlp if name == "mlp" else args.l1_cnn]):
            row, rep = run_one(name, l1, args, data)
            rows.append(row)
            reps.append(rep)
    res = dict(command="OMP_NUM_THREADS=1 .venv/bin/python benchmarks/limit.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               args=vars(args), rows=rows, seconds=time.perf_counter() - t_all,
               reports=[{k: v for k, v in r.to_dict().items() if not k.startswith("measured")}
                        for r in reps])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(render(res, out))
    plot(reps, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
