"""The four examples/ scripts run as a user runs them (a subprocess, small settings) and say what their docstrings
promise.  Nothing ran them before the seventeenth session, so a change to the API they call could break them
unseen.  Real models and data sets: marked, still run in CI (~2.5 min on 2 cores)."""
import json
import os
import re
import subprocess
import sys

import pytest

from obs_plugins import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def _need(*assets):
    for fn in assets:
        try:
            fn()
        except data.AssetMissing as e:
            pytest.skip(f"asset not installable here: {e}")


def _run(script, *args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stdout


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the output:\n{text[-2000:]}"
    return float(m.group(1))


def test_prune_fashion_mlp_obs_iht_beats_torch_l1_at_exactly_90_percent():
    _need(lambda: data.load_fashion_mnist("test"))
    out = _run("prune_fashion_mlp.py")
    assert _number(r"sparsity after prune\.remove: ([0-9.]+)", out) == 0.9
    dense = _number(r"dense test accuracy ([0-9.]+)", out)
    l1 = _number(r"L1 \(torch, global\) at 90%: ([0-9.]+)", out)
    obs = _number(r"OBS-IHT \(T=2, global\) at 90%: ([0-9.]+)", out)
    assert dense > 0.8 and obs > l1 + 0.2, (dense, l1, obs)   # measured: 0.854, 0.428, 0.838


def test_limit_l1_example_l1_moves_the_measured_limit_up(tmp_path):
    _need(lambda: data.load_fashion_mnist("test"))
    out = _run("limit_l1_fashion_mlp.py", "--plot", str(tmp_path / "l1.png"))
    predicted = [float(x) for x in re.findall(r"\| predicted limit s\* \(G\(R\(s\*\)\) = s\*\) \| \*\*([0-9.]+)\*\* \|", out)]
    measured = [float(x) for x in re.findall(r"\| measured limit, accuracy >= dense − 0\.01 \(dense [0-9.]+\) \| "
                                             r"([0-9.]+) ", out)]
    assert len(predicted) == len(measured) == 2, out[-2000:]       # plain, then l1
    assert measured[1] > measured[0] + 0.2, measured               # measured: 0.44 -> 0.91
    assert all(0 < p < 1 for p in predicted)
    assert (tmp_path / "l1.png").stat().st_size > 0


def test_optimum_smollm2_example_reloads_the_pruned_model_exactly(tmp_path):
    _need(data.shakespeare_dir)
    js = tmp_path / "fig.json"
    _run("optimum_smollm2.py", "--quiet", "--calib", "4", "--eval", "4", "--seq-len", "64", "--threads", "2",
         "--out", str(tmp_path / "saved"), "--json", str(js))
    fig = json.loads(js.read_text())
    assert fig["sparsity"] == 0.5 and fig["tensors"] == 210
    assert fig["reloaded_ppl"] == fig["pruned_ppl"] > fig["dense_ppl"] and fig["reload_max_abs_logit_diff"] == 0.0
    assert {"model.safetensors", "pruning_config.json", "prune_report.json"} <= set(os.listdir(tmp_path / "saved"))


def test_trainer_minilm_example_every_method_ends_at_the_sparsity_asked(tmp_path):
    _need(data.bbc_news_dir)
    js = tmp_path / "rows.json"
    _run("trainer_minilm_bbc.py", "--methods", "dense", "obs_iht", "cs", "bip", "magnitude", "--train", "128",
         "--val", "32", "--test", "32", "--seq-len", "32", "--batch-size", "8", "--threads", "2", "--json", str(js))
    rows = {r["method"]: r for r in json.loads(js.read_text())["rows"]}
    assert set(rows) == {"dense", "obs_iht", "cs", "bip", "magnitude"}
    assert rows["dense"]["sparsity"] == 0.0
    for m in ("obs_iht", "cs", "bip", "magnitude"):
        assert rows[m]["sparsity"] == pytest.approx(0.7, abs=5e-4), (m, rows[m]["sparsity"])
        assert 0.0 <= rows[m]["test_acc"] <= 1.0
