"""Global allocation through prune.global_unstructured (issue 19): loss-comparable saliencies, exact per-layer
bounds, one ranking equal to a brute-force walk, torch's loss convention, rejected steps change nothing."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import OBSIHT, Curvature, OBSIHTConfig, PruningInputError, api
from obs_plugins.masks import allocate_global
from obs_plugins.methods.obs_iht.allocation import global_saliency, layer_bounds


def classifier(seed=0):
    """A 3-layer MLP classifier (12-16-16-4) fit for a few steps, and 6 batches of (x, y)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(384, 12, generator=g)
    y = (X[:, :4].argmax(1) + (X[:, 4] > 1).long()) % 4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model, [(model[i], "weight") for i in (0, 2, 4)], [(X[i:i + 64], y[i:i + 64]) for i in range(0, 384, 64)]


def greedy(sal, prior, k, lo, hi):
    """Brute force: each tensor's `lo` lowest first, then walk the one sorted list skipping tensors at `hi`."""
    counts = {key: 0 for key in sal}
    taken = set()
    for key in sal:
        s, keep = sal[key].reshape(-1).tolist(), prior[key].reshape(-1).tolist()
        for i in sorted((i for i in range(len(s)) if keep[i]), key=lambda i: (s[i], i))[:lo[key]]:
            taken.add((key, i))
        counts[key] = lo[key]
    entries = sorted(((v, n, key, i) for n, key in enumerate(sal) for i, v in enumerate(sal[key].reshape(-1).tolist())
                      if bool(prior[key].reshape(-1)[i]) and (key, i) not in taken))
    rest = k - sum(lo.values())
    for v, n, key, i in entries:
        if rest == 0:
            break
        if counts[key] < hi[key]:
            counts[key] += 1
            rest -= 1
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_allocate_global_equals_the_brute_force_walk(seed):
    g = torch.Generator().manual_seed(seed)
    sal = {"a": torch.rand(6, 5, generator=g), "b": torch.rand(4, 3, generator=g) * 0.5, "c": torch.rand(7, generator=g)}
    prior = {k: torch.rand(v.shape, generator=g) > 0.2 for k, v in sal.items()}
    avail = {k: int(p.sum()) for k, p in prior.items()}
    lo = {k: int(torch.randint(0, 3, (1,), generator=g)) for k in sal}
    hi = {k: max(lo[k], avail[k] - int(torch.randint(0, 4, (1,), generator=g))) for k in sal}
    for k_total in range(sum(lo.values()), sum(hi.values()) + 1):
        assert allocate_global(sal, prior, k_total, min_prune=lo, max_prune=hi) == greedy(sal, prior, k_total, lo, hi)
    unbounded = {k: avail[k] for k in sal}
    assert allocate_global(sal, prior, 10) == greedy(sal, prior, 10, {k: 0 for k in sal}, unbounded)
    with pytest.raises(PruningInputError, match="bounds"):
        allocate_global(sal, prior, sum(hi.values()) + 1, min_prune=lo, max_prune=hi)


def test_output_sensitivity_is_the_summed_squared_output_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    model = nn.Sequential(lin)
    batches = [(torch.randn(8, 5), torch.randn(8, 3)) for _ in range(3)]
    mse = lambda out, y: ((out - y) ** 2).mean()  # noqa: E731
    sens = Curvature(model, [(lin, "weight")], batches, loss_fn=mse).output_sensitivity()["0.weight"]
    ref = torch.zeros(3, dtype=torch.float64)
    for x, y in batches:  # dL/dy = 2 (y_hat - y) / numel, by hand
        out = (x.double() @ lin.weight.double().T + lin.bias.double())
        ref += ((2 * (out - y.double()) / out.numel()) ** 2).sum(0)
    assert torch.allclose(sens.double(), ref / 3, rtol=1e-5)


