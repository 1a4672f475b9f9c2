"""Hugging Face / Optimum adapter: PruningConfig, Pruner, PruningCallback, the CLI route (tiny models from configs)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.configuration_utils")

import obs_plugins  # noqa: E402
from obs_plugins.errors import PruningInputError  # noqa: E402
from obs_plugins.integrations import optimum as hf  # noqa: E402
from obs_plugins.integrations.optimum import Pruner, PruningCallback, PruningConfig  # noqa: E402

VOCAB = 120


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed=0, labels=None):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=VOCAB, max_position_embeddings=64)
    if labels:
        cfg.num_labels = labels
        return transformers.BertForSequenceClassification(cfg).eval()
    return transformers.BertModel(cfg).eval()


def samples(n=16, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (seq,), generator=g)} for _ in range(n)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- config
def every_method():
    return [m for m in obs_plugins.list_methods() if m in hf.ROUTES]


def test_every_registered_method_has_a_route():
    assert set(obs_plugins.list_methods()) <= set(hf.ROUTES), "a registered method has no Hugging Face route"


@pytest.mark.parametrize("method", every_method())
def test_config_json_round_trip_every_method(method, tmp_path):
    spec = obs_plugins.get_method(method)
    cfg = PruningConfig(method=method, sparsity=0.7, include=[r"layers\.0\."], num_samples=8, seq_len=32,
                        batch_size=2, end_step=40, frequency=5, method_config=spec.config_cls())
    cfg.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "pruning_config.json").read_text())
    assert on_disk["pruning_config_version"] == hf.PRUNING_CONFIG_VERSION
    assert on_disk["method_config"]["format_version"] == obs_plugins.registry.CONFIG_FORMAT_VERSION
    assert on_disk["method"] == method and on_disk["sparsity"] == 0.7 and "optimum_version" in on_disk
    back = PruningConfig.from_pretrained(tmp_path)
    assert back == cfg and back.pruning_dict() == cfg.pruning_dict()
    mirrored = {"sparsity": 0.7} if any(f.name == "sparsity" for f in dataclasses.fields(spec.config_cls)) else {}
    assert back.method_config_object() == dataclasses.replace(spec.config_cls(), **mirrored)
    assert PruningConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("alias", ["cs", "CS", "continuous_sparsification", "continuous-sparsification"])
def test_cs_aliases_normalise_to_the_registry_name(alias):
    cfg = PruningConfig(method=alias, sparsity=0.5)
    assert cfg.method == "continuous_sparsification"
    assert cfg.method_config["method"] == "continuous_sparsification"


def test_method_config_fields_survive_and_nm_pattern_goes_into_the_method_config(tmp_path):
    cfg = PruningConfig(method="obs_iht", sparsity=None, pattern="2:4",
                        method_config=obs_plugins.OBSIHTConfig(iterations=3, rel_damp=0.05))
    assert cfg.sparsity == 0.5
    mc = cfg.method_config_object()
    assert (mc.iterations, mc.rel_damp, mc.nm) == (3, 0.05, "2:4")
    cfg.save_pretrained(tmp_path)
    assert PruningConfig.from_pretrained(tmp_path).method_config_object() == mc


@pytest.mark.parametrize("kwargs, field", [
    (dict(method="nope"), "method"),
    (dict(sparsity=1.5), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=float("nan")), "sparsity"),
    (dict(sparsity=True), "sparsity"),
    (dict(pattern="heads"), "pattern"),
    (dict(pattern="channels"), "pattern"),
    (dict(pattern="blocks"), "pattern"),
    (dict(pattern="2:4", sparsity=0.7), "sparsity"),
    (dict(method="cs", pattern="2:4", sparsity=None), "pattern"),
    (dict(include=["("]), "include"),
    (dict(exclude=["[a"]), "exclude"),
    (dict(num_samples=0), "num_samples"),
    (dict(seq_len=1.5), "seq_len"),
    (dict(batch_size=-1), "batch_size"),
    (dict(end_step=0), "end_step"),
    (dict(frequency=0), "frequency"),
    (dict(initial_sparsity=0.9, sparsity=0.5), "initial_sparsity"),
    (dict(method_config={"iterations": 0}), "iterations"),
    (dict(method_config={"not_a_field": 1}), "method_config"),
    (dict(method_config=obs_plugins.MagnitudeConfig()), "method_config"),
    (dict(method="magnitude", method_config={"nm": "2:4"}), "method_config"),
    (dict(sparsty=0.5), "sparsty"),
    (dict(exclude=5), "exclude"),
    (dict(include=[r"layers", 3]), "include"),
    (dict(method="cs", method_config={"score_init": "gaussian"}), "score_init"),
    (dict(method="cs", method_config={"score_init_spread": -1.0}), "score_init_spread"),
    (dict(method="cs", method_config={"score_init_quantile": -0.1}), "score_init_quantile"),
    (dict(method="cs", method_config={"mask_scale": "tempered", "score_init": "constant"}), "mask_scale"),
])
def test_bad_config_names_the_field(kwargs, field):
    # a method_config field refused by config_from_dict's validate() comes back as "method_config: <field>: ..."
    with pytest.raises(PruningInputError, match=rf"^(method_config: )?{field}"):
        PruningConfig(**kwargs)


def test_cs_score_init_fields_round_trip_through_json(tmp_path):
    mc = obs_plugins.CSConfig(score_init="magnitude", score_init_spread=0.5, score_init_quantile=0.6,
                              mask_scale="tempered", rounds=1, epochs=4)
    cfg = PruningConfig(method="cs", sparsity=0.7, end_step=18, method_config=mc)
    cfg.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "pruning_config.json").read_text())["method_config"]["config"]
    assert (on_disk["score_init"], on_disk["score_init_spread"], on_disk["score_init_quantile"],
            on_disk["mask_scale"]) == ("magnitude", 0.5, 0.6, "tempered")
    back = PruningConfig.from_pretrained(tmp_path)
    assert back == cfg and back.method_config_object() == mc
    # a file written before these fields existed still loads, with the defaults ("auto")
    f = tmp_path / "pruning_config.json"
    data = json.loads(f.read_text())
    old = {k: v for k, v in data["method_config"]["config"].items() if not k.startswith("score_init")}
    f.write_text(json.dumps({**data, "method_config": {**data["method_config"], "config": old}}))
    got = PruningConfig.from_pretrained(tmp_path).method_config_object()
    assert (got.score_init, got.score_init_spread, got.score_init_quantile) == ("auto", 1.0, None)


def test_structured_patterns_point_to_torch_pruning():
    with pytest.raises(PruningInputError, match="Torch-Pruning"):
        PruningConfig(pattern="heads")


def test_validation_also_guards_from_pretrained(tmp_path):
    PruningConfig(sparsity=0.5).save_pretrained(tmp_path)
    f = tmp_path / "pruning_config.json"
    data = json.loads(f.read_text())
    f.write_text(json.dumps({**data, "sparsity": 1.5}))
    with pytest.raises(PruningInputError, match="^sparsity"):
        PruningConfig.from_pretrained(tmp_path)
    f.write_text(json.dumps({**data, "pruning_config_version": 99}))
    with pytest.raises(PruningInputError, match="^pruning_config_version"):
        PruningConfig.from_pretrained(tmp_path)
    f.write_text(json.dumps({**data, "method_config": {**data["method_config"], "format_version": 7}}))
    with pytest.raises(PruningInputError, match="^method_config: .*format_version"):
        PruningConfig.from_pretrained(tmp_path)


def test_from_pretrained_keyword_overrides_are_validated_and_a_new_method_gets_its_own_config(tmp_path):
    """transformers applies from_pretrained(..., field=value) with setattr after __init__; ours go through the
    checks, and a new method without a method_config starts from that method's defaults."""
    PruningConfig(method="obs_iht", sparsity=0.5).save_pretrained(tmp_path)
    for kwargs, field in ((dict(sparsity=1.5), "sparsity"), (dict(method="nope"), "method"),
                          (dict(pattern="heads"), "pattern")):
        with pytest.raises(PruningInputError, match=f"^{field}"):
            PruningConfig.from_pretrained(tmp_path, **kwargs)
    with pytest.raises(PruningInputError, match="^sparsity"):
        PruningConfig.from_dict(PruningConfig().to_dict(), sparsity=1.5)
    assert PruningConfig.from_pretrained(tmp_path, sparsity=0.7).sparsity == 0.7
    mag = PruningConfig.from_pretrained(tmp_path, method="magnitude")
    assert mag.method == "magnitude" and mag.method_config_object() == obs_plugins.MagnitudeConfig()


