"""Exact mask counts, N:M patterns, prior masks, and the atomic :class:`PrunePlan`.

Conventions: a *mask* is a bool tensor, True = kept.  ``amount`` keeps torch.nn.utils.prune's meaning: a
float in [0, 1] is the fraction of the currently *unpruned* entries to remove, an int their number.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .errors import PruningInputError
from .targets import Target


def normalize_amount(amount, *, arg: str = "amount") -> int | float:
    """torch.nn.utils.prune's ``amount``: a fraction in [0, 1] (float) or a non-negative count (int); numpy
    scalars as torch takes them (np.int64 is a count, np.float32 a fraction)."""
    if isinstance(amount, bool) or not isinstance(amount, (numbers.Integral, numbers.Real)):
        raise PruningInputError(f"{arg}: expected a float in [0, 1] or a non-negative int, got {amount!r}")
    amount = int(amount) if isinstance(amount, numbers.Integral) else float(amount)
    if isinstance(amount, float) and (not (0.0 <= amount <= 1.0) or math.isnan(amount)):
        raise PruningInputError(f"{arg}={amount} is outside [0, 1]")
    if isinstance(amount, int) and amount < 0:
        raise PruningInputError(f"{arg}={amount} must be non-negative")
    return amount


def count_to_prune(amount, n_available: int, *, arg: str = "amount") -> int:
    """Number of entries to prune, exactly as torch.nn.utils.prune computes it (round half to even)."""
    amount = normalize_amount(amount, arg=arg)
    if isinstance(amount, float):
        return round(amount * n_available)
    if amount > n_available:
        raise PruningInputError(f"{arg}={amount} is larger than the number of unpruned entries ({n_available})")
    return int(amount)


def parse_nm(pattern) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): prune N of every M consecutive input weights."""
    if pattern is None:
        return None
    if isinstance(pattern, str):
        try:
            n, m = (int(x) for x in pattern.split(":"))
        except ValueError:
            raise PruningInputError(f"nm: expected 'N:M' such as '2:4', got {pattern!r}") from None
    elif isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in pattern):
        n, m = pattern
    else:
        raise PruningInputError(f"nm: None or an 'N:M' pattern such as '2:4', got {pattern!r}")
    if not (0 < n < m):
        raise PruningInputError(f"nm: need 0 < N < M, got {n}:{m}")
    return n, m


def as_scores(x: torch.Tensor) -> torch.Tensor:
    """Scores compared in at least float32, and in float64 for a float64 model: ranking an fp64 model's weights
    in float32 would make weights that differ below float32's resolution tie and break by position, where
    torch's own pruning compares them in float64."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32))


def lowest_k_mask(scores: torch.Tensor, k: int, prior_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask pruning exactly ``k`` of the currently kept entries, those with the lowest score.

    Entries already pruned in ``prior_mask`` stay pruned and are not counted in ``k``.  Ties are broken by
    position (stable sort), so the result is deterministic.
    """
    flat = as_scores(scores).reshape(-1)
    keep = torch.ones_like(flat, dtype=torch.bool) if prior_mask is None else prior_mask.reshape(-1).bool().clone()
    avail = int(keep.sum())
    if not 0 <= k <= avail:
        raise PruningInputError(f"amount: cannot prune {k} of {avail} remaining entries")
    if k == 0:
        return keep.reshape(scores.shape)
    idx = keep.nonzero().squeeze(1)           # only the entries still kept compete (a NaN / +inf score tied
    s = torch.nan_to_num(flat[idx], nan=float("inf"))   # with the prior zeros' +inf and could pick one of them)
    # the k lowest, ties by position -- what a stable sort's first k are, in linear time: everything below the
    # k-th smallest value, then the earliest entries equal to it
    kth = torch.kthvalue(s, k).values
    below = s < kth
    tied = (s == kth).nonzero().squeeze(1)[: k - int(below.sum())]
    below[tied] = True
    keep[idx[below]] = False
    return keep.reshape(scores.shape)


