"""OBS-IHT through torch.nn.utils.prune on a small Fashion-MNIST MLP, next to torch's own L1 pruning.

Trains a 784-300-100-10 MLP for two epochs (under a minute on 2 cores), then prunes 90% of the Linear weights
three ways -- ``prune.l1_unstructured`` on every layer (90% each), ``prune.global_unstructured`` with torch's
``L1Unstructured`` (90% overall, one threshold) and with ``pruning_method=OBSIHT`` (90% overall, OBS-IHT's
global allocation) -- and prints test accuracy, each layer's sparsity, and the Hessian's top eigenvalue and
trace from the same curvature object.  OBS-IHT with T >= 2 also updates the kept weights on the labelled
calibration images (its IHT steps), so part of its lead over L1 is that update, not the choice of weights.

    python examples/prune_fashion_mlp.py [--sparsity 0.9] [--iterations 2]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import OBSIHT, Curvature
from obs_plugins.data import load_fashion_mnist


def loader(split, batch_size, shuffle, n=None, seed=0):
    x, y = load_fashion_mnist(split)
    x = x[:n].float().div(255).reshape(-1, 784) if n else x.float().div(255).reshape(-1, 784)
    y = y[:n] if n else y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    return [(x[idx[i:i + batch_size]], y[idx[i:i + batch_size]]) for i in range(0, len(x), batch_size)]


def accuracy(model, batches):
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / sum(len(y) for _, y in batches)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--iterations", type=int, default=2)
    args = ap.parse_args()
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity: a fraction in [0, 1), got {args.sparsity}")
    if args.iterations < 1:
        ap.error(f"--iterations: must be >= 1, got {args.iterations}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.functional.cross_entropy  # torch's (output, target) convention for (x, y) batches
    for epoch in range(2):
        for x, y in loader("train", 128, True, seed=epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    test = loader("test", 1000, False)
    calib = loader("train", 256, True, n=4096, seed=9)  # 4096 training images for curvature
    print(f"dense test accuracy {accuracy(model, test):.4f}")

    magnitude = copy.deepcopy(model)
    for m in magnitude:
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount=args.sparsity)
    print(f"L1 (torch, every layer) at {args.sparsity:.0%}: {accuracy(magnitude, test):.4f}")
    global_l1 = copy.deepcopy(model)
    prune.global_unstructured([(m, "weight") for m in global_l1 if isinstance(m, nn.Linear)],
                              pruning_method=prune.L1Unstructured, amount=args.sparsity)
    print(f"L1 (torch, global) at {args.sparsity:.0%}: {accuracy(global_l1, test):.4f}  per layer "
          + " / ".join(f"{float((m.weight == 0).float().mean()):.3f}" for m in global_l1 if isinstance(m, nn.Linear)))

    params = [(m, "weight") for m in model if isinstance(m, nn.Linear)]
    curv = Curvature.layerwise(model, params, calib, loss_fn=loss_fn)
    print(f"Hessian of the calibration loss: top eigenvalue {curv.hessian_top_eigenvalue(steps=20):.3f}, "
          f"trace {curv.hessian_trace(probes=16)[0]:.1f}")
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=args.sparsity, curvature=curv,
                              iterations=args.iterations)
    print(f"OBS-IHT (T={args.iterations}, global) at {args.sparsity:.0%}: {accuracy(model, test):.4f}  per layer "
          + " / ".join(f"{float((m.weight == 0).float().mean()):.3f}" for m, _ in params))
    for m, name in params:
        prune.remove(m, name)  # a plain model again, the OBS-updated weights baked in
    zeros = sum(int((m.weight == 0).sum()) for m, _ in params) / sum(m.weight.numel() for m, _ in params)
    print(f"sparsity after prune.remove: {zeros:.4f}")


if __name__ == "__main__":
    main()
