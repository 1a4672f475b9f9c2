"""Where an OBS-IHT step goes: the projected direction's share per tensor, and what the step does per held-out window.

SmolLM2-135M on the LLM protocol (mixed calibration, sequential T=1), one sparsity, T iterations; for every
iteration: the tensors holding the largest share of the projected direction ``PD = project(grad f H^-1)``, how far
each would move relative to its own norm under the global step, the share of ``||PD||^2`` in the top 0.1% of
entries; then the per-window loss of T=1 and of the best T on the held-out texts (perplexity is exp of their mean,
so one window can move it). Calibration data only choose the step; the held-out windows only report.

    python benchmarks/iht_direction.py --sparsity 0.5 --iterations 3 --no-layer-trust   # the default before
    python benchmarks/iht_direction.py --sparsity 0.5 --iterations 3                    # layer_trust (default)
"""
from __future__ import annotations

import argparse
import math

import torch

from _common import Stopwatch, add_threads_argument, command_line, set_threads, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", default="0.5")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--layer-trust", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/iht_direction_<...>)")
    add_threads_argument(ap, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    out = args.out or ("benchmarks/results/iht_direction_" + args.sparsity.replace(":", "of").replace(".", "")
                       + ("" if args.layer_trust else "_no_layer_trust"))

    from obs_plugins import api
    from obs_plugins.curvature import Curvature
    from obs_plugins.experiment import setup_smollm2, sparsity_args
    from obs_plugins.lm import causal_lm_loss
    from obs_plugins.methods.obs_iht import OBSIHTConfig, solve
    import obs_plugins.methods.obs_iht.solver as solver

    sw = Stopwatch()
    s = setup_smollm2(args.calib, args.eval)
    amount, nm = sparsity_args(args.sparsity)
    snap = api.snapshot(s.targets)
    curv = Curvature.layerwise(s.model, [(t.module, t.name) for t in s.targets], s.calib, loss_fn=causal_lm_loss,
                               progress=False)
    directions = []
    project = solver._project

    def recording_project(*a, **kw):  # keep each iteration's projected direction
        PD = project(*a, **kw)
        directions.append({k: v.clone() for k, v in PD.items()})
        return PD

    solver._project = recording_project
    try:
        p1 = api.prune(OBSIHTConfig(iterations=1, nm=nm, progress=False), curvature=curv, amount=amount)
        api.restore(s.targets, snap)
        p = solve(curv, None, OBSIHTConfig(iterations=args.iterations, nm=nm, layer_trust=args.layer_trust,
                                           progress=False), initial=p1)
    finally:
        solver._project = project
    W1 = {k: e.new_weight.float() for k, e in p1.entries.items()}
    wnorm = math.sqrt(sum(float((w ** 2).sum()) for w in W1.values()))
    iters = []
    for it, PD in enumerate(directions, start=2):
        dn2 = sum(float((v ** 2).sum()) for v in PD.values())
        flat = torch.cat([v.reshape(-1) for v in PD.values()]).abs()
        top = torch.topk(flat, max(1, flat.numel() // 1000)).values
        shares = sorted(((float(PD[k].norm()) / math.sqrt(dn2), k) for k in PD), reverse=True)[:5]
        iters.append({"iteration": it, "top_0.1pct_share_of_sq_norm": float((top ** 2).sum()) / dn2,
                      "largest": [{"tensor": k, "share_of_norm": sh,
                                   "relative_move_per_unit_step": sh * wnorm / float(W1[k].norm())}
                                  for sh, k in shares]})

    def window_losses(overrides, batches):
        return [curv.loss(overrides, [b]) for b in _single_windows(batches)]

    per_window = {}
    for name, batches in s.heldout.items():
        l1 = window_losses({k: e.new_weight for k, e in p1.entries.items()}, batches)
        lt = window_losses({k: e.new_weight for k, e in p.entries.items()}, batches)
        per_window[name] = {"T1": l1, "best": lt, "ppl_T1": math.exp(sum(l1) / len(l1)),
                            "ppl_best": math.exp(sum(lt) / len(lt))}
    best = p.report["best_iteration"]
    lines = [f"OBS-IHT direction, SmolLM2-135M, sparsity {args.sparsity}, T <= {args.iterations}, layer_trust="
             f"{args.layer_trust}; {s.info['calib']}; {s.info['heldout']}", "",
             f"Command: `{command_line()}`", "",
             "| iteration | top 0.1% of entries: share of ||PD||^2 | largest tensors: share of ||PD|| "
             "(relative move per unit step) | step | held-out calibration loss | tensors cut |",
             "|---|---|---|---|---|---|"]
    for d, h in zip(iters, p.report["history"][1:]):
        big = "; ".join(f"{x['tensor'].replace('model.layers.', 'L')} {x['share_of_norm']:.3f} "
                        f"({x['relative_move_per_unit_step']:.1f}x)" for x in d["largest"][:3])
        lines.append(f"| {d['iteration']} | {d['top_0.1pct_share_of_sq_norm']:.3f} | {big} | {h['step_size']:.4g} | "
                     f"{h['holdout_loss']:.4f} ({'accepted' if h['accepted'] else 'rejected'}) | "
                     f"{len(h.get('layers_clipped', []))} |")
    lines += ["", f"Best T = {best}. Per held-out window loss, T=1 -> best T (perplexity = exp(mean)):", ""]
    for name, r in per_window.items():
        worst = max(range(len(r["T1"])), key=lambda i: r["best"][i] - r["T1"][i])
        better = sum(b < a for a, b in zip(r["T1"], r["best"]))
        lines.append(f"- {name}: ppl {r['ppl_T1']:.2f} -> {r['ppl_best']:.2f}; {better} of {len(r['T1'])} windows "
                     f"lower; largest rise window {worst}: {r['T1'][worst]:.2f} -> {r['best'][worst]:.2f}")
    lines += ["", f"Wall time {sw.seconds:.0f} s."]
    write_results(out, "\n".join(lines) + "\n", {"command": command_line(), "iterations": iters,
                                                 "history": p.report["history"], "per_window": per_window,
                                                 "wall_s": sw.seconds})
    print("\n".join(lines))


def _single_windows(batches):
    """Each window of each batch as its own batch (the same keys, one row)."""
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            yield {k: v[i:i + 1] for k, v in b.items()}


if __name__ == "__main__":
    main()
