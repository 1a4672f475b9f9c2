"""Torch-Pruning adapter: OBS / CS / BiP channel importances, OBS compensation, HF structured pruning and reload."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

tp = pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")

from conftest import state_equal  # noqa: E402
from obs_plugins import (BiPTrainer, ContinuousSparsifier, Curvature, PruningInputError,  # noqa: E402
                         prunable_linear_targets)
from obs_plugins.integrations.torch_pruning import (BiPImportance, CSImportance, OBSImportance,  # noqa: E402
                                                     load_pruned, prune_transformer, transformer_channel_blocks)
from obs_plugins.methods.obs_iht.structured import greedy_removal, output_sensitivity  # noqa: E402


def all_layers(model, exclude=()):
    return [(t.module, t.name) for t in prunable_linear_targets(model, exclude=exclude)]


def mlp_problem(seed=0, n=256, widths=(6, 12, 3)):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    X = torch.randn(n, widths[0], generator=g)
    Y = model(X).detach() + 0.1 * torch.randn(n, widths[-1], generator=g)
    return model, [(X[i:i + 64], Y[i:i + 64]) for i in range(0, n, 64)], X


def mse_sum(out, target):  # per-sample loss sum_r (y_r - t_r)^2, averaged over the batch
    return ((out - target) ** 2).sum(1).mean()


def groups_of(pruner):
    return list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                         root_module_types=pruner.root_module_types))


def small_cnn(norm=None):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8) if norm is None else norm, nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def distinct_bias_cnn(norm=None):
    """small_cnn with distinct biases (kept_channels matches channels by them)."""
    model = small_cnn(norm)
    with torch.no_grad():
        for k in (0, 3, 7):
            model[k].bias.copy_(torch.arange(model[k].bias.numel()) * 0.01 - 0.05)
    return model


def cnn_gate_sites(model):
    """Gate ids of small_cnn's consumers: conv1's 8 channels at conv2, conv2's 12 at the Linear (36 columns
    each), the Linear's 16 at the output layer."""
    return {model[3]: torch.arange(8), model[7]: 8 + torch.arange(12).repeat_interleave(36),
            model[9]: 20 + torch.arange(16)}


def cnn_batches():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(48, 1, 12, 12, generator=g)
    y = torch.randint(0, 5, (48,), generator=g)
    return [(X[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]


# ------------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("compensate", [True, False])
def test_mlp_channel_saliency_equals_brute_force_quadratic(compensate):
    model, batches, X = mlp_problem()
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, dtype=torch.float64,
                               progress=False)
    imp = OBSImportance(curv, scale=None, compensate=compensate, rel_damp=1e-10, mode="single")
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model[2]])
    (group,) = groups_of(pr)
    scores = imp(group).double()
    with torch.no_grad():
        A = torch.relu(model[0](X)).double()          # (n, 12): the layer input of fc2
        W = model[2].weight.double()                   # (3, 12)
        Y = A @ W.t()
    n = A.shape[0]
    brute = []
    for j in range(12):
        keep = [k for k in range(12) if k != j]
        if compensate:   # the best fc2 without channel j: least squares on the other columns
            coef = torch.linalg.lstsq(A[:, keep], Y).solution
            err = ((Y - A[:, keep] @ coef) ** 2).sum() / n
        else:
            err = ((A[:, j:j + 1] @ W[:, j:j + 1].t()) ** 2).sum() / n
        brute.append(float(err))
    assert scores.shape == (12,)
    torch.testing.assert_close(scores, torch.tensor(brute, dtype=torch.float64), rtol=1e-5, atol=1e-9)


def test_greedy_scores_are_joint_least_squares_losses_along_the_removal_order():
    model, batches, X = mlp_problem()
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, dtype=torch.float64,
                               progress=False)
    with torch.no_grad():
        A = torch.relu(model[0](X)).double()
        Y = A @ model[2].weight.double().t()
    W, H = model[2].weight.detach(), curv.hessians["2.weight"]
    order, inc = greedy_removal([(W, H, [[j] for j in range(12)], None)], 12, rel_damp=1e-10)
    assert sorted(order) == list(range(12))
    for t in range(1, 12):   # removing the first t channels together: least squares on the rest
        keep = [k for k in range(12) if k not in order[:t]]
        coef = torch.linalg.lstsq(A[:, keep], Y).solution
        brute = float(((Y - A[:, keep] @ coef) ** 2).sum() / A.shape[0])
        assert float(inc[:t].sum()) == pytest.approx(brute, rel=1e-5, abs=1e-9)
        # and each step took the cheapest next channel
        others = [k for k in keep]
        costs = []
        for j in others:
            kk = [k for k in keep if k != j]
            c = torch.linalg.lstsq(A[:, kk], Y).solution
            costs.append(float(((Y - A[:, kk] @ c) ** 2).sum() / A.shape[0]))
        if t < 11:
            assert others[int(torch.tensor(costs).argmin())] == order[t]
    # the importance's score is the running maximum of the increments along that order
    imp = OBSImportance(curv, scale=None, rel_damp=1e-10)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model[2]])
    s = imp(groups_of(pr)[0]).double()
    run = torch.cummax(inc, 0).values
    torch.testing.assert_close(s[order], run, rtol=1e-5, atol=1e-12)
    assert bool((s[order].diff() > 0).all())   # strictly increasing: a threshold never cuts through a tie


def test_output_sensitivity_is_the_per_sample_output_fisher():
    model, batches, X = mlp_problem()
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, progress=False)
    s = output_sensitivity(curv)
    Y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        out = model(X)
    expected = (2 * (out - Y)).pow(2).mean(0)          # d l_i / d y_r = 2 (y_r - t_r)
    torch.testing.assert_close(s["2.weight"], expected, rtol=1e-4, atol=1e-7)
    assert s["0.weight"].shape == (12,) and bool((s["0.weight"] >= 0).all())


def test_step_applies_the_least_squares_update_of_the_consumer():
    model, batches, X = mlp_problem()
    ref = copy.deepcopy(model)
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, dtype=torch.float64,
                               progress=False)
    imp = OBSImportance(curv, rel_damp=1e-10)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model[2]])
    rec = imp.step(pr)
    assert rec["root_channels_removed"] == 6 and model[0].out_features == 6 and model[2].in_features == 6
    # which hidden channels survived: match the kept fc1 rows to the original ones
    kept = [int((ref[0].weight - r).abs().sum(1).argmin()) for r in model[0].weight]
    torch.testing.assert_close(model[0].weight, ref[0].weight[kept])
    with torch.no_grad():
        A = torch.relu(ref[0](X)).double()
        Y = A @ ref[2].weight.double().t()
    coef = torch.linalg.lstsq(A[:, kept], Y).solution           # (6, 3)
    torch.testing.assert_close(model[2].weight.double(), coef.t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[2].bias, ref[2].bias)


class _Concat(nn.Module):
    """Two producers concatenated into one consumer: two dependency groups remove columns of ``c``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))))


@pytest.mark.parametrize("global_pruning", [False, True])
def test_step_updates_a_consumer_of_two_groups_jointly(global_pruning):
    """Both groups' columns of ``c`` go in one least-squares update (it crashed after pruning the first group,
    the second's operator still 8 columns wide, and left the model half pruned)."""
    torch.manual_seed(0)
    model = _Concat().eval()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 5, generator=g)
    batches = [(X[i:i + 64], torch.randint(0, 3, (64,), generator=g)) for i in range(0, 256, 64)]
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, dtype=torch.float64,
                               progress=False)
    imp = OBSImportance(curv, rel_damp=1e-10)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, global_pruning=global_pruning,
                              ignored_layers=[model.c, model.fc])
    rec = imp.step(pr)
    assert rec["root_channels_removed"] == 4 and model.c.in_features == 4
    kept = [int((ref.a.weight - r).abs().sum(1).argmin()) for r in model.a.weight] + \
           [4 + int((ref.b.weight - r).abs().sum(1).argmin()) for r in model.b.weight]
    with torch.no_grad():
        A = torch.cat([torch.relu(ref.a(X)), torch.relu(ref.b(X))], 1).double()
        Y = A @ ref.c.weight.double().t()
    coef = torch.linalg.lstsq(A[:, kept], Y).solution
    torch.testing.assert_close(model.c.weight.double(), coef.t(), rtol=1e-4, atol=1e-5)
    assert model(X).shape == (256, 3)


