"""How sparse can this model go?  The pruning-limit estimate of Zhang et al. (NeurIPS 2024, "How Sparse Can We
Prune A Deep Network: A Fundamental Limit Perspective"), computed *before* pruning from the Hessian spectrum.

The estimate
------------
Let ``w`` be the trained weights (the ``D`` entries of every pruned conv/linear weight, one vector) and
``L`` the loss on the given training batches.  Assumptions, as in the paper:

1. *Quadratic model at a trained point*: ``L(w + d) - L(w) ~= 1/2 d^T H d`` (gradient ~= 0), so the loss
   sublevel set ``S(eps) = {d : L(w + d) <= L(w) + eps}`` is the ellipsoid with semi-axes
   ``r_j = sqrt(2 eps / |lambda_j|)`` along the Hessian's eigenvectors.  The paper takes ``|lambda_j|`` for
   the negative eigenvalues of a non-convex network; a zero eigenvalue is an unbounded axis.
2. *Pruning is a subspace test*: pruning a fraction ``s`` of the weights keeps the solution feasible when the
   coordinate subspace of the kept weights, shifted to the pruned point, still meets ``w + S(eps)``.  By the
   (approximate) kinematic formula a subspace of codimension ``sD`` meets a set with high probability iff
   ``sD`` is below the set's statistical dimension (~ squared Gaussian width), and fails otherwise: a sharp
   phase transition.  For the ellipsoid seen from distance ``R`` the normalised statistical dimension is

       G(R) = sum_j rho_j * r_j^2 / (r_j^2 + R^2) / sum_j rho_j = sum_j rho_j * 2 eps / (2 eps + |lambda_j| R^2)

   (the smooth form of ``sum_j min(r_j^2, R^2) / R^2 / D``: axes longer than ``R`` count fully, shorter ones
   in proportion), with ``{lambda_j, rho_j}`` the spectral density of ``H`` (``sum rho = 1`` stands for the
   ``D`` eigenvalues).  The right-hand form is the one evaluated: finite for ``lambda_j = 0`` (term = 1).
3. *Distance to the pruned point*: global one-shot magnitude pruning (one threshold over all weights, no
   fine-tuning) is the Euclidean projection onto the vectors with ``sD`` zeros, so
   ``R(s) = ||w - w_s||_2 = sqrt(sum of the sD smallest w_i^2)``.

The predicted limit ``s*`` is the crossing ``G(R(s*)) = s*``: ``G(R(s))`` falls from 1 as ``s`` grows and ``s``
rises, so the crossing is unique.  It is found exactly on the integer counts (``R(k)^2`` is the cumulative
sum of the sorted squares, so every ``k = 0..D`` is available; bisection), then interpolated linearly between
the two counts around the sign change.

A second estimate from the same curvature: the quadratic model along the path
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Assumption 2 treats the pruning subspace as random relative to the Hessian's eigenvectors.  The magnitude
path is not random: ``report.path`` evaluates the same quadratic model on the actual pruning step
``d(s) = w_s - w``, ``L(w_s) - L(w) ~= g^T d + 1/2 d^T H d`` (``g`` the gradient of the mean loss on the HVP
data; one HVP per count), and gives the first sparsity where it exceeds ``eps`` (``path_points`` counts on
``0 … D``, then bisection on integer counts between the last one inside and the first outside), with the
gradient-free ``1/2 d^T H d`` (the paper's model at a minimum) alongside.  It predicts the one-shot limit
itself, which s* does not do for networks trained without strong l1: on Fashion-MNIST MLPs and CNNs, plain and
l1-trained, within 5 points of the measured loss limit (up to its first failure, the same definition) in 15
of 16 runs (s*: 3 of 16 against the largest passing sparsity; docs/results/limit.md).  It is a check
of the quadratic model, not a cheaper way to that limit: evaluating the loss at ``w_s`` on the same data costs a
forward pass per count against an HVP, and is exact (docs/results/limit.md: 5-11x cheaper on those networks).

What enters and how
~~~~~~~~~~~~~~~~~~~
* ``eps``, the loss tolerance: by default the standard deviation of the per-batch loss of the dense model
  over ``data`` (population std, as the paper's code), i.e. "a loss change the batch-to-batch noise already
  makes"; it scales with ``1/sqrt(batch size)``, so the report states the batch size and count.  Or give it.
* the spectrum: stochastic Lanczos quadrature (:func:`obs_plugins.curvature.operators.slq_density`) of the
  Hessian of the mean loss over ``hvp_data`` w.r.t. the pruned weights only (biases and norms are not part
  of ``D``), ``steps`` Lanczos steps with full re-orthogonalisation, ``probes`` Rademacher probes whose
  quadrature weights are averaged.  The nodes and weights are used directly (no binning on a grid).
* ``R(s)`` from the same weights that the sweep prunes; ``k = round(s D)`` weights at sparsity ``s``.

Differences from the reference code (QiaozheZhang/Global-One-shot-Pruning), on purpose: ``torch.linalg.eigh``
(``torch.eig`` is gone), any device; ``G`` at the exact ``R`` (the reference rounds ``R`` to an integer and
tabulates ``G`` only up to the sum of per-tensor norms, which breaks for small-norm models); the SLQ nodes
and weights themselves instead of a Gaussian-smoothed density sampled on a grid (whose tiny kernel can miss
nodes between grid points); the Hessian of the pruned weights only; no extra "important eigenvalue" zero
mass (the reference adds one for large CNNs from Hessian row norms; here it is left out, and the report
lists the spectrum so the mass near zero is visible).

What moves the estimate (measured on Fashion-MNIST MLPs, ``benchmarks/limit_slq.py``)
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* Almost all of the spectrum (> 95%) sits in a bulk within ~1e-2 of zero, and ``G`` is decided by where that
  bulk lies relative to ``2 eps / R^2`` (~1e-2 at the crossing).  Lanczos resolves the extremes first, so the
  bulk is a few Ritz nodes and too few steps mislead: on a 784-32-10 MLP, 32 / 64 / 128 / 256 steps (4
  probes) gave s* = 0.952 / 0.816 / 0.934 / 0.934; 1 vs 4 probes at 128 steps 0.930 vs 0.934.  Use >= 128.
* The estimate is the limit of the *feasibility* problem (some s-sparse point in the sublevel set), not of
  magnitude pruning as such: on plainly or lightly l1-trained MLP/CNN it sat 13-31 points above what magnitude
  pruning without fine-tuning reaches; after strong l1 training (the paper's recipe; >= 40% of the weights
  below 1e-3) it sat 2.4-5.2 points above its accuracy limit on the MLP and the CNN (3 seeds each).  With the
  kept weights re-fit (the same masks, one epoch of masked training; ``benchmarks/limit.py --refit-epochs 1``)
  the MLP's limit lands within 1.5 points of s*, the CNN's 3-19 points above it: read s* as lying between what
  one-shot magnitude pruning reaches and what pruning plus re-fitting reaches (docs/results/limit.md).
* The sample Hessian of ``n`` examples with ``C`` outputs has rank at most about ``n (C - 1)``: with fewer
  HVP examples than ``D / (C - 1)`` at least ``1 - n (C - 1) / D`` of the spectrum is exactly zero, every
  such direction counts fully in ``G``, and ``s*`` cannot fall below that floor.  Average the HVPs over more
  than ``D / (C - 1)`` examples where you can (the MLP above: 1024 / 4096 / 8192 examples, 0.931 / 0.934 / 0.932).

The measured limit (``sweep=True``): the same global magnitude pruning at each sparsity of a grid; the limit
is the largest grid sparsity whose accuracy on ``eval_data`` is at least the dense accuracy minus
``acc_tolerance`` (absolute; 0 = "stays at the dense accuracy"), and, the quantity the theory is about, the
largest whose loss on ``data`` stays within ``L(w) + eps``; ``first_failure=True`` gives instead the last
sparsity before the first failing one (a curve can dip back under a threshold after failing).  The model is
never changed: pruned weights are swapped in for each evaluation and restored exactly.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .curvature import Curvature
from .curvature.core import _batch_weights
from .curvature.batching import batch_loss, default_forward, is_pair, move
from .curvature.collect import eval_mode
from .curvature.operators import curvature_matvec, density_on_grid, slq_density
from .errors import PruningInputError
from .masks import count_to_prune
from .targets import prunable_linear_targets, resolve_targets

__all__ = ["estimate", "LimitReport", "gaussian_width_fraction", "magnitude_path", "solve_limit",
           "default_sparsities"]


def default_sparsities(step: float = 0.01) -> list[float]:
    """``step, 2 step, ..., < 1`` (default 0.01 ... 0.99; 0.3 gives 0.3, 0.6, 0.9)."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 1e-4 <= step < 1.0:
        raise PruningInputError(f"step: the sparsity grid step must be a number in [1e-4, 1) (at most 9,999 "
                                f"sparsities), got {step!r}")
    out, i = [], 1
    while round(i * step, 10) < 1.0:
        out.append(round(i * step, 10))
        i += 1
    return out


