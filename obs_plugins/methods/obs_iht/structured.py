"""Structured OBS: the cost of removing whole input columns of a layer, and the optimal update of the rest.

Pure functions over a 2-D weight view ``W (rows, d)`` and the layer Gram ``H = 2 X X^T / n`` (d x d), the same
conventions as :mod:`obs_plugins.curvature.linalg`: the layer loss is ``||dW X||^2 / n = 1/2 sum_r dw_r H dw_r^T``.
Removing a channel of a network removes a *set of columns* ``P`` of every layer that consumes it (one column of a
Linear, ``kh*kw`` columns of a Conv2d, ``head_dim`` columns of an attention output projection), so everything
here takes column sets.

* :func:`column_saliency` -- per set ``P``: ``1/2 sum_r s_r w_rP ([H^-1]_PP)^-1 w_rP^T`` (OBS: the layer loss
  left after the optimal update of the kept columns) or ``1/2 sum_r s_r w_rP H_PP w_rP^T`` (no update);
  ``s_r`` are optional per-row weights, e.g. :func:`output_sensitivity`, which make the numbers comparable across
  layers (a second-order estimate of the model loss instead of the layer's own output error).
* :func:`remove_columns` -- the OBS / least-squares update ``W <- W - W_P ([H^-1]_PP)^-1 [H^-1]_P:``; the row
  weights drop out (every row shares ``H``), so one update serves every ``s``.
* :func:`output_sensitivity` -- ``s_r = E_samples sum_positions (d loss_i / d y_r)^2`` for the output units of
  each target from one gradient pass over the calibration batches (empirical Fisher, diagonal in the output).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ...curvature.linalg import check_curvature, check_finite, inverse_factor
from ...errors import PruningInputError


def channel_columns(channels: Sequence[int], width: int) -> list[torch.Tensor]:
    """Column set of each input channel when every channel owns ``width`` consecutive columns (Conv2d:
    ``kh*kw``, the column order of ``F.unfold``)."""
    return [torch.arange(int(c) * width, (int(c) + 1) * width) for c in channels]


def _check_sets(d: int, sets: Sequence[torch.Tensor], what: str = "column_sets") -> list[torch.Tensor]:
    out = []
    for i, s in enumerate(sets):
        s = torch.as_tensor(s, dtype=torch.long).reshape(-1)
        if s.numel() == 0:
            raise PruningInputError(f"{what}[{i}]: empty column set")
        if int(s.min()) < 0 or int(s.max()) >= d:
            raise PruningInputError(f"{what}[{i}]: column indices must lie in [0, {d}), got "
                                    f"[{int(s.min())}, {int(s.max())}]")
        if torch.unique(s).numel() != s.numel():
            raise PruningInputError(f"{what}[{i}]: a column is listed twice in one set")
        out.append(s)
    return out


def column_saliency(W: torch.Tensor, H: torch.Tensor, column_sets: Sequence[torch.Tensor], *,
                    rel_damp: float = 1e-2, row_weights: torch.Tensor | None = None, compensate: bool = True,
                    hinv: torch.Tensor | None = None) -> torch.Tensor:
    """Predicted loss of removing each column set of ``W`` alone (see the module docstring); fp32, (len(sets),).

    ``hinv``: a damped inverse of ``H`` already computed by the caller (else one is made with ``rel_damp`` and
    the damping ladder).  ``row_weights``: (rows,) non-negative weights ``s_r``.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise PruningInputError(f"H: expected ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}, got "
                                f"{tuple(H.shape)}")
    sets = _check_sets(W.shape[1], column_sets)
    s = torch.ones(W.shape[0], dtype=torch.float64, device=W.device) if row_weights is None else \
        row_weights.to(device=W.device, dtype=torch.float64).reshape(-1)
    if s.numel() != W.shape[0]:
        raise PruningInputError(f"row_weights: expected {W.shape[0]} entries (one per row of W), got {s.numel()}")
    if bool((s < 0).any()):
        raise PruningInputError("row_weights: must be non-negative (loss sensitivities)")
    Wd = W.detach().to(torch.float64)
    if compensate:
        M = (hinv if hinv is not None else inverse_factor(H, rel_damp).hinv).to(torch.float64)
    else:
        check_curvature(H)
        M = H.to(torch.float64)
    out = torch.empty(len(sets), dtype=torch.float64, device=W.device)
    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(sets):
        by_size.setdefault(c.numel(), []).append(i)
    for k, idx in by_size.items():  # one batched solve per set size
        P = torch.stack([sets[i] for i in idx])                  # (m, k)
        block = M[P.unsqueeze(-1), P.unsqueeze(-2)]              # (m, k, k)
        wp = Wd[:, P].permute(1, 2, 0)                           # (m, k, rows)
        if compensate:
            L, info = torch.linalg.cholesky_ex(block)
            if int(info.max()) != 0:
                raise PruningInputError("hinv: a diagonal block of the inverse curvature is not positive definite")
            q = torch.cholesky_solve(wp, L)                      # (m, k, rows)
        else:
            q = block @ wp
        out[idx] = 0.5 * ((wp * q).sum(1) * s).sum(-1)
    return out.float()


