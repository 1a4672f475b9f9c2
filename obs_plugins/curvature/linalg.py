"""Shared OBS linear algebra: relative damping, the damping ladder, inverse factors, OBS solves.

Conventions: ``H`` is a layer's curvature over its input columns (d x d), e.g. the Gram ``2 X X^T / n`` for
the layer loss ``||(W' - W) X||^2 / n = 1/2 sum_rows dw H dw^T``.  Weights are 2-D (rows, d); every row shares
``H``.  Nothing here falls back silently: a failed factorisation climbs the damping ladder, then raises.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import CurvatureError, PruningInputError

DEFAULT_LADDER = (1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@contextlib.contextmanager
def full_fp32():
    """fp32 matrix products and convolutions at full precision while curvature is collected and solved: a
    caller's ``torch.set_float32_matmul_precision("high" / "medium")`` or TF32 switch (e.g. transformers'
    ``TrainingArguments(tf32=True)``) would round the Grams and the OBS solves to 10-bit (or bf16) mantissas.
    Scoped, not global: the caller's settings are restored on exit (re-entrant)."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def check_finite(H: torch.Tensor, what: str = "H") -> None:
    if not torch.isfinite(H).all():
        bad = int((~torch.isfinite(H)).sum())
        raise CurvatureError(f"{what} has {bad} non-finite entries (NaN/inf): the calibration activations "
                             "overflowed or contain NaN; check the inputs and the model's dtype")


def check_curvature(H: torch.Tensor, what: str = "H") -> None:
    """``H`` is a finite, square, symmetric matrix (a Gram or a Fisher block): a non-symmetric one would be
    read through one triangle only (Cholesky), silently dropping the other's coupling."""
    check_finite(H, what)
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise CurvatureError(f"{what} must be a square matrix, got shape {tuple(H.shape)}")
    if H.numel():
        scale = float(H.abs().max())
        asym = float((H - H.transpose(0, 1)).abs().max())
        if asym > 1e-4 * scale:
            raise CurvatureError(f"{what} is not symmetric (largest |H - H^T| is {asym:.3g} against entries up to "
                                 f"{scale:.3g}); a curvature matrix must be, e.g. 2 X X^T / n")


def dead_columns(H: torch.Tensor) -> torch.Tensor:
    """Input columns that never saw a non-zero value (zero diagonal)."""
    return torch.diagonal(H) == 0


def damped(H: torch.Tensor, rel_damp: float) -> torch.Tensor:
    """``H + rel_damp * mean(diag H) * I`` (the mean over live columns).  A dead column (zero diagonal: its input
    was always 0) keeps only the damping on its diagonal, so pruning its weight costs the damped quadratic's
    ``rel_damp * mean * w^2 / 2`` -- a small fraction of a live weight's, whatever the scale of the inputs (a unit
    diagonal used to price it at ``~w^2``, more than live weights when the inputs are small)."""
    H = H.clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    live_mean = diag[~dead].mean() if (~dead).any() else diag.new_tensor(1.0)
    diag += rel_damp * live_mean
    return H


@dataclass
class InverseFactor:
    """Factors of the damped inverse: ``hinv = hinv_chol_upper^T @ hinv_chol_upper``."""
    hinv: torch.Tensor
    hinv_chol_upper: torch.Tensor
    rel_damp: float
    dead: torch.Tensor

    def to(self, device) -> "InverseFactor":
        """The factors on ``device`` (``self`` when they are there already)."""
        if self.hinv.device == torch.device(device):
            return self
        return InverseFactor(self.hinv.to(device), self.hinv_chol_upper.to(device), self.rel_damp,
                             self.dead.to(device))


def inverse_factor(H: torch.Tensor, rel_damp: float = 1e-2, *, ladder=DEFAULT_LADDER, what: str = "H",
                   dtype: torch.dtype | None = None) -> InverseFactor:
    """Damped inverse and the upper Cholesky factor of the inverse, climbing the damping ladder on failure.

    Tries ``rel_damp`` then every larger step of ``ladder``; raises :class:`CurvatureError` if all fail.
    """
    check_curvature(H, what)
    if isinstance(rel_damp, bool) or not isinstance(rel_damp, (int, float)) or not 0 <= rel_damp < float("inf"):
        raise PruningInputError(f"rel_damp: a finite relative damping >= 0, got {rel_damp!r}")
    work = H.to(dtype or (torch.float64 if H.dtype == torch.float64 else torch.float32))
    tried = []
    for lam in [rel_damp] + [x for x in ladder if x > rel_damp]:
        Hd = damped(work, lam)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(U).all():
                return InverseFactor(hinv, U, lam, dead_columns(work))
        tried.append(lam)
    raise CurvatureError(f"Cholesky factorisation of {what} ({tuple(H.shape)}) failed with relative damping "
                         f"{tried}; the curvature is too ill-conditioned for these settings (collect more "
                         "calibration data, or raise rel_damp)")


def obs_solve(w: torch.Tensor, hinv: torch.Tensor, pruned: torch.Tensor):
    """Optimal multi-weight OBS update of one row ``w`` when the set ``pruned`` (index tensor) is removed.

    Returns ``(w_new, loss)`` with ``w_new = w - hinv[:, P] (hinv[P, P])^-1 w_P`` (exactly zero on P) and the
    predicted loss increase ``1/2 w_P^T (hinv[P, P])^-1 w_P`` of the quadratic ``1/2 dw H dw^T``.
    """
    if pruned.numel() == 0:
        return w.clone(), w.new_zeros(())
    wp = w[pruned]
    hpp = hinv[pruned][:, pruned]
    coef = torch.linalg.solve(hpp, wp)
    w_new = w - hinv[:, pruned] @ coef
    w_new[pruned] = 0.0
    return w_new, 0.5 * (wp @ coef)


def greedy_obs(w: torch.Tensor, hinv: torch.Tensor, k: int):
    """Classic OBS (Hassibi & Stork): remove ``k`` weights of one row one at a time, each time the one with the
    smallest saliency ``w_q^2 / (2 [H^-1]_qq)``, updating the rest and downdating ``H^-1`` by rank one.

    Returns ``(w_new, pruned_indices, total_loss)``.
    """
    w, hinv = w.clone(), hinv.clone()
    alive = torch.ones_like(w, dtype=torch.bool)
    order, total = [], w.new_zeros(())
    for _ in range(k):
        d = torch.diagonal(hinv)
        sal = (w ** 2 / (2 * d)).masked_fill(~alive, float("inf"))
        q = int(torch.argmin(sal))
        total = total + sal[q]
        col = hinv[:, q].clone()
        w = w - (w[q] / col[q]) * col
        hinv = hinv - torch.outer(col, col) / col[q]
        alive[q] = False
        w[~alive] = 0.0  # exactly zero: rounding in later updates must not revive removed weights
        order.append(q)
    return w, torch.tensor(order, dtype=torch.long), total
