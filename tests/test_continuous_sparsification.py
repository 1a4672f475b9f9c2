"""Continuous Sparsification: gating, schedule, rewinding, exact tickets, save/load mid-search, torch.prune flow."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from obs_plugins import (ContinuousSparsification, ContinuousSparsifier, CSConfig, MagnitudeConfig, PruningInputError,
                         api, get_method)
from obs_plugins.methods.continuous_sparsification import plan_from_sparsifier


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def data(n=4, in_shape=(6,), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, *in_shape, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def pairs(model):
    return [(m, "weight") for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def run_epoch(model, cs, opt, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + cs.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cs.step()
    cs.step_epoch()


def searched(model=None, **kw):
    model = model or mlp()
    kw = {"rounds": 2, "epochs": 2, "progress": False, "penalty": 1e-3, **kw}
    cs = ContinuousSparsifier(model, pairs(model), **kw)
    cs.fit(data(), F.cross_entropy, lr=0.1)
    return model, cs


def test_gate_gives_gradients_to_weights_and_scores():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), progress=False)
    assert parametrize.is_parametrized(model[0], "weight")
    assert not any(s is p for s in cs.parameters() for p in model.parameters())  # scores stay out of the model
    x, y = data(1)[0]
    # s0 = 0, "paper" scale 1/sigmoid(0) = 2: the gated network starts as the dense one
    w = model[0].parametrizations.weight.original.detach().clone()
    assert torch.allclose(model[0].weight, w)
    (F.cross_entropy(model(x), y) + cs.penalty()).backward()
    for t in cs.targets:
        s = cs.scores[t.key]
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.module.parametrizations.weight.original.grad.abs().sum() > 0
    groups = cs.param_groups(lr=0.1, weight_decay=0.5)
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.1 and groups[0]["weight_decay"] == 0.5
    assert ContinuousSparsifier(mlp(), ["0"], mask_lr=0.01,
                                progress=False).param_groups(lr=0.1)[1]["lr"] == 0.01


def test_gate_and_penalty_values():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), mask_init=1.0, mask_scale="none", penalty=0.5, epochs=3,
                              progress=False)
    w = model[2].parametrizations.weight.original.detach()
    assert torch.allclose(model[2].weight, w * torch.sigmoid(torch.tensor(1.0)))
    n = sum(p.numel() for _, p in [(0, model[0].weight), (2, model[2].weight)])
    assert torch.allclose(cs.penalty(), torch.tensor(0.5 * n * torch.sigmoid(torch.tensor(1.0)).item()))
    # channel granularity: one score per output channel, counted once per weight of the channel
    model = cnn()
    cs = ContinuousSparsifier(model, ["0", "3"], granularity="channel", penalty=1.0, progress=False)
    assert cs.scores["0.weight"].shape == (4, 1, 1, 1) and cs.scores["3.weight"].shape == (3, 1)
    assert torch.allclose(cs.penalty(), torch.tensor(0.5 * (4 * 9 + 3 * 64)))


def test_beta_schedule_reaches_final_temperature_at_last_epoch_and_rounds_reset():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), final_temperature=200.0, epochs=4, rounds=3, progress=False)
    sched = cs.schedule()
    assert sched[0] == 1.0 and sched[-1] == pytest.approx(200.0, rel=1e-12) and len(sched) == 4
    assert all(a < b for a, b in zip(sched, sched[1:]))
    seen = []
    opt = torch.optim.SGD(cs.param_groups(lr=0.1))
    while not cs.done:
        seen.append((cs.round, cs.epoch, cs.temperature))
        run_epoch(model, cs, opt, data(2))
    assert [r for r, _, _ in seen] == [0] * 4 + [1] * 4 + [2] * 4
    assert [b for _, _, b in seen] == sched * 3
    assert seen[-1][2] == pytest.approx(200.0)
    with pytest.raises(RuntimeError, match="finish"):
        cs.step_epoch()
    # between rounds: s <- min(beta_T * s, s0), then beta restarts at 1
    cs = ContinuousSparsifier(mlp(), ["0"], mask_init=0.5, epochs=3, rounds=2, progress=False)
    with torch.no_grad():
        cs.scores["0.weight"].normal_()
    cs.step_epoch()
    cs.step_epoch()
    before = cs.scores["0.weight"].detach().clone()
    cs.step_epoch()
    assert (cs.round, cs.epoch, cs.temperature) == (1, 0, 1.0)
    assert torch.equal(cs.scores["0.weight"].detach(), torch.clamp(200.0 * before, max=0.5))


def test_rewind_restores_exactly_the_saved_weights_and_removes_the_gates():
    model = mlp()
    params = list(model.parameters())
    cs = ContinuousSparsifier(model, pairs(model), rounds=2, epochs=2, rewind_step=3, penalty=1e-3, progress=False)
    opt = torch.optim.SGD(cs.param_groups(lr=0.1), lr=0.1)
    batches = data(5)
    saved = None
    for x, y in batches:
        (F.cross_entropy(model(x), y) + cs.penalty()).backward()
        opt.step()
        opt.zero_grad()
        cs.step()
        if cs.global_step == 3:
            saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    cs.step_epoch()
    for _ in range(3):
        run_epoch(model, cs, opt, batches)
    assert cs.done
    assert not torch.equal(model[0].parametrizations.weight.original, saved["0.parametrizations.weight.original"])
    cs.finish(rewind=True)
    assert type(model[0]) is nn.Linear and not parametrize.is_parametrized(model[0])
    assert {id(p) for p in model.parameters()} == {id(p) for p in params}  # the same Parameter objects
    assert isinstance(model[0].weight, nn.Parameter)
    for n, p in model.named_parameters():
        saved_name = n.replace("weight", "parametrizations.weight.original")
        assert torch.equal(p, saved[saved_name]), n
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with pytest.raises(RuntimeError, match="finished"):
        cs.step()


@pytest.mark.parametrize("amount", [0.0, 0.37, 0.9, 1.0, 100])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_requested_sparsity_is_hit_exactly(amount, allocation):
    model, cs = searched(allocation=allocation)
    n = sum(t.orig().numel() for t in cs.targets)
    k = round(amount * n) if isinstance(amount, float) else amount
    plan = cs.make_plan(amount=amount)
    assert sum(int((~e.mask).sum()) for e in plan.entries.values()) == k
    r = plan.report
    assert r["requested_sparsity"] == pytest.approx(k / n)
    assert r["natural_minus_requested"] == pytest.approx(r["natural_sparsity"] - k / n)
    natural = sum(int((cs.scores[t.key] <= 0).sum()) for t in cs.targets) / n
    assert r["natural_sparsity"] == pytest.approx(natural)
    if allocation == "global" and 0 < k < n:  # lowest scores go first
        pruned = torch.cat([cs.scores[key].detach()[~e.mask] for key, e in plan.entries.items()])
        kept = torch.cat([cs.scores[key].detach()[e.mask] for key, e in plan.entries.items()])
        assert pruned.max() <= kept.min()
    if allocation == "uniform":
        for key, e in plan.entries.items():
            assert abs(int((~e.mask).sum()) - k * e.mask.numel() / n) <= 1


def test_state_survives_save_load_mid_search():
    def new():
        model = mlp()
        cs = ContinuousSparsifier(model, pairs(model), rounds=2, epochs=3, rewind_step=2, penalty=1e-3,
                                  progress=False)
        opt = torch.optim.SGD(cs.param_groups(lr=0.1), lr=0.1, momentum=0.9)
        return model, cs, opt

    batches = data(3)
    model, cs, opt = new()
    for _ in range(4):  # into round 1
        run_epoch(model, cs, opt, batches)
    assert (cs.round, cs.epoch) == (1, 1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "cs": cs.state_dict(), "opt": opt.state_dict()}, buf)
    while not cs.done:
        run_epoch(model, cs, opt, batches)
    cs.finish()

    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model2 = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    cs2 = ContinuousSparsifier(model2, pairs(model2), rounds=2, epochs=3, rewind_step=2, penalty=1e-3,
                               progress=False)
    opt2 = torch.optim.SGD(cs2.param_groups(lr=0.1), lr=0.1, momentum=0.9)
    model2.load_state_dict(state["model"])
    cs2.load_state_dict(state["cs"])
    opt2.load_state_dict(state["opt"])
    assert (cs2.round, cs2.epoch, cs2.global_step) == (1, 1, 12)
    while not cs2.done:
        run_epoch(model2, cs2, opt2, batches)
    cs2.finish()
    for k in cs.scores:
        assert torch.equal(cs.scores[k], cs2.scores[k])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(cs.make_plan(amount=0.5).entries["0.weight"].mask,
                       cs2.make_plan(amount=0.5).entries["0.weight"].mask)
    model3 = mlp()
    with pytest.raises(PruningInputError, match="config"):
        ContinuousSparsifier(model3, pairs(model3), rounds=3, epochs=3, rewind_step=2, penalty=1e-3,
                             progress=False).load_state_dict(state["cs"])


@pytest.mark.parametrize("kw, arg", [({"penalty": -1.0}, "penalty"), ({"final_temperature": 1.0}, "final_temperature"),
                                     ({"final_temperature": 0.5}, "final_temperature"), ({"rounds": 0}, "rounds"),
                                     ({"epochs": 1}, "epochs"), ({"granularity": "row"}, "granularity"),
                                     ({"mask_scale": "x"}, "mask_scale"), ({"mask_lr": -1.0}, "mask_lr"),
                                     ({"bogus": 1}, "bogus"), ({"score_init": "gaussian"}, "score_init"),
                                     ({"score_init": None}, "score_init"),
                                     ({"score_init_spread": 0.0}, "score_init_spread"),
                                     ({"score_init_spread": float("nan")}, "score_init_spread"),
                                     ({"score_init_quantile": 1.5}, "score_init_quantile"),
                                     ({"score_init_quantile": "0.5"}, "score_init_quantile"),
                                     # tempered divides by sigmoid(beta * s_max): s_max = s0 = 0 is refused
                                     ({"mask_scale": "tempered"}, "mask_scale"),
                                     ({"mask_scale": "tempered", "score_init": "magnitude",
                                       "score_init_quantile": 1.0}, "mask_scale")])
def test_bad_config_names_the_argument_and_leaves_model_unchanged(kw, arg):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match=arg):
        ContinuousSparsifier(model, pairs(model), **kw)
    assert type(model[0]) is nn.Linear and not parametrize.is_parametrized(model[0])
    assert set(model.state_dict()) == set(before) and all(torch.equal(model.state_dict()[k], before[k])
                                                           for k in before)


@pytest.mark.parametrize("amount", [-0.1, 1.5, -3, "0.5"])
def test_bad_amount_leaves_model_unchanged(amount):
    model, cs = searched()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="amount"):
        prune.global_unstructured(pairs(model), pruning_method=ContinuousSparsification, amount=amount,
                                  sparsifier=cs)
    with pytest.raises(PruningInputError, match="amount"):
        cs.make_plan(amount=amount)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_fit_rejects_one_shot_iterators_and_missing_lr():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), progress=False)
    with pytest.raises(PruningInputError, match="train_loader"):
        cs.fit(iter(data()), F.cross_entropy, lr=0.1)
    with pytest.raises(PruningInputError, match="train_loader"):
        cs.fit((b for b in data()), F.cross_entropy, lr=0.1)
    with pytest.raises(PruningInputError, match="lr"):
        cs.fit(data(), F.cross_entropy)
    with pytest.raises(PruningInputError, match="optimizer"):
        cs.fit(data(), F.cross_entropy, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(PruningInputError, match="finish"):
        cs.make_plan(amount=0.5)
    assert cs.round == cs.epoch == cs.global_step == 0


def test_torch_prune_flow_exact_count_and_plain_model_after_remove():
    model, cs = searched()
    params = pairs(model)
    n = sum(m.weight.numel() for m, _ in params)
    expected = cs.make_plan(amount=0.9)
    prune.global_unstructured(params, pruning_method=ContinuousSparsification, amount=0.9, sparsifier=cs)
    assert sum(int((m.weight_mask == 0).sum()) for m, _ in params) == round(0.9 * n)
    for m, _ in params:
        key = "0.weight" if m is model[0] else "2.weight"
        assert torch.equal(m.weight_mask.bool(), expected.entries[key].mask)
    x = torch.randn(5, 6)
    out = model(x)
    for m, _ in params:
        prune.remove(m, "weight")
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(type(p) is nn.Parameter for p in model.parameters())
    assert torch.equal(model(x), out)
    assert sum(int((m.weight == 0).sum()) for m, _ in params) >= round(0.9 * n)
    # the registry handler gives the same plan
    spec = get_method("continuous_sparsification")
    assert spec.kind == "learned" and spec.config_cls is CSConfig
    assert torch.equal(plan_from_sparsifier(cs, 10).entries["2.weight"].mask,
                       cs.make_plan(k=10).entries["2.weight"].mask)


def test_second_prune_round_honours_prior_masks_and_new_search_on_pruned_model():
    model, cs = searched()
    params = pairs(model)
    n = sum(m.weight.numel() for m, _ in params)
    prune.global_unstructured(params, pruning_method=ContinuousSparsification, amount=0.5, sparsifier=cs)
    first = {id(m): m.weight_mask.clone() for m, _ in params}
    # a second search on the pruned model (gates on weight_orig, masks still applied), then 50% of the rest
    cs2 = ContinuousSparsifier(model, params, rounds=2, epochs=2, penalty=1e-3, progress=False)
    assert cs2.natural_sparsity() == 1.0  # s0 = 0: nothing has s > 0 yet
    cs2.fit(data(), F.cross_entropy, lr=0.1)
    assert hasattr(model[0], "weight_orig") and not parametrize.is_parametrized(model[0])
    prune.global_unstructured(params, pruning_method=ContinuousSparsification, amount=0.5, sparsifier=cs2)
    kept1 = n - round(0.5 * n)
    assert sum(int(m.weight_mask.sum()) for m, _ in params) == kept1 - round(0.5 * kept1)
    for m, _ in params:
        assert not (m.weight_mask.bool() & ~first[id(m)].bool()).any()  # pruned stays pruned


def test_channel_granularity_prunes_whole_channels():
    model = cnn()
    params = [(model[0], "weight"), (model[3], "weight")]
    cs = ContinuousSparsifier(model, params, granularity="channel", rounds=2, epochs=2, penalty=1e-3,
                              progress=False)
    cs.fit(data(in_shape=(1, 6, 6)), F.cross_entropy, lr=0.1)
    k = 2 * 9  # a count aligned with the conv's channels (9 weights each): exactly its 2 lowest-score channels
    plan = cs.make_plan(targets=[cs.targets[0]], k=k)
    mask = plan.entries["0.weight"].mask
    per_channel = mask.reshape(4, -1).sum(1)
    assert sorted(per_channel.tolist()) == [0, 0, 9, 9]
    order = torch.argsort(cs.scores["0.weight"].detach().reshape(-1), stable=True)
    assert set(torch.nonzero(per_channel == 0).reshape(-1).tolist()) == set(order[:2].tolist())
    # the torch.prune host with a count ending inside a channel: exact count, at most one partial channel
    prune.global_unstructured(params, pruning_method=ContinuousSparsification, amount=100, sparsifier=cs)
    masks = [model[0].weight_mask.reshape(4, -1), model[3].weight_mask]
    assert sum(int((m == 0).sum()) for m in masks) == 100
    partial = sum(int(((row == 0).any() and (row == 1).any())) for m in masks for row in m)
    assert partial <= 1


def test_keeps_dtype_and_fit_epochs_override():
    model = mlp().double()
    cs = ContinuousSparsifier(model, pairs(model), rounds=1, penalty=1e-3, progress=False)
    assert all(s.dtype == torch.float64 for s in cs.parameters())
    batches = [(x.double(), y) for x, y in data(2)]
    history = cs.fit(batches, F.cross_entropy, epochs=3, lr=0.1)
    assert [h["beta"] for h in history] == pytest.approx([1.0, 200.0 ** 0.5, 200.0])
    assert cs.finished and model[0].weight.dtype == torch.float64 and type(model[0]) is nn.Linear


# ---------------------------------------------------------------- score_init="magnitude" (issue 15: fine-tuning)
W8 = [0.3, -0.1, 2.0, -0.05, 0.7, -1.5, 0.2, 0.0]  # |w| ranks 4 2 7 1 5 6 3 0


def lin8():
    lin = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([W8]))
    return nn.Sequential(lin)


def test_magnitude_init_known_answer_on_a_1x8_linear():
    ranks = torch.tensor([[4., 2., 7., 1., 5., 6., 3., 0.]])
    cs = ContinuousSparsifier(lin8(), ["0"], score_init="magnitude", progress=False)
    s = cs.scores["0.weight"].detach()
    assert cs.score_init == "magnitude" and cs.mask_scale == "tempered"  # "auto" scale follows the init
    assert torch.allclose(s, ranks / 7 - 0.5, atol=1e-7, rtol=0)  # s0 + c (u - q), u = rank / (n - 1), q = 0.5
    assert torch.equal(torch.argsort(s.reshape(-1)), torch.argsort(torch.tensor(W8).abs()))
    cs = ContinuousSparsifier(lin8(), ["0"], score_init="magnitude", mask_init=0.25, score_init_spread=2.0,
                              score_init_quantile=0.75, progress=False)
    assert torch.allclose(cs.scores["0.weight"].detach(), 0.25 + 2.0 * (ranks / 7 - 0.75), atol=1e-6, rtol=0)
    # "auto" in the sparsifier itself is the paper: every score s0, gate scale 1/sigmoid(s0) = 2
    cs = ContinuousSparsifier(lin8(), ["0"], progress=False)
    assert cs.score_init == "constant" and cs.mask_scale == "paper"
    assert torch.equal(cs.scores["0.weight"].detach(), torch.zeros(1, 8)) and cs.scale_at(200.0) == 2.0


def test_magnitude_init_cut_before_training_keeps_exactly_the_top_k_magnitudes():
    model = lin8()
    cs = ContinuousSparsifier(model, ["0"], score_init="magnitude", progress=False)
    cs.finish(rewind=False)
    keep = cs.make_plan(amount=0.5).entries["0.weight"].mask
    assert keep.tolist() == [[True, False, True, False, True, True, False, False]]  # 0.3, 2.0, 0.7, -1.5
    assert cs.make_plan(k=7).entries["0.weight"].mask.tolist() == [[False] * 2 + [True] + [False] * 5]
    # two layers: the cut equals magnitude pruning with the same allocation (global ranking or per tensor)
    for allocation in ("global", "uniform"):
        model = mlp()
        cs = ContinuousSparsifier(model, pairs(model), score_init="magnitude", score_init_quantile=0.6,
                                  allocation=allocation, progress=False)
        cs.finish(rewind=False)
        for amount in (0.3, 0.6, 0.85):
            ours = cs.make_plan(amount=amount)
            ref = api.plan(MagnitudeConfig(allocation=allocation), targets=cs.targets, amount=amount)
            for key, e in ours.entries.items():
                assert torch.equal(e.mask, ref.entries[key].mask), (allocation, amount, key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_magnitude_init_of_a_half_precision_model_is_exactly_magnitude_pruning(dtype):
    """The scores stay float32 on a bf16/fp16 model: stored in the weights' dtype, 6144 ranks collapsed to ~1400
    distinct bf16 values and ties went by position, so the cut before training was not magnitude pruning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype)
    for allocation in ("global", "uniform"):
        cs = ContinuousSparsifier(model, pairs(model), score_init="magnitude", allocation=allocation, progress=False)
        assert all(s.dtype == torch.float32 for s in cs.parameters())
        assert all(len(torch.unique(s.detach())) == s.numel() for s in cs.parameters())  # no ties in a ranking
        out = model(torch.randn(2, 64, dtype=dtype))  # the gated forward still runs in the model's dtype
        assert out.dtype == dtype
        cs.finish(rewind=False)
        assert model[0].weight.dtype == dtype
        for amount in (0.2, 0.5, 0.9):
            ours = cs.make_plan(amount=amount)
            ref = api.plan(MagnitudeConfig(allocation=allocation), targets=cs.targets, amount=amount)
            for key, e in ours.entries.items():
                assert torch.equal(e.mask, ref.entries[key].mask), (allocation, amount, key)


