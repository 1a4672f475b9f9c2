"""The OBS sweep, batched (the default: ``solve_block`` columns per triangular solve) vs the textbook column loop, on
SmolLM2-135M's layer shapes with a synthetic Gram: the fixed-support projection of the IHT iterations, the
unstructured 50% sweep and 2:4.  Same masks and weights to rounding (asserted here, tested in tests/test_obs_iht.py).

    python benchmarks/sweep_speed.py            # 2 threads, median of 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_threads_argument, command_line, set_threads, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/sweep_speed")
    add_threads_argument(ap, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    from obs_plugins.curvature.linalg import inverse_factor
    from obs_plugins.methods.obs_iht.solver import obs_sweep

    def timed(fn):
        ts, out = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts), out

    rows = []
    g = torch.Generator().manual_seed(0)
    for r, d in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:  # q/o, k/v, gate/up, down
        X = torch.randn(4096, d, generator=g) @ (torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d))
        U = inverse_factor(2 * X.t() @ X / 4096, 0.01).hinv_chol_upper
        W = torch.randn(r, d, generator=g)
        keep = torch.rand(r, d, generator=g) > 0.5
        for case, kw in [("projection (fixed support)", {"keep": keep}), ("unstructured 50%", {"k": r * d // 2}),
                         ("2:4", {"nm": (2, 4)})]:
            t_loop, ref = timed(lambda: obs_sweep(W, U, batched=False, **kw))
            t_bat, out = timed(lambda: obs_sweep(W, U, **kw))
            same = ref[1] == out[1]  # near-ties in the saliency may break the other way after rounding
            rows.append({"shape": f"{r}x{d}", "case": case, "loop_s": t_loop, "batched_s": t_bat,
                         "speedup": t_loop / t_bat, "mask_entries_differing": int((~same).sum()),
                         "max_abs_weight_diff_same_mask": float((ref[0] - out[0])[same].abs().max())})
    lines = [f"OBS sweep on SmolLM2 layer shapes (rows x input columns), {args.threads} thread(s), median of "
             f"{args.repeats}. Command: `{command_line()}`", "",
             "| shape | case | column loop (s) | batched (s) | speed-up | mask entries differing | max weight diff (same mask) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {x['shape']} | {x['case']} | {x['loop_s']:.3f} | {x['batched_s']:.3f} | {x['speedup']:.2f}x | "
              f"{x['mask_entries_differing']} | {x['max_abs_weight_diff_same_mask']:.1e} |" for x in rows]
    write_results(args.out, "\n".join(lines) + "\n", {"command": command_line(), "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
