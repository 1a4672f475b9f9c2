"""Bad input tried as a user would (issue 22): each case gets a clear PruningInputError naming the argument, and
the model's state_dict, requires_grad flags and hooks are bit-identical afterwards; the valid-but-odd inputs prune
exactly the count asked and leave finite weights."""
import copy
import warnings

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


def case_batch_wrong_width(model, params, batches):
    batches[2] = (torch.randn(16, 31), batches[2][1])  # one calibration batch of the wrong width
    Curvature.layerwise(model, params, batches, progress=False)


def case_batch_wrong_width_later(model, params, batches):  # found only when the loss is first evaluated
    import torch.nn.functional as F
    curv = Curvature.layerwise(model, params, batches, loss_fn=F.cross_entropy, progress=False)
    curv.batches[3] = (torch.randn(16, 29), batches[3][1])
    api.plan(OBSIHTConfig(iterations=2, progress=False), curvature=curv, amount=0.5)


def case_target_wrong_shape(model, params, batches):
    import torch.nn.functional as F
    batches = [(x, y[:-1]) for x, y in batches]  # one label short
    curv = Curvature.layerwise(model, params, batches, loss_fn=F.cross_entropy, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)


def case_sequential_tokens_out_of_vocab(model, params, batches):
    from test_sequential import llama_problem
    llama, lparams, lbatches = llama_problem()
    lbatches[1] = {**lbatches[1], "input_ids": lbatches[1]["input_ids"] + 200}  # ids beyond the vocabulary
    curv = Curvature.layerwise(llama, lparams, lbatches, progress=False)
    prune.global_unstructured(lparams, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)


def case_onnx_example_inputs(model, params, batches, tmp_path):
    pytest.importorskip("onnxruntime")
    from obs_plugins.integrations import onnx as ox
    ox.export(model, torch.randn(2, 31), tmp_path / "m.onnx")


def case_onnx_verify_inputs(model, params, batches, tmp_path):
    pytest.importorskip("onnxruntime")
    from obs_plugins.integrations import onnx as ox
    r = ox.export(model, torch.randn(2, 30), tmp_path / "m.onnx")
    ox.verify(r.path, model, torch.randn(2, 29), runs=1, warmup=0)


def _amount(a):
    def case(model, params, batches):
        curv = Curvature.layerwise(model, params, batches, progress=False)
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=a, curvature=curv, progress=False)
    case.__name__ = f"case_amount_{a!r}"
    return case


def case_empty_calibration(model, params, batches):
    Curvature.layerwise(model, params, [], progress=False)


def case_bias_in_layer_curvature(model, params, batches):   # crashed with an IndexError
    Curvature.layerwise(model, params + [(model[0], "bias")], batches, progress=False)


def case_targets_other_than_the_curvatures(model, params, batches):   # targets= was ignored: both layers pruned
    curv = Curvature.layerwise(model, params, batches, progress=False)
    api.prune(OBSIHTConfig(progress=False), curvature=curv, targets=curv.targets[:1], amount=0.5)


def case_nm_with_another_amount(model, params, batches):   # amount was ignored: 2:4 pruned 0.5
    from obs_plugins import MagnitudeConfig, resolve_targets
    api.prune(MagnitudeConfig(nm="2:4"), targets=resolve_targets(model, params[1:]), amount=0.9)


def case_empty_targets(model, params, batches):   # planned nothing and reported sparsity 1.0
    from obs_plugins import MagnitudeConfig
    api.prune(MagnitudeConfig(), targets=iter([]), amount=0.5)


def case_nan_in_calibration_batch(model, params, batches):   # Wanda pruned by position, silently
    from obs_plugins import WandaConfig
    batches[2][0][3, 5] = float("nan")
    curv = Curvature.layerwise(model, params, batches, progress=False)
    api.prune(WandaConfig(), curvature=curv, amount=0.5)


def case_unknown_module_name(model, params, batches):   # a raw AttributeError
    from obs_plugins import resolve_targets
    resolve_targets(model, ["0", "nope"])


