"""Shared OBS linear algebra: damping ladder, dead columns, obs_solve vs brute-force constrained least squares,
greedy OBS on hand-checkable layers."""
from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch

from obs_plugins.curvature.linalg import (DEFAULT_LADDER, damped, dead_columns, greedy_obs, inverse_factor,
                                          obs_solve)
from obs_plugins.errors import CurvatureError

f64 = torch.float64


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 2 * d, generator=g, dtype=f64)
    return A @ A.T / (2 * d) + 0.1 * torch.eye(d, dtype=f64)


def quad(H, dw):
    return 0.5 * float(dw @ H @ dw)


# ------------------------------------------------------------------------------------------ damping ladder
def test_singular_h_is_fixed_by_the_first_damping_step():
    H = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=f64)  # rank 2, exact
    assert int(torch.linalg.cholesky_ex(H).info) != 0
    f = inverse_factor(H, rel_damp=0.0)
    assert f.rel_damp == DEFAULT_LADDER[0] >= 0.0
    lam = DEFAULT_LADDER[0] * float(torch.diagonal(H).mean())
    assert torch.allclose(f.hinv, torch.linalg.inv(H + lam * torch.eye(3, dtype=f64)), rtol=1e-10, atol=1e-10)
    assert torch.allclose(f.hinv_chol_upper.T @ f.hinv_chol_upper, f.hinv, atol=1e-10)
    assert torch.equal(f.hinv_chol_upper, torch.triu(f.hinv_chol_upper))
    # a well-posed H keeps the requested damping
    g = inverse_factor(spd(5), rel_damp=0.02)
    assert g.rel_damp == 0.02


def test_ladder_climbs_to_the_first_step_that_works():
    H = torch.tensor([[1.0, 1.2], [1.2, 1.0]], dtype=f64)  # eigenvalues 2.2, -0.2: needs damping > 0.2
    f = inverse_factor(H, rel_damp=1e-2)
    assert f.rel_damp == 0.3
    assert torch.allclose(f.hinv, torch.linalg.inv(H + 0.3 * torch.eye(2, dtype=f64)))
    # steps below the start are never tried
    assert inverse_factor(torch.eye(2, dtype=f64), rel_damp=0.05).rel_damp == 0.05


def test_indefinite_h_that_no_step_fixes_raises():
    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]], dtype=f64)  # eigenvalue -2, the top step adds 1.0 * mean diag = 1
    with pytest.raises(CurvatureError, match=r"failed with relative damping \[0\.01, 0\.03, 0\.1, 0\.3, 1\.0\]"):
        inverse_factor(H, rel_damp=1e-2, what="H of fc.weight")
    with pytest.raises(CurvatureError, match="H of fc.weight"):
        inverse_factor(H, what="H of fc.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_h_raises_clearly(bad):
    H = spd(4).float()
    H[1, 2] = bad
    with pytest.raises(CurvatureError, match=r"H of l1 has 1 non-finite entries \(NaN/inf\)"):
        inverse_factor(H, what="H of l1")


# ------------------------------------------------------------------------------------------ dead columns
def test_dead_columns_are_decoupled_and_free():
    H = spd(5, seed=1)
    H[2, :] = 0
    H[:, 2] = 0
    assert dead_columns(H).tolist() == [False, False, True, False, False]
    Hd = damped(H, 0.1)
    live_mean = float(torch.diagonal(H)[[0, 1, 3, 4]].mean())
    assert Hd[2, 2] == pytest.approx(0.1 * live_mean)   # only the damping: cheap at any input scale
    assert torch.allclose(torch.diagonal(Hd)[[0, 1, 3, 4]], torch.diagonal(H)[[0, 1, 3, 4]] + 0.1 * live_mean)
    assert torch.equal(H, H.clone())  # damped does not modify its input
    assert float(H[2, 2]) == 0.0
    f = inverse_factor(H, rel_damp=0.1)
    assert f.dead.tolist() == [False, False, True, False, False]
    assert torch.all(f.hinv[2, [0, 1, 3, 4]] == 0)
    # pruning the dead weight moves no other weight
    w = torch.randn(5, dtype=f64)
    w_new, _ = obs_solve(w, f.hinv, torch.tensor([2]))
    assert w_new[2] == 0 and torch.allclose(w_new[[0, 1, 3, 4]], w[[0, 1, 3, 4]])
    assert float(dw_loss := quad(H, w_new - w)) == pytest.approx(0.0, abs=1e-12), dw_loss


# ------------------------------------------------------------------------------------------ obs_solve
def _bruteforce(H, w, P):
    """min 1/2 dw^T H dw  s.t. (w + dw)_P = 0, by the explicit kept-set system and by the KKT system."""
    d = w.numel()
    K = torch.tensor([i for i in range(d) if i not in set(P.tolist())])
    dw = torch.zeros(d, dtype=f64)
    dw[P] = -w[P]
    dw[K] = -torch.linalg.solve(H[K][:, K], H[K][:, P] @ dw[P])
    E = torch.zeros(len(P), d, dtype=f64)
    E[torch.arange(len(P)), P] = 1
    kkt = torch.cat([torch.cat([H, E.T], 1), torch.cat([E, torch.zeros(len(P), len(P), dtype=f64)], 1)])
    sol = torch.linalg.solve(kkt, torch.cat([torch.zeros(d, dtype=f64), -w[P]]))
    assert torch.allclose(sol[:d], dw, atol=1e-10)
    return w + dw


@pytest.mark.parametrize("P", [[3], [0, 5], [1, 4, 6], [0, 1, 2, 3, 4, 5, 6]])
def test_obs_solve_equals_constrained_least_squares(P):
    H = spd(8, seed=2)
    w = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=f64)
    P = torch.tensor(P)
    w_new, loss = obs_solve(w, torch.linalg.inv(H), P)
    ref = _bruteforce(H, w, P)
    assert torch.allclose(w_new, ref, atol=1e-10)
    assert torch.all(w_new[P] == 0)
    assert float(loss) == pytest.approx(quad(H, w_new - w), rel=1e-10)
    # optimality: any other feasible point costs more
    K = [i for i in range(8) if i not in set(P.tolist())]
    if K:
        other = w_new.clone()
        other[K] += 0.01 * torch.randn(len(K), dtype=f64)
        assert quad(H, other - w) > float(loss)