@pytest.mark.parametrize("update", [False, True])
def test_removal_error_ranking_removes_the_smallest_errors_and_can_still_update(update):
    """OBSImportance(compensate=False): the channels with the smallest 1/2 sum_r w_rj^2 H_jj go (hand-computed from
    the float64 activations); ``step(update=True)`` then still gives the consumer the least-squares update."""
    model, batches, X = mlp_problem()
    ref = copy.deepcopy(model)
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, dtype=torch.float64,
                               progress=False)
    imp = OBSImportance(curv, scale=None, compensate=False, rel_damp=1e-10)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model[2]])
    with torch.no_grad():
        A = torch.relu(ref[0](X)).double()
        Y = A @ ref[2].weight.double().t()
    H = 2 * A.t() @ A / len(X)
    err = 0.5 * (ref[2].weight.double() ** 2).sum(0) * torch.diagonal(H)
    expect_kept = sorted(torch.argsort(err)[6:].tolist())
    imp.step(pr, update=update)
    kept = sorted(int((ref[0].weight - r).abs().sum(1).argmin()) for r in model[0].weight)
    assert kept == expect_kept
    order = [int((ref[0].weight - r).abs().sum(1).argmin()) for r in model[0].weight]
    if update:
        coef = torch.linalg.lstsq(A[:, order], Y).solution
        torch.testing.assert_close(model[2].weight.double(), coef.t(), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(model[2].weight, ref[2].weight[:, order])


def test_greedy_removal_error_ranking_keeps_the_brute_force_greedy_complement():
    """OBSImportance(compensate=False, mode="greedy"): channels go in the order that raises the joint removal error
    1/2 sum_r w_rS H_SS w_rS^T least at each step (brute force over the float64 activations); the defaults stay
    greedy with the update and single without it."""
    model, batches, X = mlp_problem()
    with torch.no_grad():   # hidden channel 1 repeats channel 0, with the same small outgoing weights: each is
        model[0].weight[1] = model[0].weight[0]     # cheap alone, the pair costs 4x one of them
        model[0].bias[1] = model[0].bias[0]
        model[2].weight[:, 0] *= 1.2
        model[2].weight[:, 1] = model[2].weight[:, 0]
    ref = copy.deepcopy(model)
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, dtype=torch.float64,
                               progress=False)
    assert OBSImportance(curv, scale=None).mode == "greedy"
    assert OBSImportance(curv, scale=None, compensate=False).mode == "single"
    with pytest.raises(PruningInputError, match="mode"):
        OBSImportance(curv, scale=None, mode="joint")
    imp = OBSImportance(curv, scale=None, compensate=False, mode="greedy")
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model[2]])
    with torch.no_grad():
        A = torch.relu(ref[0](X)).double()
    H, W = 2 * A.t() @ A / len(X), ref[2].weight.double()

    def joint(S):
        return float(0.5 * ((W[:, S] @ H[S][:, S]) * W[:, S]).sum()) if S else 0.0

    removed = []
    for _ in range(6):
        rest = [j for j in range(12) if j not in removed]
        removed.append(min(rest, key=lambda j: joint(removed + [j])))
    imp.step(pr)
    kept = sorted(int((ref[0].weight - r).abs().sum(1).argmin()) for r in model[0].weight)  # a copy reads as 0
    assert kept == sorted(0 if j == 1 else j for j in set(range(12)) - set(removed))
    err = 0.5 * (W ** 2).sum(0) * torch.diagonal(H)     # the single ranking removes both copies
    assert {0, 1} <= set(torch.argsort(err)[:6].tolist()) and not {0, 1} <= set(removed)


def test_global_pruning_removes_the_implied_count_and_loss_scale_is_rescaling_invariant():
    # 8-16-16-3 ReLU MLP; a copy with fc2 scaled by 1e-3 and fc3 by 1e3 computes the same function
    model, batches, X = mlp_problem(widths=(8, 16, 16, 3))
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled[2].weight.mul_(1e-3); scaled[2].bias.mul_(1e-3); scaled[4].weight.mul_(1e3)
    torch.testing.assert_close(scaled(X), model(X), rtol=1e-4, atol=1e-5)

    def importance(m, scale):
        curv = Curvature.layerwise(m, all_layers(m), batches, loss_fn=mse_sum, progress=False)
        return OBSImportance(curv, scale=scale)

    def pruner(m, imp):
        return tp.pruner.MetaPruner(m, X[:2], importance=imp, pruning_ratio=0.5, global_pruning=True,
                                    ignored_layers=[m[4]])

    # loss-scaled scores do not see the rescaling
    a, b = importance(model, "loss"), importance(scaled, "loss")
    sa = [a(g) for g in groups_of(pruner(model, a))]
    sb = [b(g) for g in groups_of(pruner(scaled, b))]
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, rtol=2e-3, atol=0.0)
    # bare layer errors rank all of hidden layer 1 lowest: Torch-Pruning would skip that group silently, so
    # step() refuses before changing anything
    before = copy.deepcopy(scaled.state_dict())
    bare = importance(scaled, None)
    with pytest.raises(PruningInputError, match="pruning_ratio implies 16"):
        bare.step(pruner(scaled, bare))
    assert state_equal(scaled.state_dict(), before)
    # with the loss scale the count is exactly the ratio's: 32 channels -> 16
    imp = importance(scaled, "loss")
    assert imp.step(pruner(scaled, imp))["root_channels_removed"] == 16
    assert scaled[0].out_features + scaled[2].out_features == 16
    assert scaled(X).shape == (X.shape[0], 3)


# ------------------------------------------------------------------------------------------- CNN
def test_cnn_obs_scores_finite_right_length_and_pruned_forward():
    model = small_cnn()
    batches = cnn_batches()
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
    imp = OBSImportance(curv)
    ex = batches[0][0][:2]
    pr = tp.pruner.MetaPruner(model, ex, importance=imp, pruning_ratio=0.5, global_pruning=True,
                              ignored_layers=[model[9]])
    lengths = []
    for g in groups_of(pr):
        s = imp(g)
        assert s.shape == (len(g[0].idxs),) and bool(torch.isfinite(s).all()) and bool((s >= 0).all())
        lengths.append(len(s))
    assert sorted(lengths) == [8, 12, 16]
    imp.step(pr)
    assert model[0].out_channels + model[3].out_channels + model[7].out_features == 18  # 36 -> 18
    assert model[7].in_features == model[3].out_channels * 36
    out = model(batches[0][0])
    assert out.shape == (16, 5) and bool(torch.isfinite(out).all())


def test_cnn_obs_compensation_lowers_the_loss_against_plain_removal():
    batches = cnn_batches()
    losses = {}
    for comp in (False, True):
        model = small_cnn()
        curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
        imp = OBSImportance(curv, compensate=comp)
        pr = tp.pruner.MetaPruner(model, batches[0][0][:2], importance=imp, pruning_ratio=0.3,
                                  ignored_layers=[model[9]])
        imp.step(pr)
        with torch.no_grad():
            ref = small_cnn()
            losses[comp] = sum(float(F.mse_loss(model(x), ref(x))) for x, _ in batches)
    assert losses[True] < losses[False]


def test_cs_importance_is_the_learned_channel_score_of_the_producers():
    model = small_cnn()
    cs = ContinuousSparsifier(model, [(model[0], "weight"), (model[3], "weight"), (model[7], "weight")],
                              granularity="channel")
    with torch.no_grad():
        for k, s in cs.scores.items():
            s.copy_(torch.randn(s.shape))
    cs.finish(rewind=False)
    imp = CSImportance(cs)
    pr = tp.pruner.MetaPruner(model, cnn_batches()[0][0][:2], importance=imp, pruning_ratio=0.5,
                              ignored_layers=[model[9]])
    by_root = {}
    for g in groups_of(pr):
        s = imp(g)
        assert s.shape == (len(g[0].idxs),) and bool(torch.isfinite(s).all())
        by_root[g[0].dep.target.module] = s
    torch.testing.assert_close(by_root[model[0]], cs.scores["0.weight"].reshape(-1))
    torch.testing.assert_close(by_root[model[3]], cs.scores["3.weight"].reshape(-1))
    pr.step()
    assert model[0].out_channels == 4 and model(cnn_batches()[0][0]).shape == (16, 5)


def distinct_scores(search, seed):
    """Overwrite a search's channel scores with distinct values (a permutation over all its channels)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(s.numel() for s in search.scores.values())
    vals = torch.randperm(total, generator=g).float() / total - 0.5
    with torch.no_grad():
        for s in search.scores.values():
            s.copy_(vals[:s.numel()].reshape(s.shape))
            vals = vals[s.numel():]


def kept_channels(pruned, original):
    """Which output channels of ``original`` survived in ``pruned`` (matched by their distinct bias values)."""
    return sorted(int((original.bias - b).abs().argmin()) for b in pruned.bias)


def cnn_channel_bip(model, **kw):
    return BiPTrainer(model, [(model[0], "weight"), (model[3], "weight"), (model[7], "weight")], sparsity=0.5,
                      granularity="channel", progress=False, **kw)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_bip_importance_is_the_learned_channel_score_and_the_lowest_scored_go(global_pruning):
    model = small_cnn()
    ref = copy.deepcopy(model)
    bip = cnn_channel_bip(model)
    distinct_scores(bip, seed=2)
    bip.finish()
    imp = BiPImportance(bip)
    pr = tp.pruner.MetaPruner(model, cnn_batches()[0][0][:2], importance=imp, pruning_ratio=0.5,
                              global_pruning=global_pruning, ignored_layers=[model[9]])
    by_root = {g[0].dep.target.module: imp(g) for g in groups_of(pr)}
    assert len(by_root) == 3
    scores = {i: bip.scores[f"{i}.weight"].detach().reshape(-1) for i in (0, 3, 7)}
    for i in (0, 3, 7):
        assert torch.equal(by_root[model[i]], scores[i])
    # what Torch-Pruning must keep: the top half of every layer, or the top 18 of all 36 channels
    if global_pruning:
        cut = torch.cat(list(scores.values())).sort().values[17]
        expected = {i: [c for c in range(len(s)) if s[c] > cut] for i, s in scores.items()}
        assert all(expected.values()) and sum(map(len, expected.values())) == 18   # no layer emptied
    else:
        expected = {i: sorted(s.argsort(descending=True)[:len(s) // 2].tolist()) for i, s in scores.items()}
    pr.step()
    for i in (0, 3, 7):
        assert kept_channels(model[i], ref[i]) == expected[i]
    out = model(cnn_batches()[0][0])
    assert out.shape == (16, 5) and bool(torch.isfinite(out).all())


class TwoBranch(nn.Module):
    """relu(a(x) + b(x)) -> c: the hidden channels have two producers, a and b."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.c(torch.relu(self.a(x) + self.b(x)))


