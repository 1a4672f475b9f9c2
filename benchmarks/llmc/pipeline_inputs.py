"""llm-compressor side of benchmarks/llmc_inputs.py (runs in benchmarks/.venv-llmc; imports nothing from obs_plugins).

For the decoder-block-0 Linears of the model in ``--dtype``: the Gram ``2 X X^T / n`` of each weight's input
(1) from a plain ``model(input_ids)`` forward and (2) from the inputs llm-compressor's SparseGPT itself accumulates
in ``oneshot`` (its sequential pipeline; ``accumulate_hessian`` wrapped to record them).  Saves both to ``--out``.
"""
from __future__ import annotations

import argparse
import re

import torch

BLOCK0 = re.compile(r"^model\.layers\.0\.(self_attn|mlp)\.\w+_proj$")


def gram(xs: list) -> torch.Tensor:
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
    return 2 * X.T @ X / X.shape[0]


def plain_grams(model, names: dict, ids: torch.Tensor) -> dict:
    """``{name: Gram}`` of the inputs of the modules ``names`` (module -> name) in plain forward passes, one
    window at a time.  (Also imported by benchmarks/llmc_inputs.py for our side.)"""
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda m, a, o: seen.setdefault(names[m], []).append(a[0].detach().clone()))
             for m in names]
    try:
        with torch.no_grad():
            for i in range(ids.shape[0]):
                model(input_ids=ids[i:i + 1])
    finally:
        for h in hooks:
            h.remove()
    return {k: gram(v) for k, v in seen.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--calib", required=True, help="windows (n, seq_len) saved with torch.save")
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    import llmcompressor.modifiers.pruning.sparsegpt.base as sgpt_base
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify

    dtype = getattr(torch, args.dtype)
    sgpt_sparsify.SGPT_PRECISION = dtype
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).eval()
    names = {m: n for n, m in model.named_modules() if BLOCK0.match(n)}
    ids = torch.load(args.calib)
    plain = plain_grams(model, names, ids)
    pipe: dict[str, list] = {}
    accumulate = sgpt_base.accumulate_hessian

    def recording(inp, module, H, n):
        if module in names:
            pipe.setdefault(names[module], []).append(inp.detach().clone())
        return accumulate(inp, module, H, n)

    sgpt_base.accumulate_hessian = recording
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=ds, recipe=[SparseGPTModifier(sparsity=0.5, targets=["LlamaDecoderLayer"])],
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], batch_size=1,
            shuffle_calibration_samples=False)
    torch.save({"plain": plain, "pipeline": {k: gram(v) for k, v in pipe.items()}}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
