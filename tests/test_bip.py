"""BiP: the implicit gradient against finite differences, exact top-k masks, channels, storage, torch.prune, save/load."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from obs_plugins import BiP, BiPConfig, BiPTrainer, Curvature, PruningInputError, get_method
from obs_plugins.methods.bip import implicit_gradient, plan_from_trainer


def mse(out, target):
    return ((out - target) ** 2).mean()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
                         nn.Linear(5, 3))


def data(n=6, in_shape=(6,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *in_shape, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def pairs(model):
    return [(m, "weight") for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def originals(model):
    return {n: p for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- the implicit gradient
def _toy(seed=0):
    """Two weight groups (3->4 tanh, 4->2), fixed (not pruned, not trained) biases, float64 MSE regression."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64))
            layer.bias.requires_grad_(False)
    X = torch.randn(32, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    return model, X, Y


def _loss_of_z(model, z, X, Y):
    """The toy's loss as a function of the flat effective weights z = (W1, W2)."""
    W1, W2 = z[:12].reshape(4, 3), z[12:].reshape(2, 4)
    return mse(torch.tanh(X @ W1.T + model[0].bias) @ W2.T + model[2].bias, Y)


def _solve_lower(model, m, theta0, X, Y, gamma):
    """theta*(m) = argmin_theta l(m * theta) + gamma/2 |theta|^2 by Newton's method (float64, |grad| < 1e-13)."""
    def obj(t):
        return _loss_of_z(model, m * t, X, Y) + 0.5 * gamma * (t * t).sum()
    th = theta0.clone()
    for _ in range(100):
        t = th.clone().requires_grad_(True)
        grad = torch.autograd.grad(obj(t), t)[0]
        if grad.norm() < 1e-13:
            return th
        th = th - torch.linalg.solve(torch.autograd.functional.hessian(obj, th), grad)
    raise AssertionError("Newton did not converge")


def _at_lower_optimum(gamma):
    model, X, Y = _toy()
    params = [(model[0], "weight"), (model[2], "weight")]
    bip = BiPTrainer(model, params, sparsity=0.25, gamma=gamma, progress=False)   # keeps 15 of 20 weights
    masks = bip.masks()
    m = torch.cat([masks["0.weight"].reshape(-1), masks["2.weight"].reshape(-1)]).double()
    stored = [model[0].parametrizations.weight.original, model[2].parametrizations.weight.original]
    theta = _solve_lower(model, m, torch.cat([p.detach().reshape(-1) for p in stored]), X, Y, gamma)
    with torch.no_grad():
        stored[0].copy_(theta[:12].reshape(4, 3))
        stored[1].copy_(theta[12:].reshape(2, 4))
    return model, X, Y, bip, m, theta


def _flat(g):
    return torch.cat([g["0.weight"].reshape(-1), g["2.weight"].reshape(-1)])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fd_implicit_gradient(model, m, theta, X, Y, gamma, eps=1e-5):
    """d/dm l(m * theta*(m)) by central differences, re-solving the lower level at m +- eps e_i."""
    def F_(mm):
        return _loss_of_z(model, mm * _solve_lower(model, mm, theta, X, Y, gamma), X, Y)
    return torch.stack([(F_(m + eps * e) - F_(m - eps * e)) / (2 * eps) for e in torch.eye(m.numel(),
                                                                                             dtype=m.dtype)])


def _exact_implicit_gradient(model, m, theta, X, Y, gamma):
    """The exact implicit gradient with the curvature engine's Hessian-vector products (see the test docstring)."""
    plain, _, _ = _toy()
    with torch.no_grad():   # a plain copy holding z = m * theta*, where H = d^2 l / dz^2 is taken
        plain[0].weight.copy_((m * theta)[:12].reshape(4, 3))
        plain[2].weight.copy_((m * theta)[12:].reshape(2, 4))
    curv = Curvature(plain, [(plain[0], "weight"), (plain[2], "weight")], [(X, Y)], loss_fn=mse)

    def H(v):
        return curv.flatten(curv.hvp(curv.unflatten(v))).double()
    z = (m * theta).clone().requires_grad_(True)
    gz = torch.autograd.grad(_loss_of_z(model, z, X, Y), z)[0]
    # v = (D_m H D_m + gamma I)^{-1} (m * gz), by conjugate gradients (SPD: gamma I dominates here)
    b = m * gz
    v = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    for _ in range(200):
        Ap = m * H(m * p) + gamma * p
        a = (r @ r) / (p @ Ap)
        v, r_new = v + a * p, r - a * Ap
        if r_new.norm() < 1e-12 * b.norm():
            break
        p, r = r_new + ((r_new @ r_new) / (r @ r)) * p, r_new
    return theta * gz - gz * v - theta * H(m * v)


def test_implicit_gradient_matches_finite_differences_of_the_bilevel_problem():
    """The reference, derived.  Lower level g(m, theta) = l(m * theta) + gamma/2 |theta|^2, theta*(m) its minimiser,
    F(m) = l(m * theta*(m)), z = m * theta, gz = grad_z l, H = grad_zz l (all at z* = m * theta*).

    * Finite differences: dF/dm_i = (F(m + eps e_i) - F(m - eps e_i)) / (2 eps), theta* re-solved by Newton each time.
    * Exact implicit gradient: stationarity m * gz + gamma theta = 0; differentiating it in m,
      diag(gz) + D_m H (D_theta + D_m dtheta/dm) + gamma dtheta/dm = 0, so
      dtheta/dm = -(D_m H D_m + gamma I)^{-1} (diag(gz) + D_m H D_theta), and with grad_m l = theta * gz,
      grad_theta l = m * gz:   dF/dm = theta * gz - (diag(gz) + D_theta H D_m) v,  v = (D_m H D_m + gamma I)^{-1} (m * gz).
      H v products come from ``Curvature.hvp``; this must equal the finite differences to ~1e-6.
    * BiP's estimate drops H (Hessian-free): dtheta/dm ~ -(1/gamma) diag(gz), so dF/dm ~ theta * gz - (1/gamma) gz * (m * gz),
      accurate when |H| << gamma.  At gamma = 30 it must land within 10% of the finite differences, while the
      first-order variant (theta * gz alone) must not (at theta*, theta * gz = -(1/gamma) m gz^2: it is half the answer).
    """
    for gamma in (3.0, 30.0):
        model, X, Y, bip, m, theta = _at_lower_optimum(gamma)
        fd = _fd_implicit_gradient(model, m, theta, X, Y, gamma)
        exact = _exact_implicit_gradient(model, m, theta, X, Y, gamma)
        assert _rel(exact, fd) < 1e-5, gamma   # the exact IFT reference (fp32 HVPs) agrees with finite differences
        if gamma == 30.0:
            _, g = bip.score_gradient((X, Y), mse)
            _, g1 = bip.score_gradient((X, Y), mse, implicit=False)
            assert _rel(_flat(g), fd) < 0.10
            assert _rel(_flat(g1), fd) > 0.40
            assert float(fd[m == 0].abs().max()) < 1e-8 and float(_flat(g)[m == 0].abs().max()) == 0.0


def test_implicit_gradient_formula_on_a_relaxed_mask():
    """The pure function, at a continuous mask: against finite differences with H ~ 0 (gamma large)."""
    model, X, Y = _toy()
    gamma = 200.0
    g = torch.Generator().manual_seed(3)
    m = 0.5 + 0.5 * torch.rand(20, generator=g, dtype=torch.float64)
    theta = _solve_lower(model, m, torch.zeros(20, dtype=torch.float64), X, Y, gamma)
    fd = _fd_implicit_gradient(model, m, theta, X, Y, gamma)
    z = (m * theta).clone().requires_grad_(True)
    gz = torch.autograd.grad(_loss_of_z(model, z, X, Y), z)[0]
    assert _rel(implicit_gradient(theta, m, gz, gamma), fd) < 0.02
    assert _rel(implicit_gradient(theta, m, gz, gamma, implicit=False), fd) > 0.4


def _linear_problem(implicit, gamma=2.0, **kw):
    """One Linear(4, 1) weight, loss = mean(output): grad_z l = mean(X) = c exactly, whatever z."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 1, bias=False).double()
    model = nn.Sequential(lin)
    bip = BiPTrainer(model, [(lin, "weight")], sparsity=0.5, gamma=gamma, implicit_gradient=implicit,
                     progress=False, **kw)
    X = torch.tensor([[1.0, -2.0, 3.0, 0.5], [3.0, 0.0, -1.0, 1.5]], dtype=torch.float64)
    return model, lin, bip, X, X.mean(0, keepdim=True)


def _mean_loss(model, batch):
    return model(batch).mean()


def test_first_order_flag_drops_exactly_the_implicit_term():
    gamma = 2.0
    _, lin, bip_ig, X, c = _linear_problem(True, gamma)
    _, _, bip_fo, _, _ = _linear_problem(False, gamma)
    theta = lin.parametrizations.weight.original.detach()
    m = bip_ig.masks()["0.weight"].double()
    assert int(m.sum()) == 2
    _, g_ig = bip_ig.score_gradient(X, batch_loss=_mean_loss)
    _, g_fo = bip_fo.score_gradient(X, batch_loss=_mean_loss)
    assert torch.allclose(g_fo["0.weight"], theta * c, rtol=0, atol=1e-14)
    assert torch.allclose(g_ig["0.weight"] - g_fo["0.weight"], -(m * c * c) / gamma, rtol=0, atol=1e-14)


def test_upper_step_uses_the_weights_after_the_lower_step():
    """Paper's Algorithm 1: theta_{t+1} = theta_t - lr grad_theta l, then the score step at theta_{t+1}."""
    gamma, lr, mask_lr = 2.0, 0.5, 0.1
    model, lin, bip, X, c = _linear_problem(True, gamma)
    theta0 = lin.parametrizations.weight.original.detach().clone()
    s0 = bip.scores["0.weight"].detach().clone()
    m = bip.masks()["0.weight"].double()
    opt = torch.optim.SGD(bip.param_groups(lr), lr=lr)
    mopt = torch.optim.SGD(bip.score_groups(mask_lr), lr=mask_lr)
    bip.step(X, X, opt, mopt, batch_loss=_mean_loss)
    theta1 = theta0 - lr * m * c
    assert torch.allclose(lin.parametrizations.weight.original.detach(), theta1, rtol=0, atol=1e-14)
    expected = s0 - mask_lr * (theta1 * c - m * c * c / gamma)
    assert torch.allclose(bip.scores["0.weight"].detach(), expected, rtol=0, atol=1e-14)
    stale = s0 - mask_lr * (theta0 * c - m * c * c / gamma)
    assert not torch.allclose(expected, stale)   # the two orders really differ on this problem
    assert bip.lower_steps == 1 and bip.upper_steps == 1 and bip.samples_forward_backward == 4


def test_straight_through_gradient_in_a_user_loop():
    """loss.backward() in a plain loop gives each score grad_m l = theta * grad_z l (dm/ds = 1)."""
    model, lin, bip, X, c = _linear_problem(True)
    _mean_loss(model, X).backward()
    theta = lin.parametrizations.weight.original.detach()
    assert torch.allclose(bip.scores["0.weight"].grad, theta * c, rtol=0, atol=1e-14)
    assert torch.allclose(lin.parametrizations.weight.original.grad, bip.masks()["0.weight"].double() * c,
                          rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------- masks and storage
def test_scores_are_a_copy_of_the_weight_magnitudes_never_an_alias():
    model = mlp()
    bip = BiPTrainer(model, pairs(model), sparsity=0.5, progress=False)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for t in bip.targets:
        s = bip.scores[t.key]
        assert s.untyped_storage().data_ptr() not in weights
        assert torch.equal(s.detach(), t.module.parametrizations.weight.original.detach().abs())
    assert not any(s is p for s in bip.parameters() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mopt = torch.optim.SGD(bip.score_groups(10.0), lr=10.0)
    bip.upper_step(data(1)[0], mopt, F.cross_entropy)   # a score step never moves a weight
    assert all(torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    assert not torch.equal(bip.scores["0.weight"].detach(), model[0].parametrizations.weight.original.detach().abs())
    with torch.no_grad():   # and a weight change never moves a score
        s = bip.scores["0.weight"].detach().clone()
        model[0].parametrizations.weight.original.mul_(3)
        assert torch.equal(s, bip.scores["0.weight"].detach())


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_mask_has_exactly_k_ones_every_step(allocation):
    model = mlp()
    bip = BiPTrainer(model, pairs(model), sparsity=0.7, allocation=allocation, mask_lr=5.0, progress=False)
    sizes = {t.key: t.orig().numel() for t in bip.targets}
    total = sum(sizes.values())
    opt = torch.optim.SGD(bip.param_groups(0.1), lr=0.1)
    mopt = torch.optim.SGD(bip.score_groups(), lr=5.0)
    changed, prev = 0, bip.masks()
    for b_lo, b_up in zip(data(10, seed=2), data(10, seed=3)):
        bip.step(b_lo, b_up, opt, mopt, F.cross_entropy)
        masks = bip.masks()
        if allocation == "global":
            assert sum(int(m.sum()) for m in masks.values()) == total - round(0.7 * total)
        else:
            assert all(int(masks[k].sum()) == n - round(0.7 * n) for k, n in sizes.items())
        for t in bip.targets:   # the model really runs with that mask
            assert torch.equal(t.module.weight == 0, ~masks[t.key] | (t.module.parametrizations.weight.original == 0))
        changed += sum(int((masks[k] != prev[k]).sum()) for k in masks)
        prev = masks
    assert changed > 0   # the scores did move the mask


def test_structured_masks_zero_whole_channels():
    model = cnn()
    params = pairs(model)[:2]   # conv (4 channels), fc1 (5 channels); the classifier is left alone
    bip = BiPTrainer(model, params, sparsity=0.5, granularity="channel", allocation="uniform", mask_lr=1.0,
                     progress=False)
    assert tuple(bip.scores["0.weight"].shape) == (4, 1, 1, 1) and tuple(bip.scores["3.weight"].shape) == (5, 1)
    w = model[0].parametrizations.weight.original.detach()
    assert torch.allclose(bip.scores["0.weight"].detach().reshape(-1), w.abs().mean(dim=(1, 2, 3)))
    batches = data(6, in_shape=(1, 6, 6))
    bip.fit(batches, F.cross_entropy, epochs=2, lr=0.1, finish=False)
    for key, layer, n in (("0.weight", model[0], 4), ("3.weight", model[3], 5)):
        keep = bip.masks()[key]
        rows = keep.reshape(n, -1)
        assert bool((rows.all(1) | ~rows.any(1)).all())   # whole channels
        assert int(rows.all(1).sum()) == n - round(0.5 * n)
        gone = ~rows.all(1)
        assert bool((layer.weight.reshape(n, -1)[gone] == 0).all()) and bool((layer.bias[gone] == 0).all())
        assert torch.equal(bip.bias_masks()[key], rows.all(1))
    x = batches[0][0]
    out = model[1](model[0](x))   # removed conv channels output exactly zero (weights and bias gated)
    assert bool((out[:, ~bip.masks()["0.weight"].reshape(4, -1).all(1)] == 0).all())
    bip.finish()
    plan = bip.make_plan()
    assert torch.equal(plan.entries["0.weight"].mask, bip.masks()["0.weight"])


# ---------------------------------------------------------------------------------------------- torch.nn.utils.prune
def _searched(model, **kw):
    bip = BiPTrainer(model, pairs(model), progress=False, **{"sparsity": 0.5, "mask_lr": 1.0, **kw})
    bip.fit(data(), F.cross_entropy, epochs=2, lr=0.1)
    return bip


def test_torch_prune_route_exact_counts_and_prior_zeros_stay():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.25)     # 18 prior zeros in the first layer
    prior = model[0].weight_mask.clone().bool()
    bip = _searched(model)
    assert not parametrize.is_parametrized(model[0]) and hasattr(model[0], "weight_orig")
    avail = int(prior.sum()) + model[2].weight.numel()
    prune.global_unstructured(pairs(model), pruning_method=BiP, amount=0.6, trainer=bip)
    zeros = int((model[0].weight == 0).sum()) + int((model[2].weight == 0).sum())
    assert zeros == (prior.numel() - int(prior.sum())) + round(0.6 * avail)
    assert bool((model[0].weight[~prior] == 0).all())


def test_torch_prune_apply_one_tensor_and_training_mask_plan():
    model = mlp()
    bip = _searched(model, sparsity=0.75)
    plan = bip.make_plan()
    total = sum(t.orig().numel() for t in bip.targets)
    assert 1 - plan.sparsity() == pytest.approx((total - round(0.75 * total)) / total)
    k = round(0.75 * total)
    same = bip.make_plan(k=k)
    assert all(torch.equal(same.entries[key].mask, plan.entries[key].mask) for key in plan.entries)
    assert same.report["training_mask_overlap"] == 1.0
    handled = get_method("bip").handler(bip, 7)
    assert sum(int((~e.mask).sum()) for e in handled.entries.values()) == 7
    BiP.apply(model[2], "weight", amount=10, trainer=bip)
    assert int((model[2].weight == 0).sum()) == 10


def test_bad_input_is_named_and_leaves_the_model_alone():
    model = mlp()
    w = model[0].weight.detach().clone()
    for kw, arg in (({"sparsity": 1.0}, "sparsity"), ({"gamma": 0.0}, "gamma"), ({"granularity": "row"}, "granularity"),
                    ({"lower_steps": 0}, "lower_steps"), ({"mask_lr": -1.0}, "mask_lr"), ({"banana": 1}, "banana")):
        with pytest.raises(PruningInputError, match=arg):
            BiPTrainer(model, pairs(model), **kw)
        assert not parametrize.is_parametrized(model[0]) and torch.equal(model[0].weight, w)
    bip = BiPTrainer(model, pairs(model), progress=False)
    with pytest.raises(PruningInputError, match="finish"):
        bip.make_plan(k=3)
    with pytest.raises(PruningInputError, match="params"):
        BiPTrainer(model, pairs(model))   # already gated by the first trainer
    bip.finish()
    with pytest.raises(PruningInputError, match="params"):   # a different order
        prune.global_unstructured(pairs(model)[::-1], pruning_method=BiP, amount=0.5, trainer=bip)
    assert not hasattr(model[0], "weight_mask") and torch.equal(model[0].weight, w)
    with pytest.raises(PruningInputError, match="config"):
        plan_from_trainer(bip, 3, BiPConfig(gamma=5.0))



def test_step_takes_a_dataloader_batch_list_as_one_batch():
    """A DataLoader over a TensorDataset yields ``[x, y]`` (a list): one (inputs, target) batch, not two batches;
    a list of such batches is still a list of batches."""
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)),
                        batch_size=8)
    lower, upper = list(loader)
    assert type(lower) is list and len(lower) == 2

    def one_step(lo, up):
        model = mlp()
        bip = BiPTrainer(model, pairs(model), sparsity=0.5, progress=False)
        opt = torch.optim.SGD(bip.param_groups(0.05), lr=0.05)
        mopt = torch.optim.SGD(bip.score_groups(), lr=0.1)
        losses = bip.step(lo, up, opt, mopt, loss_fn=F.cross_entropy)
        bip.finish()
        return bip, model, losses

    ref, ref_model, ref_losses = one_step(tuple(lower), tuple(upper))
    bip, model, losses = one_step(lower, upper)
    assert losses == ref_losses and bip.lower_steps == 1 and bip.samples_forward_backward == 16
    assert all(torch.equal(bip.scores[k], ref.scores[k]) for k in ref.scores)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    two, _, _ = one_step([lower, tuple(upper)], upper)   # a list of batches: two lower steps
    assert two.lower_steps == 2 and two.samples_forward_backward == 24


