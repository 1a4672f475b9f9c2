"""Pruning-limit estimate (obs_plugins.limit): SLQ recovers a known spectrum, the predicted crossing matches a
closed form, the sweep finds a toy model's threshold exactly, bad input is refused, the model never changes."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from conftest import state_equal
from obs_plugins import Curvature, PruningInputError
from obs_plugins.limit import (LimitReport, default_sparsities, estimate, gaussian_width_fraction, magnitude_path,
                               path_limit, solve_limit)
from obs_plugins.masks import lowest_k_mask


def half_sq_sum(out, target):
    return 0.5 * ((out - target) ** 2).sum()


def diagonal_quadratic(lams, w_star):
    """A bias-free Linear(D, 1) whose loss 1/2 sum_i lam_i (w_i - w*_i)^2 has Hessian diag(lams) exactly.

    Inputs X = diag(sqrt(lam)) (one batch of D rows), targets X w*; at w = w* the loss is 0."""
    D = len(lams)
    model = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w_star, dtype=torch.float32).reshape(1, D))
    X = torch.diag(torch.as_tensor(lams, dtype=torch.float32).sqrt())
    y = X @ model.weight.detach().reshape(D, 1)
    return model, [(X, y)]


def test_slq_density_of_a_diagonal_quadratic_recovers_its_eigenvalues():
    distinct = torch.tensor([0.05, 0.3, 1.0, 2.5, 4.0, 7.5, 10.0, 20.0])
    mult = torch.tensor([10, 2, 5, 3, 8, 4, 6, 2])  # D = 40
    lams = torch.repeat_interleave(distinct, mult)
    model, batches = diagonal_quadratic(lams, torch.randn(len(lams)))
    curv = Curvature(model, [(model, "weight")], batches, loss_fn=half_sq_sum)
    # Rademacher probe: its weight in each eigenspace is multiplicity / D exactly; 8 distinct eigenvalues ->
    # Lanczos finds the invariant Krylov space in 8 steps and stops (more steps asked for)
    nodes, weights = curv.hessian_spectrum(steps=30, probes=3, seed=1)
    assert nodes.numel() == 3 * 8
    for p in range(3):
        n = nodes[8 * p:8 * (p + 1)]
        w = weights[8 * p:8 * (p + 1)]
        torch.testing.assert_close(n, distinct.double(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(w * 3, mult.double() / 40, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-9)


def test_predicted_threshold_matches_the_closed_form():
    # D weights of equal magnitude a, a fraction p0 of zero eigenvalues and the rest equal to lam:
    #   R(s)^2 = s D a^2,  G(R) = p0 + (1 - p0) 2eps / (2eps + lam R^2)
    #   s = G(R(s))  <=>  c s^2 + (1 - c p0) s - 1 = 0,  c = lam D a^2 / (2 eps)
    D, p0, lam, a, eps = 400, 0.25, 2.0, 0.1, 0.4
    n0 = int(p0 * D)
    lams = torch.cat([torch.zeros(n0), torch.full((D - n0,), lam)])
    signs = torch.where(torch.arange(D) % 3 == 0, -1.0, 1.0)
    model, batches = diagonal_quadratic(lams, a * signs)
    c = lam * D * a * a / (2 * eps)
    closed = (-(1 - c * p0) + math.sqrt((1 - c * p0) ** 2 + 4 * c)) / (2 * c)
    rep = estimate(model, batches, half_sq_sum, epsilon=eps, steps=16, probes=2, progress=False)
    assert rep.num_weights == D and rep.epsilon == eps and rep.epsilon_source == "given"
    assert abs(rep.predicted - closed) < 1e-4, (rep.predicted, closed)
    # the G and R curves are the formulas
    assert rep.curve["G"][0] == pytest.approx(1.0)
    i = len(rep.curve["sparsity"]) // 2
    s = rep.curve["sparsity"][i]
    assert rep.curve["R"][i] == pytest.approx(math.sqrt(round(s * D) * a * a), rel=1e-5)
    R = rep.curve["R"][i]
    assert rep.curve["G"][i] == pytest.approx(p0 + (1 - p0) * 2 * eps / (2 * eps + lam * R * R), rel=1e-4)


def test_solve_limit_against_brute_force_on_unequal_weights():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5000, generator=g, dtype=torch.float64) * torch.rand(5000, generator=g, dtype=torch.float64)
    nodes = torch.tensor([-0.5, 0.0, 0.2, 3.0, 40.0], dtype=torch.float64)
    rho = torch.tensor([0.1, 0.3, 0.2, 0.3, 0.1], dtype=torch.float64)
    eps = 0.05
    _, cum = magnitude_path(w)
    s_star = solve_limit(nodes, rho, cum, eps)
    # brute force in float64: every count k, f(k) = G(R(k)) - k/D, the last k with f >= 0
    sq = torch.sort(w.abs()).values ** 2
    R = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(sq, 0)]).sqrt()
    G = (rho * 2 * eps / (2 * eps + nodes.abs() * R[:, None] ** 2)).sum(1) / rho.sum()
    f = G - torch.arange(5001, dtype=torch.float64) / 5000
    k = int((f >= 0).nonzero().max())
    assert k / 5000 <= s_star <= (k + 1) / 5000
    assert s_star == pytest.approx((k + float(f[k] / (f[k] - f[k + 1]))) / 5000, abs=1e-12)
    # G at R = 0 is 1, and the zero eigenvalue's mass (0.3) is the floor as R grows
    assert float(gaussian_width_fraction(nodes, rho, 0.0, eps)) == pytest.approx(1.0)
    assert float(gaussian_width_fraction(nodes, rho, 1e6, eps)) == pytest.approx(0.3, abs=1e-6)


def test_magnitude_path_is_global_magnitude_pruning():
    w = torch.randn(300, dtype=torch.float64)
    w[::7] = w[3]  # ties
    order, cum = magnitude_path(w)
    for k in (0, 1, 17, 150, 299, 300):
        keep = lowest_k_mask(w.abs(), k)
        pruned = torch.zeros(300, dtype=torch.bool)
        pruned[order[:k]] = True
        assert torch.equal(pruned, ~keep)
        assert float(cum[k]) == pytest.approx(float((w * keep).sub(w).pow(2).sum()), rel=1e-12, abs=1e-15)


def _least_squares_problem(at_minimum: bool):
    """Linear(12 -> 1), loss 1/2 ||X w - y||^2 on one batch: exactly quadratic, H = X^T X, g = X^T (X w - y)."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(40, 12, generator=g)
    w = torch.randn(12, generator=g) * torch.rand(12, generator=g)
    y = X @ w if at_minimum else X @ w + 0.3 * torch.randn(40, generator=g)
    model = nn.Linear(12, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, 12))
    return model, [(X, y.reshape(40, 1))], X.double(), y.double(), w.double()


