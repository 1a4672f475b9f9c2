"""``obs-prune``: prune | export | limit | bench.  With no subcommand it runs ``prune`` on its defaults (the
main job: SmolLM2-135M, Shakespeare calibration, OBS-IHT beside magnitude, held-out perplexity report)."""
from __future__ import annotations

import argparse
import json
import sys
import time

MAIN_DEFAULTS = dict(sparsity="0.5", iterations=2, calib=32, eval=32, seq_len=256)


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = [c[1] for c in cols]
    body = [[format(r.get(c[0], ""), c[2]) if r.get(c[0]) is not None and c[2] else str(r.get(c[0], ""))
             for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def cmd_prune(args) -> int:
    if args.model is not None or args.config is not None:  # the Hugging Face route (issue 15)
        return cmd_prune_model(args)
    import torch

    from .experiment import run_rows, setup_smollm2
    from .lm import perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    progress = not args.quiet
    print(f"obs-prune: loading SmolLM2-135M-Instruct (packaged GGUF, dequantized to fp32) and Shakespeare text ...",
          flush=True)
    setup = setup_smollm2(n_calib=args.calib, n_eval=args.eval, seq_len=args.seq_len, blocks=args.blocks)
    t0 = time.perf_counter()
    dense = perplexity(setup.model, setup.heldout, progress=progress, desc="perplexity dense")
    rows = [{"method": "dense", "sparsity": "0", "measured_sparsity": 0.0, "ppl": dense,
             "prune_seconds": 0.0}]
    methods = ["magnitude"] + ([args.method] if args.method != "magnitude" else [])
    more, curv = run_rows(setup, args.sparsity, methods, iterations=args.iterations, progress=progress)
    rows += more
    for r in rows:
        r["vs_dense"] = r["ppl"] / dense
    print()
    print(f"SmolLM2-135M one-shot pruning of {len(setup.targets)} Linear weights in model.layers "
          f"(lm_head/embeddings kept); calibration {setup.info['calib']}; held-out {setup.info['heldout']}")
    print(_table(rows, [("method", "method", ""), ("sparsity", "target", ""),
                        ("measured_sparsity", "sparsity", ".3f"), ("ppl", "held-out ppl", ".2f"),
                        ("vs_dense", "x dense", ".3f"), ("prune_seconds", "prune s", ".1f")]))
    if curv is not None:
        print(f"curvature (layer Grams, {len(curv.hessians)} layers): {curv.info['seconds']:.1f} s; "
              f"model load {setup.load_seconds:.1f} s; total {time.perf_counter() - t_all:.1f} s")
    for r in rows:
        for h in r.get("history", []):
            print(f"  OBS-IHT iteration {h['iteration']}: held-out calibration loss {h['holdout_loss']:.4f}"
                  + (f" (step {h['step_size']}, accepted={h.get('accepted')})" if h["iteration"] > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "setup": setup.info}, f, indent=2, default=str)
    if args.save:
        # re-run the chosen method and save the baked model in Hugging Face format (safetensors)
        from . import api
        from .methods.obs_iht import OBSIHTConfig
        from .experiment import sparsity_args
        amount, nm = sparsity_args(args.sparsity)
        if args.method == "obs_iht":
            api.prune(OBSIHTConfig(iterations=args.iterations, nm=nm, progress=progress), curvature=curv, amount=amount)
        setup.model.save_pretrained(args.save)
        setup.tokenizer.save_pretrained(args.save)
        print(f"saved the pruned model to {args.save}")
    bad = [r for r in rows if not (r["ppl"] == r["ppl"])]
    return 1 if bad else 0


def add_model_arguments(p) -> None:
    """``--model PATH --config pruning_config.json --out DIR``: prune a saved Transformers model by its config."""
    p.add_argument("--model", default=None, help="prune this saved Transformers model folder instead of the main "
                   "job (with --config and --out)")
    p.add_argument("--config", default=None, help="a pruning_config.json (or the folder holding one)")
    p.add_argument("--out", default=None, help="where to save the pruned model, its config and prune_report.json")
    p.add_argument("--calibration", default=None, help="a UTF-8 text file for calibration (default: the packaged "
                   "Shakespeare plays); methods without curvature (magnitude) need none")
    p.add_argument("--export", default=None, choices=["onnx"], help="also export model.onnx and verify it")


def cmd_prune_model(args) -> int:
    from .errors import PruningInputError
    if not (args.model and args.config and args.out):
        raise PruningInputError("--model, --config and --out go together")
    import os
    from obs_plugins.integrations.optimum import Pruner, PruningConfig
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg_path = args.config
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = PruningConfig.from_dict(json.load(f))
    else:
        cfg = PruningConfig.from_pretrained(cfg_path)
    pruner = Pruner.from_pretrained(args.model)
    texts = None
    if cfg.route.curvature:
        if args.calibration:
            with open(args.calibration, encoding="utf-8") as f:
                texts = [f.read()]
        else:
            from .data import load_shakespeare
            texts = [load_shakespeare()]
    res = pruner.prune(cfg, calibration_dataset=texts, save_dir=args.out, export=args.export,
                       progress=not args.quiet)
    print(f"obs-prune: {res.method} pruned {res.pruned} of {res.weights} weights in {len(res.targets)} tensors "
          f"(sparsity {res.sparsity:.4f}) in {res.seconds:.1f} s; saved to {res.save_dir}"
          + (f"; ONNX {res.onnx_path}, report {res.onnx_report}" if res.onnx_path else ""))
    return 0


def cmd_export(args) -> int:
    try:
        from obs_plugins.integrations import onnx as onnx_adapter
    except ImportError as e:  # pragma: no cover
        print(f"obs-prune export: the ONNX adapter is unavailable: {e}", file=sys.stderr)
        return 2
    return onnx_adapter.run_export_cli(args)


def cmd_limit(args) -> int:
    print("obs-prune limit: the pruning-limit estimate (Zhang et al., NeurIPS 2024) is not implemented yet; "
          "it lands with its own issue.", file=sys.stderr)
    return 2


BENCHES = {"llm": "benchmarks/one_shot_llm.py", "curvature": "benchmarks/curvature.py",
           "tickets": "benchmarks/tickets.py", "tickets-sweep": "benchmarks/tickets_sweep.py",
           "onnx": "benchmarks/onnx_speed.py"}


def cmd_bench(args) -> int:
    import os
    import runpy
    path = BENCHES[args.name]
    if not os.path.exists(path):
        print(f"obs-prune bench: {path} not found; run it from a checkout of the obs-plugins repository",
              file=sys.stderr)
        return 2
    sys.argv = [path] + args.rest
    runpy.run_path(path, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="obs-prune", description=(
        "Second-order (OBS-IHT) and learned-mask pruning. Without a subcommand: the main job (prune "
        "SmolLM2-135M with OBS-IHT beside magnitude and print a report)."))
    sub = p.add_subparsers(dest="command")
    pr = sub.add_parser("prune", help="prune a real pretrained model and report quality and time (default)",
                        description="One-shot pruning of SmolLM2-135M-Instruct (packaged, offline) calibrated on "
                        "Shakespeare plays; perplexity on held-out plays: dense vs magnitude vs the chosen method.")
    pr.add_argument("--method", default="obs_iht", choices=["obs_iht", "wanda", "magnitude"],
                    help="pruning method (default: obs_iht)")
    pr.add_argument("--sparsity", default=MAIN_DEFAULTS["sparsity"],
                    help="fraction of each Linear weight to prune (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
    pr.add_argument("--iterations", type=int, default=MAIN_DEFAULTS["iterations"],
                    help="OBS-IHT iterations T (1 = the SparseGPT-equivalent OBS sweep; default 2)")
    pr.add_argument("--calib", type=int, default=MAIN_DEFAULTS["calib"], help="calibration windows (default 32)")
    pr.add_argument("--eval", type=int, default=MAIN_DEFAULTS["eval"], help="held-out windows (default 32)")
    pr.add_argument("--seq-len", type=int, default=MAIN_DEFAULTS["seq_len"], help="tokens per window (default 256)")
    pr.add_argument("--blocks", type=int, default=None,
                    help="prune only the first N of the 30 decoder blocks (quick runs; default: all)")
    pr.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    pr.add_argument("--json", help="also write the report as JSON here")
    pr.add_argument("--save", help="save the pruned model (Hugging Face format) to this folder")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(pr)
    pr.set_defaults(func=cmd_prune)

    ex = sub.add_parser("export", help="export to ONNX and verify outputs, sparsity and ONNX Runtime speed",
                        description="Bake masks on a copy, export with torch.onnx (dynamo), verify against "
                        "PyTorch, check sparsity survived, and time dense vs pruned routes in ONNX Runtime.")
    try:
        from obs_plugins.integrations import onnx as onnx_adapter
        onnx_adapter.add_export_arguments(ex)
    except (ImportError, AttributeError):
        pass
    ex.set_defaults(func=cmd_export)

    li = sub.add_parser("limit", help="estimate the pruning limit (statistical dimension, Hessian spectrum)",
                        description="Pruning-limit estimate of Zhang et al. (NeurIPS 2024) — not implemented yet.")
    li.set_defaults(func=cmd_limit)

    be = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (llm, curvature, tickets, tickets-sweep, onnx)",
                        description="Runs benchmarks/<name>.py from a checkout; extra arguments are passed on.")
    be.add_argument("name", choices=sorted(BENCHES))
    be.add_argument("rest", nargs=argparse.REMAINDER)
    be.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["prune"] + argv
    args = parser.parse_args(argv)
    from .errors import CurvatureError, PruningInputError
    try:
        return args.func(args)
    except (PruningInputError, CurvatureError, ValueError) as e:
        print(f"obs-prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