@pytest.mark.parametrize("bad", ["nan", "inf", "meta"])
def test_nan_inf_or_meta_weights_are_refused_naming_the_tensor(bad):
    from tiny import check_bad_weights_refused
    check_bad_weights_refused(bad, mlp, lambda m: BiPTrainer(m, pairs(m), sparsity=0.5, progress=False))


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_mid_search_continues_identically():
    def run(split):
        model = mlp()
        bip = BiPTrainer(model, pairs(model), sparsity=0.6, mask_lr=2.0, progress=False)
        opt = torch.optim.SGD(bip.param_groups(0.1), lr=0.1, momentum=0.9)
        mopt = torch.optim.SGD(bip.score_groups(), lr=2.0, momentum=0.9)
        bip.fit(data(), F.cross_entropy, epochs=1, optimizer=opt, mask_optimizer=mopt, finish=False)
        if split:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "bip": bip.state_dict(), "opt": opt.state_dict(),
                        "mopt": mopt.state_dict()}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            model = mlp(seed=5)   # different weights until loaded
            bip = BiPTrainer(model, pairs(model), sparsity=0.6, mask_lr=2.0, progress=False)
            model.load_state_dict(saved["model"])
            bip.load_state_dict(saved["bip"])
            opt = torch.optim.SGD(bip.param_groups(0.1), lr=0.1, momentum=0.9)
            mopt = torch.optim.SGD(bip.score_groups(), lr=2.0, momentum=0.9)
            opt.load_state_dict(saved["opt"])
            mopt.load_state_dict(saved["mopt"])
        bip.fit(data(), F.cross_entropy, epochs=1, optimizer=opt, mask_optimizer=mopt)
        return model, bip

    (m1, b1), (m2, b2) = run(False), run(True)
    assert all(torch.equal(b1.scores[k], b2.scores[k]) for k in b1.scores)
    assert all(torch.equal(b1.masks()[k], b2.masks()[k]) for k in b1.scores)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert b1.samples_forward_backward == b2.samples_forward_backward == 2 * 6 * 8
    assert b1.history == b2.history
    m3 = mlp()
    other = BiPTrainer(m3, pairs(m3), sparsity=0.5, progress=False)
    with pytest.raises(PruningInputError, match="config"):
        other.load_state_dict(b1.state_dict())


