"""Choose the Continuous Sparsification settings for benchmarks/tickets.py on validation accuracy only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tickets_sweep.py --jobs 2      # seed 0, ~20 min on 2 cores

Runs, for one seed, the IMP chain and one CS search per ``ROUNDSxEPOCHS:LAMBDA`` setting, exactly as
benchmarks/tickets.py does (same model, data order, rewind point and ticket retraining), but evaluates tickets on
the validation split only: the test images are never loaded into the evaluation, so whatever is chosen here
cannot have been fitted to the test set.  A setting is eligible when every ticket costs fewer epochs than IMP's;
the line "Chosen" names the eligible setting whose worst validation difference to IMP (over the sparsities) is
largest; benchmarks/tickets.py's ``--cs-at`` defaults take, per sparsity, the eligible setting with the best
validation accuracy over the runs kept in benchmarks/results (tickets_sweep.md: all sparsities;
tickets_sweep_95.md: ``--targets 0.95`` with longer searches, ``--name tickets_sweep_95``).

Writes benchmarks/results/<--name>.{md,json} (default tickets_sweep).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tickets as T  # noqa: E402


def _job(kind, setting, args, targets):
    torch.set_num_threads(1)
    (xtr, ytr), ev = T.split(args)
    ev = {"val": ev["val"]}  # never the test split
    loader = T.Batches(xtr, ytr, args.batch_size, args.seed)
    torch.manual_seed(args.seed)
    init = T.LeNet5()
    if kind == "imp":
        dense = copy.deepcopy(init)
        rewind_state = T.train(dense, loader, args.epochs, args.lr, snapshot_at=args.rewind_step)
        args.dense_state = dense.state_dict()
        return T.run_imp(init, rewind_state, loader, ev, args, targets)
    tickets, history = T.run_cs(init, loader, ev, args, targets, *T.parse_setting(setting))
    return tickets


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", nargs="+",
                   default=["3x3:1e-8", "3x3:1e-6", "3x3:1e-5", "5x2:1e-5", "2x6:1e-5", "2x7:1e-5", "3x5:1e-5",
                            "3x5:3e-5"],
                   help="ROUNDSxEPOCHS:LAMBDA, one CS search each")
    p.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", type=Path, default=T.ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="tickets_sweep", help="output file stem under --out")
    args = p.parse_args(argv)
    for s in args.settings:
        T.parse_setting(s)
    # the settings benchmarks/tickets.py uses for everything but CS
    args.quick, args.val, args.epochs, args.lr, args.batch_size = False, 5000, 2, 1e-3, 128
    args.rewind_step, args.cs_beta, args.no_progress = 200, 200.0, True
    targets = sorted(args.targets)
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tickets_sweep.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    t0 = time.time()
    jobs = [("imp", None, args, targets)] + [("cs", s, args, targets) for s in args.settings]
    imp, *cs = T.parallel_map(_job, jobs, args.jobs)

    rows = ["| setting | " + " | ".join(f"val acc {t:.0%} (IMP: {imp[t]['val_accuracy']:.4f}, {imp[t]['epochs']} ep)"
                                         for t in targets) + " | epochs per ticket | natural sparsity | eligible |",
            "|---|" + "---:|" * (len(targets) + 3)]
    best, best_worst = None, -float("inf")
    for s, tk in zip(args.settings, cs):
        rounds, epochs, lam = T.parse_setting(s)
        ep = rounds * epochs + args.epochs
        eligible = all(ep < imp[t]["epochs"] for t in targets)
        worst = min(tk[t]["val_accuracy"] - imp[t]["val_accuracy"] for t in targets)
        if eligible and worst > best_worst:
            best, best_worst = s, worst
        cells = " | ".join(f"{tk[t]['val_accuracy']:.4f} ({tk[t]['val_accuracy'] - imp[t]['val_accuracy']:+.4f})"
                           for t in targets)
        rows.append(f"| {rounds} rounds x {epochs} epochs, λ={lam:g} | {cells} | {ep} | "
                    f"{tk[targets[0]]['natural_sparsity']:.3f} | {'yes' if eligible else 'no'} |")
    md = "\n".join([
        "# CS settings for the ticket benchmark, chosen on validation accuracy",
        "",
        f"Seed {args.seed}; LeNet-5 on Fashion-MNIST, 55000 training / 5000 validation images, everything else as in "
        "benchmarks/tickets.py.  Validation accuracy of each ticket (difference to IMP's ticket at the same "
        "sparsity); the test set is not evaluated.  Eligible: every ticket costs fewer epochs than IMP's.",
        "",
        *rows,
        "",
        (f"Chosen (eligible, largest worst-case validation difference {best_worst:+.4f}): **{best}**"
         if best else "No setting is eligible."),
        "",
        f"Command: `{command}`  ({(time.time() - t0) / 60:.1f} min)",
        "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(md)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "seed": args.seed, "chosen": best, "imp": {str(t): v for t, v in imp.items()},
         "cs": {s: {str(t): v for t, v in tk.items()} for s, tk in zip(args.settings, cs)}}, indent=2))
    print(md)


if __name__ == "__main__":
    main()
