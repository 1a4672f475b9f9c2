"""Where do the two sides' inputs first differ?  Block 0's input Grams, ours vs llm-compressor's (issue 23).

    python benchmarks/llmc_inputs.py --calib 4 --dtype float64

Both sides see the same dense model at decoder block 0, so every block-0 Gram ``2 X X^T / n`` should agree up to
rounding.  This script compares, for each of the seven block-0 Linears: our ``Curvature.layerwise`` Gram (the one
our T=1 solves with), the Gram of a plain ``model(input_ids)`` forward in our venv, the same plain forward in
llm-compressor's venv (its transformers version), and the Gram of the inputs llm-compressor's SparseGPT accumulates
in its own sequential pipeline (``benchmarks/llmc/pipeline_inputs.py``).  In float64 the first three agree
to rounding; a larger gap shows a path computed at lower precision.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from _common import Stopwatch, command_line, write_results
from llmc.pipeline_inputs import plain_grams
from vs_llmcompressor import CACHE, ROOT, VENV_PY, ensure_venv, save_model, save_windows
from obs_plugins.curvature import Curvature
from obs_plugins.experiment import setup_smollm2
from obs_plugins.lm import causal_lm_batches

WORKER = ROOT / "llmc" / "pipeline_inputs.py"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=4, help="calibration windows (the first of vs_llmcompressor's)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = args.out or f"benchmarks/results/llmc_inputs_{args.dtype}"
    torch.set_num_threads(args.threads)
    sw = Stopwatch()
    ensure_venv()
    setup = setup_smollm2(n_calib=args.calib, n_eval=1, seq_len=args.seq_len)
    model_dir = save_model(setup.model, setup.tokenizer, CACHE / "smollm2-fp32")
    work = CACHE / f"llmc-inputs-c{args.calib}-s{args.seq_len}"
    calib_pt = save_windows(setup.calib, work / "calib.pt")
    theirs_pt = work / f"grams_{args.dtype}.pt"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(VENV_PY), str(WORKER), "--model-dir", str(model_dir), "--calib", str(calib_pt),
                           "--dtype", args.dtype, "--out", str(theirs_pt)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stdout + proc.stderr)[-3000:])
    theirs = torch.load(theirs_pt)
    dtype = getattr(torch, args.dtype)
    model = setup.model.to(dtype)
    names = {m: n for n, m in model.named_modules()}
    block0 = [(m, "weight") for m in names if names[m] in theirs["plain"]]
    ids = torch.load(calib_pt)
    plain = plain_grams(model, {m: names[m] for m, _ in block0}, ids)
    curv = Curvature.layerwise(model, block0, causal_lm_batches(ids, batch_size=4), dtype=dtype, progress=False)
    ours = {names[t.module]: curv.hessians[t.key] for t in curv.targets}
    rows, data = [], {}
    for n in sorted(theirs["plain"], key=lambda n: ("q_proj k_proj v_proj o_proj gate_proj up_proj down_proj"
                                                   .split().index(n.split(".")[-1]))):
        ref = plain[n]
        d = {"ours_curvature_vs_plain": rel(ours[n], ref), "plain_their_venv_vs_ours": rel(theirs["plain"][n], ref),
             "their_pipeline_vs_plain": rel(theirs["pipeline"][n], ref)}
        data[n] = d
        rows.append(f"| {n.split('.')[-1]} | {d['ours_curvature_vs_plain']:.1e} | {d['plain_their_venv_vs_ours']:.1e}"
                    f" | {d['their_pipeline_vs_plain']:.1e} |")
    lines = [f"Block-0 input Grams of SmolLM2-135M in {args.dtype}, {args.calib}x{args.seq_len} calibration tokens "
             "(the first windows of vs_llmcompressor.py); relative Frobenius difference to the Gram of a plain "
             "forward pass in our venv.", "", f"Command: `{command_line()}`", "",
             "| weight | our Curvature Gram | plain forward, llm-compressor's venv | llm-compressor's SparseGPT "
             "pipeline |", "|---|---|---|---|", *rows, "", f"Wall time {sw.seconds:.0f} s."]
    write_results(out, lines, {"per_weight": data, "dtype": args.dtype, "calib": args.calib,
                               "command": command_line(), "wall_s": sw.seconds})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