def test_score_gradient_of_a_layer_used_twice_is_the_formula_on_the_total_gradient():
    """A gated weight read twice in one forward: the paper's implicit term is quadratic in dloss/dz, so the two
    reads' gradients are summed before the formula (applying it per read lost the cross terms: ~18% off)."""
    from obs_plugins.methods.bip.trainer import implicit_gradient

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))
    torch.manual_seed(0)
    m = Reuse()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    bip = BiPTrainer(m, [(m.fc, "weight")], sparsity=0.5, gamma=0.5, progress=False)
    _, g = bip.score_gradient((x, y), F.cross_entropy)
    W, mask, b = m.fc.parametrizations.weight.original.detach(), bip._masks["fc.weight"], m.fc.bias.detach()
    z = (W * mask).clone().requires_grad_(True)
    loss = F.cross_entropy(m.out(torch.tanh(F.linear(torch.tanh(F.linear(x, z, b)), z, b))), y)
    gz, = torch.autograd.grad(loss, z)
    assert torch.allclose(g["fc.weight"], implicit_gradient(W, mask, gz, 0.5), atol=1e-7)


class _ReadsItsWeight(nn.Module):
    """fc1's weight is also read for its dtype (Hugging Face T5 does this): a read that plays no part in the loss."""

    def __init__(self, read: bool):
        super().__init__()
        self.read = read
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        if self.read:
            x = x.to(self.fc1.weight.dtype)
        return self.fc2(F.relu(self.fc1(x)))


