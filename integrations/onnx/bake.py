"""Step 1 of the flow: the weights as the model computes with them, masks baked on a copy (the caller's model is
never touched)."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune


def _prune_hooks(module: nn.Module):
    return [h for h in module._forward_pre_hooks.values()
            if isinstance(h, prune.BasePruningMethod)]


def _hook_names(h) -> list[str]:
    return [h._tensor_name]     # a PruningContainer carries the same attribute as a single method


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every torch.nn.utils.prune mask baked in, in CPU memory (a model on a GPU
    is copied tensor by tensor to the CPU); ``model`` is not touched.

    After a forward pass in grad mode a pruned module's ``weight`` is a non-leaf tensor that ``deepcopy``
    refuses; we hand ``deepcopy`` detached stand-ins for those attributes through its memo (they are
    recomputed from ``<name>_orig * <name>_mask`` anyway).
    """
    memo = {}
    off_cpu = any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers()))
    if off_cpu:   # the copy is built in CPU memory (ONNX Runtime runs there), not as a second model on the GPU
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = b.detach().to("cpu", copy=True)
    for m in model.modules():
        for h in _prune_hooks(m):
            for name in _hook_names(h):
                t = m.__dict__.get(name)
                if isinstance(t, torch.Tensor):
                    memo[id(t)] = t.detach().to("cpu", copy=True) if off_cpu else t.detach().clone()
    with torch.no_grad():
        cp = copy.deepcopy(model, memo)
    if off_cpu:   # tensors kept as plain attributes (not parameters or buffers)
        for m in cp.modules():
            for k, v in list(vars(m).items()):
                if isinstance(v, torch.Tensor) and v.device.type != "cpu":
                    setattr(m, k, v.detach().to("cpu"))
    cp.eval()   # before the parametrizations are evaluated (spectral_norm's power iteration runs in train mode)
    # parametrizations first: a CS / BiP search started on an already-pruned model gates ``<name>_orig`` itself,
    # which is then a plain parameter holding the gated value for the mask to multiply
    _bake_parametrizations(cp)
    for m in cp.modules():
        for hid, h in list(m._forward_pre_hooks.items()):
            if not isinstance(h, prune.BasePruningMethod):
                continue
            for name in _hook_names(h):
                # not prune.remove: it writes orig * mask into the <name>_orig Parameter object itself, which
                # another module may share (a tied embedding): that one would then compute with the zeros too
                with torch.no_grad():
                    value = (m._parameters[name + "_orig"] * m._buffers[name + "_mask"]).detach().clone()
                del m._parameters[name + "_orig"]
                del m._buffers[name + "_mask"]
                m.__dict__.pop(name, None)
                m.register_parameter(name, nn.Parameter(value))
            del m._forward_pre_hooks[hid]
    for p in cp.parameters():
        p.requires_grad_(False)
    return cp


def _bake_parametrizations(cp: nn.Module) -> None:
    """Replace every parametrized tensor of the *copy* ``cp`` (torch.ao sparsifiers, BiP / CS gates) by a plain
    parameter holding its current value.  Not ``parametrize.remove_parametrizations``: a deep copy shares the
    ``Parametrized*`` class torch made for the original module, and removing a parametrization deletes the property
    from that class -- the caller's model would lose its ``weight``."""
    from torch.nn.utils import parametrize
    for m in list(cp.modules()):
        if not parametrize.is_parametrized(m):
            continue
        with torch.no_grad():
            values = {name: getattr(m, name).detach().clone() for name in list(m.parametrizations.keys())}
        del m._modules["parametrizations"]
        m.__class__ = type(m).__bases__[0]     # the class before torch injected its Parametrized* subclass
        for name, v in values.items():
            m.register_parameter(name, nn.Parameter(v, requires_grad=False))


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as the model computes with them (``<name>_orig * <name>_mask`` for pruned ones, the value of a
    parametrized tensor under its plain name); read-only."""
    from torch.nn.utils import parametrize
    sd = model.state_dict()
    for prefix, m in model.named_modules():
        if parametrize.is_parametrized(m):
            p = f"{prefix}." if prefix else ""
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{p}parametrizations.")}
            with torch.no_grad():
                for name in m.parametrizations.keys():
                    sd[f"{p}{name}"] = getattr(m, name).detach()
    out = {}
    for k, v in sd.items():
        if k.endswith("_mask") and k[: -len("_mask")] + "_orig" in sd:
            continue
        if k.endswith("_orig") and k[: -len("_orig")] + "_mask" in sd:
            base = k[: -len("_orig")]
            out[base] = (v * sd[base + "_mask"]).detach()
        elif v.is_floating_point():
            out[k] = v.detach()
    return out


def zero_fraction(a) -> float:
    """The fraction of exact zeros in a tensor or array."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return float((a == 0).sum()) / max(a.size, 1)
