"""The output-sensitivity pass of global allocation (sigma_i = mean squared loss gradient at each layer output) on
SmolLM2-135M: asked for the gradient w.r.t. the layer outputs (what it needs, the default now) against w.r.t. the
weights (what it asked before: autograd then also computes every weight gradient).  Both in one process,
alternating; the results must be bit-identical.

    python benchmarks/sigma_pass.py --calib 32 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_threads_argument, command_line, set_threads, write_results

from obs_plugins import Curvature
from obs_plugins.experiment import setup_smollm2
from obs_plugins.lm import causal_lm_loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    ap.add_argument("--out", default="benchmarks/results/sigma_pass")
    add_threads_argument(ap, default=1)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    s = setup_smollm2(n_calib=args.calib, n_eval=1)
    curv = Curvature.layerwise(s.model, [(t.module, t.name) for t in s.targets], s.calib, loss_fn=causal_lm_loss,
                               progress=False)
    real = torch.autograd.grad
    times: dict[str, list[float]] = {"outputs": [], "weights": []}
    first: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in ("outputs", "weights"):
            if variant == "weights":   # the earlier request: the same hooks, the gradient asked for the weights
                torch.autograd.grad = lambda loss, outs, **kw: real(loss, curv._grad_params(), **kw)
            t0 = time.perf_counter()
            try:
                sens = curv.output_sensitivity()
            finally:
                torch.autograd.grad = real
            times[variant].append(time.perf_counter() - t0)
            first.setdefault(variant, sens)
            print(variant, f"{times[variant][-1]:.1f} s", flush=True)
    same = all(torch.equal(first["outputs"][k], first["weights"][k]) for k in first["outputs"])
    med = {v: statistics.median(t) for v, t in times.items()}
    md = (f"SmolLM2-135M, {len(s.targets)} decoder Linear weights, {args.calib}x256 calibration tokens, "
          f"{args.threads} thread(s).\n\nCommand: `{command_line()}`\n\n"
          "| gradient asked for | seconds (each run) | median |\n|---|---|---|\n"
          + "".join(f"| layer {v} | {', '.join(f'{x:.1f}' for x in times[v])} | {med[v]:.1f} |\n" for v in times)
          + f"\nOutputs / weights: {med['outputs'] / med['weights']:.2f}; sigma bit-identical: {same}.\n")
    write_results(args.out, md, {"times": times, "median": med, "identical": same, "command": command_line()})
    print(md)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
