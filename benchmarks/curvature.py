"""Curvature-engine costs on SmolLM2-135M: layerwise Gram collection time / peak memory, Fisher memory.

* Layerwise H = 2·XXᵀ/n of all 210 decoder Linear weights over ``--calib`` windows of ``--seq-len`` tokens
  (default 64×256), one pass over the model: wall time and the peak memory added by the collection (CPU: peak RSS above the loaded model, reset through
  /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated).
* Empirical Fisher: bytes a block-diagonal Fisher (blocks + inverses) of the whole pruned set would need for
  block sizes 32/128/512, and the matrix-free Woodbury form for m samples; plus a measured collection for
  one layer (``model.layers.0.self_attn.q_proj``) at each block size (time, stored bytes, samples/s).

Runs on CUDA unchanged when a GPU is present (``--device cuda``).  Writes benchmarks/results/curvature.{md,json}.

    python benchmarks/curvature.py                      # full run
    python benchmarks/curvature.py --calib 8 --quick    # quick look
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from obs_plugins import Curvature
from obs_plugins.curvature.fisher import fisher_bytes
from obs_plugins.experiment import setup_smollm2
from obs_plugins.lm import causal_lm_loss

from _common import Stopwatch, add_threads_argument, command_line, set_threads, write_results


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory (MiB) added by the code inside the ``with`` block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.added_mb = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.ok = _rss_peak_reset()
            self.base = _status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.added_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        elif self.ok:
            self.added_mb = _status_mb("VmHWM") - self.base
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--fisher-samples", type=int, default=16, help="samples (windows) for the measured Fisher")
    ap.add_argument("--block-sizes", default="32,128,512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_argument(ap, default=2, help="torch threads (default 2, as in the recorded results)")
    ap.add_argument("--quick", action="store_true", help="skip the measured Fisher collection")
    ap.add_argument("--out", default="benchmarks/results/curvature")
    args = ap.parse_args()
    set_threads(args.threads)
    dev = torch.device(args.device)
    setup = setup_smollm2(n_calib=args.calib, n_eval=1, seq_len=args.seq_len, batch_size=args.batch_size)
    model = setup.model.to(dev)
    params = [(t.module, t.name) for t in setup.targets]
    numel = sum(t.current().numel() for t in setup.targets)
    results = {"device": str(dev), "threads": args.threads, "targets": len(params), "numel": numel,
               "tokens": args.calib * args.seq_len, "layerwise": [], "fisher_formula": [], "fisher_measured": []}

    # one pass only: a sequential curvature collects its Grams inside each plan, block by block (its cost is
    # in the plans' prune times: benchmarks/one_shot_llm.py, benchmarks/peak_memory.py)
    with PeakMemory(dev) as pm, Stopwatch() as sw:
        curv = Curvature.layerwise(model, params, setup.calib, sequential=False, progress=True)
    secs = sw.seconds
    h_mb = sum(h.numel() * h.element_size() for h in curv.hessians.values()) / 2**20
    results["layerwise"].append({"mode": "plain", "seconds": secs, "peak_added_mb": pm.added_mb,
                                 "stored_h_mb": h_mb, "tokens_per_s": args.calib * args.seq_len / secs})
    del curv

    samples = args.calib
    for B in [int(b) for b in args.block_sizes.split(",")]:
        blocks = sum(fisher_bytes(t.current().numel(), B) for t in setup.targets)
        wood = sum(fisher_bytes(t.current().numel(), B, mode="woodbury", samples=samples) for t in setup.targets)
        results["fisher_formula"].append({"block_size": B, "blocks_gb": blocks / 2**30,
                                          "woodbury_samples": samples, "woodbury_gb": wood / 2**30})

    if not args.quick:
        q = [t for t in setup.targets if t.key == "model.layers.0.self_attn.q_proj.weight"]
        batches = setup.calib
        for B in [int(b) for b in args.block_sizes.split(",")]:
            for mode in ("blocks", "woodbury"):
                curv = Curvature(model, [(q[0].module, q[0].name)], batches, loss_fn=causal_lm_loss)
                with PeakMemory(dev) as pm, Stopwatch() as sw:
                    rep = curv.collect_fisher(block_size=B, mode=mode, num_samples=args.fisher_samples,
                                              micro_batch=2, progress=True)
                secs = sw.seconds
                results["fisher_measured"].append({"target": q[0].key, "numel": q[0].current().numel(),
                                                   "block_size": B, "mode": mode, "samples": rep["samples"],
                                                   "engine": rep["engine"], "seconds": secs,
                                                   "stored_mb": rep["bytes"] / 2**20, "peak_added_mb": pm.added_mb})
                del curv

    cmd = command_line()
    lines = [f"SmolLM2-135M, {len(params)} decoder Linear weights ({numel / 1e6:.1f}M entries), device "
             f"{dev}, {args.threads} threads. Command: `{cmd}`", "",
             f"Layerwise Gram over {args.calib}×{args.seq_len} tokens:", "",
             "| mode | time (s) | tokens/s | peak memory added (MiB) | stored H (MiB) |", "|---|---|---|---|---|"]
    for r in results["layerwise"]:
        lines.append(f"| {r['mode']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_added_mb']:.0f} | "
                     f"{r['stored_h_mb']:.0f} |")
    lines += ["", "Block-diagonal empirical Fisher of all pruned weights (fp32; blocks + their inverses; "
              f"Woodbury = {samples} per-sample gradients + m×m factors):", "",
              "| block size | dense blocks (GiB) | Woodbury, m=%d (GiB) |" % samples, "|---|---|---|"]
    for r in results["fisher_formula"]:
        lines.append(f"| {r['block_size']} | {r['blocks_gb']:.1f} | {r['woodbury_gb']:.1f} |")
    if results["fisher_measured"]:
        m0 = results["fisher_measured"][0]
        lines += ["", f"Measured Fisher collection for {m0['target']} ({m0['numel']} entries), {m0['samples']} "
                  f"samples of {args.seq_len} tokens (CPU peak = RSS high-water mark; memory the allocator already holds from "
                  "earlier steps is reused, so it can read below the stored size):", "",
                  "| block size | mode | engine | time (s) | stored (MiB) | peak memory added (MiB) |",
                  "|---|---|---|---|---|---|"]
        for r in results["fisher_measured"]:
            lines.append(f"| {r['block_size']} | {r['mode']} | {r['engine']} | {r['seconds']:.1f} | "
                         f"{r['stored_mb']:.1f} | {r['peak_added_mb']:.0f} |")
    write_results(args.out, lines, {**results, "command": cmd}, indent=2)
    print("\n".join(lines))
    return 0 if all(math.isfinite(r["seconds"]) for r in results["layerwise"]) else 1


if __name__ == "__main__":
    sys.exit(main())
