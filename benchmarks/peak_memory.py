"""Measured peak memory of an OBS-IHT T=1 prune of SmolLM2-135M (issue 23): sequential calibration (the
default: one block's activations for the calibration set at a time) against one-pass calibration (every Gram
collected in one forward pass of the whole model).  Each variant runs in its own process; the figure is the
process's peak resident set during the prune (sampled every 20 ms; loading the GGUF has a larger transient
peak of its own, so ``ru_maxrss`` would hide the prune's) minus its resident set once the model and the windows
are loaded, so it is what the prune itself added.  CPU only (on CUDA, ``torch.cuda.max_memory_allocated`` is the figure to
read; not measured here).

    python benchmarks/peak_memory.py --calib 32
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import command_line, write_results


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def child(variant: str, calib: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from obs_plugins import Curvature, OBSIHTConfig, api
    from obs_plugins.experiment import setup_smollm2
    setup = setup_smollm2(n_calib=calib, n_eval=1)
    import gc
    import threading
    gc.collect()
    base = rss_mb()
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    state = {"peak": base, "run": True}

    def sample():
        while state["run"]:
            state["peak"] = max(state["peak"], rss_mb())
            time.sleep(0.02)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    curv = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets], setup.calib,
                               sequential=(variant == "sequential"), progress=False)
    api.prune(OBSIHTConfig(iterations=1, progress=False), curvature=curv, amount=0.5)
    secs = time.perf_counter() - t0
    state["run"] = False
    th.join()
    peak = state["peak"]
    n_tokens = sum(int(b["input_ids"].numel()) for b in setup.calib)
    return {"variant": variant, "calib_windows": calib, "tokens": n_tokens, "rss_after_load_mb": base,
            "peak_rss_mb": peak, "peak_while_loading_mb": peak_load, "added_by_prune_mb": peak - base,
            "seconds": secs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="sequential,one-pass")
    ap.add_argument("--out", default="benchmarks/results/peak_memory")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.calib, args.threads)), flush=True)
        return 0
    rows = []
    for v in args.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", v, "--calib", str(args.calib), "--threads",
                            str(args.threads)], capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise RuntimeError(f"{v} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    md = ["OBS-IHT T=1 at 50% of SmolLM2-135M's 210 decoder weights (fp32, CPU), "
          f"{rows[0]['calib_windows']} calibration windows of 256 tokens. Peak resident set of the process minus "
          "its resident set after loading the model and windows.", "", f"Command: `{command_line()}`", "",
          "| calibration | peak RSS (MB) | RSS after load (MB) | added by the prune (MB) | seconds |",
          "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} | "
                  f"{r['added_by_prune_mb']:.0f} | {r['seconds']:.0f} |")
    write_results(args.out, md, {"rows": rows, "command": command_line()})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
