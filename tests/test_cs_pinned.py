"""Known answers for Continuous Sparsification behaviours that mutation testing found unpinned: the penalty at
the current temperature and over unpruned weights only, the rewind (buffers included, default point), fit's
schedule steps, the paper's mask scale, the channel magnitude init, and report-only values (natural sparsity,
score threshold), finish's atomicity. Expected values are hand-computed, never read from the code under test."""
import math, warnings
import pytest, torch, torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune
from obs_plugins import ContinuousSparsifier

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
def pairs(m): return [(x, "weight") for x in m if isinstance(x, (nn.Linear, nn.Conv2d))]
def data(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]

def test_penalty_uses_current_temperature():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), mask_init=1.0, mask_scale="none", penalty=0.5, epochs=3, progress=False)
    cs.step_epoch()
    beta = 200.0 ** 0.5
    n = model[0].weight.numel() + model[2].weight.numel()
    assert float(cs.penalty().detach()) == pytest.approx(0.5 * n * 1 / (1 + math.exp(-beta)), rel=1e-6)

def test_rewind_restores_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    cs = ContinuousSparsifier(model, [(model[0], "weight"), (model[3], "weight")], rounds=1, epochs=2, progress=False)
    cs.fit(data(), F.cross_entropy, lr=0.1)
    assert torch.equal(model[1].running_mean, torch.zeros(12)) and int(model[1].num_batches_tracked) == 0

def test_default_rewind_is_the_initial_weights():
    model = mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cs = ContinuousSparsifier(model, pairs(model), rounds=1, epochs=2, progress=False)
    cs.fit(data(), F.cross_entropy, lr=0.1)
    assert all(torch.equal(w0[n], p.detach()) for n, p in model.named_parameters())

def lin8(prior=None):
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.1, 2.0, -0.05, 0.7, -1.5, 0.2, 0.0]]))
    if prior is not None:
        prune.custom_from_mask(lin, "weight", torch.tensor([prior]))
    return nn.Sequential(lin)

def test_natural_sparsity_counts_prior_pruned_as_removed():
    cs = ContinuousSparsifier(lin8([1, 1, 0, 1, 1, 1, 1, 1]), ["0"], progress=False)
    with torch.no_grad():
        cs.scores["0.weight"].fill_(1.0)
    assert cs.natural_sparsity() == 1 / 8

def test_score_threshold_is_the_largest_pruned_score():
    cs = ContinuousSparsifier(lin8(), ["0"], score_init="magnitude", progress=False)
    cs.finish(rewind=False)
    rep = cs.make_plan(k=3).report
    assert rep["score_threshold"] == pytest.approx(2 / 7 - 0.5, abs=1e-6)   # ranks 0,1,2 pruned

def test_channel_magnitude_init_ranks_by_mean_across_tensors():
    a, b = nn.Linear(2, 1, bias=False), nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        a.weight.fill_(1.0); b.weight.fill_(0.5)      # sums 2 vs 4, means 1 vs 0.5
    cs = ContinuousSparsifier(nn.Sequential(a, b), ["0", "1"], score_init="magnitude", granularity="channel",
                              progress=False)
    assert float(cs.scores["1.weight"].detach()) < float(cs.scores["0.weight"].detach())

def test_channel_magnitude_init_ignores_prior_pruned_weights():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.1, 0.1], [0.5, 0.5, 0.5]]))
    prune.custom_from_mask(lin, "weight", torch.tensor([[0, 1, 1], [1, 1, 1]]))
    cs = ContinuousSparsifier(nn.Sequential(lin), ["0"], score_init="magnitude", granularity="channel", progress=False)
    s = cs.scores["0.weight"].detach().reshape(-1)
    assert float(s[0]) < float(s[1])   # mean of unpruned |w|: 0.1 < 0.5

def test_penalty_skips_prior_pruned_weights():
    cs = ContinuousSparsifier(lin8([1, 1, 0, 1, 1, 1, 1, 1]), ["0"], mask_init=1.0, mask_scale="none", penalty=1.0,
                              progress=False)
    assert float(cs.penalty().detach()) == pytest.approx(7 / (1 + math.exp(-1.0)), rel=1e-6)

def test_channel_penalty_counts_unpruned_weights():
    lin = nn.Linear(3, 2, bias=False)
    prune.custom_from_mask(lin, "weight", torch.tensor([[0, 1, 1], [1, 1, 1]]))
    cs = ContinuousSparsifier(nn.Sequential(lin), ["0"], granularity="channel", penalty=1.0, progress=False)
    assert float(cs.penalty().detach()) == pytest.approx(0.5 * 5)

def test_fit_adds_the_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    cs = ContinuousSparsifier(model, ["0"], rounds=1, epochs=2, penalty=1.0, progress=False)
    batch = [(torch.zeros(4, 2), torch.zeros(4, 1))]          # task loss 0 with zero gradient
    cs.fit(batch, lambda o, y: (o * 0).sum(), lr=0.1, momentum=0.0, finish=False)
    s1 = -0.1 * 0.25                                          # beta 1: d/ds sigmoid(s) at 0 = 1/4
    sig = 1 / (1 + math.exp(-200 * s1))
    s2 = s1 - 0.1 * 200 * sig * (1 - sig)                     # beta 200
    assert torch.allclose(cs.scores["0.weight"].detach(), torch.full((1, 2), s2), atol=1e-6)

def test_fit_counts_optimizer_steps_for_rewinding():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), rounds=1, epochs=2, rewind_step=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cs.fit(data(3), F.cross_entropy, lr=0.1)
    assert cs.global_step == 6

def test_finish_without_rewind_weights_leaves_the_search_running():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), rewind_step=100, progress=False)
    with pytest.raises(RuntimeError, match="rewind"):
        cs.finish(rewind=True)
    assert parametrize.is_parametrized(model[0], "weight") and not cs.finished

def test_paper_scale_with_nonzero_mask_init_starts_dense():
    model = mlp()
    w = model[0].weight.detach().clone()
    cs = ContinuousSparsifier(model, pairs(model), mask_init=0.5, progress=False)
    assert cs.scale_at(1.0) == pytest.approx(1 + math.exp(-0.5))
    assert torch.allclose(model[0].weight, w, atol=1e-6)


def test_cs_ranks_a_float64_models_scores_in_float64():
    """Learned scores 0.5 + (8 - i)·1e-12 are distinct in float64 and tie in float32 (where position would decide):
    the plan keeps the four highest."""
    from torch.nn.utils import prune

    from obs_plugins import ContinuousSparsification, ContinuousSparsifier
    lin = torch.nn.Linear(1, 8, bias=False).double()
    cs = ContinuousSparsifier(torch.nn.Sequential(lin), [(lin, "weight")], rounds=1, epochs=2)
    with torch.no_grad():
        cs.scores["0.weight"].copy_(torch.tensor([[0.5 + (8 - i) * 1e-12] for i in range(8)], dtype=torch.float64))
    cs.finish(rewind=False)
    prune.global_unstructured([(lin, "weight")], pruning_method=ContinuousSparsification, amount=0.5, sparsifier=cs)
    assert lin.weight_mask.view(-1).int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
