"""benchmarks/structured.py: the GroupHessian baseline averages the squared per-sample gradients of every
calibration sample it is given (Torch-Pruning 1.6.0's own ``accumulate_grad`` keeps only the last one)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tiny import load_bench

tp = pytest.importorskip("torch_pruning")


@pytest.fixture(scope="module")
def bench():
    return load_bench("structured.py")


def test_hessian_baseline_uses_the_mean_over_all_samples(bench):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    imp = bench.builtin_importance("hessian")
    bench.fill_gradients(model, imp, [(x, y)], lambda m, b: F.cross_entropy(m(b[0]), b[1]), hessian_samples=3)
    sq = []
    for i in range(3):   # the brute force: each sample's squared gradient, averaged
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        sq.append(model[0].weight.grad.detach().clone() ** 2)
    mean_sq = torch.stack(sq).mean(0)
    assert not torch.allclose(sq[-1], mean_sq)   # the samples differ, so "last only" would be caught
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = DG.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(6)))
    imp(group)   # upstream's __call__ writes accumulated / count into p.grad, then scores as Taylor
    assert torch.allclose(model[0].weight.grad, mean_sq, rtol=1e-6, atol=1e-12)
