"""ONNX adapter: export + verify on tiny models (MLP, CNN, BERT, Llama from configs). No timing assertions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from obs_plugins.errors import PruningInputError  # noqa: E402
from obs_plugins.integrations import onnx as ox  # noqa: E402


def _prune_all(model, amount, types=(nn.Linear, nn.Conv2d)):
    for m in model.modules():
        if isinstance(m, types):
            prune.l1_unstructured(m, "weight", amount=amount)
    return model


def _snapshot(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooks = {n: [type(h).__name__ for h in m._forward_pre_hooks.values()] for n, m in model.named_modules()}
    return sd, hooks


def _assert_untouched(model, snap):
    sd, hooks = snap
    now = model.state_dict()
    assert set(now) == set(sd)
    for k, v in sd.items():
        assert torch.equal(now[k], v), k
    assert {n: [type(h).__name__ for h in m._forward_pre_hooks.values()] for n, m in model.named_modules()} == hooks


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def _bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def _tokens(b=2, s=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 120, (b, s), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_mlp_export_verify_sparse_kernel(tmp_path):
    model = _prune_all(_mlp(), 0.9)
    x = torch.randn(4, 64)
    model(x).sum().backward()           # grad mode forward: pruned weights are non-leaf tensors now
    snap = _snapshot(model)
    res = ox.export(model, x, tmp_path / "mlp.onnx", sparse_kernel="auto", sparse_threshold=0.8)
    _assert_untouched(model, snap)
    assert all(isinstance(h, prune.BasePruningMethod) for h in model[0]._forward_pre_hooks.values())
    assert res.sparse_kernel_path and len(res.rewritten) == 3
    rep = ox.verify(res, model, x, batch_sizes=[1, 3], runs=3, warmup=1, baseline=_mlp())
    _assert_untouched(model, snap)
    assert rep.ok
    assert {o["route"] for o in rep.outputs} == {"pruned", "sparse-kernel"}
    assert all(o["max_abs"] < 1e-4 for o in rep.outputs)
    assert len(rep.sparsity) == 3 and all(s["ok"] and s["onnx_sparsity"] >= 0.9 - 1e-6 for s in rep.sparsity)
    assert set(rep.latency) == {1, 3}
    assert set(rep.latency[1]) == {"dense", "pruned", "sparse-kernel"}
    for b in (1, 3):
        assert rep.best[b]["route"] in rep.latency[b] and rep.best[b]["verdict"]
        s = rep.latency[b][rep.best[b]["route"]]
        assert rep.best[b]["route"] == "dense" or s["speedup"] >= 1.05   # never a slowdown reported as a win
    md = rep.to_markdown()
    assert "sparse-kernel" in md and "speedup" in md
    rep.save(tmp_path / "r")
    assert (tmp_path / "r.md").exists() and (tmp_path / "r.json").exists()
    ox.plot([rep], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_sparse_kernel_rewrite_matches_dense_nd_and_gemm():
    """MatMul on 3-D input (reshape path), Gemm with bias, transposed-weight layouts: rewrite == dense."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((16, 24)).astype(np.float32)   # MatMul(X, W1): in=16, out=24
    W1[rng.random(W1.shape) < 0.85] = 0
    W2 = rng.standard_normal((8, 24)).astype(np.float32)    # Gemm transB=1: out=8
    W2[rng.random(W2.shape) < 0.9] = 0
    b2 = rng.standard_normal(8).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]),
             helper.make_node("Reshape", ["h", "s"], ["h2"]),
             helper.make_node("Gemm", ["h2", "W2", "b2"], ["Y"], transB=1, alpha=0.5, beta=2.0)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3, 16])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"),
                                       numpy_helper.from_array(b2, "b2"),
                                       numpy_helper.from_array(np.array([6, 24], np.int64), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    before = m.SerializeToString()
    same, none = ox.rewrite_sparse_kernel(m, threshold=0.95)     # nothing qualifies: no copy, no change
    assert none == [] and same is m
    sp, rew = ox.rewrite_sparse_kernel(m, threshold=0.8)
    assert m.SerializeToString() == before                         # the original is not modified
    assert sorted(rew) == ["W1", "W2"]
    assert sum(n.op_type == "SparseToDenseMatMul" for n in sp.graph.node) == 2
    assert all(helper.get_attribute_value(a) == 1 for n in sp.graph.node if n.op_type == "SparseToDenseMatMul"
               for a in n.attribute if a.name == "transB")
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        onnx.save(m, os.path.join(d, "a.onnx"))
        onnx.save(sp, os.path.join(d, "b.onnx"))
        x = rng.standard_normal((2, 3, 16)).astype(np.float32)
        ya = ox.OrtRunner(os.path.join(d, "a.onnx")).run({"X": x})[0]
        rb = ox.OrtRunner(os.path.join(d, "b.onnx"))
        assert rb.sparse_kernel and rb.input_names == ["X"]
        yb = rb.run({"X": x})[0]
    ref = 0.5 * (x.reshape(6, 16) @ W1) @ W2.T + 2.0 * b2
    np.testing.assert_allclose(ya, ref, atol=1e-5)
    np.testing.assert_allclose(yb, ya, atol=1e-5)


@pytest.mark.parametrize("opset", [14, 18])
def test_rewrite_below_opset_15_and_a_rank_2_gemm_bias(opset, tmp_path):
    """Opset 14 has no Shape(end=...): the rewrite slices the shape instead (the file it wrote did not load); a Gemm
    whose bias C is (M, N) is left dense (its rewrite did not load either); both files reproduce the dense ones."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 8)).astype(np.float32)
    W[rng.random(W.shape) < 0.9] = 0
    C = rng.standard_normal((3, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"]), helper.make_node("Gemm", ["X", "W", "C"], ["Y2"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, 16])],
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("Y2", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(W, "W"), numpy_helper.from_array(C, "C")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    sp, rew = ox.rewrite_sparse_kernel(m, threshold=0.8)
    assert rew == ["W"] and sum(n.op_type == "SparseToDenseMatMul" for n in sp.graph.node) == 1
    onnx.save(m, tmp_path / "a.onnx")
    onnx.save(sp, tmp_path / "b.onnx")
    x = rng.standard_normal((3, 16)).astype(np.float32)
    ya, yb = ox.OrtRunner(str(tmp_path / "a.onnx")).run({"X": x}), ox.OrtRunner(str(tmp_path / "b.onnx")).run({"X": x})
    for a, b in zip(ya, yb):
        np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.parametrize("kind", ["torch_ao", "bip"])
def test_exporting_a_parametrized_model_leaves_it_working(kind, tmp_path):
    """A model gated by torch.nn.utils.parametrize (a torch.ao sparsifier, BiP): export's deep copy shares torch's
    Parametrized* class, and removing the parametrization there deleted the caller's `weight` (its next forward
    raised AttributeError); verify then checks the gated weights' zeros under their plain names."""
    model = _mlp().eval()
    x = torch.randn(4, 64)
    if kind == "torch_ao":
        from torch.ao.pruning import WeightNormSparsifier
        sp = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 4), zeros_per_block=4)
        sp.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
        sp.step()
    else:
        from obs_plugins import BiPTrainer
        BiPTrainer(model, [(model[0], "weight"), (model[2], "weight")], sparsity=0.9, progress=False)
    ref = model(x).detach()
    res = ox.export(model, x, tmp_path / "p.onnx", sparse_kernel="off")
    assert torch.equal(model(x).detach(), ref)
    weights = ox.effective_weights(model)
    assert "0.weight" in weights and not any("parametrizations" in k for k in weights)
    rep = ox.verify(res, model, x, bench=False)
    assert rep.ok and {r["param"] for r in rep.sparsity} >= {"0.weight", "2.weight"}
    rows = {r["param"]: r for r in rep.sparsity}
    zeros = sum(rows[k]["model_sparsity"] * model.get_submodule(k[0]).weight.numel() for k in ("0.weight", "2.weight"))
    total = sum(model.get_submodule(k[0]).weight.numel() for k in ("0.weight", "2.weight"))
    assert zeros / total == pytest.approx(0.9, abs=0.01)      # the gated zeros, found under the plain names
    md = rep.to_markdown()   # bench=False: the report says nothing was timed (it printed the run count and an
    assert "not timed (bench=False)" in md and "interleaved" not in md and "median ms" not in md  # empty table)


