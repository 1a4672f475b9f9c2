"""OBS-IHT solver and the torch.nn.utils.prune adapter: known answers."""
import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import Curvature, OBSIHT, OBSIHTConfig, PruningInputError, api
from obs_plugins.curvature.linalg import inverse_factor, obs_solve
from obs_plugins.methods.obs_iht.solver import iht_quadratic, obs_sweep
from tiny import mse, regression_problem


def tiny_problem(seed=0, n=512):
    model, batches = regression_problem(seed, n)
    return model, [(model[0], "weight"), (model[2], "weight")], batches


def zeros(model):
    return [int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------- the paper's synthetic known answer
def test_iobs_beats_kiht_on_sparse_regression():
    g = torch.Generator().manual_seed(1)
    n, d, k_star, k = 256, 128, 16, 64
    cov = 0.8 ** (torch.arange(d)[:, None] - torch.arange(d)[None, :]).abs().double()  # correlated features
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    w_star = torch.zeros(d, dtype=torch.float64)
    w_star[torch.randperm(d, generator=g)[:k_star]] = torch.randn(k_star, generator=g, dtype=torch.float64)
    y = X @ w_star + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    H, b = X.T @ X / n, X.T @ y / n
    for iters in (5, 20):
        e_obs = (iht_quadratic(H, b, k, iters, method="obs") - w_star).norm()
        e_kiht = (iht_quadratic(H, b, k, iters, method="kiht") - w_star).norm()
        assert e_obs * 10 <= e_kiht, (iters, float(e_obs), float(e_kiht))


def test_obs_solve_equals_bruteforce_enumeration():
    """For every pruned set of a 1x8 row, the OBS solve equals float64 constrained least squares, and the
    best set by enumeration is what exhaustive OBS picks."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(20, 8, generator=g, dtype=torch.float64)
    H = A.T @ A / 20 + 0.1 * torch.eye(8, dtype=torch.float64)
    hinv = torch.linalg.inv(H)
    w = torch.randn(8, generator=g, dtype=torch.float64)
    best = None
    for P in itertools.combinations(range(8), 3):
        P = torch.tensor(P)
        K = torch.tensor([i for i in range(8) if i not in P.tolist()])
        w_new, loss = obs_solve(w, hinv, P)
        # brute force: minimise 1/2 (v - w)^T H (v - w) with v_P = 0 -> v_K = w_K + H_KK^-1 H_KP w_P
        v = torch.zeros(8, dtype=torch.float64)
        v[K] = w[K] + torch.linalg.solve(H[K][:, K], H[K][:, P] @ w[P])
        ref = 0.5 * (v - w) @ H @ (v - w)
        torch.testing.assert_close(w_new, v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        best = min(best or (float("inf"), None), (float(ref), tuple(P.tolist())))
    assert best[0] > 0


def test_sweep_predicted_loss_equals_measured_reconstruction_error():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2000, 32, generator=g, dtype=torch.float64) @ torch.randn(32, 32, generator=g, dtype=torch.float64)
    W = torch.randn(8, 32, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / X.shape[0]
    f = inverse_factor(H, 1e-10, dtype=torch.float64)
    Wn, keep, loss = obs_sweep(W, f.hinv_chol_upper, k=128, blocksize=8)
    assert int((~keep).sum()) == 128 and int((Wn == 0).sum()) >= 128
    measured = ((Wn - W) @ X.T).pow(2).sum() / X.shape[0]  # ||dW X||^2 / n = 1/2 sum_rows dw H dw^T
    torch.testing.assert_close(loss, measured, rtol=1e-6, atol=0)
    # and OBS beats magnitude pruning at the same count on correlated inputs (measured ratio 0.64)
    thr = W.abs().flatten().sort().values[127]
    Wm = torch.where(W.abs() > thr, W, torch.zeros_like(W))
    assert measured < 0.8 * ((Wm - W) @ X.T).pow(2).sum() / X.shape[0]


def test_sweep_fixed_mask_keeps_support_and_nm_pattern():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, 16, generator=g)
    W = torch.randn(6, 16, generator=g)
    f = inverse_factor(2 * X.T @ X / 300, 0.01)
    keep = torch.rand(6, 16, generator=g) > 0.5
    Wn, k2, _ = obs_sweep(W, f.hinv_chol_upper, keep=keep)
    assert torch.equal(k2, keep) and torch.all(Wn[~keep] == 0)
    # with a fixed support the projection is linear and leaves on-support weights unchanged (the IHT loop
    # relies on project(W - eta D) == W - eta project(D))
    D = torch.randn(6, 16, generator=g)
    torch.testing.assert_close(obs_sweep(Wn, f.hinv_chol_upper, keep=keep)[0], Wn, rtol=0, atol=1e-6)
    torch.testing.assert_close(obs_sweep(Wn - 0.3 * D, f.hinv_chol_upper, keep=keep)[0],
                               Wn - 0.3 * obs_sweep(D, f.hinv_chol_upper, keep=keep)[0], rtol=1e-5, atol=1e-5)
    Wn, k3, _ = obs_sweep(W, f.hinv_chol_upper, nm=(2, 4))
    assert torch.equal((~k3).reshape(6, 4, 4).sum(-1), torch.full((6, 4), 2))


# ---------------------------------------------------------------- torch.nn.utils.prune contract
def test_global_unstructured_exact_counts_and_update_in_orig():
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.7, curvature=curv, progress=False)
    assert zeros(model) == [round(0.7 * 512), round(0.7 * 128)]
    # the OBS update lives in weight_orig; the effective weight is orig * mask
    assert torch.equal(model[0].weight, model[0].weight_orig * model[0].weight_mask)
    prune.remove(model[0], "weight")
    prune.remove(model[2], "weight")
    assert zeros(model) == [358, 90] and not hasattr(model[0], "weight_orig")


def test_a_float64_model_is_pruned_in_float64():
    # the solver works in at least fp32, and keeps fp64 weights fp64: a plan from fp64 Grams equals the fp64 sweep
    # of the fp64 weights (rounding the weights to fp32 on the way, as before, is ~1e-8 off)
    model, params, batches = tiny_problem()
    model.double()
    batches = [(x.double(), y.double()) for x, y in batches]
    curv = Curvature.layerwise(model, params, batches, dtype=torch.float64, progress=False)
    plan = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.7)
    for t in curv.targets:
        e = plan.entries[t.key]
        assert e.new_weight.dtype == torch.float64
        U = inverse_factor(curv.hessians[t.key], 1e-2).hinv_chol_upper
        assert U.dtype == torch.float64
        ref, keep, _ = obs_sweep(t.current().detach(), U, k=int((~e.mask.bool()).sum()))
        assert torch.equal(keep, e.mask.bool())
        torch.testing.assert_close(e.new_weight, ref, rtol=1e-13, atol=1e-15)


def test_obs_beats_magnitude_on_the_model_loss():
    model, params, batches = tiny_problem()
    X, Y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    mag = copy.deepcopy(model)
    for m in (mag[0], mag[2]):
        prune.l1_unstructured(m, "weight", amount=0.7)
    curv = Curvature.layerwise(model, params, batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.7, curvature=curv, progress=False)
    assert zeros(model) == zeros(mag)
    with torch.no_grad():
        assert float(mse(model(X), Y)) < 0.95 * float(mse(mag(X), Y))


def test_int_amount_apply_and_second_round_keeps_old_zeros():
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    OBSIHT.apply(model[0], "weight", amount=100, curvature=curv)
    first = model[0].weight == 0
    assert int(first.sum()) == 100
    curv2 = Curvature.layerwise(model, params, batches, progress=False)  # re-calibrate the pruned model
    OBSIHT.apply(model[0], "weight", amount=0.5, curvature=curv2)
    second = model[0].weight == 0
    assert int(second.sum()) == 100 + round(0.5 * 412)
    assert torch.all(second[first])
    buf = io.BytesIO()
    torch.save(model, buf)  # the hook must not drag the curvature (model + data) along
    hooks = list(model[0]._forward_pre_hooks.values())
    assert all(getattr(m, "curvature", None) is None for h in hooks for m in getattr(h, "_pruning_methods", [h]))


def test_nm_through_global_unstructured():
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, nm="2:4", progress=False)
    for m in (model[0], model[2]):
        z = (m.weight == 0).reshape(m.weight.shape[0], -1, 4).sum(-1)
        assert torch.all(z == 2)


def test_iterations_improve_heldout_loss():
    model, params, batches = tiny_problem(n=1024)
    curv = Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)
    from obs_plugins.methods.obs_iht import solve
    plan = solve(curv, round(0.7 * 640), OBSIHTConfig(iterations=4, progress=False, step_sizes=(0.01, 0.03, 0.1)))
    hist = plan.report["history"]
    assert hist[0]["iteration"] == 1 and len(hist) >= 2
    best = min(h["holdout_loss"] for h in hist if h["iteration"] == 1 or h["accepted"])
    assert best < 0.97 * hist[0]["holdout_loss"]
    assert plan.report["best_iteration"] > 1
    # masks exact and the model untouched by planning
    assert sum(int((~e.mask).sum()) for e in plan.entries.values()) == round(0.7 * 640)
    assert not hasattr(model[0], "weight_mask")


def test_conv_and_hf_conv1d_layers():
    from transformers.pytorch_utils import Conv1D
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    c1 = Conv1D(12, 10)  # weight (in=10, out=12)
    for model, make in ((conv, lambda: torch.randn(4, 3, 8, 8)), (c1, lambda: torch.randn(4, 5, 10))):
        params = [(m, "weight") for m in model.modules() if hasattr(m, "weight") and m.weight is not None
                  and m.weight.dim() >= 2]
        curv = Curvature.layerwise(model, params, [make() for _ in range(4)], progress=False)
        total = sum(p[0].weight.numel() for p in params)
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)
        assert sum(int((p[0].weight == 0).sum()) for p in params) == round(0.5 * total)


@pytest.mark.parametrize("route", ["apply", "torch_ao"])
def test_hf_conv1d_through_apply_and_the_ao_sparsifier(route):
    """GPT-2's Conv1D on the two routes that hold its weight elsewhere while pruning (torch.nn.utils.prune's
    ``weight_orig``; torch.ao's ``ParametrizedConv1D``): the exact count, the same mask and weights as
    global_unstructured (both failed: an AttributeError, and 'Conv1D is not supported')."""
    from transformers.pytorch_utils import Conv1D
    from obs_plugins.integrations.torch_ao import OBSIHTSparsifier

    def make():
        torch.manual_seed(0)
        return nn.Sequential(Conv1D(12, 10))
    xs = [torch.randn(4, 5, 10, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ref = make()
    curv = Curvature.layerwise(ref, [(ref[0], "weight")], xs, progress=False)
    prune.global_unstructured([(ref[0], "weight")], pruning_method=OBSIHT, amount=0.5, curvature=curv,
                              progress=False)
    model = make()
    curv = Curvature.layerwise(model, [(model[0], "weight")], xs, progress=False)
    if route == "apply":
        OBSIHT.apply(model[0], "weight", amount=0.5, curvature=curv, progress=False)
    else:
        sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
        sp.prepare(model, [{"tensor_fqn": "0.weight"}])
        sp.step()
        sp.squash_mask()
    assert int((model[0].weight == 0).sum()) == 60
    assert torch.equal(model[0].weight == 0, ref[0].weight == 0)
    assert torch.allclose(model[0].weight, ref[0].weight, atol=1e-6)


# ---------------------------------------------------------------- bad input: clear error, model unchanged
@pytest.mark.parametrize("case", ["no_curvature", "amount_range", "amount_too_big", "wrong_order", "other_params",
                                  "unknown_kw", "global_without_loss", "fisher_without_fisher", "nm_amount"])
def test_bad_input_leaves_model_unchanged(case):
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    before = copy.deepcopy(model.state_dict())
    kw = dict(pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)
    ps = params
    match = {"no_curvature": "curvature", "amount_range": "amount", "amount_too_big": "amount",
             "wrong_order": "params", "other_params": "params", "unknown_kw": "unknown",
             "global_without_loss": "loss", "fisher_without_fisher": "Fisher",
             "nm_amount": "nm"}[case]
    if case == "no_curvature":
        kw.pop("curvature")
    elif case == "amount_range":
        kw["amount"] = 1.5
    elif case == "amount_too_big":
        kw["amount"] = 10_000
    elif case == "wrong_order":
        ps = params[::-1]
    elif case == "other_params":
        ps = params[:1]
    elif case == "unknown_kw":
        kw["iteratoins"] = 2
    elif case == "global_without_loss":
        kw["allocation"] = "global"
    elif case == "fisher_without_fisher":
        kw["allocation"] = "fisher"
    elif case == "nm_amount":
        kw["nm"] = "2:4"
        kw["amount"] = 0.7
    with pytest.raises(PruningInputError, match=match):
        prune.global_unstructured(ps, **kw)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not prune.is_pruned(model)


def test_apply_on_a_module_outside_the_curvature_is_rejected_and_restored():
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params[:1], batches, progress=False)
    before = model[2].weight.detach().clone()
    with pytest.raises(PruningInputError, match="not among"):
        OBSIHT.apply(model[2], "weight", amount=0.5, curvature=curv)
    assert torch.equal(model[2].weight, before) and not prune.is_pruned(model)


def test_iterations_need_a_loss():
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    with pytest.raises(PruningInputError, match="loss_fn"):
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, iterations=2)
    assert not prune.is_pruned(model)


def test_save_load_round_trip_keeps_masks_and_updates(tmp_path):
    model, params, batches = tiny_problem()
    X = torch.cat([b[0] for b in batches])
    curv = Curvature.layerwise(model, params, batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.6, curvature=curv, progress=False)
    ref = model(X).detach()
    # 1) still reparametrised: a fresh model needs the same (identity) pruning before load_state_dict
    torch.save(model.state_dict(), tmp_path / "masked.pt")
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    for m in (fresh[0], fresh[2]):
        prune.identity(m, "weight")
    fresh.load_state_dict(torch.load(tmp_path / "masked.pt"))
    torch.testing.assert_close(fresh(X), ref, rtol=0, atol=0)
    # 2) baked with prune.remove: a plain state dict with exact zeros
    for m, n in params:
        prune.remove(m, n)
    torch.save(model.state_dict(), tmp_path / "baked.pt")
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    plain.load_state_dict(torch.load(tmp_path / "baked.pt"))
    torch.testing.assert_close(plain(X), ref, rtol=0, atol=0)
    assert zeros(plain) == [round(0.6 * 512), round(0.6 * 128)]


def test_wanda_prunes_equally_per_output_row():
    from obs_plugins import WandaConfig, api
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    p = api.prune(WandaConfig(), curvature=curv, amount=0.5)
    for m in (model[0], model[2]):
        per_row = (m.weight == 0).sum(1)
        assert torch.all(per_row == m.weight.shape[1] // 2)
    assert abs(p.sparsity() - 0.5) < 1e-9


def test_fisher_allocation_follows_the_fisher_saliency_ranking():
    """allocation='fisher' (no layer cap): per-layer counts are exactly one ranking of the Fisher OBS saliencies."""
    from obs_plugins.curvature.fisher import obs_saliency
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)
    curv.collect_fisher(block_size=16, progress=False)
    flat = torch.cat([obs_saliency(curv, k).reshape(-1) for k in curv.keys])
    k = round(0.6 * flat.numel())
    chosen = torch.sort(flat, stable=True).indices[:k]
    expected = [int((chosen < 512).sum()), int((chosen >= 512).sum())]
    assert expected != [round(0.6 * 512), round(0.6 * 128)]  # differs from the uniform split
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.6, curvature=curv, allocation="fisher",
                              layer_max_sparsity=1.0, progress=False)
    assert zeros(model) == expected


@pytest.mark.parametrize("rows,d,prior", [(7, 20, False), (300, 136, True), (40, 257, True)])
def test_batched_block_solve_equals_the_column_loop(rows, d, prior):
    """The batched triangular solve of a block's errors (default for small layers and off the CPU) gives the
    column-by-column sweep's masks, weights (to rounding) and predicted loss, with and without prior masks."""
    from obs_plugins.curvature.linalg import inverse_factor
    from obs_plugins.methods.obs_iht.solver import obs_sweep
    g = torch.Generator().manual_seed(rows + d)
    X = torch.randn(3 * d, d, generator=g)
    U = inverse_factor(2 * X.t() @ X / (3 * d), 0.01).hinv_chol_upper
    W = torch.randn(rows, d, generator=g)
    keep_prior = torch.rand(rows, d, generator=g) > 0.3 if prior else None
    k = int(0.4 * rows * d)
    W_loop, keep_loop, loss_loop = obs_sweep(W, U, k=k, keep_prior=keep_prior, blocksize=64, batched=False)
    W_bat, keep_bat, loss_bat = obs_sweep(W, U, k=k, keep_prior=keep_prior, blocksize=64, batched=True)
    assert torch.equal(keep_loop, keep_bat)
    assert int((~keep_bat).sum()) == k + (0 if keep_prior is None else int((~keep_prior).sum()))
    torch.testing.assert_close(W_bat, W_loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_bat, loss_loop, rtol=1e-5, atol=1e-5)
    assert (W_bat[~keep_bat] == 0).all()
    Wp_loop = obs_sweep(W, U, keep=keep_loop, batched=False)[0]  # the projection (fixed support) too
    torch.testing.assert_close(obs_sweep(W, U, keep=keep_loop, batched=True)[0], Wp_loop, rtol=1e-5, atol=1e-5)


def test_layers_with_the_same_input_share_one_inverse_factor():
    """q/k/v (and gate/up) of a decoder block see the same input, so their Grams are equal and the sweep
    factors them once: 4 distinct factors per block of 7 weights, the same plan as factoring each."""
    from test_sequential import llama_problem
    from obs_plugins.methods.obs_iht import solve
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    plan = solve(curv, sum(p[0].weight.numel() for p in params) // 2,
                 OBSIHTConfig(progress=False))
    factors = plan.solver_state["factors"]
    for b in range(3):
        mine = [f for k, f in factors.items() if k.startswith(f"model.layers.{b}.")]
        assert len(mine) == 7 and len({id(f) for f in mine}) == 4
        q, kk, v = (factors[f"model.layers.{b}.self_attn.{n}_proj.weight"] for n in "qkv")
        assert q is kk is v
    for k, f in factors.items():  # each shared factor is the one of that layer's own Gram
        ref = inverse_factor(curv.hessians[k], 0.01)
        torch.testing.assert_close(f.hinv_chol_upper, ref.hinv_chol_upper)


@pytest.mark.parametrize("r_star,n_evals,best", [(0.02, 2, 0.02), (0.022, 2, 0.02), (0.012, 3, 0.012),
                                                 (0.03, 3, 0.03), (0.035, 3, 0.04), (0.007, 3, 0.007),
                                                 (0.06, 4, 0.06), (0.1, 5, 0.1), (0.0015, 5, 0.0015)])
def test_line_search_returns_the_minimiser_of_a_quadratic_loss(r_star, n_evals, best):
    """Along the step the loss is quadratic, f(r) = (r - r*)^2 + 1, f(0) known: the search brackets r* on the
    grid (0.01, 0.02, 0.04), extended by doubling / halving, and the parabola's vertex is r* itself; it is
    evaluated only when the bracket's best point is more than 20% away from it (counts worked out by hand, e.g.
    r* = 0.035: 0.02, 0.04, 0.08 bracket it, the vertex 0.035 is within 20% of 0.04, so 0.04 is taken)."""
    from obs_plugins.methods.obs_iht.solver import _line_search
    calls = []

    def f(r):
        calls.append(r)
        return (r - r_star) ** 2 + 1.0, r, None

    trials = _line_search(f, (0.01, 0.02, 0.04), 0.25, f0=(0.0 - r_star) ** 2 + 1.0)
    assert len(calls) == n_evals
    assert min(trials, key=lambda x: x[0])[1] == pytest.approx(best, rel=1e-9)
    assert calls[0] == 0.02 and all(r <= 0.25 for r in calls)


def test_line_search_two_evaluations_when_the_start_is_right():
    """r* = 0.02 is the start: 0.02 then 0.04 (worse) brackets it; the vertex is 0.02, not evaluated again."""
    from obs_plugins.methods.obs_iht.solver import _line_search
    seen = []

    def f(r):
        seen.append(r)
        return (r - 0.02) ** 2, r, None

    _line_search(f, (0.01, 0.02, 0.04), 0.25, f0=0.02 ** 2)
    assert seen == [0.02, 0.04]


def test_line_search_no_improving_step_stops_after_the_extension():
    """Every step is worse than f0: down through the grid, then halving ``extend`` times; nothing accepted."""
    from obs_plugins.methods.obs_iht.solver import _line_search
    seen = []

    def f(r):
        seen.append(r)
        return 1.0 + r, r, None

    trials = _line_search(f, (0.01, 0.02, 0.04), 0.25, f0=1.0, extend=3)
    assert seen == [0.02, 0.01, 0.005, 0.0025, 0.00125]
    assert all(t[0] > 1.0 for t in trials)


def test_line_search_single_point_grid_doubles_up_to_the_trust_region():
    from obs_plugins.methods.obs_iht.solver import _line_search
    seen = []

    def f(r):
        seen.append(r)
        return -r, r, None  # always better with a larger step: capped at max_step

    trials = _line_search(f, (25.0,), 50.0, f0=0.0)
    assert seen == [25.0, 50.0] and min(trials)[1] == 50.0


def test_parabola_vertex_known_answers():
    from obs_plugins.methods.obs_iht.solver import _vertex
    assert _vertex((0.0, 4.0), (1.0, 1.0), (3.0, 1.0)) == pytest.approx(2.0)  # (x-2)^2, exactly
    assert _vertex((0.0, 0.0), (1.0, 1.0), (2.0, 4.0)) == pytest.approx(0.0)  # x^2: vertex at the left end
    assert _vertex((0.0, 0.0), (1.0, -1.0), (2.0, -4.0)) is None  # concave


@pytest.mark.parametrize("rows,d,solve_block", [(5, 24, 16), (9, 40, 7), (3, 130, 16)])
def test_projection_on_a_fixed_support_is_the_textbook_left_to_right_obs(rows, d, solve_block):
    """The projection onto a fixed support (sub-blocks solved at once, the default) equals the textbook OBS sweep
    in float64, written without any Cholesky factor: column by column, a pruned weight is removed with the OBS
    update of the columns not yet visited, w_F <- w_F - w_i / [H_F^-1]_00 * [H_F^-1]_0,: with F = {i, ..., d-1}
    (SparseGPT's order; the columns already visited keep their values)."""
    from obs_plugins.curvature.linalg import damped, inverse_factor
    g = torch.Generator().manual_seed(rows * d)
    X = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    H = 2 * X.t() @ X / (2 * d)
    Z = torch.randn(rows, d, generator=g, dtype=torch.float64)
    keep = torch.rand(rows, d, generator=g) > 0.45
    U = inverse_factor(H, 0.01).hinv_chol_upper
    out, keep_out, _ = obs_sweep(Z, U, keep=keep, blocksize=32, solve_block=solve_block)
    Hd = damped(H, 0.01)
    ref = Z.clone()
    for i in range(d):
        hinv_f = torch.linalg.inv(Hd[i:, i:])
        pruned = ~keep[:, i]
        ref[pruned, i:] -= (ref[pruned, i] / hinv_f[0, 0]).unsqueeze(1) * hinv_f[0].unsqueeze(0)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(keep_out, keep) and (out[~keep] == 0).all()


@pytest.mark.parametrize("nm,blocksize", [((2, 4), 128), ((1, 4), 8), ((2, 4), 6)])
def test_batched_nm_sweep_equals_the_column_loop(nm, blocksize):
    """N:M (N of every M pruned) with each group of M columns solved at once gives the column loop's masks and
    weights; a blocksize that is not a multiple of M is rounded up to one (it used to split a group and crash)."""
    from obs_plugins.curvature.linalg import inverse_factor
    g = torch.Generator().manual_seed(7)
    X = torch.randn(96, 32, generator=g)
    U = inverse_factor(2 * X.t() @ X / 96, 0.01).hinv_chol_upper
    W = torch.randn(20, 32, generator=g)
    prior = torch.rand(20, 32, generator=g) > 0.2
    W_loop, keep_loop, loss_loop = obs_sweep(W, U, nm=nm, keep_prior=prior, blocksize=blocksize, batched=False)
    W_bat, keep_bat, loss_bat = obs_sweep(W, U, nm=nm, keep_prior=prior, blocksize=blocksize)
    assert torch.equal(keep_loop, keep_bat)
    assert (keep_bat.reshape(20, -1, nm[1]).sum(-1) <= nm[1] - nm[0]).all() and not (keep_bat & ~prior).any()
    torch.testing.assert_close(W_bat, W_loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_bat, loss_loop, rtol=1e-5, atol=1e-5)


def test_unit_step_caps_each_tensor_at_the_steps_relative_size():
    """Hand-computed: ||theta|| = 10 (tensors of norm 6 and 8), ||PD|| = 5 (4 and 3): eta = 10 / 5 = 2 per unit
    step; at rho = 0.1 tensor a would move 0.1 * 2 * 4 = 0.8 > 0.1 * 6, so its factor is cut to 6 / 4 = 1.5 (it
    moves 0.6); b would move 0.6 < 0.1 * 8: it keeps 2.  A tensor with no direction keeps eta."""
    from obs_plugins.methods.obs_iht.solver import unit_step
    w, pd = {"a": 6.0, "b": 8.0}, {"a": 4.0, "b": 3.0}
    assert unit_step(10.0, 5.0, w, pd, layer_trust=True) == pytest.approx({"a": 1.5, "b": 2.0})
    assert unit_step(10.0, 5.0, w, pd, layer_trust=False) == pytest.approx({"a": 2.0, "b": 2.0})
    assert unit_step(10.0, 5.0, w, {"a": 5.0, "b": 0.0}, True)["b"] == pytest.approx(2.0)


def test_layer_trust_must_be_a_bool():
    with pytest.raises(PruningInputError, match="layer_trust"):
        OBSIHTConfig(layer_trust="yes").validate()


@pytest.mark.parametrize("layer_trust", [True, False])
def test_no_tensor_moves_more_than_the_step_with_layer_trust(layer_trust):
    """An accepted IHT step moves every tensor by at most rho of its own norm under layer_trust (and the history
    names the tensors it cut); without it the step is one eta for all, so some tensor moves by more."""
    from test_allocation import classifier
    from obs_plugins import api
    model, params, batches = classifier()
    curv = Curvature.layerwise(model, params, batches, loss_fn=torch.nn.functional.cross_entropy, progress=False)
    p1 = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.7)
    p2 = api.plan(OBSIHTConfig(iterations=2, step_sizes=(0.02, 0.04, 0.08), layer_trust=layer_trust,
                               progress=False), curvature=curv, amount=0.7)
    h = p2.report["history"][1]
    assert h["accepted"], h
    rel = {k: float((p2.entries[k].new_weight - e.new_weight).norm() / e.new_weight.norm())
           for k, e in p1.entries.items()}
    if layer_trust:
        assert max(rel.values()) <= h["step_size"] * (1 + 1e-4)
        assert h["layers_clipped"] and all(rel[k] == pytest.approx(h["step_size"], rel=1e-3)
                                           for k in h["layers_clipped"])
    else:
        assert max(rel.values()) > h["step_size"] and h["layers_clipped"] == []