def test_a_misspelt_from_pretrained_override_is_refused_not_dropped(tmp_path):
    """transformers drops a keyword that is no attribute; a misspelt pruning field was lost that way."""
    PruningConfig(sparsity=0.5).save_pretrained(tmp_path)
    with pytest.raises(PruningInputError, match="^spasity: not a PruningConfig field .did you mean 'sparsity'"):
        PruningConfig.from_pretrained(tmp_path, spasity=0.7)
    with pytest.raises(PruningInputError, match="^spasity"):
        PruningConfig.from_dict(PruningConfig().to_dict(), spasity=0.7)
    cfg, unused = PruningConfig.from_pretrained(tmp_path, spasity=0.7, return_unused_kwargs=True)
    assert unused == {"spasity": 0.7} and cfg.sparsity == 0.5          # transformers' contract when asked
    assert PruningConfig.from_pretrained(tmp_path, local_files_only=True, revision="main").sparsity == 0.5


def test_default_selection_skips_embeddings_norms_heads():
    keys = [t.key for t in hf.select_targets(tiny_llama(), PruningConfig())]
    assert len(keys) == 14 and all(k.startswith("model.layers.") for k in keys)
    keys = [t.key for t in hf.select_targets(tiny_bert(labels=3), PruningConfig())]
    assert len(keys) == 12 and not any("pooler" in k or "classifier" in k for k in keys)
    only = hf.select_targets(tiny_llama(), PruningConfig(include=[r"mlp"], exclude=[r"down_proj"]))
    assert [t.key.split(".", 3)[-1] for t in only] == ["mlp.gate_proj.weight", "mlp.up_proj.weight"] * 2


def test_cubic_schedule():
    assert hf.cubic_sparsity(0, 0, 10, 0.8) == 0.0
    assert hf.cubic_sparsity(10, 0, 10, 0.8) == pytest.approx(0.8)
    assert hf.cubic_sparsity(5, 0, 10, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert hf.cubic_sparsity(99, 0, 10, 0.8) == pytest.approx(0.8)


# ---------------------------------------------------------------- one-shot Pruner
def _selected_counts(model, cfg):
    ts = hf.select_targets(model, cfg)
    return sum(int((t.orig() == 0).sum()) for t in ts), sum(t.orig().numel() for t in ts)


@pytest.mark.parametrize("method, iterations", [("obs_iht", 1), ("obs_iht", 2), ("magnitude", None),
                                                ("wanda", None)])
def test_pruner_tiny_llama_exact_sparsity_and_reload(method, iterations, tmp_path):
    model = tiny_llama()
    mc = {"iterations": iterations} if iterations else None
    cfg = PruningConfig(method=method, sparsity=0.6, num_samples=8, seq_len=16, batch_size=4, method_config=mc)
    res = Pruner.from_pretrained(model).prune(cfg, calibration_dataset=samples(8), save_dir=tmp_path,
                                              progress=False)
    zeros, total = _selected_counts(model, cfg)
    assert zeros == round(0.6 * total) == res.pruned and res.weights == total
    assert (model.lm_head.weight != 0).all() and (model.model.embed_tokens.weight != 0).all()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(k.endswith(("_orig", "_mask")) for k in back.state_dict())
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)
    assert PruningConfig.from_pretrained(tmp_path) == cfg
    assert json.loads((tmp_path / "prune_report.json").read_text())["pruned"] == res.pruned


def test_pruner_obs_iht_changes_kept_weights_and_tracks_the_dense_model_better_than_magnitude():
    """OBS compensates: the kept weights move, and the pruned model's logits stay closer to the dense model's
    on the calibration data than magnitude pruning's (same per-tensor sparsity)."""
    data = samples(16, seed=3)
    dense = tiny_llama()
    err = {}
    for method, mc in (("magnitude", {"allocation": "uniform"}), ("obs_iht", None)):
        model = tiny_llama()
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        cfg = PruningConfig(method=method, sparsity=0.7, num_samples=16, seq_len=16, batch_size=4,
                            method_config=mc)
        Pruner(model).prune(cfg, calibration_dataset=data, progress=False)
        after = model.model.layers[0].mlp.up_proj.weight
        kept = after != 0
        assert (not torch.equal(after[kept], before[kept])) == (method == "obs_iht")
        with torch.no_grad():
            b = hf.calibration_batches(data, cfg)
            err[method] = sum(float(((model(**x).logits - dense(**x).logits) ** 2).sum()) for x in b)
    assert err["obs_iht"] < 0.9 * err["magnitude"], err


def test_pruner_tiny_bert_nm_and_from_path(tmp_path):
    src = tmp_path / "src"
    tiny_bert().save_pretrained(src)
    pruner = Pruner.from_pretrained(src)
    assert type(pruner.model).__name__ == "BertModel"
    cfg = PruningConfig(method="obs_iht", pattern="2:4", sparsity=None, num_samples=8, seq_len=16)
    loader = torch.utils.data.DataLoader(samples(8), batch_size=4)
    res = pruner.prune(cfg, calibration_dataset=loader, save_dir=tmp_path / "out", progress=False)
    for t in hf.select_targets(pruner.model, cfg):
        w = t.orig().reshape(t.orig().shape[0], -1, 4)
        assert ((w == 0).sum(-1) == 2).all(), t.key
    assert res.sparsity == 0.5
    back = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(pruner.model(x).last_hidden_state, back(x).last_hidden_state)