def test_a_read_the_loss_does_not_use_adds_nothing_to_the_score_step():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    scores = []
    for read in (False, True):
        torch.manual_seed(0)
        m = _ReadsItsWeight(read)
        bip = BiPTrainer(m, [(m.fc1, "weight"), (m.fc2, "weight")], sparsity=0.5, progress=False)
        opt, mopt = torch.optim.SGD(bip.param_groups(0.1)), torch.optim.SGD(bip.score_groups())
        bip.step((X[:8], Y[:8]), (X[8:], Y[8:]), opt, mopt, loss_fn=F.cross_entropy)  # raised with the read
        scores.append({k: s.detach().clone() for k, s in bip.scores.items()})
    assert scores[0].keys() == scores[1].keys()
    assert all(torch.equal(scores[0][k], scores[1][k]) for k in scores[0])


def test_channel_mode_refuses_a_bias_listed_beside_its_weight():
    """With granularity='channel' (mask_bias) a layer's bias follows its weight's channel mask; listing the bias
    too stacked a second gate on it, zeroing kept channels' biases."""
    m = mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for params in ([(m[0], "weight"), (m[0], "bias")], [(m[0], "bias"), (m[0], "weight")]):
        with pytest.raises(PruningInputError, match="^params: .* already gated through"):
            BiPTrainer(m, params, sparsity=0.5, granularity="channel", progress=False)
        assert not parametrize.is_parametrized(m[0])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_make_plan_refuses_an_amount_given_as_the_targets():
    m = mlp()
    bip = BiPTrainer(m, pairs(m), sparsity=0.5, progress=False)
    bip.finish()
    with pytest.raises(PruningInputError, match="^targets: .* make_plan\\(amount=...\\)"):
        bip.make_plan(0.5)


