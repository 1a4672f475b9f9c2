"""Where do ours T=1 and llm-compressor's SparseGPT part ways?  Layer by layer, on the same windows (issue 23).

    python benchmarks/llmc_weights.py --sparsity 2:4 --orders 0,1

For each calibration order K (``--orders``; 0 = as given, K > 0 = the same windows in a seeded shuffled order,
as ``vs_llmcompressor.py --calib-order K``) both sides prune SmolLM2-135M at T=1 (ours: the sequential OBS sweep;
theirs: ``oneshot`` + ``SparseGPTModifier`` through ``benchmarks/llmc/worker.py --save-weights``).  Then, per
decoder block, the share of mask entries two results agree on and the relative difference of their weights, for
three pairs: ours vs theirs on order 0; ours on order 0 vs ours on order 1; theirs on order 0 vs theirs on order 1.
A reordering leaves every Gram the same in exact arithmetic, so the last two pairs show how far rounding alone
carries each side; block 0 (dense inputs on both sides) shows whether the two solvers agree when their inputs do.

``--dtype float64`` runs both sides in float64 (the model, the Grams/Hessians and both solvers; llm-compressor through
its ``SGPT_PRECISION``), which takes fp32 rounding out of the comparison.  ``--counts theirs`` gives our sweep
llm-compressor's per-block prune counts: its threshold ``score <= sorted[int(n*s)]`` prunes ``int(n*s) + 1`` entries
of every 128-column block, one more than the sparsity asks; ours by default prunes the rounded count per tensor.
``--eager`` runs our calibration passes with eager attention, as llm-compressor's pipeline forces for its own
(``use_eager_attention``; eager attention takes its softmax in fp32, so in float64 the default sdpa and eager
differ at ~1e-8, ``benchmarks/llmc_inputs.py``).  With all three, what is left between the two sides is the solvers
themselves and the order of floating-point sums.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from _common import Stopwatch, command_line, pyplot, save_figure, write_results
from vs_llmcompressor import CACHE, ensure_venv, reordered, run_worker, save_model, save_windows
from obs_plugins import api
from obs_plugins.curvature import Curvature
from obs_plugins.experiment import setup_smollm2, sparsity_args
from obs_plugins.lm import causal_lm_loss, perplexity
from obs_plugins.methods.obs_iht import OBSIHTConfig
from obs_plugins.methods.obs_iht.solver import _block_quotas, solve
from obs_plugins.targets import to_2d


def block_of(name: str) -> int:
    return int(name.split(".")[2])  # model.layers.<i>.<attn|mlp>.<proj>


def compare(a: dict, b: dict) -> dict:
    """Per block: mean over its weights of mask agreement and of ||a - b|| / ||b||; per weight too."""
    per = {}
    for n in a:
        x, y = a[n], b[n]
        per[n] = {"mask_agree": float(((x != 0) == (y != 0)).float().mean()),
                  "rel_diff": float((x - y).norm() / y.norm())}
    blocks = sorted({block_of(n) for n in per})
    by_block = {i: {k: statistics.fmean(v[k] for n, v in per.items() if block_of(n) == i)
                    for k in ("mask_agree", "rel_diff")} for i in blocks}
    return {"per_block": by_block, "per_weight": per}


def their_counts(rows: int, d: int, s: float, blocksize: int = 128) -> list[int]:
    """llm-compressor's unstructured prunes per column block: ``int(n * s) + 1`` (``sparsify_weight``)."""
    return [int(rows * (min(i + blocksize, d) - i) * s) + 1 for i in range(0, d, blocksize)]


