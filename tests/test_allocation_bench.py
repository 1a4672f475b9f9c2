"""benchmarks/allocation.py: ``Stack`` runs the very same layers as a block stack (one block per Linear / Conv2d
with the parameter-free modules after it), so a sequential curvature over it plans what pruning layer by layer
and re-collecting plans; ``--mean`` gives the mean and sd of every row over runs and refuses runs of other rows."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from obs_plugins import Curvature
from tiny import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("allocation.py")


def test_stack_shares_the_layers_and_splits_at_each_parametric_layer(bench):
    torch.manual_seed(0)
    seq = bench.cnn()
    st = bench.Stack(seq)
    kinds = [[type(m).__name__ for m in blk] for blk in st.layers]
    assert kinds == [["Conv2d", "ReLU", "MaxPool2d"], ["Conv2d", "ReLU", "MaxPool2d", "Flatten"],
                     ["Linear", "ReLU"], ["Linear"]]
    assert [id(p) for p in st.parameters()] == [id(p) for p in seq.parameters()]
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(st(x), seq(x))
    mlp = bench.Stack(bench.mlp())
    assert [[type(m).__name__ for m in blk] for blk in mlp.layers] == [["Flatten", "Linear", "ReLU"],
                                                                      ["Linear", "ReLU"], ["Linear"]]


def test_stack_is_calibrated_sequentially(bench):
    torch.manual_seed(0)
    st = bench.Stack(bench.mlp())
    data = [(torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    params = [(m, "weight") for m in st.modules() if isinstance(m, nn.Linear)]
    curv = Curvature.layerwise(st, params, data, loss_fn=nn.functional.cross_entropy, progress=False,
                               sequential=True)
    assert curv.sequential
    plain = bench.mlp()   # a plain nn.Sequential is not a block stack: one pass
    assert not Curvature.layerwise(plain, [(m, "weight") for m in plain if isinstance(m, nn.Linear)], data,
                                   progress=False).sequential


def test_mean_over_runs(bench, tmp_path):
    rows = lambda a, b: [{"model": "mlp", "sparsity": 0.9, "method": "m", "test": a, "val": b}]  # noqa: E731
    paths = []
    for i, (a, b) in enumerate([(0.5, 0.25), (0.7, 0.75)]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps({"rows": rows(a, b)}))
        paths.append(str(p))
    assert bench.main(["--mean", *paths, "--out", str(tmp_path / "m")]) == 0
    line = [ln for ln in (tmp_path / "m.md").read_text().splitlines() if ln.startswith("| mlp")][0]
    assert "0.6000 (0.1414)" in line and "0.5000 (0.3536)" in line and "0.5000 … 0.7000" in line
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": [{"model": "cnn", "sparsity": 0.9, "method": "m", "test": 1, "val": 1}]}))
    with pytest.raises(SystemExit, match="other rows"):
        bench.main(["--mean", paths[0], str(other), "--out", str(tmp_path / "m2")])


class _PositionTokenizer:
    """One token per character; the text's characters encode their own position, so a window's first token
    says where it starts."""

    def __call__(self, text, return_tensors="pt"):
        import types
        return types.SimpleNamespace(input_ids=torch.tensor([[ord(c) - 0x4E00 for c in text]]))


def test_llm_allocation_selection_windows_never_overlap_a_calibration_window():
    from obs_plugins.experiment import text_windows
    bench = load_bench("llm_allocation.py")
    tok, seq, chars = _PositionTokenizer(), 8, 96          # WINDOW_CHARS = 12 characters a token
    text = "".join(chr(0x4E00 + i) for i in range(19_000))
    calib_text = {"a": text, "b": text[:9_000], "c": text[:12_000]}
    overlapped = 0
    for draw in range(12):
        sel = bench.selection_windows(tok, calib_text, 7, 10, draw, seq_len=seq)
        assert sel.shape == (7, seq)
        # the selection is spread over the sources as the calibration set is: 3 + 2 + 2 windows, a, b, c
        for rows, (src, n_cal) in zip((sel[:3], sel[3:5], sel[5:]), (("a", 4), ("b", 3), ("c", 3))):
            cal = text_windows(tok, calib_text[src], n_cal, seq, draw=draw)[:, 0].tolist()
            starts = rows[:, 0].tolist()
            assert all(abs(s - u) >= chars for s in starts for u in cal), (draw, src, starts, cal)
            assert rows[:, -1].tolist() == [s + seq - 1 for s in starts]   # whole windows of the text
            overlapped += sum(1 for s in text_windows(tok, calib_text[src], len(rows) + 2, seq,
                                                      draw=bench.SELECT_DRAW)[:, 0].tolist()
                              if any(abs(s - u) < chars for u in cal))
    assert overlapped > 0        # some draws do meet a candidate, so the check above is exercised


def test_llm_allocation_summary_ratios_and_geometric_means(tmp_path):
    bench = load_bench("llm_allocation.py")
    def run(draw, uni, glo):
        rows = [{"allocation": "-", "ppl": {"select": 1.0, "austen": 1.0}}]
        rows += [{"sparsity": 0.7, "allocation": a, "ppl": {"select": s, "austen": t}, "prune_seconds": 1.0}
                 for a, (s, t) in (("uniform", uni), ("global", glo))]
        return {"rows": rows, "setup": {"calib": "32x256 tokens" + (f" (draw {draw})" if draw else "")}}
    paths = []
    for k, (u, g) in enumerate([((100.0, 200.0), (90.0, 220.0)), ((100.0, 200.0), (40.0, 180.0))]):
        p = tmp_path / f"r{k}.json"
        p.write_text(json.dumps(run(k, u, g)))
        paths.append(str(p))
    md = bench.summary(paths, str(tmp_path / "s"))
    assert "| draw 1 | 0.7 | global | 40.00 (0.400) | 180.00 (0.900) | 1 |" in md
    # select: sqrt(0.9 * 0.4) = 0.6, lower in both; austen: sqrt(1.1 * 0.9) = 0.995, lower in one
    assert "| 0.7 | global | 0.600, 2 of 2 | 0.995, 1 of 2 |" in md
    assert (tmp_path / "s.md").read_text() == md


def test_llm_allocation_summary_compares_best_t_with_uniforms_best_t(tmp_path):
    bench = load_bench("llm_allocation.py")
    rows = [{"allocation": "-", "ppl": {"select": 1.0}}]
    for alloc, t1, best, it in (("uniform", 100.0, 80.0, 2), ("global", 90.0, 60.0, 1)):
        rows.append({"sparsity": 0.5, "allocation": alloc, "stage": "T=1", "ppl": {"select": t1},
                     "prune_seconds": 1.0})
        rows.append({"sparsity": 0.5, "allocation": alloc, "stage": "best T<=2", "ppl": {"select": best},
                     "prune_seconds": 2.0, "best_iteration": it})
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"rows": rows, "setup": {"calib": "32x256 tokens (draw 3)"}}))
    md = bench.summary([str(p)])
    assert "| draw 3 | 0.5 | global | 90.00 (0.900) | 1 |" in md                        # over uniform's T=1
    assert "| draw 3 | 0.5 | global, best T<=2 (T=1) | 60.00 (0.750) | 2 |" in md       # over uniform's best T
    assert "| 0.5 | global | 0.900, 1 of 1 |" in md and "| 0.5 | global, best T<=2 | 0.750, 1 of 1 |" in md
    assert "| 0.5 | uniform, best T<=2 |" not in md