@pytest.mark.parametrize("search", ["cs", "bip"])
def test_exporting_a_search_on_an_already_pruned_model(search, tmp_path):
    """A second round (README: a second call prunes among the survivors): a CS / BiP search started on a model
    holding torch.nn.utils.prune masks gates ``weight_orig`` itself, and export's bake read ``_parameters
    ['weight_orig']`` (KeyError).  The file now holds what the model computes with: gate x orig x mask."""
    model = _prune_all(_mlp(), 0.5).eval()
    x = torch.randn(4, 64)
    params = [(model[0], "weight"), (model[2], "weight")]
    if search == "cs":
        from obs_plugins import ContinuousSparsifier
        ContinuousSparsifier(model, params, rounds=1, epochs=2, progress=False)
    else:
        from obs_plugins import BiPTrainer
        BiPTrainer(model, params, sparsity=0.9, progress=False)
    assert "weight_orig" not in model[0]._parameters     # the gate wraps weight_orig
    snap = _snapshot(model)
    ref = model(x).detach()
    want = {f"{i}.weight": (getattr(model[i], "weight_orig") * model[i].weight_mask).detach() for i in (0, 2)}
    res = ox.export(model, x, tmp_path / "p.onnx", sparse_kernel="off")
    _assert_untouched(model, snap)
    assert torch.equal(model(x).detach(), ref)
    got = ox.effective_weights(model)
    for k, w in want.items():
        assert torch.equal(got[k], w), k
    rep = ox.verify(res, model, x, bench=False)
    assert rep.ok
    rows = {r["param"]: r for r in rep.sparsity}
    for k, w in want.items():   # the masks' zeros (and the gates' where they close) survived into the file
        assert rows[k]["ok"] and rows[k]["model_sparsity"] == pytest.approx(float((w == 0).float().mean()))
        assert rows[k]["model_sparsity"] >= 0.5


