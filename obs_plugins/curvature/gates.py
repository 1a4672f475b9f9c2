"""Curvature in *gate* coordinates: the network loss as a function of one multiplicative gate per structural unit.

A unit (a channel, an attention head) is removed by setting its gate ``m_u`` from 1 to 0, where its consumers
read it: every input feature of a consuming layer that the unit feeds is multiplied by ``m_u``.  Around
``m = 1`` the loss change of removing a set ``S`` is, to second order and with the gradient term dropped as in
OBD/OBS (which assume a trained minimum),

    dL(S) ~ 1/2 1_S^T G 1_S,

where ``G`` is the Gauss-Newton matrix of the mean softmax cross-entropy in gate coordinates,

    G = 1/N sum_i J_i^T (diag p_i - p_i p_i^T) J_i,      J_i = d logits_i / d m  (C x n),

the Fisher of the model's predictive distribution (labels are not needed).  It sees what layer-wise Grams
cannot: how a removal travels through the non-linearities and the later layers to the loss, and how removals in
different layers interact.  ``G`` is kept as a factor ``B`` (``B^T B = G``) of ``N x C`` rows, one per sample
and class: ``B_(i,c) = sqrt(p_ic) (J_i[c] - p_i^T J_i) / sqrt(N)``, since ``sum_c p_c (e_c - p)(e_c - p)^T =
diag p - p p^T``.  Per-sample Jacobians come from per-sample gates (shape ``(batch, n)``), one backward pass per
class and batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..errors import PruningInputError
from .batching import _output_tensor, move


def _gate_hook(index: torch.Tensor, gates_ref: list):
    """Forward pre-hook multiplying the consumer's input features by their gates (per sample)."""
    cols = (index >= 0).nonzero().reshape(-1)
    ids = index[cols]

    def hook(module, args):
        G = gates_ref[0]
        if G is None:
            return None
        x = args[0]
        B = G.shape[0]
        if x.shape[0] != B:
            raise PruningInputError(f"sites: a consumer received a batch of {x.shape[0]} rows where the model "
                                    f"input had {B}; gates need the batch in the leading dimension")
        feat = 1 if isinstance(module, nn.Conv2d) else -1
        n = x.shape[feat]
        if n != index.numel():
            raise PruningInputError(f"sites: a consumer has {n} input features but its gate index has "
                                    f"{index.numel()}")
        g = torch.ones(B, n, dtype=x.dtype, device=x.device)
        g[:, cols.to(x.device)] = G[:, ids.to(x.device)].to(x.dtype)
        shape = [B] + [1] * (x.dim() - 1)
        shape[feat] = n
        return (x * g.reshape(shape),) + tuple(args[1:])

    return hook


