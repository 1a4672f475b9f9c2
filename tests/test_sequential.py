"""Sequential calibration interleaved with the plan (issue 23): block i's Grams are collected on the outputs of
blocks < i with their *planned* weights, and nothing is written to the model until the whole plan exists."""
import copy

import pytest
import torch
from torch.nn.utils import prune

from obs_plugins import OBSIHT, Curvature, OBSIHTConfig, api
from obs_plugins.errors import CurvatureError, PruningInputError
from obs_plugins.lm import causal_lm_batches, causal_lm_loss
from obs_plugins.methods.obs_iht import solver


def tiny_llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def llama_problem():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    batches = causal_lm_batches(torch.randint(0, 96, (12, 16), generator=g), batch_size=4)
    params = [(m, "weight") for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    return model, params, batches


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()))


def assert_untouched(model, snap):
    state, flags, hooks = snapshot(model)
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)
    assert flags == snap[1] and hooks == snap[2]


def test_auto_is_sequential_for_a_block_stack_and_one_pass_otherwise():
    model, params, batches = llama_problem()
    assert Curvature.layerwise(model, params, batches, progress=False).sequential
    assert not Curvature.layerwise(model, params, batches, sequential=False, progress=False).sequential
    with_head = params + [(model.lm_head, "weight")]  # a target outside the stack: one pass
    assert not Curvature.layerwise(model, with_head, batches, progress=False).sequential
    with pytest.raises(Exception, match="sequential=True"):
        Curvature.layerwise(model, with_head, batches, sequential=True, progress=False)


def test_sequential_plan_equals_pruning_block_by_block_and_recollecting():
    model, params, batches = llama_problem()
    ref = copy.deepcopy(model)
    snap = snapshot(model)
    cfg = OBSIHTConfig(iterations=1, progress=False)
    curv = Curvature.layerwise(model, params, batches, sequential="block", progress=False)
    plan = api.plan(cfg, curvature=curv, amount=0.5)
    assert plan.report["calibration"] == "sequential" and plan.report["calibration_stages"] == "block"
    assert_untouched(model, snap)  # planning wrote nothing
    onepass = api.plan(cfg, curvature=Curvature.layerwise(model, params, batches, sequential=False,
                                                          progress=False), amount=0.5)
    differ = [k for k, e in plan.entries.items() if not torch.equal(e.mask, onepass.entries[k].mask)]
    assert differ and all(not k.startswith("model.layers.0.") for k in differ)  # block 0 sees the same inputs

    # reference: prune block 0, re-collect on the pruned model for block 1, prune it, ... (one pass each time)
    assert_plan_equals_pruning_in_groups(model, ref, params, batches, cfg, plan,
                                         [lambda n, i=i: n.startswith(f"model.layers.{i}.") for i in range(3)])


def assert_plan_equals_pruning_in_groups(model, ref, params, batches, cfg, plan, groups):
    """Reference: prune the copy ``ref`` one group of weights at a time (``groups``: predicates on the weight's
    module name), each group's Grams collected in one pass on ``ref`` as pruned so far; then ``plan`` applied to
    ``model`` must give the same masks and the same weights to 1e-6."""
    rparams = {n: m for n, m in ref.named_modules()}
    names = {id(m): n for n, m in model.named_modules()}
    for in_group in groups:
        group = [(rparams[names[id(m)]], "weight") for m, _ in params if in_group(names[id(m)])]
        api.prune(cfg, curvature=Curvature.layerwise(ref, group, batches, sequential=False, progress=False),
                  amount=0.5)
    plan.apply(reparametrize=False)
    for (m, _) in params:
        a, b = m.weight.detach(), rparams[names[id(m)]].weight.detach()
        assert torch.equal(a == 0, b == 0), names[id(m)]
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (names[id(m)], float((a - b).abs().max()))


def test_sequential_is_the_default_through_global_unstructured_and_exact_counts():
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
    ref = copy.deepcopy(model)
    from obs_plugins import OBSIHT
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, allocation="uniform",
                              progress=False)
    for m, _ in params:
        assert int((m.weight == 0).sum()) == m.weight.numel() // 2
    # the same as the sequential plan through the core API on a copy
    rp = {n: m for n, m in ref.named_modules()}
    names = {id(m): n for n, m in model.named_modules()}
    rparams = [(rp[names[id(m)]], "weight") for m, _ in params]
    api.prune(OBSIHTConfig(progress=False), curvature=Curvature.layerwise(ref, rparams, batches, progress=False),
              amount=0.5)
    for (m, _), (r, _) in zip(params, rparams):
        assert torch.allclose(m.weight.detach(), r.weight.detach(), atol=1e-6, rtol=0)


