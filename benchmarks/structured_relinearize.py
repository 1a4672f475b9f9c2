"""How many re-linearised rounds for ``OBSImportance(scope="network")``?  The choice, on the CNN's validation splits.

The network-scope ranking removes channels greedily under a second-order model of the network loss in
channel-gate coordinates.  Taken once at the dense model (``relinearize=1``) the model is exact only for the
first removals; split into ``K`` rounds, each round removes its share of the channels under the model taken again
at the gates already removed (the Gauss-Newton matrix there, and the gradient of the KL divergence from the dense
predictions).  This script runs the library's functions (``obs_plugins.curvature.gates.gate_quadratic``,
``obs_plugins.methods.obs_iht.structured.relinearized_gate_removal``) on the per-layer CNN protocol (every layer
loses the ratio of its channels, removal only; the counts Torch-Pruning uses), for each ``K``, and reports the
accuracy on each seed's 5,000-image **validation** split (the selection) and on the test set.  The same cached
CNNs, seeds and 1,024 calibration images as ``benchmarks/structured.py``.  Writes
``benchmarks/results/structured_relinearize.{md,json,png}`` (``--out``).

    OMP_NUM_THREADS=2 python benchmarks/structured_relinearize.py
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import structured as S  # noqa: E402
from structured_oracle import WIDTHS, accuracy, counts, load_seed  # noqa: E402

from obs_plugins.curvature.gates import gate_quadratic  # noqa: E402
from obs_plugins.methods.obs_iht.structured import relinearized_gate_removal  # noqa: E402


def sites_of(m):
    """One gate per conv1 / conv2 / fc1 channel, where its consumer (conv2 / fc1 / fc2) reads it."""
    return {m.conv2: torch.arange(16), m.fc1: 16 + torch.arange(32).repeat_interleave(49),
            m.fc2: 48 + torch.arange(128)}


def removal(m, X, ratio, stages, bs=256):
    sites, n = sites_of(m), sum(WIDTHS)
    batches = [(X[i:i + bs],) for i in range(0, len(X), bs)]
    take = lambda at=None, reference=None: gate_quadratic(m, sites, batches, n_gates=n, at=at,  # noqa: E731
                                                          reference=reference)
    k = counts(ratio)
    groups = torch.cat([torch.full((w,), i) for i, w in enumerate(WIDTHS)])
    order, _ = relinearized_gate_removal(take, n, sum(k), groups=groups, caps=torch.tensor(k), stages=stages)
    gates = torch.ones(n)
    gates[torch.tensor(order[:sum(k)])] = 0
    return list(gates.split(WIDTHS))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--calib", type=int, default=1024,
                    help="calibration images (the first of structured.py's 1,024): fewer rows than the 176 units "
                         "leave the gate model rank-deficient")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "obs_plugins"))
    ap.add_argument("--out", default=str(S.RESULTS / "structured_relinearize"))
    args = ap.parse_args(argv)
    if any(k < 1 for k in args.stages):
        ap.error("--stages: positive integers")
    if not 1 <= args.calib <= 1024:
        ap.error("--calib: between 1 and 1024")
    rows = []
    for seed in args.seeds:
        m, train, val, test, idx = load_seed(ap, args.cache, seed)
        for p in m.parameters():
            p.requires_grad_(False)
        for K in args.stages:
            for ratio in (0.3, 0.5):
                t0 = time.perf_counter()
                gates = removal(m, train[0][idx[:args.calib]], ratio, K)
                rows.append({"seed": seed, "stages": K, "ratio": ratio, "val": accuracy(m, *val, gates),
                             "test": accuracy(m, *test, gates), "seconds": time.perf_counter() - t0})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1))
    lines = ["# Re-linearised rounds of the network-scope ranking (per-layer CNN, removal only)", "",
             f"`python benchmarks/structured_relinearize.py {' '.join(sys.argv[1:])}`; mean over seeds "
             + ", ".join(map(str, args.seeds)) + "; validation (the selection) / test.", "",
             "| rounds | 30% val | 30% test | 50% val | 50% test | mean val | seconds per prune |",
             "|---|---|---|---|---|---|---|"]
    for K in args.stages:
        cell = lambda r, key: sum(z[key] for z in rows if z["stages"] == K and z["ratio"] == r) / len(args.seeds)  # noqa: E731
        sec = sum(z["seconds"] for z in rows if z["stages"] == K) / (2 * len(args.seeds))
        lines.append(f"| {K} | {cell(0.3, 'val'):.4f} | {cell(0.3, 'test'):.4f} | {cell(0.5, 'val'):.4f} | "
                     f"{cell(0.5, 'test'):.4f} | {(cell(0.3, 'val') + cell(0.5, 'val')) / 2:.4f} | {sec:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, args, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(rows, args, path):
    """Mean validation / test accuracy against the number of rounds, one line per ratio and split."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ratio in enumerate((0.3, 0.5)):
        for key, style in (("val", "-o"), ("test", "--x")):
            ys = [sum(z[key] for z in rows if z["stages"] == K and z["ratio"] == ratio) / len(args.seeds)
                  for K in args.stages]
            ax.plot(args.stages, ys, style, color=f"C{i}", label=f"{ratio:.0%} {key}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.stages, [str(k) for k in args.stages])
    ax.minorticks_off()
    ax.set_xlabel("re-linearised rounds")
    ax.set_ylabel(f"mean accuracy, seeds {', '.join(map(str, args.seeds))}")
    ax.set_title(f"Network-scope ranking, per-layer CNN, {args.calib} calibration images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