def test_cnn_export_verify_and_sparse_storage(tmp_path):
    model = _prune_all(_cnn(), 0.8)
    x = torch.randn(3, 3, 12, 12)
    snap = _snapshot(model)
    dense = ox.export(model, x, tmp_path / "d.onnx", sparse_kernel="off")
    res = ox.export(model, x, tmp_path / "cnn.onnx", sparse_kernel="auto", sparse_storage=True)
    _assert_untouched(model, snap)
    assert res.sparse_storage and res.file_bytes < dense.file_bytes
    assert res.sparse_kernel_path  # the final Linear (80% zeros) qualifies; convs stay dense
    rep = ox.verify(res, model, x, batch_sizes=[2], runs=3, warmup=1)
    assert rep.ok
    conv = [s for s in rep.sparsity if s["param"].startswith("0.")]
    assert conv and conv[0]["onnx_sparsity"] >= conv[0]["model_sparsity"] - 1e-6


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
def test_transformers_export_verify(tmp_path, make):
    model = make()
    from obs_plugins import prunable_linear_targets
    targets = prunable_linear_targets(model)
    for t in targets:
        prune.l1_unstructured(t.module, t.name, amount=0.9)
    snap = _snapshot(model)
    inp = _tokens()
    res = ox.export(model, inp, tmp_path / "m.onnx", sparse_kernel="on")
    _assert_untouched(model, snap)
    assert res.sparse_kernel_path and len(res.rewritten) >= 12
    rep = ox.verify(res, model, _tokens(3, 11), batch_sizes=[1], runs=2, warmup=1)   # other batch and length
    _assert_untouched(model, snap)
    assert rep.ok
    assert {o["route"] for o in rep.outputs} == {"pruned", "sparse-kernel"}
    pruned = [s for s in rep.sparsity if s["model_sparsity"] > 0.5]
    assert len(pruned) == len(targets) and all(s["ok"] and s["onnx_sparsity"] >= 0.9 - 1e-3 for s in pruned)


def test_mismatched_model_fails_loudly(tmp_path):
    model = _prune_all(_mlp(), 0.5)
    x = torch.randn(4, 64)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="off")
    other = _prune_all(_mlp(), 0.5)     # same seed: the same model, then changed
    with torch.no_grad():
        other[2].weight_orig.mul_(1.5)
    with pytest.raises(ox.VerificationError, match=r"output 0 .*differs from PyTorch: max abs error"):
        ox.verify(res, other, x, bench=False)
    rep = ox.verify(res, other, x, bench=False, raise_on_fail=False)
    assert not rep.ok and rep.info["failures"]
    # a model with more zeros than the file holds: sparsity did not survive
    sparser = _prune_all(_mlp(), 0.5)
    prune.l1_unstructured(sparser[4], "weight", amount=0.9)
    with pytest.raises(ox.VerificationError, match="sparsity did not survive"):
        ox.verify(res, sparser, x, bench=False, atol=1e3)
    # a corrupted file: a weight overwritten after export
    m = onnx.load(res.path)
    from onnx import numpy_helper
    init = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    a = numpy_helper.to_array(init).copy()
    a[a == 0] = 0.3
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(m, tmp_path / "bad.onnx")
    with pytest.raises(ox.VerificationError) as e:
        ox.verify(tmp_path / "bad.onnx", model, x, bench=False)
    assert "differs from PyTorch" in str(e.value) and "sparsity did not survive" in str(e.value)


