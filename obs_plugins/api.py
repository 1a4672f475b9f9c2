"""High-level one-call pruning on the registry: what the CLI and benchmarks use (and users may too)."""
from __future__ import annotations

import time

import torch

from .curvature import Curvature
from .errors import PruningInputError
from .masks import PrunePlan, count_to_prune, parse_nm
from .registry import get_method, method_of_config
from .targets import check_targets


def plan(config, *, curvature: Curvature | None = None, targets=None, amount=0.5) -> PrunePlan:
    """Compute (not apply) the plan of a registered one-shot method for ``amount`` of the targets."""
    spec = method_of_config(config)
    if spec.kind != "one-shot":
        raise PruningInputError(f"config: {spec.name} is a learned method; train it with its own trainer")
    if targets is not None:
        targets = list(targets)
        if not targets:
            raise PruningInputError("targets: empty")
    if curvature is not None:
        if targets is not None and {t.key for t in targets} != {t.key for t in curvature.targets}:
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