@pytest.mark.parametrize("method", ["cs", "bip"])
def test_learned_channel_importance_is_the_mean_over_the_producers(method):
    model = TwoBranch()
    ref = copy.deepcopy(model)
    params = [(model.a, "weight"), (model.b, "weight")]
    if method == "cs":
        search = ContinuousSparsifier(model, params, granularity="channel", progress=False)
        distinct_scores(search, seed=4)
        imp = CSImportance(search.finish(rewind=False))
    else:
        search = BiPTrainer(model, params, sparsity=0.5, granularity="channel", progress=False)
        distinct_scores(search, seed=4)
        search.finish()
        imp = BiPImportance(search)
    pr = tp.pruner.MetaPruner(model, torch.randn(2, 6), importance=imp, pruning_ratio=0.5,
                              ignored_layers=[model.c])
    (group,) = groups_of(pr)
    mean = (search.scores["a.weight"].detach().reshape(-1) + search.scores["b.weight"].detach().reshape(-1)) / 2
    torch.testing.assert_close(imp(group), mean)
    pr.step()
    top = sorted(mean.argsort(descending=True)[:5].tolist())
    assert kept_channels(model.a, ref.a) == top and kept_channels(model.b, ref.b) == top
    assert model(torch.randn(4, 6)).shape == (4, 3)


def test_cnn_bip_search_scores_finite_right_length_and_pruned_forward():
    model = small_cnn()
    batches = cnn_batches()
    # per-layer allocation: a global top-k of the initial mean |w| would switch off all of fc1 (the widest fan-in,
    # the smallest weights), after which no gradient reaches any score
    bip = cnn_channel_bip(model, mask_lr=0.1, gamma=3.0, allocation="uniform")
    start = {k: s.detach().clone() for k, s in bip.scores.items()}
    bip.fit(batches, F.cross_entropy, lr=0.01, epochs=1)          # 1 weight step, 1 score step, 1 weight step
    assert bip.upper_steps == 1 and bip.finished
    assert all(not torch.equal(start[k], s.detach()) for k, s in bip.scores.items())   # the search moved them
    model.eval()
    imp = BiPImportance(bip)
    pr = tp.pruner.MetaPruner(model, batches[0][0][:2], importance=imp, pruning_ratio=0.5,
                              ignored_layers=[model[9]])
    lengths = []
    for g in groups_of(pr):
        s = imp(g)
        assert s.shape == (len(g[0].idxs),) and bool(torch.isfinite(s).all())
        torch.testing.assert_close(s, bip.scores[bip.targets[[t.module for t in bip.targets].index(
            g[0].dep.target.module)].key].detach().reshape(-1))
        lengths.append(len(s))
    assert sorted(lengths) == [8, 12, 16]
    pr.step()
    assert (model[0].out_channels, model[3].out_channels, model[7].out_features) == (4, 6, 8)
    out = model(batches[0][0])
    assert out.shape == (16, 5) and bool(torch.isfinite(out).all())


def test_bip_importance_bad_inputs_are_named():
    model = small_cnn()
    ex = cnn_batches()[0][0][:2]
    cs = ContinuousSparsifier(model, [(model[0], "weight")], granularity="channel", progress=False)
    with pytest.raises(PruningInputError, match="trainer: expected a BiPTrainer, got ContinuousSparsifier"):
        BiPImportance(cs)
    cs.finish(rewind=False)
    weights = BiPTrainer(model, [(model[0], "weight")], sparsity=0.5, progress=False)
    weights.finish()
    with pytest.raises(PruningInputError, match="trainer: BiPImportance needs granularity='channel'"):
        BiPImportance(weights)
    running = cnn_channel_bip(model)
    with pytest.raises(PruningInputError, match=r"trainer: the search is still running.*bip\.finish\(\)"):
        BiPImportance(running)
    running.finish()
    # the layer pruned after the search: its scores no longer match its channels
    pruned = copy.deepcopy(model)
    bip = cnn_channel_bip(pruned)
    bip.finish()
    tp.pruner.MetaPruner(pruned, ex, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                         ignored_layers=[pruned[9]]).step()
    imp = BiPImportance(bip)
    pr = tp.pruner.MetaPruner(pruned, ex, importance=imp, pruning_ratio=0.5, ignored_layers=[pruned[9]])
    with pytest.raises(PruningInputError, match="trainer: 0.weight has 4 output channels but 8 scores"):
        imp(next(g for g in groups_of(pr) if g[0].dep.target.module is pruned[0]))
    # no producer of the group among the trainer's layers
    only_fc1 = BiPTrainer(model, [(model[7], "weight")], sparsity=0.5, granularity="channel", progress=False)
    only_fc1.finish()
    imp = BiPImportance(only_fc1)
    pr = tp.pruner.MetaPruner(model, ex, importance=imp, pruning_ratio=0.5, ignored_layers=[model[9]])
    with pytest.raises(PruningInputError, match="trainer: no layer producing the channels"):
        imp(next(g for g in groups_of(pr) if g[0].dep.target.module is model[0]))
    # a gate put back on a producer after the importance was made
    assert bool(torch.isfinite(imp(next(g for g in groups_of(pr) if g[0].dep.target.module is model[7]))).all())
    again = BiPTrainer(model, [(model[7], "weight")], sparsity=0.5, granularity="channel", progress=False)
    with pytest.raises(PruningInputError, match="trainer: 7.weight still carries a search gate"):
        imp(next(g for g in groups_of(pr) if g[0].dep.target.module is model[7]))
    again.finish()


def test_bad_inputs_are_named():
    model, batches, X = mlp_problem()
    curv = Curvature.layerwise(model, all_layers(model), batches, progress=False)   # no loss_fn
    with pytest.raises(PruningInputError, match="loss"):
        OBSImportance(curv)
    with pytest.raises(PruningInputError, match="rel_damp"):
        OBSImportance(curv, scale=None, rel_damp=-1.0)
    with pytest.raises(PruningInputError, match="scale"):
        OBSImportance(curv, scale="gradient")
    only_fc1 = Curvature.layerwise(model, [(model[0], "weight")], batches, progress=False)
    imp = OBSImportance(only_fc1, scale=None)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, ignored_layers=[model[2]])
    with pytest.raises(PruningInputError, match="consuming"):
        imp(groups_of(pr)[0])
    cs = ContinuousSparsifier(model, [(model[0], "weight")])
    with pytest.raises(PruningInputError, match="granularity"):
        CSImportance(cs)
    cs.finish(rewind=False)
    running = ContinuousSparsifier(model, [(model[0], "weight")], granularity="channel")
    with pytest.raises(PruningInputError, match=r"sparsifier: the search is still running.*cs\.finish\(\)"):
        CSImportance(running)


# ------------------------------------------------------------------------------------------- Hugging Face
def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def token_batches(padded=True):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 60, (8, 12), generator=g)
    am = torch.ones_like(ids)
    if padded:
        am[:3, 8:] = 0
    return ids, am, [{"input_ids": ids[i:i + 4], "attention_mask": am[i:i + 4]} for i in (0, 4)]


def bert_loss(out, batch):
    return out.last_hidden_state.pow(2).mean()


def test_bert_scores_finite_right_length_obs_and_cs():
    model = tiny_bert()
    ids, am, batches = token_batches()
    curv = Curvature.layerwise(model, all_layers(model, exclude=("pooler",)), batches, loss_fn=bert_loss,
                               progress=False)
    heads = {lin: 4 for layer in model.encoder.layer
             for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)}
    ign = [model.embeddings, model.pooler] + [x for layer in model.encoder.layer
                                              for x in (layer.attention.output.dense, layer.output.dense)]
    ex = {"input_ids": ids[:2], "attention_mask": am[:2]}
    obs = OBSImportance(curv, channel_blocks=transformer_channel_blocks(model))
    pr = tp.pruner.MetaPruner(model, ex, importance=obs, pruning_ratio=0.5, ignored_layers=ign, num_heads=heads,
                              prune_num_heads=True, prune_head_dims=False,
                              output_transform=lambda o: o.last_hidden_state.sum())
    groups = [pr._downstream_node_as_root_if_attention(g) or g for g in groups_of(pr)]
    sizes = sorted(len(g[0].idxs) for g in groups)
    assert sizes == [32, 32, 64, 64]   # two attention groups (4 heads x 8), two FFN groups
    for g in groups:
        s = obs(g)
        assert s.shape == (len(g[0].idxs),) and bool(torch.isfinite(s).all())
        if len(s) == 32:               # heads: one joint score per head, shared by its 8 channels
            assert bool((s.view(4, 8) == s.view(4, 8)[:, :1]).all())
    cs = ContinuousSparsifier(model, [(layer.intermediate.dense, "weight") for layer in model.encoder.layer],
                              granularity="channel")
    with torch.no_grad():
        for s in cs.scores.values():
            s.copy_(torch.randn(s.shape))
    cs.finish(rewind=False)
    csi = CSImportance(cs)
    for g in groups:
        if len(g[0].idxs) == 64:
            s = csi(g)
            key = [k for k in cs.scores if cs.targets[[t.key for t in cs.targets].index(k)].module
                   is g[0].dep.target.module][0]
            torch.testing.assert_close(s, cs.scores[key].reshape(-1))