def test_a_failure_in_block_3_leaves_the_model_bit_identical(monkeypatch):
    model, params, batches = llama_problem()
    prune.l1_unstructured(params[0][0], "weight", amount=0.2)  # a prior mask must survive untouched too
    snap = snapshot(model)
    real = solver.inverse_factor

    def failing(H, rel_damp, *, what="H", **kw):
        if "layers.2." in what:
            raise CurvatureError(f"injected failure for {what}")
        return real(H, rel_damp, what=what, **kw)

    monkeypatch.setattr(solver, "inverse_factor", failing)
    from obs_plugins import OBSIHT
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
    with pytest.raises(CurvatureError, match="layers.2"):
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, progress=False)
    assert_untouched(model, snap)


def test_later_iterations_start_from_the_sequential_sweep():
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
    p1 = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.5)
    p3 = api.plan(OBSIHTConfig(iterations=3, progress=False), curvature=curv, amount=0.5)
    assert p3.report["calibration"] == "sequential"
    h = p3.report["history"]
    assert h[0]["iteration"] == 1
    # iteration 1 of the T=3 plan is exactly the T=1 plan: same support
    for k, e in p1.entries.items():
        assert torch.equal(e.mask, p3.entries[k].mask)
    assert all(x["holdout_loss"] <= h[0]["holdout_loss"] for x in h if x.get("accepted"))


def test_continuing_from_a_plan_reuses_its_factors_with_the_same_result():
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
    p1 = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.5)
    assert set(p1.solver_state["factors"]) == set(p1.entries)
    cfg = OBSIHTConfig(iterations=2, progress=False)
    reused = solver.solve(curv, None, cfg, initial=p1)
    fresh = copy.copy(p1)
    fresh.solver_state = {}  # forces recomputing every factor from curv.hessians
    recomputed = solver.solve(curv, None, cfg, initial=fresh)
    for k, e in reused.entries.items():
        assert torch.equal(e.mask, recomputed.entries[k].mask)
        assert torch.allclose(e.new_weight, recomputed.entries[k].new_weight, atol=1e-6, rtol=0)


