"""The LLM one-shot pruning experiment shared by the CLI main job and benchmarks/one_shot_llm.py:
SmolLM2-135M, calibration on some Shakespeare plays, perplexity on other, held-out plays."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import api
from .curvature import Curvature
from .lm import causal_lm_batches, causal_lm_loss, perplexity
from .methods.magnitude import MagnitudeConfig, WandaConfig
from .methods.obs_iht import OBSIHTConfig
from .targets import prunable_linear_targets

HELDOUT_PLAYS = ("hamlet", "macbeth", "tempest", "othello")
CALIB_PLAYS = ("as_you_like_it", "coriolanus", "cymbeline", "julius_caesar", "lear", "merchant_of_venice",
               "midsummer_nights_dream", "much_ado_about_nothing", "richard_iii", "romeo_and_juliet",
               "twelfth_night", "winters_tale")


def spread_windows(ids: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """``n`` non-overlapping windows spread evenly over a 1-D token stream."""
    if ids.numel() < n * seq_len:
        raise ValueError(f"n/seq_len: {ids.numel()} tokens available, {n * seq_len} needed")
    stride = (ids.numel() - seq_len) // max(n - 1, 1)
    stride = max(stride, seq_len)
    return torch.stack([ids[i * stride:i * stride + seq_len] for i in range(n)])


@dataclass
class LLMSetup:
    model: object
    tokenizer: object
    calib: list
    heldout: list
    targets: list
    load_seconds: float
    info: dict = field(default_factory=dict)


def setup_smollm2(n_calib: int = 32, n_eval: int = 32, seq_len: int = 256, batch_size: int = 4,
                  calib_plays=CALIB_PLAYS, heldout_plays=HELDOUT_PLAYS, blocks: int | None = None) -> LLMSetup:
    """``blocks``: prune only the Linear weights of the first ``blocks`` decoder layers (default: all 30)."""
    from .data import load_shakespeare, load_smollm2
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    enc = lambda plays: tok(load_shakespeare(list(plays)), return_tensors="pt").input_ids[0]  # noqa: E731
    calib = causal_lm_batches(spread_windows(enc(calib_plays), n_calib, seq_len), batch_size)
    held = causal_lm_batches(spread_windows(enc(heldout_plays), n_eval, seq_len), batch_size)
    targets = prunable_linear_targets(model, exclude=("lm_head",))
    if blocks is not None:
        if not 1 <= blocks <= len(model.model.layers):
            raise ValueError(f"blocks: must be in 1..{len(model.model.layers)}, got {blocks}")
        keep = tuple(f"model.layers.{i}." for i in range(blocks))
        targets = [t for t in targets if t.key.startswith(keep)]
    return LLMSetup(model, tok, calib, held, targets, load_s,
                    {"calib": f"{n_calib}x{seq_len} tokens from {len(calib_plays)} plays",
                     "heldout": f"{n_eval}x{seq_len} tokens from {', '.join(heldout_plays)}"})


def sparsity_args(spec: str):
    """'0.5' -> (amount 0.5, nm None); '2:4' -> (0.5, '2:4')."""
    if ":" in spec:
        n, m = (int(x) for x in spec.split(":"))
        return n / m, spec
    return float(spec), None


def run_rows(setup: LLMSetup, sparsity: str, methods=("magnitude", "wanda", "obs_iht"), *, iterations: int = 3,
             curvature: Curvature | None = None, progress: bool = True, step_sizes=None) -> tuple[list[dict], Curvature]:
    """Prune the model with each method at one sparsity (restoring the dense weights in between)."""
    amount, nm = sparsity_args(sparsity)
    snap = api.snapshot(setup.targets)
    if curvature is None and any(m != "magnitude" for m in methods):
        t0 = time.perf_counter()
        curvature = Curvature.layerwise(setup.model, [(t.module, t.name) for t in setup.targets], setup.calib,
                                        loss_fn=causal_lm_loss, progress=progress)
        curvature.info = {"seconds": time.perf_counter() - t0}
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        if method == "magnitude":
            cfg = MagnitudeConfig(allocation="uniform", nm=nm)
            p = api.prune(cfg, targets=setup.targets, amount=amount)
            rows.append(_row(setup, "magnitude", sparsity, p, t0, progress))
        elif method == "wanda":
            p = api.prune(WandaConfig(nm=nm), curvature=curvature, amount=amount)
            rows.append(_row(setup, "Wanda", sparsity, p, t0, progress))
        elif method == "obs_iht":
            from .methods.obs_iht import solve
            kw = {} if step_sizes is None else {"step_sizes": tuple(step_sizes)}
            p1 = api.prune(OBSIHTConfig(iterations=1, nm=nm, progress=progress), curvature=curvature, amount=amount)
            rows.append(_row(setup, "OBS-IHT T=1", sparsity, p1, t0, progress))
            if iterations > 1:  # continue from T=1 (the dense weights are restored: the gradient is taken at
                api.restore(setup.targets, snap)  # the plan's weights through curvature overrides)
                t1 = time.perf_counter()
                p = solve(curvature, None, OBSIHTConfig(iterations=iterations, nm=nm, progress=progress, **kw),
                          initial=p1)
                p.apply(reparametrize=False)
                secs = rows[-1]["prune_seconds"] + time.perf_counter() - t1
                r = _row(setup, f"OBS-IHT best T={p.report['best_iteration']}", sparsity, p, t0, progress)
                r["prune_seconds"], r["history"] = secs, p.report["history"]
                rows.append(r)
        else:
            raise ValueError(f"methods: unknown {method!r}")
        api.restore(setup.targets, snap)
    return rows, curvature


def _row(setup, name, sparsity, plan, t0, progress):
    secs = time.perf_counter() - t0  # pruning time only: taken before the perplexity evaluation
    ppl = perplexity(setup.model, setup.heldout, progress=progress, desc=f"perplexity {name}")
    zeros = sum(int((t.current() == 0).sum()) for t in setup.targets)
    total = sum(t.current().numel() for t in setup.targets)
    return {"method": name, "sparsity": sparsity, "measured_sparsity": zeros / total, "ppl": ppl,
            "prune_seconds": secs}