def test_obs_solve_through_inverse_factor_and_float32():
    H = spd(6, seed=4)
    w = torch.randn(6, dtype=f64)
    f = inverse_factor(H, rel_damp=0.01)
    Hd = damped(H, 0.01)
    P = torch.tensor([1, 2])
    w_new, loss = obs_solve(w, f.hinv, P)
    assert torch.allclose(w_new, _bruteforce(Hd, w, P), atol=1e-9)
    assert float(loss) == pytest.approx(quad(Hd, w_new - w), rel=1e-9)
    f32 = inverse_factor(H.float(), rel_damp=0.01)
    assert f32.hinv.dtype == torch.float32
    w32, loss32 = obs_solve(w.float(), f32.hinv, P)
    assert torch.allclose(w32.double(), w_new, atol=1e-4)
    assert float(loss32) == pytest.approx(float(loss), rel=1e-4)
    same, zero = obs_solve(w, f.hinv, torch.tensor([], dtype=torch.long))
    assert torch.equal(same, w) and float(zero) == 0.0


# ------------------------------------------------------------------------------------------ greedy OBS
def test_greedy_obs_diagonal_1x8_by_hand():
    w = torch.tensor([4.0, -1.0, 2.0, 0.5, -3.0, 1.0, 2.0, -0.25], dtype=f64)
    h = torch.tensor([1.0, 2.0, 1.0, 4.0, 0.5, 1.5, 0.4, 8.0], dtype=f64)
    # saliency w^2 h / 2 = [8, 1, 2, 0.5, 2.25, 0.75, 0.8, 0.25]: remove 7, 3, 5, then 6
    w_new, order, total = greedy_obs(w, torch.diag(1 / h), 3)
    assert order.tolist() == [7, 3, 5]
    assert float(total) == pytest.approx(0.25 + 0.5 + 0.75)
    expect = w.clone()
    expect[[7, 3, 5]] = 0  # no coupling: the others do not move
    assert torch.equal(w_new, expect)
    _, order4, total4 = greedy_obs(w, torch.diag(1 / h), 4)
    assert order4.tolist() == [7, 3, 5, 6] and float(total4) == pytest.approx(2.3)


def test_greedy_obs_coupled_pair_by_hand():
    # weights 0,1 coupled by H = [[2, 1], [1, 2]] (H^-1 = [[2, -1], [-1, 2]] / 3); the other 6 diagonal
    H = torch.eye(8, dtype=f64) * 10
    H[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=f64)
    w = torch.tensor([1.0, 3.0, 5, 5, 5, 5, 5, 5], dtype=f64)
    # saliency of w0: 1 / (2 * 2/3) = 0.75 (smallest); removing it moves w1 by -(w0 / Hinv00) Hinv10 = +0.5
    w_new, order, total = greedy_obs(w, torch.linalg.inv(H), 1)
    assert order.tolist() == [0]
    assert float(total) == pytest.approx(0.75)
    assert torch.allclose(w_new, torch.tensor([0.0, 3.5, 5, 5, 5, 5, 5, 5], dtype=f64))
    assert quad(H, w_new - w) == pytest.approx(0.75)