def test_a_key_value_cache_does_not_leak_between_block_runs():
    """Found on SmolLM2 (config.use_cache=True): the block inputs were captured with transformers' DynamicCache,
    so every re-run of a block (collect, then propagate) appended to it and later runs attended to earlier runs'
    keys.  The plan of a model with use_cache=True must equal the plan of the same model with use_cache=False."""
    model, params, batches = llama_problem()
    twin = copy.deepcopy(model)
    model.config.use_cache = True
    twin.config.use_cache = False
    plans = []
    for m in (model, twin):
        ps = [(mod, "weight") for n, mod in m.named_modules()
              if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers.")]
        curv = Curvature.layerwise(m, ps, batches, progress=False)
        plans.append(api.plan(OBSIHTConfig(progress=False), curvature=curv, amount=0.7))
    assert model.config.use_cache is True  # restored
    for (k, a), b in zip(plans[0].entries.items(), plans[1].entries.values()):
        assert torch.equal(a.mask, b.mask), k
        torch.testing.assert_close(a.new_weight, b.new_weight, rtol=0, atol=0)


def test_sequential_plan_does_not_depend_on_the_models_use_cache_setting():
    """Calibration runs without a key/value cache whatever ``config.use_cache`` says (and restores it): the plan
    is bit-identical with use_cache True and False, and the setting is left as the user had it."""
    plans = {}
    for flag in (False, True):
        model, params, batches = llama_problem()
        model.config.use_cache = flag
        curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
        plan = api.plan(OBSIHTConfig(iterations=2, progress=False), curvature=curv, amount=0.5)
        plans[flag] = {k: e.new_weight * e.mask for k, e in plan.entries.items()}
        assert model.config.use_cache is flag
    assert all(torch.equal(plans[True][k], plans[False][k]) for k in plans[False])


def test_layers_fed_the_same_input_share_one_gram_product_with_identical_results(monkeypatch):
    """q/k/v (and gate/up) of a Llama block see the same input tensor: one ``x x^T`` serves them all, and every
    Gram is bit-identical to the one the layer gets when collected alone, and to float64 ``2 X^T X / n``."""
    from obs_plugins.curvature import collect
    model, params, batches = llama_problem()
    calls = []
    real = collect.GramAccumulator.add
    monkeypatch.setattr(collect.GramAccumulator, "add", lambda self, rows: (calls.append(1), real(self, rows))[1])
    curv = Curvature.layerwise(model, params, batches, sequential=False, progress=False)
    assert len(calls) == 4 * 3 * len(batches)  # per block: q (k, v copy it), o, gate (up copies it), down
    names = {id(m): n for n, m in model.named_modules()}
    inputs = {}  # float64 reference: each layer's input rows over all batches
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.setdefault(names[id(m)], []).append(
        a[0].detach().reshape(-1, a[0].shape[-1]).double())) for m, _ in params]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    for t in curv.targets:
        X = torch.cat(inputs[names[id(t.module)]])
        torch.testing.assert_close(curv.hessians[t.key].double(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    for blk in ("model.layers.1.self_attn.", "model.layers.2.mlp."):
        group = [(m, p) for m, p in params if names[id(m)].startswith(blk)]
        for m, p in group:  # each layer alone (no partner to copy from) adds its own rows
            alone = Curvature.layerwise(model, [(m, p)], batches, sequential=False, progress=False)
            key = next(t.key for t in curv.targets if t.module is m)
            assert torch.equal(alone.hessians[alone.targets[0].key], curv.hessians[key])


def test_sublayer_stages_follow_the_forward_pass_and_share_inputs():
    from obs_plugins.curvature.collect import capture_block_inputs, input_stages
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, sequential="sublayer", progress=False)
    block = model.model.layers[1]
    bt = [t for t in curv.targets if any(t.module is m for m in block.modules())]
    cached = capture_block_inputs(model, model.model.layers[0], batches[:1], curv.forward_fn)
    names = {id(m): n.split(".")[-1] for n, m in block.named_modules()}
    stages = [([names[id(t.module)] for t in st], whole) for st, whole in input_stages(block, bt, cached[0])]
    assert stages == [(["q_proj", "k_proj", "v_proj"], False), (["o_proj"], False),
                      (["gate_proj", "up_proj"], False), (["down_proj"], False)]


class _Twice(torch.nn.Module):
    """A block whose first Linear runs twice per forward pass (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.relu(self.b(self.a(x))))


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Twice(), _Twice()])

    def forward(self, x):
        for blk in self.layers:
            x = blk(x)
        return x


def test_a_layer_run_twice_gets_the_gram_of_both_calls_under_sublayer():
    torch.manual_seed(0)
    model = _Stack()
    batches = [torch.randn(5, 4) for _ in range(3)]
    params = [(m, "weight") for blk in model.layers for m in (blk.a, blk.b)]
    sub = api.plan(OBSIHTConfig(iterations=1, progress=False), amount=0.5,
                   curvature=(cs := Curvature.layerwise(model, params, batches, sequential="sublayer", progress=False)))
    # reference for block 0's a: both calls' inputs (x, then relu(b(a(x)))) in its Gram
    blk = model.layers[0]
    rows = torch.cat([torch.cat([x, torch.relu(blk.b(blk.a(x)))]) for x in batches]).detach()
    assert torch.allclose(cs.hessians["layers.0.a.weight"], 2 * rows.T @ rows / rows.shape[0], atol=1e-5)
    assert sub.report["calibration_stages"] == "sublayer"


def test_sublayer_plan_equals_pruning_stage_by_stage_and_recollecting():
    """sequential='sublayer': inside each block, o_proj's Gram is collected with q/k/v already planned, the MLP's
    with the attention planned, down_proj's with gate/up planned -- the same as pruning stage by stage on a copy
    and re-collecting; and it differs from block-level sequential calibration from o_proj of block 0 on."""
    model, params, batches = llama_problem()
    ref = copy.deepcopy(model)
    snap = snapshot(model)
    cfg = OBSIHTConfig(iterations=1, progress=False)
    plan = api.plan(cfg, curvature=Curvature.layerwise(model, params, batches, sequential="sublayer",
                                                       progress=False), amount=0.5)
    assert_untouched(model, snap)
    blockwise = api.plan(cfg, curvature=Curvature.layerwise(model, params, batches, progress=False), amount=0.5)
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        assert torch.equal(plan.entries[k].new_weight, blockwise.entries[k].new_weight)
    assert not torch.allclose(plan.entries["model.layers.0.self_attn.o_proj.weight"].new_weight,
                              blockwise.entries["model.layers.0.self_attn.o_proj.weight"].new_weight)
    stages = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    assert_plan_equals_pruning_in_groups(
        model, ref, params, batches, cfg, plan,
        [lambda n, i=i, st=st: n.startswith(f"model.layers.{i}.") and n.split(".")[-1] in st
         for i in range(3) for st in stages])


def test_sequential_values_and_what_auto_means():
    from obs_plugins.errors import PruningInputError
    model, params, batches = llama_problem()
    with pytest.raises(PruningInputError, match="sequential: True, False, 'auto', 'block' or 'sublayer'"):
        Curvature.layerwise(model, params, batches, sequential="stages", progress=False)
    with_head = params + [(model.lm_head, "weight")]
    for value in ("block", "sublayer"):
        with pytest.raises(PruningInputError, match=f"sequential='{value}': the targets do not all live"):
            Curvature.layerwise(model, with_head, batches, sequential=value, progress=False)
    lay = lambda v: Curvature.layerwise(model, params, batches, sequential=v, progress=False)  # noqa: E731
    assert (lay("block").stages, lay("sublayer").stages, lay(True).stages, lay("auto").stages) == (
        "block", "sublayer", "block", "block")
    assert not lay(False).sequential and lay(False).stages is None
    for value, stages in ((True, "block"), ("sublayer", "sublayer"), (False, None)):
        plan = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=lay(value), amount=0.5)
        assert plan.report["calibration_stages"] == stages


def test_a_stage_run_stops_once_its_layers_have_seen_their_inputs():
    from obs_plugins.curvature.collect import capture_block_inputs, run_block_until
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, sequential="sublayer", progress=False)
    block = model.model.layers[0]
    cached = capture_block_inputs(model, block, batches, curv.forward_fn)
    calls = {"v": 0, "o": 0, "down": 0}
    hooks = [m.register_forward_hook(lambda *_a, _n=n: calls.__setitem__(_n, calls[_n] + 1))
             for n, m in (("v", block.self_attn.v_proj), ("o", block.self_attn.o_proj), ("down", block.mlp.down_proj))]
    run_block_until(block, cached, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj])
    assert calls == {"v": len(batches), "o": 0, "down": 0}  # every batch reached v_proj, none went further
    run_block_until(block, cached, [block.mlp.down_proj])
    assert calls == {"v": 2 * len(batches), "o": len(batches), "down": len(batches)}
    for h in hooks:
        h.remove()
    assert all(len(m._forward_hooks) == 0 for m in block.modules())  # its own hooks are gone too


def test_sublayer_stages_of_a_bert_encoder_layer():
    """The stages are found from the forward pass, not from Llama names: a BERT layer gives query/key/value,
    attention output, intermediate, output; the sublayer plan prunes every weight to the exact count."""
    from transformers import BertConfig, BertModel
    from obs_plugins.curvature.collect import capture_block_inputs, input_stages
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)).eval()
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(0, 96, (4, 12), generator=g)} for _ in range(3)]
    params = [(m, "weight") for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.")]
    curv = Curvature.layerwise(model, params, batches, sequential="sublayer", progress=False)
    layer = model.encoder.layer[1]
    bt = [t for t in curv.targets if any(t.module is m for m in layer.modules())]
    cached = capture_block_inputs(model, model.encoder.layer[0], batches[:1], curv.forward_fn)
    names = {id(m): n for n, m in layer.named_modules()}
    assert [[names[id(t.module)] for t in st] for st, _ in input_stages(layer, bt, cached[0])] == [
        ["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
        ["intermediate.dense"], ["output.dense"]]
    plan = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.5)
    assert plan.report["calibration_stages"] == "sublayer"
    for e in plan.entries.values():
        assert int((~e.mask.bool()).sum()) == e.mask.numel() // 2


class _ResidualOutside(torch.nn.Module):
    """Blocks in a ModuleList whose residual is added by the parent: block i+1 is *not* fed block i's output."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for blk in self.layers:
            x = x + torch.relu(blk(x))
        return x


def test_auto_calibrates_in_one_pass_when_the_blocks_are_not_a_chain():
    """'auto' used to feed block i's output to block i+1 here, so every later Gram was wrong (0.97 relative
    error with nothing pruned); it now sees the stack is not a chain and calibrates in one pass, and an explicit
    'block' order is refused naming sequential."""
    torch.manual_seed(0)
    model = _ResidualOutside()
    params = [(m, "weight") for m in model.layers]
    batches = [torch.randn(16, 8) + 1 for _ in range(2)]
    auto = Curvature.layerwise(model, params, batches, progress=False)
    plain = Curvature.layerwise(model, params, batches, sequential=False, progress=False)
    assert auto.sequential is False
    for k in plain.keys:
        assert torch.equal(auto.hessians[k], plain.hessians[k])
    with pytest.raises(PruningInputError, match="^sequential='block'"):
        Curvature.layerwise(model, params, batches, sequential="block", progress=False)


def test_llama_blocks_are_a_chain_and_auto_stays_sequential():
    model, params, batches = llama_problem()
    assert Curvature.layerwise(model, params, batches, progress=False).sequential is True


def test_calibration_keeps_every_submodule_training_flag():
    """A model in training mode with one BatchNorm frozen in eval mode: calibration, gradients and HVPs run in
    eval mode and give every submodule its own flag back (model.train(was) unfroze the BatchNorm, whose
    running statistics then drifted in the user's next training step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    model.train()
    model[1].eval()
    flags = [m.training for m in model.modules()]
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]
    curv = Curvature.layerwise(model, [(model[0], "weight"), (model[4], "weight")], batches,
                               loss_fn=torch.nn.functional.cross_entropy, progress=False)
    curv.loss_and_grad()
    curv.hvp({t.key: torch.ones_like(t.current()) for t in curv.targets})
    assert [m.training for m in model.modules()] == flags


def _grams_after_a_plan_of_nothing(model, params, batches):
    """Sequential Grams of a plan that prunes nothing (amount=0: the planned weights are the dense ones) and the
    one-pass Grams of the same model: equal wherever each block is fed what the model feeds it."""
    seq = Curvature.layerwise(model, params, batches, progress=False)
    assert seq.sequential
    api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=seq, amount=0.0)
    one = Curvature.layerwise(model, params, batches, sequential=False, progress=False)
    return seq, one


@pytest.mark.parametrize("arch", ["qwen2-sliding-full", "t5-encoder"])
def test_blocks_with_inputs_of_their_own_get_them_in_sequential_calibration(arch):
    """Qwen2 with sliding and full attention layers hands each block its own mask; T5's block 0 computes the
    position bias the other blocks get. Replaying block 0's keyword inputs for every block calibrated the later
    blocks on other activations (relative Gram errors 0.6-0.8 and 1-3e-2)."""
    import transformers
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (4, 16), generator=g)
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    if arch == "qwen2-sliding-full":
        cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       use_sliding_window=True, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention", "full_attention"])
        model = transformers.Qwen2ForCausalLM(cfg).eval()
        stack = model.model.layers
    else:
        cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
        model = transformers.T5EncoderModel(cfg).eval()
        stack = model.encoder.block
    params = [(m, "weight") for m in stack.modules() if isinstance(m, torch.nn.Linear)]
    seq, one = _grams_after_a_plan_of_nothing(model, params, batches)
    assert not seq._shared_inputs
    for k, h in one.hessians.items():
        assert torch.allclose(seq.hessians[k], h, rtol=1e-5, atol=1e-6 * float(h.abs().max())), k


def test_a_short_first_batch_does_not_decide_for_longer_ones():
    """Sliding (window 4) and full masks agree on a 2-token batch and differ on a 16-token one: whether blocks get
    inputs of their own is decided on one batch of every shape, not on the first."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention", "full_attention"])
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 50, (2, 2), generator=g)},
               {"input_ids": torch.randint(0, 50, (2, 16), generator=g)}]
    params = [(m, "weight") for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    seq, one = _grams_after_a_plan_of_nothing(model, params, batches)
    assert not seq._shared_inputs
    for k, h in one.hessians.items():
        assert torch.allclose(seq.hessians[k], h, rtol=1e-5, atol=1e-6 * float(h.abs().max())), k


def test_blocks_sharing_block_0s_inputs_keep_the_short_capture():
    model, params, batches = llama_problem()
    seq, one = _grams_after_a_plan_of_nothing(model, params, batches)
    assert seq._shared_inputs
    assert all(torch.allclose(seq.hessians[k], h, rtol=1e-5, atol=1e-7) for k, h in one.hessians.items())


def test_padding_stays_out_of_hf_conv1d_grams():
    """GPT-2's Conv1D layers see (batch, token, feature) inputs like a Linear: padded tokens stay out."""
    import transformers
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4,
                                                                 n_positions=32)).eval()
    layer = model.transformer.h[0].attn.c_attn
    params = [(m, "weight") for m in model.modules() if type(m).__name__ == "Conv1D"]
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    seen = {}
    h = layer.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach()))
    with torch.no_grad():
        model(**batch)
    h.remove()
    real = seen["x"][mask.bool()].double()
    want = 2 * real.T @ real / real.shape[0]
    for sequential in (False, "auto"):
        curv = Curvature.layerwise(model, params, [batch], sequential=sequential, progress=False)
        assert curv.counts["transformer.h.0.attn.c_attn.weight"] == 15
        assert torch.allclose(curv.hessians["transformer.h.0.attn.c_attn.weight"].double(), want, atol=1e-5)


