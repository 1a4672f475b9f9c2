"""Which tensors are pruned, and their 2-D weight views.

Every solver works on a 2-D view ``(out_features, in_features)`` whose columns line up with the layer
input: nn.Linear as is, nn.Conv2d as ``(C_out, C_in*kh*kw)`` (the column order of ``F.unfold``), and the
Hugging Face ``Conv1D`` (``y = x @ W``, weight ``(in, out)``) transposed.  Adapters translate only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PruningInputError, UnprunedWeightsWarning


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D without importing transformers in core: also while torch.nn.utils.prune
    holds its weight as ``weight_orig`` and under a torch.ao parametrization (class ``ParametrizedConv1D``)."""
    if not any(c.__name__ == "Conv1D" for c in type(module).__mro__) or not hasattr(module, "nf"):
        return False
    w = module._parameters.get("weight")
    if w is None:
        w = module._parameters.get("weight_orig")
    if w is None and "parametrizations" in module._modules and hasattr(module.parametrizations, "weight"):
        w = module.parametrizations.weight.original
    return w is not None and w.dim() == 2


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise PruningInputError(f"params: grouped Conv2d (groups={module.groups}) is not supported")
        return "conv2d"
    if is_hf_conv1d(module):
        return "conv1d"
    raise PruningInputError(f"params: {type(module).__name__} is not supported; "
                            "prunable layers are nn.Linear, nn.Conv2d and transformers Conv1D")


def out_dim(module: nn.Module) -> int:
    """The output-channel dimension of ``module.weight``: 1 for the Hugging Face Conv1D ``(in, out)``, else 0."""
    return 1 if is_hf_conv1d(module) else 0


