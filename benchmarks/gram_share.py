"""T=1 on SmolLM2 with and without shared Gram products for layers fed the same input (issue 18: T=1 time).

    python benchmarks/gram_share.py [--calib 64] [--sparsity 0.5] [--reps 2] [--threads 1]
                                    [--out benchmarks/results/gram_share]

q/k/v of every decoder block see one input tensor, and so do gate/up: ``add_gram_hooks`` computes ``x x^T``
once for them and the others copy the accumulator.  "separate" swaps in the plain hooks (each layer its own
product, the code before) for the same sequential T=1 plan on the same calibration windows.  The two sides
alternate (``--reps`` times each) so that a drift in the machine's speed hits both.  Reports the wall time of
the whole T=1 prune (calibration + propagation + factor and sweep, as in ``benchmarks/vs_llmcompressor.py``),
its split, and whether the two plans are bit-identical (every mask and weight).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from _common import Stopwatch, add_threads_argument, command_line, set_threads, write_results


def separate_gram_hooks(targets, accs):
    """The plain hooks: every layer adds its own input rows (no sharing)."""
    from obs_plugins.curvature.collect import input_rows
    handles = []
    for t in targets:
        def hook(module, args, _out, _key=t.key):
            accs[_key].add(input_rows(module, args[0].detach()))
        handles.append(t.module.register_forward_hook(hook))
    return handles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/gram_share")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from obs_plugins import Curvature, OBSIHTConfig, api
    from obs_plugins.curvature import core
    from obs_plugins.experiment import setup_smollm2
    from obs_plugins.lm import causal_lm_loss

    setup = setup_smollm2(n_calib=args.calib, n_eval=1)
    shared_hooks = core.add_gram_hooks
    runs, plans = [], {}
    for rep in range(args.reps):
        for side, hooks in (("shared", shared_hooks), ("separate", separate_gram_hooks)):
            core.add_gram_hooks = hooks
            try:
                with Stopwatch() as sw:
                    curv = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets],
                                               setup.calib, loss_fn=causal_lm_loss, progress=False)
                    plan = api.plan(OBSIHTConfig(iterations=1, progress=False), curvature=curv,
                                    amount=args.sparsity)
            finally:
                core.add_gram_hooks = shared_hooks
            runs.append({"side": side, "rep": rep, "seconds": sw.seconds, **plan.report["seconds_T1"]})
            plans.setdefault(side, plan)
            print(runs[-1], flush=True)
    a, b = plans["shared"], plans["separate"]
    identical = all(torch.equal(a.entries[k].mask, b.entries[k].mask)
                    and torch.equal(a.entries[k].new_weight, b.entries[k].new_weight) for k in a.entries)
    med = {s: {f: statistics.median(r[f] for r in runs if r["side"] == s)
               for f in ("seconds", "calibration_and_propagation", "factor_and_sweep")} for s in plans}
    lines = [f"# T=1 with shared / separate Gram products (SmolLM2, {args.calib} windows, {args.sparsity:g}, "
             f"{args.threads} thread(s))", "", f"`{command_line()}`", "",
             "| Gram products | T=1 s (median) | calibration + propagation s | factor + sweep s | runs (s) |",
             "|---|---|---|---|---|"]
    for s in plans:
        each = ", ".join(f"{r['seconds']:.1f}" for r in runs if r["side"] == s)
        lines.append(f"| {s} | {med[s]['seconds']:.1f} | {med[s]['calibration_and_propagation']:.1f} | "
                     f"{med[s]['factor_and_sweep']:.1f} | {each} |")
    lines += ["", f"shared / separate (median T=1): {med['shared']['seconds'] / med['separate']['seconds']:.3f}; "
              f"plans bit-identical (every mask and weight): {identical}"]
    write_results(args.out, lines, {"command": command_line(), "runs": runs, "median": med,
                                    "identical": identical, "setup": setup.info})
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