class _CharTokenizer:
    """Enough of a tokenizer for the string route: one id per character."""

    def __call__(self, text):
        return {"input_ids": [1] + [3 + (ord(c) % (VOCAB - 3)) for c in text] + [2]}


def test_calibration_from_strings_packs_windows_without_padding():
    cfg = PruningConfig(num_samples=5, seq_len=8, batch_size=2)
    b = hf.calibration_batches(["hello world", "pruning " * 10], cfg, _CharTokenizer(), causal_lm=True)
    assert [x["input_ids"].shape for x in b] == [torch.Size([2, 8]), torch.Size([2, 8]), torch.Size([1, 8])]
    assert torch.equal(b[0]["labels"], b[0]["input_ids"]) and b[0]["attention_mask"].all()
    assert b[0]["input_ids"][0, 0] == 1  # special tokens kept
    model = tiny_llama()
    res = Pruner(model, _CharTokenizer()).prune(PruningConfig(method="wanda", sparsity=0.5, num_samples=5,
                                                              seq_len=8), calibration_dataset=["abc " * 30],
                                                progress=False)
    assert res.pruned == round(0.5 * res.weights)


@pytest.mark.parametrize("make, field", [
    (lambda: (PruningConfig(method="cs"), samples(4)), "method"),
    (lambda: (PruningConfig(method="obs_iht", num_samples=4, seq_len=16), None), "calibration_dataset"),
    (lambda: (PruningConfig(method="obs_iht", seq_len=16), ["strings but no tokenizer"]), "calibration_dataset"),
    (lambda: (PruningConfig(method="magnitude", include=["no_such_module"]), None), "include"),
    (lambda: ("not a config", None), "config"),
])
def test_pruner_bad_input_leaves_the_model_unchanged(make, field):
    model = tiny_llama()
    before = state(model)
    cfg, data = make()
    with pytest.raises(PruningInputError, match=f"^{field}"):
        Pruner(model).prune(cfg, calibration_dataset=data, progress=False)
    assert same_state(before, state(model))


def test_pruner_checks_where_it_writes_before_pruning(tmp_path):
    """export='onnx' without save_dir, or a save_dir that is a file: refused before any weight changes."""
    model = tiny_bert()
    before = state(model)
    cfg = PruningConfig(method="magnitude", sparsity=0.5)
    with pytest.raises(PruningInputError, match="^save_dir"):
        Pruner(model).prune(cfg, export="onnx", progress=False)
    (tmp_path / "a_file").write_text("x")
    for bad in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        with pytest.raises(PruningInputError, match="^save_dir"):
            Pruner(model).prune(cfg, save_dir=bad, progress=False)
    assert same_state(before, state(model))


def test_samples_with_a_scalar_label_are_batched():
    """The usual classification sample: 1-D input_ids and a 0-D label -> batches of batch_size rows."""
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, VOCAB, (16,), generator=g), "labels": torch.tensor(i % 3)}
            for i in range(10)]
    cfg = PruningConfig(method="obs_iht", num_samples=8, batch_size=4, seq_len=16)
    batches = hf.calibration_batches(data, cfg)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 16), (4, 16)]
    assert batches[1]["labels"].tolist() == [1, 2, 0, 1]
    model = tiny_bert(labels=3)
    res = Pruner(model).prune(cfg, calibration_dataset=data, progress=False)
    assert abs(res.sparsity - 0.5) < 1e-3


def test_magnitude_route_warns_about_a_tied_embedding():
    from obs_plugins.errors import TiedWeightWarning
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with pytest.warns(TiedWeightWarning, match="lm_head"):
        Pruner(model).prune(PruningConfig(method="magnitude", sparsity=0.5, exclude=[]), progress=False)


def test_pruner_encoder_obs_iht_iterations_need_a_loss():
    model = tiny_bert()
    before = state(model)
    cfg = PruningConfig(method="obs_iht", num_samples=8, seq_len=16, method_config={"iterations": 2})
    with pytest.raises(PruningInputError, match="loss"):
        Pruner(model).prune(cfg, calibration_dataset=samples(8), progress=False)
    assert same_state(before, state(model))


def test_pruner_export_onnx_writes_a_verified_report(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_bert()
    cfg = PruningConfig(method="magnitude", sparsity=0.5)
    res = Pruner(model).prune(cfg, save_dir=tmp_path, export="onnx", progress=False)
    assert os.path.exists(tmp_path / "model.onnx") and res.report["onnx_ok"] is True
    rep = json.loads((tmp_path / "onnx_report.json").read_text())
    assert rep["ok"] is True
    assert os.path.exists(tmp_path / "onnx_report.md")


def test_pruner_export_short_positions_and_a_failed_verification_keeps_the_report(tmp_path, monkeypatch):
    """A model with fewer than 32 positions exports (the example ids fit it); a verification that fails (here:
    ONNX Runtime's outputs shifted by 1) still leaves prune_report.json beside the saved model."""
    pytest.importorskip("onnxruntime")
    from obs_plugins.integrations.onnx import VerificationError, runtime
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  vocab_size=VOCAB, max_position_embeddings=16)
    model = transformers.BertModel(cfg).eval()
    res = Pruner(model).prune(PruningConfig(method="magnitude", sparsity=0.5), save_dir=tmp_path / "a",
                              export="onnx", progress=False)
    assert res.report["onnx_ok"] is True
    real = runtime.OrtRunner.run
    monkeypatch.setattr(runtime.OrtRunner, "run", lambda self, feeds: [o + 1.0 for o in real(self, feeds)])
    with pytest.raises(VerificationError):
        Pruner(tiny_bert()).prune(PruningConfig(method="magnitude", sparsity=0.5), save_dir=tmp_path / "b",
                                  export="onnx", progress=False)
    assert json.loads((tmp_path / "b" / "prune_report.json").read_text())["method"] == "magnitude"


# ---------------------------------------------------------------- PruningCallback in a real Trainer
class _Seq(torch.utils.data.Dataset):
    """A learnable 3-class task on token ids: the label is the id of the first token mod 3."""

    def __init__(self, n=64, seq=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(3, VOCAB, (n, seq), generator=g)
        self.y = self.x[:, 0] % 3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.y[i]}


def _train(tmp_path, cfg, steps=12, before_cb=(), after_cb=(), prepare=None, **cb_kwargs):
    """A tiny BERT trained ``steps`` steps with the PruningCallback; ``before_cb`` / ``after_cb``: callbacks that
    run before / after it in each event (each gets the PruningCallback as ``.pruning``); ``prepare(model)`` runs
    first."""
    model = tiny_bert(labels=3)
    if prepare is not None:
        prepare(model)
    model.train()
    cb = PruningCallback(cfg, **cb_kwargs)
    for c in (*before_cb, *after_cb):
        c.pruning = cb
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps,
                                          per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=1,
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                          seed=0, weight_decay=0.01)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Seq(),
                                   callbacks=[*before_cb, cb, *after_cb])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return model, cb, trainer, before