def test_bert_bip_scores_finite_right_length_and_pruned_forward():
    model = tiny_bert()
    ids, am, batches = token_batches()
    layers = model.encoder.layer
    qkv = [(la.attention.self.query, la.attention.self.key, la.attention.self.value) for la in layers]
    params = [(m, "weight") for trio in qkv for m in trio] + [(la.intermediate.dense, "weight") for la in layers]
    bip = BiPTrainer(model, params, sparsity=0.5, granularity="channel", allocation="uniform", mask_lr=0.1,
                     gamma=3.0, progress=False)
    start = {k: s.detach().clone() for k, s in bip.scores.items()}
    bip.fit(batches, batch_loss=lambda m, b: bert_loss(m(**b), b), lr=0.01, epochs=1)   # 1 weight + 1 score step
    assert bip.upper_steps == 1
    assert any(not torch.equal(start[k], s.detach()) for k, s in bip.scores.items())
    model.eval()
    imp = BiPImportance(bip)
    key = {id(t.module): t.key for t in bip.targets}
    score = lambda m: bip.scores[key[id(m)]].detach().reshape(-1)  # noqa: E731
    heads = {lin: 4 for trio in qkv for lin in trio}
    ign = [model.embeddings, model.pooler] + [x for la in layers for x in (la.attention.output.dense, la.output.dense)]
    ex = {"input_ids": ids[:2], "attention_mask": am[:2]}
    pr = tp.pruner.MetaPruner(model, ex, importance=imp, pruning_ratio=0.5, ignored_layers=ign, num_heads=heads,
                              prune_num_heads=True, prune_head_dims=False,
                              output_transform=lambda o: o.last_hidden_state.sum())
    groups = [pr._downstream_node_as_root_if_attention(g) or g for g in groups_of(pr)]
    assert sorted(len(g[0].idxs) for g in groups) == [32, 32, 64, 64]
    for g in groups:
        s = imp(g)
        assert s.shape == (len(g[0].idxs),) and bool(torch.isfinite(s).all())
        mods = {id(it.dep.target.module) for it in g}
        if len(s) == 32:   # a head group: three producers, query/key/value, averaged
            (trio,) = [t for t in qkv if id(t[0]) in mods]
            torch.testing.assert_close(s, sum(score(m) for m in trio) / 3)
        else:
            (la,) = [la for la in layers if id(la.intermediate.dense) in mods]
            torch.testing.assert_close(s, score(la.intermediate.dense))
    prune_transformer(model, ex, BiPImportance(bip), 0.5)
    for la in layers:
        assert la.attention.self.num_attention_heads == 2 and la.intermediate.dense.out_features == 32
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert out.shape == (8, 12, 32) and bool(torch.isfinite(out).all())


def test_bert_prune_heads_and_ffn_forward_and_exact_reload(tmp_path):
    model = tiny_bert()
    ids, am, batches = token_batches()
    model.config._attn_implementation = "eager"
    curv = Curvature.layerwise(model, all_layers(model, exclude=("pooler",)), batches, loss_fn=bert_loss,
                               progress=False)
    imp = OBSImportance(curv, channel_blocks=transformer_channel_blocks(model))
    info = prune_transformer(model, {"input_ids": ids[:2], "attention_mask": am[:2]}, imp, 0.5)
    for layer in model.encoder.layer:
        sa = layer.attention.self
        assert sa.num_attention_heads == 2 and sa.query.out_features == 16 and sa.key.out_features == 16
        assert layer.attention.output.dense.in_features == 16 and layer.intermediate.dense.out_features == 32
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 32
    assert model.config._attn_implementation == "eager"            # the config object was updated in place
    assert info["original"] == {"num_attention_heads": 4, "intermediate_size": 64}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert out.shape == (8, 12, 32) and bool(torch.isfinite(out).all())
    model.save_pretrained(tmp_path)
    back = load_pruned(tmp_path)
    assert back.config._attn_implementation == model.config._attn_implementation
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=am).last_hidden_state
    assert torch.equal(out, again)
    assert state_equal(model.state_dict(), back.state_dict())


def test_llama_ffn_prune_and_exact_reload_uniform_and_global(tmp_path):
    from obs_plugins.lm import causal_lm_loss
    ids, _, _ = token_batches(padded=False)
    batches = [{"input_ids": ids[i:i + 4]} for i in (0, 4)]
    for global_pruning in (False, True):
        model = tiny_llama()
        curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=causal_lm_loss, progress=False)
        imp = OBSImportance(curv)
        prune_transformer(model, {"input_ids": ids[:2]}, imp, 0.5, global_pruning=global_pruning)
        widths = [layer.mlp.gate_proj.out_features for layer in model.model.layers]
        assert sum(widths) == 64 and all(layer.mlp.up_proj.out_features == w and layer.mlp.down_proj.in_features == w
                                         for layer, w in zip(model.model.layers, widths))
        assert model.model.layers[0].self_attn.q_proj.out_features == 32      # attention kept
        with torch.no_grad():
            out = model(input_ids=ids).logits
        d = tmp_path / f"g{int(global_pruning)}"
        model.save_pretrained(d)
        with torch.no_grad():
            assert torch.equal(load_pruned(d)(input_ids=ids).logits, out)
        if not global_pruning:   # uniform widths: the plain config is enough for from_pretrained too
            assert model.config.intermediate_size == 32
            plain = transformers.AutoModelForCausalLM.from_pretrained(d)
            with torch.no_grad():
                assert torch.equal(plain(input_ids=ids).logits, out)


def test_load_pruned_refuses_an_unpruned_checkpoint(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    with pytest.raises(PruningInputError, match="obs_pruned"):
        load_pruned(tmp_path)


def test_greedy_fast_path_for_single_columns_equals_the_general_path(monkeypatch):
    import obs_plugins.methods.obs_iht.structured as S
    g = torch.Generator().manual_seed(0)
    X1, X2 = torch.randn(300, 20, generator=g, dtype=torch.float64), torch.randn(300, 16, generator=g,
                                                                                 dtype=torch.float64)
    layers = [(torch.randn(5, 20, generator=g, dtype=torch.float64), 2 * X1.T @ X1 / 300,
               [[j] for j in range(12)], torch.rand(5, generator=g)),
              (torch.randn(4, 16, generator=g, dtype=torch.float64), 2 * X2.T @ X2 / 300,
               [[j + 4] for j in range(12)], None)]
    fast = S.greedy_removal(layers, 12)
    monkeypatch.setattr(S, "_greedy_single_columns", lambda *a: None)   # would return None if it were used
    monkeypatch.setitem(S.__dict__, "all", lambda it: False)            # force the general block path
    general = S.greedy_removal(layers, 12)
    assert fast[0] == general[0]
    torch.testing.assert_close(fast[1], general[1], rtol=1e-6, atol=1e-10)


def test_greedy_removal_without_update_follows_the_brute_force_joint_removal_error():
    # each step adds the unit whose removal (no update) raises sum_layers 1/2 sum_r s_r w_rS H_SS w_rS^T the least,
    # cross terms included: the order and increments equal a brute force over every remaining unit
    import obs_plugins.methods.obs_iht.structured as S
    g = torch.Generator().manual_seed(3)
    X1, X2 = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(200, 18, generator=g,
                                                                                 dtype=torch.float64)
    X1[:, 1] = X1[:, 0] + 0.05 * X1[:, 1]    # correlated inputs: the cross terms matter
    s1 = torch.rand(5, generator=g, dtype=torch.float64)
    layers = [(torch.randn(5, 12, generator=g, dtype=torch.float64), 2 * X1.T @ X1 / 200,
               [[2 * u, 2 * u + 1] for u in range(6)], s1),        # two columns per unit (kh*kw, heads)
              (torch.randn(3, 18, generator=g, dtype=torch.float64), 2 * X2.T @ X2 / 200,
               [[u] for u in range(5)] + [[]], None)]              # unit 5 does not feed this layer

    def loss(removed):
        tot = 0.0
        for W, H, sets, s in layers:
            P = [c for u in removed for c in sets[u]]
            if P:
                wp = W[:, P]
                tot += float(0.5 * (((wp @ H[P][:, P]) * wp).sum(1) * (1 if s is None else s)).sum())
        return tot

    order, inc = S.greedy_removal(layers, 6, compensate=False)
    done = []
    for u, d in zip(order, inc):
        cand = {v: loss(done + [v]) - loss(done) for v in range(6) if v not in done}
        assert u == min(cand, key=cand.get)
        assert abs(float(d) - cand[u]) < 1e-10 * max(1.0, abs(cand[u]))
        done.append(u)
    single = S.column_saliency(layers[0][0], layers[0][1], [torch.tensor(c) for c in layers[0][2]],
                               row_weights=s1, compensate=False).double()
    first = S.column_saliency(layers[1][0], layers[1][1], [torch.tensor(c) for c in layers[1][2][:5]],
                              compensate=False).double()
    assert order[0] == int(torch.argmin(single + torch.cat([first, torch.zeros(1, dtype=torch.float64)])))
    assert sorted(order) == list(range(6))


@pytest.mark.parametrize("kwargs, field", [
    (dict(ratio="0.5"), "ratio"), (dict(ratio=0.5, head_ratio=1.5), "head_ratio"),
    (dict(ratio=0.8), "head_ratio"),          # ceil(0.8 x 4) = 4: every head of a layer
    (dict(ratio=0.0, head_ratio=0.99), "head_ratio"), (dict(ratio=0.99, heads=False), "ratio"),
])
def test_prune_transformer_refuses_what_torch_pruning_would_skip_and_changes_nothing(kwargs, field):
    model = tiny_bert()
    ids, am, _ = token_batches()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match=f"^{field}"):
        prune_transformer(model, {"input_ids": ids[:2], "attention_mask": am[:2]},
                          tp.importance.GroupMagnitudeImportance(), **kwargs)
    assert state_equal(before, model.state_dict())