def ours_t1(setup, sparsity: str, progress: bool, dtype=torch.float32, counts: str = "ours",
            eager: bool = False) -> dict:
    amount, nm = sparsity_args(sparsity)
    snap = api.snapshot(setup.targets)
    cfg = OBSIHTConfig(iterations=1, nm=nm, progress=progress)
    per = None
    if counts == "theirs" and nm is None:
        per = {}
        for t in setup.targets:
            W = to_2d(t.module, t.current())
            blocks = their_counts(*W.shape, amount, cfg.blocksize)
            per[t.key] = sum(blocks)
            ones = torch.ones_like(W, dtype=torch.bool)
            if _block_quotas(ones, per[t.key], cfg.blocksize) != blocks:  # our split of the total must give theirs
                raise RuntimeError(f"--counts theirs: our block split of {per[t.key]} for {t.key} is not {blocks}")
    attn = setup.model.config._attn_implementation
    if eager:  # as llm-compressor's calibration_forward_context (use_eager_attention): read at forward time
        setup.model.config._attn_implementation = "eager"
    try:
        curv = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets], setup.calib,
                                   loss_fn=causal_lm_loss, progress=progress, dtype=dtype)
        if per is not None:
            solve(curv, None, cfg, counts=per).apply(reparametrize=False)  # baked, as api.prune
        else:
            api.prune(cfg, curvature=curv, amount=amount)
    finally:
        setup.model.config._attn_implementation = attn  # perplexity with the model's own attention, as theirs
    names = {id(m): n for n, m in setup.model.named_modules()}
    w = {names[id(t.module)]: t.current().detach().clone() for t in setup.targets}
    ppl = {h: perplexity(setup.model, b, progress=False) for h, b in setup.heldout.items()}
    api.restore(setup.targets, snap)
    return {"weights": w, "ppl": ppl}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="2:4")
    ap.add_argument("--orders", default="0,1", help="one or two calibration orders: the first is compared across "
                    "sides, a second gives each side against itself")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="both sides (see above)")
    ap.add_argument("--counts", default="ours", choices=("ours", "theirs"),
                    help="our per-tensor prune counts, or llm-compressor's per-block int(n*s)+1 (unstructured)")
    ap.add_argument("--eager", action="store_true",
                    help="our calibration forward passes with eager attention, as llm-compressor's pipeline forces "
                         "(its softmax runs in fp32 even for an fp64 model); perplexity with the model's default")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None, help="default benchmarks/results/llmc_weights_<sparsity>")
    args = ap.parse_args(argv)
    orders = [int(x) for x in args.orders.split(",")]
    if len(orders) not in (1, 2) or len(set(orders)) != len(orders):
        ap.error("--orders: one order, or two different ones (e.g. 0,1)")
    out = args.out or f"benchmarks/results/llmc_weights_{args.sparsity.replace(':', 'of')}" + \
        ("" if args.dtype == "float32" else f"_{args.dtype}") + ("" if args.counts == "ours" else "_theirs_counts") + \
        ("_eager" if args.eager else "")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    sw = Stopwatch()
    ensure_venv()
    setup = setup_smollm2(n_calib=args.calib, n_eval=args.eval, seq_len=args.seq_len)
    model_dir = save_model(setup.model, setup.tokenizer, CACHE / "smollm2-fp32")  # fp32 weights: exact in fp64
    setup.model.to(dtype)
    base = setup.calib
    ours, theirs = {}, {}
    tag = args.sparsity.replace(':', 'of')
    for o in orders:
        setup.calib = reordered(base, o) if o else base
        work = CACHE / f"llmc-weights-c{args.calib}-e{args.eval}-s{args.seq_len}-o{o}"
        calib_pt = save_windows(setup.calib, work / "calib.pt")
        evals = {h: save_windows(b, work / f"heldout_{h}.pt") for h, b in setup.heldout.items()}
        dt = "" if args.dtype == "float32" else f"_{args.dtype}"
        wfile = work / f"weights_{tag}{dt}.pt"
        res = run_worker(model_dir, calib_pt, evals, "sparsegpt", args.sparsity, work / f"sparsegpt_{tag}{dt}.json",
                         args.threads, save_weights=wfile, dtype=args.dtype)
        theirs[o] = {"weights": torch.load(wfile), "ppl": res["ppl"]}
        ours[o] = ours_t1(setup, args.sparsity, not args.no_progress, dtype, args.counts, args.eager)
        print(f"order {o}: ours {ours[o]['ppl']}, theirs {theirs[o]['ppl']}", flush=True)
    setup.calib = base
    o0 = orders[0]
    pairs = {f"ours vs theirs (order {o0})": compare(ours[o0]["weights"], theirs[o0]["weights"])}
    if len(orders) == 2:
        o1 = orders[1]
        pairs[f"ours order {o0} vs ours order {o1}"] = compare(ours[o0]["weights"], ours[o1]["weights"])
        pairs[f"theirs order {o0} vs theirs order {o1}"] = compare(theirs[o0]["weights"], theirs[o1]["weights"])
    blocks = sorted(next(iter(pairs.values()))["per_block"])
    show = [b for b in blocks if b in (0, 1, 2, 5, 10, 15, 20, 25) or b == blocks[-1]]
    texts = list(ours[o0]["ppl"])
    lines = [f"SmolLM2-135M T=1 at {args.sparsity}: ours (sequential OBS sweep) and llm-compressor SparseGPT, "
             f"{setup.info['calib']}; calibration order(s) {', '.join(map(str, orders))} (the same windows); both "
             f"sides in {args.dtype}; our prune counts: {args.counts}; our calibration attention: "
             f"{'eager (as theirs)' if args.eager else 'the model default'}.", "",
             f"Command: `{command_line()}`", "",
             "Perplexity (" + " / ".join(texts) + "):", "",
             "| order | ours T=1 | llm-compressor SparseGPT | ours / theirs |", "|---|---|---|---|"]
    slash = lambda d: " / ".join(f"{d[h]:.2f}" for h in texts)  # noqa: E731
    for o in orders:
        ratio = {h: ours[o]["ppl"][h] / theirs[o]["ppl"][h] for h in texts}
        lines.append(f"| {o} | {slash(ours[o]['ppl'])} | {slash(theirs[o]['ppl'])} | "
                     + " / ".join(f"{ratio[h]:.3f}" for h in texts) + " |")
    lines += ["", "Mask agreement (mean over the block's 7 weights) and relative weight difference, by block:", "",
              "| pair | " + " | ".join(f"block {b}" for b in show) + " |", "|---|" + "---|" * len(show)]
    for name, c in pairs.items():
        pb = c["per_block"]
        lines.append(f"| {name} | " + " | ".join(f"{pb[b]['mask_agree']:.5f} ({pb[b]['rel_diff']:.1e})"
                                                  for b in show) + " |")
    pw = pairs[f"ours vs theirs (order {o0})"]["per_weight"]
    lines += ["", "Block 0, ours vs theirs, per weight: " + ", ".join(
        f"{n.split('.')[-1]} {v['mask_agree']:.5f} ({v['rel_diff']:.1e})" for n, v in sorted(pw.items())
        if block_of(n) == 0), "", f"Wall time {sw.seconds:.0f} s."]
    data = {"pairs": {k: v["per_block"] for k, v in pairs.items()}, "block0": {n: v for n, v in pw.items()
            if block_of(n) == 0}, "ppl": {"ours": {o: ours[o]["ppl"] for o in orders},
                                          "theirs": {o: theirs[o]["ppl"] for o in orders}},
            "setup": setup.info, "dtype": args.dtype, "counts": args.counts, "eager": args.eager, "command": command_line(),
            "wall_s": sw.seconds}
    write_results(out, lines, data)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in pairs.items():
        ax.plot(blocks, [1 - c["per_block"][b]["mask_agree"] for b in blocks], marker="o", ms=3, label=name)
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("share of mask entries that differ")
    ax.set_title(f"SmolLM2-135M T=1 at {args.sparsity} ({args.dtype}): rounding vs method")
    ax.legend(fontsize=8)
    save_figure(fig, out + ".png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
