"""Registry behaviour and exact mask arithmetic (tiny known answers)."""
import copy
from dataclasses import dataclass

import pytest
import torch
from torch.nn.utils import prune

import obs_plugins
from obs_plugins import (OBSIHTConfig, PruningInputError, config_from_dict, config_to_dict, get_method,
                         list_methods, register_method, unregister_method)
from obs_plugins.masks import (allocate_uniform, count_to_prune, lowest_k_mask, nm_mask, parse_nm)


def test_builtin_methods_registered():
    assert {"obs_iht", "magnitude", "wanda"} <= set(list_methods())
    assert get_method("obs_iht").config_cls is OBSIHTConfig


def test_duplicate_and_unknown_names():
    @dataclass
    class Cfg:
        x: int = 1

    register_method("dummy_test_method", Cfg, lambda *a: None, kind="one-shot")
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_method("dummy_test_method", Cfg, lambda *a: None, kind="one-shot")
    finally:
        unregister_method("dummy_test_method")
    with pytest.raises(KeyError, match="registered methods: .*obs_iht"):
        get_method("sparsegpt_typo")
    with pytest.raises(TypeError, match="dataclass"):
        register_method("bad", object, lambda: None, kind="one-shot")


def test_config_round_trip_is_versioned_and_allow_listed():
    cfg = OBSIHTConfig(iterations=3, nm="2:4", step_sizes=(0.01, 0.02))
    d = config_to_dict(cfg)
    assert d["method"] == "obs_iht" and d["format_version"] == 1
    import json
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({**d, "config": {**d["config"], "evil": 1}})
    with pytest.raises(ValueError, match="format_version"):
        config_from_dict({**d, "format_version": 99})
    with pytest.raises(KeyError, match="unknown pruning method"):
        config_from_dict({**d, "method": "os.system"})



@pytest.mark.parametrize("change,field", [
    ({"format_version": True}, "format_version"), ({"format_version": 1.0}, "format_version"),
    ({"format_version": "1"}, "format_version"), ({"config": None}, "config"),
    ({"config": [["iterations", 3]]}, "config"), ({"method": None}, "method"), ({"method": ["obs_iht"]}, "method"),
    ({"config": {"iterations": "3; rm -rf"}}, "iterations"), ({"config": {"iterations": True}}, "iterations"),
    ({"config": {"rel_damp": -5}}, "rel_damp"), ({"config": {"rel_damp": "x"}}, "rel_damp"),
    ({"config": {"step_sizes": "abc"}}, "step_sizes"), ({"config": {"holdout_fraction": None}}, "holdout_fraction"),
    ({"config": {"nm": 5}}, "nm"), ({"config": {"nm": "4:2"}}, "nm"),
    ({"method": "bip", "config": {"sparsity": 7}}, "sparsity"),
    ({"method": "continuous_sparsification", "config": {"penalty": -1.0}}, "penalty"),
    ({"method": "magnitude", "config": {"allocation": "per-row"}}, "allocation"),
    ({"method": "wanda", "config": {"nm": "2-4"}}, "nm"),
    ({"config": {"progress": "no"}}, "progress"),   # accepted before: a truthy string turned the bars on
    ({"method": "bip", "config": {"progress": 3}}, "progress"),
    ({"method": "continuous_sparsification", "config": {"progress": "false"}}, "progress")])
def test_config_from_dict_validates_values_and_names_the_field(change, field):
    good = config_to_dict(OBSIHTConfig())
    with pytest.raises(PruningInputError, match=f"^{field}: "):
        config_from_dict({**good, **change})


def test_a_list_of_step_sizes_round_trips_equal():
    cfg = OBSIHTConfig(step_sizes=[0.01, 0.02])
    assert cfg.step_sizes == (0.01, 0.02) and config_from_dict(config_to_dict(cfg)) == cfg


def test_config_from_dict_refuses_an_unknown_top_level_key():
    d = config_to_dict(OBSIHTConfig())
    with pytest.raises(PruningInputError, match="^iterations: unknown top-level key"):
        config_from_dict({**d, "iterations": 3})     # a field put beside "config" instead of inside it


