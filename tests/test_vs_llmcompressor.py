"""benchmarks/vs_llmcompressor.py and benchmarks/llmc/worker.py without llm-compressor: the windows handed to the
worker are our batches' tokens, and the worker's perplexity (its own copy, the worker imports nothing from
obs_plugins) equals obs_plugins.lm.perplexity and a float64 brute-force reference."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from obs_plugins.lm import causal_lm_batches, perplexity
from tiny import load_bench

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def worker():
    return load_bench("llmc/worker.py", "llmc_worker")


@pytest.fixture(scope="module")
def driver():
    return load_bench("vs_llmcompressor.py", "vs_llmcompressor")


def _tiny_llama(layers=2, vocab=61):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _brute_ppl(model, windows):
    """float64 exp(mean next-token NLL over every shifted token of every window)."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(float(nll.mean()))


def test_saved_windows_are_our_batches(driver, tmp_path):
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(0, 1000, (10, 7), generator=g)
    batches = causal_lm_batches(windows, 4)  # 4 + 4 + 2: the last batch is short
    path = driver.save_windows(batches, tmp_path / "calib.pt")
    saved = torch.load(path)
    assert saved.dtype == torch.long and saved.shape == (10, 7)
    assert torch.equal(saved, windows)
    again = causal_lm_batches(saved, 4)
    assert len(again) == len(batches) == 3
    for a, b in zip(again, batches):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_reordered_is_a_seeded_permutation_of_the_same_windows(driver):
    windows = torch.arange(10 * 3).reshape(10, 3)
    batches = causal_lm_batches(windows, 4)
    a, b, c = driver.reordered(batches, 1), driver.reordered(batches, 1), driver.reordered(batches, 2)
    assert torch.equal(driver.windows_of(batches), windows)  # the input is left as it was
    got = driver.windows_of(a)
    assert [x["input_ids"].shape[0] for x in a] == [4, 4, 2]  # re-batched with the same batch size
    assert torch.equal(got, driver.windows_of(b))  # seeded
    assert not torch.equal(got, windows) and not torch.equal(got, driver.windows_of(c))
    assert sorted(got[:, 0].tolist()) == windows[:, 0].tolist()  # the same windows, each whole
    assert all(torch.equal(row, windows[int(row[0]) // 3]) for row in got)
    assert all(torch.equal(x["labels"], x["input_ids"]) for x in a)


def test_worker_perplexity_equals_ours_and_brute_force(worker):
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 61, (5, 9), generator=g)  # batches of 4 + 1
    grad_on = []
    h = model.register_forward_pre_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    theirs = worker.perplexity(model, windows, batch_size=4)
    h.remove()
    assert grad_on and not any(grad_on)   # evaluated without autograd (its no_grad once slipped off)
    ours = perplexity(model, causal_lm_batches(windows, 4), progress=False)
    ref = _brute_ppl(model, windows)
    assert theirs == pytest.approx(ours, rel=1e-12)
    assert theirs == pytest.approx(ref, rel=1e-5)
    assert not model.training
    with pytest.raises(ValueError, match="windows"):
        worker.perplexity(model, windows[0])


def test_worker_targets_are_the_decoder_linears(worker):
    model = _tiny_llama(layers=3)
    lin = worker.decoder_linears(model)
    assert len(lin) == 3 * 7
    assert "lm_head" not in lin and all(n.startswith("model.layers.") for n in lin)
    m = lin["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        m.weight.view(-1)[:10] = 0
    total = sum(x.weight.numel() for x in lin.values())
    assert worker.measured_sparsity(lin) == pytest.approx(10 / total, abs=0)


def test_worker_sparsity_specs(worker):
    assert worker._parse_sparsity("0.7") == (0.7, "0:0")
    assert worker._parse_sparsity("2:4") == (0.5, "2:4")
    for bad in ("1.2", "0", "4:4", "3:2"):
        with pytest.raises(ValueError, match="--sparsity"):
            worker._parse_sparsity(bad)


def test_summary_ratios(driver):
    rows = [{"sparsity": "0.5", "method": "llmc SparseGPT", "ppl": 40.0, "seconds": 100.0},
            {"sparsity": "0.5", "method": "llmc Wanda", "ppl": 50.0, "seconds": 20.0},
            {"sparsity": "0.5", "method": "ours OBS-IHT T=1", "ppl": 38.0, "seconds": 80.0},
            {"sparsity": "0.5", "method": "ours OBS-IHT best T=3", "ppl": 30.0, "seconds": 200.0}]
    (s,) = driver._summary(rows, ["0.5"])
    assert s["best"] == "best T=3"
    assert s["ppl_best_vs_sparsegpt"] == 0.75 and s["ppl_T1_vs_sparsegpt"] == 0.95
    assert s["ppl_best_vs_wanda"] == 0.6
    assert s["time_T1_vs_sparsegpt"] == 0.8 and s["time_best_vs_sparsegpt"] == 2.0


@pytest.mark.real_model
def test_real_windows_match_setup(driver, tmp_path):
    from obs_plugins.experiment import setup_smollm2
    setup = setup_smollm2(n_calib=4, n_eval=4, seq_len=32)
    for batches in (setup.calib, *setup.heldout.values()):
        saved = torch.load(driver.save_windows(batches, tmp_path / "w.pt"))
        assert saved.shape == (4, 32)
        assert torch.equal(saved, torch.cat([b["input_ids"] for b in batches]))


class _CharTokenizer:
    """One token per character (ord), enough to test where windows start."""

    def __call__(self, text, return_tensors="pt"):
        import types
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) for c in text]]))


