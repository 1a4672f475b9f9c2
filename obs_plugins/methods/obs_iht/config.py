from __future__ import annotations

import math
from dataclasses import dataclass



ALLOCATIONS = ("uniform", "global", "fisher", "owl")

GRAD_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class OBSIHTConfig:
    """Iterative Optimal Brain Surgeon (Wu et al., NeurIPS 2024).

    iterations:  T.  T=1 is the per-layer OBS sweep (SparseGPT-equivalent).  Each further iteration is one IHT
                 step of the paper, ``theta <- project_k(theta - eta * grad f(theta) (H + lambda I)^-1)``, with
                 ``grad f`` the gradient of the calibration loss and the projection the per-layer OBS sweep.
    nm:          "N:M" semi-structured pattern (e.g. "2:4"), or None for unstructured.
    allocation:  how a global ``amount`` is split over tensors: "uniform" (same fraction per tensor),
                 "global" (one ranking of loss-comparable OBS saliencies ``sigma_i w_ij^2 / [H^-1]_jj``: the layer
                 Gram's OBS error scaled by the loss sensitivity of each output; needs ``loss_fn``) or "fisher"
                 (one ranking of empirical-Fisher OBS saliencies; needs Fisher blocks).  Through
                 ``prune.global_unstructured`` the default is "global" when the curvature has a loss.
                 "owl": outlier-weighted layer-wise sparsity (Yin et al. 2023) for decoder/encoder stacks: blocks
                 with more Wanda-score outliers (> ``owl_m`` x the block mean) are pruned less, block sparsities
                 within ``s +- owl_lambda``; per-layer OBS sweep as usual.
    layer_min_sparsity, layer_max_sparsity: bounds on each tensor's sparsity under a ranked allocation
                 (prior zeros count); ``layer_max_sparsity=None`` means ``min(0.99, s + 0.2)`` for an overall
                 sparsity ``s``, so no layer is ever removed whole (lifted to 1.0 only when the request itself
                 cannot be met under it, e.g. ``s`` near 1 on tiny layers; ``report["layer_sparsity_bounds"]``).
    rel_damp:    relative damping ``lambda = rel_damp * mean(diag H)``; the ladder climbs from here on failure.
    blocksize:   columns per lazy-update block of the sweep (mask chosen adaptively per block).
    step_sizes:  candidate relative step sizes rho (eta = rho * ||theta_1|| / ||projected direction||, theta_1 the
                 T=1 weights, the same scale at every iteration) for the
                 search on the held-out calibration split: it starts at the middle value, moves through the
                 others (then by doubling / halving) until the best step is bracketed, and ends at the vertex of
                 the parabola through the bracket (evaluated only when it is > 20% from the bracket's best
                 point); later steps re-centre the grid on the last accepted step times ``step_decay``.
    max_step:    trust region: no step moves the weights by more than ``max_step * ||theta_1||`` (with
                 ``layer_trust``, no tensor by more than ``rho`` times its current norm); a step that does not lower
                 the held-out loss is never accepted (the iterations stop there).
    layer_trust: the trust region holds for every tensor too: a step of relative size ``rho`` moves no tensor by
                 more than ``rho * ||theta_l||`` (the direction within the tensor is kept, only its length is cut).
                 Without it the preconditioner can put almost the whole step into one tensor: on SmolLM2 at 50%,
                 98% of the projected direction's norm sat in layer 0's o_proj (its input Gram has near-null
                 directions that H^-1 amplifies), which a step of rho = 0.02 then moved by ~100% of its norm.
    holdout_fraction: share of the calibration batches held out from the gradient for choosing eta and the best
                 iteration (they still enter the layer Grams of the T=1 sweep, which favours T=1 there).
    grad_subsets: m >= 1.  The gradient split is dealt into m interleaved subsets (gradient batch i goes to subset
                 i mod m) and iteration t takes its gradient on subset (t - 2) mod m alone, so each gradient pass
                 costs 1/m of the full one and every batch is used once in m iterations.  The held-out split and
                 the acceptance of a step are unchanged.  1 (the default): the whole split in every iteration.
    grad_dtype:  dtype of the iterations' gradient pass (the IHT direction): "float32", "bfloat16" (forward and
                 backward under ``torch.autocast``: products in bf16, accumulated in fp32; weights, curvature,
                 projection and the held-out losses that accept a step stay fp32) or "auto" = bfloat16 for fp32
                 weights where the device runs it natively (CUDA with bf16 support; a CPU with AVX512-BF16 or
                 AMX), else the model's own dtype ("float32" likewise runs in the model's dtype).
                 On SmolLM2 the bf16 gradient is 2.4x faster on such a CPU, cosine 0.999 to the fp32 one
                 (`benchmarks/grad_dtype.py`);
                 a step is still accepted only on the exact fp32 held-out loss.  ``report["grad_dtype"]``:
                 "bfloat16" or "model dtype".
    The support chosen by the first sweep is kept for the later iterations: re-choosing it moved < 0.2% of the
    mask and was less stable in the measurements behind this project's design.
    """
    iterations: int = 1
    nm: str | None = None
    allocation: str = "uniform"
    layer_min_sparsity: float = 0.0
    layer_max_sparsity: float | None = None
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    rel_damp: float = 0.01
    blocksize: int = 128
    step_sizes: tuple = (0.01, 0.02, 0.04)
    step_decay: float = 0.5
    max_step: float = 0.25
    layer_trust: bool = True
    holdout_fraction: float = 0.25
    grad_subsets: int = 1
    grad_dtype: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.step_sizes, list):   # a list equals its JSON round trip only as the tuple it becomes
            self.step_sizes = tuple(self.step_sizes)

    def validate(self) -> None:
        from ...errors import PruningInputError
        from ...masks import parse_nm
        if not isinstance(self.progress, bool):   # "no" / "false" would turn the bars on
            raise PruningInputError(f"progress: must be True or False, got {self.progress!r}")
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise PruningInputError(f"iterations: must be an int >= 1, got {self.iterations!r}")
        parse_nm(self.nm)
        if self.allocation not in ALLOCATIONS:
            raise PruningInputError(f"allocation: one of {ALLOCATIONS}, got {self.allocation!r}")
        lo, hi = self.layer_min_sparsity, self.layer_max_sparsity
        if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not 0 <= lo < 1:
            raise PruningInputError(f"layer_min_sparsity: must be in [0, 1), got {lo!r}")
        if hi is not None and (isinstance(hi, bool) or not isinstance(hi, (int, float)) or not lo <= hi <= 1):
            raise PruningInputError(f"layer_max_sparsity: must be in [layer_min_sparsity, 1] or None, got {hi!r}")
        if isinstance(self.owl_lambda, bool) or not isinstance(self.owl_lambda, (int, float)) \
                or not 0 <= self.owl_lambda < 0.5:
            raise PruningInputError(f"owl_lambda: must be in [0, 0.5), got {self.owl_lambda!r}")
        if isinstance(self.owl_m, bool) or not isinstance(self.owl_m, (int, float)) or not self.owl_m > 0:
            raise PruningInputError(f"owl_m: must be > 0, got {self.owl_m!r}")
        if not number(self.rel_damp) or not self.rel_damp > 0:
            raise PruningInputError(f"rel_damp: must be > 0, got {self.rel_damp!r}")
        if not (isinstance(self.blocksize, int) and not isinstance(self.blocksize, bool) and self.blocksize > 0):
            raise PruningInputError(f"blocksize: must be a positive int, got {self.blocksize!r}")
        if not isinstance(self.step_sizes, (tuple, list)) or not self.step_sizes \
                or any(not number(s) or not s > 0 for s in self.step_sizes):
            raise PruningInputError(f"step_sizes: need positive values, got {self.step_sizes!r}")
        if not (number(self.max_step) and self.max_step > 0):
            raise PruningInputError(f"max_step: must be > 0, got {self.max_step!r}")
        if not isinstance(self.layer_trust, bool):
            raise PruningInputError(f"layer_trust: must be True or False, got {self.layer_trust!r}")
        if not number(self.step_decay) or not 0 < self.step_decay <= 1:
            raise PruningInputError(f"step_decay: must be in (0, 1], got {self.step_decay!r}")
        if self.grad_dtype not in GRAD_DTYPES:
            raise PruningInputError(f"grad_dtype: one of {GRAD_DTYPES}, got {self.grad_dtype!r}")
        if isinstance(self.grad_subsets, bool) or not isinstance(self.grad_subsets, int) or self.grad_subsets < 1:
            raise PruningInputError(f"grad_subsets: must be an int >= 1, got {self.grad_subsets!r}")
        if not number(self.holdout_fraction) or not 0 < self.holdout_fraction < 1:
            raise PruningInputError(f"holdout_fraction: must be in (0, 1), got {self.holdout_fraction!r}")