def removal_operator(H: torch.Tensor, pruned: torch.Tensor, *, rel_damp: float = 1e-2,
                     hinv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, C)`` with ``C = ([H^-1]_PP)^-1 [H^-1]_P:`` (k x d, float64): the OBS update of removing the columns
    ``P`` is ``W <- W - W[:, P] @ C`` for every row alike, so ``C`` can be computed before the layer's rows are
    known (another pruning step may remove some rows first)."""
    P = _check_sets(H.shape[0], [pruned], "pruned")[0].unique()
    M = (hinv if hinv is not None else inverse_factor(H, rel_damp).hinv).to(torch.float64)
    C = torch.linalg.solve(M[P][:, P], M[P, :])
    return P, C


def apply_removal(W: torch.Tensor, P: torch.Tensor, C: torch.Tensor | None) -> torch.Tensor:
    """``W - W[:, P] @ C`` with the columns ``P`` exactly zero (``C=None``: only zero them); same dtype as ``W``."""
    Wd = W.detach().to(torch.float64)
    new = Wd - Wd[:, P] @ C.to(Wd.device) if C is not None else Wd.clone()
    new[:, P] = 0.0
    return new.to(W.dtype)


def remove_columns(W: torch.Tensor, H: torch.Tensor, pruned: torch.Tensor, *, rel_damp: float = 1e-2,
                   compensate: bool = True, hinv: torch.Tensor | None = None):
    """Remove the columns ``pruned`` of ``W``; with ``compensate`` update the kept columns optimally for the
    damped layer quadratic.  Returns ``(W_new, loss)``: ``W_new`` like ``W`` with exactly zero ``pruned`` columns,
    ``loss`` the predicted layer-loss increase ``1/2 sum_r dw_r H dw_r^T`` of the change (undamped ``H``)."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise PruningInputError(f"H: expected ({W.shape[1]}, {W.shape[1]}) for W of shape {tuple(W.shape)}, got "
                                f"{tuple(H.shape)}")
    if compensate:
        P, C = removal_operator(H, pruned, rel_damp=rel_damp, hinv=hinv)
    else:
        P, C = _check_sets(W.shape[1], [pruned], "pruned")[0].unique(), None
    new = apply_removal(W, P, C)
    dW = new.to(torch.float64) - W.detach().to(torch.float64)
    loss = 0.5 * torch.einsum("ri,ij,rj->", dW, H.to(torch.float64), dW)
    return new, float(loss)


