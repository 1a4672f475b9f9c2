"""Time the greedy structured-OBS removal order (``greedy_removal``) on one FFN-sized layer, now and at an earlier
revision of ``obs_plugins/methods/obs_iht/structured.py``, on the same random inputs.

    python benchmarks/greedy_speed.py --against 7eaab89 --out benchmarks/results/greedy_speed

A 384 x 1536 weight (MiniLM's FFN output projection: 1536 channels, one column each), a Gram from 4000 Gaussian
samples, random positive row weights (seed 0).  The earlier revision's file is read with ``git show`` and loaded
as a module (its package-relative imports pointed at the installed package).  Reports each side's wall time,
whether the removal orders are identical and the largest relative difference of the increments.
"""
from __future__ import annotations

import argparse
import subprocess
import types
from pathlib import Path

import torch

from _common import Stopwatch, add_threads_argument, command_line, set_threads, write_results

ROOT = Path(__file__).resolve().parents[1]
MODULE = "obs_plugins/methods/obs_iht/structured.py"


def module_at(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    src = src.replace("from ...", "from obs_plugins.")
    mod = types.ModuleType(f"structured_at_{rev}")
    exec(compile(src, f"{rev}:{MODULE}", "exec"), mod.__dict__)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", default=None, help="a git revision to time as well (e.g. 7eaab89)")
    ap.add_argument("--rows", type=int, default=384)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "greedy_speed"))
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    from obs_plugins.methods.obs_iht import structured as now
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.width, 4000, generator=g)
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(args.rows, args.width, generator=g)
    s = torch.rand(args.rows, generator=g)
    layers = [(W, H, [[c] for c in range(args.width)], s)]
    sides = [("this revision", now)] + ([(args.against, module_at(args.against))] if args.against else [])
    res = {}
    for name, mod in sides:
        with Stopwatch() as sw:
            order, inc = mod.greedy_removal(layers, args.width)
        res[name] = {"seconds": sw.seconds, "order": order, "inc": inc}
    lines = [f"# greedy_removal on a {args.rows} x {args.width} layer ({args.threads} thread(s))", "",
             f"`{command_line()}`", "", "| revision | seconds |", "|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} |" for k, v in res.items()]
    data = {"command": command_line(), "seconds": {k: v["seconds"] for k, v in res.items()}}
    if args.against:
        a, b = res["this revision"], res[args.against]
        same = a["order"] == b["order"]
        rel = float(((a["inc"] - b["inc"]).abs() / b["inc"].abs().clamp(min=1e-300)).max())
        lines += ["", f"Same removal order: {same}; largest relative difference of the increments: {rel:.1e}; "
                  f"speed-up {b['seconds'] / a['seconds']:.1f}x."]
        data.update(same_order=same, max_rel_increment_diff=rel)
    write_results(args.out, lines, data)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
