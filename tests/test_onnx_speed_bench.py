"""benchmarks/onnx_speed.py: the FLOP limits count attention (torch's FlopCounterMode sees no FLOPs in
scaled_dot_product_attention on CPU), and counting leaves the model's attention setting as it was."""
from __future__ import annotations

import pytest
import torch

from tiny import load_bench

transformers = pytest.importorskip("transformers")


def _bert(attn):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, attn_implementation=attn)
    return transformers.BertModel(cfg).eval()


def test_flops_count_attention_as_the_eager_path_does():
    bench = load_bench("onnx_speed.py")
    ids = torch.randint(1, 50, (1, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sdpa, eager = _bert("sdpa"), _bert("eager")
    with_attn = bench.flops(sdpa, inputs)
    without = bench.flops(sdpa, inputs, attention=False)
    # per layer and head: QK^T and AV, each 2 * T * T * d_head multiply-adds
    assert with_attn - without == pytest.approx(2 * 4 * 2 * (2 * 16 * 16 * 8))
    assert with_attn == bench.flops(eager, inputs, attention=False)
    assert sdpa.config._attn_implementation == "sdpa"
