"""How the predicted pruning limit depends on the SLQ settings (Lanczos steps, probes, HVP samples).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/limit_slq.py     # a few minutes

Trains the benchmark's MLP (benchmarks/limit.py: 784-32-10, 2 epochs, plain) once, then runs
``obs_plugins.limit.estimate`` (no sweep) for each ``--configs`` entry ``steps x probes @ samples`` with the same
eps.  Writes benchmarks/results/limit_slq.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from limit import MEAN, MLP, STD, batches, train  # noqa: E402
from obs_plugins.data import load_fashion_mnist  # noqa: E402
from obs_plugins.limit import estimate  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+",
                    default=["32x4@4096", "64x4@4096", "128x1@4096", "128x4@4096", "256x4@4096", "128x4@1024",
                             "128x4@8192"])
    ap.add_argument("--hidden", type=int, nargs="+", default=[32])
    ap.add_argument("--l1", type=float, default=0.0)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "limit_slq"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    x, y = load_fashion_mnist("train")
    x = (x[:55000].float().div(255) - MEAN).div(STD).unsqueeze(1)
    y = y[:55000]
    torch.manual_seed(args.seed)
    model = train(MLP(tuple(args.hidden)), x, y, epochs=args.epochs, l1=args.l1, seed=args.seed, progress=False)
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + 1))
    data = batches(x[pick[:20 * 128]], y[pick[:20 * 128]], 128)  # as benchmarks/limit.py (--eps-batches 20)
    rows = []
    for c in args.configs:
        sp, n = c.split("@")
        steps, probes = (int(v) for v in sp.split("x"))
        hvp = batches(x[pick[:int(n)]], y[pick[:int(n)]], 512)
        t0 = time.perf_counter()
        rep = estimate(model, data, F.cross_entropy, hvp_data=hvp, steps=steps, probes=probes, seed=args.seed,
                       progress=False)
        nodes, w = torch.tensor(rep.nodes).abs(), torch.tensor(rep.weights)
        rows.append(dict(steps=steps, probes=probes, samples=int(n), predicted=rep.predicted,
                         mass_below_1e_2=float(w[nodes < 1e-2].sum()), mass_below_1e_3=float(w[nodes < 1e-3].sum()),
                         seconds=time.perf_counter() - t0, epsilon=rep.epsilon, D=rep.num_weights))
        print(rows[-1], flush=True)
    md = [f"# Predicted limit vs SLQ settings (MLP {'-'.join(map(str, (784, *args.hidden, 10)))}, "
          f"{'l1 ' + format(args.l1, 'g') if args.l1 else 'plain'}, D = {rows[0]['D']:,}, ε = {rows[0]['epsilon']:.4f})",
          "", f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/limit_slq.py {shlex.join(sys.argv[1:])}` "
          f"— {(time.perf_counter() - t_all) / 60:.1f} min, {args.threads} thread(s).", "",
          "| Lanczos steps | probes | HVP samples | predicted s* | spectrum mass, abs(λ) < 1e-2 | abs(λ) < 1e-3 | time (s) |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['steps']} | {r['probes']} | {r['samples']} | **{r['predicted']:.3f}** | {r['mass_below_1e_2']:.3f} | "
           f"{r['mass_below_1e_3']:.3f} | {r['seconds']:.0f} |" for r in rows]
    out = Path(args.out)
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
