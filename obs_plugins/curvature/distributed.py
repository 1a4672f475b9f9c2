"""torch.distributed helpers of the curvature engine: sums over every process, and refusals taken together.

Under an initialised process group each process holds its own calibration batches; a statistic is the mean over
the samples of *all* processes, so every process gets the same numbers and computes the same plan.  Without one,
nothing here communicates (single-process results are unchanged, bit for bit).
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import PruningInputError


def process_group():
    """``torch.distributed`` when a process group is initialised, else ``None``."""
    import torch.distributed as dist
    return dist if (dist.is_available() and dist.is_initialized()) else None


def collective_device(like: torch.device | None = None) -> torch.device:
    """Where a collective's buffer must live: the current CUDA device under NCCL, else ``like`` (or the CPU)."""
    dist = process_group()
    if dist is not None and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return like if like is not None else torch.device("cpu")


def all_reduce_sums(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sums of ``tensors`` over every process (one collective; float64 on the wire), in the
    input dtypes and devices.  Without a process group: the tensors themselves."""
    dist = process_group()
    if dist is None or not tensors:
        return tensors
    dev = collective_device(tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).to(device=dev, dtype=torch.float64) for t in tensors])
    dist.all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[i:i + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        i += n
    return out


def raise_together(error: Exception | None) -> None:
    """Raise ``error`` here and a :class:`PruningInputError` on every other process (a refusal on one process
    alone would leave the others waiting in the next collective).  Every process must call it."""
    dist = process_group()
    if dist is None:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64, device=collective_device())
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if float(flag) > 0:
        raise PruningInputError(f"batches: {int(float(flag))} other process(es) refused their input (see their "
                                "error); every process stops here")


@contextlib.contextmanager
def together():
    """A step every process runs on its own batches (a forward pass over them): an error raised inside it on
    one process stops every process at its end -- that one with its own error, the others with a
    :class:`PruningInputError` -- instead of leaving the others waiting in the next collective.  Without a
    process group the error simply propagates."""
    if process_group() is None:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:   # a Ctrl-C is not taken together: it reaches every process of a job anyway
        error = e
    raise_together(error)