def test_grad_dtype_setting(monkeypatch):
    from obs_plugins import OBSIHTConfig
    from obs_plugins.errors import PruningInputError
    from obs_plugins.methods.obs_iht import solver
    with pytest.raises(PruningInputError, match="grad_dtype"):
        OBSIHTConfig(grad_dtype="fp16").validate()
    cpu = torch.device("cpu")
    assert solver.grad_dtype("float32", cpu) is None and solver.grad_dtype("bfloat16", cpu) is torch.bfloat16
    monkeypatch.setattr(solver, "native_bf16", lambda d: True)
    assert solver.grad_dtype("auto", cpu) is torch.bfloat16
    assert solver.grad_dtype("auto", cpu, torch.float16) is None  # only fp32 weights are autocast by "auto"
    monkeypatch.setattr(solver, "native_bf16", lambda d: False)
    assert solver.grad_dtype("auto", cpu) is None


@pytest.mark.parametrize("name,reported", [("float32", "model dtype"), ("bfloat16", "bfloat16")])
def test_plan_reports_the_gradient_dtype_it_used(name, reported, monkeypatch):
    from test_allocation import classifier
    from obs_plugins import api
    from obs_plugins.methods.obs_iht import solver
    seen = []
    real = Curvature.loss_and_grad

    def spy(self, *a, compute_dtype=None, **kw):
        seen.append(compute_dtype)
        return real(self, *a, compute_dtype=compute_dtype, **kw)

    monkeypatch.setattr(Curvature, "loss_and_grad", spy)
    model, params, batches = classifier()
    curv = Curvature.layerwise(model, params, batches, loss_fn=torch.nn.functional.cross_entropy, progress=False)
    p = api.plan(OBSIHTConfig(iterations=2, grad_dtype=name, progress=False), curvature=curv, amount=0.5)
    assert p.report["grad_dtype"] == reported
    assert seen and all(d is (None if name == "float32" else torch.bfloat16) for d in seen)


