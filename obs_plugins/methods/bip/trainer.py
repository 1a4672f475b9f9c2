"""The BiP trainer (Y. Zhang et al., "Advancing Model Pruning via Bi-level Optimization", NeurIPS 2022).

During the search every listed tensor ``theta`` is replaced, through :mod:`torch.nn.utils.parametrize`, by
``z = m * theta`` with ``m`` a 0/1 mask holding exactly ``k`` ones: the top-k of a learned score ``s`` (one per weight,
or one per output channel).  The mask is recomputed once per upper-level step (``torch.topk``), never in the forward
pass.  The scores live in the trainer, never in ``model.parameters()``, and start as a *copy* of ``|theta|`` (their
own storage: a score step can never move a weight).

One BiP step (the paper's Algorithm 1)::

    theta <- theta - lr * grad_theta [ l(m * theta) ]                     (lower level, m fixed; ``lower_steps`` x)
    s     <- s - mask_lr * g_s,  evaluated at the *updated* theta, on a fresh batch   (upper level)
    m     <- top-k(s)

    g_s = grad_m l(m * theta) - (1/gamma) * grad_z l(z) * grad_theta l(m * theta)
        = theta * grad_z l   - (1/gamma) * m * (grad_z l)**2                (z = m * theta; summed per channel)

The second term is the implicit gradient ``(d theta*/dm)^T grad_theta l`` of the lower level
``theta*(m) = argmin l(m * theta) + gamma/2 ||theta||^2`` under the Hessian-free assumption (``grad_zz l ~ 0``):
differentiating the stationarity condition ``m * grad_z l + gamma * theta = 0`` in ``m`` gives
``d theta*/dm = -(1/gamma) diag(grad_z l)``.  Both terms come from one backward pass (``grad_z l`` at the updated
``theta``); ``implicit_gradient=False`` drops the second (the first-order variant).  The mask gets ``g_s`` through a
straight-through estimator (``dm/ds = 1``).

Driving it from your own loop::

    bip = BiPTrainer(model, params, sparsity=0.9, gamma=1.0)
    opt = torch.optim.SGD(bip.param_groups(lr=0.01), momentum=0.9)        # the weights (lower level)
    mask_opt = torch.optim.SGD(bip.score_groups(), momentum=0.9)           # the scores (upper level)
    for b_lower, b_upper in pairs_of_batches:
        bip.step(b_lower, b_upper, opt, mask_opt, loss_fn=F.cross_entropy)
    bip.finish()                                    # plain model again (dense theta), scores kept
    prune.global_unstructured(params, pruning_method=BiP, amount=0.9, trainer=bip)
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...curvature import batching
from ...curvature.fisher import batch_rows
from ...errors import PruningInputError
from .._state import check_saved_state, resolve_config
from ...masks import PrunePlan, allocate_global, allocate_uniform, as_scores, count_to_prune, lowest_k_mask
from ...targets import Target, check_targets, out_dim, resolve_targets
from .config import BiPConfig

STATE_VERSION = 1


def implicit_gradient(theta: torch.Tensor, mask: torch.Tensor, grad_z: torch.Tensor, gamma: float, *,
                      implicit: bool = True) -> torch.Tensor:
    """The upper-level gradient of BiP for one tensor, entry by entry (shape of ``theta``).

    ``theta * grad_z - (1/gamma) * grad_z * (mask * grad_z)``: ``grad_m l(m*theta)`` plus the Hessian-free implicit
    term ``-(1/gamma) grad_z l * grad_theta l`` (``grad_theta l = mask * grad_z l``); ``implicit=False`` returns the
    first term only.  ``mask`` may be continuous (the relaxed problem) or 0/1, and broadcasts against ``theta``.
    """
    g = theta * grad_z
    if implicit:
        g = g - (grad_z * (mask * grad_z)) / gamma
    return g


def _is_pair_batch(batch) -> bool:
    """``[inputs, target]`` / ``(inputs, target)`` with a tensor first: one batch (what a DataLoader yields)."""
    return isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)


def _reduce_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``x`` over the dimensions where ``shape`` is 1 (a channel score's broadcast dimensions)."""
    if tuple(x.shape) == tuple(shape):
        return x
    if x.dim() != len(shape):  # a bias (C,) against a channel score (C, 1, ...) / (1, C)
        return x.reshape(shape)
    dims = [i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1]
    return x.sum(dim=dims, keepdim=True)