def test_bad_arguments(tmp_path):
    with pytest.raises(PruningInputError, match="sparse_kernel"):
        ox.export(_mlp(), torch.randn(2, 64), tmp_path / "x.onnx", sparse_kernel="yes")
    with pytest.raises(PruningInputError, match="onnx_path"):
        ox.verify(tmp_path / "missing.onnx", _mlp(), torch.randn(2, 64))


def test_cli_parser_has_export_options():
    from obs_plugins.cli import build_parser
    a = build_parser().parse_args(["export", "o.onnx", "--sparsity", "0.9", "--batch-sizes", "1", "4",
                                   "--sparse-kernel", "on", "--model", "minilm"])
    assert a.output == "o.onnx" and a.sparsity == 0.9 and a.batch_sizes == [1, 4] and a.sparse_kernel == "on"


def test_batch_one_example_keeps_batch_dynamic(tmp_path):
    model = _prune_all(_mlp(), 0.9)
    res = ox.export(model, torch.randn(1, 64), tmp_path / "b1.onnx", sparse_kernel="off")
    rep = ox.verify(res, model, torch.randn(5, 64), bench=False)
    assert rep.ok and rep.outputs[0]["shape"] == [5, 10]


@pytest.mark.real_model
@pytest.mark.slow
def test_cli_export_minilm(tmp_path, capsys):
    from obs_plugins.cli import main
    out = tmp_path / "m.onnx"
    rc = main(["export", str(out), "--sparsity", "0.9", "--seq-len", "16", "--batch-sizes", "1", "2",
               "--runs", "3", "--report", str(tmp_path / "rep")])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.exists() and (tmp_path / "m.sparse.onnx").exists()
    assert (tmp_path / "rep.md").exists() and (tmp_path / "rep.json").exists()
    assert "speedup vs dense" in text and "batch 2:" in text
    assert main(["export", str(out), "--sparsity", "1.5"]) == 2


@pytest.mark.parametrize("args, flag", [(["--runs", "0"], "--runs"), (["--threads", "0"], "--threads"),
                                        (["--budget", "0"], "--budget"), (["--atol", "-1"], "--atol"),
                                        (["--report", "{tmp}/"], "--report"), (["--report", "{file}/r"], "--report"),
                                        (["{file}/m.onnx"], "output"), (["{tmp}"], "output")])
def test_cli_export_refuses_bad_flags_before_loading(args, flag, tmp_path, monkeypatch, capsys):
    from obs_plugins import data
    from obs_plugins.cli import main
    monkeypatch.setattr(data, "load_minilm", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "f").write_text("x")
    args = [a.format(tmp=tmp_path, file=tmp_path / "f") for a in args]
    out = [] if args[0] in (str(tmp_path), str(tmp_path / "f" / "m.onnx")) else [str(tmp_path / "m.onnx")]
    assert main(["export"] + out + args) == 2
    assert flag in capsys.readouterr().err