def _bert_module_state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(l.attention.self.num_attention_heads, l.attention.self.all_head_size, l.intermediate.dense.out_features,
              l.output.dense.in_features) for l in model.encoder.layer],
            model.config.num_attention_heads, model.config.intermediate_size, hasattr(model.config, "obs_pruned"))


def _bert_layer0_ffn_tiny(model):
    """Layer 0's FFN 1000x smaller: a global magnitude threshold takes all of it, which Torch-Pruning skips."""
    with torch.no_grad():
        layer = model.encoder.layer[0]
        for lin in (layer.intermediate.dense, layer.output.dense):
            lin.weight.mul_(1e-3)
        layer.intermediate.dense.bias.mul_(1e-3)


def test_prune_transformer_is_atomic_when_the_ffn_pass_refuses_after_the_heads_pass():
    """Global pruning: the OBS compensation's count check refuses in the FFN pass, after the heads pass pruned the
    model and the importance's Grams followed it. All of it goes back: weights, head counts, config, and the
    importance (a retry with per-layer pruning then equals a fresh run)."""
    model = tiny_bert()
    _bert_layer0_ffn_tiny(model)
    twin = copy.deepcopy(model)
    ids, am, batches = token_batches()
    ex = {"input_ids": ids[:2], "attention_mask": am[:2]}
    curv = Curvature.layerwise(model, all_layers(model, exclude=("pooler",)), batches, loss_fn=bert_loss,
                               progress=False)
    comp = OBSImportance(curv)
    before = _bert_module_state(model)
    cfg, grams = model.config, comp._H
    with pytest.raises(PruningInputError, match="would remove 0 channels"):
        prune_transformer(model, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5,
                          global_pruning=True, compensation=comp)
    after = _bert_module_state(model)
    assert state_equal(before[0], after[0]) and before[1:] == after[1:]
    # the very objects back, not copies: one shared config (a copy per module split it), the importance's dicts
    assert model.config is cfg and all(getattr(m, "config", cfg) is cfg for m in model.modules())
    assert comp._H is grams
    prune_transformer(model, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5, compensation=comp)
    tcurv = Curvature.layerwise(twin, all_layers(twin, exclude=("pooler",)), batches, loss_fn=bert_loss,
                                progress=False)
    prune_transformer(twin, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5,
                      compensation=OBSImportance(tcurv))
    assert state_equal(model.state_dict(), twin.state_dict())


@pytest.mark.parametrize("what", ["heads", "ffn"])
def test_prune_transformer_global_refuses_a_skipped_layer_for_any_importance(what):
    """Torch-Pruning skips a layer whose heads / channels all rank below the global threshold; with a built-in
    importance (no OBS step to count) that was silent: fewer units removed than the ratio implies."""
    model = tiny_bert()
    if what == "heads":
        with torch.no_grad():
            sa = model.encoder.layer[0].attention.self
            for lin in (sa.query, sa.key, sa.value):
                lin.weight.mul_(1e-3)
                lin.bias.mul_(1e-3)
    else:
        _bert_layer0_ffn_tiny(model)
    ids, am, _ = token_batches()
    before = _bert_module_state(model)
    with pytest.raises(PruningInputError, match="^global_pruning: .* removed .* where ratio 0.5 implies"):
        prune_transformer(model, {"input_ids": ids[:2], "attention_mask": am[:2]},
                          tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5, global_pruning=True,
                          heads=what == "heads", ffn=what == "ffn")
    after = _bert_module_state(model)
    assert state_equal(before[0], after[0]) and before[1:] == after[1:]


def test_prune_transformer_refuses_a_model_without_a_config_before_pruning():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="^model: .*config"):
        prune_transformer(model, torch.randn(2, 8), tp.importance.GroupMagnitudeImportance(), 0.5)
    assert state_equal(before, model.state_dict())


def test_prune_transformer_heads_only_with_ffn_ratio_zero():
    """ratio=0 with head_ratio>0 removes heads (Torch-Pruning skipped the pass when its pruning_ratio was 0)."""
    model = tiny_bert()
    ids, am, _ = token_batches()
    prune_transformer(model, {"input_ids": ids[:2], "attention_mask": am[:2]},
                      tp.importance.GroupMagnitudeImportance(), 0.0, head_ratio=0.5)
    assert [l.attention.self.num_attention_heads for l in model.encoder.layer] == [2, 2]
    assert [l.intermediate.dense.out_features for l in model.encoder.layer] == [64, 64]


def test_prune_transformer_checks_the_obs_curvature_covers_both_passes_before_the_first():
    """The FFN pass would find its consumers missing from the curvature only after the heads were gone."""
    model = tiny_bert()
    ids, am, batches = token_batches()
    attn_only = [(l.attention.output.dense, "weight") for l in model.encoder.layer]
    curv = Curvature.layerwise(model, attn_only, batches, loss_fn=bert_loss, progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="^curvature"):
        prune_transformer(model, {"input_ids": ids[:2], "attention_mask": am[:2]}, OBSImportance(curv), 0.5)
    assert state_equal(before, model.state_dict())
    assert [l.attention.self.num_attention_heads for l in model.encoder.layer] == [4, 4]


