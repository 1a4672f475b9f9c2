"""``obs-prune``: prune | export | limit | bench.  With no subcommand it runs ``prune`` on its defaults (the
main job: SmolLM2-135M, mixed English calibration, OBS-IHT beside magnitude, perplexity on two held-out texts)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import PruningInputError, check_writable

MAIN_DEFAULTS = dict(sparsity="0.5", iterations=2, calib=32, eval=32, seq_len=256)
# the flags of each ``prune`` route, with their defaults: a flag of the other route is refused, not ignored
MAIN_ONLY = dict(method="obs_iht", grad_subsets=1, sequential="auto", blocks=None, json=None, save=None,
                 **MAIN_DEFAULTS)
MODEL_ONLY = dict(model=None, config=None, out=None, calibration=None, export=None)
SMOLLM2_BLOCKS = 30  # decoder blocks of the main job's model (--blocks)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = [c[1] for c in cols]
    body = [[format(r.get(c[0], ""), c[2]) if r.get(c[0]) is not None and c[2] else str(r.get(c[0], ""))
             for c in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


def _check_threads(args) -> None:
    if args.threads < 0:
        raise PruningInputError(f"--threads: must be >= 0 (0: torch's choice), got {args.threads}")


def check_device(value: str):
    """``--device``: a torch device this torch can allocate on (``cpu``, ``cuda``, ``cuda:1``...), checked
    before the model loads; returns the ``torch.device``."""
    import torch
    try:
        dev = torch.device(value)
        if dev.type == "meta":
            raise ValueError("a meta tensor holds no values to prune")
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PruningInputError(f"--device: {value!r} is not usable here ({why}); e.g. --device cpu, or cuda with a "
                                "CUDA build of torch and a GPU") from None
    return dev


def check_sparsity_spec(spec: str) -> None:
    """``--sparsity``: a fraction in [0, 1) or an N:M pattern with 0 < N < M (the parser every route uses)."""
    from .experiment import sparsity_args
    try:
        sparsity_args(spec)
    except PruningInputError as e:
        raise PruningInputError(f"--{e}") from None


def check_prune_args(args) -> tuple | None:
    """Every ``prune`` flag checked before anything is loaded (the model load takes minutes).  The parser leaves
    a main-job flag that was not given at ``None``, so a flag given with its default value is still seen (and
    refused on the other route); the defaults are filled in here.  Returns the main job's texts (read to check
    the window counts; ``setup_smollm2`` takes them instead of reading them again), ``None`` on the other route."""
    import os
    _check_threads(args)
    args.device = check_device(args.device)
    if args.model is not None or args.config is not None:   # the Hugging Face route: settings from --config
        for name in MAIN_ONLY:
            if getattr(args, name, None) is not None:
                raise PruningInputError(f"{_flag(name)}: belongs to the main job; with --model / --config the "
                                        "pruning settings come from the config file")
        if not (args.model and args.config and args.out):
            raise PruningInputError("--model, --config and --out go together")
        if not os.path.isdir(args.model):
            raise PruningInputError(f"--model: {args.model!r} is not a model folder (nothing loads from a hub)")
        if not (os.path.isfile(args.config) or os.path.isfile(os.path.join(args.config, "pruning_config.json"))):
            raise PruningInputError(f"--config: {args.config!r} is neither a pruning_config.json file nor a folder "
                                    "holding one")
        if args.calibration is not None and not os.path.isfile(args.calibration):
            raise PruningInputError(f"--calibration: no such file {args.calibration!r}")
        check_writable(args.out, "--out", folder=True)
        return None
    for name, default in MODEL_ONLY.items():
        if getattr(args, name) != default:
            raise PruningInputError(f"{_flag(name)}: goes with --model and --config (pruning a saved Transformers "
                                    "model); the main job takes --save, --json and its own flags")
    for name, default in MAIN_ONLY.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    check_sparsity_spec(args.sparsity)
    for name in ("calib", "eval", "seq_len", "iterations", "grad_subsets"):
        if getattr(args, name) < 1:
            raise PruningInputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.blocks is not None and not 1 <= args.blocks <= SMOLLM2_BLOCKS:
        raise PruningInputError(f"--blocks: must be in 1..{SMOLLM2_BLOCKS} (SmolLM2-135M's decoder blocks; or left "
                                f"out for all), got {args.blocks}")
    if args.json is not None:
        check_writable(args.json, "--json", folder=False)
    if args.save is not None:
        check_writable(args.save, "--save", folder=True)
    from .experiment import check_windows, load_texts
    texts = load_texts()   # seconds; the model load takes much longer
    try:
        check_windows(*texts, args.calib, args.eval, args.seq_len)
    except PruningInputError as e:
        raise PruningInputError(f"--{e}") from None
    return texts


def prune_for_save(setup, method: str, sparsity: str, curvature, *, iterations: int, grad_subsets: int,
                   progress: bool):
    """Prune ``setup``'s model with the chosen method (``run_rows`` restored the dense weights after every
    method) so that what ``--save`` writes is the pruned model; returns the plan."""
    from . import api
    from .experiment import sparsity_args
    from .methods.magnitude import MagnitudeConfig, WandaConfig
    from .methods.obs_iht import OBSIHTConfig
    amount, nm = sparsity_args(sparsity)
    if method == "obs_iht":
        return api.prune(OBSIHTConfig(iterations=iterations, nm=nm, grad_subsets=grad_subsets, progress=progress),
                         curvature=curvature, amount=amount)
    if method == "wanda":
        return api.prune(WandaConfig(nm=nm), curvature=curvature, amount=amount)
    if method == "magnitude":  # as run_rows' magnitude row
        return api.prune(MagnitudeConfig(allocation="uniform", nm=nm), targets=setup.targets, amount=amount)
    raise PruningInputError(f"--method: unknown {method!r}")


def cmd_prune(args) -> int:
    texts = check_prune_args(args)
    if args.model is not None or args.config is not None:  # the Hugging Face route (issue 15)
        return cmd_prune_model(args)
    import os

    import torch

    from .experiment import dense_row, run_rows, setup_smollm2
    from .lm import save_plain

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    progress = not args.quiet
    print(f"obs-prune: loading SmolLM2-135M-Instruct (packaged GGUF, dequantized to fp32) and the calibration and held-out texts ...",
          flush=True)
    setup = setup_smollm2(n_calib=args.calib, n_eval=args.eval, seq_len=args.seq_len, blocks=args.blocks,
                          texts=texts)
    setup.model.to(args.device)   # the windows follow, one batch at a time
    dense = dense_row(setup, progress)
    rows = [dense]
    methods = ["magnitude"] + ([args.method] if args.method != "magnitude" else [])
    more, curv = run_rows(setup, args.sparsity, methods, iterations=args.iterations, progress=progress,
                          grad_subsets=args.grad_subsets,
                          sequential=False if args.sequential == "off" else args.sequential)
    rows += more
    texts = list(setup.heldout)
    for r in rows:
        for h in texts:
            r[f"ppl_{h}"] = r["ppl"][h]
            r[f"x_{h}"] = r["ppl"][h] / dense["ppl"][h]
    print()
    print(f"SmolLM2-135M one-shot pruning of {len(setup.targets)} Linear weights in model.layers "
          f"(lm_head/embeddings kept); calibration {setup.info['calib']}; held-out {setup.info['heldout']}")
    cols = [("method", "method", ""), ("sparsity", "target", ""), ("measured_sparsity", "sparsity", ".3f")]
    for h in texts:
        cols += [(f"ppl_{h}", f"ppl {h}", ".2f"), (f"x_{h}", "x dense", ".3f")]
    print(_table(rows, cols + [("prune_seconds", "prune s", ".1f")]))
    if curv is not None:
        setup_s = (getattr(curv, "info", None) or {}).get("seconds", 0.0)
        how = (f"sequential ({'stage by stage' if curv.stages == 'sublayer' else 'block by block'}), inside each plan "
               f"(set-up check pass {setup_s:.1f} s, not in the rows' prune times)"
               if curv.sequential else f"one pass, {setup_s:.1f} s (not in the rows' prune times)")
        print(f"layer curvature ({len(setup.targets)} layers): {how}; "
              f"model load {setup.load_seconds:.1f} s; total {time.perf_counter() - t_all:.1f} s")
    for r in rows:
        for h in r.get("history", []):
            print(f"  OBS-IHT iteration {h['iteration']}: held-out calibration loss {h['holdout_loss']:.4f}"
                  + (f" (step {h['step_size']}, accepted={h.get('accepted')})" if h["iteration"] > 1 else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "setup": setup.info}, f, indent=2, default=str)
    if args.save:
        # re-run the chosen method and save the baked model in Hugging Face format (safetensors)
        prune_for_save(setup, args.method, args.sparsity, curv, iterations=args.iterations,
                       grad_subsets=args.grad_subsets, progress=progress)
        save_plain(setup.model, args.save)   # a GGUF-loaded model is saved as the plain model it is
        setup.tokenizer.save_pretrained(args.save)
        print(f"saved the pruned model to {args.save}")
    bad = [r for r in rows if any(v != v for v in r["ppl"].values())]
    return 1 if bad else 0


def user_path(value: str) -> str:
    """A path argument with ``~`` expanded (the shell leaves ``--json=~/r.json`` alone)."""
    import os
    return os.path.expanduser(value)


def add_model_arguments(p) -> None:
    """``--model PATH --config pruning_config.json --out DIR``: prune a saved Transformers model by its config."""
    p.add_argument("--model", default=None, type=user_path,
                   help="prune this saved Transformers model folder instead of the main "
                   "job (with --config and --out)")
    p.add_argument("--config", default=None, type=user_path, help="a pruning_config.json (or the folder holding one)")
    p.add_argument("--out", default=None, type=user_path,
                   help="where to save the pruned model, its config and prune_report.json")
    p.add_argument("--calibration", default=None, type=user_path,
                   help="a UTF-8 text file for calibration (default: the packaged "
                   "Shakespeare plays); methods without curvature (magnitude) need none")
    p.add_argument("--export", default=None, choices=["onnx"], help="also export model.onnx and verify it")


def cmd_prune_model(args) -> int:
    import os
    from obs_plugins.integrations.optimum import Pruner, PruningConfig
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cfg_path = args.config
    if os.path.isdir(cfg_path):
        cfg_path = os.path.join(cfg_path, PruningConfig.CONFIG_NAME)
    try:
        with open(cfg_path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise PruningInputError(f"--config: {cfg_path!r} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise PruningInputError(f"--config: {cfg_path!r} holds a {type(data).__name__}, not a config object")
    cfg = PruningConfig.from_dict(data)
    pruner = Pruner.from_pretrained(args.model)
    pruner.model.to(args.device)
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


LIMIT_TRAIN_ROWS = 55000  # the Fashion-MNIST training images limit draws from (the last 5000 are left out)
LIMIT_BATCH = 128


def check_limit_args(args) -> None:
    """Every ``limit`` flag checked before anything is loaded or trained."""
    import math
    _check_threads(args)
    if not 1e-4 <= args.step < 1.0:
        raise PruningInputError(f"--step: the sweep grid step must lie in [1e-4, 1), got {args.step}")
    for name in ("epochs", "steps", "probes", "hvp_samples", "batches"):
        if getattr(args, name) < 1:
            raise PruningInputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.batches * LIMIT_BATCH > LIMIT_TRAIN_ROWS:
        raise PruningInputError(f"--batches: {args.batches} batches of {LIMIT_BATCH} need "
                                f"{args.batches * LIMIT_BATCH} training images, there are {LIMIT_TRAIN_ROWS} "
                                f"(at most {LIMIT_TRAIN_ROWS // LIMIT_BATCH} batches)")
    if args.epsilon is None and args.batches < 2:
        raise PruningInputError(f"--batches: the default --epsilon (the std of the per-batch loss) needs at least "
                                f"2 batches, got {args.batches}")
    if args.hvp_samples > LIMIT_TRAIN_ROWS:
        raise PruningInputError(f"--hvp-samples: at most {LIMIT_TRAIN_ROWS} training images, got {args.hvp_samples}")
    if any(h < 1 for h in args.hidden):
        raise PruningInputError(f"--hidden: every hidden size must be >= 1, got {args.hidden}")
    if not (math.isfinite(args.l1) and args.l1 >= 0):
        raise PruningInputError(f"--l1: must be a finite number >= 0, got {args.l1}")
    if args.epsilon is not None and not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise PruningInputError(f"--epsilon: must be a finite number > 0 (or left out), got {args.epsilon}")
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise PruningInputError(f"--tolerance: must be a finite number >= 0, got {args.tolerance}")
    if args.save_model:
        check_writable(args.save_model, "--save-model", folder=False)
    if args.report:
        check_writable(args.report, "--report", folder=False, stem=True)


def cmd_limit(args) -> int:
    """Pruning-limit estimate (obs_plugins.limit) on a Fashion-MNIST MLP trained here, or on a saved model."""
    check_limit_args(args)  # refuse bad input before any training
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .data import load_fashion_mnist
    from .limit import default_sparsities, estimate

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    x, xt = x.float().div(255).reshape(-1, 784), xt.float().div(255).reshape(-1, 784)
    if args.model:
        model = torch.load(args.model, weights_only=False, map_location="cpu")
        if not isinstance(model, nn.Module):
            raise PruningInputError(f"--model: {args.model} does not hold a pickled nn.Module (torch.save(model))")
        model.eval()
        print(f"obs-prune limit: loaded {args.model}", flush=True)
    else:
        dims = (784, *args.hidden, 10)
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
        model = nn.Sequential(*layers)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        print(f"obs-prune limit: training a {'-'.join(map(str, dims))} MLP on Fashion-MNIST for {args.epochs} "
              f"epoch(s){f' with l1 {args.l1:g}' if args.l1 else ''} ...", flush=True)
        g = torch.Generator().manual_seed(args.seed)
        for _ in range(args.epochs):
            perm = torch.randperm(LIMIT_TRAIN_ROWS, generator=g)
            for i in range(0, LIMIT_TRAIN_ROWS, LIMIT_BATCH):
                idx = perm[i:i + LIMIT_BATCH]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                if args.l1:  # the paper's l1 penalty on the weights
                    loss = loss + args.l1 * sum(m.weight.abs().sum() for m in model if isinstance(m, nn.Linear))
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        if args.save_model:
            import os
            os.makedirs(os.path.dirname(os.path.abspath(args.save_model)), exist_ok=True)
            torch.save(model, args.save_model)
    g = torch.Generator().manual_seed(args.seed + 1)
    pick = torch.randperm(LIMIT_TRAIN_ROWS, generator=g)
    data = [(x[pick[i:i + LIMIT_BATCH]], y[pick[i:i + LIMIT_BATCH]])
            for i in range(0, LIMIT_BATCH * args.batches, LIMIT_BATCH)]
    hvp = [(x[pick[i:min(i + 512, args.hvp_samples)]], y[pick[i:min(i + 512, args.hvp_samples)]])
           for i in range(0, args.hvp_samples, 512)]
    test = [(xt[i:i + 1000], yt[i:i + 1000]) for i in range(0, 10000, 1000)]
    t0 = time.perf_counter()
    rep = estimate(model, data, F.cross_entropy, hvp_data=hvp, steps=args.steps, probes=args.probes,
                   epsilon=args.epsilon, sweep=not args.no_sweep, eval_data=test,
                   sparsities=None if args.no_sweep else default_sparsities(args.step),
                   acc_tolerance=args.tolerance, seed=args.seed, label="Fashion-MNIST", progress=not args.quiet)
    print(rep.to_markdown())
    print(f"estimate{' and sweep' if not args.no_sweep else ''}: {time.perf_counter() - t0:.1f} s")
    if args.report:
        js, md = rep.save(args.report)
        rep.plot(str(js.with_suffix(".png")))
        print(f"wrote {js}, {md}, {js.with_suffix('.png')}")
    return 0


BENCHES = {"llm": "benchmarks/one_shot_llm.py", "curvature": "benchmarks/curvature.py",
           "tickets": "benchmarks/tickets.py", "tickets-sweep": "benchmarks/tickets_sweep.py",
           "onnx": "benchmarks/onnx_speed.py", "limit": "benchmarks/limit.py", "bip": "benchmarks/bip.py",
           "allocation": "benchmarks/allocation.py", "llmc": "benchmarks/vs_llmcompressor.py",
           "iht-direction": "benchmarks/iht_direction.py", "sweep": "benchmarks/sweep_speed.py"}


def cmd_bench(args) -> int:
    import os
    import runpy
    path = BENCHES[args.name]
    if not os.path.exists(path):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(root, path)):   # the benchmarks read and write benchmarks/... from the root
            print(f"obs-prune bench: run it from the checkout's root (cd {root}), where {path} and its "
                  "benchmarks/results live", file=sys.stderr)
            return 2
        print(f"obs-prune bench: {path} not found; run it from a checkout of the obs-plugins repository",
              file=sys.stderr)
        return 2
    sys.argv = [path] + args.rest
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))   # as `python <path>` does: benchmarks/_common.py
    runpy.run_path(path, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="obs-prune", description=(
        "Second-order (OBS-IHT) and learned-mask pruning. Without a subcommand: the main job (prune "
        "SmolLM2-135M with OBS-IHT beside magnitude and print a report)."))
    sub = p.add_subparsers(dest="command")
    pr = sub.add_parser("prune", help="prune a real pretrained model and report quality and time (default)",
                        description="One-shot pruning of SmolLM2-135M-Instruct (packaged, offline) calibrated on "
                        "a mixed English set (Shakespeare, the King James Bible, BBC News); perplexity on held-out Shakespeare "
                        "plays and on Jane Austen's novels: dense vs magnitude vs the chosen method.")
    pr.add_argument("--method", default=None, choices=["obs_iht", "wanda", "magnitude"],
                    help="pruning method (default: obs_iht)")
    pr.add_argument("--sparsity", default=None,
                    help="fraction of each Linear weight to prune (e.g. 0.5) or an N:M pattern (e.g. 2:4)")
    pr.add_argument("--iterations", type=int, default=None,
                    help="OBS-IHT iterations T (1 = the SparseGPT-equivalent OBS sweep; default 2)")
    pr.add_argument("--grad-subsets", type=int, default=None,
                    help="OBS-IHT: each iteration's gradient on every m-th gradient batch in turn (1/m of the cost; "
                         "2 suits a CPU without native bf16; default 1)")
    pr.add_argument("--sequential", default=None, choices=["auto", "block", "sublayer", "off"],
                    help="calibration order: block by block (block), also stage by stage inside each block "
                         "(sublayer), or all Grams on the dense model in one pass (off); default auto")
    pr.add_argument("--calib", type=int, default=None, help="calibration windows (default 32)")
    pr.add_argument("--eval", type=int, default=None, help="held-out windows (default 32)")
    pr.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256)")
    pr.add_argument("--blocks", type=int, default=None,
                    help="prune only the first N of the 30 decoder blocks (quick runs; default: all)")
    pr.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    pr.add_argument("--json", type=user_path, help="also write the report as JSON here")
    pr.add_argument("--save", type=user_path, help="save the pruned model (Hugging Face format) to this folder")
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.add_argument("--device", default="cpu",
                    help="where the model runs: cpu (default), cuda, cuda:1... (calibration activations, Grams and "
                         "the plan wait in CPU memory off the CPU; both routes)")
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
                        description="Pruning-limit estimate of Zhang et al. (NeurIPS 2024): the largest sparsity "
                        "global one-shot magnitude pruning reaches before the loss leaves its tolerance, from the "
                        "Hessian spectrum (SLQ); with the sweep, also the measured limit. Trains a small "
                        "Fashion-MNIST MLP here unless --model gives a saved one (torch.save(model), 784 inputs).")
    li.add_argument("--model", type=user_path, help="a torch.save'd nn.Module taking flattened 28x28 Fashion-MNIST images")
    li.add_argument("--hidden", type=int, nargs="+", default=[128], help="MLP hidden sizes (default 128)")
    li.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    li.add_argument("--l1", type=float, default=0.0, help="l1 penalty lambda*sum|w| during training (paper: LOMP)")
    li.add_argument("--save-model", type=user_path, help="torch.save the trained model here")
    li.add_argument("--steps", type=int, default=64, help="Lanczos steps (default 64; the paper uses 96-128)")
    li.add_argument("--probes", type=int, default=2, help="SLQ probes, averaged (default 2)")
    li.add_argument("--hvp-samples", type=int, default=2048, help="training images the HVPs average over")
    li.add_argument("--batches", type=int, default=40, help="batches of 128 for eps (per-batch loss std)")
    li.add_argument("--epsilon", type=float, default=None, help="loss tolerance (default: per-batch loss std)")
    li.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop allowed by the measured limit")
    li.add_argument("--step", type=float, default=0.01, help="sweep grid step (default 0.01)")
    li.add_argument("--no-sweep", action="store_true", help="only the prediction, no measured limit")
    li.add_argument("--report", type=user_path, help="write <report>.json/.md/.png")
    li.add_argument("--seed", type=int, default=0)
    li.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    li.add_argument("--quiet", action="store_true", help="no progress bars")
    li.set_defaults(func=cmd_limit)

    be = sub.add_parser("bench", help=f"run a benchmark script from benchmarks/ ({', '.join(BENCHES)})",
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
    from .data import AssetMissing
    from .errors import CurvatureError, PruningInputError
    try:
        return args.func(args)
    except (PruningInputError, CurvatureError, AssetMissing, ValueError, OSError) as e:
        print(f"obs-prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
