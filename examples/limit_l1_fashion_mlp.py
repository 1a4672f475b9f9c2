"""How sparse can a Fashion-MNIST MLP go?  The paper's l1-regularised training, then the pruning-limit estimate.

Zhang et al. (NeurIPS 2024) train with an l1 penalty ``lambda * sum |w|`` on the weights before one-shot
magnitude pruning (their "LOMP"): it drives the unneeded weights towards zero, so global magnitude pruning
removes them at little cost and the predicted limit moves up.  This example trains the same MLP with and
without the penalty and prints, for each, the predicted limit and the measured one (global one-shot magnitude
pruning, no fine-tuning, test accuracy within ``--tolerance`` of dense).

    OMP_NUM_THREADS=1 python examples/limit_l1_fashion_mlp.py [--l1 1e-3] [--epochs 2] [--plot out.png]

Measured with the defaults (twelfth session, 2-core AMD EPYC, 1 thread, 25 s): plain 0.8298 dense accuracy,
predicted 0.951, measured 0.44 (accuracy within 0.01) / 0.50 (loss within eps); l1 1e-3: 0.7893 dense, predicted
0.958, measured 0.91 / 0.91 (an earlier machine: 0.7892, 0.957).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from obs_plugins.data import load_fashion_mnist
from obs_plugins.limit import estimate


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum |w| over every Linear/Conv2d weight (biases are not pruned, so not penalised)."""
    return sum(m.weight.abs().sum() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def train(model, x, y, *, epochs: int, l1: float, seed: int = 0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if l1:
                loss = loss + l1 * l1_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--l1", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--plot", help="save the l1 model's report plot here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import math
    if not (math.isfinite(args.l1) and args.l1 > 0):
        ap.error(f"--l1: a positive penalty weight (the plain model is always run beside it), got {args.l1}")
    for name in ("epochs", "hidden", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.tolerance < 1.0:
        ap.error(f"--tolerance: an accuracy drop in [0, 1), got {args.tolerance}")
    torch.set_num_threads(args.threads)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    x, xt = x.float().div(255).reshape(-1, 784), xt.float().div(255).reshape(-1, 784)
    data = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 128 * 20, 128)]   # eps: per-batch loss std
    hvp = [(x[i:i + 512], y[i:i + 512]) for i in range(0, 4096, 512)]      # Hessian averaged over 4096 images
    test = [(xt[i:i + 1000], yt[i:i + 1000]) for i in range(0, 10000, 1000)]
    for l1 in (0.0, args.l1):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
        train(model, x[:55000], y[:55000], epochs=args.epochs, l1=l1)
        rep = estimate(model, data, F.cross_entropy, hvp_data=hvp, steps=96, probes=2, sweep=True,
                       eval_data=test, acc_tolerance=args.tolerance, label=f"l1 = {l1:g}", progress=False)
        print(rep.to_markdown(), "\n")
        if l1 and args.plot:
            rep.plot(args.plot)


if __name__ == "__main__":
    main()