@pytest.mark.parametrize("method", ["magnitude", "obs_iht"])
def test_callback_cubic_reaches_target_and_optimizer_keeps_working(method, tmp_path):
    cfg = PruningConfig(method=method, sparsity=0.7, end_step=8, frequency=2, curvature_batches=2)
    at_cut = {}

    class AtLastCut(transformers.TrainerCallback):   # after the callback's step-8 pruning
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 8:
                at_cut.update({t.key: t.current().clone() for t in hf.select_targets(model, cfg)})

    model, cb, trainer, before = _train(tmp_path, cfg, after_cb=[AtLastCut()])
    targets = hf.select_targets(model, cfg)
    zeros = sum(int((t.orig() == 0).sum()) for t in targets)
    assert zeros == round(0.7 * cb.weights)
    assert [h["step"] for h in cb.history] == [2, 4, 6, 8]
    s = [h["sparsity"] for h in cb.history]
    assert s == sorted(s) and s[-1] == pytest.approx(round(0.7 * cb.weights) / cb.weights)
    assert s[0] == pytest.approx(hf.cubic_sparsity(2, 0, 8, 0.7), abs=1e-3)
    # masks held through the optimizer steps after the last pruning step; the optimizer still trained them
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    for t in targets:   # steps 9..12 trained the kept weights of every pruned tensor, and only those
        kept = at_cut[t.key] != 0
        assert torch.equal(t.orig() != 0, kept)
        assert not torch.equal(t.orig()[kept], at_cut[t.key][kept])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and all(l == l for l in losses)
    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    for t in targets:
        assert torch.equal(back.get_parameter(t.key), t.orig())


def test_callback_masks_survive_optimizer_steps(tmp_path):
    """Prune once at step 2, then 6 more AdamW steps with weight decay: the pruned entries must stay exactly 0
    while the kept ones keep moving."""
    cfg = PruningConfig(method="magnitude", sparsity=0.5, end_step=2, frequency=2)
    snaps = {}

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            t = obs_plugins.resolve_targets(model, ["bert.encoder.layer.0.intermediate.dense"])[0]
            snaps[state.global_step] = t.current().clone()  # orig * mask: what the next forward uses

    model = tiny_bert(labels=3)
    cb = PruningCallback(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=8,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, weight_decay=0.1)
    transformers.Trainer(model=model, args=args, train_dataset=_Seq(), callbacks=[cb, Spy()]).train()
    zero = snaps[2] == 0
    assert zero.float().mean() == pytest.approx(0.5, abs=0.05)
    for step in range(3, 9):
        assert (snaps[step][zero] == 0).all()
        assert not torch.equal(snaps[step][~zero], snaps[step - 1][~zero])


def test_callback_cs_schedule_reaches_exact_target(tmp_path):
    cs = obs_plugins.CSConfig(rounds=2, epochs=2, penalty=1e-4, final_temperature=50.0)
    cfg = PruningConfig(method="cs", sparsity=0.7, end_step=8, method_config=cs)
    initial, penalty_grad = [], []

    class Before(transformers.TrainerCallback):   # the score gradients before the callback adds the penalty's
        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 0:
                self.g = [torch.zeros_like(s) if s.grad is None else s.grad.clone()
                          for s in self.pruning.sparsifier.parameters()]

    class After(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):   # the scores as installed
            initial.extend(s.detach().clone() for s in self.pruning.sparsifier.parameters())

        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 0:
                sp = self.pruning.sparsifier
                scores = list(sp.parameters())
                want = torch.autograd.grad(sp.penalty(), scores)
                penalty_grad.extend((s.grad - g, w) for s, g, w in zip(scores, before.g, want))

    before = Before()
    model, cb, trainer, _ = _train(tmp_path, cfg, steps=12, before_cb=[before], after_cb=[After()])
    sp = cb.sparsifier
    assert sp.finished and sp.done and sp.round == 1
    assert sp.global_step == 8  # cs.step() once per optimizer step up to the cut
    targets = hf.select_targets(model, cfg)
    zeros = sum(int((t.orig() == 0).sum()) for t in targets)
    assert zeros == round(0.7 * cb.weights)
    # the callback added exactly the penalty's gradient to the scores before the first optimizer step, and the
    # optimizer then moved every score tensor from its installed value
    assert penalty_grad and all(torch.allclose(got, want, rtol=1e-5, atol=1e-9) and want.abs().max() > 0
                                for got, want in penalty_grad)
    assert all(not torch.equal(s.detach(), s0) for s, s0 in zip(sp.parameters(), initial))
    assert len(trainer.optimizer.param_groups) == 3  # Trainer's two groups + the scores (no weight decay)
    assert trainer.optimizer.param_groups[-1]["weight_decay"] == 0.0
    assert not any("parametrizations" in n or n.endswith("_mask") for n in model.state_dict())


def test_callback_bip_alternates_levels_cuts_exactly_and_the_cut_leaves_the_network_unchanged(tmp_path):
    """BiP in a real Trainer: every optimizer step is a lower-level step, each followed by one score step on a fresh
    batch; at end_step the training mask is cut (exactly k) without changing the network's outputs; the masks then
    hold through the fine-tuning steps and bake into plain weights."""
    bipc = obs_plugins.BiPConfig(mask_lr=1.0, gamma=1.0)
    cfg = PruningConfig(method="bip", sparsity=0.7, end_step=6, method_config=bipc)
    probe = {k: v[:4] for k, v in torch.utils.data.default_collate([_Seq(seed=5)[i] for i in range(4)]).items()}
    seen, zeros_after = {}, {}

    class Before(transformers.TrainerCallback):  # runs before the pruning callback in the same event
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 6:
                model.eval()
                with torch.no_grad():
                    seen["gated"] = model(**{k: v for k, v in probe.items() if k != "labels"}).logits
                model.train()

    class After(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            t = obs_plugins.resolve_targets(model, ["bert.encoder.layer.0.intermediate.dense"])[0]
            if state.global_step == 6:
                model.eval()
                with torch.no_grad():
                    seen["cut"] = model(**{k: v for k, v in probe.items() if k != "labels"}).logits
                model.train()
            if state.global_step >= 6:
                zeros_after[state.global_step] = t.current() == 0

    model = tiny_bert(labels=3)
    cb = PruningCallback(cfg)
    init_scores = {}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=10, per_device_train_batch_size=8,
                                          learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0, weight_decay=0.01, logging_steps=1)
    targets = hf.select_targets(model, cfg)
    for t in targets:
        init_scores[t.key] = t.orig().detach().abs().clone()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Seq(), callbacks=[Before(), cb, After()])
    trainer.train()
    bip = cb.bip
    assert bip.finished and bip.lower_steps == 6 and bip.upper_steps == 5  # none after the last lower step
    assert bip.samples_forward_backward == 6 * 8 + 5 * 8  # the Trainer's batches + the upper level's
    assert any(not torch.equal(bip.scores[k].detach().expand_as(v), v) for k, v in init_scores.items())
    h = cb.history[-1]
    assert h["step"] == 6 and h["training_mask_overlap"] == 1.0
    assert torch.equal(seen["cut"], seen["gated"])  # the cut mask is the one the network trained with
    zeros = sum(int((t.orig() == 0).sum()) for t in targets)
    assert zeros == round(0.7 * cb.weights)
    for step in range(7, 11):  # fixed masks through the fine-tuning steps
        assert torch.equal(zeros_after[step], zeros_after[6])
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert len(losses) == 10 and all(l == l for l in losses)
    assert not any("parametrizations" in n or n.endswith(("_orig", "_mask")) for n in model.state_dict())
    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    for t in targets:
        assert torch.equal(back.get_parameter(t.key), t.orig())


