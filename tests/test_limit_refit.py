"""benchmarks/limit.py --refit-epochs: training with masks keeps the pruned weights at zero and re-fits the kept
ones; the re-fit scan stops at the first sparsity where every criterion passes and reports 0.0 for a criterion
that never passes."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tiny import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("limit.py")


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def test_masked_training_keeps_pruned_weights_zero(bench):
    torch.manual_seed(0)
    model = bench.MLP((4,))
    x, y = _data()
    layer = model.layers[0]
    keep = (torch.rand_like(layer.weight) > 0.5).float()
    with torch.no_grad():
        layer.weight.mul_(keep)
    before = layer.weight.detach().clone()
    bench.train(model, x, y, epochs=1, l1=0.0, seed=0, progress=False, bs=16, masks={layer: keep})
    assert int((layer.weight[keep == 0] != 0).sum()) == 0
    assert bool((layer.weight[keep == 1] != before[keep == 1]).all())  # every kept weight was re-fit


@pytest.mark.parametrize("easy", [True, False])
def test_refit_scan_stops_at_first_all_pass(bench, easy):
    torch.manual_seed(0)
    model = bench.MLP((4,))
    x, y = _data()
    args = SimpleNamespace(tolerances=[1.0 if easy else -1.0], refit_epochs=1, seed=0, lr=1e-3, optimizer="adam")
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    rep = SimpleNamespace(sweep={"dense_accuracy": 0.1}, dense_loss=2.3, epsilon=float("inf") if easy else -10.0)
    out = bench.refit_limits(model, args, (x, y, x, y), batches, batches, rep)
    if easy:   # everything passes at the first sparsity tried
        assert [c["sparsity"] for c in out["curve"]] == [0.99]
        assert set(out["limits"].values()) == {0.99}
    else:      # nothing can pass (accuracy >= dense + 1, loss <= dense - 10): the whole grid, limits 0.0
        assert [c["sparsity"] for c in out["curve"]] == [i / 100 for i in range(99, 0, -1)]
        assert set(out["limits"].values()) == {0.0}


def test_direct_path_crosses_at_the_actual_loss(bench):
    """--direct-path: the limit lies between a count whose actual loss (k smallest weights zeroed, on the given
    batches) is within eps of the dense loss and the next count, which is not; the loss is recomputed here by
    hand on a copy, and the model itself is left unchanged."""
    torch.manual_seed(0)
    model = bench.MLP((4,))
    x, y = _data()
    hvp_b = [(x[:32], y[:32]), (x[32:], y[32:])]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    D = sum(m.weight.numel() for m in bench.prunable(model))
    flat = torch.cat([m.weight.detach().reshape(-1) for m in bench.prunable(model)])
    order = torch.sort(flat.abs(), stable=True).indices

    def actual(k):
        w = flat.clone()
        w[order[:k]] = 0
        m2 = bench.MLP((4,))
        m2.load_state_dict(model.state_dict())
        with torch.no_grad():
            i = 0
            for m in bench.prunable(m2):
                n = m.weight.numel()
                m.weight.copy_(w[i:i + n].view_as(m.weight))
                i += n
        return bench.accuracy_and_loss(m2, hvp_b)[1] - bench.accuracy_and_loss(model, hvp_b)[1]

    eps = 0.5 * actual(D // 2)
    assert eps > 0
    grid = [i / 10 for i in range(11)]
    rep = SimpleNamespace(path={"sparsity": grid}, epsilon=eps)
    limit, n_fwd, _ = bench.direct_path(model, rep, hvp_b)
    k = int(limit * D)
    assert actual(k) <= eps < actual(k + 1)
    assert 0 < limit < 0.5 and 1 < n_fwd < D
    assert all(torch.equal(before[k_], v) for k_, v in model.state_dict().items())


def test_first_failure_limits_from_the_stored_sweep(bench):
    """The path-model comparison uses the limits up to the first failure, recomputed from the run's stored report
    (they differ from the largest passing sparsity when a curve dips back under its threshold)."""
    sweep = {"sparsity": [0.1, 0.2, 0.3], "acc_tolerance": 0.0, "dense_accuracy": 0.9,
             "accuracy": [0.9, 0.8, 0.9], "train_loss": [1.0, 1.0, 2.0]}
    report = dict(predicted=0.5, epsilon=0.1, epsilon_source="given", dense_loss=1.0, num_weights=10, weight_norm=1.0,
                  params=[], nodes=[], weights=[], slq={}, curve={}, g_curve={}, sweep=sweep)
    res = {"rows": [{"measured": {"0.0": 0.3}, "measured_loss": 0.2}], "reports": [report]}
    assert bench.first_failure_limits(res, 0, 0.0) == (0.1, 0.2)
    assert bench.first_failure_limits(res, 0, 0.1) == (0.3, 0.2)
