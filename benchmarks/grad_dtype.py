"""The iterations' gradient pass in fp32 and in bf16 autocast on SmolLM2 (issue 18; ``OBSIHTConfig.grad_dtype``).

    python benchmarks/grad_dtype.py [--batches 2] [--reps 2] [--threads 1] [--out benchmarks/results/grad_dtype]

One ``Curvature.loss_and_grad`` over ``--batches`` calibration batches (4 x 256 tokens each, the benchmark's mixed
calibration windows) at the dense weights, timed alternately in fp32 and under ``torch.autocast(bfloat16)``
(``--reps`` times each, the median reported), then the two gradients compared: cosine over all 210 tensors,
relative norm of the difference, the loss in each.  Says whether this device runs bf16 natively (what
``grad_dtype="auto"`` follows).
"""
from __future__ import annotations

import argparse
import statistics

import torch
from _common import Stopwatch, add_threads_argument, command_line, set_threads, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    add_threads_argument(ap)
    ap.add_argument("--out", default="benchmarks/results/grad_dtype")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from obs_plugins.curvature import Curvature
    from obs_plugins.experiment import setup_smollm2
    from obs_plugins.lm import causal_lm_loss
    from obs_plugins.methods.obs_iht.solver import native_bf16

    s = setup_smollm2(n_calib=4 * args.batches, n_eval=4)
    curv = Curvature.layerwise(s.model, [(t.module, t.name) for t in s.targets], s.calib[:1],
                               loss_fn=causal_lm_loss, progress=False)
    batches = list(s.calib)
    times = {"float32": [], "bfloat16": []}
    res = {}
    for _ in range(args.reps):
        for name, dt in (("float32", None), ("bfloat16", torch.bfloat16)):
            with Stopwatch() as sw:
                res[name] = curv.loss_and_grad(None, batches, compute_dtype=dt)
            times[name].append(sw.seconds)
    (l32, g32), (l16, g16) = res["float32"], res["bfloat16"]
    a, b = curv.flatten(g32).double(), curv.flatten(g16).double()
    out = {"batches": args.batches, "threads": args.threads, "native_bf16": native_bf16(torch.device("cpu")),
           "seconds": {k: statistics.median(v) for k, v in times.items()}, "all_seconds": times,
           "cosine": float(a @ b / (a.norm() * b.norm())), "rel_diff": float((a - b).norm() / a.norm()),
           "loss": {"float32": l32, "bfloat16": l16}, "command": command_line()}
    out["speedup"] = out["seconds"]["float32"] / out["seconds"]["bfloat16"]
    lines = [f"SmolLM2-135M gradient pass over {args.batches} batches of 4x256 tokens, {args.threads} thread(s), "
             f"native bf16 on this CPU: {out['native_bf16']}",
             "", "| dtype | seconds (median of %d) | loss |" % args.reps, "|---|---|---|",
             f"| float32 | {out['seconds']['float32']:.2f} | {l32:.4f} |",
             f"| bfloat16 (autocast) | {out['seconds']['bfloat16']:.2f} | {l16:.4f} |", "",
             f"speed-up {out['speedup']:.2f}x; gradient cosine {out['cosine']:.5f}, relative difference "
             f"{out['rel_diff']:.4f}"]
    write_results(args.out, lines, out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