CASES = {  # case -> the words the message must contain
    case_nm_width_not_multiple: ("nm", "0.weight", "30"),
    case_nm_width_wanda: ("nm", "0.weight", "30"),
    case_nan_weights: ("params", "2.weight", "NaN"),
    case_nan_before_calibration: ("params", "0.weight", "NaN/Inf"),
    case_meta_device: ("params", "meta"),
    case_misspelt_name: ("name", "'wieght'", "weight", "bias"),
    case_loss_other_convention: ("loss_fn", "(output, target)"),
    case_batch_wrong_width: ("batches[2]", "'0' (Linear)", "(16, 31)", "mat1 and mat2"),
    case_batch_wrong_width_later: ("batches[3]", "'0' (Linear)", "(16, 29)"),
    case_target_wrong_shape: ("loss_fn", "target (15,)", "(16, 4)"),
    case_sequential_tokens_out_of_vocab: ("batches[1]", "embed_tokens", "(Embedding)"),
    case_onnx_example_inputs: ("example_inputs", "'0' (Linear)", "(2, 31)"),
    case_onnx_verify_inputs: ("inputs", "'0' (Linear)", "(2, 29)"),
    _amount(-0.1): ("amount",),
    _amount(1.5): ("amount",),
    _amount(True): ("amount", "True"),
    _amount("0.5"): ("amount", "'0.5'"),
    _amount(10 ** 6): ("amount", "272"),
    case_empty_calibration: ("batches",),
    case_bias_in_layer_curvature: ("params[2]", "0.bias", "not a layer weight"),
    case_targets_other_than_the_curvatures: ("targets", "0.weight", "2.weight"),
    case_nm_with_another_amount: ("amount=0.9", "nm=2:4"),
    case_empty_targets: ("targets: empty",),
    case_nan_in_calibration_batch: ("batches", "0.weight", "NaN"),
    case_unknown_module_name: ("params[1]", "'nope'"),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.__name__[5:])
def test_bad_input_is_named_and_leaves_the_model_as_it_was(case, tmp_path):
    model, params, batches = problem()
    if case is case_nan_before_calibration:
        model[0].weight.data[1, 1] = float("inf")
    before = state(model)
    with pytest.raises(PruningInputError) as err:
        if "onnx" in case.__name__:
            case(model, params, batches, tmp_path)
        else:
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


def _prep_dead(model, batches):  # 5 input columns never active: dead columns of the Gram
    for x, _ in batches:
        x[:, :5] = 0


VALID = {  # name -> (amount, prepare(model, batches) or None, calibration batches override or None, dtype)
    "count": (100, None, None, None),
    "all_weights": (1.0, None, None, None),
    "frozen_params": (0.5, lambda m, b: [p.requires_grad_(False) for p in m.parameters()], None, None),
    "fp16": (0.5, None, None, torch.float16),
    "bf16": (0.5, None, None, torch.bfloat16),
    "dead_columns": (0.5, _prep_dead, None, None),
    "rank_deficient": (0.5, None, [(torch.randn(3, 30), torch.randint(0, 4, (3,)))], None),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_but_odd_input_prunes_the_exact_count(name):
    amount, prep, override, dtype = VALID[name]
    model, params, batches = problem()
    if prep:
        prep(model, batches)
    if dtype is not None:
        model.to(dtype)
        batches = [(x.to(dtype), y) for x, y in batches]
    flags = [p.requires_grad for p in model.parameters()]
    curv = Curvature.layerwise(model, params, override or batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=amount, curvature=curv, progress=False)
    total = sum(getattr(m, n).numel() for m, n in params)
    want = amount if isinstance(amount, int) and not isinstance(amount, bool) and amount > 1 else round(amount * total)
    assert sum(int((getattr(m, n) == 0).sum()) for m, n in params) == want
    assert all(torch.isfinite(getattr(m, n)).all() and getattr(m, n).dtype == (dtype or torch.float32)
               for m, n in params)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_pruning_twice_keeps_the_first_zeros_and_adds_the_second_count():
    model, params, batches = problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)
    first = [getattr(m, n) == 0 for m, n in params]
    curv = Curvature.layerwise(model, params, batches, progress=False)
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)
    second = [getattr(m, n) == 0 for m, n in params]
    assert all((s | ~f).all() for f, s in zip(first, second))  # nothing un-pruned
    assert sum(int(s.sum()) for s in second) == 136 + 68  # torch's amount: a fraction of the survivors