@pytest.mark.parametrize("bad", ["nan", "inf", "meta"])
@pytest.mark.parametrize("score_init", ["constant", "magnitude"])
def test_nan_inf_or_meta_weights_are_refused_naming_the_tensor(bad, score_init):
    from tiny import check_bad_weights_refused
    check_bad_weights_refused(bad, mlp, lambda m: ContinuousSparsifier(m, pairs(m), score_init=score_init,
                                                                       progress=False))


def test_magnitude_init_honours_prior_masks_and_ranks_channels_by_mean_magnitude():
    model = lin8()
    prune.custom_from_mask(model[0], "weight", torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]]))  # the largest is gone
    cs = ContinuousSparsifier(model, ["0"], score_init="magnitude", progress=False)
    assert int(torch.argmin(cs.scores["0.weight"].detach())) == 2  # pruned before: ranked lowest
    cs.finish(rewind=False)
    assert cs.make_plan(k=2).entries["0.weight"].mask.tolist() == [[True, True, False, False, True, True, True,
                                                                     False]]  # 0.0 and 0.05 go next
    lin = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 1., 1.], [3., 0., 0.], [0.1, 0.1, 0.1], [-2., -2., 0.]]))
    cs = ContinuousSparsifier(nn.Sequential(lin), ["0"], score_init="magnitude", granularity="channel",
                              progress=False)  # mean |w| per row: 1, 1, 0.1, 4/3
    assert torch.allclose(cs.scores["0.weight"].detach().reshape(-1), torch.tensor([1., 2., 0., 3.]) / 3 - 0.5)