def test_verdict_rules_known_answers():
    def st(med, q25, q75, runs=10):
        return {"median_ms": med, "q25_ms": q25, "q75_ms": q75, "runs": runs}

    def with_speed(d):
        for v in d.values():
            v["speedup"] = d["dense"]["median_ms"] / v["median_ms"]
        return d
    win = ox.route_verdict(1, with_speed({"dense": st(10, 9.8, 10.2), "pruned": st(5, 4.9, 5.1)}), "dense", 1.05,
                           0.5, False, True)
    assert win["route"] == "pruned" and win["speedup"] == 2.0 and "2.00× faster" in win["verdict"]
    # 1.10× median but the IQRs overlap: not a win, and the verdict says why
    ov = ox.route_verdict(1, with_speed({"dense": st(11, 9, 13), "pruned": st(10, 8, 12)}), "dense", 1.05, 0.9,
                          False, True)
    assert ov["route"] == "dense" and "within noise" in ov["verdict"] and "structured pruning" in ov["verdict"]
    assert "or batch 1" not in ov["verdict"]        # already at batch 1: do not advise it
    # a slowdown is never the chosen route
    slow = ox.route_verdict(32, with_speed({"dense": st(10, 9.9, 10.1), "sparse-kernel": st(30, 29, 31)}),
                            "dense", 1.05, 0.9, True, True)
    assert slow["route"] == "dense" and "no route is faster" in slow["verdict"]
    assert "use structured pruning or batch 1" in slow["verdict"]
    few = ox.route_verdict(1, with_speed({"dense": st(10, 9.8, 10.2, 2), "pruned": st(5, 4.9, 5.1, 2)}), "dense",
                           1.05, 0.5, False, True)
    assert few["route"] == "dense" and "too few timed runs (2)" in few["verdict"]
    # one route timed (no baseline, no sparse-kernel file): nothing was compared, and no comparison is explained
    alone = {"pruned": {**st(5, 4.9, 5.1), "speedup": 1.0}}
    one = ox.route_verdict(1, alone, "pruned", 1.05, 0.95, False, False)
    assert one["route"] == "pruned" and "only pruned was timed" in one["verdict"]
    assert "baseline=" in one["verdict"] and "sparse_kernel='auto' or 'on'" in one["verdict"]
    assert "costs the same" not in one["verdict"] and "threshold" not in one["verdict"]
    # two routes, no sparse-kernel file: the verdict does not claim the weights were below the threshold
    nok = ox.route_verdict(1, with_speed({"dense": st(10, 9.8, 10.2), "pruned": st(10, 9.8, 10.2)}), "dense", 1.05,
                           0.95, False, True)
    assert "so that route was not tried" not in nok["verdict"]
    assert "sparse_kernel='off' or no weight reached" in nok["verdict"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_half_and_double_weights_are_mapped_and_verified(tmp_path, dtype):
    """An fp16 / fp64 model: every weight is found in the file by value and its zeros are checked (the map used
    to read fp32 initializers only, so verify reported 'no ONNX initializer holds this weight')."""
    model = _prune_all(_mlp(), 0.5).to(dtype).eval()
    x = torch.randn(4, 64).to(dtype)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="off")
    assert {v[0] for v in res.param_map.values()} >= {"0.weight", "2.weight", "4.weight"}
    rep = ox.verify(res, model, x, bench=False, atol=1e-2, rtol=1e-2)
    assert rep.ok and len(rep.sparsity) == 3
    assert all(abs(r["onnx_sparsity"] - 0.5) < 1e-3 for r in rep.sparsity)


def test_a_new_export_drops_an_earlier_sparse_kernel_file(tmp_path):
    """Exporting again to the same path, now with nothing to rewrite, removes the old <stem>.sparse.onnx, and
    verify given the path as a string uses what the file's metadata names (here: none)."""
    path = tmp_path / "m.onnx"
    x = torch.randn(4, 64)
    first = ox.export(_prune_all(_mlp(), 0.9), x, path, sparse_kernel="auto")
    assert first.sparse_kernel_path is not None and (tmp_path / "m.sparse.onnx").exists()
    assert ox.verify(str(path), _prune_all(_mlp(), 0.9), x, bench=False).info["sparse_kernel_path"] is not None
    model = _prune_all(_mlp(), 0.5)
    second = ox.export(model, x, path, sparse_kernel="auto")
    assert second.sparse_kernel_path is None and not (tmp_path / "m.sparse.onnx").exists()
    rep = ox.verify(str(path), model, x, bench=False)
    assert rep.ok and rep.info["sparse_kernel_path"] is None


def test_verify_a_causal_lm_with_its_cache_on(tmp_path):
    """A causal LM as from_pretrained gives it (use_cache=True): export traces without the cache, and verify
    compares like with like instead of failing on the cache in the output (and leaves the flag as it was)."""
    model = _prune_all(_llama(), 0.5)
    model.config.use_cache = True
    inp = _tokens()
    res = ox.export(model, inp, tmp_path / "l.onnx", sparse_kernel="off")
    rep = ox.verify(res, model, inp, bench=False)
    assert rep.ok and model.config.use_cache is True


def test_sequence_of_one_token_keeps_sequence_dynamic(tmp_path):
    """Example ids of shape (2, 1): the file still runs other sequence lengths (torch.export would specialise
    the size-1 dim)."""
    model = _bert()
    res = ox.export(model, _tokens(2, 1), tmp_path / "b.onnx", sparse_kernel="off")
    assert ox.verify(res, model, _tokens(3, 7), bench=False).ok