def test_tied_weight_warns_naming_both_modules():
    from obs_plugins import TiedWeightWarning

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(self.emb(x))

    m = Tied()
    batches = [torch.randint(0, 10, (4, 5))]
    with pytest.warns(TiedWeightWarning, match=r"head\.weight is tied to emb\.weight"):
        Curvature.layerwise(m, [(m.head, "weight")], batches, progress=False)
    with warnings.catch_warnings():  # untied: no warning
        warnings.simplefilter("error", TiedWeightWarning)
        m.head.weight = nn.Parameter(m.emb.weight.detach().clone())
        Curvature.layerwise(m, [(m.head, "weight")], batches, progress=False)


@pytest.mark.parametrize("bad", [dict(amount=1.5), dict(amount=0.3, bogus=1), dict(amount=0.3, curvature=None)])
def test_a_refused_second_apply_keeps_the_first_pruning(bad):
    """torch removes an earlier pruning hook before it checks the new method; a refused second OBSIHT.apply now
    leaves the first pruning exactly as it was (hook, mask, weights), so prune.remove still works."""
    model, params, batches = problem()
    curv = Curvature.layerwise(model, params, batches, progress=False)
    OBSIHT.apply(model[0], "weight", amount=0.3, curvature=curv, progress=False)
    before = state(model)
    hooks = list(model[0]._forward_pre_hooks.values())
    kwargs = {"curvature": curv, **bad}
    with pytest.raises(PruningInputError):
        OBSIHT.apply(model[0], "weight", progress=False, **kwargs)
    assert list(model[0]._forward_pre_hooks.values()) == hooks and same(before, state(model))
    zeros = int((model[0].weight == 0).sum())
    prune.remove(model[0], "weight")
    assert int((model[0].weight == 0).sum()) == zeros == round(0.3 * model[0].weight.numel())


def test_a_plan_on_a_parametrized_tensor_refuses_before_writing():
    """PrunePlan.apply(reparametrize=True) on a tensor a torch.ao sparsifier has parametrized: refused before the
    first write (it wrote the earlier entries, then failed in torch with a TypeError)."""
    from torch.ao.pruning import WeightNormSparsifier
    from obs_plugins import MagnitudeConfig, resolve_targets
    model, params, _ = problem()
    sp = WeightNormSparsifier(sparsity_level=0.5)
    sp.prepare(model, [{"tensor_fqn": "2.weight"}])
    before = state(model)
    p = api.plan(MagnitudeConfig(), targets=resolve_targets(model, params), amount=0.5)
    with pytest.raises(PruningInputError, match="^reparametrize: 2.weight"):
        p.apply(reparametrize=True)
    assert same(before, state(model))


def test_one_parameter_under_two_modules_is_refused():
    """Two listed modules sharing one weight tensor: the second plan entry silently overwrote the first layer's
    OBS solve; now refused naming both entries."""
    model, params, batches = problem()
    twin = nn.Linear(30, 8)
    twin.weight = model[0].weight
    model.add_module("twin", twin)
    before = state(model)
    with pytest.raises(PruningInputError, match=r"^params\[2\].*same tensor as params\[0\]"):
        Curvature.layerwise(model, params + [(twin, "weight")], batches, progress=False)
    assert same(before, state(model))


# ------------------------------------------------------------------ fourteenth-session review
def _masked_twin_pair():
    """Two identical Linears-with-a-tanh models whose first weight carries the same torch.nn.utils.prune mask."""
    import torch.nn.functional as F
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        prune.l1_unstructured(m[0], "weight", amount=0.25)
        models.append(m)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    return models, batches, F.cross_entropy


@pytest.mark.parametrize("last_forward_no_grad", [False, True])
def test_a_second_apply_with_iterations_equals_global_unstructured(last_forward_no_grad):
    """torch takes the old mask's hook off before compute_mask on a second apply, so ``weight`` went stale and
    the gradient passes of T >= 2 (and global allocation) failed; both routes now give the same plan."""
    (m, twin), batches, loss = _masked_twin_pair()
    for mod in (m, twin):
        if last_forward_no_grad:
            with torch.no_grad():
                mod(batches[0][0])
        else:
            mod(batches[0][0])
    curv = Curvature.layerwise(m, [(m[0], "weight")], batches, loss_fn=loss, progress=False)
    OBSIHT.apply(m[0], "weight", amount=0.5, curvature=curv, iterations=2, progress=False)
    tcurv = Curvature.layerwise(twin, [(twin[0], "weight")], batches, loss_fn=loss, progress=False)
    prune.global_unstructured([(twin[0], "weight")], pruning_method=OBSIHT, amount=0.5, curvature=tcurv,
                              iterations=2, progress=False)
    assert int((m[0].weight_mask == 0).sum()) == 12 + 18
    assert torch.equal(m[0].weight_mask, twin[0].weight_mask) and torch.equal(m[0].weight, twin[0].weight)