@pytest.mark.parametrize("method", ["obs_iht", "bip"])
def test_callback_reads_a_generator_of_calibration_batches_once_and_keeps_it(method, tmp_path):
    """A generator is consumed once; the callback keeps its batches for every pruning step (it used to find it
    empty at the second step, mid-training)."""
    ds = _Seq(n=16)
    gen = ({k: torch.stack([ds[i][k] for i in range(j, j + 4)]) for k in ds[0]} for j in range(0, 16, 4))
    cfg = PruningConfig(method=method, sparsity=0.5, end_step=8, frequency=2, curvature_batches=2)
    model, cb, _, _ = _train(tmp_path, cfg, calibration_batches=gen)
    assert len(cb.calibration) == 4 and cb.history[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(PruningInputError, match="^calibration_batches"):
        PruningCallback(cfg, calibration_batches=iter([]))


def test_callback_bip_rejects_channel_granularity():
    with pytest.raises(PruningInputError, match="^method_config"):
        PruningCallback(PruningConfig(method="bip", sparsity=0.5,
                                      method_config=obs_plugins.BiPConfig(granularity="channel")))


def test_callback_rejects_bad_input_before_training(tmp_path):
    with pytest.raises(PruningInputError, match="^pattern"):
        PruningCallback(PruningConfig(method="magnitude", pattern="2:4", sparsity=None))
    with pytest.raises(PruningInputError, match="^config"):
        PruningCallback({"method": "magnitude"})
    model = tiny_bert(labels=3)
    before = state(model)
    cb = PruningCallback(PruningConfig(method="magnitude", sparsity=0.5, end_step=50))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.raises(PruningInputError, match="^end_step"):
        transformers.Trainer(model=model, args=args, train_dataset=_Seq(), callbacks=[cb]).train()
    assert same_state(before, state(model))


# ---------------------------------------------------------------- CLI
def test_cli_prune_with_model_and_config(tmp_path):
    from obs_plugins import cli
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_llama().save_pretrained(src)
    PruningConfig(method="magnitude", sparsity=0.5).save_pretrained(tmp_path)
    rc = cli.main(["prune", "--model", str(src), "--config", str(tmp_path / "pruning_config.json"), "--out",
                   str(out), "--quiet"])
    assert rc == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    cfg = PruningConfig.from_pretrained(out)
    zeros, total = _selected_counts(back, cfg)
    assert zeros == round(0.5 * total)
    # a bad config: exit code 2, nothing written
    (tmp_path / "bad.json").write_text(json.dumps({"method": "magnitude", "sparsity": 1.5}))
    rc = cli.main(["prune", "--model", str(src), "--config", str(tmp_path / "bad.json"), "--out",
                   str(tmp_path / "out2")])
    assert rc == 2 and not (tmp_path / "out2").exists()


def test_cli_main_job_arguments_unchanged():
    from obs_plugins import cli
    args = cli.build_parser().parse_args(["prune"])
    assert args.model is None and args.config is None and args.func is cli.cmd_prune
    cli.check_prune_args(args)   # the parser leaves the main job's flags unset; the check fills the defaults
    assert (args.method, args.sparsity, args.iterations, args.sequential) == ("obs_iht", "0.5", 2, "auto")


def test_optimum_cli_registration(tmp_path):
    """optimum-cli finds `obs-prune` through the optimum.commands.register namespace (contrib/ on the path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.path.join(root, "contrib") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands as f;"
            "print([c.COMMAND.name for c, p in f()])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "obs-prune" in out.stdout
    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    PruningConfig(method="magnitude", sparsity=0.25).save_pretrained(tmp_path)
    code = "import sys; from optimum.commands.optimum_cli import main; sys.argv=sys.argv[1:]; main()"
    out = subprocess.run([sys.executable, "-c", code, "optimum-cli", "obs-prune", "--model", str(src), "--config",
                          str(tmp_path / "pruning_config.json"), "--out", str(tmp_path / "o")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    zeros, total = _selected_counts(back, PruningConfig(method="magnitude", sparsity=0.25))
    assert zeros == round(0.25 * total)


def test_cs_cut_keeps_the_gated_weights_and_removes_exactly_k():
    """At the cut the kept weights take their gated values w * gate (the function the search trained), the rest
    are masked; exactly round(sparsity * n) weights go."""
    from types import SimpleNamespace
    model = tiny_bert(labels=3)
    cfg = PruningConfig(method="cs", sparsity=0.6, end_step=8,
                        method_config=obs_plugins.CSConfig(rounds=1, epochs=2, progress=False))
    cb = _started_cs(cfg, model)
    assert len(cb.optimizer.param_groups) == 2 and cb.optimizer.param_groups[1]["weight_decay"] == 0.0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in cb.sparsifier.parameters():
            s.copy_(torch.randn(s.shape, generator=g))
        gated = {t.key: getattr(t.module, t.name).detach().clone() for t in cb.targets}
    cb._cut_ticket(SimpleNamespace(global_step=8))
    removed = 0
    for t in cb.targets:
        mask = t.prior_mask()
        removed += int((~mask).sum())
        assert torch.equal(t.current(), gated[t.key] * mask)
    assert removed == round(0.6 * cb.weights)


def _started_cs(cfg, model):
    from types import SimpleNamespace
    cb = PruningCallback(cfg)
    cb.model, cb.lr_scheduler = model, None
    cb.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cb._setup_schedule(10)
    cb.targets = hf.select_targets(model, cfg)
    cb.params = [(t.module, t.name) for t in cb.targets]
    cb.weights = sum(t.orig().numel() for t in cb.targets)
    cb._start(SimpleNamespace(global_step=0))
    return cb


def test_callback_cs_starts_from_the_magnitude_ranking_by_default():
    """Issue 15: the callback's CS scores start ranked like |w| (score_init "auto" -> "magnitude", threshold at the
    target sparsity, tempered gate scale), so a cut before any training is exactly global magnitude pruning; an
    explicit score_init="constant" is the paper's (all scores s0, scale 2)."""
    from types import SimpleNamespace
    model = tiny_bert(labels=3)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = PruningConfig(method="cs", sparsity=0.6, end_step=8,
                        method_config=obs_plugins.CSConfig(rounds=1, epochs=2, progress=False))
    cb = _started_cs(cfg, model)
    sp = cb.sparsifier
    assert (sp.score_init, sp.mask_scale, sp.config.score_init_quantile) == ("magnitude", "tempered", 0.6)
    assert cfg.method_config_object().score_init_quantile is None  # the stored config is unchanged
    assert sp.scale_at(1.0) == pytest.approx(1 + math.exp(-0.4))  # 1 / sigmoid(beta * c (1 - q)), c = 1
    ref = obs_plugins.api.plan(obs_plugins.MagnitudeConfig(), targets=cb.targets, amount=0.6)
    cb._cut_ticket(SimpleNamespace(global_step=0))
    for t in cb.targets:
        assert torch.equal(t.prior_mask(), ref.entries[t.key].mask)
        gate = torch.sigmoid(sp.scores[t.key].detach()) * sp.scale_at(1.0)
        assert torch.allclose(t.current(), dense[t.key] * gate * t.prior_mask())  # kept at w * gate
    model = tiny_bert(labels=3)
    cfg = PruningConfig(method="cs", sparsity=0.6, end_step=8, method_config=obs_plugins.CSConfig(
        rounds=1, epochs=2, score_init="constant", progress=False))
    sp = _started_cs(cfg, model).sparsifier
    assert (sp.score_init, sp.mask_scale) == ("constant", "paper")
    assert all(bool((s == 0).all()) for s in sp.parameters()) and sp.scale_at(200.0) == 2.0


