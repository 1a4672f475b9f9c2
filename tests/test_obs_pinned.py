"""Known answers for OBS-solver behaviours that mutation testing found unpinned: the IHT direction, the sweep's
mask choice, prior zeros in N:M / layer bounds / OWL, count rounding, Wanda's score, structured column removal,
the config values the iterations read, plan validation and factor reuse.

Every expected value is computed here by brute force in float64 or by hand (textbook OBS on explicit inverses,
plain autograd, sorted lists), never by the function under test."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import Curvature, MagnitudeConfig, OBSIHTConfig, PruningInputError, WandaConfig, api
from obs_plugins.masks import PrunePlan, allocate_proportional, allocate_uniform, nm_mask, parse_nm
from obs_plugins.methods.obs_iht import solve
from obs_plugins.methods.obs_iht import solver as solver_mod
from obs_plugins.methods.obs_iht.allocation import global_saliency, layer_bounds
from obs_plugins.methods.obs_iht.solver import SharedFactors, _block_quotas, _line_search, obs_sweep
from obs_plugins.methods.obs_iht.structured import channel_columns, column_saliency, remove_columns
from obs_plugins.targets import resolve_targets
from tiny import Block, mse, regression_problem


# ---------------------------------------------------------------- references written without library code
def damped_ref(H, rel_damp):
    """``H + rel_damp * mean(live diag H) * I`` in float64 (the documented damping)."""
    H = H.double()
    d = torch.diagonal(H)
    return H + rel_damp * d[d > 0].mean() * torch.eye(H.shape[0], dtype=torch.float64)


def textbook_project(Z, Hd, keep):
    """Left-to-right OBS on a fixed support with explicit inverses: column ``i`` pruned in row ``r`` moves the
    later columns by ``-z_ri / [F^-1]_00 * [F^-1]_0:`` with ``F = Hd[i:, i:]``; pruned entries end at 0."""
    Z = Z.double().clone()
    for i in range(Z.shape[1]):
        hf = torch.linalg.inv(Hd[i:, i:])
        pr = ~keep[:, i]
        Z[pr, i:] -= (Z[pr, i] / hf[0, 0]).unsqueeze(1) * hf[0].unsqueeze(0)
    Z[~keep] = 0
    return Z


def upper_factor(Hd):
    """Upper Cholesky factor ``U`` of ``Hd^-1 = U^T U`` (float64, explicit inverse)."""
    return torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)


def sweep_problem(d=16, rows=6, seed=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, d, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, d, dtype=torch.float64)
    H = 2 * X.t() @ X / 64
    W = torch.randn(rows, d, generator=g, dtype=torch.float64)
    return g, H, W


def mlp_params(model):
    return [(model[0], "weight"), (model[2], "weight")]


# ---------------------------------------------------------------- 1. the IHT direction
def test_iht_step_moves_along_projected_newton_direction():
    """An accepted step (layer_trust=False: one eta for all tensors) is parallel to -project(G (H + lambda I)^-1),
    G the autograd gradient of the mean loss on the gradient split, project the textbook fixed-support OBS."""
    model, batches = regression_problem(0, 1024)
    model = model.double()
    batches = [(x.double(), y.double()) for x, y in batches]
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    cfg = dict(progress=False, step_sizes=(0.01, 0.03, 0.1), layer_trust=False)
    p1 = solve(curv, round(0.7 * 640), OBSIHTConfig(**cfg))
    p2 = solve(curv, None, OBSIHTConfig(iterations=2, **cfg), initial=p1)
    assert p2.report["history"][1]["accepted"]
    assert set(p2.report["rel_damp_used"].values()) == {0.01}
    keys = [t.key for t in curv.targets]
    W1 = {k: p1.entries[k].new_weight for k in keys}
    m = copy.deepcopy(model)
    for mod, k in zip((m[0], m[2]), keys):
        mod.weight.data.copy_(W1[k])
    n_hold = round(0.25 * len(batches))   # holdout_fraction 0.25 of 16 batches: the last 4 are held out
    X = torch.cat([b[0] for b in batches[:-n_hold]])
    Y = torch.cat([b[1] for b in batches[:-n_hold]])
    G = dict(zip(keys, torch.autograd.grad(mse(m(X), Y), [m[0].weight, m[2].weight])))
    exp, got = [], []
    for k in keys:
        Hd = damped_ref(curv.hessians[k], 0.01)
        keep = p1.entries[k].mask
        exp.append(textbook_project(G[k].double() @ torch.linalg.inv(Hd), Hd, keep).flatten())
        got.append((W1[k] - p2.entries[k].new_weight).double().flatten())
        assert (p2.entries[k].new_weight[~keep] == 0).all()
    e, g = torch.cat(exp), torch.cat(got)
    assert float(e @ g / (e.norm() * g.norm())) > 1 - 1e-8


# ---------------------------------------------------------------- 2. the sweep's mask choice
def test_sweep_unstructured_mask_is_lowest_obs_saliency():
    # one block: the k entries with the lowest w^2 / c_j, c_j = [inv(Hd[j:, j:])]_00, ties by position
    _, H, W = sweep_problem()
    Hd = damped_ref(H, 0.01)
    d = H.shape[0]
    c = torch.stack([torch.linalg.inv(Hd[j:, j:])[0, 0] for j in range(d)])
    k = 40
    Wn, keep, _ = obs_sweep(W, upper_factor(Hd), k=k, blocksize=d)
    ref = torch.ones(W.numel(), dtype=torch.bool)
    ref[torch.sort((W ** 2 / c).reshape(-1), stable=True).indices[:k]] = False
    assert torch.equal(keep.reshape(-1), ref)
    assert (Wn[~keep] == 0).all()
    torch.testing.assert_close(Wn, textbook_project(W, Hd, keep), rtol=1e-9, atol=1e-9)


def test_sweep_nm_with_prior_zeros_matches_textbook_loop():
    # each group is chosen on the weights updated so far; prior zeros count towards a group's N
    g, H, W = sweep_problem()
    Hd = damped_ref(H, 0.01)
    rows, d = W.shape
    n, m = 2, 4
    c = torch.stack([torch.linalg.inv(Hd[j:, j:])[0, 0] for j in range(d)])
    prior = torch.rand(rows, d, generator=g) > 0.15
    Wp = W * prior
    Wn, keep, _ = obs_sweep(Wp, upper_factor(Hd), nm=(n, m), keep_prior=prior, blocksize=d)
    ref_w, ref_k = Wp.clone(), prior.clone()
    for g0 in range(0, d, m):
        s = (ref_w[:, g0:g0 + m] ** 2 / c[g0:g0 + m]).masked_fill(~prior[:, g0:g0 + m], -float("inf"))
        idx = torch.sort(s, dim=1, stable=True).indices[:, :n]
        ref_k[:, g0:g0 + m] = torch.ones(rows, m, dtype=torch.bool).scatter_(1, idx, False) & prior[:, g0:g0 + m]
        for i in range(g0, g0 + m):
            hf = torch.linalg.inv(Hd[i:, i:])
            pr = ~ref_k[:, i]
            ref_w[pr, i:] -= (ref_w[pr, i] / hf[0, 0]).unsqueeze(1) * hf[0].unsqueeze(0)
    ref_w[~ref_k] = 0
    assert torch.equal(keep, ref_k)
    zeros = (~keep).reshape(rows, -1, m).sum(-1)
    assert torch.equal(zeros, torch.clamp((~prior).reshape(rows, -1, m).sum(-1), min=n))
    torch.testing.assert_close(Wn, ref_w, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- 3. nm_mask counts prior zeros
def test_nm_mask_counts_prior_zeros_towards_n():
    scores = torch.tensor([[5.0, 1, 2, 3, 4, 6, 7, 8]])
    prior = torch.ones(1, 8, dtype=torch.bool)
    prior[0, 0] = False
    keep = nm_mask(scores, 2, 4, prior)
    assert keep.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]


# ---------------------------------------------------------------- 4. the plan reads the effective weight
def test_obs_plan_depends_on_effective_weight_not_stale_orig():
    """A second round after torch's l1_unstructured: the stale values torch keeps in weight_orig under the mask
    must not matter (same effective weights and masks -> same plan)."""
    model, batches = regression_problem(0, 512)
    clean = copy.deepcopy(model)
    for mdl in (model, clean):
        for mod in (mdl[0], mdl[2]):
            prune.l1_unstructured(mod, "weight", amount=0.3)
    with torch.no_grad():
        for mod in (clean[0], clean[2]):
            mod.weight_orig.mul_(mod.weight_mask)
    plans = []
    for mdl in (model, clean):
        curv = Curvature.layerwise(mdl, mlp_params(mdl), batches, loss_fn=mse, progress=False)
        plans.append(api.plan(OBSIHTConfig(progress=False), curvature=curv, amount=0.5))
    for k, e in plans[0].entries.items():
        assert torch.equal(e.mask, plans[1].entries[k].mask), k
        torch.testing.assert_close(e.new_weight, plans[1].entries[k].new_weight)


# ---------------------------------------------------------------- 5. Hugging Face Conv1D is the transposed Linear
def test_hf_conv1d_plan_is_the_transposed_linear_plan():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    c1 = Conv1D(12, 10)
    lin = nn.Linear(10, 12)
    with torch.no_grad():
        lin.weight.copy_(c1.weight.t())
        lin.bias.copy_(c1.bias)
    xs = [torch.randn(4, 5, 10, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = OBSIHTConfig(progress=False)
    pc = api.plan(cfg, curvature=Curvature.layerwise(c1, [(c1, "weight")], xs, progress=False), amount=0.5)
    pl = api.plan(cfg, curvature=Curvature.layerwise(lin, [(lin, "weight")], xs, progress=False), amount=0.5)
    ec, el = next(iter(pc.entries.values())), next(iter(pl.entries.values()))
    assert ec.mask.shape == (10, 12)
    assert torch.equal(ec.mask, el.mask.t())
    torch.testing.assert_close(ec.new_weight, el.new_weight.t(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 6. global allocation's saliency
def test_global_saliency_is_sigma_w2_over_damped_inverse_diagonal():
    lin = nn.Linear(5, 3).double()
    model = nn.Sequential(lin)
    batches = [(torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)) for _ in range(3)]
    curv = Curvature.layerwise(model, [(lin, "weight")], batches, loss_fn=mse, progress=False)
    sens = torch.zeros(3, dtype=torch.float64)   # sigma_i: mean over batches of sum_rows (d mse / d y_i)^2
    for x, y in batches:
        out = x @ lin.weight.T + lin.bias
        sens += ((2 * (out - y) / out.numel()) ** 2).sum(0).detach()
    sens /= len(batches)
    X = torch.cat([x for x, _ in batches])
    H = 2 * X.T @ X / X.shape[0]
    hinv_diag = torch.diagonal(torch.linalg.inv(damped_ref(H, 0.01)))
    expected = sens.unsqueeze(1) * lin.weight.detach() ** 2 / hinv_diag
    got = global_saliency(curv, curv.targets, {"0.weight": lin.weight.detach()}, 0.01)["0.weight"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- 7. continuing from a plan without new weights
def test_continuing_from_magnitude_plan_starts_at_masked_weights():
    model, batches = regression_problem(0, 512)
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    mag = api.plan(MagnitudeConfig(), curvature=curv, amount=0.5)
    assert all(e.new_weight is None for e in mag.entries.values())
    p = solve(curv, None, OBSIHTConfig(iterations=2, progress=False), initial=mag)
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod, e in zip((m[0], m[2]), mag.entries.values()):
            mod.weight.mul_(e.mask)
    hold = batches[-round(0.25 * len(batches)):]
    X, Y = torch.cat([b[0] for b in hold]), torch.cat([b[1] for b in hold])
    with torch.no_grad():
        expected = float(((m(X) - Y) ** 2).double().mean())
    assert p.report["history"][0]["holdout_loss"] == pytest.approx(expected, rel=1e-5)
    for k, e in p.entries.items():
        assert torch.equal(e.mask, mag.entries[k].mask)
        assert (e.new_weight[~e.mask] == 0).all()


# ---------------------------------------------------------------- 8. config values the iterations read
def test_max_step_caps_every_tried_step():
    model, batches = regression_problem(0, 512)
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    p = solve(curv, 400, OBSIHTConfig(iterations=2, max_step=0.015, progress=False))
    tried = list(p.report["history"][1]["tried"])
    assert tried and max(tried) <= 0.015
    for e in p.entries.values():
        assert (e.new_weight[~e.mask] == 0).all()


def test_step_grid_recentres_on_last_step_times_step_decay(monkeypatch):
    grids = []

    def recording(f, grid, max_step, f0, **kw):
        grids.append(list(grid))
        return _line_search(f, grid, max_step, f0, **kw)

    monkeypatch.setattr(solver_mod, "_line_search", recording)
    model, batches = regression_problem(0, 512)
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    steps, decay = (0.01, 0.02, 0.04), 0.3
    p = solve(curv, 400, OBSIHTConfig(iterations=3, step_sizes=steps, step_decay=decay, progress=False))
    h = p.report["history"]
    assert h[1]["accepted"] and len(grids) == 2
    assert grids[0] == pytest.approx(list(steps))
    rho = h[1]["step_size"]
    assert grids[1] == pytest.approx([r * rho / steps[1] * decay for r in steps], rel=1e-12)


def test_step_with_equal_holdout_loss_is_not_accepted(monkeypatch):
    # a flat held-out loss: no step improves it, so the search only moves down and nothing is accepted
    model, batches = regression_problem(0, 512)
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    p1 = solve(curv, 400, OBSIHTConfig(progress=False))
    monkeypatch.setattr(curv, "loss", lambda overrides=None, batches=None, **kw: 1.0)
    p = solve(curv, None, OBSIHTConfig(iterations=3, progress=False), initial=p1)
    h = p.report["history"]
    assert len(h) == 2 and h[1]["accepted"] is False and p.report["best_iteration"] == 1
    assert max(h[1]["tried"]) <= 0.02
    for k, e in p.entries.items():
        assert torch.equal(e.new_weight, p1.entries[k].new_weight)


def test_line_search_on_flat_loss_only_moves_down():
    # start at the grid's middle (0.02); it does not beat f0, so: 0.01, then halving 3 times; never up
    tried = _line_search(lambda r: (1.0, r, None), [0.01, 0.02, 0.04], 0.25, f0=1.0)
    assert sorted(r for _, r, _ in tried) == [0.00125, 0.0025, 0.005, 0.01, 0.02]


# ---------------------------------------------------------------- 9. config validation and documented defaults
def test_unknown_allocation_is_refused():
    with pytest.raises(PruningInputError, match="^allocation"):
        OBSIHTConfig(allocation="uniformm").validate()


def test_obs_iht_defaults_match_readme():
    # README: "no step moves the weights by more than `max_step` (0.25)", "(`layer_trust`, the default)"
    cfg = OBSIHTConfig()
    assert cfg.layer_trust is True and cfg.max_step == 0.25


def test_nm_with_n_equal_m_is_refused():
    for bad in ("4:4", (4, 4)):
        with pytest.raises(PruningInputError, match="^nm"):
            parse_nm(bad)


def test_grouped_conv2d_is_refused():
    with pytest.raises(PruningInputError, match="grouped"):
        resolve_targets(None, [(nn.Conv2d(4, 4, 3, groups=2), "weight")])


# ---------------------------------------------------------------- 10. prior zeros in per-layer bounds and OWL
def test_layer_bounds_count_prior_zeros():
    prior = torch.ones(10, dtype=torch.bool)
    prior[:3] = False   # 30% already pruned: 40% needs 1 more, 50% allows 2 more
    lo, hi, _ = layer_bounds({"a": prior}, 1, 0.4, 0.5)
    assert lo == {"a": 1} and hi == {"a": 2}


def test_layer_bounds_cap_survives_float_rounding():
    # 0.29 * 100 is 28.999999999999996 in floating point; the cap is 29 weights
    _, hi, _ = layer_bounds({"a": torch.ones(100, dtype=torch.bool)}, 20, 0.0, 0.29)
    assert hi == {"a": 29}


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(10), Block(10)])

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


def test_owl_block_sparsity_counts_prior_zeros():
    """owl_lambda=0: every block gets the overall sparsity s; a tensor with 30 prior zeros of 100 and one with
    none, 40 new prunes: s = 70 / 200, so both end at 35 zeros (5 and 35 new)."""
    model = _Stack()
    mask = torch.ones(10, 10)
    mask.view(-1)[torch.randperm(100)[:30]] = 0
    prune.custom_from_mask(model.layers[0].fc, "weight", mask)
    params = [(model.layers[0].fc, "weight"), (model.layers[1].fc, "weight")]
    xs = [torch.randn(16, 10) for _ in range(4)]
    curv = Curvature.layerwise(model, params, xs, progress=False)
    p = api.plan(OBSIHTConfig(allocation="owl", owl_lambda=0.0, progress=False), curvature=curv, amount=40)
    assert [int((~e.mask).sum()) for e in p.entries.values()] == [35, 35]


# ---------------------------------------------------------------- 11. count rounding
def test_block_quotas_follow_block_survivors():
    prior = torch.ones(1, 16, dtype=torch.bool)
    prior[0, 2:8] = False   # survivors per block of 8: [2, 8]; 5 new prunes -> round(1.0), round(5.0) - 1
    assert _block_quotas(prior, 5, 8) == [1, 4]


def test_counts_use_cumulative_rounding_not_floor():
    # three tensors of 3, k=2: cumulative targets round(2/3)=1, round(4/3)=1, 2 -> [1, 0, 1]
    prior = {k: torch.ones(3, dtype=torch.bool) for k in "abc"}
    assert allocate_uniform(prior, 2) == {"a": 1, "b": 0, "c": 1}
    assert allocate_proportional({"a": 1.0, "b": 1.0, "c": 1.0}, prior, 2) == {"a": 1, "b": 0, "c": 1}
    assert _block_quotas(torch.ones(1, 9, dtype=torch.bool), 2, 3) == [1, 0, 1]


# ---------------------------------------------------------------- 12. Wanda's score
def test_wanda_mask_is_per_row_lowest_abs_w_times_input_norm():
    lin = nn.Linear(8, 6)
    scale = torch.logspace(-1, 1, 8)
    xs = [torch.randn(16, 8) * scale for _ in range(3)]
    curv = Curvature.layerwise(lin, [(lin, "weight")], xs, progress=False)
    p = api.plan(WandaConfig(), curvature=curv, amount=0.5)
    X = torch.cat(xs).double()
    score = lin.weight.detach().double().abs() * X.norm(dim=0)
    ref = torch.ones(6, 8, dtype=torch.bool)
    for r in range(6):
        ref[r, torch.sort(score[r], stable=True).indices[:4]] = False
    assert torch.equal(next(iter(p.entries.values())).mask, ref)


# ---------------------------------------------------------------- 13. structured column removal
def test_remove_columns_zeroes_them_and_reports_measured_loss():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = 2 * X.T @ X / 200
    W = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for comp in (False, True):
        new, loss = remove_columns(W, H, torch.tensor([1, 3]), compensate=comp, rel_damp=1e-12)
        assert (new[:, [1, 3]] == 0).all(), comp
        measured = float(((new - W) @ X.T).pow(2).sum() / 200)   # ||dW X||^2 / n
        assert loss == pytest.approx(measured, rel=1e-9), comp


def test_channel_columns_are_consecutive_blocks_of_width():
    assert [c.tolist() for c in channel_columns([1, 3], 4)] == [[4, 5, 6, 7], [12, 13, 14, 15]]


def test_column_saliency_refuses_negative_row_weights():
    W, H = torch.randn(4, 6), torch.eye(6)
    with pytest.raises(PruningInputError, match="^row_weights"):
        column_saliency(W, H, [[0]], row_weights=-torch.ones(4))


# ---------------------------------------------------------------- 14. bad input and the api helpers
def test_plan_refuses_nonfinite_weights_and_wrong_mask_shape():
    lin = nn.Linear(4, 3)
    t = resolve_targets(None, [(lin, "weight")])[0]
    plan = PrunePlan()
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(FloatingPointError):
        plan.add(t, torch.ones(3, 4, dtype=torch.bool), bad)
    with pytest.raises(ValueError, match="mask shape"):
        plan.add(t, torch.ones(4, 3, dtype=torch.bool))
    assert not plan.entries


def test_api_plan_refuses_learned_method():
    from obs_plugins.methods.continuous_sparsification import CSConfig
    lin = nn.Linear(4, 3)
    with pytest.raises(PruningInputError, match="learned"):
        api.plan(CSConfig(), targets=[(lin, "weight")], amount=0.5)


def test_solve_refuses_counts_for_other_keys():
    model, batches = regression_problem(0, 128)
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    with pytest.raises(PruningInputError, match="^counts: expected one count per target"):
        solve(curv, None, OBSIHTConfig(progress=False), counts={"0.weight": 10})


def test_allocate_uniform_refuses_count_out_of_range():
    prior = {"a": torch.ones(3, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}
    for k in (-1, 6):
        with pytest.raises(PruningInputError, match="^amount"):
            allocate_uniform(prior, k)


def test_snapshot_is_a_copy_that_restore_brings_back():
    model, _ = regression_problem(0, 64)
    targets = resolve_targets(model, ["0", "2"])
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    snap = api.snapshot(targets)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[2].weight.mul_(0.0)
    api.restore(targets, snap)
    assert all(torch.equal(m.weight, b) for m, b in zip((model[0], model[2]), before))


# ---------------------------------------------------------------- 15. inverse factors: sharing, reuse, precision
def test_shared_factors_tell_apart_grams_with_equal_fingerprint():
    # H2 differs from H1 off the diagonal outside row 0: same trace, same row-0 sum
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    H1 = 2 * X.T @ X / 200 + torch.eye(5, dtype=torch.float64)
    H2 = H1.clone()
    H2[1, 2] += 0.3
    H2[2, 1] += 0.3
    sf = SharedFactors(0.01)
    f1, f2 = sf.get(H1), sf.get(H2)
    torch.testing.assert_close(f1.hinv, torch.linalg.inv(damped_ref(H1, 0.01)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f2.hinv, torch.linalg.inv(damped_ref(H2, 0.01)), rtol=1e-10, atol=1e-12)
    assert sf.get(H1.clone()) is f1


def test_continuing_with_higher_rel_damp_refactors():
    model, batches = regression_problem(0, 256)
    curv = Curvature.layerwise(model, mlp_params(model), batches, loss_fn=mse, progress=False)
    p1 = solve(curv, 300, OBSIHTConfig(progress=False))
    p2 = solve(curv, None, OBSIHTConfig(rel_damp=0.1, progress=False), initial=p1)
    assert p2.report["rel_damp_used"] == {k: 0.1 for k in p1.entries}
    for k, f in p2.solver_state["factors"].items():
        torch.testing.assert_close(f.hinv.double(), torch.linalg.inv(damped_ref(curv.hessians[k], 0.1)),
                                   rtol=1e-3, atol=1e-6)


def test_sweep_of_fp32_weights_with_fp64_factor_runs_in_fp64():
    g, H, W = sweep_problem()
    Hd = damped_ref(H, 0.01)
    keep = torch.rand(W.shape, generator=g) > 0.5
    W32 = W.float()
    Wn, _, _ = obs_sweep(W32, upper_factor(Hd), keep=keep, blocksize=8)
    assert Wn.dtype == torch.float64
    torch.testing.assert_close(Wn, textbook_project(W32.double(), Hd, keep), rtol=1e-10, atol=1e-10)


def test_an_update_beyond_float16s_range_is_refused_saying_so():
    """Two equal input columns and weights of 34000: pruning one moves its weight onto the other, 67663 >
    float16's 65504.  The plan is refused naming the dtype's range, and the model is left as it was."""
    from obs_plugins import Curvature, OBSIHTConfig, api
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[34000.0, 34000.0]]))
    model = torch.nn.Sequential(lin).half()
    g = torch.Generator().manual_seed(0)
    xs = []
    for _ in range(4):
        c = 0.05 * torch.randn(16, 1, generator=g)
        xs.append((torch.cat([c, c], 1).half(), torch.zeros(16)))
    curv = Curvature.layerwise(model, [(lin, "weight")], xs, progress=False)
    before = lin.weight.detach().clone()
    with pytest.raises(FloatingPointError, match="exceed float16's range \\(largest finite 65504\\)"):
        api.prune(OBSIHTConfig(progress=False), curvature=curv, amount=0.5)
    assert torch.equal(lin.weight, before) and not hasattr(lin, "weight_orig")
