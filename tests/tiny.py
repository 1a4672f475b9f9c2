"""Tiny seeded models and problems shared by several test files (imported as ``tiny``: pytest puts tests/ on
sys.path, and spawned worker processes inherit it)."""
from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """A residual tanh block: ``x + tanh(fc(x))``."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def mse(out, target):
    return ((out - target) ** 2).mean()


def regression_problem(seed=0, n=512):
    """A 16-32-4 ReLU MLP and 8 batches of 64 noisy targets it nearly fits: ``(model, batches)``."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    X = torch.randn(n, 16, generator=g)
    Y = model(X).detach() + 0.1 * torch.randn(n, 4, generator=g)
    return model, [(X[i:i + 64], Y[i:i + 64]) for i in range(0, n, 64)]