def test_tempered_scale_keeps_gates_at_most_one_and_the_top_entry_at_one():
    model = lin8()
    w = model[0].weight.detach().clone()
    cs = ContinuousSparsifier(model, ["0"], score_init="magnitude", score_init_quantile=0.5, epochs=3,
                              progress=False)
    s = cs.scores["0.weight"].detach()
    s_max = 0.5  # s0 + c (1 - q)
    for e in range(3):
        cs.epoch = e
        beta = cs.temperature
        assert cs.scale_at(beta) == pytest.approx(1 + torch.exp(torch.tensor(-beta * s_max)).item())
        gate = cs.gate("0.weight").detach()
        assert torch.allclose(gate, torch.sigmoid(beta * s) / torch.sigmoid(torch.tensor(beta * s_max)))
        assert gate.max() == pytest.approx(1.0) and int(torch.argmax(gate)) == 2  # |w| = 2.0
        assert torch.allclose(model[0].weight, w * gate)
    assert float(cs.gate("0.weight").detach()[0, 7]) < 1e-20  # beta = 200: the smallest is (softly) gone
    # "paper" with the magnitude init: constant 1/sigmoid(s0); kept gates approach 2 (the case issue 15 measured)
    cs.finish(rewind=False)
    cs = ContinuousSparsifier(lin8(), ["0"], score_init="magnitude", mask_scale="paper", progress=False)
    assert cs.scale_at(1.0) == cs.scale_at(200.0) == 2.0