def test_a_refused_first_apply_keeps_the_parameter_order():
    model, params, batches = problem()
    order = list(model.state_dict())
    curv = Curvature.layerwise(model, params, batches, progress=False)
    with pytest.raises(PruningInputError):
        OBSIHT.apply(params[0][0], params[0][1], amount=0.5, curvature=curv, nm="2:4", progress=False)
    assert list(model.state_dict()) == order   # torch's rollback re-registered the weight last


def test_a_bad_batch_names_the_module_that_fails_inside_a_custom_model():
    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(6, 2)   # b does not fit a's output

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))
    model = TwoLayers()
    with pytest.raises(PruningInputError, match=r"failed in module 'b' \(Linear\)"):
        Curvature.layerwise(model, [(model.a, "weight")], [torch.randn(3, 4)], progress=False)


def test_api_plan_takes_torch_module_name_pairs_as_targets():
    """prune.global_unstructured's (module, name) pairs: an AttributeError before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    pairs = [(model[0], "weight"), (model[2], "weight")]
    batches = [torch.randn(16, 8) for _ in range(2)]
    curv = Curvature.layerwise(model, pairs, batches, progress=False)
    cfg = OBSIHTConfig(progress=False)
    by_pairs = api.plan(cfg, curvature=curv, targets=pairs, amount=0.5)
    by_curv = api.plan(cfg, curvature=curv, amount=0.5)
    assert list(by_pairs.entries) == list(by_curv.entries) == ["0.weight", "2.weight"]
    for key, entry in by_curv.entries.items():
        assert torch.equal(by_pairs.entries[key].mask, entry.mask)
        assert torch.equal(by_pairs.entries[key].new_weight, entry.new_weight)
    from obs_plugins.methods.magnitude import MagnitudeConfig
    api.prune(MagnitudeConfig(), targets=[(model[0], "weight")], amount=0.25)
    assert int((model[0].weight == 0).sum()) == 16
    for bad, msg in (([(model[0], "weight")], "^targets: .* differ from the curvature's"),
                     ("weight", "^targets: a list of Target or"),
                     ([(model[0], "weight"), curv.targets[1]], r"^targets\[1\]: mixes"),
                     ([(model[0],)], r"^targets\[0\]: expected \(module, name\)")):
        with pytest.raises(PruningInputError, match=msg):
            api.plan(cfg, curvature=curv, targets=bad, amount=0.5)


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "custom", "old_weight_norm"])
def test_a_computed_weight_is_refused_not_silently_left_dense(wrap):
    """api.prune wrote the plan into the temporary a parametrization computes and reported 50% sparsity."""
    from torch.nn.utils import parametrizations, parametrize
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    if wrap == "weight_norm":
        parametrizations.weight_norm(lin)
    elif wrap == "spectral_norm":
        parametrizations.spectral_norm(lin)
    elif wrap == "custom":
        class Twice(nn.Module):
            def forward(self, w):
                return 2 * w
        parametrize.register_parametrization(lin, "weight", Twice())
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(lin)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(6, 3)).eval()
    before = copy.deepcopy(model.state_dict())
    batches = [torch.randn(16, 8) for _ in range(2)]
    with pytest.raises(PruningInputError, match=r"^params\[0\]: .*weight is (computed by a parametrization|"
                                                r"recomputed before every forward).*would be lost"):
        Curvature.layerwise(model, [(lin, "weight")], batches, progress=False)
    from obs_plugins.methods.magnitude import MagnitudeConfig
    with pytest.raises(PruningInputError, match=r"^targets\[0\]: .*would be lost"):
        api.prune(MagnitudeConfig(), targets=[(lin, "weight")], amount=0.5)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_weight_tied_through_a_transpose_is_one_tensor():
    """dec.weight = Parameter(enc.weight.t()) shares enc's memory with another shape: both entries of a plan
    wrote that memory (the second won) and listing one side gave no TiedWeightWarning."""
    from obs_plugins.errors import TiedWeightWarning
    from obs_plugins.targets import check_tied, resolve_targets
    enc, dec = nn.Linear(8, 4, bias=False), nn.Linear(4, 8, bias=False)
    dec.weight = nn.Parameter(enc.weight.t())
    model = nn.Sequential(enc, dec)
    with pytest.raises(PruningInputError, match=r"^params\[1\]: .* is the same tensor as params\[0\]"):
        resolve_targets(model, [(enc, "weight"), (dec, "weight")])
    with pytest.warns(TiedWeightWarning, match="0.weight is tied to 1.weight"):
        check_tied(model, resolve_targets(model, [(enc, "weight")]))
    # two views of one storage that do not overlap are two tensors
    fused = nn.Parameter(torch.randn(8, 4))
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    a.weight, b.weight = nn.Parameter(fused[:4]), nn.Parameter(fused[4:])
    assert len(resolve_targets(nn.Sequential(a, b), [(a, "weight"), (b, "weight")])) == 2


def test_numpy_amounts_prune_as_torch_reads_them():
    np = pytest.importorskip("numpy")
    for amount, zeros in ((np.int64(5), 5), (np.float32(0.5), 24)):
        torch.manual_seed(0)
        lin = nn.Linear(8, 6)
        model = nn.Sequential(lin)
        curv = Curvature.layerwise(model, [(lin, "weight")], [torch.randn(16, 8) for _ in range(2)], progress=False)
        OBSIHT.apply(lin, "weight", amount=amount, curvature=curv)
        assert int((lin.weight == 0).sum()) == zeros


@pytest.mark.parametrize("method", ["cs", "bip"])
def test_pruning_with_a_running_search_says_call_finish(method):
    """The 'parametrized (a torch.ao sparsifier's FakeSparsity?)' refusal came first and misled."""
    from obs_plugins import BiP, BiPTrainer, ContinuousSparsification, ContinuousSparsifier
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    params = [(model[0], "weight"), (model[2], "weight")]
    if method == "cs":
        src, how, kw = ContinuousSparsifier(model, params), ContinuousSparsification, "sparsifier"
    else:
        src, how, kw = BiPTrainer(model, params, sparsity=0.5), BiP, "trainer"
    with pytest.raises(PruningInputError, match=f"^{kw}: the search is still running; call .*finish"):
        prune.global_unstructured(params, pruning_method=how, amount=0.5, **{kw: src})