def to_2d(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D (out, in) view/copy of a tensor shaped like ``module.weight``."""
    kind = layer_kind(module)
    if kind == "linear":
        return tensor
    if kind == "conv2d":
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.t()


def from_2d(module: nn.Module, mat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_2d`: reshape a (out, in) matrix back to the parameter's shape."""
    kind = layer_kind(module)
    if kind == "linear":
        return mat.reshape(like.shape)
    if kind == "conv2d":
        return mat.reshape(like.shape)
    return mat.t().reshape(like.shape)


@dataclass(frozen=True, eq=False)
class Target:
    """One prunable tensor: ``getattr(module, name)`` (the effective weight, ``orig * mask`` when pruned)."""
    key: str
    module: nn.Module
    name: str

    def _fake_sparsity(self):
        """torch.ao.pruning's FakeSparsity parametrization on this tensor, if a sparsifier prepared it."""
        from torch.nn.utils import parametrize
        if not parametrize.is_parametrized(self.module, self.name):
            return None
        from torch.ao.pruning.sparsifier.utils import FakeSparsity
        found = [p for p in self.module.parametrizations[self.name] if isinstance(p, FakeSparsity)]
        return found[0] if found else None

    def mask_tensor(self) -> torch.Tensor | None:
        """The live mask: torch.nn.utils.prune's ``<name>_mask`` buffer or torch.ao.pruning's FakeSparsity mask."""
        m = getattr(self.module, self.name + "_mask", None)
        if m is not None:
            return m
        fs = self._fake_sparsity()
        return None if fs is None else fs.mask

    @property
    def pruned_before(self) -> bool:
        """A mask is installed on this tensor (torch.nn.utils.prune, or a prepared torch.ao.pruning sparsifier)."""
        return self.mask_tensor() is not None

    def orig(self) -> torch.Tensor:
        """The stored parameter: ``<name>_orig`` once torch.nn.utils.prune reparametrised it (also while its
        ``apply`` is running and ``<name>`` is gone), ``parametrizations.<name>.original`` under a
        torch.ao.pruning sparsifier, else ``<name>`` itself."""
        o = getattr(self.module, self.name + "_orig", None)
        if o is not None:
            return o
        if self._fake_sparsity() is not None:
            return self.module.parametrizations[self.name].original
        return getattr(self.module, self.name)

    def prior_mask(self) -> torch.Tensor:
        m = self.mask_tensor()
        if m is not None:
            return m.detach().bool()
        return torch.ones_like(self.orig(), dtype=torch.bool)

    def current(self) -> torch.Tensor:
        """The effective weight (``orig * mask`` when pruned), detached."""
        o = self.orig().detach()
        m = self.mask_tensor()
        return o * m if m is not None else o


def resolve_targets(model: nn.Module | None, params) -> list[Target]:
    """``params``: an iterable of ``(module, name)`` (torch's convention) or of module names.

    Keys are ``"<qualified module name>.<name>"`` when the model is given, else ``"<index>.<name>"``.
    """
    if params is None:
        raise PruningInputError("params: give the (module, name) pairs to prune")
    names = {}
    if model is not None:
        names = {id(m): n for n, m in model.named_modules()}
    out, seen, storages = [], set(), {}
    for i, p in enumerate(list(params)):
        if isinstance(p, str):
            if model is None:
                raise PruningInputError("params: module names need the model")
            try:
                module = model.get_submodule(p)
            except AttributeError:
                raise PruningInputError(f"params[{i}]: the model has no module named {p!r}") from None
            p = (module, "weight")
        if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], nn.Module) and isinstance(p[1], str)):
            raise PruningInputError(f"params[{i}]: expected (module, name), got {p!r}")
        module, name = p
        if not hasattr(module, name) and not hasattr(module, name + "_orig"):
            raise PruningInputError(f"params[{i}]: module {type(module).__name__} has no parameter {name!r}")
        t = getattr(module, name, None)
        t = getattr(module, name + "_orig", None) if t is None else t
        if t is None:   # e.g. the bias of a Linear(bias=False)
            raise PruningInputError(f"params[{i}]: {type(module).__name__}.{name} is None (no tensor to prune)")
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise PruningInputError(f"params[{i}]: {name!r} must be a floating-point tensor, got "
                                    f"{getattr(t, 'dtype', type(t))}")
        _check_stored(module, name, i)
        if name == "weight":
            layer_kind(module)
        if (id(module), name) in seen:
            raise PruningInputError(f"params[{i}]: ({type(module).__name__}, {name!r}) is listed twice")
        seen.add((id(module), name))
        if t.device.type != "meta":   # one tensor under two names: each plan entry would overwrite the other
            # the stored tensor: under a parametrization (torch.ao prepare) ``module.<name>`` is a fresh product
            # on every access, and freed temporaries reuse memory, so two tensors could share an address
            span = _span(_stored(module, name))
            for j, other in storages.get(span[0], ()):
                if _overlap(span, other):   # also a transposed view of the same memory (a tied autoencoder)
                    raise PruningInputError(f"params[{i}]: ({type(module).__name__}, {name!r}) is the same tensor "
                                            f"as params[{j}] (a shared parameter); list it once")
            storages.setdefault(span[0], []).append((i, span))
        if model is not None and id(module) not in names:
            raise PruningInputError(f"params[{i}]: module is not part of the model")
        prefix = names.get(id(module), str(i))
        out.append(Target(f"{prefix}.{name}" if prefix else name, module, name))
    if not out:
        raise PruningInputError("params: empty")
    return out


def _span(t: torch.Tensor) -> tuple:
    """``(storage address, first byte, end byte, layout)`` of the memory ``t`` covers: two tensors that share an
    element share values, whatever their shapes or strides (``dec.weight = nn.Parameter(enc.weight.t())``)."""
    size = t.element_size()
    start = t.storage_offset() * size
    layout = (tuple(t.shape), tuple(t.stride()), t.storage_offset(), size)
    if t.numel() == 0:
        return (t.untyped_storage().data_ptr(), start, start, layout)
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return (t.untyped_storage().data_ptr(), start, start + extent * size, layout)


def _offsets(layout) -> torch.Tensor:
    """Every element's byte offset in the storage (for views whose byte ranges interleave)."""
    shape, stride, offset, size = layout
    idx = torch.zeros((), dtype=torch.long)
    for n, st in zip(shape, stride):
        idx = idx.unsqueeze(-1) + torch.arange(n, dtype=torch.long) * st
    return (idx.reshape(-1) + offset) * size