def test_a_plan_of_one_tensor_leaves_every_gram_available():
    """OBSIHT.apply on one tensor solves that tensor's Gram only; a later global plan on the same curvature needs
    them all (it raised a bare KeyError)."""
    from obs_plugins.integrations.torch_prune import OBSIHT
    model, params, batches = llama_problem()
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
    OBSIHT.apply(params[0][0], "weight", amount=0.5, curvature=curv, iterations=1, progress=False)
    assert set(curv.hessians) == {f"{n}.weight" for n, m in model.named_modules() if any(m is p for p, _ in params)}
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, iterations=1,
                              progress=False)
    total, first = sum(m.weight.numel() for m, _ in params), params[0][0].weight.numel() // 2
    # torch's amount counts the entries still unpruned
    assert sum(int((m.weight == 0).sum()) for m, _ in params) == first + (total - first) // 2


def test_a_layer_shared_by_two_blocks_is_calibrated_in_one_pass():
    model, params, batches = llama_problem()
    layers = model.model.layers
    layers[1].mlp = layers[0].mlp  # one MLP in two blocks: its Gram needs both blocks' inputs
    params = [(m, "weight") for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    curv = Curvature.layerwise(model, params, batches, progress=False)
    assert not curv.sequential
    assert curv.counts["model.layers.0.mlp.down_proj.weight"] == 2 * 12 * 16  # both calls, every token
    with pytest.raises(PruningInputError, match="shared by two blocks"):
        Curvature.layerwise(model, params, batches, sequential=True, progress=False)
    with pytest.raises(PruningInputError, match="^allocation='owl' .*shared by two blocks"):
        api.plan(OBSIHTConfig(iterations=1, allocation="owl", progress=False), curvature=curv, amount=0.5)


def test_on_block_refuses_blocks_that_are_not_a_chain():
    torch.manual_seed(0)
    model = _ResidualOutside()
    params = [(m, "weight") for m in model.layers]
    batches = [torch.randn(4, 8)]
    with pytest.raises(PruningInputError, match="not a chain"):
        Curvature.layerwise(model, params, batches, on_block=lambda i, bt: False, progress=False)


def _cast(x, dtype):
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _floats(x):
    if torch.is_tensor(x):
        return [x] if x.is_floating_point() else []
    if isinstance(x, dict):
        return [t for v in x.values() for t in _floats(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _floats(v)]
    return []


@pytest.fixture
def offload_as_float64(monkeypatch):
    """Offload with a second 'device' a CPU-only test can see: the cache keeps activations in float64 and a block
    runs on float32.  A path that hands a block cached inputs without ``use`` feeds float64 into a float32 layer
    (an error); one that caches without ``keep`` is caught by ``use``'s check.  float32 -> float64 -> float32
    is exact, so the plan must be bit-identical to the one without offload."""
    from obs_plugins.curvature import collect
    calls = {"keep": 0, "use": 0}

    def keep(self, x):
        if self.store is None:
            return x
        calls["keep"] += 1
        return _cast(x, torch.float64)

    def use(self, x):
        if self.store is None:
            return x
        bad = [t.dtype for t in _floats(x) if t.dtype != torch.float64]
        assert not bad, f"an input reached use() without keep(): {bad}"
        calls["use"] += 1
        return _cast(x, torch.float32)

    monkeypatch.setattr(collect._Cached, "keep", keep)
    monkeypatch.setattr(collect._Cached, "use", use)
    return calls


def _plan_tensors(plan):
    return {k: (e.mask.clone(), e.new_weight.clone()) for k, e in plan.entries.items()}


@pytest.mark.parametrize("stages", ["block", "sublayer"])
def test_offloaded_activations_give_the_same_plan(stages, offload_as_float64):
    model, params, batches = llama_problem()
    cfg = OBSIHTConfig(iterations=1, progress=False)
    ref = api.plan(cfg, curvature=Curvature.layerwise(model, params, batches, sequential=stages, offload=False,
                                                      progress=False), amount=0.5)
    assert offload_as_float64["keep"] == 0
    curv = Curvature.layerwise(model, params, batches, sequential=stages, offload=True, progress=False)
    assert curv.offload == torch.device("cpu")
    plan = api.plan(cfg, curvature=curv, amount=0.5)
    assert offload_as_float64["keep"] > 0 and offload_as_float64["use"] > 0
    got, want = _plan_tensors(plan), _plan_tensors(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k][0], want[k][0]) and torch.equal(got[k][1], want[k][1]), k
    for k in ref.report["predicted_layer_loss"]:
        assert plan.report["predicted_layer_loss"][k] == ref.report["predicted_layer_loss"][k]


def test_offloaded_blocks_with_inputs_of_their_own_and_the_eager_hook(offload_as_float64):
    """Block-own inputs (Qwen2's sliding/full masks) are offloaded too, and the older eager ``on_block`` path
    collects the same Grams with and without offload."""
    import transformers
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention", "full_attention"])
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    params = [(m, "weight") for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    plans = []
    for off in (False, True):
        curv = Curvature.layerwise(model, params, batches, offload=off, progress=False)
        assert not curv._shared_inputs
        plans.append(_plan_tensors(api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv,
                                            amount=0.5)))
    for k in plans[0]:
        assert torch.equal(plans[0][k][0], plans[1][k][0]) and torch.equal(plans[0][k][1], plans[1][k][1]), k
    grams = []
    for off in (False, True):
        offload_as_float64["keep"] = 0
        c = Curvature.layerwise(model, params, batches, offload=off, on_block=lambda i, bt: False, progress=False)
        grams.append({k: h.clone() for k, h in c.hessians.items()})
        assert (offload_as_float64["keep"] > 0) == off
    assert all(torch.equal(grams[0][k], grams[1][k]) for k in grams[0])


def test_offload_values_and_what_auto_means():
    model, params, batches = llama_problem()
    assert Curvature.layerwise(model, params, batches, progress=False).offload is None  # auto on a CPU model
    assert Curvature.layerwise(model, params, batches, offload=False, progress=False).offload is None
    assert Curvature.layerwise(model, params, batches, offload=True, progress=False).offload == torch.device("cpu")
    with pytest.raises(PruningInputError, match="offload"):
        Curvature.layerwise(model, params, batches, offload="cpu", progress=False)


def test_a_plan_does_not_depend_on_what_ran_on_the_curvature_before():
    """Global allocation ranked on ``curv.hessians``, which after a sequential plan holds that plan's Grams: the
    README's preview (``api.plan(...).report["layer_sparsity"]``) then differed from the prune that followed it on
    the same curvature (4 of 14 tensors' counts), and any second plan moved.  Allocation now ranks on the
    one-pass Grams of the model as it is, whatever ran before; ``hessians`` keeps the last plan's."""
    model, params, batches = llama_problem()
    cfg = OBSIHTConfig(iterations=1, allocation="global", progress=False)
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
    first, second = (_plan_tensors(api.plan(cfg, curvature=curv, amount=0.5)) for _ in range(2))
    fresh = _plan_tensors(api.plan(cfg, curvature=Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss,
                                                                      progress=False), amount=0.5))
    for k in first:
        assert torch.equal(first[k][0], second[k][0]) and torch.equal(first[k][0], fresh[k][0]), k
        assert torch.equal(first[k][1], second[k][1]), k
    one = Curvature.layerwise(model, params, batches, sequential=False, progress=False).hessians
    again = curv.onepass_hessians(list(one))
    for k, h in one.items():   # collected again, equal to a one-pass curvature's; hessians keeps the plan's
        assert torch.allclose(again[k], h, rtol=1e-5, atol=1e-6 * float(h.abs().max())), k
    assert any(not torch.allclose(curv.hessians[k], h, rtol=1e-3) for k, h in one.items())
    # the preview the README offers is what global_unstructured then does on the same curvature
    preview = api.plan(cfg, curvature=curv, amount=0.5).report["layer_sparsity"]
    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, iterations=1)
    for m, n in params:
        key = next(t.key for t in curv.targets if t.module is m)
        assert float((getattr(m, n + "_mask") == 0).float().mean()) == pytest.approx(preview[key], abs=1e-9), key