def test_output_sensitivity_asks_for_no_weight_gradient():
    """The pass needs dL/dy of each layer only: autograd is asked for the layer outputs, so it skips every
    weight-gradient product.  Three Linear layers, one batch: 3 forward products + 2 input-gradient products
    (layer 1's input needs none); asking for the weights' gradients added 3 more."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = [(m, "weight") for m in model if isinstance(m, nn.Linear)]
    curv = Curvature(model, params, [(torch.randn(8, 6), torch.randint(0, 3, (8,)))],
                     loss_fn=nn.functional.cross_entropy)
    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in products
            return func(*args, **(kwargs or {}))
    with Count():
        sens = curv.output_sensitivity()
    assert Count.n == 5
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in sens.values())


class _Twice(nn.Module):
    """``mid`` runs twice; its first output is changed in place (or not) before the second call."""

    def __init__(self, inplace):
        super().__init__()
        self.inplace, self.inp, self.mid, self.out = inplace, nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x).detach()                     # no target upstream of mid's first call
        h = nn.functional.relu(self.mid(h), inplace=self.inplace)
        return self.out(torch.tanh(self.mid(h)))


@pytest.mark.parametrize("make", [
    lambda inplace: nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 6),
                                  nn.ReLU(inplace=inplace), nn.Linear(6, 3)),
    _Twice])
def test_output_sensitivity_of_layers_whose_output_is_changed_in_place(make):
    """An in-place op after a layer (VGG's ReLU(inplace=True)) gives its output a new autograd node; the gradient
    is still the layer's own output gradient, as without the in-place op (it was refused as 'no gradient', and a
    layer run twice lost its first call silently)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6 if make is _Twice else 5, generator=g), torch.randint(0, 3, (16,), generator=g))
               for _ in range(2)]
    sens = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = make(inplace)
        params = [(m, "weight") for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "inp"]
        sens.append(Curvature(model, params, batches, loss_fn=nn.functional.cross_entropy).output_sensitivity())
    assert sens[0].keys() == sens[1].keys()
    for k in sens[0]:
        assert torch.equal(sens[0][k], sens[1][k]), k


class _ViewOut(nn.Module):
    """A layer returning a view of its result (as Hugging Face's Conv1D does), then an in-place ReLU (or not)."""

    def __init__(self, inplace):
        super().__init__()
        self.inplace, self.a, self.b = inplace, nn.Linear(5, 6), nn.Linear(6, 3)
        self.a.register_forward_hook(lambda m, args, out: out.view(out.shape))

    def forward(self, x):
        return self.b(nn.functional.relu(self.a(x), inplace=self.inplace))


def test_output_sensitivity_of_a_view_output_changed_in_place():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    sens = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = _ViewOut(inplace)
        sens.append(Curvature(model, [(model.a, "weight"), (model.b, "weight")], batches,
                              loss_fn=nn.functional.cross_entropy).output_sensitivity())
    for k in sens[0]:
        assert torch.equal(sens[0][k], sens[1][k]), k