class _EmbedLinear(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 64, padding_idx=padding_idx), nn.Linear(64, 64)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def _embed_linear_report(tmp_path, amount, padding_idx=None):
    torch.manual_seed(0)
    m = _EmbedLinear(padding_idx).eval()
    prune.l1_unstructured(m.fc, "weight", amount=amount)
    ids = torch.randint(0, 50, (2, 8))
    res = ox.export(m, (ids,), tmp_path / "m.onnx", sparse_kernel="off")
    return ox.verify(res, m, (ids,), batch_sizes=(1,), runs=3)


def test_the_verdict_counts_only_the_pruned_weights(tmp_path):
    """An unpruned embedding beside a 90%-pruned Linear: the report's mean over the pruned weights (90%) is what
    the verdict and info use (the unpruned 2-D weight pulled it to 45%)."""
    rep = _embed_linear_report(tmp_path, 0.9)
    assert rep.info["mean_pruned_sparsity"] == pytest.approx(0.9, abs=1e-3)


# ------------------------------------------------------------------ fourteenth-session review
def test_verify_keeps_every_submodule_training_flag(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    m.train()
    m[1].eval()   # a frozen BatchNorm in a model being trained
    x = torch.randn(4, 8)
    res = ox.export(m, x, tmp_path / "m.onnx", sparse_kernel="off")
    ox.verify(res, m, x, bench=False)
    assert [mod.training for mod in m] == [True, False, True, True]


def test_a_pruned_layer_used_twice_keeps_its_sparsity_check():
    """One pruned Linear applied twice on 3-D inputs (ALBERT-style sharing): both names hold one initializer."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))
    torch.manual_seed(0)
    m = Shared().eval()
    prune.l1_unstructured(m.a, "weight", amount=0.5)
    x = torch.randn(2, 3, 8)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        rep = ox.verify(ox.export(m, x, f"{d}/s.onnx", sparse_kernel="off"), m, x, bench=False)
    assert rep.ok and all(s["ok"] and s["onnx_sparsity"] == pytest.approx(0.5) for s in rep.sparsity)
    assert "Outputs match" in rep.to_markdown()


def test_report_headline_is_about_the_outputs_only():
    rep = ox.Report(outputs=[{"route": "pruned", "index": 0, "shape": [2], "max_abs": 0.0, "max_rel": 0.0,
                              "ok": True}],
                    sparsity=[{"param": "w", "onnx": [], "model_sparsity": 0.5, "onnx_sparsity": None, "ok": False,
                               "layer": True}],
                    latency={}, best={}, ok=False,
                    info={"path": "m.onnx", "atol": 1e-4, "rtol": 1e-3, "ort_version": "x", "threads": 1, "runs": 3,
                          "warmup": 1, "baseline_route": "pruned"})
    md = rep.to_markdown()
    assert "Outputs match PyTorch" in md and "survived (every weight holding zeros): NO" in md


def test_sparse_kernel_files_of_dotted_names_do_not_collide():
    from obs_plugins.integrations.onnx.export import sparse_kernel_file
    assert sparse_kernel_file("out/model.onnx") == "out/model.sparse.onnx"
    assert sparse_kernel_file("out/mlp_0.85") == "out/mlp_0.85.sparse.onnx"
    assert sparse_kernel_file("out/mlp_0.95") == "out/mlp_0.95.sparse.onnx"


def test_external_data_writes_the_weights_beside_the_file_and_verifies(tmp_path):
    model = _prune_all(_mlp(), 0.9)
    x = torch.randn(4, 64)
    res = ox.export(model, x, tmp_path / "mlp.onnx", sparse_kernel="auto", external_data=True)
    assert (tmp_path / "mlp.onnx.data").exists() and (tmp_path / "mlp.sparse.onnx.data").exists()
    assert (tmp_path / "mlp.onnx").stat().st_size < 20_000 < (tmp_path / "mlp.onnx.data").stat().st_size
    rep = ox.verify(res, model, x, bench=False)
    assert rep.ok and len(rep.sparsity) == 3 and all(s["ok"] for s in rep.sparsity)
    assert {o["route"] for o in rep.outputs} == {"pruned", "sparse-kernel"}
    with pytest.raises(PruningInputError, match="^external_data"):
        ox.export(model, x, tmp_path / "x.onnx", external_data="yes")


def test_external_data_with_no_weight_large_enough_to_move(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(4, 8)
    res = ox.export(model, x, tmp_path / "t.onnx", sparse_kernel="off", external_data=True)  # raised: no .data
    assert res.file_bytes == (tmp_path / "t.onnx").stat().st_size and ox.verify(res, model, x, bench=False).ok


def test_external_data_auto_follows_the_model_size(tmp_path, monkeypatch):
    import importlib
    export_module = importlib.import_module("obs_plugins.integrations.onnx.export")  # the module, not the function
    model, x = _mlp(), torch.randn(4, 64)
    size = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", size - 1)
    ox.export(model, x, tmp_path / "big.onnx", sparse_kernel="off")
    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", size)
    ox.export(model, x, tmp_path / "small.onnx", sparse_kernel="off")
    assert (tmp_path / "big.onnx.data").exists() and not (tmp_path / "small.onnx.data").exists()


def test_an_embedding_padding_row_is_not_a_pruned_weight(tmp_path):
    rep = _embed_linear_report(tmp_path, 0.5, padding_idx=0)
    assert {s["param"]: s["layer"] for s in rep.sparsity} == {"emb.weight": False, "fc.weight": True}
    assert rep.info["mean_pruned_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "Sparsity of 1 pruned layer weights" in rep.to_markdown()


def test_verify_and_export_refuse_bad_batch_sizes_and_a_folder_path(tmp_path):
    model = _mlp()
    x = torch.randn(4, 64)
    res = ox.export(model, x, tmp_path / "m.onnx", sparse_kernel="off")
    for bad in ([0], [-1], [1.5], 4):
        with pytest.raises(PruningInputError, match="^batch_sizes"):
            ox.verify(res, model, x, batch_sizes=bad)
    with pytest.raises(PruningInputError, match="^path: .* is a folder"):
        ox.export(model, x, tmp_path)


def test_left_padded_causal_lm_is_compared_at_the_real_tokens(tmp_path):
    """A padded query row of a causal LM attends to nothing; what ORT and PyTorch write there differs. verify
    compares per-token outputs at the real tokens (it failed on exactly the padded rows); a wrong model still
    fails there."""
    model = _llama()
    ids = torch.randint(1, 100, (2, 6))
    res = ox.export(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "l.onnx",
                    sparse_kernel="off")
    ids = torch.randint(1, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0   # left padding
    rep = ox.verify(res, model, {"input_ids": ids, "attention_mask": mask}, bench=False)
    assert rep.ok and rep.outputs[0]["padded_positions_ignored"] == 2
    other = _llama()
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)
    with pytest.raises(ox.VerificationError, match="differs from PyTorch"):
        ox.verify(res, other, {"input_ids": ids, "attention_mask": mask}, bench=False)


# ---- fifteenth session's review
def test_a_pruned_weight_shared_with_a_dense_module_stays_dense_there():
    """prune.remove wrote orig * mask into the shared Parameter: the copy's other module computed with the zeros
    (a tied lm_head pruned, the embedding masked too)."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b).eval()
    prune.l1_unstructured(a, "weight", amount=0.5)
    x = torch.randn(4, 8)
    cp = ox.baked_copy(model)
    with torch.no_grad():
        assert torch.equal(cp(x), model(x))
    assert int((cp[2].weight == 0).sum()) == 0 and int((cp[0].weight == 0).sum()) == 32
    assert not hasattr(cp[0], "weight_orig") and not cp[0]._forward_pre_hooks


def test_parametrizations_are_baked_in_eval_mode():
    """spectral_norm's power iteration ran when the copy was baked in train mode: the file differed by 2.6."""
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():   # a training step moved W: the stored power-iteration vectors are stale
        model[0].parametrizations.weight.original.mul_(torch.randn(8, 8))
    model.train()
    x = torch.randn(4, 8)
    cp = ox.baked_copy(model)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(cp(x), model(x), atol=1e-6)


def test_verify_takes_an_export_result_as_the_baseline_and_counts_every_masked_tensor(tmp_path):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(-1))

    model = Net().eval()
    x = torch.randn(2, 4, 16)
    dense = ox.export(model, (x,), tmp_path / "dense.onnx", sparse_kernel="off")
    prune.l1_unstructured(model.conv, "weight", amount=0.9)
    res = ox.export(model, (x,), tmp_path / "m.onnx", sparse_kernel="off")
    rep = ox.verify(res, model, (x,), batch_sizes=[2], runs=3, warmup=0, baseline=dense, raise_on_fail=False)
    assert rep.ok
    row = next(s for s in rep.sparsity if s["param"] == "conv.weight")
    assert row["layer"] and row["model_sparsity"] == pytest.approx(0.9, abs=0.01)


