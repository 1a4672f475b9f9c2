"""Known answers for BiP and pruning-limit behaviours that mutation testing found unpinned: BiP's keep counts
over all units with prior zeros, top-k never re-picking pruned units, channel scores and gradients, the mask
optimizer's lr/momentum, the leftover batch; the limit's G normalisation, boundaries, eval mode, sample-mean
losses, hvp_data, effective (pruned) weights, sweep order and counts, and the tie rule of the magnitude path.
Expected values are hand-computed, never read from the code under test."""
import math
import pytest, torch, torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune
from obs_plugins import BiPTrainer, PruningInputError
from obs_plugins.limit import LimitReport, estimate, gaussian_width_fraction, magnitude_path, path_limit

def lin44(prior_rows=None):
    torch.manual_seed(0)
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1., 17.).reshape(4, 4))   # |w| = 1..16
    return lin

def test_channel_score_gradient_sums_over_the_channel():
    lin = nn.Linear(3, 2, bias=False).double()
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.0, gamma=2.0, granularity="channel", progress=False)
    X = torch.tensor([[1.0, -2.0, 3.0], [3.0, 0.0, -1.0]], dtype=torch.float64)
    _, g = bip.score_gradient(X, batch_loss=lambda m, b: m(b).mean())
    theta = lin.parametrizations.weight.original.detach()
    gz = (X.mean(0) / 2).expand(2, 3)              # d mean(out) / d W_ji = mean_n x_ni / 2
    want = (theta * gz - gz * gz / 2.0).sum(1, keepdim=True)
    assert torch.allclose(g["0.weight"], want, atol=1e-12)

def prior_on_largest(n_pruned=8):
    lin = lin44()
    mask = torch.ones(16); mask[16 - n_pruned:] = 0      # the largest |w| pruned before
    prune.custom_from_mask(lin, "weight", mask.reshape(4, 4))
    return lin

def test_global_keep_count_is_of_all_units():
    lin = prior_on_largest(8)
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.75, progress=False)
    assert int(bip.masks()["0.weight"].sum()) == 16 - 12

def test_uniform_keep_count_is_of_all_units():
    lin = prior_on_largest(8)
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.75, allocation="uniform", progress=False)
    assert int(bip.masks()["0.weight"].sum()) == 16 - 12

def test_top_k_never_picks_prior_pruned_units():
    lin = prior_on_largest(4)
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.5, progress=False)
    m = bip.masks()["0.weight"]
    assert int(m.sum()) == 8 and m.reshape(-1).tolist() == [False] * 4 + [True] * 8 + [False] * 4

def test_fit_trains_the_weights_on_a_leftover_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3))
    bip = BiPTrainer(model, [(model[0], "weight")], sparsity=0.5, progress=False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    bip.fit(batches, F.cross_entropy, lr=0.1)
    assert (bip.lower_steps, bip.upper_steps) == (2, 1)

def channel_with_prior():
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.1, 0.1], [0.5, 0.5, 0.5]]))
    prune.custom_from_mask(lin, "weight", torch.tensor([[0, 1, 1], [1, 1, 1]]))
    return lin

def test_training_masks_keep_prior_zeros_in_channel_mode():
    lin = channel_with_prior()
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.0, granularity="channel", progress=False)
    assert bip.masks()["0.weight"].tolist() == [[False, True, True], [True, True, True]]

def test_channel_scores_are_the_mean_of_unpruned_magnitudes():
    lin = channel_with_prior()
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.5, granularity="channel", progress=False)
    assert torch.allclose(bip.scores["0.weight"].detach().reshape(-1), torch.tensor([0.1, 0.5]))

def test_score_groups_takes_its_mask_lr():
    model = nn.Sequential(nn.Linear(4, 2))
    bip = BiPTrainer(model, ["0"], sparsity=0.5, progress=False)
    assert bip.score_groups(0.5)[0]["lr"] == 0.5 and bip.score_groups()[0]["lr"] == bip.config.mask_lr