@pytest.mark.parametrize("method", ["cs", "bip", "wanda"])
def test_callback_train_twice_and_wanda_reach_the_exact_target(method, tmp_path):
    """A second trainer.train() with CS / BiP starting after step 0 kept the finished search and did nothing, so the
    baked zeros grew back (sparsity 0.0 after the second run); Wanda's later cubic steps re-pruned the earlier
    zeros and stopped near its first step's sparsity (0.42 of 0.6). Both now end at exactly the target."""
    kw = {"cs": dict(method_config={"rounds": 1, "epochs": 3}), "bip": {}, "wanda": dict(frequency=2)}[method]
    cfg = PruningConfig(method=method, sparsity=0.5, begin_step=2, end_step=8, curvature_batches=2, **kw)
    model, cb, trainer, _ = _train(tmp_path, cfg, steps=10)
    targets = hf.select_targets(model, cfg)
    zeros = lambda: sum(int((t.current() == 0).sum()) for t in targets)  # noqa: E731
    assert zeros() == round(0.5 * cb.weights)
    if method != "wanda":
        trainer.train()
        assert zeros() == round(0.5 * cb.weights)


@pytest.mark.parametrize("method", ["cs", "bip", "magnitude"])
def test_callback_counts_masks_the_model_already_carried(method, tmp_path):
    """30% of every target masked before training, sparsity 0.6: exactly round(0.6 n) zeros at the end (CS's cut
    took 0.6 of the weights still unmasked: 0.72)."""
    from torch.nn.utils import prune

    def mask_30(model):
        for t in hf.select_targets(model, PruningConfig()):
            prune.random_unstructured(t.module, t.name, amount=0.3)

    kw = {"cs": dict(method_config={"rounds": 1, "epochs": 2}), "bip": {}, "magnitude": dict(frequency=2)}[method]
    cfg = PruningConfig(method=method, sparsity=0.6, end_step=6, **kw)
    model, cb, _, _ = _train(tmp_path, cfg, steps=8, prepare=mask_30)
    targets = hf.select_targets(model, cfg)
    assert sum(int((t.current() == 0).sum()) for t in targets) == round(0.6 * cb.weights)
    # masks already beyond the target: refused at the start, as Pruner refuses it (magnitude stopped silently
    # above it, CS / BiP failed at the cut with "cannot prune -N")
    low = PruningConfig(method=method, sparsity=0.2, end_step=6, **kw)
    with pytest.raises(PruningInputError, match="^sparsity: the selected weights already carry"):
        _train(tmp_path, low, steps=8, prepare=mask_30)


# ---------------------------------------------------------------- twelfth-session review: what the adapter lost
def test_pruner_counts_and_bakes_masks_the_model_already_carried(tmp_path):
    """A target with a torch.nn.utils.prune mask from before: sparsity is of all selected weights (the mask's
    zeros included), the masks are baked, and the saved folder reloads to the same outputs (it used to save
    weight_orig / weight_mask, which from_pretrained re-initialised)."""
    from torch.nn.utils import prune
    model = tiny_llama()
    up = model.model.layers[0].mlp.up_proj
    prune.l1_unstructured(up, "weight", amount=0.3)
    cfg = PruningConfig(method="magnitude", sparsity=0.5)
    res = Pruner(model).prune(cfg, save_dir=tmp_path / "out", progress=False)
    zeros, total = _selected_counts(model, cfg)
    assert zeros == round(0.5 * total) and res.sparsity == zeros / total
    assert not hasattr(up, "weight_mask") and not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, back(x).logits)
    # more masked already than asked: refused, nothing changed
    m2 = tiny_llama()
    prune.l1_unstructured(m2.model.layers[0].mlp.up_proj, "weight", amount=0.9)
    for layer in m2.model.layers:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not hasattr(lin, "weight_mask"):
                prune.l1_unstructured(lin, "weight", amount=0.9)
    before = state(m2)
    with pytest.raises(PruningInputError, match="^sparsity"):
        Pruner(m2).prune(PruningConfig(method="magnitude", sparsity=0.1, include=[r"mlp"]), progress=False)
    assert same_state(before, state(m2))


def test_config_overrides_keep_or_rederive_the_method_settings(tmp_path):
    """from_pretrained(..., method=<the stored one>) keeps the stored method_config; pattern= / sparsity=
    overrides re-derive what method_config mirrors (nm; BiP's sparsity) instead of contradicting it."""
    cfg = PruningConfig(method="obs_iht", sparsity=0.5, pattern="2:4",
                        method_config=obs_plugins.OBSIHTConfig(iterations=3, rel_damp=0.05))
    cfg.save_pretrained(tmp_path)
    same = PruningConfig.from_pretrained(tmp_path, method="obs_iht")
    assert (same.method_config_object().iterations, same.method_config_object().rel_damp) == (3, 0.05)
    assert PruningConfig.from_pretrained(tmp_path, method="OBS-IHT").method_config == cfg.method_config
    un = PruningConfig.from_pretrained(tmp_path, pattern="unstructured", sparsity=0.6)
    assert un.method_config_object().nm is None and un.method_config_object().iterations == 3
    assert PruningConfig.from_pretrained(tmp_path, pattern="4:8").method_config_object().nm == "4:8"
    other = PruningConfig.from_pretrained(tmp_path, method="magnitude")
    assert other.method_config_object() == dataclasses.replace(obs_plugins.MagnitudeConfig(), nm="2:4")
    # BiP: one sparsity; a contradicting method_config value is refused, the stored one follows overrides
    bip = PruningConfig(method="bip", sparsity=0.7)
    assert bip.method_config_object().sparsity == 0.7
    with pytest.raises(PruningInputError, match="^method_config: sparsity=0.3"):
        PruningConfig(method="bip", sparsity=0.7, method_config={"sparsity": 0.3})
    with pytest.raises(PruningInputError, match="^method_config: sparsity=0.3"):
        PruningConfig(method="bip", sparsity=0.7, method_config=obs_plugins.BiPConfig(sparsity=0.3))
    bip.save_pretrained(tmp_path / "bip")
    assert PruningConfig.from_pretrained(tmp_path / "bip", sparsity=0.8).method_config_object().sparsity == 0.8