def _dense(span: tuple) -> bool:
    """The tensor fills its byte range (contiguous, or a transpose of a contiguous tensor)."""
    return _numel(span) * span[3][3] == span[2] - span[1]


EXACT_OVERLAP_ELEMENTS = 1 << 22   # above this, two interleaved strided views are taken to share elements


def _overlap(a: tuple, b: tuple) -> bool:
    if not (a[0] == b[0] and a[1] < b[2] and b[1] < a[2]):
        return False
    if a[3] == b[3]:
        return True
    if _dense(a) and _dense(b):   # both fill their ranges, and the ranges overlap
        return True
    for full, other in ((a, b), (b, a)):   # one fills its range: does any element of the other fall in it?
        if _dense(full):
            offs = _offsets(other[3]) if _numel(other) <= EXACT_OVERLAP_ELEMENTS else None
            return True if offs is None else bool(((offs >= full[1]) & (offs < full[2])).any())
    # both strided, ranges interleaved (disjoint column blocks of one fused tensor share no element)
    rows = _row_blocks_overlap(a[3], b[3])
    if rows is not None:
        return rows
    if max(_numel(a), _numel(b)) > EXACT_OVERLAP_ELEMENTS:
        return True   # conservative: refused as one tensor rather than an element-by-element comparison
    return bool(torch.isin(_offsets(a[3]), _offsets(b[3])).any())