def test_offload_copies_a_tensor_every_block_shares_once():
    """Qwen2 hands every block the same mask and rotary tables: the cache held one of each per batch, and the
    offloaded cache held a copy per block (6 blocks: 80 tensors instead of 20).  'meta' stands in for the CPU store
    of a model on an accelerator (a CPU -> CPU .to() copies nothing, a move to another device does)."""
    import transformers
    from obs_plugins.curvature.batching import _tensors as _tensors_in
    from obs_plugins.curvature.collect import capture_block_inputs
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(3))
    batches = [{"input_ids": ids[i:i + 2]} for i in range(0, 8, 2)]
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"] * 3)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    blocks = model.model.layers
    counts = []
    for store in (None, torch.device("meta")):
        c = capture_block_inputs(model, blocks[0], batches, lambda m, b: m(**b), blocks=blocks, store=store,
                                 compute=torch.device("cpu"))
        ts = [t for i in range(1, len(blocks)) for b in c.per_block[i] for t in _tensors_in(b)]
        assert all(t.device.type == ("meta" if store else "cpu") for t in ts)
        counts.append((len(ts), len({id(t) for t in ts})))
    assert counts[0] == counts[1] and counts[0][1] < counts[0][0]


def test_move_rebuilds_namedtuples_and_moves_a_shared_tensor_once():
    """A block returning a namedtuple crashed the offloaded plan (``type(nt)(generator)`` is not how a namedtuple is
    built); with a memo, one tensor met twice is moved once and a freed one is not kept alive."""
    import collections
    import gc
    import weakref
    from obs_plugins.curvature.batching import move
    Out = collections.namedtuple("Out", "hidden aux")
    a, b = torch.randn(3), torch.randn(2)
    got = move(Out(a, [a, {"b": b}]), torch.device("meta"), memo := {})
    assert type(got) is Out and got.hidden.device.type == "meta" and got.aux[0] is got.hidden
    assert got.aux[1]["b"] is not got.hidden and len(memo) == 2
    ref = weakref.ref(b)
    del b, got
    gc.collect()
    assert ref() is None   # the memo did not keep the source alive


