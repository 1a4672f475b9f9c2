"""Tiny seeded models and problems shared by several test files (imported as ``tiny``: pytest puts tests/ on
sys.path, and spawned worker processes inherit it)."""
from __future__ import annotations

from pathlib import Path

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


def classifier_problem(d_in: int, hidden: int, classes: int, rows: int):
    """A d_in-hidden-classes ReLU MLP (seed 0), 4 batches of ``rows`` random inputs and labels (seed 1), and its
    layer curvature over both Linear weights with the cross-entropy loss: ``(model, batches, curv)``."""
    import torch.nn.functional as F

    from obs_plugins import Curvature
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(rows, d_in, generator=g), torch.randint(0, classes, (rows,), generator=g))
               for _ in range(4)]
    curv = Curvature.layerwise(model, [(model[0], "weight"), (model[2], "weight")], batches,
                               loss_fn=F.cross_entropy, progress=False)
    return model, batches, curv


def check_bad_weights_refused(bad: str, make, build) -> None:
    """``make()`` builds a fresh ``nn.Sequential`` whose ``[2].weight`` gets a NaN / Inf (``bad``), or the whole
    model on the meta device; ``build(model)`` (a trainer or sparsifier constructor) must refuse it naming the
    tensor and leave the model exactly as it was (no parametrization left behind)."""
    import pytest
    from torch.nn.utils import parametrize
    from obs_plugins import PruningInputError
    if bad == "meta":
        with torch.device("meta"):
            model = make()
    else:
        model = make()
        with torch.no_grad():
            model[2].weight[1, 2] = float(bad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expect = r"^params: 0\.weight is on the meta device" if bad == "meta" else r"^params: 2\.weight holds 1 NaN/Inf"
    with pytest.raises(PruningInputError, match=expect):
        build(model)
    assert not parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[2])
    after = model.state_dict()
    assert after.keys() == before.keys()
    if bad != "meta":
        assert all(torch.equal(after[k].nan_to_num(), before[k].nan_to_num())
                   and torch.equal(after[k].isnan(), before[k].isnan()) for k in before)


BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench(file: str, name: str | None = None):
    """A benchmarks/ script as a module (benchmarks/ is not a package; pytest never collects it)."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(name or Path(file).stem + "_bench", BENCH / file)
    mod = importlib.util.module_from_spec(spec)
    added = str(BENCH) not in sys.path
    if added:   # the scripts import their shared helpers (_common) as top-level modules
        sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(mod)
    finally:
        if added:
            sys.path.remove(str(BENCH))
    return mod
