"""Known-answer tests that pin adapter behaviours (integrations/torch_pruning.py, torch_prune.py, torch_ao.py,
optimum.py, onnx/verify.py) which a mutation-testing review found unpinned: each test fails on a mutant that
the rest of the suite let survive.  Expected values come from brute force or hand arithmetic."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from obs_plugins import Curvature, PruningInputError

tp = pytest.importorskip("torch_pruning")

from obs_plugins.integrations.torch_pruning import OBSImportance  # noqa: E402
from obs_plugins.methods.obs_iht.structured import output_sensitivity  # noqa: E402
from test_torch_pruning import all_layers, mlp_problem, mse_sum  # noqa: E402


def _curv(model, batches, dtype=torch.float32):
    return Curvature.layerwise(model, all_layers(model), batches, loss_fn=mse_sum, dtype=dtype, progress=False)


# ------------------------------------------------------------------ item 3: iterative OBSImportance.step
@pytest.mark.parametrize("global_pruning", [False, True], ids=["local", "global"])
def test_two_iterative_steps_remove_the_implied_counts_and_end_at_the_least_squares_refit(global_pruning):
    model, batches, X = mlp_problem()
    ref = copy.deepcopy(model)
    imp = OBSImportance(_curv(model, batches, torch.float64), rel_damp=1e-10)
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, iterative_steps=2,
                              ignored_layers=[model[2]], global_pruning=global_pruning)
    recs = [imp.step(pr) for _ in range(2)]
    # 12 channels, ratio 0.5 over two steps: 12 - int(12 * 0.75) = 3, then 9 - int(12 * 0.5) = 3
    assert [r["root_channels_removed"] for r in recs] == [3, 3]
    assert [r["implied_by_ratio"] for r in recs] == ([3, 3] if global_pruning else [None, None])
    assert model[0].out_features == 6 and model[2].in_features == 6
    # the first layer's rows are only dropped: find which ones were kept
    kept = [int((ref[0].weight - r).abs().sum(1).argmin()) for r in model[0].weight]
    assert len(set(kept)) == 6
    with torch.no_grad():
        A = torch.relu(ref[0](X)).double()
        Y = A @ ref[2].weight.double().t()
    coef = torch.linalg.lstsq(A[:, kept], Y).solution          # the exact OBS update = least-squares refit
    assert (model[2].weight.double() - coef.t()).abs().max().item() < 1e-6


def test_first_iterative_step_keeps_the_output_sensitivities_of_the_kept_rows():
    model, batches, X = mlp_problem(widths=(6, 12, 8, 3))
    imp = OBSImportance(_curv(model, batches), scale="loss")
    keys = list(imp._module)
    orig = {k: v.clone() for k, v in output_sensitivity(imp.curvature, keys).items()}
    bias0 = {0: model[0].bias.detach().clone(), 2: model[2].bias.detach().clone()}
    pr = tp.pruner.MetaPruner(model, X[:2], importance=imp, pruning_ratio=0.5, iterative_steps=2,
                              ignored_layers=[model[4]], global_pruning=False)
    imp.step(pr)
    checked = 0
    for i in (0, 2):
        key = imp._key[id(model[i])]
        kept = [int((bias0[i] - b).abs().argmin()) for b in model[i].bias.detach()]   # biases are not updated
        assert len(set(kept)) == model[i].out_features < bias0[i].numel()
        torch.testing.assert_close(imp._s[key], orig[key].reshape(-1)[kept].float())
        checked += kept != list(range(len(kept)))
    assert checked          # at least one layer kept rows other than its first ones
    imp.step(pr)            # and the second step runs on the sliced state
    assert model[0].out_features == 6 and model[2].out_features == 4


# ------------------------------------------------------------------ item 8: the strict count check
class _Fixed(tp.importance.Importance):
    def __init__(self, by_size):
        self.by_size = by_size

    def __call__(self, group):
        return self.by_size[len(group[0].idxs)].clone()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and \
        set(model.state_dict()) == set(before)


def test_strict_step_refuses_one_channel_more_than_implied_by_a_tie_and_changes_nothing():
    model, batches, X = mlp_problem()
    before = _state(model)
    imp = OBSImportance(_curv(model, batches))
    # 12 channels, global ratio 0.5 -> 6; the 6th and 7th smallest scores tie, so Torch-Pruning would take 7
    fixed = _Fixed({12: torch.tensor([0., 1, 2, 3, 4, 5, 5, 7, 8, 9, 10, 11])})
    pr = tp.pruner.MetaPruner(model, X[:2], importance=fixed, pruning_ratio=0.5, global_pruning=True,
                              ignored_layers=[model[2]])
    with pytest.raises(PruningInputError, match="would remove 7 channels where pruning_ratio implies 6"):
        imp.step(pr)
    assert _unchanged(model, before) and model[0].out_features == 12


def test_strict_step_refuses_one_channel_fewer_than_implied_by_a_skipped_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2), nn.ReLU(), nn.Linear(2, 3))
    X = torch.randn(128, 6)
    batches = [(X[i:i + 64], model(X[i:i + 64]).detach()) for i in (0, 64)]
    before = _state(model)
    imp = OBSImportance(_curv(model, batches))
    # 14 channels, ratio 0.5 -> 7; the 2-channel group scores lowest and would lose every channel, so it is
    # skipped; a tie at the threshold (5, 5) adds one: Torch-Pruning would remove 6, one fewer than implied
    fixed = _Fixed({12: torch.tensor([1., 2, 3, 4, 5, 5, 7, 8, 9, 10, 11, 12]), 2: torch.tensor([0., 0.5])})
    pr = tp.pruner.MetaPruner(model, X[:2], importance=fixed, pruning_ratio=0.5, global_pruning=True,
                              ignored_layers=[model[4]])
    with pytest.raises(PruningInputError, match="would remove 6 channels where pruning_ratio implies 7"):
        imp.step(pr)
    assert _unchanged(model, before)


# ------------------------------------------------------------------ items 9, 10: a channel read by two layers
class _Fork(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


def _fork():
    torch.manual_seed(0)
    m = _Fork().eval()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(128, 5, generator=g), torch.randn(128, 3, generator=g)
    curv = Curvature.layerwise(m, [(m.a, "weight"), (m.b, "weight"), (m.c, "weight")],
                               [(X[i:i + 64], Y[i:i + 64]) for i in (0, 64)], loss_fn=mse_sum,
                               dtype=torch.float64, progress=False)
    grp = tp.DependencyGraph().build_dependency(m, X[:2]).get_pruning_group(m.a, tp.prune_linear_out_channels,
                                                                            idxs=list(range(6)))
    return m, curv, grp


def test_single_mode_score_sums_the_removal_errors_of_both_consumers():
    m, curv, grp = _fork()
    s = OBSImportance(curv, compensate=False, scale=None)(grp)
    brute = torch.zeros(6, dtype=torch.float64)
    for L in (m.b, m.c):   # removing column j without update: 1/2 sum_r w_rj^2 H_jj
        H = curv.hessians[curv.target(L, "weight").key].double()
        brute += 0.5 * (L.weight.detach().double() ** 2).sum(0) * torch.diag(H)
    torch.testing.assert_close(s.double(), brute, rtol=1e-4, atol=0)


def test_channel_blocks_on_one_of_two_consumers_scores_the_group_in_blocks():
    m, curv, grp = _fork()
    s = OBSImportance(curv, compensate=False, scale=None, channel_blocks={m.b: 2})(grp)
    assert torch.equal(s[0::2], s[1::2]) and len(set(s.tolist())) == 3   # blocks of 2 (the larger block wins)


# ------------------------------------------------------------------ items 1, 7: check_outputs
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from obs_plugins.integrations import onnx as ox  # noqa: E402
from obs_plugins.integrations.onnx.verify import check_outputs, check_sparsity  # noqa: E402


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_onnx_output_fails_the_output_check(bad):
    (row,) = check_outputs("r", [np.array([1.0, bad])], [torch.tensor([1.0, 1.0])], 1e-4, 1e-3)
    assert row["ok"] is False


def test_output_tolerance_is_relative_to_the_reference_magnitude():
    ref = torch.full((4,), 1000.0)
    # |err| = 0.5 <= 1e-4 + 1e-3 * 1000 = 1.0001: passes only through the relative term
    (row,) = check_outputs("r", [ref.numpy() * 1.0005], [ref], 1e-4, 1e-3)
    assert row["ok"] is True
    # |err| = 5e-4 > 1e-4 + 1e-3 * 0.01 = 1.1e-4: fails (an absolute rtol would let 1.1e-3 through)
    (row,) = check_outputs("r", [np.array([0.01 + 5e-4], dtype=np.float32)], [torch.tensor([0.01])], 1e-4, 1e-3)
    assert row["ok"] is False


def _pruned_mlp(amount=0.5):
    from torch.nn.utils import prune
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    for m in model:
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount=amount)
    return model


# ------------------------------------------------------------------ item 2: speedup = baseline median / route median
def test_every_route_speedup_is_the_baseline_median_over_its_own_median(tmp_path):
    model, x = _pruned_mlp(), torch.randn(4, 16)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="on")
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    rep = ox.verify(res, model, x, runs=10, warmup=1, baseline=dense)
    st = rep.latency[4]
    assert set(st) == {"dense", "pruned", "sparse-kernel"}
    assert st["dense"]["speedup"] == 1.0
    for n in ("pruned", "sparse-kernel"):
        assert st[n]["speedup"] == pytest.approx(st["dense"]["median_ms"] / st[n]["median_ms"], rel=1e-12)
        assert st[n]["median_ms"] != st["dense"]["median_ms"]      # so the ratio's direction is visible


# ------------------------------------------------------------------ items 4, 5, 6: check_sparsity
def test_a_sparse_kernel_csr_triplet_that_lost_its_zeros_fails_the_sparsity_check(tmp_path):
    from onnx import numpy_helper
    from obs_plugins.integrations.onnx.rewrite import CSR_SUFFIXES
    model, x = _pruned_mlp(), torch.randn(4, 16)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="on")
    assert res.sparse_kernel_path and len(res.rewritten) == 3
    assert check_sparsity(model, res.path, res.sparse_kernel_path)[1] == []
    proto = onnx.load(res.sparse_kernel_path)
    inits = {i.name: i for i in proto.graph.initializer}
    stem = sorted(n[:-len(CSR_SUFFIXES[0])] for n in inits if n.endswith(CSR_SUFFIXES[0]))[0]
    old = {s: numpy_helper.to_array(inits[stem + s]) for s in CSR_SUFFIXES}
    rows, cols = (int(d) for d in old[CSR_SUFFIXES[3]])
    # the same matrix with every zero replaced by 0.3: a CSR triplet with no zeros left
    new = {CSR_SUFFIXES[0]: np.full(rows * cols, 0.3, dtype=old[CSR_SUFFIXES[0]].dtype),
           CSR_SUFFIXES[1]: np.tile(np.arange(cols), rows).astype(old[CSR_SUFFIXES[1]].dtype),
           CSR_SUFFIXES[2]: (np.arange(rows + 1) * cols).astype(old[CSR_SUFFIXES[2]].dtype)}
    for s, a in new.items():
        inits[stem + s].CopyFrom(numpy_helper.from_array(a, stem + s))
    onnx.save(proto, res.sparse_kernel_path)
    _, failures = check_sparsity(model, res.path, res.sparse_kernel_path)
    assert len(failures) == 1 and "sparsity did not survive" in failures[0]
    assert f"(CSR, {res.sparse_kernel_path.split('/')[-1]})" in failures[0]


def test_a_pruned_weight_no_onnx_initializer_holds_is_reported_not_skipped(tmp_path):
    model, x = _pruned_mlp(), torch.randn(4, 16)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="off")
    from torch.nn.utils import prune
    # the exported layers plus one more pruned Linear the file never saw: its zeros cannot be checked, which must
    # be reported, not skipped (a weight is skipped only when it has no zeros to check)
    torch.manual_seed(2)
    extra = prune.l1_unstructured(nn.Linear(4, 4), "weight", amount=0.5)
    bigger = nn.Sequential(*model, extra)
    sparsity, failures = check_sparsity(bigger, res.path)
    assert len(failures) == 1 and "'5.weight'" in failures[0]
    assert "no ONNX initializer holds this weight" in failures[0]
    assert sorted(r["param"] for r in sparsity if r["ok"]) == ["0.weight", "2.weight", "4.weight"]
    assert check_sparsity(nn.Sequential(*model, nn.Linear(4, 4)), res.path)[1] == []   # a dense extra: nothing
    (row,) = [r for r in sparsity if r["param"] == "5.weight"]
    assert row["onnx_sparsity"] is None and row["ok"] is False


def test_one_more_zero_after_export_fails_the_sparsity_check(tmp_path):
    model, x = _pruned_mlp(), torch.randn(4, 16)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="off")
    with torch.no_grad():   # prune exactly one more entry of 2.weight: 1/1024 more zeros than the file holds
        j = int(model[2].weight_mask.reshape(-1).nonzero()[0])
        model[2].weight_mask.view(-1)[j] = 0
    rep = ox.verify(res, model, x, bench=False, raise_on_fail=False)
    msgs = [f for f in rep.info["failures"] if "sparsity did not survive" in f]
    assert len(msgs) == 1 and "'2.weight'" in msgs[0]
    with pytest.raises(ox.VerificationError, match="sparsity did not survive for '2.weight'"):
        ox.verify(res, model, x, bench=False)


# ------------------------------------------------------------------ item 12: load_pruned restores the sizes
def test_load_pruned_restores_head_counts_and_sizes_and_a_second_prune_reads_them(tmp_path):
    from obs_plugins.integrations.torch_pruning import load_pruned, prune_transformer
    from test_torch_pruning import tiny_bert, token_batches
    model = tiny_bert()
    ids, am, _ = token_batches()
    ex = {"input_ids": ids[:2], "attention_mask": am[:2]}
    prune_transformer(model, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5)
    model.save_pretrained(tmp_path)
    back = load_pruned(tmp_path)
    assert back.config.num_attention_heads == 2 and back.config.intermediate_size == 32   # 4 -> 2, 64 -> 32
    for layer in back.encoder.layer:
        sa = layer.attention.self
        assert sa.num_attention_heads == 2 and sa.all_head_size == 16          # 2 heads x 8 dims
    prune_transformer(back, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5)
    for layer in back.encoder.layer:
        assert layer.attention.self.num_attention_heads == 1 and layer.attention.self.query.out_features == 8
        assert layer.intermediate.dense.out_features == 16


# ------------------------------------------------------------------ item 16: torch.prune / torch.ao refusals
def _ao_problem():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    X, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    curv = Curvature.layerwise(m, [(m[0], "weight"), (m[2], "weight")], [(X, y)], loss_fn=F.cross_entropy,
                               progress=False)
    return m, curv


def test_obsiht_apply_refuses_importance_scores_and_leaves_the_layer_unpruned():
    from obs_plugins import OBSIHT
    m, curv = _ao_problem()
    w = m[0].weight.detach().clone()
    with pytest.raises(PruningInputError, match="importance_scores: OBSIHT uses its own OBS saliency"):
        OBSIHT.apply(m[0], "weight", 0.5, curv, importance_scores=torch.ones_like(w))
    assert not hasattr(m[0], "weight_mask") and torch.equal(m[0].weight, w)


def test_sparsifier_refuses_a_group_level_that_contradicts_nm():
    from obs_plugins.integrations.torch_ao import OBSIHTSparsifier
    m, curv = _ao_problem()
    sp = OBSIHTSparsifier(curv, sparsity_level=0.5, nm="2:4", progress=False)
    sp.prepare(m, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "sparsity_level": 0.7}])
    with pytest.raises(PruningInputError, match="sparsity_level=0.7 does not match nm=2:4"):
        sp.step()


def test_sparsifier_refuses_a_tensor_prepared_in_two_groups():
    from obs_plugins.integrations.torch_ao import OBSIHTSparsifier
    m, curv = _ao_problem()
    sp = OBSIHTSparsifier(curv, sparsity_level=0.5, progress=False)
    sp.prepare(m, [{"tensor_fqn": "0.weight"}])
    sp.prepare(m, [{"tensor_fqn": "0.weight", "sparsity_level": 0.75}])
    with pytest.raises(PruningInputError, match="0.weight is in two groups"):
        sp.step()


# ------------------------------------------------------------------ item 15: optimum config, selection, callback
transformers = pytest.importorskip("transformers")
from obs_plugins.integrations import optimum as hf  # noqa: E402


def test_nm_pattern_refuses_a_sparsity_that_is_not_n_over_m():
    with pytest.raises(PruningInputError, match="sparsity: the 2:4 pattern prunes exactly 0.5"):
        hf.PruningConfig(method="magnitude", pattern="2:4", sparsity=0.45)
    assert hf.PruningConfig(method="magnitude", pattern="2:4", sparsity=0.5).sparsity == 0.5


def test_default_selection_skips_a_grouped_convolution():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Linear(8, 2))
    targets = hf.select_targets(model, hf.PruningConfig(method="magnitude", sparsity=0.5, exclude=[]))
    assert [id(t.module) for t in targets] == [id(model[1]), id(model[3])]


def test_a_dataloader_is_read_only_until_num_samples():
    data = [{"input_ids": torch.full((6,), i)} for i in range(40)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)          # 10 batches of 4
    out = hf.calibration_batches(loader, hf.PruningConfig(method="magnitude", sparsity=0.5, num_samples=8))
    assert len(out) == 2 and [int(b["input_ids"][0, 0]) for b in out] == [0, 4]


@pytest.mark.parametrize("max_steps, end, steps", [(16, 12, list(range(1, 13))), (40, 30, list(range(3, 31, 3)))])
def test_default_schedule_ends_at_three_quarters_and_prunes_ten_times(max_steps, end, steps):
    # end_step = int(0.75 * max_steps); frequency = (end - begin) // 10 (at least 1)
    cb = hf.PruningCallback(hf.PruningConfig(method="magnitude", sparsity=0.5))
    cb._setup_schedule(max_steps)
    assert cb.end == end and cb.prune_steps == steps


def test_training_stopped_before_end_step_still_reaches_the_target_sparsity(tmp_path):
    from test_optimum import _train

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True
            return control

    cfg = hf.PruningConfig(method="magnitude", sparsity=0.7, end_step=8, frequency=2)
    model, cb, trainer, _ = _train(tmp_path, cfg, after_cb=[Stop()])
    assert trainer.state.global_step == 4
    targets = hf.select_targets(model, cfg)
    zeros = sum(int((t.orig() == 0).sum()) for t in targets)
    assert zeros == round(0.7 * cb.weights)
    assert cb.sparsity() == pytest.approx(round(0.7 * cb.weights) / cb.weights)


# ------------------------------------------------------------------ items 13, 14: prune_transformer bookkeeping
def _bert_and_example():
    from test_torch_pruning import tiny_bert, token_batches
    ids, am, _ = token_batches()
    return tiny_bert(), {"input_ids": ids[:2], "attention_mask": am[:2]}


def test_global_ffn_pass_removes_total_minus_int_of_the_kept_fraction():
    from obs_plugins.integrations.torch_pruning import prune_transformer
    model, ex = _bert_and_example()
    prune_transformer(model, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.3, heads=False,
                      global_pruning=True)
    widths = [la.intermediate.dense.out_features for la in model.encoder.layer]
    assert sum(widths) == 89          # 128 - int(128 * 0.7) = 128 - 39 (round would keep 90)


def test_unequal_head_counts_are_recorded_per_layer_and_not_claimed_by_the_config():
    from obs_plugins.integrations.torch_pruning import CONFIG_KEY, prune_transformer
    model, ex = _bert_and_example()
    with torch.no_grad():   # layer 0's heads dominate except its head 0, which is the weakest of all
        sa = model.encoder.layer[0].attention
        for lin in (sa.self.query, sa.self.key, sa.self.value):
            lin.weight.mul_(10)
            lin.weight[:8].mul_(1e-4)
        sa.output.dense.weight.mul_(10)
        sa.output.dense.weight[:, :8].mul_(1e-4)
    prune_transformer(model, ex, tp.importance.GroupMagnitudeImportance(normalizer=None), 0.5, ffn=False,
                      global_pruning=True)
    heads = [la.attention.self.num_attention_heads for la in model.encoder.layer]
    assert sorted(heads) == [1, 3] and sum(heads) == 4          # 8 heads, global ratio 0.5
    assert model.config.num_attention_heads == 4                # no single count to claim: left as it was
    attrs = getattr(model.config, CONFIG_KEY)["attributes"]
    assert [attrs[f"encoder.layer.{i}.attention.self"]["num_attention_heads"] for i in (0, 1)] == heads


# ------------------------------------------------------------------ item 17: export options, plan()
def test_sparse_kernel_on_rewrites_a_half_sparse_mlp_and_auto_does_not(tmp_path):
    model, x = _pruned_mlp(0.5), torch.randn(4, 16)
    on = ox.export(model, x, tmp_path / "on.onnx", sparse_kernel="on")
    auto = ox.export(model, x, tmp_path / "auto.onnx", sparse_kernel="auto")   # threshold 0.8 > 0.5
    assert len(on.rewritten) == 3 and on.sparse_kernel_path
    assert auto.rewritten == [] and auto.sparse_kernel_path is None


def test_sparse_storage_moves_only_weights_beyond_two_thirds_zeros(tmp_path):
    from obs_plugins.integrations.onnx.verify import onnx_weight_sparsity
    for amount, storage in ((0.5, "dense"), (0.9, "coo")):
        model, x = _pruned_mlp(amount), torch.randn(4, 16)
        res = ox.export(model, x, tmp_path / f"s{amount}.onnx", sparse_kernel="off", sparse_storage=True)
        sp = onnx_weight_sparsity(res.path)
        weights = [v for v in sp.values() if len(v["shape"]) == 2]
        assert len(weights) == 3 and {v["storage"] for v in weights} == {storage}, (amount, sp)


def test_plan_without_update_returns_no_operator_even_when_compensating():
    model, batches, X = mlp_problem()
    imp = OBSImportance(_curv(model, batches), compensate=True)
    grp = tp.DependencyGraph().build_dependency(model, X[:2]).get_pruning_group(
        model[0], tp.prune_linear_out_channels, idxs=[1, 4])
    ((key, P, C),) = imp.plan(grp, update=False)
    assert P.tolist() == [1, 4] and C is None
    ((_, P2, C2),) = imp.plan(grp)
    assert sorted(P2.tolist()) == [1, 4] and C2 is not None


@pytest.mark.parametrize("interrupt, where", [(KeyboardInterrupt, "mask"), (RuntimeError, "mask"),
                                               (KeyboardInterrupt, "hook")])
def test_apply_interrupted_on_a_first_application_leaves_the_module_as_it_was(interrupt, where):
    """torch's apply rolls a first application back only on an Exception: a Ctrl-C inside our mask left the
    module with ``weight_orig`` and no ``weight`` (its forward then failed).  Any failure now puts back the same
    parameter objects in their order, the buffers, and no hook."""
    from unittest import mock

    from tiny import classifier_problem

    from obs_plugins import OBSIHT
    model, batches, curv = classifier_problem(8, 16, 4, rows=32)
    params, buffers = list(model[0]._parameters.items()), list(model[0]._buffers.items())
    before = model[0].weight.detach().clone()
    # "mask": inside our mask; "hook": a Ctrl-C after our new weights, torch's weight_mask and weight are in,
    # as torch adds its hook (an Exception there meets torch's own rollback, which fails on the set weight)
    patch = (mock.patch("torch.linalg.cholesky_ex", side_effect=interrupt) if where == "mask" else
             mock.patch.object(model[0], "register_forward_pre_hook", side_effect=interrupt))
    with patch:
        with pytest.raises(interrupt):
            OBSIHT.apply(model[0], "weight", amount=0.5, curvature=curv, progress=False)
    assert list(model[0]._parameters.items()) == params and list(model[0]._buffers.items()) == buffers
    assert "weight" not in model[0].__dict__ and not model[0]._forward_pre_hooks
    assert torch.equal(model[0].weight, before)
    model(batches[0][0])
    OBSIHT.apply(model[0], "weight", amount=0.5, curvature=curv, progress=False)
    assert int((model[0].weight == 0).sum()) == 64


@pytest.mark.parametrize("fail_at, interrupt", [(1, KeyboardInterrupt), (2, RuntimeError)])
def test_obs_importance_step_failing_inside_torch_prunings_prune_rolls_back(fail_at, interrupt):
    """OBSImportance.step writes the OBS update, then Torch-Pruning prunes group by group: a failure in the k-th
    group.prune() left updated (and, from k = 2, narrower) weights.  The model, the pruning history and the
    pruner's step are put back, and the retried step gives a fresh run's model."""
    from unittest import mock

    import torch.nn.functional as F
    import torch_pruning as tp

    from obs_plugins import Curvature
    from obs_plugins.integrations.torch_pruning import OBSImportance
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(4)]

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        curv = Curvature.layerwise(m, [(m[0], "weight"), (m[2], "weight"), (m[4], "weight")], data,
                                   loss_fn=F.cross_entropy, progress=False)
        imp = OBSImportance(curv)
        return m, imp, tp.pruner.MetaPruner(m, data[0][0], importance=imp, pruning_ratio=0.5, ignored_layers=[m[4]])

    ref, imp_r, pr_r = build()
    imp_r.step(pr_r)
    m, imp, pr = build()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    real, calls = tp.dependency.Group.prune, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise interrupt("inside group.prune")
        return real(self, *a, **k)

    with mock.patch.object(tp.dependency.Group, "prune", failing):
        with pytest.raises(interrupt):
            imp.step(pr)
    after = m.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert pr.current_step == 0 and pr.DG._pruning_history == []
    imp.step(pr)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert [tuple(p.shape) for p in m.parameters()] == [tuple(p.shape) for p in ref.parameters()]


def test_obs_importance_step_rollback_restores_torch_prunings_graph_for_a_standalone_parameter():
    """Pruning a group that holds a standalone parameter (a channel scale) re-keys Torch-Pruning's dependency
    graph on the new, narrower parameter; a rollback that put only the model back left the graph on an orphan,
    and the retried step pruned nothing of the scale's group.  The retry now equals a fresh run."""
    from unittest import mock

    import torch.nn.functional as F
    import torch_pruning as tp

    from obs_plugins import Curvature
    from obs_plugins.integrations.torch_pruning import OBSImportance
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(4)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
            self.scale = nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x) * self.scale))))

    def build():
        torch.manual_seed(0)
        m = Net()
        curv = Curvature.layerwise(m, [(m.a, "weight"), (m.b, "weight"), (m.c, "weight")], data,
                                   loss_fn=F.cross_entropy, progress=False)
        imp = OBSImportance(curv)
        return m, imp, tp.pruner.MetaPruner(m, data[0][0], importance=imp, pruning_ratio=0.5, ignored_layers=[m.c])

    ref, imp_r, pr_r = build()
    imp_r.step(pr_r)
    m, imp, pr = build()
    real = tp.dependency.Group.prune

    def failing(self, *a, **k):
        out = real(self, *a, **k)
        if any(dep.target.type == tp.ops.OPTYPE.PARAMETER for dep, _ in self):   # the scale's group is done
            raise KeyboardInterrupt("after the group holding the standalone parameter")
        return out

    with mock.patch.object(tp.dependency.Group, "prune", failing):
        with pytest.raises(KeyboardInterrupt):
            imp.step(pr)
    assert any(p is m.scale for p in pr.DG._param_to_name)
    imp.step(pr)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
