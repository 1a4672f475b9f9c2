from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import PruningInputError


@dataclass
class BiPConfig:
    """BiP: bi-level pruning (Y. Zhang et al., NeurIPS 2022).

    Upper level: choose the mask ``m`` (exactly ``k`` ones) minimising ``l(m * theta*(m))``; lower level:
    ``theta*(m) = argmin_theta l(m * theta) + gamma/2 ||theta||^2``.  Every step alternates one (or ``lower_steps``)
    SGD step(s) on ``theta`` with ``m`` fixed, then one step on the mask scores ``s`` with the implicit gradient
    evaluated at the *updated* ``theta`` (the paper's Algorithm 1)::

        g_s = grad_m l(m * theta) - (1/gamma) * grad_z l(z) * grad_theta l(m * theta),   z = m * theta

    (the Hessian-free approximation of ``d l(m * theta*(m)) / dm``; for channel scores both terms are summed over
    the channel's entries), and ``m`` = top-k of ``s`` again, with a straight-through estimator (``dm/ds = 1``).

    sparsity:          fraction of the units (weights, or channels with ``granularity="channel"``) the training mask
                       removes, in [0, 1).  Weights pruned before (torch.nn.utils.prune masks) stay pruned and count
                       as removed.  The torch.nn.utils.prune route cuts its own exact count from the learned scores.
    gamma:             the lower level's ridge weight; the implicit-gradient term is scaled by ``1/gamma``.  The
                       lower-level step itself uses the weight optimizer you give (its weight decay is the lower
                       level's regulariser in practice; ``weight_decay=gamma`` is the paper's objective exactly).
    implicit_gradient: True: the paper's implicit gradient; False: the first-order variant (the reference code's
                       "accelerate" mode) that drops the ``1/gamma`` term.
    mask_lr:           learning rate of the scores in ``fit``'s default SGD (the scores never get weight decay).
    lower_steps:       SGD steps on ``theta`` (each on its own batch) before every upper-level step (>= 1).
    granularity:       "weight" (a score per weight) or "channel" (a score per output channel; the channel's bias is
                       gated with it when ``mask_bias``).
    allocation:        "global": one top-k over every score (channels of different layers compete by their score);
                       "uniform": the same fraction of every tensor (its own top-k).
    mask_bias:         channel granularity only: also zero the bias of a removed channel (a structured prune).
    progress:          tqdm progress bars in ``fit``.
    """
    sparsity: float = 0.9
    gamma: float = 1.0
    implicit_gradient: bool = True
    mask_lr: float = 0.1
    lower_steps: int = 1
    granularity: str = "weight"
    allocation: str = "global"
    mask_bias: bool = True
    progress: bool = True

    def validate(self) -> None:
        if not isinstance(self.progress, bool):   # "no" / "false" would turn the bars on
            raise PruningInputError(f"progress: must be True or False, got {self.progress!r}")
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
            raise PruningInputError(f"sparsity: must be a number in [0, 1), got {self.sparsity!r}")
        if not number(self.gamma) or self.gamma <= 0:
            raise PruningInputError(f"gamma: the lower-level ridge weight must be a finite number > 0, "
                                    f"got {self.gamma!r}")
        if not isinstance(self.implicit_gradient, bool):
            raise PruningInputError(f"implicit_gradient: must be True or False, got {self.implicit_gradient!r}")
        if not number(self.mask_lr) or self.mask_lr <= 0:
            raise PruningInputError(f"mask_lr: must be a finite number > 0, got {self.mask_lr!r}")
        if isinstance(self.lower_steps, bool) or not isinstance(self.lower_steps, int) or self.lower_steps < 1:
            raise PruningInputError(f"lower_steps: must be an int >= 1, got {self.lower_steps!r}")
        if self.granularity not in ("weight", "channel"):
            raise PruningInputError(f"granularity: 'weight' or 'channel', got {self.granularity!r}")
        if self.allocation not in ("global", "uniform"):
            raise PruningInputError(f"allocation: 'global' or 'uniform', got {self.allocation!r}")
        if not isinstance(self.mask_bias, bool):
            raise PruningInputError(f"mask_bias: must be True or False, got {self.mask_bias!r}")
