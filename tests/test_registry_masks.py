"""Registry behaviour and exact mask arithmetic (tiny known answers)."""
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
