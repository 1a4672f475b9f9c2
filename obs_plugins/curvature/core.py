"""The :class:`Curvature` object: one problem (model, pruned tensors, calibration data, loss) and the curvature
collected for it.  Every method reads it; nothing here prunes."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import PruningInputError
from ..targets import Target, resolve_targets, to_2d
from .batching import batch_loss, default_forward, move
from .collect import GramAccumulator, add_gram_hooks, collect_sequential, run_batches


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Curvature:
    """Curvature of a pruning problem, keyed by ``Target.key`` in the order of ``params``.

    Attributes: ``targets`` (list of :class:`Target`), ``hessians`` (key -> layer Gram, fp32, (in, in)),
    ``counts`` (key -> rows seen), ``fisher`` (key -> Fisher blocks, when collected).  It keeps references to
    the model, the calibration batches and the loss, so methods can ask for gradients, HVPs and losses.
    """

    def __init__(self, model: nn.Module, params, batches: Iterable | None = None, *,
                 loss_fn: Callable | None = None, forward_fn: Callable | None = None):
        self.model = model
        self.targets: list[Target] = resolve_targets(model, params)
        self.batches = list(batches) if batches is not None else []
        self.loss_fn = loss_fn
        self.forward_fn = forward_fn or default_forward
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.fisher: dict = {}
        self.device = _device_of(model)

    # ------------------------------------------------------------------ collection
    @classmethod
    def layerwise(cls, model: nn.Module, params, batches: Iterable, *, loss_fn: Callable | None = None,
                  forward_fn: Callable | None = None, sequential: bool = False, on_block: Callable | None = None,
                  dtype: torch.dtype = torch.float32, progress: bool = True) -> "Curvature":
        """Per-layer input Gram ``H = 2 X X^T / n`` of every target, from forward hooks.

        ``sequential=True`` calibrates block by block (``model.layers``-like stacks), each block seeing the
        outputs of the blocks before it; ``on_block(i, block_targets) -> bool`` may change the block's weights
        (prune it) before its outputs feed the next block.  ``loss_fn`` (torch's ``loss_fn(output, target)`` for
        ``(inputs, target)`` batches, ``loss_fn(output, batch)`` for dicts) is kept for methods that need gradients (OBS-IHT iterations, HVPs).
        """
        if dtype not in (torch.float32, torch.float64):
            raise PruningInputError(f"dtype: accumulation must be torch.float32 or torch.float64, got {dtype}")
        curv = cls(model, params, batches, loss_fn=loss_fn, forward_fn=forward_fn)
        if not curv.batches:
            raise PruningInputError("batches: no calibration batches given")
        accs = {}
        for t in curv.targets:
            d = to_2d(t.module, t.current()).shape[1]
            accs[t.key] = GramAccumulator(d, t.current().device, dtype)
        batches = [move(b, curv.device) for b in curv.batches]
        was_training = model.training
        model.eval()
        try:
            if sequential:
                collect_sequential(model, curv.targets, batches, curv.forward_fn, accs, on_block=on_block,
                                   progress=progress)
            else:
                handles = add_gram_hooks(curv.targets, accs)
                try:
                    run_batches(model, batches, curv.forward_fn, desc="collecting layer curvature",
                                progress=progress)
                finally:
                    for h in handles:
                        h.remove()
                for a in accs.values():
                    a.all_reduce()
        finally:
            model.train(was_training)
        for k, a in accs.items():
            if a.n == 0:
                raise PruningInputError(f"params: layer {k} saw no input during calibration (is it used by "
                                        "the forward pass?)")
            curv.hessians[k] = a.H
            curv.counts[k] = a.n
        return curv

    @classmethod
    def fisher_blocks(cls, model: nn.Module, params, batches: Iterable, loss_fn: Callable, **kwargs) -> "Curvature":
        """Block-diagonal empirical Fisher of the flattened weights (see :mod:`obs_plugins.curvature.fisher`)."""
        from .fisher import collect_fisher
        curv = cls(model, params, batches, loss_fn=loss_fn, forward_fn=kwargs.pop("forward_fn", None))
        collect_fisher(curv, **kwargs)
        return curv

    # ``Curvature.fisher(model, params, batches, loss_fn, block_size=...)`` builds one; on an instance,
    # ``curv.fisher`` is the dict key -> Fisher blocks (the instance attribute shadows this classmethod).
    fisher = fisher_blocks

    def collect_fisher(self, **kwargs) -> dict:
        """Add Fisher blocks to this curvature (e.g. one collected by :meth:`layerwise`); returns a report."""
        from .fisher import collect_fisher
        return collect_fisher(self, **kwargs)

    # ------------------------------------------------------------------ global operators (full loss)
    def hessian_trace(self, **kwargs):
        """Hutchinson ``(estimate, stderr)`` of tr(H) (see :func:`obs_plugins.curvature.operators.hessian_trace`)."""
        from .operators import hessian_trace
        return hessian_trace(self, **kwargs)

    def hessian_spectrum(self, **kwargs):
        """SLQ spectral density ``(nodes, weights)`` of the Hessian of the calibration loss."""
        from .operators import hessian_spectrum
        return hessian_spectrum(self, **kwargs)

    def hessian_top_eigenvalue(self, **kwargs):
        """Largest Hessian eigenvalue by Lanczos with full re-orthogonalisation."""
        from .operators import hessian_top_eigenvalue
        return hessian_top_eigenvalue(self, **kwargs)

    # ------------------------------------------------------------------ identity checks
    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.targets]

    def target_by_key(self, key: str) -> Target:
        for t in self.targets:
            if t.key == key:
                return t
        raise KeyError(f"curvature: no target {key!r}; targets: {self.keys[:5]}...")

    def target(self, module: nn.Module, name: str) -> Target:
        for t in self.targets:
            if t.module is module and t.name == name:
                return t
        raise PruningInputError(f"curvature: ({type(module).__name__}, {name!r}) is not among the parameters "
                                "this curvature was collected for")

    # ------------------------------------------------------------------ losses and gradients
    def _need_loss(self, what: str):
        if self.loss_fn is None:
            raise PruningInputError(f"curvature: {what} needs a loss; collect the curvature with loss_fn=...")
        if not self.batches:
            raise PruningInputError(f"curvature: {what} needs calibration batches")

    @contextlib.contextmanager
    def _weights(self, overrides: Mapping[str, torch.Tensor] | None):
        """Temporarily run the model with the *effective* weights of some targets replaced (param-shaped).

        Pruned modules (torch.nn.utils.prune) get ``<name>_orig`` replaced and ``<name>_mask`` set to ones, so
        gradients are taken w.r.t. the whole effective weight.  Pruned targets without an override run with
        their current effective weight (``orig * mask``) in ``<name>_orig`` and a unit mask, for the same
        reason.  Everything is restored on exit.
        """
        saved = []
        try:
            with torch.no_grad():
                for t in self.targets:
                    value = overrides.get(t.key) if overrides is not None else None
                    if value is None and not t.pruned_before:
                        continue
                    if value is None:
                        value = t.current()
                    orig = t.orig()
                    mask = t.mask_tensor()
                    saved.append((orig, orig.detach().clone(), mask, None if mask is None else mask.clone()))
                    orig.copy_(value)
                    if mask is not None:
                        mask.fill_(1)
            yield
        finally:
            with torch.no_grad():
                for orig, w, mask, m in reversed(saved):
                    orig.copy_(w)
                    if mask is not None:
                        mask.copy_(m)

    @contextlib.contextmanager
    def _mid_apply_attributes(self):
        """While torch.nn.utils.prune's ``apply`` runs ``compute_mask`` the tensor lives at ``<name>_orig`` and
        ``<name>`` is missing; expose it temporarily so the model can run a forward pass."""
        patched = []
        try:
            for t in self.targets:
                if not hasattr(t.module, t.name):
                    t.module.__dict__[t.name] = t.orig()
                    patched.append(t)
            yield
        finally:
            for t in patched:
                t.module.__dict__.pop(t.name, None)

    def loss(self, overrides: Mapping[str, torch.Tensor] | None = None, batches: Iterable | None = None, *,
             progress: bool = False) -> float:
        """Mean loss over ``batches`` (default: the calibration batches) with optional weight overrides."""
        from tqdm.auto import tqdm
        self._need_loss("loss")
        batches = self.batches if batches is None else list(batches)
        was = self.model.training
        self.model.eval()
        total = 0.0
        try:
            with self._weights(overrides), self._mid_apply_attributes(), torch.no_grad():
                for b in tqdm(batches, desc="loss", disable=not progress, leave=False):
                    b = move(b, self.device)
                    total += float(batch_loss(self.loss_fn, self.forward_fn(self.model, b), b))
        finally:
            self.model.train(was)
        return total / max(len(batches), 1)

    def _grad_params(self):
        """The tensors whose gradient is the effective weight's gradient (orig when pruned, mask = 1)."""
        return [t.orig() for t in self.targets]

    @contextlib.contextmanager
    def _only_targets_require_grad(self):
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for p in self._grad_params():
                p.requires_grad_(True)
            yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)

    def loss_and_grad(self, overrides: Mapping[str, torch.Tensor] | None = None, batches: Iterable | None = None,
                      *, progress: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
        """Mean loss and its gradient w.r.t. every target's effective weight (param-shaped, fp32)."""
        from tqdm.auto import tqdm
        self._need_loss("loss_and_grad")
        batches = self.batches if batches is None else list(batches)
        was = self.model.training
        self.model.eval()
        grads = {t.key: torch.zeros_like(t.current(), dtype=torch.float32) for t in self.targets}
        total = 0.0
        try:
            with self._weights(overrides), self._mid_apply_attributes(), self._only_targets_require_grad():
                params = self._grad_params()
                for b in tqdm(batches, desc="gradient", disable=not progress, leave=False):
                    b = move(b, self.device)
                    loss = batch_loss(self.loss_fn, self.forward_fn(self.model, b), b)
                    gs = torch.autograd.grad(loss, params)
                    total += float(loss.detach())
                    for t, g in zip(self.targets, gs):
                        grads[t.key].add_(g.float())
        finally:
            self.model.train(was)
        n = max(len(batches), 1)
        return total / n, {k: g / n for k, g in grads.items()}

    def hvp(self, vec: Mapping[str, torch.Tensor], batches: Iterable | None = None) -> dict[str, torch.Tensor]:
        """Hessian-vector product of the mean loss w.r.t. the targets (double backward, averaged over batches)."""
        self._need_loss("hvp")
        batches = self.batches if batches is None else list(batches)
        was = self.model.training
        self.model.eval()
        out = {t.key: torch.zeros_like(t.current(), dtype=torch.float32) for t in self.targets}
        try:
            with self._weights(None), self._mid_apply_attributes(), self._only_targets_require_grad():
                params = self._grad_params()
                vs = [vec[t.key].to(p.dtype) for t, p in zip(self.targets, params)]
                for b in batches:
                    b = move(b, self.device)
                    loss = batch_loss(self.loss_fn, self.forward_fn(self.model, b), b)
                    gs = torch.autograd.grad(loss, params, create_graph=True)
                    dot = sum((g * v).sum() for g, v in zip(gs, vs))
                    hv = torch.autograd.grad(dot, params)
                    for t, h in zip(self.targets, hv):
                        out[t.key].add_(h.float())
        finally:
            self.model.train(was)
        n = max(len(batches), 1)
        return {k: v / n for k, v in out.items()}

    # flat-vector helpers for the spectral operators
    def numel(self) -> int:
        return sum(t.current().numel() for t in self.targets)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[t.key].reshape(-1) for t in self.targets])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for t in self.targets:
            n = t.current().numel()
            out[t.key] = flat[i:i + n].reshape(t.current().shape)
            i += n
        return out

    def hvp_flat(self, v: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.hvp(self.unflatten(v.float())))

    def drop_data(self) -> None:
        """Forget the model, batches and loss (keep the statistics), e.g. before pickling."""
        self.model, self.batches, self.loss_fn = None, [], None

    def __getstate__(self):
        raise TypeError("Curvature objects hold the model and calibration data and are not meant to be pickled; "
                        "pass them to a pruning call instead of storing them on a model")