def greedy_removal(layers: Sequence[tuple], n_units: int, *, rel_damp: float = 1e-2, compensate: bool = True,
                   progress: bool = False) -> tuple[list[int], torch.Tensor]:
    """Greedy joint OBS removal of ``n_units`` channels shared by several consuming layers.

    ``layers``: ``[(W, H, sets, row_weights)]`` per consumer -- its 2-D weight, Gram, the column set of each unit
    (``len(sets) == n_units``; an empty set means the unit does not feed this layer) and row weights (or None).
    At every step the unit whose removal adds the least ``sum_layers 1/2 sum_r s_r w_rP ([H^-1]_PP)^-1 w_rP^T``
    (given the units already removed, with the kept columns OBS-updated and the inverse downdated) is removed.
    ``compensate=False``: no update -- the loss of removing a set ``S`` is ``1/2 sum_r s_r w_rS H_SS w_rS^T`` and
    each step adds the unit with the least increase given ``S`` (cross terms included; undamped ``H``).
    Returns ``(order, increments)``: the removal order and each step's added loss; ``increments[:t].sum()`` is the
    predicted loss of removing the first ``t`` units together (exact for the damped layer quadratics; for the
    undamped ones without the update).
    """
    from tqdm.auto import tqdm

    for i, (W, H, sets, s) in enumerate(layers):
        if len(sets) != n_units:
            raise PruningInputError(f"layers[{i}]: expected {n_units} column sets, got {len(sets)}")
        if W.dim() != 2 or tuple(H.shape) != (W.shape[1], W.shape[1]):
            raise PruningInputError(f"layers[{i}]: H must be ({W.shape[-1]}, {W.shape[-1]}) for W of shape "
                                    f"{tuple(W.shape)}, got {tuple(H.shape)}")
        for j, c in enumerate(sets):   # every path (the fast ones too) indexes with these: range-check them
            c = torch.as_tensor(c, dtype=torch.long).reshape(-1)
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= W.shape[1]):
                raise PruningInputError(f"layers[{i}]: column set {j} must lie in [0, {W.shape[1]}), got "
                                        f"[{int(c.min())}, {int(c.max())}]")
            if torch.unique(c).numel() != c.numel():
                raise PruningInputError(f"layers[{i}]: column set {j} lists a column twice")
        if s is not None:
            s = torch.as_tensor(s).reshape(-1)
            if s.numel() != W.shape[0] or bool((s < 0).any()):
                raise PruningInputError(f"layers[{i}]: row weights must be {W.shape[0]} non-negative values "
                                        f"(one per row of W), got {s.numel()}")
    if n_units == 0:
        return [], torch.zeros(0, dtype=torch.float64)
    if not compensate:
        return _greedy_uncompensated(layers, n_units, progress)
    state = []
    for W, H, sets, s in layers:
        # the greedy bookkeeping runs on the CPU in float64 (its score vectors are small): a CUDA layer mixed
        # CPU totals with device saliencies
        M = inverse_factor(H, rel_damp).hinv.to(device="cpu", dtype=torch.float64)
        w = torch.ones(W.shape[0], dtype=torch.float64) if s is None else s.to("cpu", torch.float64).reshape(-1)
        state.append([W.detach().to("cpu", torch.float64).clone(), M,
                      [torch.as_tensor(c, dtype=torch.long).cpu() for c in sets],
                      w])
    if all(len(c) == 1 for _, _, sets, _ in state for c in sets):
        return _greedy_single_columns(state, n_units, progress)
    alive = list(range(n_units))
    order, inc = [], []
    for _ in tqdm(range(n_units), desc="greedy OBS", disable=not progress, leave=False):
        total = torch.zeros(len(alive), dtype=torch.float64)
        for W, M, sets, w in state:
            live = [j for j, u in enumerate(alive) if sets[u].numel()]
            if live:
                total[live] += column_saliency(W, M, [sets[alive[j]] for j in live], row_weights=w,
                                               hinv=M).double()
        j = int(torch.argmin(total))
        u = alive.pop(j)
        order.append(u)
        inc.append(float(total[j]))
        for st in state:
            W, M, sets, _ = st
            P = sets[u]
            if P.numel() == 0:
                continue
            Mpp = M[P][:, P]
            C = torch.linalg.solve(Mpp, M[P, :])        # (k, d)
            W.addmm_(W[:, P].clone(), C, alpha=-1.0)
            W[:, P] = 0.0
            M.addmm_(M[:, P].clone(), C, alpha=-1.0)     # in place: the state holds this very tensor
            M[P, :] = 0.0
            M[:, P] = 0.0
            M[P, P] = 1.0                                # removed columns: decoupled, never chosen again
    return order, torch.tensor(inc, dtype=torch.float64)