def test_a_refused_step_leaves_the_pruner_ready_to_step_again():
    """OBSImportance.step refuses before pruning (unscaled scores: the middle layer's tiny outputs rank lowest
    wholesale, so Torch-Pruning would skip that group); the pruner's step counter is put back, so the retry with
    strict=False takes its one step (it used to find the step already spent and prune through no group)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    X = torch.randn(256, 8)
    Y = model(X).detach() + 0.1 * torch.randn(256, 3)
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
        model[2].bias.mul_(1e-3)
        model[4].weight.mul_(1e3)
    batches = [(X[i:i + 64], Y[i:i + 64]) for i in range(0, 256, 64)]
    imp = OBSImportance(Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, progress=False),
                        scale=None)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, global_pruning=True,
                              ignored_layers=[model[4]])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="^pruner: .* Nothing was changed"):
        imp.step(pr)
    assert pr.current_step == 0 and state_equal(before, model.state_dict())
    rec = imp.step(pr, strict=False)
    assert pr.current_step == 1 and rec["groups"] >= 1 and rec["implied_by_ratio"] == 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_pruned_keeps_the_saved_dtype(tmp_path, dtype):
    """A bf16 / fp16 model (loaded the usual way, from_pretrained(dtype=...)) comes back in its dtype with the
    same outputs (it came back fp32)."""
    tiny_llama().save_pretrained(tmp_path / "dense")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype).eval()
    ids, am, _ = token_batches()
    prune_transformer(model, {"input_ids": ids[:2]}, tp.importance.GroupMagnitudeImportance(), 0.5)
    model.save_pretrained(tmp_path)
    back = load_pruned(tmp_path)
    assert back.model.layers[0].mlp.down_proj.weight.dtype == dtype
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)


def test_greedy_removal_checks_every_layer_on_every_path():
    """The single-column and no-update fast paths skipped the checks: a wrong-size H was accepted and a column
    index -1 wrapped to the last column."""
    W, H = torch.randn(3, 4), torch.eye(4)
    for layers in ([(W, torch.eye(3), [[0], [1]], None)], [(W, H, [[0], [-1]], None)], [(W, H, [[0], [4]], None)]):
        for compensate in (True, False):
            with pytest.raises(PruningInputError, match="^layers\\[0\\]"):
                greedy_removal(layers, 2, compensate=compensate)


# ------------------------------------------------------------------- scope="network": gate-space Gauss-Newton
def _gated_mlp():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


# gate ids of each consumer's input features (-1: not gated); gate 2 feeds both consumers (a shared unit)
MLP_SITES = {2: [0, 0, 1, 1, 2, -1], 4: [3, 3, 4, 2]}


def _gated_mlp_logits(model):
    """float64 logits of ``_gated_mlp`` for one input ``x`` as a function of the gate vector ``m`` (MLP_SITES)."""
    m64 = copy.deepcopy(model).double()

    def f(m, x):
        gate = lambda ids: torch.stack([m[i] if i >= 0 else m.new_ones(()) for i in ids])  # noqa: E731
        h = torch.relu(m64[0](x.double()))
        h = torch.tanh(m64[2](h * gate(MLP_SITES[2])))
        return m64[4](h * gate(MLP_SITES[4]))

    return f


def _ggn_brute(f, X, n):
    """float64 brute force: G = mean_i J_i^T (diag p_i - p_i p_i^T) J_i, J_i = d logits_i / d m at m = 1."""
    G = torch.zeros(n, n, dtype=torch.float64)
    for x in X:
        J = torch.autograd.functional.jacobian(lambda m: f(m, x), torch.ones(n, dtype=torch.float64))
        p = torch.softmax(f(torch.ones(n, dtype=torch.float64), x), 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return G / len(X)


def test_gate_ggn_factor_is_the_brute_force_gauss_newton_and_k_batches_equal_one():
    from obs_plugins.curvature.gates import gate_ggn_factor
    model = _gated_mlp()
    g = torch.Generator().manual_seed(5)
    X = torch.randn(12, 5, generator=g)
    f = _gated_mlp_logits(model)

    want = _ggn_brute(f, X, 5)
    sites = {model[k]: torch.tensor(v) for k, v in MLP_SITES.items()}
    before = copy.deepcopy(model.state_dict())
    model.train()
    model[2].eval()          # a submodule the caller keeps in eval mode stays there
    B = gate_ggn_factor(model, sites, [(X[:5], None), (X[5:], None)])
    assert model.training and not model[2].training and all(p.grad is None for p in model.parameters())
    assert B.shape == (12 * 3, 5) and B.dtype == torch.float64
    torch.testing.assert_close(B.T @ B, want, rtol=1e-4, atol=1e-7)
    one = gate_ggn_factor(model, sites, [(X, None)])
    torch.testing.assert_close(one.T @ one, B.T @ B, rtol=1e-5, atol=1e-9)
    assert all(not m._forward_pre_hooks for m in model) and state_equal(before, model.state_dict())
    with pytest.raises(PruningInputError, match="^logits_fn"):   # the error path removes its hooks too
        gate_ggn_factor(model, sites, [(X, None)], logits_fn=lambda out, b: out[:, :, None])
    assert all(not m._forward_pre_hooks for m in model) and model.training and not model[2].training


def test_gate_ggn_factor_refuses_a_consumer_that_mixes_the_batch():
    """A sequence-first layer (batch in dim 1) with as many time steps as samples passes the row-count check;
    the per-sample independence check catches it."""
    from obs_plugins.curvature.gates import gate_ggn_factor

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.inner, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):                  # x: (B, T=B, 3) -> the gated layer sees (T, B, 3)
            h = torch.relu(self.inner(x))
            return self.out(h.transpose(0, 1)).mean(0)

    x = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(10))[..., :3]
    model = SeqFirst()
    with pytest.raises(PruningInputError, match="^sites: one sample's gates"):
        gate_ggn_factor(model, {model.out: torch.tensor([0, 0, 1, 1])}, [(x, None)])


def test_gate_ggn_factor_gates_conv_input_channels():
    from obs_plugins.curvature.gates import gate_ggn_factor
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 4))
    X = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    m64 = copy.deepcopy(model).double()

    def f(m, x):
        h = torch.relu(m64[0](x.double().unsqueeze(0)))
        return m64[4](m64[2](h * m.view(1, 3, 1, 1)).flatten(1))[0]

    B = gate_ggn_factor(model, {model[2]: torch.tensor([0, 1, 2])}, [(X, None)])
    torch.testing.assert_close(B.T @ B, _ggn_brute(f, X, 3), rtol=1e-4, atol=1e-7)


def test_greedy_gate_removal_follows_the_brute_force_joint_quadratic():
    from obs_plugins.methods.obs_iht.structured import greedy_gate_removal
    B = torch.randn(9, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    q = lambda S: 0.5 * float((B[:, sorted(S)].sum(1) ** 2).sum()) if S else 0.0  # noqa: E731
    order, inc = greedy_gate_removal(B)
    S = []
    for u, d in zip(order, inc):
        costs = {v: q(S + [v]) - q(S) for v in range(6) if v not in S}
        assert u == min(costs, key=costs.get) and d == pytest.approx(costs[u], rel=1e-12, abs=1e-12)
        S.append(u)
    assert float(inc.sum()) == pytest.approx(q(S))
    with pytest.raises(Exception, match="factor"):
        greedy_gate_removal(torch.tensor([[float("nan")]]))


def test_network_scope_removes_each_layers_first_units_of_the_joint_greedy_order():
    """Per-layer pruning of a small CNN with OBSImportance(scope="network"): the channels removed in every layer
    are that layer's earliest in the greedy order of the gate-space Gauss-Newton quadratic over all layers."""
    from obs_plugins.curvature.gates import gate_ggn_factor
    from obs_plugins.methods.obs_iht.structured import greedy_gate_removal
    model = distinct_bias_cnn()
    original = copy.deepcopy(model)
    batches = cnn_batches()
    sites = cnn_gate_sites(model)
    order, _ = greedy_gate_removal(gate_ggn_factor(model, sites, batches))
    want = []
    for lo, n in ((0, 8), (8, 12), (20, 16)):
        gone = [u - lo for u in order if lo <= u < lo + n][:n // 2]
        want.append(sorted(set(range(n)) - set(gone)))
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
    imp = OBSImportance(curv, scope="network", relinearize=1)
    pr = tp.pruner.MetaPruner(model, batches[0][0][:2], importance=imp, pruning_ratio=0.5, global_pruning=False,
                              ignored_layers=[model[9]])
    with pytest.raises(PruningInputError, match="^scope"):   # the scores come from imp.step(pruner)
        imp(groups_of(pr)[0])
    spent = tp.pruner.MetaPruner(copy.deepcopy(model), batches[0][0][:2], importance=imp, pruning_ratio=0.5,
                                 global_pruning=False)
    spent.current_step = spent.iterative_steps   # e.g. after a pruner.step() that raised
    with pytest.raises(PruningInputError, match="^pruner: its 1 iterative step"):
        imp.step(spent)
    imp.step(pr, update=False)
    got = [kept_channels(model[k], original[k]) for k in (0, 3, 7)]
    assert got == want
    out = model(batches[0][0])
    assert out.shape == (16, 5) and bool(torch.isfinite(out).all())


def _kl_model_brute(f, X, at, ref_at):
    """float64 brute force of the gate-space model at gates ``at``: the Gauss-Newton matrix there and the gradient
    of mean_i KL(p_i(ref_at) || p_i(m)) at m = at."""
    at = torch.as_tensor(at, dtype=torch.float64)
    ref_at = torch.as_tensor(ref_at, dtype=torch.float64)
    n = at.numel()
    G = torch.zeros(n, n, dtype=torch.float64)
    for x in X:
        J = torch.autograd.functional.jacobian(lambda m: f(m, x), at)
        p = torch.softmax(f(at, x), 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    q = [torch.softmax(f(ref_at, x), 0).detach() for x in X]

    def kl(m):
        return sum((qi * (qi.log() - torch.log_softmax(f(m, x), 0))).sum() for qi, x in zip(q, X)) / len(X)

    return G / len(X), torch.autograd.functional.jacobian(kl, at)


def test_gate_quadratic_away_from_one_is_the_brute_force_kl_model_and_k_batches_equal_one():
    from obs_plugins.curvature.gates import gate_quadratic
    model = _gated_mlp()
    X = torch.randn(12, 5, generator=torch.Generator().manual_seed(5))
    f = _gated_mlp_logits(model)

    sites = {model[k]: torch.tensor(v) for k, v in MLP_SITES.items()}
    parts = [(X[:5], None), (X[5:], None)]
    dense = gate_quadratic(model, sites, parts)
    assert torch.equal(dense.grad, torch.zeros(5, dtype=torch.float64))   # no reference: no gradient
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(dense.probs), torch.softmax(model(X).double(), 1), rtol=1e-5, atol=1e-7)
    at = [1.0, 0.0, 1.0, 1.0, 0.0]    # units 1 and 4 removed; unit 2 feeds both consumers
    q = gate_quadratic(model, sites, parts, at=at, reference=dense.probs)
    G, g = _kl_model_brute(f, X, at, torch.ones(5))
    torch.testing.assert_close(q.factor.T @ q.factor, G, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(q.grad, g, rtol=1e-4, atol=1e-7)
    assert float(g.abs().max()) > 1e-3   # the gradient is really there away from the reference point
    one = gate_quadratic(model, sites, [(X, None)], at=at, reference=[torch.cat(dense.probs)])
    torch.testing.assert_close(one.grad, q.grad, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(one.factor.T @ one.factor, q.factor.T @ q.factor, rtol=1e-5, atol=1e-9)
    with pytest.raises(PruningInputError, match="^at"):
        gate_quadratic(model, sites, parts, at=[1.0, 0.0])
    with pytest.raises(PruningInputError, match="^reference"):
        gate_quadratic(model, sites, parts, reference=dense.probs[:1])


def test_relinearized_gate_removal_is_a_brute_force_staged_greedy():
    """Each round re-takes the model at the gates reached (its KL gradient against the first model's predictions)
    and removes greedily under it, within the group caps, up to ceil(count * (s + 1) / stages); the units left are
    ordered by the last model; one round is the plain capped greedy; a dense model given is not taken again."""
    from obs_plugins.curvature.gates import GateQuadratic
    from obs_plugins.methods.obs_iht.structured import greedy_gate_removal, relinearized_gate_removal
    gen = torch.Generator().manual_seed(11)
    n = 9
    B0, B1 = torch.randn(7, n, generator=gen, dtype=torch.float64), torch.randn(7, n, generator=gen, dtype=torch.float64)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    groups, caps = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2]), torch.tensor([2, 1, 2])
    seen = []

    def quadratic(at):
        gone = (1 - at).double()
        return B0 + B1 * gone.sum() / 3, A @ gone

    def take(at, reference):
        seen.append((at.clone(), reference))
        factor, grad = quadratic(at)
        return GateQuadratic(factor=factor, grad=grad, probs=[at.clone()])

    def brute(stages):
        at, room, order = torch.ones(n), caps.clone(), []
        for s in range(stages):
            want = math.ceil(5 * (s + 1) / stages) - len(order)
            if want <= 0:
                continue
            B, g = quadratic(at.clone())
            G, S = B.T @ B, []
            for _ in range(want):
                cost = {u: -float(g[u]) + 0.5 * float(G[u, u]) + sum(float(G[u, v]) for v in S)
                        for u in range(n) if at[u] > 0 and room[groups[u]] > 0}
                u = min(cost, key=cost.get)
                S.append(u)
                at[u] = 0
                room[groups[u]] -= 1
            order += S
        rest = []
        while len(order) + len(rest) < n:
            cost = {u: -float(g[u]) + 0.5 * float(G[u, u]) + sum(float(G[u, v]) for v in S + rest)
                    for u in range(n) if u not in order and u not in rest}
            rest.append(min(cost, key=cost.get))
        return order + rest

    for stages in (1, 2, 5):
        want = brute(stages)
        seen.clear()
        order, inc = relinearized_gate_removal(take, n, 5, groups=groups, caps=caps, stages=stages)
        assert order == want and len(inc) == n and len(seen) == stages
        for s, (at, reference) in enumerate(seen):   # each round's model: the earlier rounds' units at 0
            assert sorted(torch.nonzero(at == 0).flatten().tolist()) == sorted(order[:math.ceil(5 * s / stages)])
            assert (reference is None) if s == 0 else torch.equal(reference[0], torch.ones(n))   # the first's probs
        assert torch.bincount(groups[torch.tensor(order[:5])], minlength=3).tolist() == caps.tolist()
        seen.clear()
        dense = GateQuadratic(*quadratic(torch.ones(n)), probs=[torch.ones(n)])
        assert relinearized_gate_removal(take, n, 5, groups=groups, caps=caps, stages=stages, dense=dense)[0] == want
        assert len(seen) == stages - 1 and all(bool((at < 1).any()) for at, _ in seen)
    B, g = quadratic(torch.ones(n))
    assert relinearized_gate_removal(take, n, 5, groups=groups, caps=caps, stages=1)[0][:5] == \
        greedy_gate_removal(B, grad=g, groups=groups, caps=caps, count=5)[0]
    seen.clear()
    with pytest.raises(PruningInputError, match="^stages"):
        relinearized_gate_removal(take, n, 5, stages=0)
    with pytest.raises(PruningInputError, match="^count: 6 units asked, the caps allow 5"):
        relinearized_gate_removal(take, n, 6, groups=groups, caps=caps, stages=2)
    assert not seen   # refused before any model is taken


def _cnn_network_reference(model, batches, sites, sizes, caps, count, stages):
    """The units the re-linearised network ranking removes, from the core functions directly."""
    from obs_plugins.curvature.gates import gate_quadratic
    from obs_plugins.methods.obs_iht.structured import relinearized_gate_removal
    n = sum(sizes)
    take = lambda at, reference: gate_quadratic(model, sites, batches, n_gates=n, at=at, reference=reference)  # noqa: E731
    groups = torch.cat([torch.full((k,), i) for i, k in enumerate(sizes)])
    return relinearized_gate_removal(take, n, count, groups=groups, caps=caps, stages=stages)[0][:count]


@pytest.mark.parametrize("global_pruning", [False, True])
def test_network_scope_relinearized_removes_the_staged_greedy_units(global_pruning):
    """Per-layer ratios (each layer's count from the pruner's dry run) and plain global pruning (the total; no
    layer emptied): the channels removed are those of the core's re-linearised greedy."""
    model = distinct_bias_cnn()
    original = copy.deepcopy(model)
    batches = cnn_batches()
    sites = cnn_gate_sites(model)
    sizes = [8, 12, 16]
    caps = torch.tensor([7, 11, 15]) if global_pruning else torch.tensor([4, 6, 8])
    gone = set(_cnn_network_reference(model, batches, sites, sizes, caps, 18, 3))
    want = [sorted(set(range(k)) - {u - lo for u in gone if lo <= u < lo + k}) for lo, k in ((0, 8), (8, 12), (20, 16))]
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
    imp = OBSImportance(curv, scope="network", relinearize=3)
    pr = tp.pruner.MetaPruner(model, batches[0][0][:2], importance=imp, pruning_ratio=0.5,
                              global_pruning=global_pruning, ignored_layers=[model[9]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the plan is carried out, no fallback to the dense-point ranking
        imp.step(pr, update=False)
    assert [kept_channels(model[k], original[k]) for k in (0, 3, 7)] == want
    if not global_pruning:
        assert [len(w) for w in want] == [4, 6, 8]
    out = model(batches[0][0])
    assert out.shape == (16, 5) and bool(torch.isfinite(out).all())
    with pytest.raises(PruningInputError, match="^relinearize"):
        OBSImportance(curv, scope="network", relinearize=0)
    with pytest.raises(PruningInputError, match="^relinearize"):
        OBSImportance(curv, scope="network", relinearize=True)
    with pytest.raises(PruningInputError, match="^relinearize: .*scope='layer'"):
        OBSImportance(curv, relinearize=2)   # was silently ignored
    for bad in (dict(rel_damp=True),):
        with pytest.raises(PruningInputError, match="^rel_damp"):
            OBSImportance(curv, **bad)
    for kw, arg in ((dict(update="no"), "update"), (dict(strict="no"), "strict")):  # bool("no") was True
        with pytest.raises(PruningInputError, match=f"^{arg}: True or False"):
            imp.step(pr, **kw)


def _network_cnn_prune(relinearize, norm=None, strict=True, **pruner_kw):
    model = distinct_bias_cnn(norm)
    original, batches = copy.deepcopy(model), cnn_batches()
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
    imp = OBSImportance(curv, scope="network", relinearize=relinearize)
    kw = {"pruning_ratio": 0.5, "global_pruning": False, "ignored_layers": [model[9]], **pruner_kw}
    pr = tp.pruner.MetaPruner(model, batches[0][0][:2], importance=imp, **kw)
    imp.step(pr, update=False, strict=strict)
    return [kept_channels(model[k], original[k]) for k in (0, 3, 7)]


def test_network_scope_relinearized_falls_back_where_the_pruner_would_not_follow_a_plan():
    """Channel groups (Torch-Pruning averages scores over them): a warning, and the dense-point ranking's prune.
    A global ratio that would empty a layer: the usual strict refusal (model unchanged, no scores left behind, so
    a plain pruner.step() is still refused); strict=False prunes as the dense-point ranking does."""
    with pytest.warns(UserWarning, match="channel groups"):
        got = _network_cnn_prune(8, norm=nn.GroupNorm(2, 8))
    assert got == _network_cnn_prune(1, norm=nn.GroupNorm(2, 8))
    torch.manual_seed(0)
    model = small_cnn()
    original, batches = copy.deepcopy(model), cnn_batches()
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
    imp = OBSImportance(curv, scope="network", relinearize=8)
    pr = tp.pruner.MetaPruner(model, batches[0][0][:2], importance=imp, pruning_ratio=0.95, global_pruning=True,
                              ignored_layers=[model[9]])
    with pytest.raises(PruningInputError, match="^pruner: Torch-Pruning would remove 15 channels where "
                                                "pruning_ratio implies 35"):
        imp.step(pr, update=False)
    assert state_equal(original.state_dict(), model.state_dict()) and pr.current_step == 0 and imp._net is None
    with pytest.raises(PruningInputError, match="^scope"):
        pr.step()
    with pytest.warns(UserWarning, match="would not remove the planned units"):   # it empties a layer's plan
        loose = _network_cnn_prune(8, strict=False, pruning_ratio=0.95, global_pruning=True)
    assert loose == _network_cnn_prune(1, strict=False, pruning_ratio=0.95, global_pruning=True)
    assert [len(k) for k in loose] == [8, 12, 1]


def test_network_scope_relinearized_keeps_the_callers_num_heads_dict():
    """The dry run puts the pruner's head counts back in place: the num_heads dict the caller passed stays the
    pruner's and follows the model over iterative steps."""
    from obs_plugins.integrations import torch_pruning as T
    ids, am, batches = token_batches()
    model = tiny_bert()
    head = nn.Linear(32, 3)
    curv = Curvature.layerwise(model, all_layers(model, exclude=("pooler",)), batches, loss_fn=bert_loss,
                               progress=False)
    imp = OBSImportance(curv, scope="network", logits_fn=lambda out, b: head(out.last_hidden_state[:, 0]),
                        channel_blocks=T.transformer_channel_blocks(model), relinearize=8)
    attn, _ = T._attention_blocks(model)
    nh = {lin: int(sa.num_attention_heads) for sa in attn for lin in (sa.query, sa.key, sa.value)}
    keep = {id(m) for m in nh}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in keep]
    pr = tp.pruner.MetaPruner(model, {"input_ids": ids[:2], "attention_mask": am[:2]}, importance=imp,
                              pruning_ratio=0.5, ignored_layers=ignored, num_heads=nh, prune_num_heads=True,
                              prune_head_dims=False, head_pruning_ratio=0.5, iterative_steps=2,
                              output_transform=T._hf_output_transform)
    for step in range(2):
        imp.step(pr, update=False)
        assert pr.num_heads is nh
        assert [nh[sa.query] for sa in attn] == [sa.query.out_features // sa.attention_head_size for sa in attn] \
            == [3 - 2 * step] * 2


def test_network_scope_on_bert_heads_and_ffn_with_a_classifier_head():
    """Heads pass: the heads kept in each layer are those not among its two earliest in the joint greedy order of
    the 8 head gates (both layers); an OBSImportance of the default scope can add the update to the ranking."""
    from obs_plugins.curvature.gates import gate_ggn_factor
    from obs_plugins.methods.obs_iht.structured import greedy_gate_removal
    model = tiny_bert()
    ids, am, batches = token_batches()
    head = nn.Linear(32, 3)
    logits = lambda out, b: head(out.last_hidden_state[:, 0])  # noqa: E731
    sites = {layer.attention.output.dense: 4 * li + torch.arange(4).repeat_interleave(8)
             for li, layer in enumerate(model.encoder.layer)}
    order, _ = greedy_gate_removal(gate_ggn_factor(model, sites, batches, logits_fn=logits))
    want = []
    for li in range(2):
        gone = [u - 4 * li for u in order if 4 * li <= u < 4 * li + 4][:2]
        want.append(sorted(set(range(4)) - set(gone)))
    queries = [layer.attention.self.query.weight.detach().clone() for layer in model.encoder.layer]
    curv = Curvature.layerwise(model, all_layers(model, exclude=("pooler",)), batches, loss_fn=bert_loss,
                               progress=False)
    imp = OBSImportance(curv, scope="network", logits_fn=logits, relinearize=1)
    comp = OBSImportance(curv)   # adds the layer OBS update to the network ranking
    prune_transformer(model, {"input_ids": ids[:2], "attention_mask": am[:2]}, imp, 0.5, compensation=comp,
                      update=False)
    for li, layer in enumerate(model.encoder.layer):
        assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features == 32
        q = layer.attention.self.query.weight.detach()
        kept = [h for h in range(4) for k in range(2) if torch.equal(q[8 * k:8 * k + 8], queries[li][8 * h:8 * h + 8])]
        assert kept == want[li]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert out.shape == (8, 12, 16 * 2) and bool(torch.isfinite(out).all())
    from obs_plugins.integrations import torch_pruning as T
    rounds = []
    plain_rounds = T.relinearized_gate_removal

    def spy(*a, **kw):
        out = plain_rounds(*a, **kw)
        rounds.append(kw["stages"])
        return out

    T.relinearized_gate_removal = spy
    try:
        for global_pruning in (False, True):   # re-linearised (8 rounds), each pass's plan carried out as made
            relin = tiny_bert()
            rcurv = Curvature.layerwise(relin, all_layers(relin, exclude=("pooler",)), batches, loss_fn=bert_loss,
                                        progress=False)
            rimp = OBSImportance(rcurv, scope="network", logits_fn=logits, relinearize=8)
            with warnings.catch_warnings():
                warnings.simplefilter("error")   # no fallback to the dense-point ranking
                prune_transformer(relin, {"input_ids": ids[:2], "attention_mask": am[:2]}, rimp, 0.5,
                                  global_pruning=global_pruning, update=False)
            heads = [layer.attention.self.num_attention_heads for layer in relin.encoder.layer]
            ffn = [layer.intermediate.dense.out_features for layer in relin.encoder.layer]
            assert (sum(heads), sum(ffn)) == (4, 64) and (global_pruning or (heads, ffn) == ([2, 2], [32, 32]))
            with torch.no_grad():
                assert bool(torch.isfinite(relin(input_ids=ids, attention_mask=am).last_hidden_state).all())
    finally:
        T.relinearized_gate_removal = plain_rounds
    assert rounds == [8, 8, 8, 8]   # heads pass and FFN pass, per layer and global
    with pytest.raises(PruningInputError, match="^scope"):
        OBSImportance(curv, scope="everything")
    with pytest.raises(PruningInputError, match="^mode"):
        OBSImportance(curv, scope="network", mode="single")
    fresh = tiny_bert()   # BERT's own output is (batch, tokens, hidden), not logits: refused, nothing changed
    before = copy.deepcopy(fresh.state_dict())
    bad = OBSImportance(Curvature.layerwise(fresh, all_layers(fresh, exclude=("pooler",)), batches,
                                            loss_fn=bert_loss, progress=False), scope="network")
    with pytest.raises(PruningInputError, match="^logits_fn"):
        prune_transformer(fresh, {"input_ids": ids[:2], "attention_mask": am[:2]}, bad, 0.5)
    assert state_equal(before, fresh.state_dict())


def test_load_pruned_auto_dtype_keeps_the_saved_dtype(tmp_path):
    """dtype="auto" loaded float32 (getattr(torch, "auto") is None); the config now records the dtype too."""
    ids, _, _ = token_batches(padded=False)
    model = tiny_llama()
    from obs_plugins.lm import causal_lm_loss
    curv = Curvature.layerwise(model, all_layers(model), [{"input_ids": ids[:4]}], loss_fn=causal_lm_loss,
                               progress=False)
    prune_transformer(model, {"input_ids": ids[:2]}, OBSImportance(curv), 0.5)
    model.half().save_pretrained(tmp_path)
    for kw in ({"dtype": "auto"}, {"torch_dtype": "auto"}, {}, {"dtype": torch.float16}):
        back = load_pruned(tmp_path, **kw)
        assert back.model.layers[0].mlp.gate_proj.weight.dtype == torch.float16 and back.config.dtype == torch.float16
    with pytest.raises(PruningInputError, match="^dtype: "):
        load_pruned(tmp_path, dtype="float17")


class _CatSkip(nn.Module):
    """Two branches concatenated into c, branch a also read by e (so Torch-Pruning yields a's group first)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c, self.e = nn.Conv2d(14, 8, 3, padding=1), nn.Conv2d(6, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        ya, yb = F.relu(self.a(x)), F.relu(self.b(x))
        y = F.relu(self.c(torch.cat([ya, yb], 1))) + self.e(ya)
        return self.head(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_concatenated_branches_lose_the_consumer_columns_native_torch_pruning_removes():
    """All groups were built before any was pruned: a concatenation's offsets went stale once the offset-0
    branch was pruned first (a crash, or c silently reading the wrong columns)."""
    X = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    batches = [(X[i:i + 16], torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(i)))
               for i in range(0, 64, 16)]
    out = {}
    for how in ("native", "obs"):
        torch.manual_seed(0)
        model = _CatSkip().eval()
        with torch.no_grad():
            model.b.weight[:4] *= 0.01
            model.c.weight[:, 6:10] *= 0.01
        curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
        pr = tp.pruner.MetaPruner(model, X[:2], importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
                                  ignored_layers=[model.head])
        pr.step() if how == "native" else OBSImportance(curv).step(pr, update=False)
        with torch.no_grad():
            out[how] = (model(X), model.c.weight.clone())
    assert torch.equal(out["obs"][1], out["native"][1]) and torch.equal(out["obs"][0], out["native"][0])


def test_a_grouped_convolution_consumer_is_named_in_the_refusal():
    class G2(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            return self.head(F.adaptive_avg_pool2d(F.relu(self.g(F.relu(self.a(x)))), 1).flatten(1))

    torch.manual_seed(0)
    model = G2().eval()
    X = torch.randn(16, 3, 8, 8)
    batches = [(X[i:i + 8], torch.randint(0, 5, (8,))) for i in (0, 8)]
    curv = Curvature.layerwise(model, all_layers(model), batches, loss_fn=F.cross_entropy, progress=False)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=OBSImportance(curv), pruning_ratio=0.5,
                              ignored_layers=[model.head])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="grouped convolution, groups > 1"):
        OBSImportance(curv).step(pr)
    assert state_equal(before, model.state_dict())


@pytest.mark.parametrize("route", ["prune_transformer", "step"])
def test_structured_pruning_refuses_a_model_still_carrying_unstructured_masks(route):
    """Torch-Pruning resizes ``weight``: on a module whose weight is ``weight_orig * weight_mask`` (masks still
    attached) it made a new (32, 32) ``weight`` beside the (64, 32) ``weight_orig``, returned without a word, and
    the next forward raised.  Now refused naming the argument, the model bit-identical."""
    from torch.nn.utils import prune
    ids, _, _ = token_batches(padded=False)
    model = tiny_llama()
    lin = [(m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    prune.global_unstructured(lin, pruning_method=prune.L1Unstructured, amount=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with pytest.raises(PruningInputError, match=r"^(model|pruner): 14 module\(s\) still carry unstructured masks.*"
                                                r"prune\.remove"):
        if route == "prune_transformer":
            prune_transformer(model, {"input_ids": ids[:2]}, tp.importance.GroupMagnitudeImportance(), 0.5)
        else:
            ffn = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "mlp" not in n]
            pr = tp.pruner.MetaPruner(model, {"input_ids": ids[:2]}, importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=0.5, ignored_layers=ffn, forward_fn=lambda m, x: m(**x).logits)
            from obs_plugins.lm import causal_lm_loss
            OBSImportance(Curvature.layerwise(model, all_layers(model), [{"input_ids": ids[:4]}],
                                              loss_fn=causal_lm_loss, progress=False)).step(pr)
    assert state_equal(model.state_dict(), before)
    assert shapes == {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        model(input_ids=ids)


def test_the_refusal_is_for_masks_and_gates_not_any_parametrization():
    """The refusal above must not catch an ordinary parametrization on a layer Torch-Pruning does not resize (a
    weight-normed classifier head: refused for a while in the seventeenth session), while a torch.ao sparsifier's
    FakeSparsity is still refused."""
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3)
    x = {"input_ids": torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(1))}
    model = transformers.BertForSequenceClassification(cfg).eval()
    weight_norm(model.classifier)
    prune_transformer(model, x, tp.importance.GroupMagnitudeImportance(), 0.5)
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 32
    with torch.no_grad():
        assert model(**x).logits.shape == (2, 3)
    from torch.ao.pruning import WeightNormSparsifier
    model = transformers.BertForSequenceClassification(cfg).eval()
    sp = WeightNormSparsifier(sparsity_level=0.5)
    sp.prepare(model, [{"tensor_fqn": "bert.encoder.layer.0.intermediate.dense.weight"}])
    with pytest.raises(PruningInputError, match=r"^model: 1 module\(s\) still carry .*intermediate\.dense"):
        prune_transformer(model, x, tp.importance.GroupMagnitudeImportance(), 0.5)
