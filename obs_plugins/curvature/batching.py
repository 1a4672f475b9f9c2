"""How a calibration batch meets the model and the loss — one convention for the whole library.

* forward: ``model(**batch)`` for dicts (Hugging Face), ``model(batch[0])`` for ``(inputs, target)`` pairs,
  else ``model(batch)``;
* loss: torch's ``loss_fn(output, target)`` for ``(inputs, target)`` pairs (so ``F.cross_entropy`` works as
  is), ``loss_fn(output, batch)`` for anything else (dict batches carry their own labels).
"""
from __future__ import annotations

import weakref
from typing import Callable, Mapping, Sequence

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
    except (RuntimeError, ValueError, IndexError) as e:  # e.g. a target of the wrong shape for the output
        if isinstance(e, (PruningInputError, torch.OutOfMemoryError)):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PruningInputError(f"loss_fn: loss_fn(output {describe(_output_tensor(output))}, "
                                f"{'target ' if is_pair(batch) else 'batch '}{describe(arg)}) failed: "
                                f"{type(e).__name__}: {msg}") from e
    if not (torch.is_tensor(loss) and loss.numel() == 1):
        raise PruningInputError(f"loss_fn: must return a scalar tensor, got "
                                f"{type(loss).__name__}{tuple(loss.shape) if torch.is_tensor(loss) else ''}")
    return loss.reshape(())


def _output_tensor(output):
    """The logits-like tensor of a model output, for messages (``.logits`` of Hugging Face outputs)."""
    if torch.is_tensor(output):
        return output
    return getattr(output, "logits", None) if getattr(output, "logits", None) is not None else output


def move(batch, device, memo: dict | None = None):
    """``batch`` (tensor, mapping, tuple/list/namedtuple, nested; containers keep their type where it can be
    rebuilt) with every tensor on ``device``.  ``memo`` (a dict the caller keeps): a tensor met again (the same
    object, e.g. one mask handed to every block) is moved once."""
    if torch.is_tensor(batch):
        if memo is None:
            return batch.to(device)
        hit = memo.get(id(batch))
        if hit is None or hit[0]() is not batch:   # a weak reference: the source is not kept alive (an id is
            hit = memo[id(batch)] = (weakref.ref(batch), batch.to(device))   # reused only once it is freed)
        return hit[1]
    if isinstance(batch, Mapping):
        moved = {k: move(v, device, memo) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:   # the caller's mapping type (a Hugging Face BatchEncoding: a loss may read batch.labels)
            return type(batch)(moved)
        except Exception:   # a mapping its class cannot build from a dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):   # a namedtuple takes its fields as arguments
        return type(batch)(*(move(v, device, memo) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(move(v, device, memo) for v in batch)
    return batch


class OnDevice(Sequence):
    """``batches`` read one at a time on ``device`` (:func:`move` on each access): a pass over the calibration
    set holds one moved batch at a time, not a device copy of the whole set."""

    def __init__(self, batches, device):
        self.batches, self.device = batches, device

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [move(b, self.device) for b in self.batches[i]]
        return move(self.batches[i], self.device)


# ---------------------------------------------------------------------------------------------------------------
# Failures of the user's model on the user's inputs, named at the boundary (which argument, which module)
def _tensors(x) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    return []


def describe(x) -> str:
    """Shapes and dtypes of the tensors in ``x`` (``{'input_ids': (2, 8) int64}``-like), for error messages."""
    def one(t):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    if torch.is_tensor(x):
        return one(x)
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in x) + ("," if len(x) == 1 else "") + ")"
    return type(x).__name__


def failing_module(model: nn.Module, run: Callable[[], object]) -> str | None:
    """``'name' (Type)`` of the innermost module of ``model`` whose forward raises when ``run()`` is repeated,
    or None.  Only called after a failure, so the ordinary path carries no hooks."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    handles = []

    def leave(_mod, _a, _o) -> None:   # must return None: a forward hook's return value replaces the output
        if stack:
            stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(lambda mod, _a: stack.append(mod)))
        handles.append(m.register_forward_hook(leave))
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001 - we only want to know where it fails
        if stack:
            m = stack[-1]
            return f"{names.get(id(m)) or '(the model itself)'!r} ({type(m).__name__})"
    finally:
        for h in handles:
            h.remove()
    return None


# what a model raises on inputs of the wrong shape / dtype / vocabulary; our own errors and OOM pass through
_INPUT_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError)


def named_failure(what: str, model: nn.Module, run: Callable[[], object], inputs=None):
    """``run()``; a failure of the model on the caller's inputs becomes a :class:`PruningInputError` naming
    the argument ``what`` (``batches[3]``, ``example_inputs``, ``inputs``), the module that failed and the
    shapes given.  The model is not changed by the check (hooks are removed)."""
    from ..errors import CurvatureError
    try:
        return run()
    except (PruningInputError, CurvatureError):
        raise
    except _INPUT_ERRORS as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        where = failing_module(model, run)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = f" (given {describe(inputs)})" if inputs is not None else ""
        raise PruningInputError(f"{what}: the model's forward pass failed{' in module ' + where if where else ''}"
                                f"{shapes}: {type(e).__name__}: {msg[:300]}") from e


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    """``y`` is ``x``, a view of the same storage, or (on another device) a copy of it moved to the model."""
    if x is y:
        return True
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.device == y.device:
        return x.data_ptr() == y.data_ptr()
    x, y = x.detach().cpu(), y.detach().cpu()   # the error path only: one copy per batch compared
    if x.is_floating_point() or x.is_complex():   # a NaN equals itself here (a batch with NaN is named too)
        return bool(torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all())
    return torch.equal(x, y)


class NamedForward:
    """``forward_fn(model, batch)`` whose failures name the calibration batch (``batches[i]``) and module."""

    def __init__(self, forward_fn: Callable, batches: list):
        self.forward_fn, self.batches = forward_fn, batches

    def index(self, batch) -> int | None:
        tb = _tensors(batch)
        for i, c in enumerate(self.batches):
            tc = _tensors(c)
            if tc and len(tc) == len(tb) and all(_same_tensor(x, y) for x, y in zip(tc, tb)):
                return i
        return None

    def __call__(self, model, batch):
        from ..errors import CurvatureError
        try:
            return self.forward_fn(model, batch)
        except (PruningInputError, CurvatureError, torch.OutOfMemoryError):
            raise
        except _INPUT_ERRORS:
            i = self.index(batch)
            what = f"batches[{i}]" if i is not None else "batches (a calibration batch)"
            named_failure(what, model, lambda: self.forward_fn(model, batch), batch)
            raise  # the repeat did not fail: the original error stands