@pytest.mark.parametrize("at_minimum", [False, True])
def test_path_model_crossing_against_brute_force(at_minimum):
    model, batches, X, y, w = _least_squares_problem(at_minimum)
    loss = lambda v: 0.5 * float(((X @ v - y) ** 2).sum())  # noqa: E731
    order, _ = magnitude_path(w)
    D = 12
    H, grad = X.T @ X, X.T @ (X @ w - y)

    def brute(k):  # exact increase and its gradient-free part, float64
        d = torch.zeros(D, dtype=torch.float64)
        d[order[:k]] = -w[order[:k]]
        return loss(w + d) - loss(w), 0.5 * float(d @ H @ d)

    eps = 0.5 * brute(6)[0] + 0.5 * brute(7)[0] if brute(7)[0] > brute(6)[0] else 0.5 * brute(D)[0]
    rep = estimate(model, batches, half_sq_sum, epsilon=eps, steps=6, probes=1, path_points=4, progress=False)
    path = rep.path
    assert path["sparsity"] == [0.0, 4 / 12, 8 / 12, 1.0]
    for k, f, s2 in zip((0, 4, 8, 12), path["first"], path["second"]):
        inc, quad = brute(k)
        assert f + s2 == pytest.approx(inc, rel=1e-5, abs=1e-6)  # the model is exact for a quadratic loss
        assert s2 == pytest.approx(quad, rel=1e-5, abs=1e-6)
    assert path["gradient_norm"] == pytest.approx(float(grad.norm()), rel=1e-5, abs=1e-5)
    for key, part in (("predicted", 0), ("predicted_second_order", 1)):
        inc = [brute(k)[part] for k in range(D + 1)]
        grid_fail = next((k for k in (4, 8, 12) if inc[k] > eps), None)
        if grid_fail is None:
            assert path[key] == 1.0
            continue
        lo = math.floor(path[key] * D + 1e-9)
        assert grid_fail - 4 <= lo < grid_fail          # inside the first grid interval that leaves eps
        assert inc[lo] <= eps < inc[lo + 1]              # a count inside, the next outside
        assert path[key] == pytest.approx((lo + (eps - inc[lo]) / (inc[lo + 1] - inc[lo])) / D, rel=1e-5)
    if at_minimum:  # g = 0: both models coincide
        assert path["predicted"] == pytest.approx(path["predicted_second_order"], rel=1e-5)
        assert path["gradient_norm"] < 1e-4