def test_magnitude_init_round_reset_and_state_round_trip():
    model = mlp()
    kw = dict(score_init="magnitude", rounds=2, epochs=2, penalty=1e-3, progress=False)
    cs = ContinuousSparsifier(model, pairs(model), **kw)
    init = {k: s.detach().clone() for k, s in cs.scores.items()}
    opt = torch.optim.SGD(cs.param_groups(lr=0.5), lr=0.5)
    for _ in range(2):
        run_epoch(model, cs, opt, data(2))
    assert cs.round == 1
    # the reset happened with beta_T: s <- min(beta_T * s_end, s_init); replay it from the state before the reset
    model2 = mlp()
    cs2 = ContinuousSparsifier(model2, pairs(model2), **kw)
    opt2 = torch.optim.SGD(cs2.param_groups(lr=0.5), lr=0.5)
    run_epoch(model2, cs2, opt2, data(2))
    for x, y in data(2):
        loss = F.cross_entropy(model2(x), y) + cs2.penalty()
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        cs2.step()
    end = {k: s.detach().clone() for k, s in cs2.scores.items()}
    cs2.step_epoch()
    for k in init:
        expected = torch.minimum(200.0 * end[k], init[k])
        assert torch.equal(cs2.scores[k].detach(), expected)
        assert torch.equal(cs.scores[k].detach(), expected)
        assert (expected < init[k]).any() and (expected == init[k]).any()  # both branches of the min are used
    state = cs.state_dict()
    assert state["config"]["score_init"] == "magnitude" and state["config"]["mask_scale"] == "tempered"
    # a new sparsifier on other weights: the prior (init scores) comes from the state, not from its weights
    torch.manual_seed(7)
    model3 = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    cs3 = ContinuousSparsifier(model3, pairs(model3), **kw)
    cs3.load_state_dict(state)
    assert all(torch.equal(cs3._init_scores[k], init[k]) for k in init)
    model4 = mlp()
    with pytest.raises(PruningInputError, match="score_init"):  # a magnitude search into a constant one
        ContinuousSparsifier(model4, pairs(model4), **{**kw, "score_init": "auto"}).load_state_dict(state)