def test_config_version_stamp_and_private_keys_are_strict():
    good = PruningConfig(method="magnitude").to_dict()
    for bad in (True, 1.0, "1", 2):
        with pytest.raises(PruningInputError, match="^pruning_config_version"):
            PruningConfig.from_dict({**good, "pruning_config_version": bad})
    with pytest.raises(PruningInputError, match="^_evil"):
        PruningConfig.from_dict({**good, "_evil": 1})
    assert PruningConfig.from_dict({**good, "_commit_hash": None}) == PruningConfig(method="magnitude")


def test_fields_set_after_construction_are_checked_before_use(tmp_path):
    """cfg.pattern / cfg.method / cfg.sparsity changed on the object: Pruner and PruningCallback validate a copy
    (a pattern set late is pruned and saved as such; bad values name the field; the model is untouched)."""
    cfg = PruningConfig(method="magnitude", sparsity=0.5)
    cfg.pattern = "2:4"
    model = tiny_llama()
    Pruner(model).prune(cfg, save_dir=tmp_path / "a", progress=False)
    w = model.model.layers[0].mlp.up_proj.weight.detach()
    assert ((w.reshape(-1, 4) == 0).sum(1) >= 2).all()
    assert PruningConfig.from_pretrained(tmp_path / "a").method_config_object().nm == "2:4"
    for field, value, match in (("sparsity", 1.5, "^sparsity"), ("method", "wanda", "^method_config: is for")):
        cfg = PruningConfig(method="magnitude", sparsity=0.5)
        setattr(cfg, field, value)
        m = tiny_llama()
        before = state(m)
        with pytest.raises(PruningInputError, match=match):
            Pruner(m).prune(cfg, progress=False)
        with pytest.raises(PruningInputError, match=match):
            PruningCallback(cfg)
        assert same_state(before, state(m))


def test_callback_cuts_initial_sparsity_at_begin_step(tmp_path):
    """The cubic schedule starts at initial_sparsity at begin_step: at step 0 before any step (begin_step 0), at
    begin_step itself otherwise (it used to wait for the first frequency step)."""
    seen = {}

    class Spy(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen[state.global_step] = self.pruning.sparsity()

    cfg = PruningConfig(method="magnitude", sparsity=0.7, initial_sparsity=0.5, end_step=8, frequency=4)
    _, cb, _, _ = _train(tmp_path, cfg, steps=10, after_cb=[Spy()])
    assert [h["step"] for h in cb.history] == [0, 4, 8]
    assert seen[0] == pytest.approx(round(0.5 * cb.weights) / cb.weights)   # before the first optimizer step
    cfg = PruningConfig(method="magnitude", sparsity=0.7, initial_sparsity=0.5, begin_step=2, end_step=8,
                        frequency=4)
    _, cb, _, _ = _train(tmp_path, cfg, steps=10, after_cb=[Spy()])
    assert [h["step"] for h in cb.history] == [2, 6, 8]
    assert seen[2] == pytest.approx(round(0.5 * cb.weights) / cb.weights) and seen[1] == 0.0


def test_callback_refuses_a_late_begin_step_and_a_resumed_run(tmp_path):
    model = tiny_bert(labels=3)
    before = state(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    cb = PruningCallback(PruningConfig(method="magnitude", sparsity=0.5, begin_step=10))
    with pytest.raises(PruningInputError, match="^begin_step: 10"):
        transformers.Trainer(model=model, args=args, train_dataset=_Seq(), callbacks=[cb]).train()
    assert same_state(before, state(model))
    # a run resumed from a checkpoint: refused (the checkpoint holds prune parametrizations the fresh model
    # cannot load); saving during training warns
    cfg = PruningConfig(method="magnitude", sparsity=0.6, end_step=6, frequency=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "ck"), max_steps=8, save_steps=4,
                                          per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0)
    with pytest.warns(UserWarning, match="checkpoints saved during training"):
        transformers.Trainer(model=tiny_bert(labels=3), args=args, train_dataset=_Seq(),
                             callbacks=[PruningCallback(cfg)]).train()
    with pytest.raises(PruningInputError, match="^resume_from_checkpoint"):
        transformers.Trainer(model=tiny_bert(labels=3), args=args, train_dataset=_Seq(),
                             callbacks=[PruningCallback(cfg)]).train(
            resume_from_checkpoint=str(tmp_path / "ck" / "checkpoint-4"))


def test_cli_refuses_flags_of_the_other_route_and_missing_files(tmp_path, capsys):
    """Each prune route refuses the other's flags (they were silently ignored); --config / --model /
    --calibration must be local files or folders, checked before any model loads (exit code 2, no traceback)."""
    from obs_plugins import cli
    src = tmp_path / "src"
    tiny_llama().save_pretrained(src)
    PruningConfig(method="magnitude", sparsity=0.5).save_pretrained(tmp_path)
    base = ["prune", "--model", str(src), "--config", str(tmp_path), "--out", str(tmp_path / "o")]
    capsys.readouterr()   # the saves' progress bars
    for extra, flag in ((["--sparsity", "0.9"], "--sparsity"), (["--method", "wanda"], "--method"),
                        (["--save", str(tmp_path / "s")], "--save"), (["--calib", "0"], "--calib"),
                        (["--json", str(tmp_path / "j.json")], "--json"),
                        # given with the main job's default value: still given (was silently ignored)
                        (["--sparsity", "0.5"], "--sparsity"), (["--iterations", "2"], "--iterations"),
                        (["--method", "obs_iht"], "--method"), (["--sequential", "auto"], "--sequential")):
        assert cli.main(base + extra) == 2
        assert capsys.readouterr().err.startswith(f"obs-prune: error: {flag}:")
    for extra, flag in ((["--out", str(tmp_path / "o")], "--out"), (["--export", "onnx"], "--export"),
                        (["--calibration", str(tmp_path / "x.txt")], "--calibration")):
        assert cli.main(["prune", *extra]) == 2
        assert capsys.readouterr().err.startswith(f"obs-prune: error: {flag}:")
    (tmp_path / "afile").write_text("x")
    for args, flag in ((["--config", str(tmp_path / "missing.json")], "--config"),
                       (["--config", str(src)], "--config"),     # a folder without pruning_config.json
                       (["--out", str(tmp_path / "afile")], "--out"),   # was found only after the model load
                       (["--out", str(tmp_path / "afile" / "o")], "--out"),   # not creatable: was found
                       # after the model load, named save_dir
                       (["--model", str(tmp_path / "nope")], "--model"),
                       (["--calibration", str(tmp_path / "none.txt")], "--calibration")):
        argv = list(base)
        if args[0] in argv:
            argv[argv.index(args[0]) + 1] = args[1]
        else:
            argv += args
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.startswith(f"obs-prune: error: {flag}:")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
    assert cli.main(base + ["--quiet"]) == 0 and (tmp_path / "o" / "model.safetensors").exists()


# ---------------------------------------------------------------- fifteenth session's review
def test_callback_refuses_load_best_model_at_end_before_pruning(tmp_path):
    """The best checkpoint may predate the pruning; Trainer loaded it over the pruned layers' parametrizations
    and the callback baked the mix."""
    model = tiny_bert(labels=3)
    before = state(model)
    cb = PruningCallback(PruningConfig(method="magnitude", sparsity=0.5, end_step=4))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, save_strategy="steps",
                                          save_steps=2, eval_strategy="steps", eval_steps=2,
                                          load_best_model_at_end=True, report_to=[], use_cpu=True,
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Seq(), eval_dataset=_Seq(n=8),
                                   callbacks=[cb])
    with pytest.raises(PruningInputError, match="^load_best_model_at_end: "):
        trainer.train()
    assert same_state(before, state(model))