def test_multihead_attention_out_proj_is_explained():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x)[0]

    net = Net()
    with pytest.raises(PruningInputError, match=r"^params: layer mha.out_proj.weight saw no input .*"
                                                r"F.multi_head_attention_forward"):
        Curvature.layerwise(net, [(mha.out_proj, "weight")], [torch.randn(2, 3, 8)], progress=False)


def test_views_of_one_fused_tensor_that_share_no_element_are_two_tensors():
    """Disjoint column blocks of one weight interleave in memory without sharing an element."""
    from obs_plugins.targets import resolve_targets
    fused = torch.randn(4, 8)
    a, b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    a.weight, b.weight = nn.Parameter(fused[:, :4]), nn.Parameter(fused[:, 4:])
    assert len(resolve_targets(nn.Sequential(a, b), [(a, "weight"), (b, "weight")])) == 2
    c = nn.Linear(4, 4, bias=False)
    c.weight = nn.Parameter(fused[:, 2:6])    # overlaps both
    with pytest.raises(PruningInputError, match="same tensor"):
        resolve_targets(nn.Sequential(a, c), [(a, "weight"), (c, "weight")])


def test_a_weight_held_as_a_buffer_or_plain_tensor_is_pruned():
    from obs_plugins.methods.magnitude import MagnitudeConfig
    for how in ("buffer", "attribute"):
        lin = nn.Linear(8, 8)
        w = lin.weight.detach().clone()
        del lin.weight
        if how == "buffer":
            lin.register_buffer("weight", w)
        else:
            lin.weight = w
        api.prune(MagnitudeConfig(), targets=[(lin, "weight")], amount=0.5)
        assert int((lin.weight == 0).sum()) == 32


