"""Does ONNX Runtime run the exporter's file faster without its intermediate shape annotations (value_info)?

The sparse-kernel rewrite (integrations/onnx/rewrite.py) drops ``graph.value_info``; on MiniLM that route measured faster
than its removed work allows.  This isolates the effect on the *dense* model: the same export with and without
value_info, timed interleaved (ORT CPU, 1 intra-op thread, median and IQR), outputs compared.

    python benchmarks/onnx_value_info.py                 # MiniLM, batch 1 and 8, 128 tokens
    python benchmarks/onnx_value_info.py --model smollm2 --batch-sizes 1
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import numpy as np
import torch

from obs_plugins.integrations import onnx as ox
from obs_plugins.timing import latency_stats

from _common import add_threads_argument, set_threads

warnings.filterwarnings("ignore")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=15)
    add_threads_argument(ap, help="ORT intra-op threads and torch threads (default 1)")
    args = ap.parse_args()
    set_threads(args.threads)
    from obs_plugins.data import load_minilm, load_smollm2
    model, tok = load_minilm() if args.model == "minilm" else load_smollm2()
    model.eval()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(tok.vocab_size, 20000), (2, args.seq_len), generator=g)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with tempfile.TemporaryDirectory() as d:
        paths = {"with value_info": ox.export(model, inp, os.path.join(d, "a.onnx"), sparse_kernel="off").path,
                 "value_info stripped": ox.export(model, inp, os.path.join(d, "b.onnx"), sparse_kernel="off",
                                                  strip_value_info=True).path}
        runners = {k: ox.OrtRunner(p, args.threads) for k, p in paths.items()}
        outs = [r.run(r.feeds(inp))[0] for r in runners.values()]
        print(f"{args.model}: max |difference| of the two files' outputs {np.abs(outs[0] - outs[1]).max():.2e}")
        print("| batch | file | median ms (IQR) | speedup |\n|---|---|---|---|")
        for b in args.batch_sizes:
            bi = ox.repeat_to_batch(inp, b)
            feeds = {k: r.feeds(bi) for k, r in runners.items()}
            t = ox.time_runners(runners, feeds, args.runs, 2)
            st = {k: latency_stats(v) for k, v in t.items()}
            base = st["with value_info"]["median_ms"]
            for k, s in st.items():
                print(f"| {b} | {k} | {s['median_ms']:.2f} ({s['q25_ms']:.2f}–{s['q75_ms']:.2f}) | "
                      f"{base / s['median_ms']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
