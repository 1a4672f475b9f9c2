"""Model inputs in the forms export, verification and timing need: ``(args, kwargs)``, dynamic-shape specs,
a flat list of outputs, and the same inputs resized to another batch."""
from __future__ import annotations

import torch

from obs_plugins.errors import PruningInputError


def as_args(inputs) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional tensors or a dict of keyword tensors -> ``(args, kwargs)``
    (``None`` values of a dict dropped)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        return (), {k: v for k, v in dict(inputs).items() if v is not None}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise PruningInputError(f"example_inputs: expected a tensor, a tuple of tensors or a dict, got {type(inputs)}")


def auto_dynamic_shapes(args, kwargs):
    """Dim 0 of every tensor input dynamic (``batch``), and dim 1 of integer 2-D inputs (``seq``: token ids) when it
    is longer than 1 (a (batch, 1) integer input that could not be widened is no sequence)."""
    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        d = {0: "batch"}
        if t.dim() == 2 and not t.is_floating_point() and t.shape[1] > 1:  # token ids / masks: (batch, seq)
            d[1] = "seq"
        return d
    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def flatten_outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model output (tensor, tuple, dict or Hugging Face ``ModelOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    res = []
    for o in out:
        if isinstance(o, torch.Tensor):
            res.append(o)
        elif isinstance(o, (tuple, list, dict)) or hasattr(o, "to_tuple"):
            res += flatten_outputs(o)
        # None and other leaves (e.g. a cache object) are not outputs ONNX can return
    return res


def repeat_to_batch(inputs, b: int):
    """``inputs`` resized along dim 0 to ``b`` rows (rows repeated cyclically)."""
    def rs(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        idx = torch.arange(b) % t.shape[0]
        return t[idx].contiguous()
    args, kwargs = as_args(inputs)
    if kwargs:
        return {k: rs(v) for k, v in kwargs.items()}
    return tuple(rs(a) for a in args)


def widen_seq(inputs, n: int = 2):
    """``inputs`` with dim 1 of every integer 2-D tensor (token ids, masks) of size 1 repeated to ``n``: as with
    a batch of 1, ``torch.export`` would specialise a sequence of length 1 and the file could run no other."""
    def ws(t):
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point() and t.shape[1] == 1:
            return t.repeat(1, n).contiguous()
        return t
    args, kwargs = as_args(inputs)
    if kwargs:
        return {k: ws(v) for k, v in kwargs.items()}
    return tuple(ws(a) for a in args)


def first_tensor(args, kwargs):
    """The first tensor among positional then keyword inputs, or ``None``."""
    return next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