def test_state_saved_before_the_score_init_fields_still_loads():
    model = mlp()
    cs = ContinuousSparsifier(model, pairs(model), rounds=2, epochs=2, progress=False)
    state = cs.state_dict()
    old = {k: v for k, v in state["config"].items() if not k.startswith("score_init")}
    old["mask_scale"] = "paper"  # what older versions wrote
    model2 = mlp()
    cs2 = ContinuousSparsifier(model2, pairs(model2), rounds=2, epochs=2, progress=False)
    cs2.load_state_dict({**state, "config": old})
    old["mask_scale"] = "none"
    with pytest.raises(PruningInputError, match="mask_scale"):
        cs2.load_state_dict({**state, "config": old})


class _DictIn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()

    def forward(self, x, labels=None):
        return self.net(x)


def test_fit_follows_the_librarys_batch_convention_for_dicts():
    """fit took ``x, y = batch``: a dict batch gave the model its key strings. Dict batches now run as
    model(**batch) with loss_fn(output, batch), and equal the pair batches' search."""
    runs = []
    for as_dict in (False, True):
        model = _DictIn()
        cs = ContinuousSparsifier(model, pairs(model.net), rounds=1, epochs=2, progress=False, penalty=1e-3)
        batches = [{"x": x, "labels": y} for x, y in data()] if as_dict else data()
        loss = (lambda out, b: F.cross_entropy(out, b["labels"])) if as_dict else F.cross_entropy
        cs.fit(batches, loss, lr=0.1)
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_make_plan_refuses_an_amount_given_as_the_targets():
    _, cs = searched()
    with pytest.raises(PruningInputError, match="^targets: .* make_plan\\(amount=...\\)"):
        cs.make_plan(0.5)