def test_an_offloaded_plan_of_blocks_returning_a_namedtuple():
    import collections
    from torch import nn
    Out = collections.namedtuple("Out", "hidden aux")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            return Out(h, h.mean())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for blk in self.layers:
                x = blk(x).hidden
            return x

    torch.manual_seed(0)
    model = Net().eval()
    batches = [torch.randn(16, 8) for _ in range(2)]
    params = [(blk.fc, "weight") for blk in model.layers]
    plans = [_plan_tensors(api.plan(OBSIHTConfig(iterations=1, progress=False), amount=0.5, curvature=Curvature.layerwise(
        model, params, batches, offload=off, progress=False))) for off in (False, True)]
    assert all(torch.equal(plans[0][k][1], plans[1][k][1]) for k in plans[0])


def test_a_plan_after_another_plan_was_applied_equals_one_on_a_fresh_curvature():
    """One-pass Grams read before a plan (``curv.counts``) were reused by a later global allocation even after that
    plan was applied and changed the layers' inputs (2 of 21 tensors' counts moved): a sequential plan now marks
    every stored one-pass Gram stale."""
    def run(fresh):
        model, params, batches = llama_problem()
        curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
        curv.counts  # noqa: B018  (collects the one-pass Grams)
        OBSIHT.apply(model.model.layers[0].self_attn.q_proj, "weight", amount=0.5, curvature=curv, iterations=1)
        if fresh:
            curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, progress=False)
        prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, iterations=1)
        return [int((m.weight_mask == 0).sum()) for m, _ in params]
    assert run(False) == run(True)