def test_callback_reads_a_calibration_dataloader_once(tmp_path):
    """A shuffling DataLoader was iterated whole at every pruning step, each step seeing other batches."""
    seen = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.ds = _Seq(n=64)

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            seen.append(i)
            return self.ds[i]

    loader = torch.utils.data.DataLoader(Counting(), batch_size=4, shuffle=True)
    cfg = PruningConfig(method="obs_iht", sparsity=0.5, end_step=8, frequency=2, curvature_batches=2)
    first = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if self.pruning._given is not None:
                first.append(self.pruning._given[0]["input_ids"][0].clone())

    _, cb, _, _ = _train(tmp_path, cfg, after_cb=(Spy(),), calibration_batches=loader)
    assert len(seen) == 8                                   # 2 batches of 4 read, once
    assert len(first) >= 4 and all(torch.equal(f, first[0]) for f in first)
    assert cb.history[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_callback_draws_curvature_batches_from_a_streamed_dataset(tmp_path):
    """An IterableDataset cannot be shuffled by a DataLoader: the curvature routes failed with torch's error."""
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            ds = _Seq(n=64)
            return (ds[i] for i in range(len(ds)))

    model = tiny_bert(labels=3).train()
    cb = PruningCallback(PruningConfig(method="obs_iht", sparsity=0.5, end_step=6, frequency=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, save_strategy="no",
                                          per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Stream(), callbacks=[cb]).train()
    assert cb.history[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_callback_cs_scores_follow_the_schedule_from_their_first_step(tmp_path):
    lrs = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if len(optimizer.param_groups) > 2:
                lrs.append([g["lr"] for g in optimizer.param_groups])

    cfg = PruningConfig(method="cs", sparsity=0.5, begin_step=3, end_step=11,
                        method_config=obs_plugins.CSConfig(rounds=1, epochs=2))
    model = tiny_bert(labels=3).train()
    cb = PruningCallback(cfg)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, warmup_steps=10,
                                          per_device_train_batch_size=8, learning_rate=1e-3, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=_Seq(), callbacks=[cb, Spy()]).train()
    assert lrs and all(row[-1] == pytest.approx(row[0]) for row in lrs)   # the first score step too


def test_bip_refuses_frozen_weights_before_gating_them(tmp_path):
    model = tiny_llama()
    for name, p in model.named_parameters():
        if "gate_proj" in name:
            p.requires_grad_(False)
    before = state(model)
    cb = PruningCallback(PruningConfig(method="bip", sparsity=0.5, end_step=6))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, save_strategy="no",
                                          per_device_train_batch_size=4, report_to=[], use_cpu=True,
                                          disable_tqdm=True)

    class LM(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            x = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    with pytest.raises(PruningInputError, match=r"^params: .*gate_proj.weight does not require grad"):
        transformers.Trainer(model=model, args=args, train_dataset=LM(), callbacks=[cb]).train()
    assert same_state(before, state(model))


def test_causal_lm_loss_leaves_padded_targets_out():
    """Without labels, a padded position was a target: the result depended on the pad id."""
    from obs_plugins.lm import causal_lm_loss
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    losses = []
    for pad in (0, 7):
        ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, pad, pad]])
        losses.append(causal_lm_loss(type("O", (), {"logits": logits})(), {"input_ids": ids,
                                                                          "attention_mask": mask}))
    real = torch.cat([logits[0, :4], logits[1, :2]])
    want = torch.nn.functional.cross_entropy(real, torch.tensor([2, 3, 4, 5, 7, 8]))
    assert torch.allclose(losses[0], want) and torch.allclose(losses[1], want)


def test_default_selection_leaves_peft_lora_adapters_dense():
    model = tiny_llama()
    q = model.model.layers[0].self_attn.q_proj
    q.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(32, 4, bias=False)})
    q.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 32, bias=False)})
    keys = [t.key for t in hf.select_targets(model, PruningConfig())]
    assert len(keys) == 14 and not any("lora_" in k for k in keys)


def test_causal_lm_loss_with_left_padding_scores_only_real_to_real_predictions():
    from obs_plugins.lm import causal_lm_loss
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = type("O", (), {"logits": logits})()
    got = causal_lm_loss(out, {"input_ids": ids, "attention_mask": mask})
    real = torch.cat([logits[0, :4], logits[1, 2:4]])
    assert torch.allclose(got, torch.nn.functional.cross_entropy(real, torch.tensor([2, 3, 4, 5, 7, 8])))
    none = causal_lm_loss(out, {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 0, 0, 0]] * 2)})
    assert float(none) == 0.0 and none.requires_grad


def test_pruner_refuses_an_onnx_export_of_a_bf16_model_before_pruning(tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 kernels: the file would be written and never run, so
    export='onnx' is refused first, naming export, with nothing pruned or written."""
    model = tiny_bert().to(torch.bfloat16)
    before = state(model)
    with pytest.raises(PruningInputError, match="^export: .*bfloat16.*float32 copy"):
        Pruner(model).prune(PruningConfig(method="magnitude", sparsity=0.5), save_dir=tmp_path / "out",
                            export="onnx", progress=False)
    assert same_state(before, state(model)) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("opts, match", [
    ({"verify_options": {"atoll": 1e-3}}, "^verify_options: unknown \\['atoll'\\]"),
    ({"verify_options": {"atol": -1.0}}, "^verify_options: atol: a tolerance >= 0"),
    ({"onnx_options": {"sparse": True}}, "^onnx_options: unknown \\['sparse'\\]"),
    ({"onnx_options": ["sparse_storage"]}, "^onnx_options: a dict"),
])
def test_pruner_checks_onnx_and_verify_options_before_pruning(tmp_path, opts, match):
    model = tiny_bert()
    before = state(model)
    with pytest.raises(PruningInputError, match=match):
        Pruner(model).prune(PruningConfig(method="magnitude", sparsity=0.5), save_dir=tmp_path / "out",
                            export="onnx", progress=False, **opts)
    assert same_state(before, state(model)) and not (tmp_path / "out").exists()
