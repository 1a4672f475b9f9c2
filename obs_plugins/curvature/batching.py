"""How a calibration batch meets the model and the loss — one convention for the whole library.

* forward: ``model(**batch)`` for dicts (Hugging Face), ``model(batch[0])`` for ``(inputs, target)`` pairs,
  else ``model(batch)``;
* loss: torch's ``loss_fn(output, target)`` for ``(inputs, target)`` pairs (so ``F.cross_entropy`` works as
  is), ``loss_fn(output, batch)`` for anything else (dict batches carry their own labels).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..errors import PruningInputError


def default_forward(model: nn.Module, batch):
    """``model(**batch)`` for dicts, ``model(batch[0])`` for (inputs, labels) pairs, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def is_pair(batch) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def batch_loss(loss_fn: Callable, output, batch) -> torch.Tensor:
    """``loss_fn(output, target)`` for ``(inputs, target)`` pairs, else ``loss_fn(output, batch)``.

    A ``TypeError`` raised by the call itself (wrong arity, a loss written for the other convention) becomes a
    :class:`PruningInputError` naming ``loss_fn`` and the convention.
    """
    arg = batch[1] if is_pair(batch) else batch
    try:
        loss = loss_fn(output, arg)
    except TypeError as e:
        got = "target (batch[1])" if is_pair(batch) else f"the batch ({type(batch).__name__})"
        raise PruningInputError(
            f"loss_fn: calling loss_fn(output, {got.split(' ')[0]}) failed ({e}); obs-plugins follows torch's "
            "convention: loss_fn(output, target) for (inputs, target) batches such as F.cross_entropy, and "
            "loss_fn(output, batch) for dict batches") from e
    if not (torch.is_tensor(loss) and loss.numel() == 1):
        raise PruningInputError(f"loss_fn: must return a scalar tensor, got "
                                f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
    return loss.reshape(())


def move(batch, device):
    """``batch`` (tensor, dict, tuple/list, nested) with every tensor on ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v, device) for v in batch)
    return batch