# ------------------------------------------------------------------------------------------- pure formulas
def gaussian_width_fraction(nodes: torch.Tensor, weights: torch.Tensor, R, epsilon: float) -> torch.Tensor:
    """``G(R) = sum_j rho_j 2 eps / (2 eps + |lambda_j| R^2) / sum_j rho_j`` for each ``R`` (float64)."""
    lam = torch.as_tensor(nodes, dtype=torch.float64).abs().reshape(1, -1)
    rho = torch.as_tensor(weights, dtype=torch.float64).reshape(1, -1)
    R2 = torch.as_tensor(R, dtype=torch.float64).reshape(-1, 1) ** 2
    two_eps = 2.0 * float(epsilon)
    return (rho * (two_eps / (two_eps + lam * R2))).sum(1) / rho.sum()


def magnitude_path(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global magnitude pruning order of a flat weight vector and ``R(k)^2`` for every count ``k = 0..D``.

    Returns ``(order, cum_sq)``: ``order[:k]`` are the ``k`` smallest ``|w|`` (ties by position, as
    :func:`obs_plugins.masks.lowest_k_mask`), ``cum_sq[k] = ||w - w_k||^2`` in float64."""
    order = torch.sort(flat.detach().abs().float(), stable=True).indices
    sq = flat.detach().double()[order] ** 2
    return order, torch.cat([sq.new_zeros(1), torch.cumsum(sq, 0)])


def _last_feasible(f: Callable[[int], float], lo: int, hi: int) -> float:
    """Bisection on integer counts: ``f(lo) >= 0 > f(hi)``; returns the crossing interpolated linearly between
    the last count with ``f >= 0`` and the next (a count, not yet divided by D)."""
    f_lo, f_hi = f(lo), f(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fm = f(mid)
        if fm >= 0:
            lo, f_lo = mid, fm
        else:
            hi, f_hi = mid, fm
    return lo + f_lo / (f_lo - f_hi)


def solve_limit(nodes: torch.Tensor, weights: torch.Tensor, cum_sq: torch.Tensor, epsilon: float) -> float:
    """The crossing ``G(R(s)) = s`` on the exact path ``R(k)^2 = cum_sq[k]``, ``s = k / D``."""
    D = cum_sq.numel() - 1

    def f(k: int) -> float:
        return float(gaussian_width_fraction(nodes, weights, math.sqrt(max(float(cum_sq[k]), 0.0)), epsilon)[0]) - k / D

    if f(D) >= 0:  # f(0) = 1 > 0
        return 1.0
    return _last_feasible(f, 0, D) / D


def path_limit(increase: Callable[[int], float], D: int, epsilon: float, grid: Sequence[int]) -> float:
    """First crossing of ``increase(k) = epsilon`` along the magnitude path: the first count of the increasing
    ``grid`` (starting at 0) whose ``increase`` exceeds ``epsilon``, refined by bisection against the grid count
    before it (a count there with ``increase <= epsilon`` and the next above it), as a sparsity ``k / D``;
    1.0 when no grid count exceeds it."""
    f = lambda k: epsilon - increase(k)  # noqa: E731
    prev = grid[0]
    for k in grid[1:]:
        if f(k) < 0:
            return _last_feasible(f, prev, k) / D
        prev = k
    return 1.0


# ------------------------------------------------------------------------------------------------ report
@dataclass
class LimitReport:
    """What :func:`estimate` found.  Curves are plain lists (JSON-ready)."""
    predicted: float                      # s*: G(R(s*)) = s*
    epsilon: float                        # loss tolerance used
    epsilon_source: str                   # how it was chosen
    dense_loss: float                     # mean loss over data
    num_weights: int                      # D
    weight_norm: float                    # ||w||_2 of the pruned weights
    params: list[str]
    nodes: list[float]                    # SLQ nodes (all probes)
    weights: list[float]                  # SLQ weights (sum 1)
    slq: dict                             # steps, probes, seed, samples, hvps
    curve: dict                           # sparsity, R, G (= G(R(s)))
    g_curve: dict                         # R, G (G on an R grid)
    sweep: dict | None = None             # measured curves and limits
    path: dict | None = None              # the quadratic model along the magnitude path (see estimate)
    seconds: dict = field(default_factory=dict)
    label: str = ""

    # ---------------------------------------------------------------- measured limits
    def measured_limit(self, acc_tolerance: float | None = None, *, first_failure: bool = False) -> float | None:
        """Largest swept sparsity whose accuracy >= dense - ``acc_tolerance`` (default: the sweep's).

        ``first_failure=True``: the last swept sparsity before the first one that fails (every sparsity up to it
        passes) -- the definition of the path model's crossing (``path["predicted"]``, the first count whose
        modelled loss leaves epsilon); the two differ when the curve dips back over the threshold after failing."""
        if self.sweep is None or self.sweep.get("accuracy") is None:
            return None
        tol = self.sweep["acc_tolerance"] if acc_tolerance is None else float(acc_tolerance)
        pick = _before_first_failure if first_failure else _largest_passing
        return pick(self.sweep["sparsity"], [a >= self.sweep["dense_accuracy"] - tol - 1e-12
                                             for a in self.sweep["accuracy"]])

    def measured_loss_limit(self, epsilon: float | None = None, *, first_failure: bool = False) -> float | None:
        """Largest swept sparsity whose loss on ``data`` <= dense + ``epsilon`` (default: the estimate's);
        ``first_failure`` as in :meth:`measured_limit`."""
        if self.sweep is None:
            return None
        eps = self.epsilon if epsilon is None else float(epsilon)
        pick = _before_first_failure if first_failure else _largest_passing
        return pick(self.sweep["sparsity"], [l <= self.dense_loss + eps + 1e-12 for l in self.sweep["train_loss"]])

    # ---------------------------------------------------------------- output
    def to_dict(self) -> dict:
        d = asdict(self)
        d["measured"] = self.measured_limit()
        d["measured_loss"] = self.measured_loss_limit()
        d["measured_first_failure"] = self.measured_limit(first_failure=True)
        d["measured_loss_first_failure"] = self.measured_loss_limit(first_failure=True)
        return d

    def to_markdown(self) -> str:
        nodes = torch.tensor(self.nodes, dtype=torch.float64)
        near0 = float(torch.tensor(self.weights, dtype=torch.float64)[nodes.abs() <= 1e-3 * nodes.abs().max()].sum())
        lines = [f"### Pruning limit{': ' + self.label if self.label else ''}", "",
                 "| quantity | value |", "|---|---|",
                 f"| predicted limit s* (G(R(s*)) = s*) | **{self.predicted:.4f}** |"]
        if self.path is not None:
            lines.append(f"| quadratic model along the magnitude path: first s with gᵀd + ½dᵀHd > ε | "
                         f"**{self.path['predicted']:.4f}** (½dᵀHd alone: {self.path['predicted_second_order']:.4f}; "
                         f"‖g‖ {self.path['gradient_norm']:.3g}, {self.path['hvps']} HVPs) |")
        if self.sweep is not None:
            m, ml = self.measured_limit(), self.measured_loss_limit()
            if m is not None:
                lines.append(f"| measured limit, accuracy >= dense − {self.sweep['acc_tolerance']:g} "
                             f"(dense {self.sweep['dense_accuracy']:.4f}) | {m:.4f} "
                             f"(predicted − measured {self.predicted - m:+.4f}) |")
            lines.append(f"| measured limit, loss <= dense + ε | {ml:.4f} "
                         f"(predicted − measured {self.predicted - ml:+.4f}"
                         + ") |")
            if self.path:   # the path model's crossing is a first crossing: compare it with the first failure
                mf = self.measured_loss_limit(first_failure=True)
                lines.append(f"| measured limit, loss <= dense + ε up to the first failure | {mf:.4f} "
                             f"(path model − measured {self.path['predicted'] - mf:+.4f}) |")
            lines.append(f"| sweep grid | {len(self.sweep['sparsity'])} sparsities, "
                         f"{self.sweep['sparsity'][0]:g} … {self.sweep['sparsity'][-1]:g} |")
        lines += [f"| ε (loss tolerance) | {self.epsilon:.4g} — {self.epsilon_source} |",
                  f"| dense loss on data | {self.dense_loss:.4f} |",
                  f"| weights D, ‖w‖₂ | {self.num_weights:,}, {self.weight_norm:.3f} |",
                  f"| SLQ | {self.slq['steps']} steps × {self.slq['probes']} probes (seed {self.slq['seed']}), "
                  f"HVPs over {self.slq['samples']} samples, {self.slq['hvps']} HVPs |",
                  f"| spectrum | λ in [{float(nodes.min()):.4g}, {float(nodes.max()):.4g}], "
                  f"mass with abs(λ) ≤ 1e-3·max: {near0:.3f} |",
                  "| time (s) | " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()) + " |"]
        return "\n".join(lines)

    def save(self, path) -> tuple[Path, Path]:
        """Write ``<path>.json`` and ``<path>.md`` (``path`` without suffix, or with .json/.md)."""
        p = Path(path)
        stem = p.with_suffix("") if p.suffix in (".json", ".md") else p
        stem.parent.mkdir(parents=True, exist_ok=True)
        # appended, not with_suffix: a dotted name ("l1_0.001_seed1") keeps every character
        js, md = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")
        js.write_text(json.dumps(self.to_dict(), indent=1))
        md.write_text(self.to_markdown() + "\n")
        return js, md

    @classmethod
    def load(cls, path) -> "LimitReport":
        d = json.loads(Path(path).read_text())
        for k in ("measured", "measured_loss", "measured_first_failure", "measured_loss_first_failure"):
            d.pop(k, None)
        return cls(**d)

    def plot(self, path=None, axes=None):
        """Spectral density, ``G(R(s))`` vs ``s`` (the crossing), measured accuracy/loss vs sparsity with the
        predicted and measured limits.  ``axes``: three matplotlib axes to draw into; else a new figure,
        saved to ``path`` when given (Agg backend).  Returns the figure."""
        import matplotlib
        if axes is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if axes is None:
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        fig = axes[0].figure
        title = f"{self.label}: " if self.label else ""
        grid, dens = density_on_grid(torch.tensor(self.nodes), torch.tensor(self.weights), num=1024)
        axes[0].semilogy(grid.numpy(), dens.numpy() + 1e-8)
        axes[0].set_xlabel("Hessian eigenvalue λ")
        axes[0].set_ylabel("density (SLQ, smoothed)")
        axes[0].set_title(f"{title}spectrum ({self.slq['steps']}×{self.slq['probes']} SLQ)")
        s, G = self.curve["sparsity"], self.curve["G"]
        axes[1].plot(s, G, label="G(R(s))")
        axes[1].plot([0, 1], [0, 1], "k--", lw=0.8, label="s")
        axes[1].axvline(self.predicted, color="g", label=f"predicted {self.predicted:.3f}")
        axes[1].set_xlabel("sparsity s")
        axes[1].set_ylabel("normalised statistical dimension")
        axes[1].set_title(f"{title}crossing, ε={self.epsilon:.3g}")
        ax = axes[2]
        if self.sweep is not None:
            sw = self.sweep
            if sw.get("accuracy") is not None:
                ax.plot(sw["sparsity"], sw["accuracy"], "b.-", ms=3, label="accuracy (eval)")
                ax.axhline(sw["dense_accuracy"] - sw["acc_tolerance"], color="b", ls=":", lw=0.8)
                m = self.measured_limit()
                ax.axvline(m, color="b", ls="--", label=f"measured (acc) {m:.2f}")
            ml = self.measured_loss_limit()
            ax.axvline(ml, color="r", ls="--", label=f"measured (loss ≤ +ε) {ml:.2f}")
            ax2 = ax.twinx()
            ax2.semilogy(sw["sparsity"], sw["train_loss"], "r-", lw=0.8)
            ax2.axhline(self.dense_loss + self.epsilon, color="r", ls=":", lw=0.8)
            ax2.set_ylabel("loss on data (red)")
        ax.axvline(self.predicted, color="g", label=f"predicted {self.predicted:.2f}")
        if self.path is not None:
            ax.axvline(self.path["predicted"], color="m", ls="-.",
                       label=f"quadratic along the path {self.path['predicted']:.2f}")
        ax.set_xlabel("global magnitude sparsity (no fine-tuning)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}predicted vs measured")
        ax.legend(fontsize=7, loc="lower left")
        axes[1].legend(fontsize=7)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=120)
        return fig


def _largest_passing(grid: Sequence[float], ok: Sequence[bool]) -> float:
    passing = [s for s, o in zip(grid, ok) if o]
    return max(passing) if passing else 0.0


def _before_first_failure(grid: Sequence[float], ok: Sequence[bool]) -> float:
    """The largest grid point with every grid point up to it passing (0.0 when the smallest fails)."""
    last = 0.0
    for s, o in sorted(zip(grid, ok)):
        if not o:
            break
        last = s
    return last


# ------------------------------------------------------------------------------------------------ estimate
def _as_batches(data, arg: str) -> list:
    if data is None:
        raise PruningInputError(f"{arg}: give the batches (a list of (inputs, target) pairs or dicts)")
    if torch.is_tensor(data):
        raise PruningInputError(f"{arg}: expected an iterable of batches, got a bare tensor")
    try:
        batches = list(data)
    except TypeError:
        raise PruningInputError(f"{arg}: expected an iterable of batches, got {type(data).__name__}") from None
    if not batches:
        raise PruningInputError(f"{arg}: no batches given")
    return batches


def _check_int(value, arg: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PruningInputError(f"{arg}: expected an int >= {low}, got {value!r}")
    return value


def _batch_size(b) -> int:
    x = b[0] if isinstance(b, (tuple, list)) else (next(iter(b.values())) if isinstance(b, dict) else b)
    return int(x.shape[0]) if torch.is_tensor(x) and x.dim() else 1


def estimate(model: nn.Module, data: Iterable, loss_fn: Callable, *, params=None, epsilon: float | None = None,
             hvp_data: Iterable | None = None, steps: int = 128, probes: int = 4, seed: int = 0,
             sweep: bool = False, eval_data: Iterable | None = None, sparsities: Sequence[float] | None = None,
             acc_tolerance: float = 0.0, metric: str = "accuracy", forward_fn: Callable | None = None,
             curve_points: int = 201, path_points: int = 21, label: str = "", progress: bool = True) -> LimitReport:
    """Predict how far global one-shot magnitude pruning can go before the loss leaves its tolerance.

    ``data``: training batches (``(inputs, target)`` pairs or dicts; torch's ``loss_fn(output, target)``
    convention, see :mod:`obs_plugins.curvature.batching`) for ``eps`` and the loss sweep; ``hvp_data``: the
    batches the Hessian is averaged over (default ``data``).  ``params``: the pruned tensors (default every
    nn.Linear/nn.Conv2d weight).  ``epsilon``: the loss tolerance (default: std of the per-batch loss over
    ``data``, at least 2 batches).  ``steps``/``probes``/``seed``: SLQ.  ``sweep=True`` also measures the
    limit: global magnitude pruning at every ``sparsities`` (default 0.01 … 0.99, each in (0, 1)), accuracy on
    ``eval_data`` (default ``data``; ``metric="accuracy"`` needs ``(inputs, int target)`` pairs, ``"loss"``
    measures only the loss) against the dense accuracy minus ``acc_tolerance``.  ``path_points``: counts on
    ``0 … D`` for the quadratic model along the magnitude path (``report.path``; the module docstring).  The
    model is left exactly as it was (weights, masks, train/eval mode).
    """
    # ---------------- validate everything first
    if model is None or not isinstance(model, nn.Module):
        raise PruningInputError(f"model: expected an nn.Module, got {type(model).__name__}")
    if loss_fn is None or not callable(loss_fn):
        raise PruningInputError("loss_fn: give the loss, torch's loss_fn(output, target) for (inputs, target) "
                                "batches (e.g. F.cross_entropy) or loss_fn(output, batch) for dict batches")
    batches = _as_batches(data, "data")
    hvp_batches = batches if hvp_data is None else _as_batches(hvp_data, "hvp_data")
    steps, probes = _check_int(steps, "steps"), _check_int(probes, "probes")
    curve_points = _check_int(curve_points, "curve_points", 2)
    path_points = _check_int(path_points, "path_points", 2)
    if epsilon is not None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (math.isfinite(epsilon)
                                                                                      and epsilon > 0):
            raise PruningInputError(f"epsilon: expected a finite float > 0 (or None for the per-batch loss std), "
                                    f"got {epsilon!r}")
    elif len(batches) < 2:
        raise PruningInputError("epsilon: the default (std of the per-batch loss) needs at least 2 batches in "
                                f"data, got {len(batches)}; pass more batches or epsilon=...")
    if metric not in ("accuracy", "loss"):
        raise PruningInputError(f"metric: 'accuracy' or 'loss', got {metric!r}")
    if not (isinstance(acc_tolerance, (int, float)) and not isinstance(acc_tolerance, bool)
            and math.isfinite(acc_tolerance) and acc_tolerance >= 0):
        raise PruningInputError(f"acc_tolerance: expected a float >= 0, got {acc_tolerance!r}")
    grid = None
    eval_batches = None
    if sweep:
        grid = default_sparsities() if sparsities is None else list(sparsities)
        if not grid:
            raise PruningInputError("sparsities: empty")
        for s in grid:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 < s < 1.0):
                raise PruningInputError(f"sparsities: every sparsity must lie in (0, 1), got {s!r}")
        grid = sorted(float(s) for s in grid)
        eval_batches = batches if eval_data is None else _as_batches(eval_data, "eval_data")
        if metric == "accuracy" and not all(is_pair(b) for b in eval_batches):
            raise PruningInputError("eval_data: metric='accuracy' needs (inputs, target) pairs; use metric='loss'")
        if metric == "accuracy" and any(not torch.is_tensor(b[1]) or b[1].is_floating_point()
                                        for b in eval_batches):
            raise PruningInputError("eval_data: metric='accuracy' needs integer class targets (these are not); "
                                    "use metric='loss'")
    elif sparsities is not None:
        raise PruningInputError("sparsities: only used with sweep=True")
    forward_fn = forward_fn or default_forward
    targets = prunable_linear_targets(model, exclude=()) if params is None else resolve_targets(model, params)
    pairs = [(t.module, t.name) for t in targets]
    curv = Curvature(model, pairs, hvp_batches, loss_fn=loss_fn, forward_fn=forward_fn)
    ev = Curvature(model, pairs, batches, loss_fn=loss_fn, forward_fn=forward_fn)
    seconds = {}

    # ---------------- dense loss and eps
    t0 = time.perf_counter()
    per_batch = _batch_losses(ev, batches, None, progress, "dense loss")
    dense_loss = _sample_mean(per_batch, batches)
    if epsilon is None:
        mean = sum(per_batch) / len(per_batch)   # the std of the per-batch losses (their own mean)
        epsilon = math.sqrt(sum((l - mean) ** 2 for l in per_batch) / len(per_batch))
        sizes = sorted({_batch_size(b) for b in batches})
        source = (f"std of the dense per-batch loss over {len(batches)} batches of "
                  f"{'/'.join(map(str, sizes))}")
        if not epsilon > 0:
            raise PruningInputError("epsilon: the per-batch loss has zero spread (identical batches?); pass "
                                    "epsilon=...")
    else:
        epsilon, source = float(epsilon), "given"
    seconds["loss"] = time.perf_counter() - t0

    # ---------------- spectrum (SLQ over HVPs)
    t0 = time.perf_counter()
    mv, dim, dev = curvature_matvec(curv)
    bar = _bar(progress, steps * probes, "SLQ (Hessian-vector products)")
    hvps = [0]

    def counted(v):
        hvps[0] += 1
        if bar is not None:
            bar.update(1)
        return mv(v)

    try:
        nodes, weights = slq_density(counted, dim, steps=steps, probes=probes, seed=seed, device=dev)
    finally:
        if bar is not None:
            bar.close()
    nodes, weights = nodes.cpu(), weights.cpu()
    seconds["spectrum"] = time.perf_counter() - t0

    # ---------------- R(s), the crossing
    flat = torch.cat([t.current().reshape(-1) for t in targets])
    order, cum_sq = magnitude_path(flat)
    D = flat.numel()
    s_star = solve_limit(nodes, weights, cum_sq, epsilon)
    s_curve = [i / (curve_points - 1) for i in range(curve_points)]
    R_curve = [math.sqrt(float(cum_sq[round(s * D)])) for s in s_curve]
    G_curve = gaussian_width_fraction(nodes, weights, R_curve, epsilon).tolist()
    norm = math.sqrt(float(cum_sq[-1]))
    R_grid = [norm * i / (curve_points - 1) for i in range(curve_points)]
    report = LimitReport(
        predicted=s_star, epsilon=epsilon, epsilon_source=source, dense_loss=dense_loss, num_weights=D,
        weight_norm=norm, params=[t.key for t in targets], nodes=nodes.tolist(), weights=weights.tolist(),
        slq=dict(steps=steps, probes=probes, seed=seed, samples=sum(_batch_size(b) for b in hvp_batches),
                 hvps=hvps[0]),
        curve=dict(sparsity=s_curve, R=R_curve, G=G_curve),
        g_curve=dict(R=R_grid, G=gaussian_width_fraction(nodes, weights, R_grid, epsilon).tolist()),
        seconds=seconds, label=label)

    # ---------------- the quadratic model along the magnitude path (one gradient, one HVP per count)
    t0 = time.perf_counter()
    _, grads = curv.loss_and_grad()
    grad = curv.flatten(grads).double().cpu()
    w64 = flat.detach().double().cpu()
    order_cpu = order.cpu()   # the magnitude order lives on the model's device; d and w64 on the CPU
    terms: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}

    def taylor(k: int) -> tuple[float, float]:
        """(g^T d, 1/2 d^T H d) for d = w_k - w, the k smallest weights zeroed."""
        if k not in terms:
            d = torch.zeros(D, dtype=torch.float64)
            d[order_cpu[:k]] = -w64[order_cpu[:k]]
            terms[k] = (float(grad @ d), 0.5 * float(d @ mv(d).double().cpu()))
            if not all(map(math.isfinite, terms[k])):
                raise PruningInputError(f"hvp_data: the gradient or Hessian-vector product along the magnitude path "
                                        f"is not finite at {k} of {D} weights pruned")
        return terms[k]

    counts = [round(i * D / (path_points - 1)) for i in range(path_points)]
    report.path = dict(
        predicted=path_limit(lambda k: sum(taylor(k)), D, epsilon, counts),
        predicted_second_order=path_limit(lambda k: taylor(k)[1], D, epsilon, counts),
        sparsity=[k / D for k in counts], first=[taylor(k)[0] for k in counts],
        second=[taylor(k)[1] for k in counts], gradient_norm=float(grad.norm()), hvps=len(terms) - 1)
    seconds["path"] = time.perf_counter() - t0

    # ---------------- measured limit
    if sweep:
        t0 = time.perf_counter()
        sw = dict(sparsity=grid, acc_tolerance=float(acc_tolerance), metric=metric, train_loss=[],
                  eval_samples=sum(_batch_size(b) for b in eval_batches))
        use_acc = metric == "accuracy"
        dense_acc, dense_eval = _evaluate(ev, eval_batches, None, use_acc)
        sw.update(dense_accuracy=dense_acc, dense_eval_loss=dense_eval, accuracy=[] if use_acc else None,
                  eval_loss=[])
        bar = _bar(progress, len(grid), "sweep (global magnitude pruning)")
        for s in grid:
            k = count_to_prune(s, D, arg="sparsities")
            w = flat.clone()
            w[order[:k]] = 0
            ov = ev.unflatten(w)
            sw["train_loss"].append(_sample_mean(_batch_losses(ev, batches, ov, False, ""), batches))
            acc, el = _evaluate(ev, eval_batches, ov, use_acc)
            if use_acc:
                sw["accuracy"].append(acc)
            sw["eval_loss"].append(el)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        report.sweep = sw
        seconds["sweep"] = time.perf_counter() - t0
    return report


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def _sample_mean(per_batch: list[float], batches) -> float:
    """The mean over samples of per-batch mean losses (the plain mean when every batch has as many rows), the
    weighting the gradient and the HVPs use."""
    w = _batch_weights(batches)
    if w is None:
        return sum(per_batch) / len(per_batch)
    return sum(l * wi for l, wi in zip(per_batch, w)) / len(per_batch)


def _batch_losses(curv: Curvature, batches, overrides, progress: bool, desc: str) -> list[float]:
    """Loss of each batch with optional weight overrides (model restored exactly afterwards)."""
    from tqdm.auto import tqdm
    model = curv.model
    out = []
    with eval_mode(model), curv._weights(overrides), curv._mid_apply_attributes(), torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress, leave=False):
            b = move(b, curv.device)
            out.append(float(batch_loss(curv.loss_fn, curv.forward_fn(model, b), b)))
    if not all(math.isfinite(l) for l in out) and overrides is None:
        raise PruningInputError("data: the dense model's loss is not finite on these batches")
    return out


def _evaluate(curv: Curvature, batches, overrides, use_acc: bool) -> tuple[float | None, float]:
    """(accuracy or None, mean loss) over batches, sample-weighted, with optional weight overrides."""
    model = curv.model
    correct = total = total_cmp = 0
    loss = 0.0
    with eval_mode(model), curv._weights(overrides), curv._mid_apply_attributes(), torch.no_grad():
        for b in batches:
            b = move(b, curv.device)
            out = curv.forward_fn(model, b)
            n = _batch_size(b)
            loss += float(batch_loss(curv.loss_fn, out, b)) * n
            total += n
            if use_acc:
                logits = out.logits if hasattr(out, "logits") else out
                target = b[1]
                if target.is_floating_point() or tuple(target.shape) != tuple(logits.shape[:-1]):
                    raise PruningInputError(f"eval_data: metric='accuracy' needs integer class targets of "
                                            f"shape {tuple(logits.shape[:-1])} (the logits' without the class "
                                            f"dimension), got {target.dtype} {tuple(target.shape)}; use "
                                            "metric='loss'")
                pred = logits.argmax(-1)
                correct += int((pred == target).sum())
                total_cmp += pred.numel()
    return (correct / max(total_cmp, 1) if use_acc else None), loss / total