def test_grad_subsets_take_each_gradient_on_every_mth_batch_in_turn(monkeypatch):
    """grad_subsets=2 on 4 gradient batches: iterations 2, 3, 4 take their gradients on batches [0, 2], [1, 3],
    [0, 2]; and the iterations equal those of a curvature whose gradient split is just [0, 2] (same held-out
    batches, same T=1 plan and factors)."""
    from test_allocation import classifier
    from obs_plugins import api
    from obs_plugins.methods.obs_iht import solver
    model, params, batches = classifier()  # 6 batches: 4 for the gradient, the last 2 held out
    ce = torch.nn.functional.cross_entropy
    curv = Curvature.layerwise(model, params, batches, loss_fn=ce, progress=False)
    p1 = api.plan(OBSIHTConfig(progress=False), curvature=curv, amount=0.5)
    seen = []
    real = Curvature.loss_and_grad

    def spy(self, overrides=None, batches=None, **kw):
        seen.append([id(b[0]) for b in batches])
        return real(self, overrides, batches, **kw)

    monkeypatch.setattr(Curvature, "loss_and_grad", spy)
    cfg = dict(iterations=4, step_sizes=(0.001, 0.002, 0.004), max_step=0.01, progress=False)
    rot = solver.solve(curv, None, OBSIHTConfig(grad_subsets=2, **cfg), initial=p1)
    used = [[id(batches[i][0]) for i in ix] for ix in ([0, 2], [1, 3], [0, 2])]
    assert seen == used[:len(seen)] and len(seen) >= 2
    assert [h["grad_batches"] for h in rot.report["history"][1:]] == [2] * len(seen)

    seen.clear()
    half = Curvature.layerwise(model, params, [batches[i] for i in (0, 2, 4, 5)], loss_fn=ce, progress=False)
    one = solver.solve(half, None, OBSIHTConfig(holdout_fraction=0.5, **dict(cfg, iterations=2)), initial=p1)
    two = solver.solve(curv, None, OBSIHTConfig(grad_subsets=2, **dict(cfg, iterations=2)), initial=p1)
    assert seen == [used[0], used[0]]
    assert one.report["history"][1]["tried"] == two.report["history"][1]["tried"]
    for k in one.entries:
        assert torch.equal(one.entries[k].mask, two.entries[k].mask)
        torch.testing.assert_close(one.entries[k].new_weight, two.entries[k].new_weight, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, 5])