def greedy_gate_removal(factor: torch.Tensor, *, grad: torch.Tensor | None = None, removed=None, candidates=None,
                        groups=None, caps=None, count: int | None = None,
                        progress: bool = False) -> tuple[list[int], torch.Tensor]:
    """Greedy joint removal of units under the gate-space quadratic ``dL(S) = -g . 1_S + 1/2 ||B 1_S||^2``
    (``B = factor``, ``(rows, n_units)``; ``g = grad``, default zero: :func:`obs_plugins.curvature.gates.
    gate_quadratic`).  Each step removes the unit adding the least loss given those already removed:
    ``-g_u + B_u . r + 1/2 ||B_u||^2`` with ``r = B 1_S`` (cross terms included).

    ``removed``: units already removed under this same quadratic (they count in ``r``, are not chosen again);
    ``candidates``: a bool ``(n_units,)`` mask of the units that may be chosen (default: all not removed);
    ``groups`` / ``caps``: unit ``u`` belongs to group ``groups[u]`` and at most ``caps[j]`` units of group ``j``
    are chosen here; ``count``: stop after that many (default: every unit allowed).  Returns ``(order,
    increments)``; ``increments[:t].sum()`` is the modelled loss of removing the first ``t`` units together."""
    from tqdm.auto import tqdm
    if not torch.is_tensor(factor) or factor.dim() != 2 or factor.shape[1] < 1:
        raise PruningInputError(f"factor: a (rows, units) tensor, got "
                                f"{tuple(factor.shape) if torch.is_tensor(factor) else type(factor).__name__}")
    check_finite(factor, "factor")
    n = factor.shape[1]
    Bd = factor.to(torch.float64)
    own = 0.5 * (Bd * Bd).sum(0)
    if grad is not None:
        grad = torch.as_tensor(grad, dtype=torch.float64).reshape(-1)
        if grad.numel() != n:
            raise PruningInputError(f"grad: {n} values (one per unit), got {grad.numel()}")
        check_finite(grad, "grad")
        own = own - grad
    alive = torch.ones(n, dtype=torch.bool) if candidates is None else \
        torch.as_tensor(candidates, dtype=torch.bool).reshape(-1).clone()
    if alive.numel() != n:
        raise PruningInputError(f"candidates: {n} flags (one per unit), got {alive.numel()}")
    done = torch.as_tensor([] if removed is None else list(removed), dtype=torch.long).reshape(-1).unique()
    if done.numel() and (int(done.min()) < 0 or int(done.max()) >= n):
        raise PruningInputError(f"removed: unit indices in [0, {n})")
    r = Bd[:, done].sum(1) if done.numel() else torch.zeros(Bd.shape[0], dtype=torch.float64)
    alive[done] = False
    if (groups is None) != (caps is None):
        raise PruningInputError("groups, caps: give both (a group id per unit and a cap per group) or neither")
    if groups is not None:
        groups = torch.as_tensor(groups, dtype=torch.long).reshape(-1)
        room = torch.as_tensor(caps, dtype=torch.long).reshape(-1).clone()
        if groups.numel() != n or int(groups.min()) < 0 or int(groups.max()) >= room.numel() or \
                bool((room < 0).any()):
            raise PruningInputError(f"groups, caps: a group id in [0, len(caps)) for each of the {n} units and "
                                    "non-negative caps")
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
        raise PruningInputError(f"count: a non-negative integer, got {count!r}")
    limit = int(alive.sum()) if count is None else count
    order, inc = [], []
    for _ in tqdm(range(limit), desc="greedy gate removal", disable=not progress, leave=False):
        total = own + r @ Bd
        allowed = alive if groups is None else alive & (room[groups] > 0)
        total[~allowed] = float("inf")
        u = int(torch.argmin(total))
        if not bool(allowed[u]):
            if count is not None:
                raise PruningInputError(f"count: only {len(order)} units may be removed here, {count} asked")
            break
        order.append(u)
        inc.append(float(total[u]))
        alive[u] = False
        if groups is not None:
            room[groups[u]] -= 1
        r += Bd[:, u]
    return order, torch.tensor(inc, dtype=torch.float64)


