"""Do our OBS sweep and llm-compressor's SparseGPT solve a layer equally well, given the very same input?

    python benchmarks/llmc_layer.py --sparsities 0.5,0.7,2:4 --blocks 0,14,29

Issue 23 compares whole pipelines, where each side's later blocks see its own pruned outputs, so any small
difference is amplified block after block.  This script removes the pipeline: it collects, once, the input Gram
``H = 2 X X^T / n`` of every Linear weight of the chosen decoder blocks on the *dense* model (the calibration
windows of ``vs_llmcompressor.py``; for block 0 these are exactly the inputs both pipelines see), then prunes each
weight from the same ``(W, H)`` twice: with our ``obs_sweep`` (the T=1 solver every route uses, per-layer count
``round(s * n)``) and with llm-compressor's own ``sparsify_weight`` run in its venv
(``benchmarks/llmc/layer_worker.py``).  Per weight: mask agreement, relative weight difference and the layer loss
each reaches, ``1/2 tr(dW H dW^T)`` in float64 on the undamped ``H`` (the objective both minimise).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import torch

from _common import Stopwatch, add_threads_argument, command_line, pyplot, save_figure, set_threads, write_results
from llmc_weights import block_of
from vs_llmcompressor import CACHE, ROOT, VENV_PY, ensure_venv
from obs_plugins.curvature import Curvature
from obs_plugins.curvature.linalg import inverse_factor
from obs_plugins.experiment import setup_smollm2, sparsity_args
from obs_plugins.masks import count_to_prune, parse_nm
from obs_plugins.methods.obs_iht.solver import obs_sweep

LAYER_WORKER = ROOT / "llmc" / "layer_worker.py"


def layer_loss(W0: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    """``1/2 tr(dW H dW^T)`` in float64: the layer's output error ``||dW X||^2 / n`` for ``H = 2 X X^T / n``."""
    D = (W - W0).double()
    return float(0.5 * ((D @ H.double()) * D).sum())


def ours(W0: torch.Tensor, H: torch.Tensor, sparsity: str, rel_damp: float = 0.01) -> torch.Tensor:
    amount, nm = sparsity_args(sparsity)
    nm = parse_nm(nm)
    k = None if nm else count_to_prune(amount, W0.numel())
    f = inverse_factor(H, rel_damp)
    W, _, _ = obs_sweep(W0.float(), f.hinv_chol_upper, k=k, nm=nm)
    return W


def collect(calib: int, seq_len: int, blocks: list[int], progress: bool) -> tuple[dict, dict]:
    setup = setup_smollm2(n_calib=calib, n_eval=1, seq_len=seq_len, blocks=max(blocks) + 1)
    names = {id(m): n for n, m in setup.model.named_modules()}
    targets = [t for t in setup.targets if block_of(names[id(t.module)]) in blocks]
    curv = Curvature.layerwise(setup.model, [(t.module, t.name) for t in targets], setup.calib,
                               sequential=False, progress=progress)
    layers = {names[id(t.module)]: {"W": t.module.weight.detach().float().clone(),
                                    "H": curv.hessians[t.key].float().clone()} for t in targets}
    return layers, setup.info


