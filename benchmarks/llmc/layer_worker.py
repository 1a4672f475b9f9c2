"""llm-compressor side of benchmarks/llmc_layer.py: its SparseGPT solver on given layers, nothing else.

    benchmarks/.venv-llmc/bin/python benchmarks/llmc/layer_worker.py --layers layers.pt --sparsity 0.7 \\
        --out theirs_0.7.pt

``layers.pt`` holds ``{name: {"W": (rows, d) float32, "H": (d, d) float32}}`` (a layer's weight and input Gram,
collected by the driver).  Each weight is pruned by llm-compressor's own ``sparsify_weight`` (the function its
``SparseGPTModifier`` calls per layer, with the modifier's defaults: block size 128, dampening 0.01) on a bare
``nn.Linear`` holding it; the pruned weights are saved as ``{name: W}``.  Imports nothing from obs_plugins.
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", required=True)
    ap.add_argument("--sparsity", required=True, help="0.5, 0.7, ... or N:M such as 2:4")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    torch.set_num_threads(args.threads)
    if ":" in args.sparsity:
        n, m = (int(x) for x in args.sparsity.split(":"))
        sparsity, prune_n, prune_m = n / m, n, m
    else:
        sparsity, prune_n, prune_m = float(args.sparsity), 0, 0
    layers = torch.load(args.layers)
    out, secs = {}, {}
    for name, v in layers.items():
        W = v["W"].to(torch.float32)
        lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        t0 = time.perf_counter()
        _, Wp = sparsify_weight(lin, {lin: v["H"].to(torch.float32).clone()}, sparsity, prune_n, prune_m,
                                args.block_size, args.dampening, False)
        secs[name] = time.perf_counter() - t0
        out[name] = Wp.detach().clone()
    torch.save({"weights": out, "seconds": secs}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