def test_path_limit_finds_the_first_grid_crossing():
    inc = [0.0, 0.1, 0.2, 0.9, 0.3, 0.4, 2.0, 3.0, 4.0]  # leaves eps = 0.5 at 3, comes back, leaves again at 6
    assert path_limit(lambda k: inc[k], 8, 0.5, [0, 2, 4, 6, 8]) == pytest.approx((5 + 0.1 / 1.6) / 8)
    assert path_limit(lambda k: inc[k], 8, 0.5, [0, 1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx((2 + 0.3 / 0.7) / 8)
    assert path_limit(lambda k: inc[k], 8, 5.0, [0, 4, 8]) == 1.0


class Toy(nn.Module):
    """Linear(20 -> 2) whose 40 weights have the distinct magnitudes 0.02, 0.04, ..., 0.80.  Only input
    feature j = 7 is ever nonzero, so only W[:, j] matters: W[0, j] = 0.48 (23 smaller magnitudes) and
    W[1, j] = -0.50 (24 smaller); the label is 1 where x_j < 0."""

    def __init__(self, j=7):
        super().__init__()
        self.fc = nn.Linear(20, 2, bias=False)
        mags = 0.02 * torch.arange(1, 41, dtype=torch.float32)
        W = mags[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
        for pos, value in ((j, mags[23]), (20 + j, mags[24])):  # swap the two values into W[0, j], W[1, j]
            other = int((W == value).nonzero())
            W[other], W[pos] = W[pos].clone(), value
        W[20 + j] = -W[20 + j]
        with torch.no_grad():
            self.fc.weight.copy_(W.reshape(2, 20))

    def forward(self, x):
        return self.fc(x)


def toy_batches(j=7, n=64, seeds=(0, 1, 2)):
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        v = torch.rand(n, generator=g) + 0.5
        sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
        x = torch.zeros(n, 20)
        x[:, j] = v * sign
        out.append((x, (sign < 0).long()))
    return out


def test_sweep_finds_the_threshold_of_a_toy_model_exactly():
    model = Toy()
    mags = model.fc.weight.detach().abs().reshape(-1)
    W = model.fc.weight.detach()
    assert len(set(mags.tolist())) == 40 and int((mags < W[0, 7].abs()).sum()) == 23
    assert int((mags < W[1, 7].abs()).sum()) == 24 and W[1, 7] < 0 < W[0, 7]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = [k / 40 for k in range(1, 40)]
    rep = estimate(model, toy_batches(), nn.functional.cross_entropy, epsilon=1e-4, steps=8, probes=1,
                   sweep=True, sparsities=grid, progress=False)
    assert state_equal(before, model.state_dict())
    # accuracy stays 1.0 until both W[0, j] (24th smallest) and W[1, j] (25th) are pruned: k = 25 fails
    assert rep.sweep["dense_accuracy"] == 1.0
    assert rep.sweep["accuracy"][23] == 1.0 and rep.sweep["accuracy"][24] == 0.5
    assert rep.measured_limit() == 24 / 40
    # the loss moves as soon as W[0, j] (24th smallest) is pruned: k = 23 is the last within eps
    assert rep.measured_loss_limit() == 23 / 40
    # the loss of the other 38 weights' pruning is exactly the dense loss (their inputs are zero)
    assert rep.sweep["train_loss"][22] == pytest.approx(rep.dense_loss, abs=1e-7)
    # with a tolerance of half the accuracy, k = 39 still passes
    assert rep.measured_limit(acc_tolerance=0.5) == 39 / 40


def test_measured_limits_up_to_the_first_failure_and_largest_passing_differ_on_a_dip():
    """A curve that fails, then passes once more: the largest passing sparsity is past the failure, the limit up
    to the first failure stops before it (the path model's own definition); both agree on a monotone curve."""
    from obs_plugins.limit import LimitReport
    grid = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    acc = [0.90, 0.90, 0.85, 0.90, 0.80, 0.70]        # 0.3 fails (tolerance 0.02), 0.4 passes again
    loss = [1.00, 1.00, 1.05, 1.20, 1.05, 1.30]       # dense 1.0, eps 0.1: 0.4 fails, 0.5 passes again
    rep = LimitReport(predicted=0.5, epsilon=0.1, epsilon_source="given", dense_loss=1.0, num_weights=10,
                      weight_norm=1.0, params=[], nodes=[], weights=[], slq={}, curve={}, g_curve={},
                      sweep={"sparsity": grid, "acc_tolerance": 0.02, "dense_accuracy": 0.90, "accuracy": acc,
                             "train_loss": loss})
    assert rep.measured_limit() == 0.4 and rep.measured_limit(first_failure=True) == 0.2
    assert rep.measured_loss_limit() == 0.5 and rep.measured_loss_limit(first_failure=True) == 0.3
    assert rep.measured_limit(acc_tolerance=0.2) == 0.6 == rep.measured_limit(acc_tolerance=0.2, first_failure=True)
    rep.sweep["accuracy"] = [0.80] + acc[1:]           # the smallest sparsity already fails
    assert rep.measured_limit(first_failure=True) == 0.0 and rep.measured_limit() == 0.4
    d = rep.to_dict()
    assert d["measured_first_failure"] == 0.0 and d["measured_loss_first_failure"] == 0.3


def test_model_is_unchanged_after_estimate_even_when_already_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    model.train()
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = estimate(model, batches, nn.functional.cross_entropy, steps=12, probes=2, sweep=True,
                   sparsities=[0.2, 0.5, 0.8], progress=False)
    assert state_equal(before, model.state_dict()) and model.training
    assert rep.num_weights == 6 * 12 + 12 * 3 and 0.0 < rep.predicted < 1.0
    assert len(rep.sweep["accuracy"]) == 3 and rep.slq["hvps"] <= 12 * 2
    # eps is the (population) std of the dense per-batch losses
    with torch.no_grad():
        losses = torch.tensor([float(nn.functional.cross_entropy(model(x), y)) for x, y in batches])
    assert rep.epsilon == pytest.approx(float(losses.std(unbiased=False)), rel=1e-5)
    assert rep.dense_loss == pytest.approx(float(losses.mean()), rel=1e-5)


def test_pruned_weight_attribute_is_the_callers_after_estimate_and_no_grad_is_fine():
    """torch.nn.utils.prune keeps a plain ``weight`` tensor on a pruned module; every pass inside estimate
    rebinds it (the last sweep point's weights, an HVP graph). It must come back as the very tensor the caller had,
    and a caller's torch.no_grad() must not break the gradient / HVP passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    w0 = model[0].__dict__["weight"]
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    kw = dict(steps=8, probes=1, sweep=True, sparsities=[0.2, 0.9], progress=False)
    rep = estimate(model, batches, nn.functional.cross_entropy, **kw)
    assert model[0].__dict__["weight"] is w0  # was the 90% sweep point's weight
    assert int((model[0].weight == 0).sum()) == int(0.3 * 72 + 0.5)
    with torch.no_grad():
        again = estimate(model, batches, nn.functional.cross_entropy, **kw)
    assert model[0].__dict__["weight"] is w0
    assert again.predicted == rep.predicted and again.path == rep.path


def test_losses_are_means_over_samples_when_batches_differ_in_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]
    rep = estimate(model, batches, nn.functional.cross_entropy, steps=6, probes=1, sweep=True,
                   sparsities=[0.5], progress=False)
    with torch.no_grad():
        whole = float(nn.functional.cross_entropy(model(x), y))
        per = torch.tensor([float(nn.functional.cross_entropy(model(a), b)) for a, b in batches], dtype=torch.float64)
    assert rep.dense_loss == pytest.approx(whole, rel=1e-6)
    assert rep.epsilon == pytest.approx(float(per.std(unbiased=False)), rel=1e-6)  # the per-batch losses' std
    # the 50% sweep point by hand: the 54 smallest of the 108 weights zeroed, the loss on all 40 rows at once
    pruned = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    pruned.load_state_dict(model.state_dict())
    flat = torch.cat([pruned[0].weight.detach().reshape(-1), pruned[2].weight.detach().reshape(-1)])
    order, _ = magnitude_path(flat)
    flat[order[:54]] = 0
    with torch.no_grad():
        pruned[0].weight.copy_(flat[:72].reshape(12, 6))
        pruned[2].weight.copy_(flat[72:].reshape(3, 12))
        want = float(nn.functional.cross_entropy(pruned(x), y))
    assert rep.sweep["train_loss"] == [pytest.approx(want, rel=1e-6)]


@pytest.mark.parametrize("step, grid", [
    (0.3, [0.3, 0.6, 0.9]), (0.4, [0.4, 0.8]), (0.7, [0.7]), (0.25, [0.25, 0.5, 0.75]),
    (0.07, [round(0.07 * i, 10) for i in range(1, 15)]), (0.01, [round(0.01 * i, 10) for i in range(1, 100)]),
])
def test_default_sparsities_reach_the_last_step_below_one(step, grid):
    assert default_sparsities(step) == grid


@pytest.mark.parametrize("step", [0.0, 1.0, -0.1, 1e-9, True, "0.1", float("nan")])
def test_default_sparsities_refuse_a_bad_step(step):
    with pytest.raises(PruningInputError, match="step"):
        default_sparsities(step)


def test_report_saves_under_a_dotted_name_without_cutting_it(tmp_path):
    model = Toy()
    rep = estimate(model, toy_batches(), nn.functional.cross_entropy, epsilon=1e-3, steps=4, probes=1,
                   progress=False)
    a = rep.save(tmp_path / "l1_0.001_seed1")
    b = rep.save(tmp_path / "l1_0.001_seed2")
    assert [p.name for p in a] == ["l1_0.001_seed1.json", "l1_0.001_seed1.md"]
    assert [p.name for p in b] == ["l1_0.001_seed2.json", "l1_0.001_seed2.md"]
    assert [p.name for p in rep.save(tmp_path / "x.json")] == ["x.json", "x.md"]


def test_report_round_trip_markdown_and_plot(tmp_path):
    model = Toy()
    rep = estimate(model, toy_batches(), nn.functional.cross_entropy, epsilon=1e-3, steps=6, probes=2,
                   sweep=True, sparsities=[0.25, 0.5, 0.75], label="toy", progress=False)
    js, md = rep.save(tmp_path / "toy")
    back = LimitReport.load(js)
    assert back.to_dict() == rep.to_dict()
    text = md.read_text()
    assert "predicted limit" in text and "ε (loss tolerance)" in text and "given" in text
    rep.plot(tmp_path / "toy.png")
    assert (tmp_path / "toy.png").stat().st_size > 10_000


@pytest.mark.parametrize("kwargs, arg", [
    (dict(sweep=True, sparsities=[0.5, 1.0]), "sparsities"),
    (dict(sweep=True, sparsities=[0.0, 0.5]), "sparsities"),
    (dict(sweep=True, sparsities=[-0.1]), "sparsities"),
    (dict(sweep=True, sparsities=[]), "sparsities"),
    (dict(sparsities=[0.5]), "sparsities"),
    (dict(data=[]), "data"),
    (dict(data=None), "data"),
    (dict(loss_fn=None), "loss_fn"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(steps=0), "steps"),
    (dict(probes=0), "probes"),
    (dict(path_points=1), "path_points"),
    (dict(metric="f1"), "metric"),
    (dict(acc_tolerance=-0.1), "acc_tolerance"),
    (dict(sweep=True, eval_data=[]), "eval_data"),
    (dict(params=[]), "params"),
])
def test_bad_input_names_the_argument_and_changes_nothing(kwargs, arg):
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    call = dict(data=toy_batches(), loss_fn=nn.functional.cross_entropy, steps=4, probes=1, progress=False)
    call.update(kwargs)
    with pytest.raises(PruningInputError, match=arg):
        estimate(model, call.pop("data"), call.pop("loss_fn"), **call)
    assert state_equal(before, model.state_dict())


def test_accuracy_needs_integer_targets_of_the_logits_shape():
    """Float targets under metric='accuracy' are refused before the spectrum (they gave accuracy 0.0, so every
    sparsity 'passed'); per-token targets are counted per token (accuracy came out 5.0, counting tokens over
    samples)."""
    batches = toy_batches()
    floats = [(x, y.float()) for x, y in batches]
    with pytest.raises(PruningInputError, match="^eval_data"):
        estimate(Toy(), batches, nn.functional.cross_entropy, steps=4, probes=1, sweep=True, eval_data=floats,
                 progress=False)
    from obs_plugins.limit import _evaluate

    class PerToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x)                        # (B, T, classes)
    torch.manual_seed(0)
    m = PerToken()
    x = torch.randn(2, 5, 3)
    y = m(x).argmax(-1)
    y[0, :2] = (y[0, :2] + 1) % 4                     # 2 of the 10 tokens wrong
    curv = Curvature(m, [(m.lin, "weight")], [(x, y)],
                     loss_fn=lambda o, t: nn.functional.cross_entropy(o.reshape(-1, 4), t.reshape(-1)))
    acc, _ = _evaluate(curv, [(x, y)], None, True)
    assert acc == pytest.approx(0.8)


def test_default_epsilon_needs_two_batches():
    with pytest.raises(PruningInputError, match="epsilon"):
        estimate(Toy(), toy_batches(seeds=(0,)), nn.functional.cross_entropy, steps=4, progress=False)


@pytest.mark.real_model
def test_cli_limit_on_a_saved_model(tmp_path, capsys):
    from obs_plugins import data
    from obs_plugins.cli import main
    try:
        data.load_fashion_mnist("test")
    except data.AssetMissing as e:
        pytest.skip(f"asset not installable here: {e}")
    model = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    torch.save(model, tmp_path / "m.pt")
    rc = main(["limit", "--model", str(tmp_path / "m.pt"), "--steps", "4", "--probes", "1", "--hvp-samples", "300",
               "--batches", "3", "--step", "0.25", "--report", str(tmp_path / "r"), "--quiet", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "predicted limit" in out and "measured limit" in out
    rep = LimitReport.load(tmp_path / "r.json")
    assert rep.sweep["sparsity"] == [0.25, 0.5, 0.75] and rep.num_weights == 784 * 16 + 160
    assert rep.slq["samples"] == 300            # --hvp-samples is the count (it was rounded up to 512)
    assert (tmp_path / "r.png").exists()