@pytest.mark.parametrize("padded", [False, True])
def test_offloaded_one_pass_grams_are_collected_block_by_block_and_equal_the_forward_pass(padded):
    """Under offload a sequential curvature's one-pass Grams (what global / OWL allocation ranks on) come block by
    block, each block's moved to the store as it finishes; they equal the whole forward pass's bit for bit, and so
    does the global plan built on them (also with padded rows, which the Grams leave out)."""
    from obs_plugins.lm import causal_lm_loss
    from obs_plugins.curvature import core
    model, params, batches = llama_problem()
    if padded:
        mask = torch.ones_like(batches[1]["input_ids"])
        mask[:, 11:] = 0
        batches[1] = dict(batches[1], attention_mask=mask)
    ref = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, offload=False, progress=False)
    curv = Curvature.layerwise(model, params, batches, loss_fn=causal_lm_loss, offload=True, progress=False)
    calls = []
    real = core.Curvature._collect_by_blocks
    core.Curvature._collect_by_blocks = lambda self, t: calls.append(len(t)) or real(self, t)
    try:
        want, got = ref.hessians, curv.hessians
    finally:
        core.Curvature._collect_by_blocks = real
    assert calls == [len(params)]                 # only the offloaded curvature took the block route
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(curv.counts[k] == ref.counts[k] for k in want)
    cfg = OBSIHTConfig(iterations=1, allocation="global", progress=False)
    a, b = api.plan(cfg, curvature=ref, amount=0.6), api.plan(cfg, curvature=curv, amount=0.6)
    for k, e in a.entries.items():
        assert torch.equal(e.mask, b.entries[k].mask) and torch.equal(e.new_weight, b.entries[k].new_weight), k
