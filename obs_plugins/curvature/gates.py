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

Away from ``m = 1`` (some units already removed, their gates at 0) the same matrix, taken at the current gates, is
the Gauss-Newton matrix of the mean KL divergence ``KL(p_ref || p(m))`` from the reference predictions (the dense
model's), whose gradient ``1/N sum_i J_i^T (p_i - p_ref,i)`` is no longer zero: :func:`gate_quadratic` returns
both, so a removal order can be re-linearised along the way (the dense point's gradient is exactly zero, so the
first linearisation is the one above).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class GateQuadratic:
    """The second-order model of the network loss in gate coordinates at gates ``at`` (:func:`gate_quadratic`).

    ``factor``: ``B`` (float64, ``(N*C, n)``), ``B^T B`` the Gauss-Newton matrix; ``grad``: (float64, ``(n,)``) the
    gradient of the mean ``KL(p_ref || p)`` (zeros without a reference); ``probs``: the predictions at ``at``, one
    ``(batch, C)`` float64 tensor per calibration batch (the reference of later linearisations).  Moving the gates
    by ``d`` changes the modelled loss by ``grad . d + 1/2 ||B d||^2``."""
    factor: torch.Tensor
    grad: torch.Tensor
    probs: list


def gate_ggn_factor(model: nn.Module, sites: dict, batches, **kwargs) -> torch.Tensor:
    """The factor ``B`` (float64, ``(N*C, n_gates)``) of the gate-space Gauss-Newton matrix ``G = B^T B``, at all
    gates 1 unless ``at`` says otherwise (:func:`gate_quadratic`'s ``factor``; the same arguments)."""
    return gate_quadratic(model, sites, batches, **kwargs).factor


def gate_quadratic(model: nn.Module, sites: dict, batches, *, n_gates: int | None = None, at=None, reference=None,
                   forward_fn: Callable | None = None, logits_fn: Callable | None = None, max_classes: int = 1024,
                   progress: bool = False) -> GateQuadratic:
    """The gate-space quadratic model (:class:`GateQuadratic`) of the network at gates ``at``.

    ``sites``: ``{consumer module (Linear / Conv2d): LongTensor of its input features' gate ids}`` (``-1``: not
    gated; a Linear's features are its input columns, a Conv2d's its input channels).  ``at``: the gate values
    ``(n_gates,)`` to linearise at (default all 1; a removed unit's gate is 0).  ``reference``: the predictions the
    KL gradient is taken against, as returned in ``probs`` by an earlier call on the same batches (default: none,
    gradient zero).  ``forward_fn(model, batch)`` runs the model (default ``model(**batch)`` / ``model(batch[0])``);
    ``logits_fn(output, batch)`` gives ``(batch, classes)`` logits (default: the output, or its ``.logits``).  The
    model is left as it was (hooks removed, gradients untouched: only the gates are differentiated).  Across
    processes (``torch.distributed``) the factor rows are gathered and the gradient summed, so every rank returns
    the same factor and gradient (``probs`` stay per rank, like the batches)."""
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
    at = torch.ones(n, dtype=torch.float32) if at is None else torch.as_tensor(at, dtype=torch.float32).reshape(-1)
    if at.numel() != n or not torch.isfinite(at).all():
        raise PruningInputError(f"at: {n} finite gate values, got {at.numel()}")
    forward_fn = forward_fn or default_forward
    logits_fn = logits_fn or (lambda out, _b: _output_tensor(out))
    batches = list(batches)
    from .distributed import raise_together
    raise_together(PruningInputError("batches: empty") if not batches else None)
    if reference is not None and len(reference) != len(batches):
        raise PruningInputError(f"reference: one prediction tensor per batch ({len(batches)}), got {len(reference)}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ref: list = [None]
    handles = [m.register_forward_pre_hook(_gate_hook(v, ref)) for m, v in zip(sites, ids)]
    from .collect import eval_mode
    with eval_mode(model):
        try:
            rows, grad, probs, total = _collect_rows(model, batches, ref, forward_fn, logits_fn, at, reference,
                                                     max_classes, device, progress)
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
        grad = grad.to(device)
        _dist().all_reduce(grad)
        grad = grad.cpu()
    return GateQuadratic(factor=R / math.sqrt(total), grad=grad / total, probs=probs)


def _collect_rows(model, batches, ref, forward_fn, logits_fn, at, reference, max_classes, device, progress):
    """The unscaled factor rows of every batch (gates ``at`` installed through ``ref``), the summed KL gradient,
    the predictions per batch and the number of samples."""
    from tqdm.auto import tqdm

    from .fisher import batch_rows
    n = at.numel()
    rows, probs, total = [], [], 0
    grad = torch.zeros(n, dtype=torch.float64)
    for i, batch in enumerate(tqdm(batches, desc="gate Gauss-Newton", disable=not progress, leave=False)):
        batch = move(batch, device)
        B = batch_rows(batch)
        G = at.to(device).expand(B, n).clone().requires_grad_(True)
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
        if reference is not None:
            q = torch.as_tensor(reference[i], dtype=torch.float64, device=p.device)
            if q.shape != p.shape:
                raise PruningInputError(f"reference[{i}]: predictions of shape {tuple(p.shape)}, got "
                                        f"{tuple(q.shape)}")
            grad += torch.einsum("bcn,bc->n", J, p - q).cpu()                      # d KL(q || p) / d gates
        centred = J - (p.unsqueeze(2) * J).sum(1, keepdim=True)
        rows.append((p.sqrt().unsqueeze(2) * centred).reshape(B * C, n).cpu())
        probs.append(p.cpu())
        total += B
    return rows, grad, probs, total


__all__ = ["GateQuadratic", "gate_ggn_factor", "gate_quadratic"]
