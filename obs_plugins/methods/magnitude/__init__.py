"""Baselines on the same plan/mask machinery: magnitude and Wanda (Sun et al. 2023, |W| * ||x_j||)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import PruningInputError
from ...masks import PrunePlan, allocate_global, allocate_uniform, as_scores, lowest_k_mask, nm_mask, parse_nm
from ...registry import register_method
from ...targets import Target, check_targets, from_2d, to_2d


@dataclass
class MagnitudeConfig:
    """|w| pruning. allocation "global" (torch's global_unstructured with L1Unstructured) or "uniform"."""
    allocation: str = "global"
    nm: str | None = None

    def validate(self) -> None:
        if self.allocation not in ("uniform", "global"):
            raise PruningInputError(f"allocation: 'uniform' or 'global', got {self.allocation!r}")
        parse_nm(self.nm)


@dataclass
class WandaConfig:
    """Wanda: score |W_ij| * ||X_j||, compared within each output row (needs layer curvature for ||X_j||)."""
    nm: str | None = None

    def validate(self) -> None:
        parse_nm(self.nm)


def _plan_from_scores(targets: list[Target], scores: dict, k_total: int | None, allocation: str, nm, per_row: bool,
                      method: str, prior: dict | None = None) -> PrunePlan:
    if prior is None:
        prior = {t.key: t.prior_mask() for t in targets}
    plan = PrunePlan(report={"method": method})
    if nm is not None:
        for t in targets:
            s2 = to_2d(t.module, scores[t.key])
            keep = nm_mask(s2, *nm, prior_mask=to_2d(t.module, prior[t.key]), what=t.key)
            plan.add(t, from_2d(t.module, keep, t.current()))
        return plan
    counts = allocate_uniform(prior, k_total) if allocation == "uniform" else allocate_global(scores, prior, k_total)
    for t in targets:
        if per_row:  # same number of prunes in every output row (Wanda's comparison group), vectorised
            s2, p2 = as_scores(to_2d(t.module, scores[t.key])), to_2d(t.module, prior[t.key])
            row_counts = allocate_uniform({i: p2[i] for i in range(p2.shape[0])}, counts[t.key])
            n_row = torch.tensor([row_counts[i] for i in range(p2.shape[0])], device=p2.device) + (~p2).sum(1)
            order = torch.sort(s2.masked_fill(~p2, float("-inf")), dim=1, stable=True).indices
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(s2.shape[1], device=order.device).expand_as(order))
            mask = from_2d(t.module, rank >= n_row.unsqueeze(1), t.current())
        else:
            mask = lowest_k_mask(scores[t.key], counts[t.key], prior[t.key])
        plan.add(t, mask)
    return plan


def magnitude_solve(targets: list[Target], k_total: int | None, config: MagnitudeConfig) -> PrunePlan:
    if config.allocation not in ("uniform", "global"):
        raise PruningInputError(f"allocation: 'uniform' or 'global', got {config.allocation!r}")
    check_targets(targets)  # NaN/Inf weights, meta tensors, several devices (the curvature routes check in Curvature)
    scores = {t.key: as_scores(t.current().abs()) for t in targets}
    return _plan_from_scores(targets, scores, k_total, config.allocation, parse_nm(config.nm), False, "magnitude")


def wanda_solve(curvature, k_total: int | None, config: WandaConfig) -> PrunePlan:
    """Wanda's per-row comparison on |W| * ||X_j||; sequentially calibrated when the curvature is (the
    pruned earlier blocks feed later ones), like llm-compressor's Wanda."""
    nm = parse_nm(config.nm)
    targets = curvature.targets
    store = curvature.store_device   # masks wait in CPU memory under offload
    prior = {t.key: t.prior_mask().to(store) for t in targets}
    counts = {t.key: None for t in targets} if nm is not None else allocate_uniform(prior, k_total)
    plan = PrunePlan(report={"method": "wanda", "calibration": "sequential" if curvature.sequential else "one-pass"})

    def layers(block_targets, grams):
        out = {}
        for t in block_targets:
            col_norm = torch.diagonal(grams[t.key]).clamp_min(0).sqrt()  # ∝ ||X_j||
            s2 = as_scores(to_2d(t.module, t.current()).abs()) * as_scores(col_norm).unsqueeze(0)
            scores = from_2d(t.module, s2, t.current())
            # the prior masks read before blockwise: inside it a pruned tensor runs with a unit mask
            # (Curvature._weights), so t.prior_mask() here said nothing was pruned: the earlier zeros were re-pruned
            sub = _plan_from_scores([t], {t.key: scores}, counts[t.key], "uniform", nm, True, "wanda",
                                    prior={t.key: prior[t.key].to(scores.device)})
            e = sub.entries[t.key]
            if curvature.sequential:   # the block runs on its planned weights before the next one
                out[t.key] = t.current() * e.mask
            e.mask = e.mask.to(store)
            plan.entries[t.key] = e
        return out

    curvature.blockwise(targets, layers)
    return plan


register_method("magnitude", MagnitudeConfig, magnitude_solve, kind="one-shot", description="|w| baseline")
register_method("wanda", WandaConfig, wanda_solve, kind="one-shot", description="|w|·||x|| per output row")

__all__ = ["MagnitudeConfig", "WandaConfig", "magnitude_solve", "wanda_solve"]