def theirs(layers_pt, sparsity: str, out, threads: int) -> dict:
    cmd = [str(VENV_PY), str(LAYER_WORKER), "--layers", str(layers_pt), "--sparsity", sparsity,
           "--threads", str(threads), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"layer_worker {sparsity} failed (rc {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    return torch.load(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--blocks", default="0,14,29", help="decoder blocks whose 7 weights are solved")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    add_threads_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--against", default=None, metavar="WEIGHTS.pt",
                    help="also compare our weights on these dense-model inputs with pruned weights saved by a whole "
                         "pipeline ({name: W}, e.g. llmc_weights.py's llm-compressor run; one sparsity only): if that "
                         "pipeline solved these blocks on dense inputs too, its masks agree as closely as above")
    ap.add_argument("--out", default="benchmarks/results/llmc_layer")
    args = ap.parse_args(argv)
    blocks = sorted({int(b) for b in args.blocks.split(",")})
    if not blocks or min(blocks) < 0 or max(blocks) > 29:
        ap.error("--blocks: decoder blocks in 0..29, e.g. 0,14,29")
    sparsities = [s.strip() for s in args.sparsities.split(",") if s.strip()]
    if args.against and len(sparsities) != 1:
        ap.error("--against: give the one sparsity those weights were pruned at (--sparsities)")
    set_threads(args.threads)
    sw = Stopwatch()
    ensure_venv()
    layers, info = collect(args.calib, args.seq_len, blocks, not args.no_progress)
    work = CACHE / f"llmc-layer-c{args.calib}-s{args.seq_len}"
    work.mkdir(parents=True, exist_ok=True)
    layers_pt = work / ("layers_b" + "-".join(map(str, blocks)) + ".pt")
    torch.save(layers, layers_pt)
    rows, vs_pipeline = [], []
    against = torch.load(args.against) if args.against else None
    for sp in sparsities:
        th = theirs(layers_pt, sp, work / f"theirs_{sp.replace(':', 'of')}.pt", args.threads)
        for name, v in layers.items():
            t0 = time.perf_counter()
            Wo = ours(v["W"], v["H"], sp)
            t_ours = time.perf_counter() - t0
            Wt = th["weights"][name].float()
            if args.against:
                Wa = against[name].float()
                vs_pipeline.append({"weight": name, "mask_agree": float(((Wo != 0) == (Wa != 0)).float().mean()),
                                    "rel_diff": float((Wo - Wa).norm() / Wa.norm())})
            rows.append({"sparsity": sp, "weight": name,
                         "mask_agree": float(((Wo != 0) == (Wt != 0)).float().mean()),
                         "rel_diff": float((Wo - Wt).norm() / Wt.norm()),
                         "zeros_ours": int((Wo == 0).sum()), "zeros_theirs": int((Wt == 0).sum()),
                         "loss_ours": layer_loss(v["W"], Wo, v["H"]), "loss_theirs": layer_loss(v["W"], Wt, v["H"]),
                         "seconds_ours": t_ours, "seconds_theirs": th["seconds"][name]})
        print(f"llmc_layer: {sp} done", flush=True)
    summary = []
    for sp in sparsities:
        rs = [r for r in rows if r["sparsity"] == sp]
        ratios = [r["loss_ours"] / r["loss_theirs"] for r in rs]
        summary.append({"sparsity": sp, "n": len(rs),
                        "sum_loss_ratio": sum(r["loss_ours"] for r in rs) / sum(r["loss_theirs"] for r in rs),
                        "ratio_min": min(ratios), "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
                        "ours_lower": sum(x < 1 for x in ratios),
                        "mask_agree_min": min(r["mask_agree"] for r in rs),
                        "extra_zeros_theirs": sum(r["zeros_theirs"] - r["zeros_ours"] for r in rs)})
    lines = [f"Ours `obs_sweep` vs llm-compressor `sparsify_weight` on the same (W, H): SmolLM2-135M decoder blocks "
             f"{', '.join(map(str, blocks))} ({len(layers)} weights), Grams of the dense model on {info['calib']}.",
             "", f"Command: `{command_line()}`", "",
             "| sparsity | weights | layer loss ours / theirs (sum) | per weight min / median / max | ours lower "
             "| lowest mask agreement | extra zeros theirs |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['sparsity']} | {s['n']} | {s['sum_loss_ratio']:.5f} | {s['ratio_min']:.5f} / "
                     f"{s['ratio_median']:.5f} / {s['ratio_max']:.5f} | {s['ours_lower']} of {s['n']} | "
                     f"{s['mask_agree_min']:.5f} | {s['extra_zeros_theirs']} |")
    lines += ["", "Per weight (layer loss = 1/2 tr(dW H dW^T), undamped H):", "",
              "| sparsity | weight | mask agreement | rel. weight diff | zeros ours / theirs | loss ours | loss theirs "
              "| ours / theirs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sparsity']} | {r['weight'].removeprefix('model.layers.')} | {r['mask_agree']:.6f} | "
                     f"{r['rel_diff']:.1e} | {r['zeros_ours']} / {r['zeros_theirs']} | {r['loss_ours']:.5g} | "
                     f"{r['loss_theirs']:.5g} | {r['loss_ours'] / r['loss_theirs']:.5f} |")
    if vs_pipeline:
        lines += ["", f"Ours on these dense-model inputs vs the pipeline's saved weights `{args.against}`:", "",
                  "| weight | mask agreement | rel. weight diff |", "|---|---|---|"]
        lines += [f"| {r['weight'].removeprefix('model.layers.')} | {r['mask_agree']:.5f} | {r['rel_diff']:.1e} |"
                  for r in vs_pipeline]
    lines += ["", f"Wall time {sw.seconds:.0f} s."]
    write_results(args.out, lines, {"rows": rows, "summary": summary, "vs_pipeline": vs_pipeline, "setup": info, "command": command_line(),
                                    "wall_s": sw.seconds})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, sp in enumerate(sparsities):
        rs = [r for r in rows if r["sparsity"] == sp]
        ax.scatter([i + (j - len(rs) / 2) * 0.02 for j in range(len(rs))],
                   [r["loss_ours"] / r["loss_theirs"] for r in rs], s=12)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(sparsities)), sparsities)
    ax.set_ylabel("layer loss ours / theirs")
    ax.set_title("Same (W, H): our OBS sweep vs llm-compressor SparseGPT, per weight")
    save_figure(fig, args.out + ".png")
    print("\n".join(lines[:len(summary) + 6]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