def test_fit_uses_mask_momentum():
    lin = nn.Linear(4, 1, bias=False).double()
    torch.manual_seed(0)
    bip = BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.0, gamma=2.0, mask_lr=0.1, progress=False)
    X = torch.tensor([[1.0, -2.0, 3.0, 0.5], [3.0, 0.0, -1.0, 1.5]], dtype=torch.float64)
    c = X.mean(0, keepdim=True)
    theta = lin.parametrizations.weight.original.detach().clone()
    s0 = bip.scores["0.weight"].detach().clone()
    opt = torch.optim.SGD(bip.param_groups(0.0), lr=0.0)           # weights frozen: g_s constant
    bip.fit([X] * 4, batch_loss=lambda m, b: m(b).mean(), optimizer=opt, mask_momentum=0.5)
    g = theta * c - c * c / 2.0
    assert torch.allclose(bip.scores["0.weight"].detach(), s0 - 0.1 * g - 0.1 * 1.5 * g, atol=1e-12)

def test_sparsity_below_the_prior_is_refused():
    lin = prior_on_largest(8)
    with pytest.raises(PruningInputError, match="sparsity"):
        BiPTrainer(nn.Sequential(lin), [(lin, "weight")], sparsity=0.25, progress=False)
    assert not parametrize.is_parametrized(lin)

def test_frozen_weights_refused_before_gating():
    model = nn.Sequential(nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    with pytest.raises(PruningInputError, match="requires? grad"):
        BiPTrainer(model, ["0"], sparsity=0.5, progress=False)
    assert not parametrize.is_parametrized(model[0])

# ------------------------------------------------------------------ limit
def test_G_normalises_by_the_weights():
    G = gaussian_width_fraction(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), 1.0, 0.5)
    assert float(G[0]) == pytest.approx(0.75)

def test_path_limit_plateau_at_epsilon_is_inside():
    inc = {0: 0.0, 1: 0.5, 2: 1.0, 3: 1.0, 4: 2.0}
    assert path_limit(lambda k: inc[k], 4, 1.0, [0, 2, 4]) == 0.75

def _rep(**sw):
    return LimitReport(predicted=0.5, epsilon=0.5, epsilon_source="given", dense_loss=1.0, num_weights=10,
                       weight_norm=1.0, params=[], nodes=[], weights=[], slq={}, curve={}, g_curve={}, sweep=sw)

def test_measured_limits_honour_tolerances_and_boundaries():
    rep = _rep(sparsity=[0.1, 0.2, 0.3], acc_tolerance=0.125, dense_accuracy=0.875, accuracy=[0.875, 0.75, 0.5],
               train_loss=[1.0, 1.5, 1.75])
    assert rep.measured_limit() == 0.2            # 0.75 == 0.875 - 0.125: inside
    assert rep.measured_loss_limit() == 0.2       # 1.5 == dense + eps: inside

def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.5), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    return model, batches

def test_losses_and_accuracy_are_eval_mode():
    model, batches = toy()
    model.train()
    rep = estimate(model, batches, F.cross_entropy, steps=4, probes=1, sweep=True, sparsities=[0.5], progress=False)
    model.eval()
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(x), y)) for x, y in batches]
        acc = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches) / 64
    assert rep.dense_loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert rep.sweep["dense_accuracy"] == acc

def test_dense_eval_loss_is_the_sample_mean():
    model, batches = toy()
    model.eval()
    rep = estimate(model, batches, F.cross_entropy, steps=4, probes=1, sweep=True, sparsities=[0.5], progress=False)
    assert rep.sweep["dense_eval_loss"] == pytest.approx(rep.dense_loss, rel=1e-6)

def test_spectrum_is_of_hvp_data():
    lams = torch.tensor([1.0, 4.0])
    model = nn.Linear(2, 1, bias=False)
    X = torch.diag(lams.sqrt()); y = X @ model.weight.detach().reshape(2, 1)
    sq = lambda o, t: 0.5 * ((o - t) ** 2).sum()
    data = [(X, y), (X, y + 1)]
    hvp = [(3 * X, 3 * y)]                                   # Hessian 9 diag(lams)
    rep = estimate(model, data, sq, hvp_data=hvp, epsilon=0.1, steps=4, probes=1, progress=False)
    assert max(rep.nodes) == pytest.approx(36.0, rel=1e-4)

