"""torch.ao.pruning adapter: OBS-IHT as a ``BaseSparsifier``.

    sparsifier = OBSIHTSparsifier(curvature, sparsity_level=0.5, iterations=2)
    sparsifier.prepare(model, config=[{"tensor_fqn": "fc1.weight"}, {"tensor_fqn": "fc2.weight"}])
    sparsifier.step()          # one OBS-IHT plan for every group, then each group's mask and weights
    sparsifier.squash_mask()   # bake: plain weights again

Each group gets its own ``sparsity_level`` (the fraction of the tensor that is zero after the step, as in
torch.ao's WeightNormSparsifier -- except that zeros from an earlier step stay: a lower level later keeps them,
since the OBS update already moved their weight onto the others).  ``step`` computes the whole plan before it writes anything, writes the new
masks into the FakeSparsity parametrizations and the OBS-updated weights into ``parametrizations.<name>.original``.
The curvature must be collected for exactly the prepared tensors (before or after ``prepare``).
"""
from __future__ import annotations

import dataclasses
import numbers

import torch
from torch.ao.pruning import BaseSparsifier

from obs_plugins.errors import PruningInputError
from obs_plugins.masks import PrunePlan, normalize_amount, parse_nm
from obs_plugins.methods.obs_iht import OBSIHTConfig
from obs_plugins.methods.obs_iht import solve as obs_iht_solve


def _check_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, numbers.Real):
        raise PruningInputError(f"sparsity_level: a fraction in [0, 1], got {level!r}")
    normalize_amount(float(level), arg="sparsity_level")


class OBSIHTSparsifier(BaseSparsifier):
    def __init__(self, curvature, sparsity_level: float = 0.5, **config):
        from obs_plugins.curvature import Curvature
        if not isinstance(curvature, Curvature):
            raise PruningInputError(f"curvature: expected an obs_plugins.Curvature, got {type(curvature).__name__}")
        fields = {f.name for f in dataclasses.fields(OBSIHTConfig)}
        unknown = sorted(set(config) - fields - {"allocation"})
        if unknown:
            raise PruningInputError(f"OBSIHTSparsifier: unknown argument(s) {unknown}; accepted: curvature, "
                                    f"sparsity_level, {sorted(fields - {'allocation'})}")
        if "allocation" in config:
            raise PruningInputError("allocation: each group's sparsity_level sets its own count here")
        _check_level(sparsity_level)
        self.obs_config = OBSIHTConfig(**config)
        self.obs_config.validate()
        self.curvature = curvature
        self._plan: PrunePlan | None = None
        super().__init__(defaults={"sparsity_level": float(sparsity_level)})

    def prepare(self, model, config):
        """As torch.ao's, with every config entry checked first (a tensor_fqn that does not resolve, a tensor listed
        twice, a bad level), so a refused call leaves the model unprepared."""
        seen = set()
        for i, entry in enumerate(config or []):
            fqn = entry.get("tensor_fqn") if isinstance(entry, dict) else None
            if not isinstance(fqn, str) or "." not in fqn and not hasattr(model, fqn):
                raise PruningInputError(f"config[{i}]: a dict with 'tensor_fqn' ('layer.weight'), got {entry!r}")
            path, _, name = fqn.rpartition(".")
            try:
                module = model.get_submodule(path) if path else model
            except AttributeError:
                raise PruningInputError(f"config[{i}]: the model has no module {path!r} ({fqn!r})") from None
            if not hasattr(module, name):
                raise PruningInputError(f"config[{i}]: {type(module).__name__} {path!r} has no tensor {name!r}")
            if fqn in seen:
                raise PruningInputError(f"config[{i}]: {fqn!r} is listed twice")
            seen.add(fqn)
            if "sparsity_level" in entry:
                _check_level(entry["sparsity_level"])
        return super().prepare(model, config)

    def _targets_of_groups(self):
        if self.curvature is None:   # a copy or an unpickled sparsifier: the curvature is not part of its state
            raise PruningInputError("curvature: this sparsifier holds none (a copied or reloaded sparsifier drops "
                                    "it); set sparsifier.curvature = Curvature.layerwise(...) on the dense model")
        out = []
        for g in self.groups:
            try:
                out.append((g, self.curvature.target(g["module"], g["tensor_name"])))
            except PruningInputError:
                raise PruningInputError(f"curvature: {g['tensor_fqn']} is not among the tensors the curvature "
                                        "was collected for") from None
        return out

    def step(self, use_path: bool = True) -> None:
        if not self.enable_mask_update:
            return
        pairs = self._targets_of_groups()
        if not pairs:
            raise PruningInputError("sparsifier: no tensors to prune; call prepare(model, config) first, with "
                                    "config listing them ({'tensor_fqn': 'layer.weight'} each)")
        nm = parse_nm(self.obs_config.nm)
        counts = {}
        for g, t in pairs:   # every group checked before the solve, so nothing is written half-way
            if t._fake_sparsity() is None:
                raise PruningInputError(f"sparsifier: {g['tensor_fqn']} holds no FakeSparsity mask (not prepared, or "
                                        "squash_mask() removed it); prepare the model again")
            if t.key in counts:
                raise PruningInputError(f"sparsifier: {g['tensor_fqn']} is in two groups; list it once")
            level = g["sparsity_level"]
            _check_level(level)
            if nm is not None and abs(level - nm[0] / nm[1]) > 1e-9:
                raise PruningInputError(f"sparsity_level={level} does not match nm={self.obs_config.nm}")
            prior = t.prior_mask()  # zeros from an earlier step stay and count towards the level
            counts[t.key] = max(round(level * prior.numel()) - int((~prior).sum()), 0)
        # one joint solve (the IHT steps see every group); nothing is written until it has succeeded
        plan = obs_iht_solve(self.curvature, None, self.obs_config, only_keys=list(counts),
                             counts=None if nm else counts)
        self._plan = plan
        try:
            super().step(use_path)  # BaseSparsifier: update_mask(**group) for every group
        finally:
            self._plan = None

    def update_mask(self, module, tensor_name, **kwargs):
        t = self.curvature.target(module, tensor_name)
        e = self._plan.entries[t.key]
        with torch.no_grad():
            if e.new_weight is not None:
                t.orig().copy_(e.new_weight.to(t.orig().dtype))
            t.mask_tensor().copy_(e.mask.to(t.mask_tensor().dtype))

    def __getstate__(self):  # the curvature holds the model and data: never pickle it with the sparsifier
        state = self.__dict__.copy()
        state["curvature"] = None
        return state