def test_output_sensitivity_of_a_target_that_runs_inside_the_loss():
    """A fused LM-head loss: forward_fn returns features and loss_fn runs the head (a target).  Its sensitivity is
    its output gradient, as when the head runs in the forward pass."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    torch.manual_seed(0)
    body, head = nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)
    model = nn.ModuleDict(dict(body=body, head=head))
    fused = Curvature(model, [(head, "weight")], batches, forward_fn=lambda m, b: m["body"](b[0]),
                      loss_fn=lambda feats, y: nn.functional.cross_entropy(head(feats), y)).output_sensitivity()
    plain = Curvature(nn.Sequential(body, head), [(head, "weight")], batches,
                      loss_fn=nn.functional.cross_entropy).output_sensitivity()
    assert torch.equal(fused["head.weight"], plain["1.weight"])


@pytest.mark.parametrize("amount", [0.8, 0.9, 0.95])
def test_global_unstructured_ranks_globally_within_exact_caps(amount):
    model, params, batches = classifier()
    curv = Curvature.layerwise(model, params, batches, loss_fn=nn.functional.cross_entropy, progress=False)
    W0 = {t.key: t.current().float() for t in curv.targets}
    sal = global_saliency(curv, curv.targets, W0, 0.01)
    prior = {k: torch.ones_like(w, dtype=torch.bool) for k, w in W0.items()}
    k = round(amount * sum(w.numel() for w in W0.values()))
    lo, hi, _ = layer_bounds(prior, k, 0.0, None)
    expected = greedy(sal, prior, k, lo, hi)
    method = prune.global_unstructured(params, pruning_method=OBSIHT, amount=amount, curvature=curv, progress=False)
    got = {t.key: int((t.current() == 0).sum()) for t in curv.targets}
    assert got == expected
    cap = min(0.99, amount + 0.2)
    for m, _ in params:
        s = float((m.weight == 0).float().mean())
        assert s <= cap + 1e-9 and s < 1.0            # never a whole layer
    assert sum(got.values()) == k                     # the exact total
    assert len(set(round(v / m.weight.numel(), 3) for v, (m, _) in zip(got.values(), params))) > 1  # not uniform
    del method


def test_user_caps_are_respected_exactly_and_bad_caps_fail_cleanly():
    model, params, batches = classifier()
    curv = Curvature.layerwise(model, params, batches, loss_fn=nn.functional.cross_entropy, progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="layer_max_sparsity"):
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.9, curvature=curv,
                                  layer_max_sparsity=0.8, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not prune.is_pruned(model)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.7, curvature=curv, layer_min_sparsity=0.5,
                              layer_max_sparsity=0.75, progress=False)
    for m, _ in params:
        z = int((m.weight == 0).sum())
        assert int(0.5 * m.weight.numel() + 0.999) <= z <= int(0.75 * m.weight.numel())


def test_loss_convention_cross_entropy_on_xy_batches_and_a_clear_error_otherwise():
    model, params, batches = classifier()
    curv = Curvature.layerwise(model, params, batches, loss_fn=nn.functional.cross_entropy, progress=False)
    with torch.no_grad():
        ref = sum(float(nn.functional.cross_entropy(model(x), y)) for x, y in batches) / len(batches)
    assert abs(curv.loss() - ref) < 1e-6
    bad = Curvature.layerwise(model, params, batches, loss_fn=lambda out: out.sum(), progress=False)
    with pytest.raises(PruningInputError, match="loss_fn"):
        bad.loss()


def test_a_rejected_step_leaves_the_weights_of_iteration_one():
    model, params, batches = classifier()
    curv = Curvature.layerwise(model, params, batches, loss_fn=nn.functional.cross_entropy, progress=False)
    p1 = api.plan(OBSIHTConfig(iterations=1, allocation="global", progress=False), curvature=curv, amount=0.8)
    # a step of 25x the weight norm can only raise the held-out loss: it must be rejected
    p2 = api.plan(OBSIHTConfig(iterations=2, allocation="global", step_sizes=(25.0,), max_step=50.0,
                               progress=False), curvature=curv, amount=0.8)
    h = p2.report["history"]
    assert h[-1]["accepted"] is False and p2.report["best_iteration"] == 1
    for k, e in p1.entries.items():
        assert torch.equal(e.mask, p2.entries[k].mask) and torch.equal(e.new_weight, p2.entries[k].new_weight)


def test_default_cap_yields_when_the_request_needs_more():
    """Found by tests/test_properties.py: 20 of 21 weights (s = 0.95) cannot be pruned under the default cap
    min(0.99, s + 0.2) on a 6- and a 15-weight layer (5 + 14 = 19 < 20); the default cap yields, a user's cap
    does not."""
    prior = {"a": torch.ones(3, 2, dtype=torch.bool), "b": torch.ones(5, 3, dtype=torch.bool)}
    lo, hi, bounds = layer_bounds(prior, 20, 0.0, None)
    assert hi == {"a": 6, "b": 15} and bounds["max"] == 1.0
    lo, hi, bounds = layer_bounds(prior, 10, 0.0, None)  # s = 10/21: the ordinary cap
    assert bounds["max"] == pytest.approx(10 / 21 + 0.2) and hi == {"a": 4, "b": 10}
    with pytest.raises(PruningInputError, match="layer_max_sparsity"):
        layer_bounds(prior, 20, 0.0, 0.9)


def test_the_floor_follows_when_the_default_cap_yields():
    """layer_min_sparsity near the overall sparsity: the floors were clipped to the old cap (0.99) and kept after
    the cap yielded, so a layer ended at 0.99 under a floor of 0.995; they are now recomputed."""
    prior = {"a": torch.ones(20, 10, dtype=torch.bool), "b": torch.ones(10, 20, dtype=torch.bool)}
    lo, hi, bounds = layer_bounds(prior, 398, 0.995, None)
    assert bounds["max"] == 1.0 and lo == {"a": 199, "b": 199}


def test_allocate_proportional_is_exact_and_respects_room():
    from obs_plugins.masks import allocate_proportional
    prior = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(10, dtype=torch.bool),
             "c": torch.tensor([True] * 4 + [False] * 6)}
    assert allocate_proportional({"a": 1.0, "b": 1.0, "c": 2.0}, prior, 8) == {"a": 2, "b": 2, "c": 4}
    # c can take only 4: the rest goes to a and b in proportion (1:3)
    assert allocate_proportional({"a": 1.0, "b": 3.0, "c": 100.0}, prior, 12) == {"a": 2, "b": 6, "c": 4}
    assert allocate_proportional({"a": 0.0, "b": 0.0, "c": 0.0}, prior, 24) == {"a": 10, "b": 10, "c": 4}
    with pytest.raises(PruningInputError, match="amount"):
        allocate_proportional({"a": 1.0, "b": 1.0, "c": 1.0}, prior, 25)


def test_owl_gives_blocks_with_more_outliers_lower_sparsity():
    """OWL on a tiny 3-block Llama: the block sparsities are s - (r_l - mean r) with the outlier ratios r
    rescaled to [0, 2 lambda] (recomputed here by hand from the Grams), every tensor of a block gets its block's
    sparsity, and the total is exact."""
    from test_sequential import llama_problem
    from obs_plugins.methods.obs_iht import solve
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    grams = {k: v.clone() for k, v in curv.hessians.items()}  # OWL's scores use the dense model's Grams
    total = sum(m.weight.numel() for m, _ in params)
    k = total // 2
    plan = solve(curv, k, OBSIHTConfig(allocation="owl", owl_lambda=0.1, owl_m=3.0, progress=False))
    r = plan.report
    ratios = []
    for b in range(3):
        ws = [(m, n) for m, n in params if any(m is x for x in model.model.layers[b].modules())]
        sc = torch.cat([(m.weight.abs() * torch.diagonal(grams[key]).sqrt()).flatten()
                        for (m, _), key in zip(ws, [curv.target(m, "weight").key for m, _ in ws])])
        ratios.append(float((sc > 3.0 * sc.mean()).float().mean()))
    assert [r["owl_outlier_ratio"][str(b)] for b in range(3)] == pytest.approx(ratios)
    lo, hi = min(ratios), max(ratios)
    scaled = [(x - lo) / (hi - lo) * 0.2 for x in ratios]
    want = [0.5 - (x - sum(scaled) / 3) for x in scaled]
    assert [r["owl_block_sparsity"][str(b)] for b in range(3)] == pytest.approx(want)
    most, least = ratios.index(hi), ratios.index(lo)
    assert r["owl_block_sparsity"][str(most)] < 0.5 < r["owl_block_sparsity"][str(least)]
    assert sum(int((~e.mask).sum()) for e in plan.entries.values()) == k
    for key, e in plan.entries.items():
        b = int(key.split(".")[2])
        assert abs(float((~e.mask).float().mean()) - want[b]) < 2 / e.mask.numel() + 1e-6


def test_owl_needs_a_block_stack():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    params = [(model[0], "weight"), (model[2], "weight")]
    curv = Curvature.layerwise(model, params, [torch.randn(8, 6)], progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="owl"):
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, allocation="owl",
                                  progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