def test_grad_subsets_bad_values_are_refused_before_anything_changes(bad):
    from test_allocation import classifier
    from obs_plugins import api
    model, params, batches = classifier()  # 4 gradient batches: 5 subsets would leave one empty
    curv = Curvature.layerwise(model, params, batches, loss_fn=torch.nn.functional.cross_entropy, progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="grad_subsets"):
        api.prune(OBSIHTConfig(iterations=2, grad_subsets=bad, progress=False), curvature=curv, amount=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_step_with_a_nan_heldout_loss_is_never_chosen_or_accepted(monkeypatch):
    """min() over (loss, step) trials kept a NaN met first and `nan >= best` is False, so a step whose held-out
    loss was NaN was chosen and accepted; now the finite step is chosen, and a NaN-only search stops."""
    from obs_plugins.methods.obs_iht import solver as sv
    model, params, batches = tiny_problem(n=1024)
    curv = Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)

    def nan_first(f, grid, max_step, f0, **kw):
        a, b = f(grid[0]), f(grid[1])
        return [(float("nan"), a[1], a[2]), b]
    monkeypatch.setattr(sv, "_line_search", nan_first)
    cfg = OBSIHTConfig(iterations=2, progress=False, step_sizes=(0.01, 0.03, 0.1))
    h = sv.solve(curv, round(0.7 * 640), cfg).report["history"][1]
    assert h["step_size"] == pytest.approx(0.03) and math.isfinite(h["holdout_loss"])
    monkeypatch.setattr(sv, "_line_search", lambda f, grid, max_step, f0, **kw: [(float("nan"),) + f(grid[0])[1:]])
    plan = sv.solve(curv, round(0.7 * 640), cfg)
    assert plan.report["history"][1]["accepted"] is False and plan.report["best_iteration"] == 1


