"""High-level one-call pruning on the registry: what the CLI and benchmarks use (and users may too)."""
from __future__ import annotations

import time

import torch

from .curvature import Curvature
from .errors import PruningInputError
from .masks import PrunePlan, count_to_prune, parse_nm
from .registry import get_method, method_of_config
from .targets import Target, check_targets, resolve_targets


def _as_targets(targets) -> list[Target]:
    """``Target``s, or torch's ``(module, name)`` pairs (as ``prune.global_unstructured`` takes them)."""
    if isinstance(targets, (str, bytes, Target)) or not hasattr(targets, "__iter__"):
        raise PruningInputError(f"targets: a list of Target or (module, name) pairs, got {type(targets).__name__}")
    targets = list(targets)
    if not targets:
        raise PruningInputError("targets: empty")
    if all(isinstance(t, Target) for t in targets):
        return targets
    for i, t in enumerate(targets):
        if isinstance(t, Target):
            raise PruningInputError(f"targets[{i}]: mixes a Target with (module, name) pairs; give one kind")
    try:
        return resolve_targets(None, targets)
    except PruningInputError as e:
        msg = str(e)
        raise PruningInputError("targets" + msg.removeprefix("params") if msg.startswith("params") else msg) from None


def plan(config, *, curvature: Curvature | None = None, targets=None, amount=0.5) -> PrunePlan:
    """Compute (not apply) the plan of a registered one-shot method for ``amount`` of the targets.

    ``targets``: ``Target``s or ``(module, name)`` pairs; with ``curvature`` they must be the curvature's tensors
    (the plan then uses the curvature's targets and keys)."""
    spec = method_of_config(config)
    if spec.kind != "one-shot":
        raise PruningInputError(f"config: {spec.name} is a learned method; train it with its own trainer")
    if targets is not None:
        targets = _as_targets(targets)
    if curvature is not None:
        same = (lambda ts: {(id(t.module), t.name) for t in ts})
        if targets is not None and same(targets) != same(curvature.targets):
            raise PruningInputError(
                f"targets: {sorted(t.key for t in targets)[:4]}... differ from the curvature's targets "
                f"{sorted(curvature.keys)[:4]}...; a plan covers exactly the curvature's targets, so collect the "
                "curvature over the tensors to prune (or give only curvature=)")
        targets = curvature.targets
    if targets is None:
        raise PruningInputError("targets: give curvature= or targets=")
    check_targets(targets)   # finite values on one real device, before anything is counted
    nm = parse_nm(getattr(config, "nm", None))
    if nm is not None and (isinstance(amount, bool) or not isinstance(amount, (int, float))
                           or abs(float(amount) - nm[0] / nm[1]) > 1e-9):
        raise PruningInputError(f"amount={amount!r} does not match nm={config.nm} (an N:M pattern prunes exactly "
                                f"{nm[0] / nm[1]}; use amount={nm[0] / nm[1]})")
    avail = sum(int(t.prior_mask().sum()) for t in targets)
    k = None if nm else count_to_prune(amount, avail)
    if spec.name == "magnitude":
        return spec.handler(targets, k, config)
    if curvature is None:
        raise PruningInputError(f"curvature: method {spec.name!r} needs curvature=Curvature.layerwise(...)")
    return spec.handler(curvature, k, config)


def prune(config, *, curvature: Curvature | None = None, targets=None, amount=0.5,
          reparametrize: bool = False) -> PrunePlan:
    """Plan then apply atomically; ``reparametrize=True`` leaves torch.nn.utils.prune masks, else bakes."""
    t0 = time.perf_counter()
    p = plan(config, curvature=curvature, targets=targets, amount=amount)
    p.apply(reparametrize=reparametrize)
    p.report["seconds"] = time.perf_counter() - t0
    p.report["sparsity"] = p.sparsity()
    return p


def snapshot(targets) -> dict[str, torch.Tensor]:
    return {t.key: t.orig().detach().clone() for t in targets}


def restore(targets, snap) -> None:
    with torch.no_grad():
        for t in targets:
            t.orig().copy_(snap[t.key])


__all__ = ["plan", "prune", "snapshot", "restore", "get_method"]
