"""llm-compressor side of benchmarks/vs_llmcompressor.py.  Runs inside benchmarks/.venv-llmc (see setup_venv.sh)
and imports nothing from obs_plugins: the model folder and the token windows come from the driver.

    benchmarks/.venv-llmc/bin/python benchmarks/llmc/worker.py --model-dir benchmarks/.cache/smollm2-fp32 \\
        --calib calib.pt --eval heldout=heldout.pt --method sparsegpt --sparsity 0.5 --out sparsegpt_0.5.json

``--method dense`` prunes nothing (it checks that the model folder and the perplexity protocol match ours).
The pruned weights are the Linear layers of the decoder layers (q/k/v/o/gate/up/down of every layer); the
embeddings and lm_head are left as they are, and the worker checks both.  llm-compressor's ``oneshot`` runs with
its default settings for everything the flags do not set (recorded in the JSON under ``settings``).

Perplexity is computed exactly as ``obs_plugins.lm.perplexity``: batches of ``--batch-size`` windows, the model's
mean causal-LM loss with labels = input_ids per batch, weighted by the batch's number of input tokens, exp of
the weighted mean.  The llm-compressor import stays inside ``main()`` so tests can import ``perplexity``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import sys
import time

import torch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(PROJ) + r")$")


def windows_sha256(windows: torch.Tensor) -> str:
    """Fingerprint of token windows (their int64 values and shape), independent of how the file was saved."""
    w = windows.to(torch.int64).contiguous()
    return hashlib.sha256(str(tuple(w.shape)).encode() + w.numpy().tobytes()).hexdigest()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the token-weighted mean of the per-batch causal-LM loss (labels = input_ids)."""
    if windows.dim() != 2:
        raise ValueError(f"windows: expected (n, seq_len), got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i:i + batch_size].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            w = ids.numel()
            tot, n = tot + float(loss) * w, n + w
    finally:
        model.train(was)
    return math.exp(tot / max(n, 1))


def decoder_linears(model) -> dict:
    """``{name: nn.Linear}`` of the q/k/v/o/gate/up/down projections of every decoder layer."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _LAYER_LINEAR.match(n)}


def measured_sparsity(modules: dict) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in modules.values())
    return zeros / sum(m.weight.numel() for m in modules.values())


def _parse_sparsity(spec: str) -> tuple[float, str]:
    """'0.5' -> (0.5, '0:0') (unstructured); '2:4' -> (0.5, '2:4')."""
    if ":" in spec:
        n, m = (int(x) for x in spec.split(":"))
        if not 0 < n < m:
            raise ValueError(f"--sparsity: bad N:M pattern {spec!r}")
        return 1 - n / m, spec
    s = float(spec)
    if not 0 < s < 1:
        raise ValueError(f"--sparsity: must be in (0, 1) or N:M, got {spec!r}")
    return s, "0:0"


def _modifier(method: str, sparsity: float, mask_structure: str):
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier as cls
    elif method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier as cls
    else:
        raise ValueError(f"--method: unknown {method!r}")
    # targets = the modules whose Linear children are pruned: the decoder layers, so exactly q/k/v/o/gate/up/down
    # of every layer; lm_head and the embeddings lie outside them (main() checks that they did not change).
    # Everything else (block_size, dampening_frac, the calibration pipeline) is llm-compressor's default.
    return cls(sparsity=sparsity, mask_structure=mask_structure, targets=["LlamaDecoderLayer"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="a local Hugging Face model folder (config + safetensors)")
    ap.add_argument("--calib", help="calibration windows: a LongTensor (n, seq_len) saved with torch.save")
    ap.add_argument("--eval", action="append", default=[], metavar="NAME=FILE.pt",
                    help="evaluation windows (repeatable)")
    ap.add_argument("--method", required=True, choices=("sparsegpt", "wanda", "dense"))
    ap.add_argument("--sparsity", default="0.5", help="0.5, 0.7, ... or N:M such as 2:4")
    ap.add_argument("--batch-size", type=int, default=4, help="perplexity batch size (ours is 4)")
    ap.add_argument("--calib-batch-size", type=int, default=1, help="oneshot's calibration batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where the model is pruned and evaluated")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                    help="model and SparseGPT precision; float64 (a diagnostic: how far apart are the two solvers "
                         "without fp32 rounding?) loads the model in float64 and sets llm-compressor's "
                         "SGPT_PRECISION, the one dtype its Hessians and sparsify_weight use, to float64")
    ap.add_argument("--out", required=True)
    ap.add_argument("--save-weights", default=None, help="also torch.save the pruned decoder Linear weights here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device: {args.device} asked for, but this venv's torch {torch.__version__} sees no CUDA device "
                 "(setup_venv.sh installs the CPU wheel: rebuild it with a CUDA wheel, e.g. "
                 "TORCH_INDEX=https://download.pytorch.org/whl/cu126 and LLMC_VENV set to a new folder)")
    evals = {}
    for spec in args.eval:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            ap.error(f"--eval: expected NAME=FILE.pt, got {spec!r}")
        evals[name] = torch.load(path)
    if args.method != "dense" and not args.calib:
        ap.error("--calib is required to prune")
    sparsity, mask_structure = _parse_sparsity(args.sparsity) if args.method != "dense" else (0.0, "0:0")

    from importlib.metadata import version

    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(args.device)
    model.eval()
    load_s = time.perf_counter() - t0
    lin = decoder_linears(model)
    keep = {n: p.detach().clone() for n, p in model.named_parameters() if not any(n.startswith(k) for k in lin)}
    out = {"method": args.method, "sparsity": args.sparsity if args.method != "dense" else "0", "n_weights": len(lin), "load_seconds": load_s,
           "versions": {p: version(p) for p in ("torch", "transformers")}, "threads": args.threads, "device": args.device, "dtype": args.dtype,
           "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} torch threads"}
    if args.method != "dense":
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
        sgpt_sparsify.SGPT_PRECISION = dtype  # read at call time by make_empty_hessian / sparsify_weight
        # its sequential pipeline onloads every layer to get_main_device() (cuda:0 whenever CUDA exists), not to
        # where the model is: pin it to --device so both sides compute where the driver says
        from llmcompressor.pipelines.sequential import pipeline as _seq_pipeline
        _seq_pipeline.get_main_device = lambda: torch.device(args.device)
        out["versions"].update({p: version(p) for p in ("llmcompressor", "compressed-tensors")})
        calib = torch.load(args.calib)
        if calib.dim() != 2:
            raise ValueError(f"--calib: expected (n, seq_len), got {tuple(calib.shape)}")
        n, seq_len = calib.shape
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        modifier = _modifier(args.method, sparsity, mask_structure)
        lifecycle = {"requires_calibration_data", "index", "group", "start", "end", "update"}
        out["settings"] = {k: v for k, v in modifier.model_dump().items() if not k.endswith("_")
                           and k not in lifecycle and isinstance(v, (int, float, str, bool, list, type(None)))}
        out["settings"]["oneshot"] = {"pipeline": "independent (default: sequential for these modifiers)",
                                      "batch_size": args.calib_batch_size, "shuffle_calibration_samples": False}
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=n, max_seq_length=seq_len,
                batch_size=args.calib_batch_size, shuffle_calibration_samples=False)
        out["prune_seconds"] = time.perf_counter() - t0  # oneshot only (calibration passes + pruning)
        out["calib"] = {"n": n, "seq_len": seq_len, "batch_size": args.calib_batch_size,
                        "sha256": windows_sha256(calib)}   # lets a reusing driver check the windows
        del llmcompressor
    else:
        out["prune_seconds"] = 0.0
    lin = decoder_linears(model)
    out["measured_sparsity"] = measured_sparsity(lin)
    out["per_weight_sparsity"] = {"min": min(float((m.weight == 0).float().mean()) for m in lin.values()),
                                  "max": max(float((m.weight == 0).float().mean()) for m in lin.values())}
    changed = [n for n, p in model.named_parameters() if n in keep and not torch.equal(p.detach(), keep[n])]
    out["untouched_changed"] = changed  # embeddings, norms, lm_head: must stay empty
    out["transformers_version"] = transformers.__version__
    if args.save_weights:  # for layer-by-layer comparisons with ours
        torch.save({n: m.weight.detach().clone() for n, m in lin.items()}, args.save_weights)
    out["ppl"] = {}
    for name, w in evals.items():
        t0 = time.perf_counter()
        out["ppl"][name] = perplexity(model, w, args.batch_size)
        out.setdefault("eval_seconds", {})[name] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps({k: out[k] for k in ("method", "sparsity", "measured_sparsity", "ppl", "prune_seconds")}))
    if changed:
        print(f"worker: parameters outside the decoder Linear weights changed: {changed[:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
