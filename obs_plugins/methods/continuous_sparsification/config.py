from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...errors import PruningInputError

SCORE_INITS = ("auto", "constant", "magnitude")
MASK_SCALES = ("auto", "paper", "tempered", "none")


@dataclass
class CSConfig:
    """Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020).

    Every pruned weight ``w`` is gated during the search: ``w * sigmoid(beta * s) * scale`` with ``s`` a learnable
    mask score, and the loss gets ``penalty * sum(sigmoid(beta * s))`` (a smooth surrogate of the l0 norm).

    mask_init:         s0, the initial value of every score (the paper's default 0 starts every gate at 1/2); with
                       ``score_init="magnitude"`` the score of the entry at ``score_init_quantile``.
    score_init:        how the scores start.  "constant": every score is s0 (the paper; ties, so the ranking is
                       learned from scratch).  "magnitude": ``s = s0 + score_init_spread * (u - q)`` with ``u`` the
                       entry's rank of ``|w|`` mapped linearly onto [0, 1] (0: the smallest, 1: the largest; ties
                       by position, entries pruned before rank lowest) and ``q = score_init_quantile``; ranked over
                       all targets for ``allocation="global"``, within each tensor for "uniform"; a channel is
                       ranked by the mean ``|w|`` of its unpruned weights.  The scores' order is then the magnitude
                       order, so a cut before any training is exactly magnitude pruning (same allocation), and the
                       search refines a magnitude prior instead of breaking ties -- what short fine-tuning needs,
                       where a few steps cannot move tied scores far (issue 15: ``PruningCallback`` on MiniLM).
                       With s0 = 0 the natural threshold ``s > 0`` starts at the q-quantile of ``|w|``, so as beta
                       grows the gates harden into the magnitude mask at q: a soft gradual magnitude pruning that
                       the learned scores correct.  "auto" (the default): "constant" in the search itself
                       (``ContinuousSparsifier``, ``fit``: the paper's ticket search is unchanged), "magnitude"
                       with q = the target sparsity in ``PruningCallback`` (fine-tuning, no rewinding).
    score_init_spread: c > 0, the score range of the magnitude init (scores span ``s0 - c q .. s0 + c (1 - q)``).
                       A larger c hardens the mask earlier in the temperature schedule and leaves the learned
                       scores less room: with Adam-like optimizers a score moves about ``mask_lr`` per step, so
                       ``mask_lr * steps / c`` is roughly how far (as a fraction of the ranking) an entry can move.
    score_init_quantile: q in [0, 1], the |w| quantile whose entry starts at s0; None: 0.5, or the target
                       sparsity in ``PruningCallback``.
    penalty:           lambda of the l0 surrogate; >= 0.  The requested sparsity is hit exactly whatever its value
                       (the ticket thresholds the learned scores at the right quantile); a larger penalty makes the
                       scores' own threshold ``s > 0`` land closer to it (see ``plan.report``).
    final_temperature: beta_T > 1.  Within each round beta goes from 1 to beta_T exponentially, one value per
                       epoch: ``beta_e = beta_T ** (e / (epochs - 1))``, so the last epoch runs at beta_T exactly.
    rounds:            R >= 1 search rounds.  Between rounds the scores are reset to ``min(beta * s, s0)``: kept
                       gates restart at s0 (soft again), removed ones stay (very) negative.  Weights keep training.
                       (Magnitude init: s0 is each entry's initial score, so kept gates restart at their prior.)
    epochs:            epochs per round (>= 2, so that beta can go from 1 to beta_T).  ``fit(epochs=...)`` overrides.
    rewind_step:       the optimizer step (iteration count) of round 0 after which the weights are saved for
                       rewinding the ticket (0 = the weights the search started from, the original lottery ticket).
    mask_lr:           learning rate of the scores; None = the weights' learning rate (the paper).  The scores
                       never get weight decay (see ``ContinuousSparsifier.param_groups``).
    mask_scale:        "paper": gate = sigmoid(beta * s) / sigmoid(s0), so the network starts as the dense one,
                       but kept gates end at 1/sigmoid(s0) (2 for s0 = 0): harmless when the ticket is rewound,
                       ruinous when the search *is* the fine-tuning (kept weights doubled: issue 15).
                       "tempered": gate = sigmoid(beta * s) / sigmoid(beta * s_max), s_max the largest initial
                       score (s0, or ``s0 + c (1 - q)`` for the magnitude init; must be > 0): an entry still at
                       s_max has gate exactly 1 at every temperature, nothing starts amplified, and kept gates tend
                       to 1 as beta grows, so the hardened network is the masked dense one.  For the magnitude init
                       at beta = 1 the gates span ``sigmoid(s0 - c q) / sigmoid(s_max) .. 1`` (0.58 .. 1 for s0 = 0,
                       c = 1, q = 0.7): small weights start shrunk.  "none": gate = sigmoid(beta * s).  "auto" (the
                       default): "paper" for the constant init, "tempered" for the magnitude init.  The ticket
                       itself is always the plain 0/1 mask.
    granularity:       "weight" (one score per weight) or "channel" (one score per output channel, broadcast over
                       the channel's weights; the penalty counts each channel's weights).  For "channel" the exact
                       count is still met, by pruning whole channels in score order and, where the count ends inside
                       a channel, that channel's first entries.
    allocation:        "global": one ranking of all scores (the paper's threshold, shared by every layer);
                       "uniform": the same fraction of every tensor, ranked within the tensor.
    progress:          tqdm progress bars in ``fit``.
    """
    mask_init: float = 0.0
    score_init: str = "auto"
    score_init_spread: float = 1.0
    score_init_quantile: float | None = None
    penalty: float = 1e-8
    final_temperature: float = 200.0
    rounds: int = 3
    epochs: int = 10
    rewind_step: int = 0
    mask_lr: float | None = None
    mask_scale: str = "auto"
    granularity: str = "weight"
    allocation: str = "global"
    progress: bool = True

    def validate(self) -> None:
        if not isinstance(self.progress, bool):   # "no" / "false" would turn the bars on
            raise PruningInputError(f"progress: must be True or False, got {self.progress!r}")
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(self.mask_init):
            raise PruningInputError(f"mask_init: must be a finite number, got {self.mask_init!r}")
        if self.score_init not in SCORE_INITS:
            raise PruningInputError(f"score_init: 'auto', 'constant' (every score s0, the paper) or 'magnitude' "
                                    f"(scores ranked like |w|), got {self.score_init!r}")
        if not number(self.score_init_spread) or self.score_init_spread <= 0:
            raise PruningInputError(f"score_init_spread: the score range of the magnitude init must be a finite "
                                    f"number > 0, got {self.score_init_spread!r}")
        if self.score_init_quantile is not None and (not number(self.score_init_quantile)
                                                     or not 0.0 <= self.score_init_quantile <= 1.0):
            raise PruningInputError(f"score_init_quantile: None or a fraction in [0, 1] (the |w| quantile that "
                                    f"starts at mask_init), got {self.score_init_quantile!r}")
        if not number(self.penalty) or self.penalty < 0:
            raise PruningInputError(f"penalty: the l0 penalty (lambda) must be a finite number >= 0, "
                                    f"got {self.penalty!r}")
        if not number(self.final_temperature) or self.final_temperature <= 1:
            raise PruningInputError(f"final_temperature: beta_T must be a finite number > 1, "
                                    f"got {self.final_temperature!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise PruningInputError(f"rounds: must be an int >= 1, got {self.rounds!r}")
        check_epochs(self.epochs)
        if isinstance(self.rewind_step, bool) or not isinstance(self.rewind_step, int) or self.rewind_step < 0:
            raise PruningInputError(f"rewind_step: must be an int >= 0 (an optimizer step of round 0), "
                                    f"got {self.rewind_step!r}")
        if self.mask_lr is not None and (not number(self.mask_lr) or self.mask_lr <= 0):
            raise PruningInputError(f"mask_lr: must be None (the weights' lr) or a number > 0, got {self.mask_lr!r}")
        if self.mask_scale not in MASK_SCALES:
            raise PruningInputError(f"mask_scale: 'auto', 'paper' (1/sigmoid(s0)), 'tempered' "
                                    f"(1/sigmoid(beta * s_max)) or 'none', got {self.mask_scale!r}")
        if self.mask_scale == "tempered" and self.score_init != "auto" and not self.max_initial_score > 0:
            raise PruningInputError(f"mask_scale: 'tempered' needs a positive largest initial score s_max (it "
                                    f"divides by sigmoid(beta * s_max)); got s_max = {self.max_initial_score} "
                                    f"(raise mask_init, or lower score_init_quantile below 1)")
        if self.granularity not in ("weight", "channel"):
            raise PruningInputError(f"granularity: 'weight' or 'channel', got {self.granularity!r}")
        if self.allocation not in ("global", "uniform"):
            raise PruningInputError(f"allocation: 'global' or 'uniform', got {self.allocation!r}")

    def resolved_score_init(self, auto: str = "constant") -> str:
        """``score_init`` with "auto" replaced by ``auto`` ("constant" for the search itself)."""
        return auto if self.score_init == "auto" else self.score_init

    def resolved(self, score_init_auto: str = "constant") -> "CSConfig":
        """A copy with the "auto" fields made concrete: ``score_init`` "auto" -> ``score_init_auto``;
        ``mask_scale`` "auto" -> "paper" for the constant init, "tempered" for the magnitude init."""
        init = self.resolved_score_init(score_init_auto)
        scale = self.mask_scale
        if scale == "auto":
            scale = "tempered" if init == "magnitude" else "paper"
        return dataclasses.replace(self, score_init=init, mask_scale=scale)

    @property
    def max_initial_score(self) -> float:
        """s_max, the largest initial score: s0 ("constant"), ``s0 + c (1 - q)`` ("magnitude"; q = 0.5 when None).
        For "auto" the value of the constant init."""
        if self.score_init == "magnitude":
            q = 0.5 if self.score_init_quantile is None else float(self.score_init_quantile)
            return float(self.mask_init) + float(self.score_init_spread) * (1.0 - q)
        return float(self.mask_init)

    def scale_at(self, beta: float) -> float:
        """The gate's factor at temperature ``beta`` (the search's ``resolved`` config): "paper" 1/sigmoid(s0),
        "tempered" 1/sigmoid(beta * s_max), "none" 1; "auto" as resolved with the constant init."""
        mode = self.resolved().mask_scale if self.mask_scale == "auto" else self.mask_scale
        if mode == "paper":
            return 1.0 + math.exp(-float(self.mask_init))
        if mode == "tempered":
            return 1.0 + math.exp(-beta * self.max_initial_score)
        return 1.0

    @property
    def scale(self) -> float:
        """The gate's factor at beta = 1 (the paper's constant 1/sigmoid(s0) for "paper"; 1 for "none")."""
        return self.scale_at(1.0)


def check_epochs(epochs) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise PruningInputError(f"epochs: need an int >= 2 epochs per round (beta goes from 1 at the first to "
                                f"beta_T at the last), got {epochs!r}")
    return epochs