def test_solver_refuses_counts_it_cannot_prune():
    """A negative or too large k (obs_sweep) / per-tensor count (solve): refused naming it (a negative quota
    pruned almost everything; a count above the survivors pruned them all, silently)."""
    from obs_plugins.methods.obs_iht import solve
    from obs_plugins.methods.obs_iht.solver import obs_sweep
    W = torch.randn(3, 6, dtype=torch.float64)
    U = inverse_factor(torch.eye(6, dtype=torch.float64), 0.01).hinv_chol_upper
    for k in (-3, 19, 2.5):
        with pytest.raises(PruningInputError, match="^k: "):
            obs_sweep(W, U, k=k)
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    n0 = model[0].weight.numel()
    for bad in (-3, n0 + 1):
        with pytest.raises(PruningInputError, match="^counts: 0.weight"):
            solve(curv, None, OBSIHTConfig(progress=False), counts={"0.weight": bad, "2.weight": 2})


def test_a_holdout_that_leaves_no_gradient_batch_is_refused():
    model, params, batches = tiny_problem()
    curv = Curvature.layerwise(model, params, batches[:2], loss_fn=mse, progress=False)
    with pytest.raises(PruningInputError, match="^holdout_fraction"):
        api.plan(OBSIHTConfig(iterations=2, holdout_fraction=0.75, progress=False), curvature=curv, amount=0.5)