def test_a_bf16_model_keeps_float32_scores_so_small_score_steps_are_not_rounded_away():
    """A typical score step is ~2e-4 of the score, below bf16's resolution (~4e-3): bf16 scores barely moved
    (60 of 2,304 after 20 steps, against 1,856 in fp32)."""
    import torch.nn.functional as F
    from obs_plugins import BiPTrainer
    moved = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(dtype)
        bip = BiPTrainer(model, [(model[0], "weight"), (model[2], "weight")], sparsity=0.5, mask_lr=0.1,
                         progress=False)
        assert all(s.dtype == torch.float32 for s in bip.scores.values())
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 32, generator=g).to(dtype), torch.randint(0, 4, (64,), generator=g)
        s0 = {k: s.detach().clone() for k, s in bip.scores.items()}
        wopt, mopt = torch.optim.SGD(bip.param_groups(lr=0.0)), torch.optim.SGD(bip.score_groups())
        for _ in range(5):
            bip.step((x, y), (x, y), wopt, mopt, loss_fn=F.cross_entropy)
        moved[dtype] = sum(int((bip.scores[k].detach() != s0[k]).sum()) for k in s0) / sum(
            s.numel() for s in s0.values())
    assert moved[torch.float32] > 0.5 and moved[torch.bfloat16] > 0.5