def relinearized_gate_removal(take, n_units: int, count: int, *, groups=None, caps=None, stages: int = 8,
                              dense=None, progress: bool = False) -> tuple[list[int], torch.Tensor]:
    """Remove ``count`` units greedily in ``stages`` rounds, re-linearising the network before each.

    ``take(at, reference)`` returns the gate-space model at gates ``at`` (float ``(n_units,)``: 1 kept, 0
    removed) with the KL gradient against the predictions ``reference`` -- a
    :class:`~obs_plugins.curvature.gates.GateQuadratic`, e.g. ``curvature.gate_quadratic(sites, at=at,
    reference=reference, n_gates=n_units)``.  The first round's model is taken at all gates 1 with no reference
    (or is ``dense``, when the caller has it already); its predictions are the reference of every later round.
    Round ``s`` removes units until ``ceil(count * (s + 1) / stages)`` are gone (``groups`` / ``caps`` bound each
    group's total); then the units left are ordered by the last model without caps.  Returns ``(order,
    increments)`` over all ``n_units`` (the first ``count`` are the removal; increments are each round's model's, at
    its own linearisation point)."""
    if not (isinstance(stages, int) and not isinstance(stages, bool) and stages >= 1):
        raise PruningInputError(f"stages: a positive integer, got {stages!r}")
    if not (isinstance(count, int) and 0 <= count <= n_units):
        raise PruningInputError(f"count: an integer in [0, {n_units}], got {count!r}")
    if (groups is None) != (caps is None):
        raise PruningInputError("groups, caps: give both (a group id per unit and a cap per group) or neither")
    room = None if caps is None else torch.as_tensor(caps, dtype=torch.long).reshape(-1).clone()
    if room is not None:   # checked before any model is taken: what the caps allow of each group, in all
        sizes = torch.bincount(torch.as_tensor(groups, dtype=torch.long).reshape(-1), minlength=room.numel())
        allowed = int(torch.minimum(room.clamp(min=0), sizes[:room.numel()]).sum())
        if count > allowed:
            raise PruningInputError(f"count: {count} units asked, the caps allow {allowed}")
    at = torch.ones(n_units, dtype=torch.float32)
    model = dense if dense is not None else take(at.clone(), None)
    reference = model.probs
    order: list[int] = []
    incs = []
    stage_units: list[int] = []
    for s in range(stages):
        want = math.ceil(count * (s + 1) / stages) - len(order)
        if want <= 0:
            continue
        if order:
            model = take(at.clone(), reference)
        stage_units, inc = greedy_gate_removal(model.factor, grad=model.grad, candidates=at > 0, groups=groups,
                                               caps=room, count=want, progress=progress)
        for u in stage_units:
            at[u] = 0.0
            if room is not None:
                room[int(groups[u])] -= 1
        order += stage_units
        incs.append(inc)
    if len(order) < n_units:
        rest, inc = greedy_gate_removal(model.factor, grad=model.grad, removed=stage_units, candidates=at > 0,
                                        progress=progress)
        order += rest
        incs.append(inc)
    return order, torch.cat(incs) if incs else torch.zeros(0, dtype=torch.float64)


def _greedy_uncompensated(layers, n_units, progress):
    """:func:`greedy_removal` without the update: ``G = W_S H`` (the removed part of every row times ``H``) is
    kept per layer, so the increase of also removing unit ``u`` is ``1/2 sum_r s_r w_rP H_PP w_rP^T +
    sum_r s_r w_rP . G_rP`` -- one rank-|P| update of ``G`` per step."""
    from tqdm.auto import tqdm

    state = []
    for W, H, sets, s in layers:
        check_curvature(H)
        Wd = W.detach().to("cpu", torch.float64)   # CPU bookkeeping, as in greedy_removal
        Hd = H.to("cpu", torch.float64)
        w = torch.ones(W.shape[0], dtype=torch.float64) if s is None else s.to("cpu", torch.float64).reshape(-1)
        sets = [torch.as_tensor(c, dtype=torch.long) for c in sets]
        own = torch.zeros(n_units, dtype=torch.float64)  # each unit's own term, fixed
        for u, P in enumerate(sets):
            if P.numel():
                wp = Wd[:, P]
                own[u] = 0.5 * (((wp @ Hd[P][:, P]) * wp).sum(1) * w).sum()
        none = [torch.zeros(0, dtype=torch.long)]
        cols = torch.cat(sets + none)                    # every unit's columns, and which unit each belongs to
        unit = torch.cat([torch.full((c.numel(),), u, dtype=torch.long) for u, c in enumerate(sets)] + none)
        state.append((Wd, Hd, sets, w.unsqueeze(1) * Wd, own, torch.zeros_like(Wd), cols, unit))
    alive = torch.ones(n_units, dtype=torch.bool)
    order, inc = [], []
    for _ in tqdm(range(n_units), desc="greedy removal", disable=not progress, leave=False):
        total = torch.zeros(n_units, dtype=torch.float64)
        for Wd, Hd, sets, sW, own, G, cols, unit in state:
            cross = (sW * G).sum(0)                       # sum_r s_r w_rj G_rj, per column
            total += own
            total.index_add_(0, unit, cross[cols])
        total[~alive] = float("inf")
        u = int(torch.argmin(total))
        order.append(u)
        inc.append(float(total[u]))
        alive[u] = False
        for Wd, Hd, sets, _, _, G, _, _ in state:
            P = sets[u]
            if P.numel():
                G.addmm_(Wd[:, P], Hd[P, :])
    return order, torch.tensor(inc, dtype=torch.float64)


