"""OBS-IHT as a torch.ao.pruning BaseSparsifier: same plan as the torch.nn.utils.prune flow, exact counts."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins import Curvature, OBSIHT, PruningInputError
from obs_plugins.integrations.torch_ao import OBSIHTSparsifier
from tiny import mse
from tiny import regression_problem as problem


CONFIG = [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}]


@pytest.mark.parametrize("iterations", [1, 2])
def test_sparsifier_equals_the_torch_prune_flow(iterations):
    model, batches = problem()
    twin = copy.deepcopy(model)
    params = [(model[0], "weight"), (model[2], "weight")]
    curv = Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)
    sp = OBSIHTSparsifier(curv, sparsity_level=0.7, iterations=iterations, progress=False)
    sp.prepare(model, CONFIG)
    sp.step()
    assert [int((model[i].weight == 0).sum()) for i in (0, 2)] == [358, 90]  # round(0.7 * n) each
    sp.squash_mask()
    assert not hasattr(model[0], "parametrizations")

    tparams = [(twin[0], "weight"), (twin[2], "weight")]
    tcurv = Curvature.layerwise(twin, tparams, batches, loss_fn=mse, progress=False)
    prune.global_unstructured(tparams, pruning_method=OBSIHT, amount=0.7, curvature=tcurv, allocation="uniform",
                              iterations=iterations, progress=False)
    for m, n in tparams:
        prune.remove(m, n)
    for i in (0, 2):
        torch.testing.assert_close(model[i].weight, twin[i].weight, rtol=1e-5, atol=1e-6)


def test_per_group_levels_and_a_second_step_keeps_old_zeros():
    model, batches = problem(1)
    params = [(model[0], "weight"), (model[2], "weight")]
    curv = Curvature.layerwise(model, params, batches, progress=False)
    sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
    sp.prepare(model, [{"tensor_fqn": "0.weight", "sparsity_level": 0.25}, {"tensor_fqn": "2.weight"}])
    sp.step()
    first = [model[i].weight == 0 for i in (0, 2)]
    assert [int(z.sum()) for z in first] == [128, 64]
    for g in sp.groups:
        g["sparsity_level"] = 0.75
    sp.step()
    second = [model[i].weight == 0 for i in (0, 2)]
    assert [int(z.sum()) for z in second] == [384, 96]
    assert all(bool((b | ~a).all()) for a, b in zip(first, second))  # earlier zeros stay zero


def test_curvature_for_other_tensors_fails_and_leaves_the_model():
    model, batches = problem(2)
    curv = Curvature.layerwise(model, [(model[0], "weight")], batches, progress=False)
    sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
    sp.prepare(model, CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningInputError, match="2.weight"):
        sp.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kwargs, match", [({"sparsity_level": 1.5}, "sparsity_level"),
                                           ({"allocation": "global"}, "allocation"),
                                           ({"bogus": 1}, "bogus"),
                                           ({"blocksize": True}, "^blocksize"),   # was taken as 1
                                           ({"max_step": True}, "^max_step")])
def test_bad_arguments_name_themselves(kwargs, match):
    model, batches = problem()
    curv = Curvature.layerwise(model, [(model[0], "weight")], batches, progress=False)
    with pytest.raises(PruningInputError, match=match):
        OBSIHTSparsifier(curv, **kwargs)


def test_step_without_prepared_tensors_says_so():
    model, batches = problem()
    curv = Curvature.layerwise(model, [(model[0], "weight")], batches, progress=False)
    for sp in (OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False),):
        with pytest.raises(PruningInputError, match="^sparsifier: no tensors to prune; call prepare"):
            sp.step()   # was "curvature: sequential calibration needs the targets in one stack of blocks"


def test_curvature_after_prepare_does_not_warn_about_a_tie():
    """Collected after prepare (allowed), the listed tensor is its own parametrization's `original`: no
    TiedWeightWarning (it warned that the tensor was tied to itself)."""
    import warnings
    from obs_plugins.errors import TiedWeightWarning
    model, batches = problem()
    params = [(model[0], "weight"), (model[2], "weight")]
    sp = OBSIHTSparsifier(Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False),
                          sparsity_level=0.5, progress=False)
    sp.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedWeightWarning)
        Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)


def test_curvature_after_prepare_and_torch_prune_on_prepared_tensors():
    """After prepare() ``module.weight`` is a fresh product on every access: the shared-tensor check must look
    at the stored tensors (two same-shape layers were refused as "the same tensor"), and torch.nn.utils.prune
    on a prepared tensor is refused before anything is written (torch failed after the weights went in)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    batches = [(torch.randn(16, 8), torch.randn(16, 8)) for _ in range(2)]
    params = [(m, "weight") for m in model]
    first = Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)
    sp = OBSIHTSparsifier(first, sparsity_level=0.5, progress=False)
    sp.prepare(model, [{"tensor_fqn": f"{i}.weight"} for i in range(4)])
    curv = Curvature.layerwise(model, params, batches, loss_fn=mse, progress=False)  # was refused
    assert len(curv.hessians) == 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningInputError, match="parametrized"):
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_copied_sparsifier_says_its_curvature_is_gone():
    model, batches = problem()
    curv = Curvature.layerwise(model, [(model[0], "weight"), (model[2], "weight")], batches, progress=False)
    sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
    sp.prepare(model, CONFIG)
    twin = copy.deepcopy(sp)
    with pytest.raises(PruningInputError, match="^curvature: this sparsifier holds none"):
        twin.step()


def test_bad_groups_are_refused_before_anything_is_written():
    model, batches = problem()
    curv = Curvature.layerwise(model, [(model[0], "weight"), (model[2], "weight")], batches, progress=False)
    for config, msg in (([{"tensor_fqn": "5.weight"}], r"^config\[0\]: the model has no module '5'"),
                        ([{"tensor_fqn": "0.wieght"}], r"^config\[0\]: Linear '0' has no tensor 'wieght'"),
                        (CONFIG + [{"tensor_fqn": "0.weight"}], r"^config\[2\]: '0.weight' is listed twice"),
                        ([{"tensor_fqn": "0.weight", "sparsity_level": True}], "^sparsity_level: "),
                        ([{"tensor_fqn": "0.weight", "sparsity_level": "0.5"}], "^sparsity_level: ")):
        sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
        with pytest.raises(PruningInputError, match=msg):
            sp.prepare(model, config)
        assert not hasattr(model[0], "parametrizations") and not sp.groups
    with pytest.raises(PruningInputError, match="^sparsity_level: "):
        OBSIHTSparsifier(curv, sparsity_level=True)
    sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
    sp.prepare(model, CONFIG)
    sp.step()
    sp.squash_mask()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningInputError, match="holds no FakeSparsity mask"):
        sp.step()                                    # after squash_mask: wrote 0.weight, then crashed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