def test_greedy_obs_total_is_the_measured_loss_and_matches_joint_solve():
    H = spd(8, seed=5)
    w = torch.randn(8, generator=torch.Generator().manual_seed(6), dtype=f64)
    hinv = torch.linalg.inv(H)
    for k in (1, 3, 6):
        w_new, order, total = greedy_obs(w, hinv, k)
        assert len(set(order.tolist())) == k and torch.all(w_new[order] == 0)
        assert float(total) == pytest.approx(quad(H, w_new - w), rel=1e-9)
        joint, loss = obs_solve(w, hinv, order)  # same support -> the same optimal update
        assert torch.allclose(w_new, joint, atol=1e-9) and float(loss) == pytest.approx(float(total), rel=1e-9)
    # k=1 picks the best single weight (exhaustive check)
    best = min(range(8), key=lambda q: float(obs_solve(w, hinv, torch.tensor([q]))[1]))
    assert greedy_obs(w, hinv, 1)[1].tolist() == [best]
    # greedy k=2 is never better than the exhaustive optimum
    opt = min(float(obs_solve(w, hinv, torch.tensor(list(p)))[1]) for p in itertools.combinations(range(8), 2))
    assert float(greedy_obs(w, hinv, 2)[2]) >= opt - 1e-12


def test_a_non_symmetric_or_bad_curvature_is_refused_not_read_by_one_triangle():
    """[[1, 5], [0, 1]] factorised as if its coupling were absent (Cholesky reads one triangle)."""
    from obs_plugins.errors import CurvatureError, PruningInputError
    from obs_plugins.methods.obs_iht.structured import column_saliency
    H = torch.tensor([[1.0, 5.0], [0.0, 1.0]], dtype=f64)
    with pytest.raises(CurvatureError, match="not symmetric"):
        inverse_factor(H)
    with pytest.raises(CurvatureError, match="not symmetric"):
        column_saliency(torch.ones(3, 2, dtype=f64), H, [[0], [1]], compensate=False)
    with pytest.raises(CurvatureError, match="square"):
        inverse_factor(torch.ones(2, 3, dtype=f64))
    for bad in (-1e-3, float("nan"), True):
        with pytest.raises(PruningInputError, match="^rel_damp"):
            inverse_factor(spd(3), rel_damp=bad)
    inverse_factor(spd(3) + 1e-9 * torch.randn(3, 3, dtype=f64))   # rounding-level asymmetry is fine


def test_the_inverse_factor_always_reproduces_the_inverse_it_is_returned_with():
    """fp32, rank 6 of 8, no damping: the first Cholesky can "succeed" while the factor of the inverse is garbage
    (off by ~1e6); the ladder must then climb, so that hinv_chol_upperᵀ·hinv_chol_upper = hinv whatever it used."""
    g = torch.Generator().manual_seed(4)
    torch.randint(2, 8, (1,), generator=g)      # (the draw that found this case; keeps the generator's state)
    A = torch.randn(8, 6, generator=g)
    H = 2 * A @ A.T / 6
    H = (H + H.T) / 2
    f = inverse_factor(H, rel_damp=0.0)
    U = f.hinv_chol_upper.double()
    assert torch.isfinite(U).all()
    ref = f.hinv.double()
    assert float(torch.linalg.vector_norm(U.T @ U - ref) / torch.linalg.vector_norm(ref)) < 1e-3
    assert f.rel_damp in (0.0, *DEFAULT_LADDER)


def test_a_gram_one_percent_off_symmetric_is_refused_and_rounding_is_not():
    H = spd(4)
    off = H.clone()
    off[0, 1] += 1e-2 * float(H.abs().max())
    with pytest.raises(CurvatureError, match="not symmetric"):
        inverse_factor(off)
    near = H.clone()
    near[0, 1] += 1e-7 * float(H.abs().max())
    inverse_factor(near)


def test_curvature_and_solves_run_at_full_fp32_whatever_the_callers_matmul_precision():
    """A caller's set_float32_matmul_precision("medium") / TF32 switch would round the Grams and the OBS solves;
    they run at "highest" with TF32 convolutions off (the plan is bit-identical to one made at "highest"), and
    the caller's settings are back afterwards."""
    from tiny import classifier_problem

    from obs_plugins import OBSIHTConfig, api

    def run():
        model, _, curv = classifier_problem(96, 128, 10, rows=64)
        api.prune(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.6)
        return curv.hessians, [m.weight.detach().clone() for m in (model[0], model[2])]

    ref_h, ref_w = run()
    seen = []
    real = torch.linalg.cholesky_ex
    cudnn = torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = True
        with mock.patch("torch.linalg.cholesky_ex", side_effect=lambda *a, **k: (
                seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)), real(*a, **k))[1]):
            h, w = run()
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = cudnn
    assert seen and set(seen) == {("highest", False)}
    assert all(torch.equal(h[k], ref_h[k]) for k in ref_h)
    assert all(torch.equal(a, b) for a, b in zip(w, ref_w))
