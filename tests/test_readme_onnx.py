"""The README's ONNX section runs as written (on a tiny pruned MLP standing in for its ``model``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

README = Path(__file__).resolve().parents[1] / "README.md"


def _onnx_snippet() -> str:
    section = README.read_text().split("## ONNX export", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_onnx_snippet_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    dense_model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    model.load_state_dict(dense_model.state_dict())
    for m in (model[0], model[2]):
        prune.l1_unstructured(m, "weight", amount=0.9)
    code = _onnx_snippet()
    assert "ox.export(" in code and "ox.verify(" in code and "ox.plot(" in code
    monkeypatch.chdir(tmp_path)
    ns = {"model": model, "example_inputs": torch.randn(2, 32), "inputs": torch.randn(3, 32),
          "dense_model": dense_model}
    exec(compile(code, str(README), "exec"), ns)
    rep = ns["rep"]
    assert rep.ok and set(rep.latency) == {1, 32} and set(rep.latency[1]) == {"dense", "pruned", "sparse-kernel"}
    for f in ("out/model.onnx", "out/model.sparse.onnx", "out/report.md", "out/report.json", "out/latency.png"):
        assert (tmp_path / f).stat().st_size > 0, f


def test_every_readme_python_block_is_valid_python():
    """A user copies these: one (the curvature engine's ``curv.hvp({key: v, ...})``) did not even parse."""
    import ast
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == README.read_text().count("```python\n")
    for i, code in enumerate(blocks):
        try:
            ast.parse(code)
        except SyntaxError as e:
            pytest.fail(f"README python block {i} does not parse: {e}\n{code}")