def test_a_pruned_model_is_measured_as_pruned():
    model, batches = toy()
    model.eval()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    rep = estimate(model, batches, F.cross_entropy, steps=4, probes=1, sweep=True, sparsities=[0.25], progress=False)
    eff = torch.cat([model[0].weight.detach().reshape(-1), model[3].weight.detach().reshape(-1)])
    assert rep.weight_norm == pytest.approx(float(eff.norm()), rel=1e-6)
    assert rep.sweep["train_loss"][0] == pytest.approx(rep.dense_loss, rel=1e-6)   # 27 of 36 zeros already there

def test_sweep_curves_are_in_sparsity_order():
    model, batches = toy()
    rep = estimate(model, batches, F.cross_entropy, steps=4, probes=1, sweep=True, sparsities=[0.8, 0.2], progress=False)
    assert rep.sweep["sparsity"] == [0.2, 0.8]

def test_sweep_prunes_torchs_count():
    model = nn.Linear(5, 1, bias=False)             # D = 5: 75% is round(3.75) = 4 weights
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 1.0, 2.0]]))
    X = torch.eye(5); y = X @ model.weight.detach().reshape(5, 1)
    sq = lambda o, t: 0.5 * ((o - t) ** 2).sum()
    rep = estimate(model, [(X, y)], sq, epsilon=0.1, steps=3, probes=1, sweep=True, sparsities=[0.75], metric="loss",
                   progress=False)
    assert rep.sweep["train_loss"][0] == pytest.approx(0.5 * (0.01 + 0.04 + 0.09 + 1.0), rel=1e-5)

def test_curve_uses_the_rounded_count():
    model = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 0.2, 0.3, 1.0, 2.0]]))
    X = torch.eye(5); y = X @ model.weight.detach().reshape(5, 1)
    sq = lambda o, t: 0.5 * ((o - t) ** 2).sum()
    rep = estimate(model, [(X, y)], sq, epsilon=0.1, steps=3, probes=1, curve_points=9, progress=False)
    # s = 7/8: 4.375 -> 4 weights; s = 5/8: 3.125 -> 3; s = 3/8 -> round(1.875) = 2
    assert rep.curve["R"][3] == pytest.approx(math.sqrt(0.01 + 0.04), rel=1e-6)

def test_magnitude_path_breaks_ties_by_position():
    order, cum = magnitude_path(torch.tensor([1.0, -0.5] * 50))
    assert order.tolist() == list(range(1, 100, 2)) + list(range(0, 100, 2))

def test_channel_scores_of_a_conv1d_follow_its_output_dimension():
    from transformers.pytorch_utils import Conv1D
    layer = Conv1D(4, 3)                      # weight stored (in=3, out=4)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1., 13.).reshape(3, 4))
    bip = BiPTrainer(nn.Sequential(layer), [(layer, "weight")], sparsity=0.5, granularity="channel", progress=False)
    assert tuple(bip.scores["0.weight"].shape) == (1, 4)
    assert torch.allclose(bip.scores["0.weight"].detach(), torch.tensor([[5., 6., 7., 8.]]))


def test_bip_ranks_a_float64_models_scores_in_float64():
    """Scores 1 + (8 - i)e-12 are distinct in float64 and tie in float32 (where position would decide); BiP
    keeps the four largest, as torch's own L1 pruning of the same float64 weights does."""
    from torch.nn.utils import prune

    from obs_plugins import BiP, BiPTrainer
    lin = torch.nn.Linear(1, 8, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0 + (8 - i) * 1e-12] for i in range(8)], dtype=torch.float64))
    model = torch.nn.Sequential(lin)
    bip = BiPTrainer(model, [(lin, "weight")], sparsity=0.5)
    assert bip.masks()["0.weight"].view(-1).int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    bip.finish()
    prune.global_unstructured([(lin, "weight")], pruning_method=BiP, amount=0.5, trainer=bip)
    assert lin.weight_mask.view(-1).int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