class _Straight(torch.autograd.Function):
    """Forward: the 0/1 mask; backward: the gradient straight to the scores (``dm/ds = 1``)."""

    @staticmethod
    def forward(ctx, scores, mask):
        return mask.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gate(nn.Module):
    """The parametrization ``theta -> m * theta``; holds no parameters (masks and scores stay in the trainer)."""

    _obs_plugins_gate = True   # resolve_targets accepts a tensor under this parametrization

    def __init__(self, trainer: "BiPTrainer", key: str, part: str):
        super().__init__()
        self._bip = trainer  # a plain object: not registered as a submodule or parameter
        self.key = key
        self.part = part

    def forward(self, w):
        return self._bip._gated(self.key, self.part, w)


class BiPTrainer:
    """Learns a top-k mask over ``params`` by bi-level optimization while the model trains.

    Args:
        model: the model (scores and masks get each tensor's device, and its dtype but never below float32).
        params: ``(module, name)`` pairs (torch.nn.utils.prune's convention) or module names.
        sparsity: fraction of the units (weights or channels) the training mask removes (a :class:`BiPConfig`
            field, like every keyword in ``overrides``: ``gamma=``, ``implicit_gradient=``, ``granularity=`` ...).
        config: a :class:`BiPConfig`.

    Bad arguments raise :class:`obs_plugins.PruningInputError` naming the argument, before the model is touched.
    """

    def __init__(self, model: nn.Module, params, sparsity: float | None = None, config: BiPConfig | None = None,
                 **overrides):
        if not isinstance(model, nn.Module):
            raise PruningInputError(f"model: expected an nn.Module, got {type(model).__name__}")
        if sparsity is not None:
            overrides["sparsity"] = sparsity
        config = resolve_config(config, BiPConfig, overrides, owner="BiPTrainer")
        targets = resolve_targets(model, params)
        frozen = [t.key for t in targets if not t.orig().requires_grad]
        if frozen:   # checked here, before any gate is installed (the first upper step found it too late)
            raise PruningInputError(f"params: {frozen[0]} does not require grad; BiP trains the weights it prunes, "
                                    f"so leave frozen tensors ({len(frozen)} of them) out of params")
        channel = config.granularity == "channel"
        parts: dict[str, list[str]] = {}
        targets_by_key = {t.key: t for t in targets}
        for t in targets:
            names = [self._stored_name(t.module, t.name)]
            if channel and config.mask_bias and t.name == "weight" and getattr(t.module, "bias", None) is not None:
                names.append(self._stored_name(t.module, "bias"))
            for n in names:
                if parametrize.is_parametrized(t.module, n):
                    raise PruningInputError(f"params: {t.key} is already parametrized (another trainer or "
                                            "sparsifier still searching? call its finish() first)")
                taken = [k for k, ns in parts.items() if n in ns and targets_by_key[k].module is t.module]
                if taken:   # channel mode gates a layer's bias with its weight: listing the bias too gated it twice
                    raise PruningInputError(f"params: {t.key} is already gated through {taken[0]} (with "
                                            "granularity='channel' and mask_bias a layer's bias follows its weight's "
                                            "channel mask); leave the bias out of params")
            parts[t.key] = names
        check_targets(targets)  # finite values on one real device (NaN/Inf would be trained, meta has no values)
        self.model = model
        self.config = config
        self.targets: list[Target] = targets
        self.scores: dict[str, nn.Parameter] = {}
        self._avail: dict[str, torch.Tensor] = {}     # units still prunable (prior masks), score-shaped bool
        self._prior: dict[str, torch.Tensor] = {}     # prior keep-mask, weight-shaped bool
        self._parts = parts
        for t in targets:
            w = t.orig().detach()
            w = w.to(torch.promote_types(w.dtype, torch.float32))  # scores in at least float32 (below)
            prior = t.prior_mask().to(w.device)
            if channel:
                d = out_dim(t.module) if t.name == "weight" else 0
                dims = [i for i in range(w.dim()) if i != d]
                cnt = prior.to(w.dtype).sum(dim=dims, keepdim=True) if dims else prior.to(w.dtype)
                score = ((w.abs() * prior).sum(dim=dims, keepdim=True) if dims else w.abs() * prior) / cnt.clamp_min(1)
                avail = cnt > 0
            else:
                score = w.abs()
                avail = prior
            # a copy with its own storage (the scores never alias the weights), in at least float32: a bf16/fp16
            # score rounds a typical step (~2e-4 of it) away, so the masks stopped learning
            self.scores[t.key] = nn.Parameter(score.detach().clone(memory_format=torch.contiguous_format))
            self._avail[t.key] = avail.bool()
            self._prior[t.key] = prior
        self._keep = self._keep_counts()
        self._masks: dict[str, torch.Tensor] = {}
        self._update_masks()
        # masks carry the straight-through gradient to the scores in ordinary forwards; a loop that runs the
        # lower level itself (a Trainer) sets this False: the upper step computes g_s without it
        self.straight_through = True
        self._recording: list | None = None
        self.lower_steps = 0           # optimizer steps on theta
        self.upper_steps = 0           # score steps
        self.samples_forward_backward = 0   # samples through a forward+backward pass, both levels together
        self.epochs_done = 0
        self.finished = False
        self.history: list[dict] = []
        self._install()

    # ------------------------------------------------------------------ masks
    @staticmethod
    def _stored_name(module: nn.Module, name: str) -> str:
        return name + "_orig" if hasattr(module, name + "_orig") else name

    def _keep_counts(self) -> dict[str, int] | int:
        s = self.config.sparsity
        if self.config.allocation == "global":
            total = sum(v.numel() for v in self._avail.values())
            avail = sum(int(v.sum()) for v in self._avail.values())
            keep = total - round(s * total)
            if keep > avail:
                raise PruningInputError(f"sparsity: {s} keeps {keep} units but prior masks leave only {avail}")
            return keep
        out = {}
        for key, v in self._avail.items():
            keep = v.numel() - round(s * v.numel())
            if keep > int(v.sum()):
                raise PruningInputError(f"sparsity: {s} keeps {keep} units of {key} but prior masks leave only "
                                        f"{int(v.sum())}")
            out[key] = keep
        return out

    @torch.no_grad()
    def _update_masks(self) -> None:
        """``m = top-k(s)`` among the units prior masks left (exactly k ones; one topk per call)."""
        keys = list(self.scores)
        for k in keys:
            if not torch.isfinite(self.scores[k]).all():
                raise FloatingPointError(f"BiP: the scores of {k} are not finite (mask_lr too large?)")
        ranked = {k: as_scores(self.scores[k]).masked_fill(~self._avail[k], float("-inf")).reshape(-1)
                  for k in keys}
        if self.config.allocation == "global":
            flat = torch.cat([ranked[k] for k in keys])
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[torch.topk(flat, self._keep, sorted=False).indices] = True
            chunks = torch.split(keep, [ranked[k].numel() for k in keys])
        else:
            chunks = []
            for k in keys:
                keep = torch.zeros_like(ranked[k], dtype=torch.bool)
                keep[torch.topk(ranked[k], self._keep[k], sorted=False).indices] = True
                chunks.append(keep)
        for k, c in zip(keys, chunks):
            self._masks[k] = c.reshape(self.scores[k].shape).to(self.scores[k].dtype)

    def _gated(self, key: str, part: str, w: torch.Tensor) -> torch.Tensor:
        m = self._masks[key]
        if self.straight_through and self._recording is None and torch.is_grad_enabled():
            m = _Straight.apply(self.scores[key], m)
        if part == "bias":
            m = m.reshape(-1)
        z = w * m.to(w.dtype)
        if self._recording is not None:
            self._recording.append((key, part, w, m.detach(), z))
        return z

    def _install(self) -> None:
        for t in self.targets:
            for i, name in enumerate(self._parts[t.key]):
                parametrize.register_parametrization(t.module, name, _Gate(self, t.key, "weight" if i == 0 else "bias"))

    def _uninstall(self) -> None:
        for t in self.targets:
            for name in self._parts[t.key]:
                if parametrize.is_parametrized(t.module, name):
                    parametrize.remove_parametrizations(t.module, name, leave_parametrized=False)

    def masks(self) -> dict[str, torch.Tensor]:
        """The current training keep-masks ``{key: bool tensor shaped like the weight}`` (prior zeros included)."""
        out = {}
        for t in self.targets:
            out[t.key] = self._masks[t.key].bool().expand(t.orig().shape) & self._prior[t.key]
        return out

    def bias_masks(self) -> dict[str, torch.Tensor]:
        """Channel granularity with ``mask_bias``: the keep-mask of each gated bias ``{key: bool (C,)}``."""
        return {t.key: self._masks[t.key].bool().reshape(-1) for t in self.targets if len(self._parts[t.key]) > 1}

    def kept_units(self) -> dict[str, int]:
        """Ones of the training mask per tensor, in units (weights or channels)."""
        return {k: int(m.sum()) for k, m in self._masks.items()}

    # ------------------------------------------------------------------ optimizer groups
    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """The lower level: every model parameter (the gated tensors are their stored originals)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}]

    def score_groups(self, mask_lr: float | None = None) -> list[dict]:
        """The upper level: the scores, never with weight decay (``mask_lr`` defaults to the config's)."""
        return [{"params": list(self.scores.values()), "lr": self.config.mask_lr if mask_lr is None else mask_lr,
                 "weight_decay": 0.0}]

    def parameters(self):
        return iter(self.scores.values())

    # ------------------------------------------------------------------ one step
    def _check_searching(self, what: str) -> None:
        if self.finished:
            raise RuntimeError(f"{what}: the search is finished (finish() was called)")

    def _loss(self, batch, loss_fn, batch_loss):
        if (loss_fn is None) == (batch_loss is None):
            raise PruningInputError("loss_fn: give loss_fn(output, target) or batch_loss(model, batch)")
        device = next(iter(self.scores.values())).device
        batch = batching.move(batch, device)
        if batch_loss is not None:
            return batch_loss(self.model, batch)
        return batching.batch_loss(loss_fn, batching.default_forward(self.model, batch), batch)

    @contextlib.contextmanager
    def _no_straight(self):
        was, self.straight_through = self.straight_through, False
        try:
            yield
        finally:
            self.straight_through = was

    def lower_step(self, batch, optimizer: torch.optim.Optimizer, loss_fn: Callable | None = None, *,
                   batch_loss: Callable | None = None) -> float:
        """One optimizer step on the weights with the mask fixed (no gradient reaches the scores)."""
        self._check_searching("lower_step")
        with self._no_straight():
            loss = self._loss(batch, loss_fn, batch_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        self.lower_steps += 1
        self.samples_forward_backward += batch_rows(batch)
        return float(loss.detach())

    def count_lower_step(self, samples: int) -> None:
        """Record a lower-level step of ``samples`` samples taken by another loop (e.g. a ``transformers.Trainer``
        stepping the gated weights), so the step and sample counters cover both levels."""
        self._check_searching("count_lower_step")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise PruningInputError(f"samples: must be an int >= 0, got {samples!r}")
        self.lower_steps += 1
        self.samples_forward_backward += samples

    def score_gradient(self, batch, loss_fn: Callable | None = None, *, batch_loss: Callable | None = None,
                       implicit: bool | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """``(loss, {key: g_s})`` at the current weights and mask, from one forward/backward on ``batch``.

        ``g_s`` is the paper's implicit gradient (or, with the first-order flag, its first-order part), reduced to each score's shape.  ``implicit`` overrides the config's
        ``implicit_gradient`` flag for this call.  Nothing is stepped and no ``.grad`` is touched.
        """
        self._check_searching("score_gradient")
        implicit = self.config.implicit_gradient if implicit is None else implicit
        self._recording = []
        try:
            loss = self._loss(batch, loss_fn, batch_loss)
            rec = self._recording
        finally:
            self._recording = None
        if not rec:
            raise PruningInputError("params: none of the trainer's tensors took part in the forward pass")
        if not all(z.requires_grad for *_, z in rec):
            raise PruningInputError("params: the pruned tensors must require grad")
        # a read the loss does not use (e.g. ``x.to(layer.weight.dtype)``, as Hugging Face T5 does) adds nothing
        grads_z = [torch.zeros_like(z) if g is None else g
                   for z, g in zip([z for *_, z in rec],
                                   torch.autograd.grad(loss, [z for *_, z in rec], allow_unused=True))]
        # a tensor read several times in one forward (a reused layer) records one z per read: the formula needs
        # the total dloss/dz (its implicit term is quadratic in it), so the reads are summed first
        total: dict[tuple[str, str], list] = {}
        for (key, part, w, m, _z), gz in zip(rec, grads_z):
            if (key, part) in total:
                total[(key, part)][2] = total[(key, part)][2] + gz
            else:
                total[(key, part)] = [w, m, gz]
        out = {k: torch.zeros_like(s) for k, s in self.scores.items()}
        for (key, part), (w, m, gz) in total.items():
            g = implicit_gradient(w.detach(), m, gz, self.config.gamma, implicit=implicit)
            out[key] += _reduce_to(g, out[key].shape).to(out[key].dtype)
        return float(loss.detach()), out

    def upper_step(self, batch, mask_optimizer: torch.optim.Optimizer, loss_fn: Callable | None = None, *,
                   batch_loss: Callable | None = None) -> float:
        """One score step with ``g_s`` at the current (just updated) weights, then ``m = top-k(s)`` once."""
        loss, g = self.score_gradient(batch, loss_fn, batch_loss=batch_loss)
        for k, s in self.scores.items():
            s.grad = g[k]
        mask_optimizer.step()
        for s in self.scores.values():
            s.grad = None
        self._update_masks()
        self.upper_steps += 1
        self.samples_forward_backward += batch_rows(batch)
        return loss

    def step(self, lower_batches, upper_batch, optimizer, mask_optimizer, loss_fn: Callable | None = None, *,
             batch_loss: Callable | None = None) -> tuple[float, float]:
        """``lower_step`` on each of ``lower_batches`` (one batch or a list of batches), then ``upper_step`` on
        ``upper_batch``.  Returns (last lower loss, upper loss).

        A list is a list of batches, except a 2-element list whose first element is a tensor: that is one
        ``[inputs, target]`` batch, as a ``DataLoader`` over a ``TensorDataset`` yields it (give two bare-tensor
        batches to ``lower_step`` one at a time)."""
        if not isinstance(lower_batches, list) or _is_pair_batch(lower_batches):
            lower_batches = [lower_batches]
        lo = float("nan")
        for b in lower_batches:
            lo = self.lower_step(b, optimizer, loss_fn, batch_loss=batch_loss)
        return lo, self.upper_step(upper_batch, mask_optimizer, loss_fn, batch_loss=batch_loss)

    # ------------------------------------------------------------------ the end of the search
    def finish(self) -> None:
        """Remove the gates: the model holds the dense trained weights again; the scores and masks are kept."""
        if self.finished:
            return
        self._uninstall()
        self._refresh_pruned_attributes()
        self.finished = True

    def _refresh_pruned_attributes(self) -> None:
        """torch.nn.utils.prune keeps ``<name> = <name>_orig * <name>_mask`` as a plain attribute refreshed by a
        forward pre-hook; the last forward left the *gated* value there.  Recompute it from the restored weights."""
        from torch.nn.utils import prune
        for t in self.targets:
            for hook in t.module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in (t.name, "bias"):
                    with torch.no_grad():
                        setattr(t.module, hook._tensor_name, hook.apply_mask(t.module))

    def make_plan(self, targets: list[Target] | None = None, k: int | None = None, *,
                  amount: float | int | None = None) -> PrunePlan:
        """Exactly ``k`` new prunes (or ``amount``, torch's meaning) among ``targets``, lowest score first,
        honouring prior masks; with neither, the training mask itself (top-k of the scores).

        ``config.allocation``: one global ranking or the same fraction per tensor.  Channel scores rank whole
        channels (ties by position, so where ``k`` ends inside a channel its first entries go).
        """
        if targets is not None and (isinstance(targets, (int, float)) or torch.is_tensor(targets)):
            raise PruningInputError(f"targets: a list of targets, got {targets!r}; give the amount as "
                                    "make_plan(amount=...) or the count as make_plan(k=...)")
        if not self.finished:
            raise PruningInputError("trainer: the search is still running; call bip.finish() (or fit) before "
                                    "pruning")
        targets = self.targets if targets is None else list(targets)
        mine = {t.key: t for t in self.targets}
        for t in targets:
            if t.key not in mine or mine[t.key].module is not t.module:
                raise PruningInputError(f"params: {t.key} is not among the trainer's parameters")
        training = self.masks()
        prior = {t.key: t.prior_mask().cpu() for t in targets}
        plan = PrunePlan(report={"method": "bip"})
        if k is None and amount is None:
            for t in targets:
                plan.add(t, (training[t.key].cpu() & prior[t.key]).to(t.orig().device))
            plan.report.update({"pruned": sum(int(prior[t.key].sum()) - int(plan.entries[t.key].mask.sum())
                                              for t in targets), "source": "training mask"})
        else:
            if k is not None and amount is not None:
                raise PruningInputError("amount: give at most one of k (a count) and amount")
            avail = sum(int(p.sum()) for p in prior.values())
            if k is None:
                k = count_to_prune(amount, avail)
            elif isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= avail:
                raise PruningInputError(f"amount: cannot prune {k!r} of {avail} remaining entries")
            scores = {t.key: as_scores(self.scores[t.key].expand(t.orig().shape)).cpu() for t in targets}
            counts = (allocate_uniform(prior, k) if self.config.allocation == "uniform"
                      else allocate_global(scores, prior, k))
            for t in targets:
                plan.add(t, lowest_k_mask(scores[t.key], counts[t.key], prior[t.key]).to(t.orig().device))
            plan.report.update({"pruned": k, "source": "scores"})
        kept = sum(int(e.mask.sum()) for e in plan.entries.values())
        same = sum(int((e.mask.cpu() & training[key].cpu()).sum()) for key, e in plan.entries.items())
        plan.report.update({
            "sparsity": plan.sparsity(),
            "training_mask_overlap": same / max(kept, 1),   # of the plan's kept weights, the share BiP trained with
            "granularity": self.config.granularity,
            "allocation": self.config.allocation,
            "implicit_gradient": self.config.implicit_gradient,
            "per_tensor_sparsity": {key: 1.0 - float(e.mask.sum()) / e.mask.numel()
                                    for key, e in plan.entries.items()},
        })
        return plan

    # ------------------------------------------------------------------ (de)serialization
    def state_dict(self) -> dict:
        """Scores, masks, step counters and history (``torch.save``-able, weights_only)."""
        return {
            "version": STATE_VERSION,
            "config": dataclasses.asdict(self.config),
            "keys": [t.key for t in self.targets],
            "scores": {k: s.detach().clone() for k, s in self.scores.items()},
            "masks": {k: m.clone() for k, m in self._masks.items()},
            "lower_steps": self.lower_steps, "upper_steps": self.upper_steps,
            "samples_forward_backward": self.samples_forward_backward, "epochs_done": self.epochs_done,
            "finished": self.finished,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved search (build the trainer on the same model/params/config, then load)."""
        check_saved_state(state, owner="BiPTrainer", noun="trainer", version=STATE_VERSION,
                          keys=[t.key for t in self.targets], config=self.config)
        for k, s in state["scores"].items():
            if tuple(s.shape) != tuple(self.scores[k].shape) or tuple(state["masks"][k].shape) != tuple(s.shape):
                raise PruningInputError(f"state: scores/mask of {k} have shape {tuple(s.shape)}, expected "
                                        f"{tuple(self.scores[k].shape)}")
        if bool(state["finished"]) != self.finished:
            raise PruningInputError("state: saved " + ("after" if state["finished"] else "before") + " finish(); "
                                    "load it into a trainer in the same state")
        with torch.no_grad():
            for k, s in state["scores"].items():
                self.scores[k].copy_(s)
                self._masks[k] = state["masks"][k].to(self.scores[k].device, self.scores[k].dtype).clone()
        self.lower_steps, self.upper_steps = int(state["lower_steps"]), int(state["upper_steps"])
        self.samples_forward_backward = int(state["samples_forward_backward"])
        self.epochs_done = int(state["epochs_done"])
        self.history = [dict(h) for h in state.get("history", [])]

    # ------------------------------------------------------------------ a ready-made loop
    def fit(self, train_loader, loss_fn: Callable | None = None, *, epochs: int = 1,
            optimizer: torch.optim.Optimizer | None = None, mask_optimizer: torch.optim.Optimizer | None = None,
            lr: float | None = None, momentum: float = 0.9, weight_decay: float = 0.0, mask_momentum: float = 0.9,
            batch_loss: Callable | None = None, finish: bool = True) -> list[dict]:
        """``epochs`` passes over ``train_loader``: every ``lower_steps + 1`` consecutive batches make one BiP step
        (the first ``lower_steps`` train the weights, the last the scores), so one epoch is one forward/backward
        per training sample in all (a batch left over at the end of an epoch trains the weights only).

        optimizer: yours over :meth:`param_groups`, or ``lr`` for SGD(momentum, weight_decay); mask_optimizer:
        yours over :meth:`score_groups`, or SGD(``config.mask_lr``, ``mask_momentum``).  Returns the history.
        """
        self._check_searching("fit")
        if (loss_fn is None) == (batch_loss is None):
            raise PruningInputError("loss_fn: give loss_fn(output, target) or batch_loss(model, batch)")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise PruningInputError(f"epochs: must be an int >= 1, got {epochs!r}")
        if train_loader is None or not hasattr(train_loader, "__iter__") or iter(train_loader) is train_loader:
            raise PruningInputError("train_loader: pass a re-iterable (a DataLoader or a list of batches); it is "
                                    "read every epoch")
        if optimizer is None:
            if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise PruningInputError(f"lr: give lr > 0 (or an optimizer), got {lr!r}")
            optimizer = torch.optim.SGD(self.param_groups(lr, weight_decay), lr=lr, momentum=momentum)
        if mask_optimizer is None:
            mask_optimizer = torch.optim.SGD(self.score_groups(), lr=self.config.mask_lr, momentum=mask_momentum)
        else:
            opt_params = {id(p) for g in mask_optimizer.param_groups for p in g["params"]}
            if not all(id(s) in opt_params for s in self.scores.values()):
                raise PruningInputError("mask_optimizer: it does not train the scores; build it from "
                                        "bip.score_groups()")
        group = self.config.lower_steps + 1
        bar = None
        if self.config.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=epochs, desc="BiP" if self.config.implicit_gradient else "BiP (first-order)")
        self.model.train()
        try:
            for _ in range(epochs):
                start = {k: m.clone() for k, m in self._masks.items()}
                buf, lo_sum, up_sum, n_lo, n_up = [], 0.0, 0.0, 0, 0
                for batch in train_loader:
                    buf.append(batch)
                    if len(buf) == group:
                        for b in buf[:-1]:
                            lo_sum += self.lower_step(b, optimizer, loss_fn, batch_loss=batch_loss)
                            n_lo += 1
                        up_sum += self.upper_step(buf[-1], mask_optimizer, loss_fn, batch_loss=batch_loss)
                        n_up += 1
                        buf = []
                for b in buf:
                    lo_sum += self.lower_step(b, optimizer, loss_fn, batch_loss=batch_loss)
                    n_lo += 1
                if n_lo == 0:
                    raise PruningInputError("train_loader: produced no batches")
                flips = sum(int((start[k] != m).sum()) for k, m in self._masks.items())
                self.epochs_done += 1
                rec = {"epoch": self.epochs_done, "lower_loss": lo_sum / n_lo,
                       "upper_loss": up_sum / n_up if n_up else None, "mask_changes": flips}
                self.history.append(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['lower_loss']:.4f}", changes=flips)
        finally:
            if bar is not None:
                bar.close()
        if finish:
            self.finish()
        return self.history
