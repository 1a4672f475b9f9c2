"""How a global ``amount`` is split over the tensors of one OBS-IHT plan (``OBSIHTConfig.allocation``).

* ``uniform``: the same fraction of every tensor's survivors;
* ``global``: one ranking of loss-comparable OBS saliencies ``sigma_i w_ij^2 / [H^-1]_jj`` under per-layer bounds;
* ``fisher``: one ranking of empirical-Fisher OBS saliencies;
* ``owl``: outlier-weighted layer-wise sparsity (Yin et al., 2023) for stacks of blocks: blocks whose Wanda
  scores ``|w_ij| ||x_j||`` hold more outliers (``> owl_m`` x the block's mean) keep more weights, block
  sparsities spread over ``[s - owl_lambda, s + owl_lambda]`` with mean ``s``.
"""
from __future__ import annotations

import math

import torch

from ...curvature.linalg import inverse_factor
from ...errors import PruningInputError
from ...masks import allocate_global, allocate_proportional, allocate_uniform, as_scores
from ...targets import to_2d


def allocation_counts(curvature, targets, W0, prior, counts_total, counts, config, nm):
    """New prunes per tensor: N:M (None), the caller's ``counts``, or ``config.allocation`` of ``counts_total``."""
    if nm is not None:
        return {k: None for k in W0}, {"allocation": "nm"}
    if counts is not None:
        if set(counts) != set(W0):
            raise PruningInputError(f"counts: expected one count per target {sorted(W0)}, got {sorted(counts)}")
        for k, c in counts.items():
            avail = int(prior[k].sum())
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= avail:
                raise PruningInputError(f"counts: {k} has {avail} unpruned entries; its count must be an int in "
                                        f"[0, {avail}], got {c!r}")
        return counts, {"allocation": "given"}
    if config.allocation == "uniform":
        return allocate_uniform(prior, counts_total), {"allocation": "uniform"}
    if config.allocation == "owl":
        return owl_counts(curvature, targets, W0, prior, counts_total, config.owl_lambda, config.owl_m)
    if config.allocation == "fisher":
        sal = {k: _fisher_saliency(curvature, k).to(prior[k].device) for k in W0}
    else:
        sal = global_saliency(curvature, targets, W0, config.rel_damp)
    lo, hi, bounds = layer_bounds(prior, counts_total, config.layer_min_sparsity, config.layer_max_sparsity)
    return allocate_global(sal, prior, counts_total, min_prune=lo, max_prune=hi), \
        {"allocation": config.allocation, "layer_sparsity_bounds": bounds}


def global_saliency(curvature, targets, W0, rel_damp) -> dict[str, torch.Tensor]:
    """Loss-comparable OBS saliency of every weight: ``sigma_i * w_ij^2 / [H^-1]_jj``.

    ``w^2 / [H^-1]_jj`` is the OBS error of removing ``w_ij`` measured on the layer's own output (its Gram
    ``H``); ``sigma_i`` (the mean squared loss gradient at output ``i`` of the layer) turns that output error
    into loss, the Kronecker-factored empirical Fisher ``F_i ~ sigma_i * H / 2`` of row ``i``.  Layer Grams
    alone are not comparable across layers; the empirical-Fisher diagonal alone sent whole layers to 100%."""
    sens = curvature.output_sensitivity()
    hs = curvature.onepass_hessians([t.key for t in targets])   # not the last sequential plan's (history-free)
    out = {}
    for t in targets:
        k = t.key
        # the Gram may wait in CPU memory (offload): factored on the model's device, one layer at a time
        d = as_scores(torch.diagonal(inverse_factor(hs[k].to(curvature.device), rel_damp, what=f"H of {k}").hinv))
        w = as_scores(W0[k].to(d.device))   # scored on the device, kept where the weights wait (CPU under offload)
        out[k] = (as_scores(sens[k]).unsqueeze(1) * w ** 2 / d.unsqueeze(0)).to(W0[k].device)
    return out