@pytest.mark.parametrize("missing", ["format_version", "method", "config"])
def test_config_from_dict_names_a_missing_key(missing):
    d = config_to_dict(OBSIHTConfig())
    del d[missing]
    with pytest.raises(PruningInputError, match=f"^{missing}: missing"):
        config_from_dict(d)


def test_config_from_dict_round_trips_every_registered_default_and_valid_values():
    import json
    for name in list_methods():
        cfg = get_method(name).config_cls()
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    cfg = obs_plugins.MagnitudeConfig(allocation="uniform", nm="2:4")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("bad", ["nan", "inf", "meta"])
def test_magnitude_refuses_nan_inf_or_meta_weights_naming_the_tensor(bad):
    from torch import nn
    from obs_plugins import MagnitudeConfig, api, resolve_targets
    from obs_plugins.methods.magnitude import magnitude_solve
    if bad == "meta":
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    else:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        with torch.no_grad():
            model[2].weight[1, 2] = float(bad)
    targets = resolve_targets(model, [(model[0], "weight"), (model[2], "weight")])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if bad == "meta":  # api.plan counts the prior masks first (api.py's own check); the solver refuses meta too
        with pytest.raises(PruningInputError, match=r"^params: 0\.weight is on the meta device"):
            magnitude_solve(targets, 4, MagnitudeConfig())
        return
    with pytest.raises(PruningInputError, match=r"^params: 2\.weight holds 1 NaN/Inf"):
        api.prune(MagnitudeConfig(), targets=targets, amount=0.5)
    with pytest.raises(PruningInputError, match=r"^params: 2\.weight holds 1 NaN/Inf"):
        api.prune(MagnitudeConfig(allocation="uniform", nm="2:4"), targets=targets, amount=0.5)
    after = model.state_dict()
    assert after.keys() == before.keys() and not hasattr(model[2], "weight_mask")
    assert all(torch.equal(after[k].nan_to_num(), before[k].nan_to_num())
               and torch.equal(after[k].isnan(), before[k].isnan()) for k in before)

def test_count_to_prune_matches_torch():
    from torch.nn.utils.prune import _compute_nparams_toprune
    for amount in (0.0, 0.1, 0.25, 0.5, 0.7, 0.999, 1.0, 0, 3, 10):
        for n in (10, 13, 640):
            if isinstance(amount, int) and amount > n:
                continue
            assert count_to_prune(amount, n) == _compute_nparams_toprune(amount, n)
    with pytest.raises(PruningInputError, match="amount"):
        count_to_prune(1.2, 10)
    with pytest.raises(PruningInputError, match="amount"):
        count_to_prune(11, 10)
    with pytest.raises(PruningInputError, match="amount"):
        count_to_prune(-1, 10)


def test_lowest_k_mask_1x8_hand_computed():
    s = torch.tensor([0.5, -3.0, 0.1, 2.0, 0.1, 7.0, 0.3, 1.0]).abs()
    keep = lowest_k_mask(s, 3)
    assert keep.tolist() == [True, True, False, True, False, True, False, True]  # ties 0.1/0.1 by position
    prior = torch.tensor([True, False, True, True, True, True, True, True])
    keep2 = lowest_k_mask(s, 2, prior)
    assert keep2.tolist() == [True, False, False, True, False, True, True, True]
    with pytest.raises(PruningInputError):
        lowest_k_mask(s, 8, prior)


def test_nm_and_uniform_allocation():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.6, 0.7, 0.8]])
    assert nm_mask(s, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert parse_nm("2:4") == (2, 4)
    with pytest.raises(PruningInputError, match="nm"):
        parse_nm("4:2")
    prior = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(30, dtype=torch.bool)}
    c = allocate_uniform(prior, 21)
    assert sum(c.values()) == 21 and abs(c["a"] - 5.25) < 1 and abs(c["b"] - 15.75) < 1


