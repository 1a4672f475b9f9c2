"""BiP: bi-level pruning (Y. Zhang et al., NeurIPS 2022) with the paper's implicit gradient, exact sparsity.

``BiPTrainer`` runs the bi-level search inside any training loop; the registered handler turns a finished search
into a :class:`obs_plugins.masks.PrunePlan` with exactly ``k`` new prunes.
"""
from __future__ import annotations

from ...errors import PruningInputError
from ...masks import PrunePlan
from ...registry import register_method
from .config import BiPConfig
from .trainer import BiPTrainer, implicit_gradient


def plan_from_trainer(trainer: BiPTrainer, k_total: int, config: BiPConfig | None = None,
                      targets=None) -> PrunePlan:
    """Registry handler: ``k_total`` new prunes from a finished trainer's learned scores (``config`` is the
    trainer's own; passing a different one is an error rather than silently ignored)."""
    if not isinstance(trainer, BiPTrainer):
        raise PruningInputError(f"trainer: expected a BiPTrainer, got {type(trainer).__name__}")
    if config is not None and config != trainer.config:
        raise PruningInputError("config: the plan uses the trainer's own config; build the trainer with it")
    return trainer.make_plan(targets, k_total)


register_method("bip", BiPConfig, plan_from_trainer, kind="learned",
                description="bi-level pruning: top-k mask scores trained with the implicit gradient of the "
                            "weights' retraining problem; exact sparsity, unstructured or per channel")

__all__ = ["BiPConfig", "BiPTrainer", "implicit_gradient", "plan_from_trainer"]
