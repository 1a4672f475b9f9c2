"""The Continuous Sparsification trainer (Savarese, Silva & Maire, NeurIPS 2020).

During the search every listed tensor ``w`` is replaced, through :mod:`torch.nn.utils.parametrize`, by
``w * sigmoid(beta * s) * scale`` with ``s`` a learnable score (one per weight, or one per output channel).  The
scores live in the sparsifier, never in ``model.parameters()``: give them to the optimizer through
:meth:`ContinuousSparsifier.param_groups` (which never puts weight decay on them).

The schedule is a handful of small public methods so that any training loop (``fit``, your own loop, a
Hugging Face ``TrainerCallback``) can drive it::

    cs = ContinuousSparsifier(model, params, epochs=3)
    opt = torch.optim.SGD(cs.param_groups(lr=0.1, weight_decay=5e-4), momentum=0.9)
    while not cs.done:                              # rounds x epochs
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + cs.penalty()
            opt.zero_grad(); loss.backward(); opt.step()
            cs.step()                               # counts optimizer steps (the rewind point)
        cs.step_epoch()                             # next temperature; next round after the last epoch
    cs.finish(rewind=True)                          # plain model again, weights rewound
    prune.global_unstructured(params, pruning_method=ContinuousSparsification, amount=0.9, sparsifier=cs)

After :meth:`finish` the learned scores stay in the sparsifier; :meth:`make_plan` turns them into an exact
number of prunes (the scores are thresholded at the requested quantile, not at ``s > 0``; the report says how
far the natural threshold was).
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...curvature import batching
from ...curvature.batching import batch_loss as _batch_loss
from ...curvature.batching import default_forward as _default_forward
from ...errors import PruningInputError
from .._state import check_saved_state, resolve_config
from ...masks import PrunePlan, allocate_global, allocate_uniform, as_scores, count_to_prune, lowest_k_mask
from ...targets import Target, check_targets, out_dim, resolve_targets
from .config import CSConfig, check_epochs

STATE_VERSION = 1
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def _plain_name(name: str) -> str:
    """``conv.parametrizations.weight.original`` -> ``conv.weight`` (the name without our gate)."""
    return _PARAMETRIZED.sub(r"\1\2", name)


def _out_dim(t: Target) -> int:
    """The output-channel dimension of the tensor (only a Conv1D's ``weight`` is stored ``(in, out)``)."""
    return out_dim(t.module) if t.name == "weight" else 0


def _score_dtype(w: torch.Tensor) -> torch.dtype:
    """The scores' dtype: the weights' own, but never below float32 (in bf16 the magnitude init's ranks tie, so
    its cut was no longer magnitude pruning; the gate is cast to the weights' dtype in the forward)."""
    return torch.promote_types(w.dtype, torch.float32)


class _Gate(nn.Module):
    """The parametrization ``w -> w * gate``; holds no parameters (the scores stay out of the model)."""

    _obs_plugins_gate = True   # resolve_targets accepts a tensor under this parametrization

    def __init__(self, sparsifier: "ContinuousSparsifier", key: str):
        super().__init__()
        self._cs = sparsifier  # a plain object: not registered as a submodule or parameter
        self.key = key

    def forward(self, w):
        return w * self._cs.gate(self.key).to(w.dtype)


class ContinuousSparsifier:
    """Learns a mask score per weight (or per output channel) of ``params`` while the model trains.

    Args:
        model: the model (its parameters keep their device and dtype; the scores get the same device, and the
            dtype at least float32: bf16/fp16 scores would tie neighbouring ranks of the magnitude init).
        params: ``(module, name)`` pairs (torch.nn.utils.prune's convention) or module names.
        config: a :class:`CSConfig`; keyword ``overrides`` replace its fields (``epochs=3, penalty=1e-6``).
        score_init_auto: what ``score_init="auto"`` means here: "constant" (the paper's search, the default) or
            "magnitude" (``PruningCallback`` passes it for fine-tuning).  The resolved value is ``self.score_init``.

    Bad arguments raise :class:`obs_plugins.PruningInputError` naming the argument, before the model is touched.
    """

    def __init__(self, model: nn.Module, params, config: CSConfig | None = None, *,
                 score_init_auto: str = "constant", **overrides):
        if not isinstance(model, nn.Module):
            raise PruningInputError(f"model: expected an nn.Module, got {type(model).__name__}")
        config = resolve_config(config, CSConfig, overrides, owner="ContinuousSparsifier")
        if score_init_auto not in ("constant", "magnitude"):
            raise PruningInputError(f"score_init_auto: 'constant' or 'magnitude', got {score_init_auto!r}")
        targets = resolve_targets(model, params)
        for t in targets:
            if parametrize.is_parametrized(t.module, self._stored_name(t)):
                raise PruningInputError(f"params: {t.key} is already parametrized (another sparsifier still "
                                        "searching? call its finish() first)")
        check_targets(targets)  # finite values on one real device (NaN/Inf would be trained, meta has no values)
        self.model = model
        self.config = config
        self.targets: list[Target] = targets
        self.scores: dict[str, nn.Parameter] = {}
        self._counts: dict[str, torch.Tensor | None] = {}  # unpruned weights behind each score (None: all, 1 each)
        self._score_init_auto = score_init_auto
        self._resolved = config.resolved(score_init_auto)
        self.score_init = self._resolved.score_init    # "constant" or "magnitude"
        self.mask_scale = self._resolved.mask_scale    # "paper", "tempered" or "none"
        if self.mask_scale == "tempered" and not self._resolved.max_initial_score > 0:
            raise PruningInputError(f"mask_scale: 'tempered' needs a positive largest initial score s_max (it "
                                    f"divides by sigmoid(beta * s_max)); got s_max = "
                                    f"{self._resolved.max_initial_score} (raise mask_init, or lower "
                                    f"score_init_quantile below 1)")
        init = self._magnitude_scores() if self.score_init == "magnitude" else None
        self._init_scores: dict[str, torch.Tensor] | None = init  # per-entry s0 for the round resets
        for t in targets:
            w = t.orig().detach()
            shape = list(w.shape)
            if config.granularity == "channel":
                d = _out_dim(t)
                shape = [w.shape[i] if i == d else 1 for i in range(w.dim())]
            if init is not None:
                self.scores[t.key] = nn.Parameter(init[t.key].clone())
            else:
                self.scores[t.key] = nn.Parameter(torch.full(shape, float(config.mask_init), dtype=_score_dtype(w),
                                                             device=w.device))
            prior = t.prior_mask()
            if config.granularity == "channel":
                dims = [i for i in range(w.dim()) if i != _out_dim(t)]
                cnt = prior.to(w.dtype).sum(dim=dims, keepdim=True) if dims else prior.to(w.dtype)
                self._counts[t.key] = cnt
            else:
                self._counts[t.key] = None if bool(prior.all()) else prior.to(w.dtype)
        self.round = 0          # current search round (0-based)
        self.epoch = 0          # epoch within the round (0-based)
        self.global_step = 0    # optimizer steps seen through step()
        self.done = False       # every epoch of every round has run
        self.finished = False   # finish() has removed the gates
        self.history: list[dict] = []
        self._rewind: dict[str, torch.Tensor] | None = None
        if config.rewind_step == 0:
            self._rewind = self._snapshot()
        self._install()

    @classmethod
    def for_fine_tuning(cls, model: nn.Module, params, config: CSConfig, sparsity: float) -> "ContinuousSparsifier":
        """A search that *is* the fine-tuning (``PruningCallback``): ``score_init="auto"`` starts the scores ranked
        like ``|w|`` ("magnitude"), with their natural threshold at ``sparsity`` unless ``score_init_quantile`` is
        set; a short fine-tune cannot resolve the paper's tied start (issue 15)."""
        if config.resolved_score_init("magnitude") == "magnitude" and config.score_init_quantile is None:
            config = dataclasses.replace(config, score_init_quantile=float(sparsity))
        return cls(model, params, config, score_init_auto="magnitude")

    # ------------------------------------------------------------------ gating
    @staticmethod
    def _stored_name(t: Target) -> str:
        """The tensor that holds the weights: ``<name>_orig`` once torch.nn.utils.prune reparametrised it."""
        return t.name + "_orig" if hasattr(t.module, t.name + "_orig") else t.name

    def _magnitude_scores(self) -> dict[str, torch.Tensor]:
        """``score_init="magnitude"``: ``s0 + c * (u - q)`` with ``u = rank(|w|) / (n - 1)`` (see :class:`CSConfig`),
        ranked over every target ("global" allocation) or within each tensor ("uniform"); entries (channels)
        pruned before rank lowest; ties by position.  Ranks are computed in float64 on the CPU."""
        cfg = self.config
        s0, c = float(cfg.mask_init), float(cfg.score_init_spread)
        q = 0.5 if cfg.score_init_quantile is None else float(cfg.score_init_quantile)
        mags: dict[str, torch.Tensor] = {}
        for t in self.targets:
            w = t.orig().detach().to("cpu", torch.float64).abs()
            prior = t.prior_mask().cpu()
            if cfg.granularity == "channel":
                d = _out_dim(t)
                dims = [i for i in range(w.dim()) if i != d]
                cnt = prior.to(torch.float64).sum(dim=dims, keepdim=True) if dims else prior.to(torch.float64)
                tot = (w * prior).sum(dim=dims, keepdim=True) if dims else w * prior
                mags[t.key] = torch.where(cnt > 0, tot / cnt.clamp(min=1), torch.full_like(tot, -1.0))
            else:
                mags[t.key] = w.masked_fill(~prior, -1.0)  # pruned before: below every real |w|
        groups = [list(mags)] if cfg.allocation == "global" else [[k] for k in mags]
        out = {}
        for keys in groups:
            flat = torch.cat([mags[k].reshape(-1) for k in keys])
            n = flat.numel()
            order = torch.argsort(flat, stable=True)
            rank = torch.empty(n, dtype=torch.float64)
            rank[order] = torch.arange(n, dtype=torch.float64)
            u = rank / (n - 1) if n > 1 else torch.full((n,), 0.5, dtype=torch.float64)
            s = s0 + c * (u - q)
            i = 0
            for k in keys:
                m = mags[k].numel()
                w = self._target(k).orig()
                out[k] = s[i:i + m].reshape(mags[k].shape).to(device=w.device, dtype=_score_dtype(w))
                i += m
        return out

    def _target(self, key: str) -> Target:
        return next(t for t in self.targets if t.key == key)

    def _install(self) -> None:
        for t in self.targets:
            parametrize.register_parametrization(t.module, self._stored_name(t), _Gate(self, t.key))

    def _uninstall(self) -> None:
        for t in self.targets:
            name = self._stored_name(t)
            if parametrize.is_parametrized(t.module, name):
                parametrize.remove_parametrizations(t.module, name, leave_parametrized=False)

    def _beta(self, epoch: int) -> float:
        """``final_temperature ** (epoch / (epochs - 1))``: 1 at a round's first epoch, beta_T at its last."""
        return float(self.config.final_temperature) ** (epoch / (self.config.epochs - 1))

    @property
    def temperature(self) -> float:
        """beta of the current epoch (evaluated in every gated forward: no list built here)."""
        return self._beta(min(self.epoch, self.config.epochs - 1))

    def schedule(self) -> list[float]:
        """beta for every epoch of a round."""
        return [self._beta(e) for e in range(self.config.epochs)]

    def gate(self, key: str) -> torch.Tensor:
        """``sigmoid(beta * s) * scale`` for one target (shape of its scores, broadcast over the weights)."""
        beta = self.temperature
        g = torch.sigmoid(beta * self.scores[key])
        scale = self.scale_at(beta)
        return g * scale if scale != 1.0 else g

    def scale_at(self, beta: float) -> float:
        """The gate's factor at temperature ``beta``: "paper" 1/sigmoid(s0), "tempered" 1/sigmoid(beta * s_max)
        (s_max: the largest initial score), "none" 1."""
        return self._resolved.scale_at(beta)

    def penalty(self) -> torch.Tensor:
        """``penalty * sum(sigmoid(beta * s))`` over every unpruned weight (a channel's gate counts once per
        weight of the channel).  Add it to the loss."""
        beta = self.temperature
        total = None
        for key, s in self.scores.items():
            g = torch.sigmoid(beta * s)
            cnt = self._counts[key]
            term = g.sum() if cnt is None else (g * cnt).sum()
            total = term if total is None else total + term
        return float(self.config.penalty) * total

    # ------------------------------------------------------------------ optimizer helpers
    def parameters(self) -> Iterable[nn.Parameter]:
        """The mask scores (not part of ``model.parameters()``)."""
        return iter(self.scores.values())

    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """Two optimizer groups: the model's parameters (``lr``, ``weight_decay``) and the scores (``mask_lr`` or
        ``lr``, never weight decay).  ``lr=None`` leaves the optimizer's default."""
        if self.finished:
            raise RuntimeError("param_groups: the search is finished (the scores are no longer trained)")
        weights = {"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": weight_decay}
        scores = {"params": list(self.scores.values()), "weight_decay": 0.0}
        if lr is not None:
            weights["lr"] = lr
        mask_lr = self.config.mask_lr if self.config.mask_lr is not None else lr
        if mask_lr is not None:
            scores["lr"] = mask_lr
        return [weights, scores]

    # ------------------------------------------------------------------ schedule
    def step(self) -> None:
        """Call after every optimizer step: counts steps and saves the rewind weights at ``rewind_step``."""
        self._check_searching("step")
        self.global_step += 1
        if self._rewind is None and self.round == 0 and self.global_step >= self.config.rewind_step:
            self._rewind = self._snapshot()

    def step_epoch(self) -> None:
        """Call after every epoch: the next epoch's temperature; after a round's last epoch, :meth:`next_round`
        (or, after the last round, ``done = True``)."""
        self._check_searching("step_epoch")
        if self.done:
            raise RuntimeError("step_epoch: every round has run; call finish()")
        self.epoch += 1
        if self.epoch >= self.config.epochs:
            if self.round + 1 < self.config.rounds:
                self.next_round()
            else:
                self.done = True

    def next_round(self) -> None:
        """Start the next round now: ``s <- min(beta * s, s0)`` with the current beta, epoch 0 (beta = 1).  With
        ``score_init="magnitude"`` s0 is each entry's initial score (kept gates restart at their magnitude prior)."""
        self._check_searching("next_round")
        if self.round + 1 >= self.config.rounds:
            raise RuntimeError(f"next_round: round {self.round} is the last of rounds={self.config.rounds}; "
                               "call finish()")
        if self.round == 0 and self._rewind is None:
            warnings.warn(f"rewind_step={self.config.rewind_step} was not reached in round 0 ({self.global_step} "
                          "optimizer steps counted; call cs.step() after every optimizer step); rewinding to the "
                          "end of round 0 instead", stacklevel=2)
            self._rewind = self._snapshot()
        beta, s0 = self.temperature, float(self.config.mask_init)
        with torch.no_grad():
            for key, s in self.scores.items():
                if self._init_scores is None:
                    s.copy_(torch.clamp(beta * s, max=s0))
                else:
                    s.copy_(torch.minimum(beta * s, self._init_scores[key]))
        self.round += 1
        self.epoch = 0

    def finish(self, rewind: bool = True) -> "ContinuousSparsifier":
        """End the search: remove the gates (the model's weights are plain Parameters again, the same objects)
        and, with ``rewind``, restore every parameter and buffer of the model to the saved early iterate.  The
        scores stay here for :meth:`make_plan`."""
        self._check_searching("finish")
        if rewind and self._rewind is None:
            raise RuntimeError(f"finish: no rewind weights were saved (rewind_step={self.config.rewind_step} was "
                               f"not reached: {self.global_step} steps counted); call cs.step() after every "
                               "optimizer step, or finish(rewind=False)")
        self._uninstall()
        if rewind:
            self.rewind()
        for t in self.targets:  # torch.nn.utils.prune recomputes <name> only in forward: refresh it now
            if hasattr(t.module, t.name + "_mask"):
                setattr(t.module, t.name, getattr(t.module, t.name + "_orig") * getattr(t.module, t.name + "_mask"))
        self.finished = True
        return self

    def rewind(self) -> None:
        """Copy the saved early iterate into the model (every parameter and buffer)."""
        if self._rewind is None:
            raise RuntimeError("rewind: no rewind weights were saved yet")
        current = self._named_tensors()
        missing = sorted(set(self._rewind) - set(current))
        if missing:
            raise RuntimeError(f"rewind: the model no longer has {missing[:5]}")
        with torch.no_grad():
            for name, saved in self._rewind.items():
                current[name].copy_(saved)

    @property
    def rewind_state(self) -> dict[str, torch.Tensor] | None:
        """The saved early iterate (plain parameter/buffer names), or None before it is reached."""
        return self._rewind

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.model.named_parameters(remove_duplicate=True):
            out[_plain_name(n)] = p
        for n, b in self.model.named_buffers(remove_duplicate=True):
            out[_plain_name(n)] = b
        return out

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self._named_tensors().items()}

    def _check_searching(self, what: str) -> None:
        if self.finished:
            raise RuntimeError(f"{what}: the search is finished (finish() was called)")

    # ------------------------------------------------------------------ statistics
    def _expanded_scores(self, t: Target) -> torch.Tensor:
        return self.scores[t.key].detach().expand(t.orig().shape)

    def natural_sparsity(self, targets: list[Target] | None = None) -> float:
        """Fraction of the weights the paper's mask ``1[s > 0]`` removes (weights pruned before count as
        removed)."""
        targets = self.targets if targets is None else targets
        removed = total = 0
        for t in targets:
            keep = (self._expanded_scores(t) > 0) & t.prior_mask().to(self.scores[t.key].device)
            removed += keep.numel() - int(keep.sum())
            total += keep.numel()
        return removed / max(total, 1)

    # ------------------------------------------------------------------ tickets
    def make_plan(self, targets: list[Target] | None = None, k: int | None = None, *,
                  amount: float | int | None = None) -> PrunePlan:
        """Exactly ``k`` new prunes (or ``amount`` in torch's meaning) among ``targets`` (default: all), lowest
        learned score first, honouring each target's prior mask.  ``config.allocation``: one global ranking or
        the same fraction per tensor.  ``granularity="channel"``: whole channels in score order (ties broken by
        position, so where ``k`` ends inside a channel its first entries go)."""
        if targets is not None and (isinstance(targets, (int, float)) or torch.is_tensor(targets)):
            raise PruningInputError(f"targets: a list of targets, got {targets!r}; give the amount as "
                                    "make_plan(amount=...) or the count as make_plan(k=...)")
        if not self.finished:
            raise PruningInputError("sparsifier: the search is still running; call cs.finish() (or fit) before "
                                    "pruning")
        targets = self.targets if targets is None else list(targets)
        mine = {t.key: t for t in self.targets}
        for t in targets:
            if t.key not in mine or mine[t.key].module is not t.module:
                raise PruningInputError(f"params: {t.key} is not among the sparsifier's parameters")
        prior = {t.key: t.prior_mask().cpu() for t in targets}
        avail = sum(int(p.sum()) for p in prior.values())
        if (k is None) == (amount is None):
            raise PruningInputError("amount: give exactly one of k (a count) and amount")
        if k is None:
            k = count_to_prune(amount, avail)
        elif isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= avail:
            raise PruningInputError(f"amount: cannot prune {k!r} of {avail} remaining entries")
        scores = {t.key: as_scores(self._expanded_scores(t)).cpu() for t in targets}
        if self.config.allocation == "uniform":
            counts = allocate_uniform(prior, k)
        else:
            counts = allocate_global(scores, prior, k)
        plan = PrunePlan(report={"method": "continuous_sparsification"})
        threshold = -math.inf
        for t in targets:
            mask = lowest_k_mask(scores[t.key], counts[t.key], prior[t.key])
            newly = prior[t.key] & ~mask
            if bool(newly.any()):
                threshold = max(threshold, float(scores[t.key][newly].max()))
            plan.add(t, mask.to(t.orig().device))
        total = sum(p.numel() for p in prior.values())
        achieved = plan.sparsity()
        natural = self.natural_sparsity(targets)
        plan.report.update({
            "pruned": k,
            "requested_sparsity": achieved,
            "natural_sparsity": natural,
            "natural_minus_requested": natural - achieved,
            "score_threshold": threshold if k else None,
            "granularity": self.config.granularity,
            "allocation": self.config.allocation,
            "weights": total,
            "per_tensor_sparsity": {key: 1.0 - float(e.mask.sum()) / e.mask.numel()
                                    for key, e in plan.entries.items()},
        })
        return plan

    def masks(self, amount: float | int) -> dict[str, torch.Tensor]:
        """The ticket's keep-masks ``{key: bool tensor}`` at ``amount`` (torch's meaning), from :meth:`make_plan`."""
        return {key: e.mask for key, e in self.make_plan(amount=amount).entries.items()}

    # ------------------------------------------------------------------ (de)serialization
    def state_dict(self) -> dict:
        """Scores, schedule position, step count and the rewind weights (``torch.save``-able, weights_only)."""
        return {
            "version": STATE_VERSION,
            "config": dataclasses.asdict(self._resolved),  # "auto" as resolved here
            "keys": [t.key for t in self.targets],
            "scores": {k: s.detach().clone() for k, s in self.scores.items()},
            "round": self.round, "epoch": self.epoch, "global_step": self.global_step,
            "done": self.done, "finished": self.finished,
            "rewind": None if self._rewind is None else {k: v.clone() for k, v in self._rewind.items()},
            "init_scores": None if self._init_scores is None else {k: v.clone()
                                                                  for k, v in self._init_scores.items()},
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved search (build the sparsifier on the same model/params/config, then load)."""
        if isinstance(state, dict) and isinstance(state.get("config"), dict):  # older states: fields added later
            saved = {f.name: state["config"].get(f.name, f.default) for f in dataclasses.fields(CSConfig)}
            try:
                saved = dataclasses.asdict(CSConfig(**saved).resolved(self._score_init_auto))
            except (TypeError, PruningInputError):
                pass
            state = {**state, "config": saved}
        check_saved_state(state, owner="ContinuousSparsifier", noun="sparsifier", version=STATE_VERSION,
                          keys=[t.key for t in self.targets], config=self._resolved)
        for k, s in state["scores"].items():
            if tuple(s.shape) != tuple(self.scores[k].shape):
                raise PruningInputError(f"state: scores of {k} have shape {tuple(s.shape)}, expected "
                                        f"{tuple(self.scores[k].shape)}")
        init = state.get("init_scores")
        if (init is None) != (self._init_scores is None):
            kind = "constant" if init is None else "magnitude"
            raise PruningInputError(f"state: saved with score_init {kind!r}, this sparsifier uses "
                                    f"{self.score_init!r}")
        if state["finished"] and not self.finished:
            raise PruningInputError("state: saved after finish(); load it into a finished sparsifier")
        if self.finished and not state["finished"]:
            raise PruningInputError("state: this sparsifier is finished; the saved search is not")
        with torch.no_grad():
            for k, s in state["scores"].items():
                self.scores[k].copy_(s)
        self.round, self.epoch = int(state["round"]), int(state["epoch"])
        self.global_step, self.done = int(state["global_step"]), bool(state["done"])
        dev = {n: t.device for n, t in self._named_tensors().items()}
        self._rewind = None if state["rewind"] is None else {
            n: v.to(dev.get(n, v.device)).clone() for n, v in state["rewind"].items()}
        if init is not None:  # the prior of the original weights, not of the ones this sparsifier was built on
            self._init_scores = {k: v.to(self.scores[k].device, self.scores[k].dtype).clone()
                                 for k, v in init.items()}
        self.history = [dict(h) for h in state.get("history", [])]

    # ------------------------------------------------------------------ a ready-made loop
    def fit(self, train_loader, loss_fn: Callable | None = None, *, epochs: int | None = None,
            optimizer: torch.optim.Optimizer | None = None, lr: float | None = None, momentum: float = 0.9,
            weight_decay: float = 0.0, batch_loss: Callable | None = None, finish: bool = True,
            rewind: bool = True) -> list[dict]:
        """Run (or continue) the whole search: ``rounds`` x ``epochs`` epochs, then :meth:`finish`.

        train_loader: any re-iterable (a DataLoader, a list of batches); it is iterated afresh every epoch.
        loss_fn: the library's convention -- ``loss_fn(output, target)`` for ``(input, target)`` batches,
        ``loss_fn(output, batch)`` with ``model(**batch)`` for dicts -- or ``batch_loss(model, batch)``.
        optimizer: your own (it must include the scores, e.g. built from :meth:`param_groups`), or ``lr``
        for the default SGD(momentum) over :meth:`param_groups`.  Returns the per-epoch history.
        """
        self._check_searching("fit")
        if (loss_fn is None) == (batch_loss is None):
            raise PruningInputError("loss_fn: give loss_fn(output, target) or batch_loss(model, batch)")
        if train_loader is None or not hasattr(train_loader, "__iter__"):
            raise PruningInputError(f"train_loader: expected a re-iterable of batches, got "
                                    f"{type(train_loader).__name__}")
        if iter(train_loader) is train_loader:
            raise PruningInputError("train_loader: a one-shot iterator/generator can only be read once; the search "
                                    "reads it every epoch - pass a DataLoader or a list of batches")
        if epochs is not None:
            check_epochs(epochs)
            if epochs != self.config.epochs:
                if self.round or self.epoch or self.global_step:
                    raise PruningInputError(f"epochs: the search already started with epochs="
                                            f"{self.config.epochs}")
                self.config = dataclasses.replace(self.config, epochs=epochs)
                self._resolved = self.config.resolved(self._score_init_auto)
        if optimizer is None:
            if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise PruningInputError(f"lr: give lr > 0 (or an optimizer), got {lr!r}")
            optimizer = torch.optim.SGD(self.param_groups(lr, weight_decay), lr=lr, momentum=momentum)
        else:
            opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
            if not all(id(s) in opt_params for s in self.scores.values()):
                raise PruningInputError("optimizer: it does not train the mask scores; build it from "
                                        "cs.param_groups(lr, weight_decay)")
        device = next(iter(self.scores.values())).device

        bar = None
        if self.config.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.config.rounds * self.config.epochs, desc="continuous sparsification",
                       initial=self.round * self.config.epochs + self.epoch)
        self.model.train()
        try:
            while not self.done:
                beta, total, n = self.temperature, 0.0, 0
                for batch in train_loader:
                    batch = batching.move(batch, device)
                    if batch_loss is not None:
                        loss = batch_loss(self.model, batch)
                    else:   # the library's convention: (inputs, target) pairs, dicts as model(**batch)
                        loss = _batch_loss(loss_fn, _default_forward(self.model, batch), batch)
                    loss = loss + self.penalty()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self.step()
                    total += float(loss.detach())
                    n += 1
                if n == 0:
                    raise PruningInputError("train_loader: produced no batches")
                rec = {"round": self.round, "epoch": self.epoch, "beta": beta, "loss": total / n,
                       "natural_sparsity": self.natural_sparsity()}
                self.history.append(rec)
                self.step_epoch()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(round=rec["round"], beta=f"{beta:.3g}", loss=f"{rec['loss']:.4f}",
                                    natural=f"{rec['natural_sparsity']:.3f}")
        finally:
            if bar is not None:
                bar.close()
        if finish:
            self.finish(rewind=rewind)
        return self.history