def test_magnitude_plan_equals_torch_global_l1():
    from obs_plugins import api
    from obs_plugins.methods.magnitude import MagnitudeConfig
    from obs_plugins.targets import resolve_targets
    a = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    b.load_state_dict(a.state_dict())
    prune.global_unstructured([(b[0], "weight"), (b[1], "weight")], prune.L1Unstructured, amount=0.6)
    plan = api.plan(MagnitudeConfig(allocation="global"), targets=resolve_targets(a, [(a[0], "weight"),
                                                                                       (a[1], "weight")]),
                    amount=0.6)
    assert torch.equal(plan.entries["0.weight"].mask, b[0].weight_mask.bool())
    assert torch.equal(plan.entries["1.weight"].mask, b[1].weight_mask.bool())


def test_lazy_exports():
    assert obs_plugins.OBSIHT.PRUNING_TYPE == "unstructured"
    with pytest.raises(AttributeError):
        obs_plugins.NoSuchThing  # noqa: B018


def test_lowest_k_mask_prunes_exactly_k_of_the_kept_entries_whatever_their_scores():
    """NaN / +inf scores of kept entries tied with the +inf given to prior zeros, so a prior zero could be 'chosen'
    and fewer than k entries pruned."""
    from obs_plugins.masks import lowest_k_mask
    prior = torch.tensor([False, True, True])
    for s in (torch.tensor([0.0, float("nan"), float("nan")]), torch.tensor([0.0, float("inf"), 1.0])):
        keep = lowest_k_mask(s, 2, prior)
        assert keep.tolist() == [False, False, False]


def test_count_to_prune_takes_numpy_numbers_as_torch_does():
    import numpy as np
    from obs_plugins.masks import count_to_prune
    assert count_to_prune(np.int64(3), 10) == 3 and count_to_prune(np.float32(0.5), 10) == 5
    with pytest.raises(PruningInputError, match="^amount"):
        count_to_prune(torch.tensor(3), 10)


def test_count_to_reach_counts_prior_masks_and_bake_leaves_plain_weights():
    """1x8 and 1x4 layers, 2 of the 8 entries masked by torch: reaching 50% of the 12 entries needs 6 - 2 = 4 more;
    75% of them 9 - 2 = 7; 10% is already exceeded (1 - 2 = -1).  bake() makes the mask permanent."""
    from obs_plugins.masks import bake, count_to_reach
    from obs_plugins.targets import resolve_targets
    net = torch.nn.Sequential(torch.nn.Linear(8, 1, bias=False), torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(1.0, 9.0).view(1, 8))
    prune.custom_from_mask(net[0], "weight", torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool))
    targets = resolve_targets(net, [(net[0], "weight"), (net[1], "weight")])
    assert [count_to_reach(s, targets) for s in (0.5, 0.75, 0.1)] == [4, 7, -1]
    bake(targets)
    assert not hasattr(net[0], "weight_mask") and isinstance(net[0].weight, torch.nn.Parameter)
    assert net[0].weight.tolist() == [[0.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0, 8.0]]
    bake(targets)   # nothing left to bake: a no-op
    assert net[0].weight.tolist() == [[0.0, 2.0, 3.0, 0.0, 5.0, 6.0, 7.0, 8.0]]


def _two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 4))


def test_baked_apply_on_a_torch_pruned_tensor_records_the_new_zeros():
    """apply(reparametrize=False) on a tensor with a torch.nn.utils.prune mask wrote the zeros into weight_orig only:
    the mask (so the next plan's prior) and the weight torch keeps missed them. Two baked rounds of 0.5 now give
    what two reparametrized rounds give: 24 + 36 = 60, then 60 + 18 = 78 (torch's amount: of the survivors)."""
    from obs_plugins import api
    from obs_plugins.methods.magnitude import MagnitudeConfig
    from obs_plugins.targets import resolve_targets
    zeros = []
    for reparam in (False, True):
        m = _two_linears()
        prune.l1_unstructured(m[0], "weight", amount=0.25)              # 24 of 96 masked before
        for _ in range(2):
            targets = resolve_targets(m, [(m[0], "weight")])
            api.plan(MagnitudeConfig(), targets=targets, amount=0.5).apply(reparametrize=reparam)
            zeros.append(int((m[0].weight == 0).sum()))                 # no forward in between
    assert zeros == [60, 78, 60, 78]
    assert int((m[0].weight_mask == 0).sum()) == 78


