"""Bad input tried as a user would (issue 22, first part): each case gets a clear PruningInputError naming the
argument, and the model's state_dict, requires_grad flags and hooks are bit-identical afterwards."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import OBSIHT, Curvature, OBSIHTConfig, PruningInputError, api


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [(torch.randn(16, 30), torch.randint(0, 4, (16,))) for _ in range(4)]
    return model, [(model[0], "weight"), (model[2], "weight")], batches


def state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()))


def same(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


def case_nm_width_not_multiple(model, params, batches):
    curv = Curvature.layerwise(model, params, batches, progress=False)  # 30 inputs: not a multiple of 4
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, nm="2:4", progress=False)


def case_nm_width_wanda(model, params, batches):
    from obs_plugins import WandaConfig
    curv = Curvature.layerwise(model, params, batches, progress=False)
    api.prune(WandaConfig(nm="2:4"), curvature=curv, amount=0.5)


def case_nan_weights(model, params, batches):
    curv = Curvature.layerwise(model, params, batches, progress=False)
    curv.targets[1].orig().data[0, 0] = float("nan")  # the weights went bad after calibration
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)


def case_nan_before_calibration(model, params, batches):
    Curvature.layerwise(model, params, batches, progress=False)


def case_meta_device(model, params, batches):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 4))
    Curvature.layerwise(meta, [(meta[0], "weight")], [torch.randn(2, 30, device="meta")], progress=False)


def case_misspelt_name(model, params, batches):
    curv = Curvature.layerwise(model, params, batches, progress=False)
    OBSIHT.apply(model[0], "wieght", amount=0.5, curvature=curv)


def case_loss_other_convention(model, params, batches):
    curv = Curvature.layerwise(model, params, batches, loss_fn=lambda out: out.sum(), progress=False)
    api.plan(OBSIHTConfig(iterations=2, progress=False), curvature=curv, amount=0.5)


CASES = {  # case -> the words the message must contain
    case_nm_width_not_multiple: ("nm", "0.weight", "30"),
    case_nm_width_wanda: ("nm", "0.weight", "30"),
    case_nan_weights: ("params", "2.weight", "NaN"),
    case_nan_before_calibration: ("params", "0.weight", "NaN/Inf"),
    case_meta_device: ("params", "meta"),
    case_misspelt_name: ("name", "'wieght'", "weight", "bias"),
    case_loss_other_convention: ("loss_fn", "(output, target)"),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.__name__[5:])
def test_bad_input_is_named_and_leaves_the_model_as_it_was(case):
    model, params, batches = problem()
    if case is case_nan_before_calibration:
        model[0].weight.data[1, 1] = float("inf")
    before = state(model)
    with pytest.raises(PruningInputError) as err:
        case(model, params, batches)
    for words in CASES[case]:
        assert words in str(err.value), (words, str(err.value))
    after = state(model)
    if case is case_nan_weights:  # the only write is the case's own corruption of one weight
        before[0]["2.weight"][0, 0] = float("nan")
        assert torch.equal(before[0]["2.weight"].isnan(), after[0]["2.weight"].isnan())
        before[0]["2.weight"], after[0]["2.weight"] = before[0]["2.weight"].nan_to_num(), after[0]["2.weight"].nan_to_num()
    assert same(before, after)
    assert not prune.is_pruned(model)
