"""Curvature engine against brute-force float64 references: layer Grams (Linear / Conv2d / HF Conv1D, k batches,
sequential calibration), block Fisher (both modes, both per-sample engines), Woodbury inverse, HVP, spectral
operators (SLQ, Hutchinson, top eigenvalue) and gradients of pruned models."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

from obs_plugins.curvature import Curvature
from tiny import Block
from obs_plugins.curvature.fisher import (FisherBlocks, FisherWoodbury, collect_fisher, fisher_bytes,
                                          fisher_inverse_diag, obs_saliency)
from obs_plugins.curvature.operators import (density_on_grid, hessian_spectrum, hessian_top_eigenvalue,
                                             hessian_trace, hutchinson_trace, lanczos, slq_density,
                                             top_eigenvalue)
from obs_plugins.errors import CurvatureError, PruningInputError


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


def gram64(rows: torch.Tensor) -> torch.Tensor:
    x = rows.double()
    return 2 * x.T @ x / x.shape[0]


# ------------------------------------------------------------------------------------------ layer Grams
def test_layerwise_linear_matches_float64():
    lin = nn.Linear(7, 5)
    model = nn.Sequential(lin)
    batches = [torch.randn(3, 4, 7) * 3 + 1 for _ in range(3)]  # (batch, seq, in): every token is a row
    curv = Curvature.layerwise(model, [(lin, "weight")], batches, progress=False)
    ref = gram64(torch.cat([b.reshape(-1, 7) for b in batches]))
    assert curv.counts["0.weight"] == 36
    assert curv.hessians["0.weight"].dtype == torch.float32
    assert rel(curv.hessians["0.weight"], ref) < 1e-5


def _manual_unfold(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows (N*L, C*kh*kw) by explicit loops over output positions, float64."""
    x = x.double()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    H, W = xp.shape[-2:]
    oh = (H - dh * (kh - 1) - 1) // sh + 1
    ow = (W - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for n in range(x.shape[0]):
        for i in range(oh):
            for j in range(ow):
                patch = xp[n, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("stride,padding,dilation", [(2, 1, 1), (1, 2, 2)])
def test_layerwise_conv2d_matches_manual_unfold(stride, padding, dilation):
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=stride, padding=padding, dilation=dilation)
    model = nn.Sequential(conv)
    batches = [torch.randn(2, 3, 7, 6) for _ in range(2)]
    curv = Curvature.layerwise(model, [(conv, "weight")], batches, progress=False)
    rows = torch.cat([_manual_unfold(b, conv) for b in batches])
    assert curv.counts["0.weight"] == rows.shape[0]
    assert curv.hessians["0.weight"].shape == (27, 27)
    assert rel(curv.hessians["0.weight"], gram64(rows)) < 1e-5


def test_layerwise_hf_conv1d_matches_float64():
    c = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs; weight (6, 5)
    model = nn.Sequential(c)
    batches = [torch.randn(2, 3, 6) for _ in range(2)]
    curv = Curvature.layerwise(model, [(c, "weight")], batches, progress=False)
    assert curv.hessians["0.weight"].shape == (6, 6)
    assert rel(curv.hessians["0.weight"], gram64(torch.cat([b.reshape(-1, 6) for b in batches]))) < 1e-5


def test_k_batches_equal_one_concatenated_batch():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    params = [(model[0], "weight"), (model[2], "weight")]
    batches = [torch.randn(n, 6) for n in (3, 5, 1, 7)]
    a = Curvature.layerwise(model, params, batches, progress=False)
    b = Curvature.layerwise(model, params, [torch.cat(batches)], progress=False)
    for k in a.keys:
        assert a.counts[k] == b.counts[k] == 16
        assert rel(a.hessians[k], b.hessians[k]) < 1e-6


def test_k_batches_of_different_sizes_give_one_batchs_loss_gradient_and_hvp():
    """The loss, its gradient and HVPs over batches of 1 and 7 samples equal those of the one concatenated batch
    (they averaged per batch: the single sample weighed as much as the seven; 95% off)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    params = [(model[0], "weight"), (model[2], "weight")]
    xs, ys = [torch.randn(n, 6) for n in (1, 7)], [torch.randint(0, 3, (n,)) for n in (1, 7)]
    k = Curvature.layerwise(model, params, list(zip(xs, ys)), loss_fn=F.cross_entropy, progress=False)
    one = Curvature.layerwise(model, params, [(torch.cat(xs), torch.cat(ys))], loss_fn=F.cross_entropy,
                              progress=False)
    assert abs(k.loss() - one.loss()) < 1e-6
    (lk, gk), (lo, go) = k.loss_and_grad(), one.loss_and_grad()
    assert abs(lk - lo) < 1e-6
    v = {t.key: torch.randn_like(t.current()) for t in k.targets}
    hk, ho = k.hvp(v), one.hvp(v)
    for key in k.keys:
        assert rel(gk[key], go[key]) < 1e-5 and rel(hk[key], ho[key]) < 1e-5


class Stack(nn.Module):
    def __init__(self, d=5, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


def test_sequential_equals_plain_when_nothing_changes():
    model = Stack()
    params = [(b.fc, "weight") for b in model.layers]
    batches = [torch.randn(4, 5) for _ in range(3)]
    calls = []
    seq = Curvature.layerwise(model, params, batches, sequential=True, progress=False,
                              on_block=lambda i, ts: calls.append((i, [t.key for t in ts])) or False)
    plain = Curvature.layerwise(model, params, batches, progress=False)
    assert calls == [(i, [f"layers.{i}.fc.weight"]) for i in range(3)]
    for k in plain.keys:
        assert seq.counts[k] == plain.counts[k] == 12
        assert rel(seq.hessians[k], plain.hessians[k]) < 1e-6


def test_sequential_sees_pruned_outputs_of_earlier_blocks():
    model = Stack()
    dense = copy.deepcopy(model)
    params = [(b.fc, "weight") for b in model.layers]
    batches = [torch.randn(4, 5) for _ in range(3)]

    def on_block(i, ts):
        prune.l1_unstructured(ts[0].module, "weight", amount=0.6)
        return True

    seq = Curvature.layerwise(model, params, batches, sequential=True, on_block=on_block, progress=False)
    # by hand, float64: block i's input is the output of the *pruned* blocks before it; its own H is taken
    # before it is pruned
    x = torch.cat(batches).double()
    for i, blk in enumerate(model.layers):
        assert rel(seq.hessians[f"layers.{i}.fc.weight"], gram64(x)) < 1e-5
        W = blk.fc.weight.detach().double()  # pruned effective weight
        assert int((W == 0).sum()) == 15
        x = x + torch.tanh(x @ W.T + blk.fc.bias.detach().double())
    plain = Curvature.layerwise(dense, [(b.fc, "weight") for b in dense.layers], batches, progress=False)
    assert rel(seq.hessians["layers.0.fc.weight"], plain.hessians["layers.0.fc.weight"]) < 1e-6
    assert rel(seq.hessians["layers.2.fc.weight"], plain.hessians["layers.2.fc.weight"]) > 1e-3


# ------------------------------------------------------------------------------------------ Fisher
def ce_loss(out, target):
    return nn.functional.cross_entropy(out, target)


def _mlp_conv1d():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), Conv1D(4, 6))
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # gradients are w.r.t. the effective weight
    batches = [(torch.randn(4, 5), torch.randint(0, 4, (4,))) for _ in range(3)]
    return model, [(model[0], "weight"), (model[2], "weight")], batches


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _cnn():
    model = TinyCNN()
    batches = [(torch.randn(3, 2, 5, 5), torch.randint(0, 4, (3,))) for _ in range(2)]
    return model, [(model.conv, "weight"), (model.fc, "weight")], batches


def _fisher_reference(model, params, batches, B):
    """float64 per-sample gradients w.r.t. the effective weights by an explicit loop; padded block outer
    products averaged over samples."""
    with torch.no_grad():  # a pruned module keeps its last `weight = orig * mask`; make it a leaf to deepcopy
        model(batches[0][0])
    m64 = copy.deepcopy(model).double()
    names = {id(m): n for n, m in model.named_modules()}
    mods = [m64.get_submodule(names[id(m)]) for m, _ in params]
    outer = [[] for _ in params]
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = ce_loss(m64(x[i:i + 1].double()), y[i:i + 1])
            gs = torch.autograd.grad(loss, [getattr(m, "weight") for m in mods])
            for o, g in zip(outer, gs):
                g = g.reshape(-1)
                Bt = min(B, g.numel())
                nb = -(-g.numel() // Bt)
                gp = torch.cat([g, g.new_zeros(nb * Bt - g.numel())]).reshape(nb, Bt)
                o.append(gp[:, :, None] * gp[:, None, :])
    return [torch.stack(o).mean(0) for o in outer]


@pytest.mark.parametrize("build", [_mlp_conv1d, _cnn])
@pytest.mark.parametrize("mode", ["blocks", "woodbury"])
@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_fisher_blocks_match_bruteforce(build, mode, engine):
    model, params, batches = build()
    curv = Curvature(model, params, batches, loss_fn=ce_loss)
    rep = collect_fisher(curv, block_size=16, mode=mode, engine=engine, progress=False, micro_batch=3)
    assert rep["engine"] == engine and rep["samples"] == sum(b[0].shape[0] for b in batches)
    refs = _fisher_reference(model, params, batches, 16)
    for t, ref in zip(curv.targets, refs):
        f = curv.fisher[t.key]
        assert isinstance(f, FisherBlocks if mode == "blocks" else FisherWoodbury)
        assert f.dense_blocks().shape == ref.shape
        assert rel(f.dense_blocks(), ref) < 1e-5
        assert f.n == rep["samples"]


def test_fisher_num_samples_and_engines_agree():
    model, params, batches = _mlp_conv1d()
    curv = Curvature(model, params, batches, loss_fn=ce_loss)
    rep = collect_fisher(curv, block_size=8, num_samples=6, progress=False)
    ref = _fisher_reference(model, params, [batches[0], (batches[1][0][:2], batches[1][1][:2])], 8)
    assert rep["samples"] == 6
    for t, r in zip(curv.targets, ref):
        assert rel(curv.fisher[t.key].blocks, r) < 1e-5


def test_fisher_inverse_damping_and_saliency():
    model, params, batches = _mlp_conv1d()
    curv = Curvature(model, params, batches, loss_fn=ce_loss)
    collect_fisher(curv, block_size=16, progress=False, rel_damp=1e-2)
    for t in curv.targets:
        f = curv.fisher[t.key]
        F = f.blocks.double()
        diag = torch.diagonal(F, dim1=-2, dim2=-1).reshape(-1)[: f.numel]
        lam = 1e-2 * float(diag.mean())
        assert torch.allclose(f.damp, torch.full_like(f.damp, lam), rtol=1e-6)
        assert torch.all(f.rel_damp == 1e-2)
        dense_inv = torch.linalg.inv(F + lam * torch.eye(F.shape[-1], dtype=torch.float64))
        assert rel(f.inverse, dense_inv) < 1e-4
        d = torch.diagonal(dense_inv, dim1=-2, dim2=-1).reshape(-1)[: f.numel].reshape(f.shape)
        assert rel(fisher_inverse_diag(curv, t.key), d) < 1e-4
        w = t.current().double()
        assert rel(obs_saliency(curv, t.key), w * w / (2 * d)) < 1e-4
    # already-pruned weights score 0
    assert torch.all(obs_saliency(curv, "0.weight")[model[0].weight_mask == 0] == 0)


def test_woodbury_inverse_matvec_equals_dense_inverse():
    torch.manual_seed(1)
    lin = nn.Linear(20, 3)  # 60 weights, block 32 -> blocks of 32 and 28 (padded)
    model = nn.Sequential(lin)
    batches = [(torch.randn(5, 20), torch.randint(0, 3, (5,)))]
    curv = Curvature(model, [(lin, "weight")], batches, loss_fn=ce_loss)
    collect_fisher(curv, block_size=32, mode="woodbury", progress=False)
    fw = curv.fisher["0.weight"]
    assert fw.grads.shape == (5, 2, 32) and fw.chol.shape == (2, 5, 5)
    G = fw.grads.double()
    lam = fw.damp.double()
    dense_inv = torch.stack([torch.linalg.inv(G[:, b].T @ G[:, b] / 5 + lam[b] * torch.eye(32, dtype=torch.float64))
                             for b in range(2)])
    v = torch.randn(3, 20)
    vp = torch.cat([v.reshape(-1), torch.zeros(4)]).reshape(2, 32).double()
    ref = torch.einsum("bij,bj->bi", dense_inv, vp).reshape(-1)[:60].reshape(3, 20)
    assert rel(fw.inverse_matvec(v), ref) < 1e-4
    assert rel(fw.inverse_diag(), torch.diagonal(dense_inv, dim1=-2, dim2=-1).reshape(-1)[:60].reshape(3, 20)) < 1e-4
    assert rel(fw.inverse_blocks(), dense_inv) < 1e-4
    # and the same as dense blocks mode with the same damping
    collect_fisher(curv, block_size=32, mode="blocks", progress=False)
    fb = curv.fisher["0.weight"]
    assert rel(fb.inverse_matvec(v), ref) < 1e-4
    assert rel(fb.matvec(v), fw.matvec(v)) < 1e-5


def test_fisher_memory_budget_and_errors():
    model, params, batches = _mlp_conv1d()
    curv = Curvature(model, params, batches, loss_fn=ce_loss)
    need = fisher_bytes(30, 16) + fisher_bytes(24, 16)
    assert need == 2 * 4 * (2 * 16 * 16) * 2
    with pytest.raises(PruningInputError, match="memory_budget_mb.*woodbury"):
        collect_fisher(curv, block_size=16, memory_budget_mb=need / 2**20 * 0.99, progress=False)
    assert curv.fisher == {}
    rep = collect_fisher(curv, block_size=16, memory_budget_mb=need / 2**20, progress=False)
    assert rep["bytes"] == need
    with pytest.raises(PruningInputError, match="mode"):
        collect_fisher(curv, mode="dense", progress=False)
    with pytest.raises(PruningInputError, match="no Fisher"):
        obs_saliency(Curvature(model, params, batches, loss_fn=ce_loss), "0.weight")


def test_fisher_nan_raises_curvature_error():
    model, params, batches = _mlp_conv1d()
    bad = [(torch.full((2, 5), float("nan")), torch.zeros(2, dtype=torch.long))]
    curv = Curvature(model, params, bad, loss_fn=ce_loss)
    with pytest.raises(CurvatureError, match="non-finite"):
        collect_fisher(curv, progress=False)


def test_fisher_blocks_classmethod_and_dict_batches():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, input_ids, labels):
            return self.fc(input_ids)

    model = DictModel()
    batches = [{"input_ids": torch.randn(3, 4), "labels": torch.randint(0, 3, (3,))} for _ in range(2)]
    loss = lambda out, b: nn.functional.cross_entropy(out, b["labels"])  # noqa: E731
    curv = Curvature.fisher(model, [(model.fc, "weight")], batches, loss, block_size=4, progress=False)
    assert isinstance(curv.fisher, dict)  # on the instance, .fisher is the collected blocks
    g = []
    for b in batches:
        for i in range(3):
            out = model.fc(b["input_ids"][i:i + 1])
            g.append(torch.autograd.grad(loss(out, {"labels": b["labels"][i:i + 1]}), model.fc.weight)[0])
    G = torch.stack(g).reshape(6, 3, 4).double()
    ref = torch.einsum("nbi,nbj->bij", G, G) / 6
    assert rel(curv.fisher["fc.weight"].blocks, ref) < 1e-5


# ------------------------------------------------------------------------------------------ HVP / operators
def _tiny_mlp_problem(pruned=False):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    if pruned:
        prune.random_unstructured(model[0], "weight", amount=0.4)
    batches = [(torch.randn(6, 4), torch.randn(6, 3)) for _ in range(2)]
    loss = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    curv = Curvature(model, [(model[0], "weight"), (model[2], "weight")], batches, loss_fn=loss)
    return model, batches, curv


def _full_hessian(model, batches):
    """float64 Hessian of the mean batch loss w.r.t. (W1 effective, W2) flattened, by autograd.functional."""
    W1 = model[0].weight.detach().double()
    b1, W2, b2 = (p.detach().double() for p in (model[0].bias, model[2].weight, model[2].bias))

    def f(flat):
        w1, w2 = flat[:20].reshape(5, 4), flat[20:].reshape(3, 5)
        tot = 0
        for x, y in batches:
            out = torch.tanh(x.double() @ w1.T + b1) @ w2.T + b2
            tot = tot + ((out - y.double()) ** 2).mean()
        return tot / len(batches)

    flat = torch.cat([W1.reshape(-1), W2.reshape(-1)])
    return torch.autograd.functional.hessian(f, flat), f, flat


@pytest.mark.parametrize("pruned", [False, True])
def test_hvp_matches_autograd_hessian(pruned):
    model, batches, curv = _tiny_mlp_problem(pruned)
    H, _, _ = _full_hessian(model, batches)
    for _ in range(3):
        v = torch.randn(curv.numel())
        assert rel(curv.hvp_flat(v), H @ v.double()) < 1e-5
    hv = curv.hvp(curv.unflatten(torch.ones(35)))
    assert hv["0.weight"].shape == (5, 4) and hv["2.weight"].shape == (3, 5)


@pytest.mark.parametrize("pruned", [False, True])
def test_loss_and_grad_match_autograd(pruned):
    model, batches, curv = _tiny_mlp_problem(pruned)
    _, f, flat = _full_hessian(model, batches)
    flat = flat.clone().requires_grad_(True)
    ref_loss = f(flat)
    ref_grad = torch.autograd.grad(ref_loss, flat)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, grads = curv.loss_and_grad()
    assert abs(loss - float(ref_loss.detach())) < 1e-6 * max(1.0, abs(float(ref_loss.detach())))
    assert rel(curv.flatten(grads), ref_grad) < 1e-5
    if pruned:  # gradient w.r.t. the effective weight: pruned entries get their (non-zero) gradient
        mask = model[0].weight_mask.bool()
        assert grads["0.weight"][~mask].abs().sum() > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_slq_recovers_known_spectrum():
    ev = torch.tensor([-2.0, 0.5, 1.0, 1.0, 3.0, 4.5, 8.0, 10.0, 10.0, 12.0], dtype=torch.float64)
    Qm, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    A = Qm @ torch.diag(ev) @ Qm.T
    nodes, weights = slq_density(lambda v: A @ v, 10, steps=10, probes=4, seed=0)
    assert abs(float(weights.sum()) - 1) < 1e-10
    uniq = torch.unique(ev)
    # every node is (numerically) an eigenvalue and every eigenvalue is a node
    dist = (nodes[:, None] - uniq[None, :]).abs().min(1).values
    assert float(dist.max()) < 1e-8
    assert all(float((nodes - e).abs().min()) < 1e-8 for e in uniq)
    # the weights estimate the eigenvalue counts: 2/10 at 1.0 and 10.0, 1/10 elsewhere (loosely, 4 probes)
    mass = torch.stack([weights[(nodes - e).abs() < 1e-6].sum() for e in uniq])
    assert abs(float(mass.sum()) - 1) < 1e-10
    g, d = density_on_grid(nodes, weights, num=2001)
    assert abs(float(torch.trapezoid(d, g)) - 1) < 1e-2
    # also the diagonal matrix itself, Gaussian probes, Lanczos stops at 7 distinct eigenvalues
    D = torch.diag(ev)
    alpha, beta, Q = lanczos(lambda v: D @ v, 10, 30)
    assert alpha.numel() == 8 and Q.shape == (10, 8)
    assert torch.allclose(Q.T @ Q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    nodes, _ = slq_density(lambda v: D @ v, 10, steps=10, probes=2, distribution="gaussian")
    assert float((nodes[:, None] - uniq[None, :]).abs().min(1).values.max()) < 1e-8


def test_operators_do_not_touch_global_rng_and_follow_dtype():
    state = torch.get_rng_state()
    A = torch.diag(torch.arange(1.0, 7.0))  # float32 operator
    tr, se = hutchinson_trace(lambda v: A @ v.float(), 6, probes=4)
    assert abs(tr - 21.0) < 1e-4 and se < 1e-4  # Rademacher is exact on a diagonal matrix
    assert abs(top_eigenvalue(lambda v: A @ v.float(), 6, steps=6) - 6.0) < 1e-5
    assert torch.equal(state, torch.get_rng_state())


def test_hutchinson_trace_of_tiny_mlp_hessian():
    model, batches, curv = _tiny_mlp_problem()
    H, _, _ = _full_hessian(model, batches)
    exact = float(torch.trace(H))
    est, se = hessian_trace(curv, probes=200, seed=0)
    assert abs(est - exact) < 0.05 * abs(exact)
    assert se < 0.05 * abs(exact) and abs(est - exact) < 4 * se + 1e-9


def test_top_eigenvalue_matches_eigvalsh():
    model, batches, curv = _tiny_mlp_problem()
    H, _, _ = _full_hessian(model, batches)
    ev = torch.linalg.eigvalsh(H)
    lam, vec = hessian_top_eigenvalue(curv, steps=35, return_vector=True)
    assert abs(lam - float(ev[-1])) < 1e-5 * float(ev.abs().max())
    assert rel(H @ vec, lam * vec) < 1e-4
    lm = top_eigenvalue(lambda v: H @ v, 35, steps=35, which="LM")
    assert abs(lm - float(ev[ev.abs().argmax()])) < 1e-10 * float(ev.abs().max())
    nodes, w = hessian_spectrum(curv, steps=35, probes=1)
    assert abs(float(nodes.max()) - float(ev[-1])) < 1e-5 * float(ev.abs().max())
    assert abs(float(nodes.min()) - float(ev[0])) < 1e-5 * float(ev.abs().max())
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-9)


def test_curvature_methods_delegate_to_the_operators():
    model, batches, curv = _tiny_mlp_problem()
    H, _, _ = _full_hessian(model, batches)
    assert abs(curv.hessian_top_eigenvalue(steps=35) - float(torch.linalg.eigvalsh(H)[-1])) < 1e-5 * float(H.abs().max())
    est, _ = curv.hessian_trace(probes=8, seed=1)
    assert est == hessian_trace(curv, probes=8, seed=1)[0]


def test_loss_and_grad_bf16_autocast_is_close_and_leaves_the_model_fp32():
    """``compute_dtype=torch.bfloat16`` runs the passes under autocast: the gradient is close to the fp32 one
    (cosine > 0.999 on this MLP), comes back fp32, and no weight changes dtype or value."""
    model, batches, curv = _tiny_mlp_problem(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss32, g32 = curv.loss_and_grad()
    loss16, g16 = curv.loss_and_grad(compute_dtype=torch.bfloat16)
    a, b = curv.flatten(g32), curv.flatten(g16)
    assert b.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16.values())
    assert float(a @ b / (a.norm() * b.norm())) > 0.999
    assert not torch.equal(a, b)  # it really ran in bf16
    assert abs(loss16 - loss32) < 2e-2 * abs(loss32)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


@pytest.mark.parametrize("sequential", [False, "block"])
def test_padded_positions_stay_out_of_the_grams(sequential):
    """Dict batches with an attention mask that pads some positions: every Gram is the float64 Gram of the real
    tokens' layer inputs only (the padded rows used to count: 41% off on a down_proj here), in one pass and
    block by block; a batch without padding is unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32, use_cache=False)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (4, 8), generator=g)
    am = torch.ones_like(ids)
    am[0, 5:], am[2, 3:] = 0, 0
    batches = [{"input_ids": ids[:2], "attention_mask": am[:2]}, {"input_ids": ids[2:], "attention_mask": am[2:]}]
    params = [(m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    rows = {id(m): [] for m, _ in params}
    hooks = [m.register_forward_hook(lambda mod, a, o: rows[id(mod)].append(a[0].detach())) for m, _ in params]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    curv = Curvature.layerwise(model, params, batches, sequential=sequential, progress=False)
    if sequential:
        curv.blockwise(curv.targets, lambda ts, grams: {t.key: t.current() for t in ts})
    for t in curv.targets:
        real = torch.cat([x[m.bool()] for x, m in zip(rows[id(t.module)], (am[:2], am[2:]))])
        assert curv.counts[t.key] == int(am.sum()) == real.shape[0]
        assert rel(curv.hessians[t.key].double(), gram64(real)) < 1e-5, t.key


@pytest.mark.parametrize("kw", [dict(padding="same", kernel_size=(3, 4)), dict(padding=1, padding_mode="reflect"),
                                dict(padding=2, padding_mode="circular"), dict(padding="valid")])
def test_conv2d_grams_follow_the_layers_own_padding(kw):
    """The Gram of a Conv2d is the Gram of the patches the layer multiplies: rows recovered from the layer itself
    (its output equals rows @ W^T + b), for 'same' (uneven here), 'valid', reflect and circular padding (reflect /
    circular were unfolded with zeros, 'same' crashed)."""
    kw = {"kernel_size": 3, **kw}
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **kw)
    batches = [torch.randn(2, 2, 6, 7) for _ in range(2)]
    curv = Curvature.layerwise(nn.Sequential(conv), [(conv, "weight")], batches, progress=False)
    from obs_plugins.curvature.collect import input_rows
    rows = torch.cat([input_rows(conv, b) for b in batches]).double()
    W = conv.weight.detach().double().reshape(3, -1)
    out = torch.cat([conv.double()(b.double()).permute(0, 2, 3, 1).reshape(-1, 3) for b in batches])
    conv.float()
    assert torch.allclose(rows @ W.T + conv.bias.detach().double(), out, atol=1e-10)
    assert rel(curv.hessians["0.weight"], gram64(rows)) < 1e-5


def test_hvp_of_a_transformer_with_its_default_sdpa_attention():
    """A Hugging Face decoder on CPU with its default 'sdpa' attention: the fused kernels have no double backward
    (curv.hvp raised a RuntimeError); the HVP runs on the math kernel and equals the eager-attention HVP."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from obs_plugins.lm import causal_lm_loss
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    out = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=32, use_cache=False)
        cfg._attn_implementation = impl
        model = LlamaForCausalLM(cfg).eval()
        params = [(model.model.layers[0].self_attn.q_proj, "weight"), (model.model.layers[0].mlp.up_proj, "weight")]
        curv = Curvature(model, params, [{"input_ids": ids, "labels": ids}], loss_fn=causal_lm_loss)
        v = {t.key: torch.ones_like(t.current()) for t in curv.targets}
        out[impl] = curv.hvp(v)
    for k in out["eager"]:
        assert rel(out["sdpa"][k], out["eager"][k]) < 1e-4, k


@pytest.mark.parametrize("engine", ["vmap", "loop"])
def test_fisher_micro_batches_keep_a_shared_batch_tensor_shared(engine):
    """A batch entry shared by every sample (leading size 2, not the batch's 4): a micro-batch of 2 rows used to
    re-decide which tensors are per sample and sliced it (Fisher 2x off, silently); the per-sample tensors are
    now fixed once on the whole batch."""
    from obs_plugins.curvature.fisher import collect_fisher

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, offset):
            return self.fc(x + offset.sum(0))
    torch.manual_seed(0)
    m = M()
    batch = {"x": torch.randn(4, 3), "offset": torch.randn(2, 3), "y": torch.randint(0, 2, (4,))}
    blocks = {}
    for mb in (None, 2):
        curv = Curvature(m, [(m.fc, "weight")], [batch], loss_fn=lambda o, b: nn.functional.cross_entropy(o, b["y"]),
                         forward_fn=lambda model, b: model(b["x"], b["offset"]))
        collect_fisher(curv, block_size=6, micro_batch=mb, engine=engine, progress=False)
        blocks[mb] = curv.fisher["fc.weight"].blocks
    assert rel(blocks[2], blocks[None]) < 1e-5
    with pytest.raises(PruningInputError, match="^micro_batch"):
        collect_fisher(curv, block_size=6, micro_batch=1.5, progress=False)


def test_padded_rows_stay_out_of_a_gram_fed_the_flattened_tokens():
    """A Linear fed (batch * tokens, features), as a MoE router takes the hidden states, counted padded rows."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.a, self.router = nn.Embedding(20, 6), nn.Linear(6, 6), nn.Linear(6, 4)

        def forward(self, input_ids, attention_mask=None):
            h = self.a(self.emb(input_ids))
            return self.router(h.view(-1, h.shape[-1]))

    net = Net()
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    curv = Curvature.layerwise(net, [(net.a, "weight"), (net.router, "weight")],
                               [{"input_ids": ids, "attention_mask": mask}], progress=False)
    with torch.no_grad():
        x = net.a(net.emb(ids))[mask.bool()].double()
    assert curv.counts["router.weight"] == curv.counts["a.weight"] == 7
    torch.testing.assert_close(curv.hessians["router.weight"].double(), 2 * x.T @ x / 7, rtol=1e-5, atol=1e-6)


def _per_sample_reference(net, batches, layers):
    """s_r = 1/N sum_i sum_positions (d loss_i / d y_{i,r})^2 with loss_i each sample's own cross-entropy."""
    ref = {k: 0.0 for k in layers}
    n = 0
    for x, y in batches:
        for i in range(y.shape[0]):
            outs = {}

            def keep(_m, _a, o, k):
                o.retain_grad()
                outs[k] = o
            hooks = [m.register_forward_hook(lambda _m, _a, o, k=k: keep(_m, _a, o, k)) for k, m in layers.items()]
            nn.functional.cross_entropy(net(x)[i:i + 1], y[i:i + 1]).backward()
            for h in hooks:
                h.remove()
            net.zero_grad()
            for k, o in outs.items():
                ref[k] = ref[k] + (o.grad.double().reshape(-1, o.shape[-1]) ** 2).sum(0)
            n += 1
    return {k: v / n for k, v in ref.items()}


def test_per_sample_output_sensitivity_of_a_sequence_first_layer():
    """The per-sample scale is the batch size, not the layer output's leading dimension (time, here)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):                              # x: (T, B, 4)
            return self.head(torch.tanh(self.a(x)).mean(0))

    net = Net()
    batches = [(torch.randn(7, 2, 4), torch.randint(0, 3, (2,))) for _ in range(3)]
    curv = Curvature.layerwise(net, [(net.a, "weight"), (net.head, "weight")], batches, progress=False,
                               loss_fn=nn.functional.cross_entropy)
    got = curv.output_sensitivity(per_sample=True)
    ref = _per_sample_reference(net, batches, {"a.weight": net.a, "head.weight": net.head})
    for k in ref:
        torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-12)


def test_output_sensitivity_of_an_unbatched_conv2d_equals_the_batched_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(3, 6, 4)     # C_out = 4 = W: a wrong channel axis gave per-column sums of the same shape
    sq = lambda out, _t: (out ** 2).sum()   # noqa: E731
    get = lambda b: Curvature.layerwise(nn.Sequential(conv), [(conv, "weight")], [(b, torch.zeros(1))],  # noqa
                                        loss_fn=sq, progress=False).output_sensitivity()["0.weight"]
    torch.testing.assert_close(get(x), get(x.unsqueeze(0)), rtol=1e-6, atol=1e-9)


def test_batch_size_of_outputs_without_logits():
    """A dict / ModelOutput without logits (BertModel's) counted as batch 1, mis-scaling per-sample sensitivity."""
    from collections import OrderedDict

    from obs_plugins.curvature.core import _leading_dim
    h = torch.zeros(4, 3, 2)
    assert _leading_dim({"last_hidden_state": h, "pooler_output": torch.zeros(4, 2)}) == 4
    assert _leading_dim(OrderedDict(logits=torch.zeros(5, 2), hidden=h)) == 5
    assert _leading_dim((h,)) == 4 and _leading_dim(h) == 4 and _leading_dim(torch.tensor(1.0)) == 1


def test_per_sample_fisher_refuses_sequence_first_inputs():
    """(time, batch, features) inputs with (batch,) targets were split along time: 21 "samples" for 6."""
    from obs_plugins.curvature.fisher import collect_fisher
    from obs_plugins.errors import PruningInputError

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x).mean(0)

    net = Net()
    batches = [(torch.randn(7, 2, 4), torch.randint(0, 3, (2,))) for _ in range(3)]
    curv = Curvature(net, [(net.a, "weight")], batches, loss_fn=nn.functional.cross_entropy)
    with pytest.raises(PruningInputError, match="inputs have 7 rows and the targets 2"):
        collect_fisher(curv, block_size=4, progress=False)


# ------------------------------------------------------------------------------------------ pinned by mutation testing
class _TwoLinear(nn.Module):
    """Two 4x4 Linear layers; each subclass wires them differently."""

    def __init__(self, d=4):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, d)


class _Reused(_TwoLinear):
    """l1 runs twice (on x, then on a = l1(x)); l2 reads the very tensor of l1's first call."""

    def forward(self, x):
        a = self.l1(x)
        return self.l1(a) + self.l2(a)


class _ChangedInPlace(_TwoLinear):
    def forward(self, x):
        x = x.clone()
        a = self.l1(x)
        x.mul_(3.0)            # the same tensor object, a new version
        return a + self.l2(x)


def test_a_layer_sharing_an_input_with_a_reused_layer_gets_only_its_own_rows():
    m = _Reused()
    xs = [torch.randn(5, 4) for _ in range(2)]
    curv = Curvature.layerwise(m, [(m.l1, "weight"), (m.l2, "weight")], xs, sequential=False, progress=False)
    with torch.no_grad():
        a = torch.cat([m.l1(x) for x in xs])
    assert curv.counts["l2.weight"] == 10
    assert rel(curv.hessians["l2.weight"], gram64(a)) < 1e-5


def test_a_layer_reading_an_input_changed_in_place_gets_the_new_values():
    m = _ChangedInPlace()
    xs = [torch.randn(5, 4) for _ in range(2)]
    curv = Curvature.layerwise(m, [(m.l1, "weight"), (m.l2, "weight")], xs, sequential=False, progress=False)
    assert rel(curv.hessians["l1.weight"], gram64(torch.cat(xs))) < 1e-5
    assert rel(curv.hessians["l2.weight"], gram64(torch.cat(xs) * 3)) < 1e-5


def test_a_float64_accumulation_is_float64_and_exact():
    lin = nn.Linear(6, 3)
    xs = [torch.randn(4, 6) * 1e3 + 1e4 for _ in range(3)]
    curv = Curvature.layerwise(nn.Sequential(lin), [(lin, "weight")], xs, dtype=torch.float64, progress=False)
    H = curv.hessians["0.weight"]
    assert H.dtype == torch.float64
    assert rel(H, gram64(torch.cat(xs))) < 1e-12


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_layerwise_refuses_a_half_precision_accumulation(dt):
    lin = nn.Linear(3, 2)
    with pytest.raises(PruningInputError, match="dtype"):
        Curvature.layerwise(nn.Sequential(lin), [(lin, "weight")], [torch.randn(4, 3)], dtype=dt, progress=False)


def test_a_stage_fed_a_tensor_changed_in_place_by_an_earlier_layer_comes_after_it():
    from obs_plugins.curvature.collect import input_stages
    from obs_plugins.targets import resolve_targets

    class InPlaceBlock(_TwoLinear):
        def forward(self, x):
            x = x.clone()
            x.add_(self.l1(x))     # l2 reads the same tensor object, changed by l1's output
            return self.l2(x)

    blk = InPlaceBlock()
    ts = resolve_targets(blk, [(blk.l1, "weight"), (blk.l2, "weight")])
    stages = input_stages(blk, ts, ((torch.randn(3, 4),), {}))
    assert [[t.key for t in st] for st, _ in stages] == [["l1.weight"], ["l2.weight"]]


def test_a_three_tuple_batch_passes_the_whole_batch_to_the_loss():
    model = nn.Sequential(nn.Linear(3, 2))
    x, y, wt = torch.randn(4, 3), torch.randn(4, 2), torch.rand(4, 1)
    curv = Curvature(model, [(model[0], "weight")], [(x, y, wt)],
                     loss_fn=lambda out, b: (((out - b[1]) ** 2) * b[2]).mean())
    with torch.no_grad():
        ref = float((((model(x) - y) ** 2) * wt).mean())
    assert curv.loss() == pytest.approx(ref, rel=1e-6)


def test_a_fisher_target_with_zero_gradients_gets_an_absolute_damping():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
    curv = Curvature(model, [(model[0], "weight")], [(torch.randn(5, 3), torch.randint(0, 2, (5,)))],
                     loss_fn=ce_loss)
    collect_fisher(curv, block_size=4, rel_damp=0.1, progress=False)
    f = curv.fisher["0.weight"]
    assert torch.all(f.blocks == 0)
    assert torch.allclose(f.damp.float(), torch.full_like(f.damp.float(), 0.1))
    assert torch.allclose(f.inverse, torch.eye(4).expand(3, 4, 4) / 0.1)


def test_a_fisher_block_that_fails_climbs_the_ladder_alone():
    from obs_plugins.curvature.fisher import _factor_blocks
    from obs_plugins.curvature.linalg import DEFAULT_LADDER
    Fb = torch.tensor([[[1.0, 1.2], [1.2, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    inv, used, _ = _factor_blocks("k", Fb, 4, 1e-2, DEFAULT_LADDER)
    assert used.tolist() == [0.3, 0.01]
    assert torch.allclose(inv[0], torch.linalg.inv(Fb[0] + 0.3 * torch.eye(2, dtype=torch.float64)))
    assert torch.allclose(inv[1], torch.eye(2, dtype=torch.float64) / 1.01)


@pytest.mark.parametrize("rd", [0.0, -0.1])
def test_fisher_rel_damp_must_be_positive(rd):
    model = nn.Sequential(nn.Linear(3, 2))
    curv = Curvature(model, [(model[0], "weight")], [(torch.randn(4, 3), torch.randint(0, 2, (4,)))],
                     loss_fn=ce_loss)
    with pytest.raises(PruningInputError, match="rel_damp"):
        collect_fisher(curv, rel_damp=rd, progress=False)


def test_the_woodbury_memory_budget_counts_only_the_samples_used():
    model = nn.Sequential(nn.Linear(5, 3))
    batches = [(torch.randn(6, 5), torch.randint(0, 3, (6,))) for _ in range(2)]
    curv = Curvature(model, [(model[0], "weight")], batches, loss_fn=ce_loss)
    need = fisher_bytes(15, 8, mode="woodbury", samples=2)
    rep = collect_fisher(curv, block_size=8, mode="woodbury", num_samples=2, memory_budget_mb=need / 2**20,
                         progress=False)
    assert rep["bytes"] == need


def test_engine_vmap_raises_where_auto_falls_back_to_the_loop_and_says_so():
    model = nn.Sequential(nn.Linear(3, 2))

    def data_dependent(m, b):                      # float() of a traced tensor: not vmappable
        return m(b[0]) if float(b[0].sum()) > -1e30 else -m(b[0])

    curv = Curvature(model, [(model[0], "weight")], [(torch.randn(4, 3), torch.randint(0, 2, (4,)))],
                     loss_fn=ce_loss, forward_fn=data_dependent)
    with pytest.raises(Exception):
        collect_fisher(curv, engine="vmap", progress=False)
    rep = collect_fisher(curv, engine="auto", progress=False)
    assert rep["engine"] == "loop" and rep["vmap_error"]


def test_hutchinson_standard_error_is_the_unbiased_one():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)) + 0.5
    seen = []

    def mv(v):
        seen.append(v.clone())
        return A @ v

    est, se = hutchinson_trace(mv, 5, probes=3, distribution="gaussian")
    vals = torch.tensor([float(z @ A @ z) for z in seen], dtype=torch.float64)
    assert est == pytest.approx(float(vals.mean()), rel=1e-12)
    assert se == pytest.approx(float(vals.std(unbiased=True)) / math.sqrt(3), rel=1e-12)


def test_largest_magnitude_finds_a_dominant_negative_eigenvalue():
    A = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    assert top_eigenvalue(lambda v: A @ v, 4, steps=4, which="LM") == pytest.approx(-5.0)
    assert top_eigenvalue(lambda v: A @ v, 4, steps=4, which="LA") == pytest.approx(3.0)


def test_slq_probes_are_independent_draws():
    D = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    _, w = slq_density(lambda v: D @ v, 6, steps=6, probes=2, distribution="gaussian")
    assert not torch.allclose(w[:6], w[6:])


def test_hessian_trace_uses_the_batches_it_is_given():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    b0, b1 = [(torch.randn(5, 3), torch.randn(5, 2)) for _ in range(2)]
    params = [(model[0], "weight"), (model[2], "weight")]

    def mse(o, y):
        return ((o - y) ** 2).mean()

    both = Curvature(model, params, [b0, b1], loss_fn=mse)
    only0 = Curvature(model, params, [b0], loss_fn=mse)
    on_b0 = hessian_trace(both, probes=8, batches=[b0])[0]
    assert on_b0 == pytest.approx(hessian_trace(only0, probes=8)[0], rel=1e-9)
    assert on_b0 != pytest.approx(hessian_trace(both, probes=8)[0], rel=1e-6)


def test_the_gate_factor_runs_the_model_in_eval_mode_and_restores_train_mode():
    from obs_plugins.curvature.gates import gate_ggn_factor
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3))
    X = torch.randn(8, 4)
    sites = {model[3]: torch.tensor([0, 0, 1, 1, 2, 2])}
    model.train()
    B_train = gate_ggn_factor(model, sites, [(X, None)])
    assert model.training and model[2].training
    assert torch.allclose(B_train, gate_ggn_factor(model.eval(), sites, [(X, None)]))


def test_gate_ids_at_or_above_n_gates_are_refused_by_name():
    from obs_plugins.curvature.gates import gate_ggn_factor
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(PruningInputError, match="gate ids"):
        gate_ggn_factor(model, {model[1]: torch.tensor([0, 1, 2])}, [(torch.randn(4, 4), None)], n_gates=2)


def test_loss_and_grad_of_a_float64_model_stays_float64():
    """The gradient OBS-IHT's iterations step along: float64 for a float64 model (it was rounded to float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g))
               for _ in range(3)]
    curv = Curvature.layerwise(model, [(model[0], "weight"), (model[2], "weight")], batches,
                               loss_fn=nn.functional.cross_entropy, progress=False)
    _, grads = curv.loss_and_grad()
    x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches])
    ref = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), [model[0].weight, model[2].weight])
    for k, r in zip(("0.weight", "2.weight"), ref):
        assert grads[k].dtype == torch.float64
        assert float((grads[k] - r).abs().max()) < 1e-14