def _row_blocks_overlap(la, lb) -> bool | None:
    """Exact answer for two 2-D views with the same strides ``(s, 1)`` (column blocks of one fused matrix):
    elements ``o + i*s + c`` (``i < h``, ``c < w``) meet iff some ``k = i_a - i_b`` has ``k*s`` within
    ``[d - w_a + 1, d + w_b - 1]``, ``d`` the offset difference; ``None`` for other layouts."""
    (sha, sta, oa, za), (shb, stb, ob, zb) = la, lb
    if len(sha) != 2 or len(shb) != 2 or sta != stb or sta[1] != 1 or za != zb or sta[0] < max(sha[1], shb[1]):
        return None
    s, d = sta[0], ob - oa
    lo, hi = d - sha[1] + 1, d + shb[1] - 1
    k_lo = max(-(shb[0] - 1), -((-lo) // s))   # ceil(lo / s)
    k_hi = min(sha[0] - 1, hi // s)
    return k_lo <= k_hi


def _numel(span: tuple) -> int:
    n = 1
    for d in span[3][0]:
        n *= d
    return n


def _check_stored(module: nn.Module, name: str, i: int) -> None:
    """``module.<name>`` must be a tensor a plan can write: a parameter (or buffer, or plain tensor),
    torch.nn.utils.prune's ``<name>_orig``, or one under torch.ao's FakeSparsity or a CS / BiP gate (those refuse
    writes while the search runs: ``PrunePlan.apply``).  A weight *computed* from other tensors --
    ``parametrizations.weight_norm`` / ``spectral_norm``, any other parametrization, the old hook-based
    ``torch.nn.utils.weight_norm`` -- would take the plan's values into a temporary and drop them."""
    from torch.nn.utils import parametrize
    kind = type(module).__name__
    if name in module._parameters or name + "_orig" in module._parameters or name in module._buffers:
        return
    if parametrize.is_parametrized(module, name):
        from torch.ao.pruning.sparsifier.utils import FakeSparsity
        plist = module.parametrizations[name]
        other = [type(p).__name__ for p in plist
                 if not isinstance(p, FakeSparsity) and not getattr(p, "_obs_plugins_gate", False)]
        if not other:
            return
        raise PruningInputError(
            f"params[{i}]: {kind}.{name} is computed by a parametrization ({', '.join(other)}), so a pruned value "
            f"written to it would be lost; remove it first (torch.nn.utils.parametrize.remove_parametrizations("
            f"module, {name!r})) and re-apply it after pruning if needed")
    hooks = [type(h).__name__ for h in module._forward_pre_hooks.values() if getattr(h, "name", None) == name]
    if hooks:   # the old hook-based weight_norm / spectral_norm recompute it before every forward
        raise PruningInputError(
            f"params[{i}]: {kind}.{name} is recomputed before every forward by a {hooks[0]} hook (the old "
            f"torch.nn.utils.weight_norm / spectral_norm), so a pruned value written to it would be lost; remove "
            f"that reparametrization first (torch.nn.utils.remove_weight_norm / remove_spectral_norm)")


def _gate_of(module: nn.Module, name: str) -> str | None:
    """The tensor name a running Continuous Sparsification / BiP search gates for ``module.<name>``: ``<name>``,
    or ``<name>_orig`` when a torch.nn.utils.prune mask was there first; ``None`` when none is gated."""
    if "parametrizations" not in module._modules:
        return None
    for n in (name, name + "_orig"):
        if hasattr(module.parametrizations, n) and any(
                getattr(p, "_obs_plugins_gate", False) for p in module.parametrizations[n]):
            return n
    return None


def _stored(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds ``module.<name>``'s values: ``Target.orig()``, or under a CS / BiP gate (which computes
    w x gate afresh on every read) the gate's ``original``."""
    g = _gate_of(module, name)
    return module.parametrizations[g].original if g is not None else Target("", module, name).orig()


def gated(module: nn.Module, name: str) -> bool:
    """A running Continuous Sparsification / BiP search gates ``module.<name>`` (its value is weight x gate)."""
    return _gate_of(module, name) is not None


def carries_mask(module: nn.Module) -> bool:
    """``module`` holds a mask or gate on one of its tensors: a torch.nn.utils.prune hook, a torch.ao sparsifier's
    FakeSparsity, or a running Continuous Sparsification / BiP gate (not any parametrization: weight_norm is none)."""
    from torch.nn.utils import parametrize, prune
    if any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()):
        return True
    if not parametrize.is_parametrized(module):
        return False
    from torch.ao.pruning.sparsifier.utils import FakeSparsity
    return any(isinstance(p, FakeSparsity) or getattr(p, "_obs_plugins_gate", False)
               for plist in module.parametrizations.values() for p in plist)


def check_targets(targets: list[Target]) -> None:
    """Every target holds finite values on one real device (a meta tensor has no values to prune)."""
    devices = set()
    for t in targets:
        w = t.orig()
        if w.device.type == "meta":
            raise PruningInputError(f"params: {t.key} is on the meta device (no values); load the real weights first")
        devices.add(str(w.device))
        if not torch.isfinite(t.current()).all():
            bad = int((~torch.isfinite(t.current())).sum())
            raise PruningInputError(f"params: {t.key} holds {bad} NaN/Inf values; fix the weights before pruning")
    if len(devices) > 1:
        raise PruningInputError(f"params: the tensors live on several devices ({', '.join(sorted(devices))}); move the "
                                "model to one device")


def check_tied(model: nn.Module | None, targets: list[Target]) -> list[tuple[str, str]]:
    """Warn (:class:`TiedWeightWarning`) for every target whose storage another, unlisted parameter of the
    model shares (e.g. ``lm_head.weight`` tied to ``embed_tokens.weight``): pruning it rewrites both, with
    updates tuned for the listed one.  Returns the ``(listed, unlisted)`` pairs."""
    import warnings
    from .errors import TiedWeightWarning
    if model is None:
        return []
    listed = {(id(t.module), t.name) for t in targets}
    listed |= {(id(t.module), t.name + "_orig") for t in targets}
    for t in targets:   # a torch.ao / BiP / CS parametrization holds the listed tensor itself as `original`
        for n in (t.name, t.name + "_orig"):
            plist = getattr(getattr(t.module, "parametrizations", None), n, None) \
                if "parametrizations" in t.module._modules else None
            if plist is not None:
                listed.add((id(plist), "original"))
    by_storage = {}
    for t in targets:
        o = _stored(t.module, t.name)
        if o.device.type != "meta":
            span = _span(o)
            by_storage.setdefault(span[0], []).append((t.key, span))
    pairs = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            if (id(mod), pname) in listed or p.device.type == "meta" or p.layout != torch.strided:
                continue   # a sparse parameter has no strided storage to share
            span = _span(p)
            key = next((k for k, other in by_storage.get(span[0], ()) if _overlap(span, other)), None)
            other = f"{mname}.{pname}" if mname else pname
            if key is not None and (key, other) not in pairs:
                pairs.append((key, other))
    for key, other in pairs:
        warnings.warn(f"params: {key} is tied to {other}, which is not listed; pruning {key} rewrites {other} "
                      f"too, with updates tuned for {key} alone. Untie them (e.g. tie_word_embeddings=False and "
                      f"a cloned weight) or leave {key} out of params", TiedWeightWarning, stacklevel=3)
    return pairs


def prunable_linear_targets(model: nn.Module, *, exclude: tuple[str, ...] = ("lm_head",),
                            types=(nn.Linear, nn.Conv2d)) -> list[Target]:
    """Every Linear/Conv2d/Conv1D weight in the model, minus names containing an ``exclude`` entry.  Weight
    tensors outside such layers stay out and an :class:`UnprunedWeightsWarning` says so (:func:`warn_unpruned`)."""
    pairs = []
    for qn, m in model.named_modules():
        if any(e in qn for e in exclude):
            continue
        if isinstance(m, types) or is_hf_conv1d(m):
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                continue
            pairs.append(qn)
    targets = resolve_targets(model, pairs)
    warn_unpruned(model, targets, skip=lambda name: any(e in name for e in exclude), stacklevel=3)
    return targets


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)


def weights_outside_layers(model: nn.Module, skip=None) -> list[tuple[str, int]]:
    """``(name, numel)`` of the floating tensors of two or more dimensions held by modules that are not layers
    the layer-wise methods take (Linear, Conv, Hugging Face Conv1D) nor embeddings (and not named ``*embed*``,
    e.g. ViT's position table): Mixture-of-Experts experts stored as 3-D tensors (transformers 5's
    ``experts.gate_up_proj`` / ``down_proj``), routers that are not Linear, ``nn.MultiheadAttention``'s
    ``in_proj_weight``.  ``skip(name)``: names the caller left out on purpose."""
    out = []
    modules = dict(model.named_modules())
    for mn, m in modules.items():
        if isinstance(m, _LAYER_TYPES) or is_hf_conv1d(m):
            continue
        head, sep, _ = f".{mn}".rpartition(".parametrizations.")
        if sep:   # a parametrized layer's stored tensor (torch.ao mask, CS / BiP gate, weight_norm): the layer's own
            owner = modules.get(head[1:])
            if owner is not None and (isinstance(owner, _LAYER_TYPES) or is_hf_conv1d(owner)):
                continue
        for pn, p in m.named_parameters(recurse=False):
            name = f"{mn}.{pn}" if mn else pn
            if p.dim() >= 2 and p.is_floating_point() and "embed" not in name.lower() \
                    and not (skip is not None and skip(name)):
                out.append((name, p.numel()))
    return out


def warn_unpruned(model: nn.Module, targets: list[Target], *, skip=None, share: float = 0.01,
                  stacklevel: int = 2) -> list[tuple[str, int]]:
    """Warn (:class:`UnprunedWeightsWarning`) when a default Linear/Conv selection leaves dense weight tensors
    that hold at least ``share`` of these and the selected weights together (:func:`weights_outside_layers`);
    returns them.  A model of Linear/Conv layers only is silent."""
    import warnings
    left = weights_outside_layers(model, skip)
    n_left = sum(n for _, n in left)
    n_sel = sum(t.orig().numel() for t in targets)   # a count: no orig x mask product
    if left and n_left >= share * (n_left + n_sel):
        names = ", ".join(n for n, _ in left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        warnings.warn(
            f"{n_left} weights ({100 * n_left / (n_left + n_sel):.0f}% of these and the {n_sel} selected) are held "
            f"outside Linear/Conv layers and stay dense: {names}. The layer-wise methods (OBS-IHT, Wanda, their "
            "input Grams) need a Linear/Conv layer; Mixture-of-Experts experts stored as one 3-D tensor (transformers "
            "5) are such tensors. Magnitude pruning takes them when named: api.prune(MagnitudeConfig(), "
            "targets=[(module, 'gate_up_proj'), ...])", UnprunedWeightsWarning, stacklevel=stacklevel)
    return left
