"""torch.nn.utils.prune adapter.

    prune.global_unstructured(params, pruning_method=OBSIHT, amount=0.5, curvature=curv, iterations=3)
    OBSIHT.apply(module, "weight", amount=0.5, curvature=curv)
    prune.global_unstructured(params, pruning_method=ContinuousSparsification, amount=0.9, sparsifier=cs)

torch hands ``compute_mask`` a flat vector (the still-unpruned entries of the listed tensors, concatenated)
without their identity.  We map it back through the order of the curvature's / sparsifier's parameters and
check the values match exactly, so a different list or order fails loudly instead of pruning the wrong
weights.  New weights (the OBS update of the kept weights) are written into the stored parameter, which torch
keeps as ``<name>_orig``; heavy references (curvature, sparsifier) are dropped after use so the hook that
``apply`` leaves on the module never pickles them.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.nn.utils import prune

from obs_plugins.errors import PruningInputError
from obs_plugins.masks import PrunePlan, count_to_prune, normalize_amount, parse_nm
from obs_plugins.targets import check_targets
from obs_plugins.methods.obs_iht import OBSIHTConfig
from obs_plugins.methods.obs_iht import solve as obs_iht_solve


_MISSING = object()

class _PlanPruningMethod(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def __init__(self, amount, *, _target=None):
        self.amount = normalize_amount(amount)
        self._target = _target  # (module, name) when used through .apply

    # subclasses: the ordered targets and the plan for k new prunes among them
    def _all_targets(self):
        raise NotImplementedError

    def _make_plan(self, targets, k: int) -> PrunePlan:
        raise NotImplementedError

    def _release(self) -> None:
        pass

    def _check_ready(self) -> None:
        """Refuse a source that cannot plan yet (a search still running), before any other check."""

    _scores_from = "its own scores"

    @classmethod
    def _check_apply(cls, module, name, importance_scores) -> None:
        if importance_scores is not None:
            raise PruningInputError(f"importance_scores: {cls.__name__} uses {cls._scores_from}")
        if not isinstance(name, str) or not (hasattr(module, name) or hasattr(module, name + "_orig")):
            have = sorted(n for n, _ in module.named_parameters(recurse=False))
            raise PruningInputError(f"name: {type(module).__name__} has no parameter {name!r}; it has {have}")

    @classmethod
    def _apply_atomic(cls, module, name, **kwargs):
        """torch's ``apply``, undone on failure.  torch removes an earlier pruning hook of the tensor (and adds to
        an existing container) before it builds the new method and computes its mask, and restores only a first
        application, only on an ``Exception`` (a Ctrl-C leaves the tensor moved to ``<name>_orig`` and no
        ``<name>``), re-registering it last.  Here the module's parameters (same objects, same order: optimizer
        state and parameters_to_vector go by position) and the pruned tensor's values, buffers, plain
        ``<name>`` attribute and pruning hooks are put back as they were on any failure."""
        hooks = module._forward_pre_hooks
        saved = list(hooks.items())
        methods = {k: h._pruning_methods for k, h in saved if isinstance(h, prune.PruningContainer)}
        params, buffers = list(module._parameters.items()), list(module._buffers.items())
        plain = module.__dict__.get(name, _MISSING)
        # our mask writes the new weights into the tensor (what torch keeps as <name>_orig) before torch adds
        # its mask and hook: a failure after that puts the values back too
        stored = module._parameters.get(name + "_orig", module._parameters.get(name))
        value = stored.detach().clone() if isinstance(stored, torch.Tensor) else None
        try:
            return super().apply(module, name, **kwargs)
        except BaseException:
            if value is not None:
                with torch.no_grad():
                    stored.copy_(value)
            hooks.clear()
            hooks.update(saved)
            for k, pm in methods.items():
                hooks[k]._pruning_methods = pm
            module._parameters.clear()
            module._parameters.update(params)
            module._buffers.clear()
            module._buffers.update(buffers)
            if plain is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = plain
            raise

    def _targets(self):
        targets = self._all_targets()
        if self._target is not None:
            module, name = self._target
            targets = [t for t in targets if t.module is module and t.name == name]
            if not targets:
                raise PruningInputError(f"{type(self).__name__}.apply: ({type(module).__name__}, {name!r}) is not "
                                        "among the parameters the curvature/sparsifier was built for")
        return targets

    def compute_mask(self, t, default_mask):
        # t: the whole tensor (first .apply) or the flat still-unpruned entries (global_unstructured, or a
        # PruningContainer on a second round); our mask comes back in the same shape
        try:
            self._check_ready()   # a running CS / BiP search holds gates: say "call finish()", not "parametrized"
            targets = self._targets()
            check_targets(targets)  # NaN/Inf weights are named here, not mistaken for a different parameter list
            from torch.nn.utils import parametrize
            wrapped = [tgt.key for tgt in targets if parametrize.is_parametrized(tgt.module, tgt.name)]
            if wrapped:  # torch would fail writing its mask after our weights went in: refuse before any write
                raise PruningInputError(
                    f"params: {wrapped[0]} is parametrized (a torch.ao sparsifier's FakeSparsity?), which "
                    "torch.nn.utils.prune masks cannot wrap; prune it through that sparsifier "
                    "(obs_plugins.integrations.torch_ao), or remove the parametrization first")
            kept = [tgt.prior_mask() for tgt in targets]
            expected = torch.cat([tgt.current()[m] for tgt, m in zip(targets, kept)])
            if expected.numel() != t.numel():
                raise PruningInputError(
                    f"params: torch passed {t.numel()} unpruned entries but the {len(targets)} parameters the "
                    f"{self._source_name} was built for have {expected.numel()}; pass exactly the same (module, "
                    "name) list, in the same order")
            if not torch.equal(expected.to(t.device, t.dtype), t.detach().reshape(-1)):
                raise PruningInputError(
                    f"params: the values torch passed do not match the parameters the {self._source_name} was "
                    "built for (different order, different tensors, or importance_scores= given); pass the same "
                    "(module, name) list in the same order and no importance_scores")
            k = count_to_prune(self.amount, t.numel())
            plan = self._make_plan(targets, k)
            # the plan is complete: only now write (new weights land in what torch keeps as <name>_orig)
            with torch.no_grad():
                for e in plan.entries.values():
                    if e.new_weight is not None:
                        e.target.orig().copy_(e.new_weight.to(e.target.orig().dtype))
            self.last_report = plan.report
            flat = torch.cat([plan.entries[tgt.key].mask.to(m.device)[m] for tgt, m in zip(targets, kept)])
            return flat.reshape(default_mask.shape).to(device=default_mask.device, dtype=default_mask.dtype) * default_mask
        finally:
            self._release()


class OBSIHT(_PlanPruningMethod):
    """Iterative Optimal Brain Surgeon as a torch.nn.utils.prune method.

    Args: ``amount`` (torch's meaning), ``curvature`` (an :class:`obs_plugins.Curvature` collected for these
    parameters; with ``loss_fn`` when ``iterations > 1``), and any :class:`OBSIHTConfig` field (``iterations``,
    ``nm``, ``allocation``, ``rel_damp``...).  Through ``global_unstructured`` the default is
    ``allocation="global"`` (one ranking of loss-comparable OBS saliencies, per-layer caps
    ``layer_min_sparsity``/``layer_max_sparsity``) when the curvature has a ``loss_fn``, else ``"uniform"``
    (every listed tensor loses ``amount``).
    """
    _source_name = "curvature"
    _scores_from = "its own OBS saliency"

    def __init__(self, amount, curvature=None, *, _target=None, **config):
        super().__init__(amount, _target=_target)
        if curvature is None:
            raise PruningInputError("curvature: OBSIHT needs curvature=Curvature.layerwise(model, params, batches)")
        from obs_plugins.curvature import Curvature
        if not isinstance(curvature, Curvature):
            raise PruningInputError(f"curvature: expected an obs_plugins.Curvature, got {type(curvature).__name__}")
        fields = {f.name for f in dataclasses.fields(OBSIHTConfig)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise PruningInputError(f"OBSIHT: unknown argument(s) {unknown}; accepted: amount, curvature, "
                                    f"{sorted(fields)}")
        if "allocation" not in config and _target is None:
            # global_unstructured means one ranking over every listed tensor: honour it when the curvature
            # has the loss that makes saliencies comparable across layers
            config["allocation"] = "global" if curvature.loss_fn is not None else "uniform"
        self.config = OBSIHTConfig(**config)
        self.config.validate()
        nm = parse_nm(self.config.nm)
        if nm is not None and float(amount) != nm[0] / nm[1]:
            raise PruningInputError(f"amount={amount} does not match nm={self.config.nm} (use amount={nm[0] / nm[1]})")
        self.curvature = curvature

    @classmethod
    def apply(cls, module, name, amount, curvature=None, importance_scores=None, **config):
        cls._check_apply(module, name, importance_scores)
        return cls._apply_atomic(module, name, amount=amount, curvature=curvature, _target=(module, name), **config)

    def _all_targets(self):
        return self.curvature.targets

    def _make_plan(self, targets, k):
        return obs_iht_solve(self.curvature, k, self.config, only_keys=[t.key for t in targets])

    def _release(self):
        self.curvature = None  # never pickled with the model through the hook


class ContinuousSparsification(_PlanPruningMethod):
    """Masks from a trained :class:`obs_plugins.ContinuousSparsifier` (learned scores, exact sparsity)."""
    _source_name = "sparsifier"
    _scores_from = "the learned scores"

    def __init__(self, amount, sparsifier=None, *, _target=None):
        super().__init__(amount, _target=_target)
        if sparsifier is None:
            raise PruningInputError("sparsifier: ContinuousSparsification needs sparsifier=ContinuousSparsifier(...)")
        self.sparsifier = sparsifier

    @classmethod
    def apply(cls, module, name, amount, sparsifier=None, importance_scores=None):
        cls._check_apply(module, name, importance_scores)
        return cls._apply_atomic(module, name, amount=amount, sparsifier=sparsifier, _target=(module, name))

    def _all_targets(self):
        return self.sparsifier.targets

    def _make_plan(self, targets, k):
        return self.sparsifier.make_plan(targets, k)

    def _check_ready(self):
        if not self.sparsifier.finished:
            raise PruningInputError("sparsifier: the search is still running; call cs.finish() (or fit) before "
                                    "pruning")

    def _release(self):
        self.sparsifier = None


class BiP(_PlanPruningMethod):
    """Masks from a finished :class:`obs_plugins.BiPTrainer` (bi-level learned scores, exact sparsity)."""
    _source_name = "trainer"
    _scores_from = "the learned scores"

    def __init__(self, amount, trainer=None, *, _target=None):
        super().__init__(amount, _target=_target)
        if trainer is None:
            raise PruningInputError("trainer: BiP needs trainer=BiPTrainer(...)")
        self.trainer = trainer

    @classmethod
    def apply(cls, module, name, amount, trainer=None, importance_scores=None):
        cls._check_apply(module, name, importance_scores)
        return cls._apply_atomic(module, name, amount=amount, trainer=trainer, _target=(module, name))

    def _all_targets(self):
        return self.trainer.targets

    def _make_plan(self, targets, k):
        return self.trainer.make_plan(targets, k)

    def _check_ready(self):
        if not self.trainer.finished:
            raise PruningInputError("trainer: the search is still running; call bip.finish() (or fit) before "
                                    "pruning")

    def _release(self):
        self.trainer = None


__all__ = ["OBSIHT", "ContinuousSparsification", "BiP"]