def test_sparse_storage_with_external_data_is_refused(tmp_path):
    with pytest.raises(PruningInputError, match="^sparse_storage: "):
        ox.export(_mlp(), torch.randn(2, 30), tmp_path / "m.onnx", sparse_storage=True, external_data=True)


def test_only_per_token_outputs_are_compared_at_the_real_tokens(tmp_path):
    """hidden size == token count: the pooler output (batch, hidden) was masked like a per-token output."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    m = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 120, (2, 16))
    am = torch.ones_like(ids)
    am[0, 10:] = 0
    res = ox.export(m, {"input_ids": ids, "attention_mask": am}, tmp_path / "b.onnx", sparse_kernel="off")
    rep = ox.verify(res, m, {"input_ids": ids, "attention_mask": am}, bench=False)
    ignored = {o["index"]: o.get("padded_positions_ignored") for o in rep.outputs}
    assert ignored == {0: 6, 1: None}


def test_a_batch_by_one_integer_input_that_is_no_sequence_exports_and_verifies(tmp_path):
    """(batch, 1) class ids were widened to (batch, 2) like token ids: the widened forward failed."""
    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(4, 16), nn.Linear(16, 8)

        def forward(self, x, cls):
            return self.fc(x + self.emb(cls.view(-1)))

    torch.manual_seed(0)
    m = Cond().eval()
    x, cls = torch.randn(3, 16), torch.tensor([[1], [2], [0]])
    res = ox.export(m, (x, cls), tmp_path / "c.onnx", sparse_kernel="off")
    assert ox.verify(res, m, (x, cls), bench=False).ok
    x5, cls5 = torch.randn(5, 16), torch.tensor([[3], [1], [0], [2], [1]])   # another batch size
    assert ox.verify(res, m, (x5, cls5), bench=False).ok


def test_report_gives_the_overall_sparsity_by_weights_beside_the_per_layer_mean(tmp_path):
    """Global pruning gives layers different sparsities: the per-layer mean (what the report printed alone) is not
    the fraction of weights removed; the report now gives both (a user read 81.9% for an exact 90%)."""
    model = _mlp().eval()
    params = [(m, "weight") for m in model if isinstance(m, nn.Linear)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.9)
    x = torch.randn(4, 64)
    rep = ox.verify(ox.export(model, x, tmp_path / "g.onnx", sparse_kernel="off"), model, x, bench=False)
    per_layer = [float((m.weight == 0).float().mean()) for m, _ in params]
    overall = sum(int((m.weight == 0).sum()) for m, _ in params) / sum(m.weight.numel() for m, _ in params)
    assert overall == pytest.approx(0.9, abs=1e-4) and f"{sum(per_layer) / 3:.1%}" != f"{overall:.1%}"
    md = rep.to_markdown()
    assert f"mean over layers {sum(per_layer) / 3:.1%} → {sum(per_layer) / 3:.1%}" in md
    assert f"(overall, by weights: {overall:.1%} → {overall:.1%})" in md


def test_verify_of_float16_and_bfloat16_models(tmp_path):
    """float16: a correct export differs from PyTorch by about one float16 step (4.9e-4 at 0.5), so the default
    tolerances follow the outputs' dtype (1e-3 / 1e-2 there, recorded in the report); bfloat16: ONNX Runtime's
    CPU provider has no kernels for it, refused by name before any session is built."""
    ex = _tokens()
    m16 = _llama().half()
    res = ox.export(m16, ex, tmp_path / "f16.onnx")
    rep = ox.verify(res, m16, ex, bench=False)
    assert rep.ok and (rep.info["atol"], rep.info["rtol"]) == (1e-3, 1e-2)
    assert max(o["max_abs"] for o in rep.outputs) > 1e-4     # the float32 defaults would have failed it
    with pytest.raises(ox.VerificationError, match="atol 0.0001"):
        ox.verify(res, m16, ex, bench=False, atol=1e-4, rtol=1e-3)
    m32 = _llama()
    rep32 = ox.verify(ox.export(m32, ex, tmp_path / "f32.onnx"), m32, ex, bench=False)
    assert (rep32.info["atol"], rep32.info["rtol"]) == (1e-4, 1e-3)
    bf = _llama().to(torch.bfloat16)
    with pytest.raises(PruningInputError, match="^model: .*bfloat16"):
        ox.verify(res, bf, ex, bench=False)
    with pytest.raises(PruningInputError, match="^atol"):
        ox.verify(res, m16, ex, bench=False, atol=-1.0)
