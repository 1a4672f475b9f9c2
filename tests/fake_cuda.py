"""A stand-in CUDA device for a CPU-only torch, to catch device mixing without a GPU.

Tensors of the fake device report ``fcuda:0`` (torch's spare ``PrivateUse1`` slot, renamed) and hold a CPU
tensor inside.  A dispatch mode applies CUDA's rules to every aten op: an op may not mix a device tensor with a
CPU tensor that has dimensions (0-dim CPU scalars are allowed, as on CUDA), a CPU tensor may not be indexed by
device indices, and index assignment may not cross devices; ``.numpy()`` of a device tensor fails.  What it
does not model: kernels, precision, streams and every ``torch.cuda.*`` call; of memory it can only count what
live device tensors hold (:func:`device_bytes`).

Process-global (it renames the backend and patches ``Tensor.data_ptr``): import it only in a subprocess of its
own (``tests/fake_cuda_routes.py``).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

_setup_privateuseone_for_python_backend("fcuda")
DEVICE = torch.device("fcuda", 0)
aten = torch.ops.aten


class DeviceMixingError(RuntimeError):
    pass


class FakeCudaTensor(torch.Tensor):
    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool = False):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=DEVICE, requires_grad=requires_grad, layout=inner.layout)
        r.inner = inner
        return r

    def __repr__(self):
        return f"FakeCudaTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return MODE.__torch_dispatch__(func, types, args, kwargs)

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return FakeCudaTensor(inner_tensors["inner"])

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")


_CROSS_OK = {aten.copy_.default, aten._to_copy.default, aten.copy.default, aten._copy_from.default,
             aten._copy_from_and_resize.default, aten.lift_fresh.default, aten.set_.source_Tensor}
_INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _on_fake(device) -> bool:
    return device is not None and torch.device(device).type == "fcuda"


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        fake = any(isinstance(t, FakeCudaTensor) for t in tensors)
        if func in _INDEX_OPS:
            dst = args[0]
            idx = [i for i in (args[1] if len(args) > 1 else []) if isinstance(i, torch.Tensor)]
            vals = [a for a in args[2:] if isinstance(a, torch.Tensor)]
            if not isinstance(dst, FakeCudaTensor) and any(isinstance(i, FakeCudaTensor) for i in idx):
                raise DeviceMixingError(f"{func}: a CPU tensor indexed with device indices")
            if isinstance(dst, FakeCudaTensor) and any(not isinstance(v, FakeCudaTensor) and v.dim() > 0
                                                       for v in vals):
                raise DeviceMixingError(f"{func}: a device tensor assigned CPU values")
            if not isinstance(dst, FakeCudaTensor) and any(isinstance(v, FakeCudaTensor) for v in vals):
                raise DeviceMixingError(f"{func}: a CPU tensor assigned device values")
        elif func not in _CROSS_OK and fake:
            cpu = [t for t in tensors if not isinstance(t, FakeCudaTensor) and t.dim() > 0]
            if cpu:
                raise DeviceMixingError(f"{func}: mixes device tensors with CPU tensors of shapes "
                                        f"{[tuple(t.shape) for t in cpu]}")
        wrap = fake
        if func in (aten._to_copy.default, aten.copy.default) and kwargs.get("device") is not None:
            wrap = _on_fake(kwargs["device"])
            kwargs["device"] = torch.device("cpu")
        elif kwargs.get("device") is not None and _on_fake(kwargs["device"]):
            wrap, kwargs["device"] = True, torch.device("cpu")
        if func is aten.copy_.default:
            wrap = isinstance(args[0], FakeCudaTensor)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        unwrap = lambda a: a.inner if isinstance(a, FakeCudaTensor) else a  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        schema = func._schema.arguments
        if func is aten.copy_.default or (schema and schema[0].alias_info and schema[0].alias_info.is_write):
            return args[0]            # in place: the caller's tensor, whatever its kind
        if func is aten._local_scalar_dense.default:
            return out
        if not wrap:
            return out
        return tree_map(lambda o: FakeCudaTensor(o) if isinstance(o, torch.Tensor)
                        and not isinstance(o, FakeCudaTensor) else o, out)


MODE = _Mode()


def device_bytes() -> int:
    """Bytes held on the stand-in device now: the storages of every live device tensor, each counted once
    (found through the garbage collector, which tracks tensors; what only C++ holds is not seen)."""
    import gc
    gc.collect()
    seen = {}
    for o in gc.get_objects():
        if isinstance(o, FakeCudaTensor):
            st = o.inner.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def to_device(model: torch.nn.Module) -> torch.nn.Module:
    """``model.to('cuda')`` for the fake device (parameters replaced, as a real move replaces them)."""
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    model._apply(lambda t: t if isinstance(t, FakeCudaTensor) else FakeCudaTensor(t.detach()))
    return model


def _patch():
    """Storage addresses (``data_ptr``) and storages of a wrapper are its inner tensor's; ``torch.tensor(data, device=...)``
    makes a wrapper; generators stay on the CPU (a CPU generator drives the fake device's random ops, which run
    on the CPU)."""
    data_ptr = torch.Tensor.data_ptr
    torch.Tensor.data_ptr = lambda self: data_ptr(self.inner if isinstance(self, FakeCudaTensor) else self)
    storage = torch.Tensor.untyped_storage   # the same for storages (Transformers' save dedupes tied tensors by them)
    torch.Tensor.untyped_storage = lambda self: storage(self.inner if isinstance(self, FakeCudaTensor) else self)
    for name in ("tensor", "as_tensor"):   # built from Python data on the CPU first, outside the dispatch mode
        def make(data, *args, device=None, _f=getattr(torch, name), **kwargs):
            if _on_fake(device):
                return FakeCudaTensor(_f(data, *args, **kwargs))
            return _f(data, *args, device=device, **kwargs)
        setattr(torch, name, make)
    import obs_plugins.targets as targets
    span = targets._span
    targets._span = lambda t: span(t.inner if isinstance(t, FakeCudaTensor) else t)
    import obs_plugins.curvature.operators as operators
    generator = operators._generator
    operators._generator = lambda seed, device: generator(seed, "cpu" if _on_fake(device) else device)


_patch()
