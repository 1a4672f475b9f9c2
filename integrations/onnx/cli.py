"""``obs-prune export``: prune a packaged model, export it, verify it and time it (the whole flow from the shell)."""
from __future__ import annotations

import copy
import sys

import torch

from obs_plugins.cli import user_path
from obs_plugins.errors import PruningInputError, check_writable

from .export import export
from .verify import verify


def add_export_arguments(p) -> None:
    """The `obs-prune export` options, added to the argparse parser ``p``."""
    p.add_argument("output", nargs="?", default="obs_export/model.onnx", type=user_path, help="ONNX file to write")
    p.add_argument("--model", default="minilm", choices=["minilm", "smollm2"], help="packaged model (default minilm)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of Linear weights to prune (default 0.5)")
    p.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "obs_iht"],
                   help="pruning method (wanda / obs_iht calibrate on Shakespeare windows; obs_iht runs one "
                        "iteration; default magnitude)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default 1 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--sparse-kernel", default="auto", choices=["auto", "on", "off"],
                   help="rewrite sparse MatMuls to com.microsoft SparseToDenseMatMul (auto: weights >= 80%% zeros)")
    p.add_argument("--sparse-storage", action="store_true", help="store sparse weights as COO (smaller file)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per route and batch (default 20)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timing per batch size; fewer runs (>= 10) once spent (default 60)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--atol", type=float, default=5e-3,
                   help="output tolerance, abs (default 5e-3: fp32 through 30 SmolLM2 blocks drifts ~2e-3)")
    p.add_argument("--report", type=user_path, help="write the report here (.md and .json beside it)")


def _calib_batches(tok, n=8, seq_len=128):
    from obs_plugins.data import load_shakespeare, token_windows
    ids = token_windows(tok, load_shakespeare()[:400_000], n, seq_len)
    return [ids[i:i + 2] for i in range(0, n, 2)]


def run_export_cli(args) -> int:
    """Run `obs-prune export` on parsed ``args``; 0: verified, 1: verification failed, 2: bad input."""
    import obs_plugins
    from obs_plugins import api
    from obs_plugins.data import load_minilm, load_smollm2
    from obs_plugins.registry import get_method
    try:
        if not 0.0 <= args.sparsity < 1.0:
            raise PruningInputError(f"--sparsity: expected a fraction in [0, 1), got {args.sparsity}")
        if any(b < 1 for b in args.batch_sizes):
            raise PruningInputError(f"--batch-sizes: must be positive, got {args.batch_sizes}")
        if args.seq_len < 2:
            raise PruningInputError(f"--seq-len: must be >= 2, got {args.seq_len}")
        for flag, value, low in (("--runs", args.runs, 1), ("--threads", args.threads, 1)):
            if value < low:   # checked before the model is pruned and exported (verify would refuse it after)
                raise PruningInputError(f"{flag}: must be >= {low}, got {value}")
        if not args.budget > 0 or not args.atol > 0:
            raise PruningInputError(f"--budget / --atol: must be > 0, got {args.budget} / {args.atol}")
        check_writable(args.output, "output", folder=False)
        if args.report:
            check_writable(args.report, "--report", folder=False, stem=True)
        torch.manual_seed(0)
        model, tok = load_minilm() if args.model == "minilm" else load_smollm2()
        model.eval()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        dense = copy.deepcopy(model)
        targets = obs_plugins.prunable_linear_targets(model)
        if args.sparsity > 0:
            spec = get_method(args.method)   # the registry: the same names as `obs-prune prune --method`
            # OBS-IHT's further iterations need a task loss; the export CLI calibrates on plain forwards
            cfg = spec.config_cls(iterations=1, progress=False) if spec.name == "obs_iht" else spec.config_cls()
            curv = None
            if spec.name != "magnitude":
                from obs_plugins.curvature import Curvature
                curv = Curvature.layerwise(model, [(t.module, t.name) for t in targets],
                                           _calib_batches(tok, seq_len=args.seq_len),
                                           forward_fn=lambda m, b: m(input_ids=b), progress=False)
            api.prune(cfg, curvature=curv, targets=targets, amount=args.sparsity, reparametrize=True)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, min(tok.vocab_size, 20000), (2, args.seq_len), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        res = export(model, inputs, args.output, sparse_kernel=args.sparse_kernel,
                     sparse_storage=args.sparse_storage)
        print(f"exported {res.path} ({res.file_bytes / 1e6:.1f} MB, {res.seconds:.0f} s)"
              + (f"; sparse-kernel rewrite of {len(res.rewritten)} weights: {res.sparse_kernel_path}"
                 if res.sparse_kernel_path else ""))
        rep = verify(res, model, inputs, batch_sizes=args.batch_sizes, baseline=dense, runs=args.runs,
                     threads=args.threads, raise_on_fail=False, budget_s=args.budget, atol=args.atol)
    except PruningInputError as e:
        print(f"obs-prune export: {e}", file=sys.stderr)
        return 2
    print(rep.to_markdown())
    if args.report:
        md, js = rep.save(args.report)
        print(f"report: {md}, {js}")
    if not rep.ok:
        print("obs-prune export: VERIFICATION FAILED:\n  " + "\n  ".join(rep.info["failures"]), file=sys.stderr)
        return 1
    return 0