def _greedy_single_columns(state, n_units, progress):
    """:func:`greedy_removal` when every unit is one column of every layer (FFN channels): rank-one updates,
    in place (the inverse is symmetric, so its row serves as its column; no d x d temporaries per step)."""
    from tqdm.auto import tqdm

    cols = [torch.tensor([int(c[0]) for c in sets]) for _, _, sets, _ in state]
    Ws = [W[:, c].clone() for (W, _, _, _), c in zip(state, cols)]   # only the unit columns matter for scores
    Ms = [M for _, M, _, _ in state]
    ws = [w.unsqueeze(1) for _, _, _, w in state]
    alive = torch.ones(n_units, dtype=torch.bool)
    order, inc = [], []
    for _ in tqdm(range(n_units), desc="greedy OBS", disable=not progress, leave=False):
        total = torch.zeros(n_units, dtype=torch.float64)
        for W, M, w, c in zip(Ws, Ms, ws, cols):
            total += 0.5 * (w * W.square()).sum(0) / torch.diagonal(M)[c]
        total[~alive] = float("inf")
        u = int(torch.argmin(total))
        order.append(u)
        inc.append(float(total[u]))
        alive[u] = False
        for W, M, c in zip(Ws, Ms, cols):
            q = int(c[u])
            mq = M[q].clone()                            # = M[:, q]
            W.addr_(W[:, u].clone(), mq[c], alpha=-1.0 / float(mq[q]))
            W[:, u] = 0.0
            M.addr_(mq, mq, alpha=-1.0 / float(mq[q]))
            M[q, :] = 0.0
            M[:, q] = 0.0
            M[q, q] = 1.0
    return order, torch.tensor(inc, dtype=torch.float64)


def ridge_inverse(H: torch.Tensor, rel_damp: float = 1e-2) -> torch.Tensor:
    """The damped inverse used by both functions above (``(H + rel_damp * mean diag(H) I)^-1``, ladder on
    failure), for callers that score and update the same layer several times."""
    return inverse_factor(H, rel_damp).hinv


def output_sensitivity(curvature, keys: Sequence[str] | None = None, *, progress: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Per output unit of each target weight, ``s_r = 1/N sum_i sum_positions (d loss_i / d y_{i,r})^2``: the
    per-sample form of :meth:`Curvature.output_sensitivity` (``per_sample=True``; the batch loss is taken to be a
    mean over the batch's leading dimension).  With it, ``1/2 sum_r s_r (1/2 dw_r H dw_r^T)`` is a Gauss-Newton
    estimate of the model-loss increase caused by a change ``dW`` of the layer."""
    targets = [t.key for t in curvature.targets if t.name == "weight" and (keys is None or t.key in keys)]
    if not targets:
        raise PruningInputError("keys: no weight targets of the curvature selected")
    return curvature.output_sensitivity(keys=targets, per_sample=True, progress=progress)


__all__ = ["channel_columns", "column_saliency", "removal_operator", "apply_removal", "remove_columns", "greedy_removal", "greedy_gate_removal", "relinearized_gate_removal", "ridge_inverse", "output_sensitivity"]