def nm_mask(scores_2d: torch.Tensor, n: int, m: int, prior_mask: torch.Tensor | None = None, *,
            what: str = "the layer") -> torch.Tensor:
    """N:M keep-mask along the input dimension (columns) of a (rows, cols) score matrix."""
    rows, cols = scores_2d.shape
    if cols % m:
        raise PruningInputError(f"nm: {n}:{m} needs every layer's input width to be a multiple of {m}; {what} has "
                                f"{cols} (leave it out of the pruned tensors: params, or a PruningConfig's exclude)")
    s = as_scores(scores_2d).reshape(rows, cols // m, m)
    if prior_mask is not None:  # prior zeros count towards the N pruned of their group
        s = s.masked_fill(~prior_mask.reshape(rows, cols // m, m).bool(), float("-inf"))
    idx = torch.sort(s, dim=-1, stable=True).indices[..., :n]
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(-1, idx, False)
    if prior_mask is not None:
        keep &= prior_mask.reshape(rows, cols // m, m).bool()
    return keep.reshape(rows, cols)


def allocate_global(saliency: dict[str, torch.Tensor], prior: dict[str, torch.Tensor], k_total: int, *,
                    min_prune: dict[str, int] | None = None, max_prune: dict[str, int] | None = None) -> dict[str, int]:
    """Per-tensor prune counts from one global ranking of comparable saliencies (lowest pruned first).

    ``min_prune`` / ``max_prune`` bound each tensor's count: its ``min_prune`` lowest entries go first, then
    the rest of ``k_total`` follows the global ranking, skipping tensors at ``max_prune`` — exactly the greedy
    walk down the sorted list.  Ties break by position in the concatenation (deterministic)."""
    keys = list(saliency)
    avail = {k: int(prior[k].sum()) for k in keys}
    lo = {k: int((min_prune or {}).get(k, 0)) for k in keys}
    hi = {k: int((max_prune or {}).get(k, avail[k])) for k in keys}
    for k in keys:
        if not 0 <= lo[k] <= hi[k] <= avail[k]:
            raise PruningInputError(f"allocation bounds for {k}: need 0 <= min ({lo[k]}) <= max ({hi[k]}) <= "
                                    f"unpruned entries ({avail[k]})")
    total = sum(avail.values())
    if not 0 <= k_total <= total:
        raise PruningInputError(f"amount: cannot prune {k_total} of {total} remaining entries")
    if not sum(lo.values()) <= k_total <= sum(hi.values()):
        raise PruningInputError(f"amount: {k_total} new prunes do not fit the per-layer bounds "
                                f"({sum(lo.values())}..{sum(hi.values())})")
    free_vals, free_owner = [], []
    for i, k in enumerate(keys):
        s = torch.nan_to_num(as_scores(saliency[k]).reshape(-1).masked_fill(~prior[k].reshape(-1), float("inf")),
                             nan=float("inf"))
        ranked = torch.sort(s, stable=True).values
        free_vals.append(ranked[lo[k]:hi[k]])
        free_owner.append(torch.full((hi[k] - lo[k],), i, dtype=torch.long))
    counts = dict(lo)
    rest = k_total - sum(lo.values())
    if rest:
        order = torch.sort(torch.cat(free_vals), stable=True).indices[:rest]
        owner = torch.cat(free_owner)[order.cpu()]   # saliencies on a CUDA model: indices back to the CPU
        for i, c in zip(*torch.unique(owner, return_counts=True)):
            counts[keys[int(i)]] += int(c)
    return counts


def allocate_uniform(prior: dict[str, torch.Tensor], k_total: int) -> dict[str, int]:
    """Per-tensor prune counts proportional to each tensor's remaining entries, summing exactly to k_total."""
    keys = list(prior)
    avail = [int(prior[k].sum()) for k in keys]
    total = sum(avail)
    if not 0 <= k_total <= total:
        raise PruningInputError(f"amount: cannot prune {k_total} of {total} remaining entries")
    counts, acc, done = {}, 0, 0
    for k, a in zip(keys, avail):  # cumulative rounding: exact total, each within 1 of its share
        acc += a
        target = round(k_total * acc / total) if total else 0
        counts[k] = target - done
        done = target
    return counts


def allocate_proportional(weights: dict[str, float], prior: dict[str, torch.Tensor], k_total: int) -> dict[str, int]:
    """Per-tensor prune counts proportional to ``weights`` (>= 0), none above a tensor's remaining entries,
    summing exactly to ``k_total``: what a capped tensor cannot take goes to the others in proportion
    (water-filling), then cumulative rounding."""
    keys = list(prior)
    avail = {k: int(prior[k].sum()) for k in keys}
    if not 0 <= k_total <= sum(avail.values()):
        raise PruningInputError(f"amount: cannot prune {k_total} of {sum(avail.values())} remaining entries")
    share = {k: 0.0 for k in keys}
    free, left = [k for k in keys if avail[k] > 0], float(k_total)
    while free and left > 1e-9:
        w = sum(max(0.0, float(weights[k])) for k in free)
        if w <= 0:  # no weight left on the free tensors: spread the rest by their room
            w, wt = sum(avail[k] - share[k] for k in free), {k: avail[k] - share[k] for k in free}
        else:
            wt = {k: max(0.0, float(weights[k])) for k in free}
        full = [k for k in free if share[k] + left * wt[k] / w >= avail[k]]
        if not full:
            for k in free:
                share[k] += left * wt[k] / w
            left = 0.0
            break
        for k in full:
            left -= avail[k] - share[k]
            share[k] = float(avail[k])
        free = [k for k in free if k not in full]
    counts, acc, done = {}, 0.0, 0
    for k in keys:  # cumulative rounding: exact total, each within 1 of its share (and never above avail)
        acc += share[k]
        target = min(k_total, round(acc))
        counts[k] = min(avail[k], target - done)
        done += counts[k]
    for k in keys:  # rounding left a remainder (a capped tensor refused its extra one): give it where room is
        extra = min(k_total - done, avail[k] - counts[k])
        counts[k] += extra
        done += extra
    return counts


@dataclass
class PlanEntry:
    target: Target
    mask: torch.Tensor                    # bool, shape of the parameter, True = kept
    new_weight: torch.Tensor | None = None  # values for the kept entries (e.g. OBS-updated); None = unchanged


@dataclass
class PrunePlan:
    """Everything a method decided, computed completely before anything is written to the model."""
    entries: dict[str, PlanEntry] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    solver_state: dict = field(default_factory=dict, repr=False)  # e.g. OBS-IHT's inverse factors, for reuse

    def add(self, target: Target, mask: torch.Tensor, new_weight: torch.Tensor | None = None) -> None:
        shape = target.current().shape
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"plan for {target.key}: mask shape {tuple(mask.shape)} != {tuple(shape)}")
        if new_weight is not None:
            if tuple(new_weight.shape) != tuple(shape):
                raise ValueError(f"plan for {target.key}: weight shape {tuple(new_weight.shape)} != {tuple(shape)}")
            if not torch.isfinite(new_weight).all():
                why = ""
                if new_weight.dtype in (torch.float16, torch.bfloat16) and not torch.isnan(new_weight).any():
                    why = (f": the updated weights exceed {str(new_weight.dtype).replace('torch.', '')}'s range "
                           f"(largest finite {torch.finfo(new_weight.dtype).max:.6g}); prune a float32 copy, or "
                           "raise the damping")
                raise FloatingPointError(f"plan for {target.key}: the solver produced non-finite weights{why}")
        self.entries[target.key] = PlanEntry(target, mask.bool(), new_weight)

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of zeros each tensor will have (prior zeros included)."""
        return {k: 1.0 - int(e.mask.sum()) / max(e.mask.numel(), 1) for k, e in self.entries.items()}

    def sparsity(self) -> float:
        total = sum(e.mask.numel() for e in self.entries.values())
        return 1.0 - sum(int(e.mask.sum()) for e in self.entries.values()) / max(total, 1)

    def apply(self, *, reparametrize: bool = True) -> None:
        """Write the plan.  ``reparametrize=True`` installs torch.nn.utils.prune masks (``<name>_orig`` gets
        the new weights, ``<name>_mask`` the mask); ``False`` writes ``weight * mask`` in place (baked)."""
        from torch.nn.utils import prune  # part of torch

        from torch.nn.utils import parametrize

        from .targets import gated
        for e in self.entries.values():  # validate everything before the first write
            shape = e.target.orig().shape
            if (e.new_weight is not None and e.new_weight.shape != shape) or tuple(e.mask.shape) != tuple(shape):
                raise PruningInputError(f"plan for {e.target.key}: stale shape (the tensor is "
                                        f"{tuple(shape)} now); plan again")
            if gated(e.target.module, e.target.name):   # reading is fine (a plan of w x gate); writing is lost
                raise PruningInputError(
                    f"params: {e.target.key} is gated by a running Continuous Sparsification / BiP search (its "
                    "value is weight x gate, recomputed on every read, so the plan written to it would be lost); "
                    "call the search's finish() first")
            if reparametrize and e.target.name not in e.target.module._parameters \
                    and e.target.name + "_orig" not in e.target.module._parameters \
                    and not parametrize.is_parametrized(e.target.module, e.target.name):
                raise PruningInputError(f"reparametrize: {e.target.key} is not a parameter (a buffer or a plain "
                                        "tensor), which torch.nn.utils.prune masks cannot wrap; apply with "
                                        "reparametrize=False")
            if reparametrize and parametrize.is_parametrized(e.target.module, e.target.name):
                raise PruningInputError(f"reparametrize: {e.target.key} is parametrized (a torch.ao sparsifier's "
                                        "FakeSparsity?), which torch.nn.utils.prune masks cannot wrap; prune it "
                                        "through that sparsifier, or apply with reparametrize=False")
        for e in self.entries.values():
            t = e.target
            with torch.no_grad():
                if e.new_weight is not None:
                    t.orig().copy_(e.new_weight.to(t.orig().dtype))
                if reparametrize:
                    prune.custom_from_mask(t.module, t.name, mask=e.mask.to(t.orig().device))
                else:
                    w = t.orig()
                    w.mul_(e.mask.to(w.device, w.dtype))
                    buf = getattr(t.module, t.name + "_mask", None)
                    if buf is not None and hasattr(t.module, t.name + "_orig"):
                        # a torch.nn.utils.prune mask from before: it records the new zeros too (a later plan
                        # honours them), and the plain tensor its hook keeps shows them now, not at the next forward
                        buf.mul_(e.mask.to(buf.device, buf.dtype))
                        with torch.enable_grad():
                            t.module.__dict__[t.name] = w * buf


def count_to_reach(sparsity: float, targets: Sequence[Target]) -> int:
    """How many more entries to prune so that ``round(sparsity * n)`` of the targets' ``n`` entries are masked,
    the torch.nn.utils.prune masks already on them counted (negative: they already mask more)."""
    n = sum(t.orig().numel() for t in targets)
    masked = n - sum(int(t.prior_mask().sum()) for t in targets)
    return round(sparsity * n) - masked


def bake(targets: Sequence[Target]) -> None:
    """Make the targets' torch.nn.utils.prune masks permanent (``prune.remove``): plain weights again, zeros kept."""
    from torch.nn.utils import prune
    for t in targets:
        if hasattr(t.module, t.name + "_mask"):
            prune.remove(t.module, t.name)


def sparsity_of(tensors: Iterable[torch.Tensor]) -> float:
    tensors = list(tensors)
    total = sum(t.numel() for t in tensors)
    return sum(int((t == 0).sum()) for t in tensors) / max(total, 1)


def model_sparsity(targets: Sequence[Target]) -> float:
    return sparsity_of(t.current() for t in targets)