def layer_bounds(prior, counts_total, min_sparsity, max_sparsity):
    """Per-tensor bounds on new prunes from per-layer sparsity bounds (prior zeros count towards them).

    ``max_sparsity=None``: ``min(0.99, s + 0.2)`` with ``s`` the overall sparsity this plan reaches, lifted to
    1.0 when the request cannot be met under it (``s`` near 1, or layers too small for the rounding)."""
    total = sum(p.numel() for p in prior.values())
    zeros = sum(int((~p).sum()) for p in prior.values())
    s = (zeros + counts_total) / max(total, 1)
    hi_s = min(0.99, s + 0.2) if max_sparsity is None else max_sparsity
    lo_s = min_sparsity
    lo, hi = {}, {}
    for k, p in prior.items():
        avail, z = int(p.sum()), int((~p).sum())
        hi[k] = min(avail, max(0, math.floor(hi_s * p.numel() + 1e-9) - z))
        lo[k] = min(hi[k], max(0, math.ceil(lo_s * p.numel() - 1e-9) - z))
    if sum(hi.values()) < counts_total and max_sparsity is None:
        # the default cap cannot hold this request (overall sparsity near 1, or tiny layers): it yields, and
        # every layer may go as far as the request needs (the bound reported is 1.0); the floors follow
        hi_s, hi = 1.0, {k: int(p.sum()) for k, p in prior.items()}
        lo = {k: min(hi[k], max(0, math.ceil(lo_s * p.numel() - 1e-9) - int((~p).sum()))) for k, p in prior.items()}
    if sum(hi.values()) < counts_total:
        raise PruningInputError(f"layer_max_sparsity={hi_s:.4g}: the layers cannot hold {counts_total} new prunes "
                                f"under this cap (at most {sum(hi.values())}); raise it")
    if sum(lo.values()) > counts_total:
        raise PruningInputError(f"layer_min_sparsity={lo_s:.4g}: every layer at this floor already needs "
                                f"{sum(lo.values())} new prunes, more than the {counts_total} asked; lower it")
    return lo, hi, {"min": lo_s, "max": hi_s}


def _fisher_saliency(curvature, key):
    """allocation='fisher': the empirical-Fisher OBS saliency of the model loss (needs Fisher blocks)."""
    if key not in (getattr(curvature, "fisher", None) or {}):
        raise PruningInputError(f"allocation='fisher' needs Fisher curvature for {key} (collect it with "
                                "curv.collect_fisher(...)); or use allocation='global' or 'uniform'")
    from ...curvature.fisher import obs_saliency
    return as_scores(to_2d(curvature.target_by_key(key).module, obs_saliency(curvature, key)))


def owl_counts(curvature, targets, W0, prior, counts_total, lam: float, m: float):
    """New prunes per tensor under OWL: block ``l`` of the model's block stack gets density
    ``(1 - s) + (r_l - mean r)``, with ``r`` the blocks' outlier ratios rescaled to ``[0, 2 lam]``; every tensor of
    a block gets that block's sparsity; the counts are then made exact (:func:`allocate_proportional`)."""
    from ...curvature.collect import block_stack
    blocks = block_stack(curvature.model, targets)
    if blocks is None:
        raise PruningInputError("allocation='owl' needs every target inside one stack of blocks (an nn.ModuleList "
                                "such as model.layers), each in one block (a layer shared by two blocks has no "
                                "single block sparsity); use 'global' or 'uniform'")
    owner = {}
    for i, blk in enumerate(blocks):
        for mod in blk.modules():
            owner[id(mod)] = i
    by_block: dict[int, list] = {}
    for t in targets:
        by_block.setdefault(owner[id(t.module)], []).append(t)
    ratio = {}
    hs = curvature.onepass_hessians([t.key for t in targets])
    for i, ts in by_block.items():
        scores = torch.cat([(W0[t.key].abs() * torch.diagonal(hs[t.key]).clamp_min(0).sqrt()
                             .unsqueeze(0).to(W0[t.key].device))[prior[t.key]].flatten() for t in ts])
        ratio[i] = float((scores > m * scores.mean()).float().mean()) if scores.numel() else 0.0
    lo, hi = min(ratio.values()), max(ratio.values())
    scaled = {i: (r - lo) / (hi - lo) * 2 * lam if hi > lo else lam for i, r in ratio.items()}
    total = sum(p.numel() for p in prior.values())
    zeros = sum(int((~p).sum()) for p in prior.values())
    s = (zeros + counts_total) / max(total, 1)
    mean = sum(scaled.values()) / len(scaled)
    block_sparsity = {i: min(1.0, max(0.0, s - (scaled[i] - mean))) for i in scaled}
    want = {}
    for i, ts in by_block.items():
        for t in ts:
            p = prior[t.key]
            want[t.key] = max(0.0, block_sparsity[i] * p.numel() - int((~p).sum()))
    counts = allocate_proportional(want, prior, counts_total)
    return counts, {"allocation": "owl", "owl_outlier_ratio": {str(i): ratio[i] for i in sorted(ratio)},
                    "owl_block_sparsity": {str(i): block_sparsity[i] for i in sorted(block_sparsity)},
                    "owl_lambda": lam, "owl_m": m}