def test_a_running_search_cannot_be_planned_over():
    """api.prune on a gated weight wrote into weight x gate (a temporary) and reported 50%."""
    from obs_plugins import ContinuousSparsifier
    from obs_plugins.methods.magnitude import MagnitudeConfig
    from obs_plugins.targets import resolve_targets
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    params = [(model[0], "weight"), (model[2], "weight")]
    cs = ContinuousSparsifier(model, params)
    targets = resolve_targets(model, params)      # reading is fine
    assert [t.current().shape for t in targets] == [torch.Size([8, 8]), torch.Size([4, 8])]
    with pytest.raises(PruningInputError, match="gated by a running Continuous Sparsification / BiP search"):
        api.prune(MagnitudeConfig(), targets=targets, amount=0.5)
    cs.finish()


def test_memory_overlap_equals_a_brute_force_over_random_views():
    import random

    from obs_plugins.targets import _overlap, _span
    random.seed(0)
    buf = torch.zeros(20, 30)

    def view():
        r0, c0 = random.randrange(20), random.randrange(30)
        v = buf[r0:r0 + random.randint(1, 20 - r0), c0:c0 + random.randint(1, 30 - c0)]
        return v.t() if random.random() < 0.2 else v

    def offsets(t):
        idx = torch.zeros((), dtype=torch.long)
        for n, st in zip(t.shape, t.stride()):
            idx = idx.unsqueeze(-1) + torch.arange(n) * st
        return set((idx.reshape(-1) + t.storage_offset()).tolist())

    for _ in range(500):
        a, b = view(), view()
        assert _overlap(_span(a), _span(b)) == bool(offsets(a) & offsets(b)), (a.shape, a.stride(), b.shape)


def test_a_buffer_weight_with_reparametrize_is_refused_before_any_write():
    from obs_plugins.methods.magnitude import MagnitudeConfig
    a, lin = nn.Linear(8, 8), nn.Linear(8, 8)
    w = lin.weight.detach().clone()
    del lin.weight
    lin.register_buffer("weight", w)
    before = copy.deepcopy(a.state_dict())
    with pytest.raises(PruningInputError, match="^reparametrize: 1.weight is not a parameter"):
        api.prune(MagnitudeConfig(), targets=[(a, "weight"), (lin, "weight")], amount=0.5, reparametrize=True)
    assert torch.equal(before["weight"], a.weight) and not hasattr(a, "weight_orig")


@pytest.mark.parametrize("method", ["cs", "bip"])
def test_a_search_gating_a_pruned_weight_refuses_plans_and_losses(method):
    """With a torch prune mask first, the search gates weight_orig: the plan and the loss went into w x gate."""
    from obs_plugins import BiPTrainer, ContinuousSparsifier
    from obs_plugins.methods.magnitude import MagnitudeConfig
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    params = [(model[0], "weight"), (model[2], "weight")]
    prune.l1_unstructured(model[0], "weight", amount=0.25)
    src = ContinuousSparsifier(model, params) if method == "cs" else BiPTrainer(model, params, sparsity=0.5)
    curv = Curvature(model, params, [(torch.randn(4, 8), torch.randint(0, 4, (4,)))],
                     loss_fn=nn.functional.cross_entropy)
    with pytest.raises(PruningInputError, match="gated by a running Continuous Sparsification / BiP search"):
        curv.loss()
    plan = api.plan(MagnitudeConfig(), targets=curv.targets, amount=0.5)
    with pytest.raises(PruningInputError, match="gated by a running Continuous Sparsification / BiP search"):
        plan.apply(reparametrize=False)
    src.finish()


def test_a_missing_bias_and_a_sparse_parameter_elsewhere():
    from obs_plugins.targets import check_tied, resolve_targets
    lin = nn.Linear(4, 4, bias=False)
    with pytest.raises(PruningInputError, match=r"^params\[0\]: Linear.bias is None"):
        resolve_targets(None, [(lin, "bias")])
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].register_parameter("extra", nn.Parameter(torch.eye(4).to_sparse()))   # crashed the tie check
    assert check_tied(model, resolve_targets(model, [(model[0], "weight")])) == []


# ---- weights no Linear/Conv layer holds: said, not silently left dense ------------------------------------------

def tiny_mixtral():
    import transformers
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg).eval()


def _unpruned(fn):
    from obs_plugins import UnprunedWeightsWarning
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in ws if issubclass(w.category, UnprunedWeightsWarning)]