def test_dead_columns_are_cheap_to_prune_whatever_the_input_scale():
    """A column whose input is always 0: its weights cost only the damping to prune, so the choice no longer
    depends on the input scale (a unit diagonal priced them at ~w^2: all 4 kept at scale 0.01, 3 pruned at 100);
    here 3 of the 4 go (the fourth row has a live weight cheaper still), the same mask at every scale."""
    from obs_plugins.methods.obs_iht.solver import obs_sweep
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    X[:, 2] = 0
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    masks = []
    for scale in (0.01, 1.0, 100.0):
        H = 2 * (X * scale).T @ (X * scale) / 200
        _, keep, _ = obs_sweep(W, inverse_factor(H, 0.01).hinv_chol_upper, k=4)
        masks.append(keep)
    assert all(torch.equal(m, masks[0]) for m in masks) and int((~masks[0][:, 2]).sum()) == 3


def test_wanda_on_an_already_pruned_model_prunes_the_new_count():
    """Wanda read the prior masks inside the sequential calibration, where pruned tensors run with a unit mask, so a
    second call re-pruned the earlier zeros (4915 + 4915 asked, 4962 in the repro); now exactly the sum."""
    from obs_plugins import WandaConfig
    from obs_plugins.lm import causal_lm_batches, causal_lm_loss
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32, use_cache=False)).eval()
    batches = causal_lm_batches(torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(1)), 4)
    params = [(m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    total = sum(m.weight.numel() for m, _ in params)
    k = int(0.3 * total)
    for step in (1, 2):
        curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
        assert curv.sequential
        api.prune(WandaConfig(), curvature=curv, amount=k, reparametrize=True)
        assert sum(int((m.weight == 0).sum()) for m, _ in params) == step * k


def test_obs_sweep_refuses_a_partial_nm_group_and_works_in_fp32_for_a_half_factor():
    from obs_plugins.errors import PruningInputError
    torch.manual_seed(0)
    X = torch.randn(64, 6)
    U = inverse_factor(2 * X.T @ X / 64, 0.01).hinv_chol_upper
    with pytest.raises(PruningInputError, match="^nm: 2:4 needs the input width to be a multiple of 4, got 6"):
        obs_sweep(torch.randn(3, 6), U, nm=(2, 4))
    W = torch.randn(3, 6)
    for batched in (True, False):
        Wh, keep, loss = obs_sweep(W.half(), U.half(), k=9, batched=batched)
        ref, keep32, _ = obs_sweep(W.half().float(), U.half().float(), k=9, batched=batched)
        assert Wh.dtype == torch.float32 and loss.dtype == torch.float32 and torch.equal(keep, keep32)
        torch.testing.assert_close(Wh, ref)


def test_iterations_of_a_float64_model_stay_float64_and_tried_steps_keep_small_sizes():
    """The direction and its projection were cast to fp32 for an fp64 model; tiny steps collapsed to 0.0 keys."""
    from tiny import mse
    from tiny import regression_problem as problem
    from obs_plugins import api
    model, batches = problem()
    model = model.double()
    batches = [(x.double(), y.double()) for x, y in batches]
    params = [(model[0], "weight"), (model[2], "weight")]
    curv = Curvature.layerwise(model, params, batches, loss_fn=mse, dtype=torch.float64, progress=False)
    plan = api.plan(OBSIHTConfig(iterations=3, step_sizes=(1e-7, 2e-7, 4e-7), progress=False), curvature=curv,
                    amount=0.5)
    assert all(e.new_weight.dtype == torch.float64 for e in plan.entries.values())
    tried = plan.report["history"][1]["tried"]
    assert len(tried) >= 2 and all(r > 0 for r in tried)


def test_native_bf16_on_cuda_needs_bf16_tensor_cores(monkeypatch):
    """"auto" takes bf16 gradients only where bf16 is native: CUDA from compute capability 8 (Ampere) on, asked
    of the curvature's own device.  torch.cuda.is_bf16_supported() also says True on a V100 / T4, where bf16 is
    emulated (slower and less precise than fp32 there)."""
    from obs_plugins.methods.obs_iht import solver
    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (7, 0), 1: (8, 0)}[torch.device(device).index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert solver.native_bf16(torch.device("cuda", 0)) is False
    assert solver.native_bf16(torch.device("cuda", 1)) is True
    assert [torch.device(d).index for d in asked] == [0, 1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert solver.native_bf16(torch.device("cuda", 1)) is False