def test_text_windows_draws_are_other_evenly_spread_windows():
    from obs_plugins.experiment import text_windows
    text = "".join(chr(65 + (i % 26)) for i in range(10_000))  # position i holds letter i mod 26
    tok, n, seq = _CharTokenizer(), 4, 8  # chunks of 96 characters
    starts = lambda w: [int(x[0]) - 65 for x in w]  # first letter -> start position mod 26
    w0 = text_windows(tok, text, n, seq)
    assert w0.shape == (n, seq) and starts(w0) == [(i * ((10_000 - 96) // 3)) % 26 for i in range(n)]
    w1 = text_windows(tok, text, n, seq, draw=1)
    stride = (10_000 - 96) // 4
    shift = int(0.6180339887498949 * stride)  # 1517
    assert starts(w1) == [(shift + i * stride) % 26 for i in range(n)]
    assert shift + (n - 1) * stride + 96 <= 10_000  # the last window still lies inside the text
    assert not torch.equal(w0, w1) and not torch.equal(w1, text_windows(tok, text, n, seq, draw=2))
    with pytest.raises(ValueError, match="draw"):
        text_windows(tok, text, n, seq, draw=-1)


def test_llmc_layer_loss_and_counts(monkeypatch):
    """benchmarks/llmc_layer.py: the layer loss is ||dW X||^2 / n for H = 2 X X^T / n, and our side prunes
    round(s * n) entries (unstructured) or 2 of every 4 (2:4)."""
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports _common and vs_llmcompressor from there
    layer = load_bench("llmc_layer.py", "llmc_layer")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 40, generator=g, dtype=torch.float64)
    W0 = torch.randn(6, 12, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(6, 12, generator=g, dtype=torch.float64)
    H = 2 * X @ X.T / 40
    assert layer.layer_loss(W0, W, H) == pytest.approx(float(((W - W0) @ X).pow(2).sum() / 40), rel=1e-12)
    Wp = layer.ours(W0.float(), H.float(), "0.7")
    assert int((Wp == 0).sum()) == round(0.7 * 72)
    W24 = layer.ours(W0.float(), H.float(), "2:4")
    assert ((W24 == 0).reshape(6, 3, 4).sum(-1) == 2).all()


def test_draws_geometric_mean_interval_and_counts(monkeypatch):
    """benchmarks/vs_llmcompressor_draws.py: the geometric mean is exp(mean log ratio) with a Student-t 95%
    interval on the log scale (n - 1 degrees of freedom), and the table counts the runs where ours was lower."""
    monkeypatch.syspath_prepend(str(BENCH))
    draws = load_bench("vs_llmcompressor_draws.py", "vs_llmcompressor_draws")
    # tabulated t quantiles (0.975): df 1, 3, 18, 50
    for df, t in [(1, 12.7062), (3, 3.1824), (18, 2.1009), (50, 2.0086)]:
        assert draws.t_quantile(0.975, df) == pytest.approx(t, abs=2e-4)
    g, lo, hi = draws.geometric([0.5, 2.0])
    half = 12.7062 * math.log(4.0) / math.sqrt(2) / math.sqrt(2)  # stdev of (-ln2, ln2) is ln4/sqrt2; df = 1
    assert g == pytest.approx(1.0) and lo == pytest.approx(math.exp(-half), rel=1e-4) and hi == pytest.approx(
        math.exp(half), rel=1e-4)
    r = {("0.7", "a"): [0.9, 1.2, 1.0]}
    ppl = {("0.7", "a"): {"ours": [9.0, 12.0, 10.0], "theirs": [10.0, 10.0, 10.0]}}
    row = draws.table(r, 3, ppl, per_run=False)[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3" and cells[3] == f"{(0.9 + 1.2 + 1.0) / 3:.4f}" and cells[6].startswith(
        f"{(0.9 * 1.2) ** (1 / 3):.4f}") and cells[7] == "1 of 3"


def test_draws_pairs_two_variants_of_ours_by_calibration(monkeypatch, tmp_path):
    """--vs: our runs are paired with the other variant's run of the same calibration, not by position."""
    monkeypatch.syspath_prepend(str(BENCH))
    draws = load_bench("vs_llmcompressor_draws.py", "vs_llmcompressor_draws")

    def run(name, calib, ppl, seconds=10.0):
        rows = [{"method": "ours OBS-IHT T=1", "sparsity": "0.7", "ppl": {"a": ppl}, "prune_seconds": seconds}]
        (tmp_path / name).write_text(json.dumps({"setup": {"calib": calib}, "rows": rows}))
        return str(tmp_path / name)

    a = [run("a1.json", "order 1", 10.0, 12.0), run("a2.json", "order 2", 30.0, 30.0)]
    b = [run("b2.json", "order 2", 20.0), run("b1.json", "order 1", 20.0), run("b3.json", "order 3", 1.0)]
    ppl_row, time_row = ([c.strip() for c in r.strip("|").split("|")] for r in draws.paired(a, b)[-2:])
    assert ppl_row[:3] == ["0.7", "a", "2"] and ppl_row[3].startswith(f"{(0.5 * 1.5) ** 0.5:.4f}")
    assert ppl_row[4] == "1 of 2"
    assert time_row == ["0.7", "T=1 prune time", "2", "median 2.100 (1.200 … 3.000)", "0 of 2"]


def test_llmc_weights_their_counts_are_int_ns_plus_one_per_block_and_our_sweep_prunes_them(monkeypatch):
    """benchmarks/llmc_weights.py --counts theirs: llm-compressor's threshold ``score <= sorted[int(n*s)]`` prunes
    int(n*s) + 1 entries of each 128-column block; our sweep given their total prunes exactly those per block."""
    monkeypatch.syspath_prepend(str(BENCH))
    lw = load_bench("llmc_weights.py", "llmc_weights")
    from obs_plugins.curvature.linalg import inverse_factor
    from obs_plugins.methods.obs_iht.solver import obs_sweep
    assert lw.their_counts(6, 300, 0.7) == [538, 538, 185]        # 6*128*0.7 = 537.6, 6*44*0.7 = 184.8
    assert lw.their_counts(576, 576, 0.7) == [51610] * 4 + [25805]
    assert lw.their_counts(4, 256, 0.5) == [257, 257]               # exact n*s: still one more
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 900, generator=g, dtype=torch.float64)
    W = torch.randn(6, 300, generator=g, dtype=torch.float64)
    _, keep, _ = obs_sweep(W, inverse_factor(2 * X @ X.T / 900).hinv_chol_upper, k=538 + 538 + 185)
    assert [int((~keep[:, i:i + 128]).sum()) for i in (0, 128, 256)] == [538, 538, 185]


def test_reuse_theirs_checks_the_calibration_windows_and_marks_the_rows(driver, worker, tmp_path):
    """--reuse-theirs: a cached worker result computed on other windows is refused; one on the same windows (the
    worker's fingerprint) is reused and marked; one from before fingerprints is reused, marked as unchecked."""
    calib = torch.arange(12).reshape(3, 4)
    path = tmp_path / "calib.pt"
    torch.save(calib, path)
    assert driver.windows_sha256(calib) == worker.windows_sha256(torch.load(path))
    assert worker.windows_sha256(calib) != worker.windows_sha256(calib.flip(0))
    cached = tmp_path / "sparsegpt_0.7.json"
    base = {"ppl": {"a": 1.0}, "prune_seconds": 9.0}
    cached.write_text(json.dumps({**base, "calib": {"n": 3, "seq_len": 4, "sha256": worker.windows_sha256(calib)}}))
    r = driver.run_worker(tmp_path, path, {}, "sparsegpt", "0.7", cached, 1, reuse=True)
    assert r["reused_from"] == str(cached) and r["reuse_checked"] is True
    cached.write_text(json.dumps({**base, "calib": {"n": 3, "seq_len": 4,
                                                     "sha256": worker.windows_sha256(calib.flip(0))}}))
    with pytest.raises(RuntimeError, match="other calibration windows"):
        driver.run_worker(tmp_path, path, {}, "sparsegpt", "0.7", cached, 1, reuse=True)
    cached.write_text(json.dumps({**base, "calib": {"n": 3, "seq_len": 4}}))
    r = driver.run_worker(tmp_path, path, {}, "sparsegpt", "0.7", cached, 1, reuse=True)
    assert r["reused_from"] == str(cached) and r["reuse_checked"] is False


def test_iteration_cost_median_and_time_outside_the_phases(tmp_path, capsys):
    """benchmarks/iteration_cost.py: the median of an even count is the mean of the middle two; the best-T row's
    time outside its iterations' phases (and its own T=1 sweep) is reported beside them."""
    cost = load_bench("iteration_cost.py")
    hist = [{"iteration": i, "accepted": True, "seconds": {"gradient": g, "direction_and_projection": 0.0,
                                                           "step_search": 0.0, "trials": 3}}
            for i, g in zip(range(2, 6), (6.0, 8.0, 10.0, 12.0))]
    rows = [{"sparsity": "0.7", "method": "ours OBS-IHT T=1", "prune_seconds": 10.0},
            {"sparsity": "0.7", "method": "ours OBS-IHT best T=5", "prune_seconds": 10.0 + 36.0 + 4.0,
             "history": hist}]
    p = tmp_path / "run.json"
    p.write_text(json.dumps({"rows": rows}))
    assert cost.main([str(p)]) == 0
    out = capsys.readouterr().out
    assert "median 0.90" in out                     # (0.8 + 1.0) / 2, not the upper middle 1.0
    assert "4.0 to 4.0 s per row" in out and "for 2 of 4" in out   # spread: 0.7, 0.9, 1.1, 1.3