def test_apply_refuses_a_stale_plan_before_any_write():
    from obs_plugins import api
    from obs_plugins.methods.magnitude import MagnitudeConfig
    from obs_plugins.targets import resolve_targets
    for reparam in (True, False):
        m = _two_linears()
        plan = api.plan(MagnitudeConfig(), targets=resolve_targets(m, [(m[0], "weight"), (m[1], "weight")]),
                        amount=0.5)
        m[1].weight = torch.nn.Parameter(torch.randn(4, 6))             # the second layer changed since
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(PruningInputError, match="^plan for 1.weight: stale shape"):
            plan.apply(reparametrize=reparam)
        assert list(m.state_dict()) == list(before)
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_lowest_k_mask_equals_a_stable_sort_with_ties_nans_and_prior_masks():
    """The linear-time selection (k-th value, then the earliest ties) picks what a stable sort's first k pick."""
    import random

    from obs_plugins.masks import lowest_k_mask
    random.seed(0)
    g = torch.Generator().manual_seed(0)
    for t in range(400):
        n = random.randint(1, 40)
        sc = torch.randint(0, 4, (n,), generator=g).float() if t % 2 else torch.randn(n, generator=g)
        if t % 7 == 0:
            sc[random.randrange(n)] = float("nan")
        if t % 5 == 0:
            sc[random.randrange(n)] = float("inf")
        prior = torch.rand(n, generator=g) > 0.3 if t % 3 == 0 else None
        keep = torch.ones(n, dtype=torch.bool) if prior is None else prior.clone()
        k = random.randint(0, int(keep.sum()))
        idx = keep.nonzero().squeeze(1)
        keep[idx[torch.sort(torch.nan_to_num(sc[idx], nan=float("inf")), stable=True).indices[:k]]] = False
        assert torch.equal(lowest_k_mask(sc, k, prior), keep), (t, sc, k, prior)


def test_a_float64_model_is_ranked_in_float64_like_torch():
    """Weights that differ below float32's resolution: torch's L1 pruning removes the smaller one; ranking in
    float32 made them tie and removed the first one instead (magnitude, exact-count, N:M and global ranking)."""
    from torch.nn.utils import prune as tprune
    from obs_plugins.api import plan
    from obs_plugins.masks import allocate_global, lowest_k_mask, nm_mask
    from obs_plugins.methods.magnitude import MagnitudeConfig
    w = torch.tensor([[1.0 + 2e-9, 1.0 + 1e-9, 1.0 + 3e-9, 1.0 + 4e-9]], dtype=torch.float64)
    lin = torch.nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    ref = copy.deepcopy(lin)
    tprune.global_unstructured([(ref, "weight")], pruning_method=tprune.L1Unstructured, amount=1)
    assert ref.weight_mask.bool().tolist() == [[True, False, True, True]]
    p = plan(MagnitudeConfig(), targets=[(lin, "weight")], amount=1)
    assert next(iter(p.entries.values())).mask.tolist() == [[True, False, True, True]]
    assert lowest_k_mask(w, 2).tolist() == [[False, False, True, True]]
    assert nm_mask(w, 2, 4).tolist() == [[False, False, True, True]]
    counts = allocate_global({"a": w[:, :2], "b": w[:, 2:]}, {"a": torch.ones(1, 2, dtype=torch.bool),
                                                              "b": torch.ones(1, 2, dtype=torch.bool)}, 1)
    assert counts == {"a": 1, "b": 0}
    counts = allocate_global({"a": w[:, 2:], "b": w[:, :2]}, {"a": torch.ones(1, 2, dtype=torch.bool),
                                                              "b": torch.ones(1, 2, dtype=torch.bool)}, 1)
    assert counts == {"a": 0, "b": 1}