def test_moe_experts_held_as_3d_tensors_are_named_not_silently_left_dense():
    """transformers 5 stores a Mixtral block's experts as two 3-D parameters and its router outside nn.Linear: a
    default Linear selection cannot take them (89% of this block stack's weights) and now says so, with the count."""
    from obs_plugins import MagnitudeConfig, prunable_linear_targets
    model = tiny_mixtral()
    left = {n: p.numel() for n, p in model.named_parameters()
            if ".experts." in n or n.endswith("mlp.gate.weight")}
    assert len(left) == 6 and any(p.dim() == 3 for n, p in model.named_parameters() if n in left)
    targets, msgs = _unpruned(lambda: prunable_linear_targets(model))
    n_sel = sum(t.current().numel() for t in targets)
    assert len(msgs) == 1
    n_left = sum(left.values())
    assert msgs[0].startswith(f"{n_left} weights ({round(100 * n_left / (n_left + n_sel))}% of these and the "
                              f"{n_sel} selected)")
    assert "model.layers.0.mlp.experts.gate_up_proj" in msgs[0] and "MagnitudeConfig" in msgs[0]
    # what the message offers works: magnitude pruning takes a 3-D expert tensor named explicitly
    ex = model.model.layers[0].mlp.experts
    api.prune(MagnitudeConfig(), targets=[(ex, "gate_up_proj")], amount=0.5)
    assert int((ex.gate_up_proj == 0).sum()) == ex.gate_up_proj.numel() // 2


def test_the_optimum_default_selection_warns_and_an_explicit_include_does_not():
    from obs_plugins.integrations.optimum import PruningConfig, select_targets
    model = tiny_mixtral()
    _, msgs = _unpruned(lambda: select_targets(model, PruningConfig(sparsity=0.5)))
    assert len(msgs) == 1 and "experts.down_proj" in msgs[0]
    _, msgs = _unpruned(lambda: select_targets(model, PruningConfig(sparsity=0.5, include=[r"self_attn"])))
    assert msgs == []   # the user chose the layers
    _, msgs = _unpruned(lambda: select_targets(model, PruningConfig(sparsity=0.5, exclude=[r"mlp\.", "lm_head"])))
    assert msgs == []   # what the user excluded on purpose is not reported


def test_models_of_linear_layers_and_embeddings_do_not_warn():
    import transformers
    from obs_plugins import prunable_linear_targets
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                       intermediate_size=64, image_size=16, patch_size=8))
    assert any(p.dim() >= 2 and "embeddings" in n and not isinstance(m, nn.Embedding)
               for mn, m in vit.named_modules() for n, p in m.named_parameters(recurse=False))  # cls/position tables
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=4))
    for model in (llama, vit, gpt2, problem()[0]):   # GPT-2's layers are Hugging Face Conv1D
        _, msgs = _unpruned(lambda: prunable_linear_targets(model))
        assert msgs == [], type(model).__name__
    from torch.ao.pruning import WeightNormSparsifier
    from obs_plugins import ContinuousSparsifier
    prepared = problem()[0]   # a selected layer's own parametrized storage is not "outside" it (it warned 50%)
    WeightNormSparsifier(sparsity_level=0.5).prepare(prepared, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    gated = problem()[0]
    ContinuousSparsifier(gated, [(gated[0], "weight"), (gated[2], "weight")], rounds=1, epochs=2, progress=False)
    for model in (prepared, gated):
        _, msgs = _unpruned(lambda: prunable_linear_targets(model))
        assert msgs == [], msgs
    from obs_plugins.targets import weights_outside_layers
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(30, 8))   # the model itself parametrized
    assert weights_outside_layers(normed) == []
    enc = nn.TransformerEncoderLayer(32, 4, 64)   # in_proj_weight is a parameter of MultiheadAttention itself
    _, msgs = _unpruned(lambda: prunable_linear_targets(enc))
    assert len(msgs) == 1 and "self_attn.in_proj_weight" in msgs[0]


def test_a_3d_expert_tensor_given_to_the_layer_curvature_is_refused_naming_it():
    model = tiny_mixtral()
    ex = model.model.layers[0].mlp.experts
    before = state(model)
    batches = [{"input_ids": torch.randint(0, 96, (2, 8))}]
    with pytest.raises(PruningInputError, match=r"params\[1\]: model\.layers\.0\.mlp\.experts\.gate_up_proj is not "
                                                r"a layer weight.*3-D"):
        Curvature.layerwise(model, [(model.model.layers[0].self_attn.q_proj, "weight"), (ex, "gate_up_proj")],
                            batches, progress=False)
    assert same(state(model), before)
