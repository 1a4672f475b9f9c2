"""Are the OBS-IHT gradient passes slowed by subnormal floats?  (issue 18: the 50% iterations' gradient passes
were the slowest in every run, same model and windows.)

    python benchmarks/denormal.py [--sparsities 0,0.5,0.7] [--batches 2] [--reps 2] [--threads 1]

For each sparsity, SmolLM2-135M is pruned at T=1 (the sequential OBS sweep on ``--batches`` x 4 windows of the
benchmark's mixed calibration text; 0 = dense), then one ``Curvature.loss_and_grad`` over the same batches (the
iterations' gradient pass, fp32) is timed alternately with ``torch.set_flush_denormal`` off and on (``--reps``
each, median).  Flushing subnormals to zero changes the gradient only where values are below ~1.2e-38; the
script reports the relative difference of the two gradients and the share of subnormal entries in the gradient.
The flag is restored after every timing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import Stopwatch, add_threads_argument, command_line, set_threads, write_results


def subnormal_share(G: dict) -> float:
    tiny = torch.finfo(torch.float32).tiny
    n = sum(g.numel() for g in G.values())
    sub = sum(int(((g != 0) & (g.abs() < tiny)).sum()) for g in G.values())
    return sub / max(n, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0,0.5,0.7")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    add_threads_argument(ap)
    ap.add_argument("--out", default="benchmarks/results/denormal")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from obs_plugins import api
    from obs_plugins.curvature import Curvature
    from obs_plugins.experiment import setup_smollm2, sparsity_args
    from obs_plugins.lm import causal_lm_loss
    from obs_plugins.methods.obs_iht import OBSIHTConfig

    sw = Stopwatch()
    if not torch.set_flush_denormal(False):
        raise SystemExit("denormal: this CPU does not support flushing subnormals (torch.set_flush_denormal)")
    s = setup_smollm2(n_calib=4 * args.batches, n_eval=4)
    params = [(t.module, t.name) for t in s.targets]
    rows = []
    for sp in [x.strip() for x in args.sparsities.split(",") if x.strip()]:
        snap = api.snapshot(s.targets)
        # sequential calibration collects nothing up front: the same curvature prunes (T=1) and then runs the
        # gradient passes on the pruned model
        curv = Curvature.layerwise(s.model, params, s.calib, loss_fn=causal_lm_loss, progress=False)
        amount, nm = sparsity_args(sp)
        if amount:
            api.prune(OBSIHTConfig(iterations=1, nm=nm, progress=False), curvature=curv, amount=amount)
        times = {False: [], True: []}
        grads = {}
        old = False  # torch's default; torch offers no getter
        for _ in range(args.reps):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                try:
                    t0 = time.perf_counter()
                    loss, G = curv.loss_and_grad(None, list(s.calib))
                    times[flush].append(time.perf_counter() - t0)
                finally:
                    torch.set_flush_denormal(old)
                grads[flush] = (loss, {k: v.detach().clone() for k, v in G.items()})
        num = sum(float((grads[True][1][k] - grads[False][1][k]).norm() ** 2) for k in grads[False][1]) ** 0.5
        den = sum(float(v.norm() ** 2) for v in grads[False][1].values()) ** 0.5
        rows.append({"sparsity": sp, "seconds_off": statistics.median(times[False]),
                     "seconds_on": statistics.median(times[True]), "loss": grads[False][0],
                     "grad_rel_diff": num / den, "subnormal_share": subnormal_share(grads[False][1])})
        api.restore(s.targets, snap)
        print(rows[-1], flush=True)
    lines = [f"SmolLM2-135M gradient pass (fp32) over {args.batches} batches of 4x256 tokens at the T=1 weights of "
             f"each sparsity, {args.threads} thread(s); flush-denormal off / on, median of {args.reps}.", "",
             f"Command: `{command_line()}`", "",
             "| sparsity | loss | seconds, subnormals kept | seconds, flushed to zero | speed-up | subnormal share "
             "of the gradient | gradient rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']} | {r['loss']:.4f} | {r['seconds_off']:.2f} | {r['seconds_on']:.2f} | "
                     f"{r['seconds_off'] / r['seconds_on']:.2f}x | {r['subnormal_share']:.2e} | "
                     f"{r['grad_rel_diff']:.1e} |")
    lines += ["", f"Wall time {sw.seconds:.0f} s."]
    write_results(args.out, lines, {"rows": rows, "command": command_line(), "wall_s": sw.seconds})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