def gate_ggn_factor(model: nn.Module, sites: dict, batches, *, n_gates: int | None = None,
                    forward_fn: Callable | None = None, logits_fn: Callable | None = None, max_classes: int = 1024,
                    progress: bool = False) -> torch.Tensor:
    """The factor ``B`` (float64, ``(N*C, n_gates)``) of the gate-space Gauss-Newton matrix ``G = B^T B``.

    ``sites``: ``{consumer module (Linear / Conv2d): LongTensor of its input features' gate ids}`` (``-1``: not
    gated; a Linear's features are its input columns, a Conv2d's its input channels).  ``forward_fn(model,
    batch)`` runs the model (default ``model(**batch)`` / ``model(batch[0])``); ``logits_fn(output, batch)``
    gives ``(batch, classes)`` logits (default: the output, or its ``.logits``).  The model is left as it was
    (hooks removed, gradients untouched: only the gates are differentiated).  Across processes
    (``torch.distributed``) the rows are gathered, so every rank returns the same factor."""
    from .batching import default_forward
    from .fisher import _all_gather_rows, _dist
    if not isinstance(sites, dict) or not sites:
        raise PruningInputError("sites: a non-empty {consumer module: gate-id LongTensor} dict")
    ids = [torch.as_tensor(v, dtype=torch.long).reshape(-1) for v in sites.values()]
    for m, v in zip(sites, ids):
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise PruningInputError(f"sites: consumers must be Linear or Conv2d, got {type(m).__name__}")
        n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
        if v.numel() != n_in:
            raise PruningInputError(f"sites: a {type(m).__name__} with {n_in} input features got a gate index of "
                                    f"{v.numel()}")
    n = int(max(int(v.max()) for v in ids)) + 1 if n_gates is None else int(n_gates)
    if n < 1 or any(int(v.max()) >= n for v in ids):
        raise PruningInputError(f"sites: gate ids must lie in [0, {n}) (-1: not gated)")
    forward_fn = forward_fn or default_forward
    logits_fn = logits_fn or (lambda out, _b: _output_tensor(out))
    batches = list(batches)
    if not batches:
        raise PruningInputError("batches: empty")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ref: list = [None]
    handles = [m.register_forward_pre_hook(_gate_hook(v, ref)) for m, v in zip(sites, ids)]
    from .collect import eval_mode
    with eval_mode(model):
        try:
            rows, total = _collect_rows(model, batches, ref, forward_fn, logits_fn, n, max_classes, device,
                                        progress)
        finally:
            ref[0] = None
            for h in handles:
                h.remove()
    R = torch.cat(rows)
    if _dist() is not None:
        R = _all_gather_rows(R.to(device)).cpu()
        cnt = torch.tensor([float(total)], dtype=torch.float64, device=device)
        _dist().all_reduce(cnt)
        total = int(cnt.item())
    return R / math.sqrt(total)


def _collect_rows(model, batches, ref, forward_fn, logits_fn, n, max_classes, device, progress):
    """The unscaled factor rows of every batch (gates installed through ``ref``) and the number of samples."""
    from tqdm.auto import tqdm

    from .fisher import batch_rows
    rows, total = [], 0
    for i, batch in enumerate(tqdm(batches, desc="gate Gauss-Newton", disable=not progress, leave=False)):
        batch = move(batch, device)
        B = batch_rows(batch)
        G = torch.ones(B, n, dtype=torch.float32, device=device, requires_grad=True)
        ref[0] = G
        with torch.enable_grad():
            z = logits_fn(forward_fn(model, batch), batch)
            if not torch.is_tensor(z) or z.dim() != 2 or z.shape[0] != B:
                raise PruningInputError(f"logits_fn: expected (batch={B}, classes) logits, got "
                                        f"{tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
            C = z.shape[1]
            if C > max_classes:
                raise PruningInputError(f"logits_fn: {C} classes (more than max_classes={max_classes}); the "
                                        "gate Gauss-Newton takes one backward pass per class")
            if not torch.isfinite(z).all():
                raise PruningInputError(f"batches[{i}]: the logits hold NaN/Inf values")
            if i == 0 and B > 1:   # one sample's logits must not depend on another sample's gates
                cross = torch.autograd.grad(z[0].sum(), G, retain_graph=True)[0][1:]
                if bool((cross != 0).any()):
                    raise PruningInputError(
                        "sites: one sample's gates changed another sample's logits, so a gated consumer does "
                        "not take the batch in its leading dimension (a sequence-first layer?) or the model "
                        "mixes samples; the gate Gauss-Newton needs batch-first, per-sample computation")
            J = torch.stack([torch.autograd.grad(z[:, c].sum(), G, retain_graph=c < C - 1)[0]
                             for c in range(C)], 1).double()                       # (B, C, n)
        p = torch.softmax(z.detach().double(), dim=1)                              # (B, C)
        centred = J - (p.unsqueeze(2) * J).sum(1, keepdim=True)
        rows.append((p.sqrt().unsqueeze(2) * centred).reshape(B * C, n).cpu())
        total += B
    return rows, total


__all__ = ["gate_ggn_factor"]
