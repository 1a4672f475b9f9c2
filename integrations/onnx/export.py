"""Step 2 of the flow: bake masks on a copy, ``torch.onnx.export(..., dynamo=True)``, record which ONNX
initializer holds which model parameter, and optionally store sparse weights as COO (a smaller file only)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from obs_plugins.curvature.batching import move, named_failure
from obs_plugins.errors import PruningInputError

from .bake import baked_copy, effective_weights, zero_fraction
from .inputs import as_args, auto_dynamic_shapes, first_tensor, repeat_to_batch, widen_seq
from .rewrite import rewrite_sparse_kernel

META_PARAM_MAP = "obs_plugins.param_map"
META_SPARSE_KERNEL = "obs_plugins.sparse_kernel_file"   # the rewrite written with this file ("" when none)
FLOAT_TYPES = (1, 10, 11, 16)   # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights the model can hold


@dataclasses.dataclass
class ExportResult:
    path: str                                  # the model (dense kernels; sparse storage if asked)
    sparse_kernel_path: str | None             # the SparseToDenseMatMul rewrite, when any weight qualified
    rewritten: list[str]                       # initializers moved to the sparse kernel
    param_map: dict[str, list]                 # ONNX initializer -> [model parameter, transposed]
    sparse_storage: list[str]                  # initializers stored as sparse_initializer (COO)
    file_bytes: int
    seconds: float

    def __fspath__(self):
        return self.path


EXTERNAL_DATA_BYTES = 1536 * 2 ** 20   # above this much weight, "auto" writes it beside the file (protobuf: 2 GiB)


def export(model: nn.Module, example_inputs, path, *, dynamic_shapes="auto", sparse_storage: bool = False,
           sparse_kernel: str = "auto", sparse_threshold: float = 0.8, opset: int | None = None,
           strip_value_info: bool = False, verbose: bool = False, external_data="auto") -> ExportResult:
    """Bake masks on a copy of ``model`` and export it with ``torch.onnx.export(..., dynamo=True)``.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors (Hugging Face
    style; use a batch of at least 2 so the batch dimension stays dynamic).  ``dynamic_shapes="auto"`` makes
    dim 0 of every input dynamic (and dim 1 of integer 2-D inputs: token ids); ``None`` exports static shapes.
    ``sparse_storage``: write weights as ONNX ``sparse_initializer`` (COO) where that makes the file smaller
    (ORT densifies them at load: size only, no speed).  ``sparse_kernel``: ``"off"``, ``"auto"`` (rewrite
    MatMul/Gemm whose weight is at least ``sparse_threshold`` zeros into ``com.microsoft:SparseToDenseMatMul``,
    written beside ``path`` as ``<stem>.sparse.onnx``) or ``"on"`` (every weight with any zeros).
    ``external_data``: write the weights to ``<file>.data`` beside each file (ONNX external data; ORT and
    :func:`verify` read it from there): ``"auto"`` (default) when the model holds more than 1.5 GiB of parameters
    and buffers (one protobuf file cannot exceed 2 GiB), ``True`` / ``False`` always / never.
    ``strip_value_info``: drop the exporter's intermediate shape annotations (ORT re-infers them).  The
    sparse-kernel rewrite always drops them; on MiniLM that alone made ORT ~8% faster (see
    ``benchmarks/onnx_value_info.py``), so compare routes with the same setting.
    """
    import onnx

    if sparse_kernel not in ("off", "auto", "on"):
        raise PruningInputError(f"sparse_kernel: expected 'off', 'auto' or 'on', got {sparse_kernel!r}")
    if not 0.0 <= sparse_threshold <= 1.0:
        raise PruningInputError(f"sparse_threshold: expected a fraction in [0, 1], got {sparse_threshold}")
    if not isinstance(model, nn.Module):
        raise PruningInputError(f"model: expected a torch.nn.Module, got {type(model)}")
    if external_data not in ("auto", True, False):
        raise PruningInputError(f"external_data: 'auto', True or False, got {external_data!r}")
    if os.path.isdir(str(path)):
        raise PruningInputError(f"path: {path} is a folder; give the .onnx file to write")
    if external_data == "auto":
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        external_data = size > EXTERNAL_DATA_BYTES
    if external_data and sparse_storage:   # onnx keeps sparse_initializer values inside the .onnx file
        raise PruningInputError("sparse_storage: COO weights stay inside the .onnx file, so with external data "
                                f"(external_data=True, or 'auto' for a model over {EXTERNAL_DATA_BYTES / 2**30:.1f} "
                                "GiB) they could still hit ONNX's 2 GiB limit; use one or the other")
    t0 = time.perf_counter()
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    args, kwargs = move(as_args(example_inputs), "cpu")   # traced on the baked copy, which is in CPU memory
    first = first_tensor(args, kwargs)
    if first is None:
        raise PruningInputError("example_inputs: no tensor given")
    cp = baked_copy(model)
    if hasattr(getattr(cp, "config", None), "use_cache"):
        cp.config.use_cache = False
    if dynamic_shapes == "auto":
        # torch.export specialises size-1 dims: trace with 2 rows (and 2 tokens) so those dims stay dynamic
        if first.dim() > 0 and first.shape[0] == 1:
            args, kwargs = as_args(repeat_to_batch(kwargs or args, 2))
        wargs, wkwargs = as_args(widen_seq(kwargs or args))
        if any(a is not b for a, b in zip([*args, *kwargs.values()], [*wargs, *wkwargs.values()])):
            try:   # a (batch, 1) integer input that is no token sequence (a class id) cannot be widened
                with torch.no_grad():
                    cp(*wargs, **wkwargs)
                args, kwargs = wargs, wkwargs
            except Exception:   # noqa: BLE001 -- then its dim 1 stays static (auto_dynamic_shapes: size > 1 only)
                pass
    ds = auto_dynamic_shapes(args, kwargs) if dynamic_shapes == "auto" else dynamic_shapes
    kw = {} if opset is None else {"opset_version": opset}
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # inputs the model cannot take: say so naming the argument and the module, before torch.export's
        # page-long trace (one eager forward on the example rows)
        named_failure("example_inputs", cp, lambda: cp(*args, **kwargs), example_inputs)
        prog = torch.onnx.export(cp, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=ds,
                                 verbose=verbose, external_data=False, **kw)
    proto = prog.model_proto
    if strip_value_info:
        del proto.graph.value_info[:]
    pmap = param_map(proto, effective_weights(cp))
    proto.metadata_props.add(key=META_PARAM_MAP, value=json.dumps(pmap))
    kernel_path, rewritten = None, []
    if sparse_kernel != "off":
        thr = sparse_threshold if sparse_kernel == "auto" else 1e-9
        sp_proto, rewritten = rewrite_sparse_kernel(proto, threshold=thr)
        if rewritten:
            kernel_path = sparse_kernel_file(path)
            _save(sp_proto, kernel_path, external_data)
    if kernel_path is None:   # an earlier export's rewrite (and its weights): it would not match this file
        for old in (sparse_kernel_file(path), sparse_kernel_file(path) + ".data"):
            if os.path.exists(old):
                os.remove(old)
    proto.metadata_props.add(key=META_SPARSE_KERNEL, value=os.path.basename(kernel_path) if kernel_path else "")
    stored = []
    if sparse_storage:
        proto, stored = to_sparse_storage(proto)
    _save(proto, path, external_data)
    del cp
    # onnx writes no .data when no initializer reaches the size threshold (or all went to sparse_initializer)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)
    return ExportResult(path, kernel_path, rewritten, pmap, stored, size, time.perf_counter() - t0)


def _save(proto, path: str, external_data: bool) -> None:
    import onnx
    data = path + ".data"
    if os.path.exists(data):
        os.remove(data)   # onnx appends to an existing data file
    if external_data:
        onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(data), size_threshold=1024)
    else:
        onnx.save(proto, path)


def sparse_kernel_file(path) -> str:
    """Where :func:`export` writes the sparse-kernel rewrite of ``path``: ``<stem>.sparse.onnx`` beside it
    (``model.onnx`` → ``model.sparse.onnx``; only an ``.onnx`` suffix is replaced, so ``mlp_0.85`` and
    ``mlp_0.95`` get files of their own)."""
    p = Path(path)
    return str(p.with_suffix("") if p.suffix == ".onnx" else p) + ".sparse.onnx"


def param_map(proto, weights: dict[str, torch.Tensor]) -> dict[str, list]:
    """ONNX initializer name -> [parameter name, transposed] by exact value (the exporter renames weights it
    transposes: ``val_56``)."""
    from onnx import numpy_helper
    by_hash = {}
    for k, w in weights.items():
        a = w.detach().cpu().float().numpy()
        if a.size < 2:
            continue
        by_hash.setdefault(_hash(a), (k, False))
        if a.ndim == 2:
            by_hash.setdefault(_hash(a.T), (k, True))
    out = {}
    for init in proto.graph.initializer:
        if init.data_type not in FLOAT_TYPES or len(init.dims) == 0:
            continue
        a = numpy_helper.to_array(init).astype(np.float32)
        hit = by_hash.get(_hash(a))
        if hit is not None and (init.name == hit[0] or a.size > 1):
            out[init.name] = [hit[0], hit[1]]
    return out


def to_sparse_storage(proto, min_sparsity: float = 2 / 3):
    """Move initializers that shrink as COO (int64 indices: beyond 2/3 zeros) into ``sparse_initializer``."""
    import onnx
    from onnx import helper, numpy_helper
    proto = copy.deepcopy(proto)
    g = proto.graph
    keep, moved = [], []
    for init in g.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) >= 2:
            a = numpy_helper.to_array(init)
            if zero_fraction(a) > min_sparsity:
                flat = a.ravel()
                idx = np.flatnonzero(flat).astype(np.int64)
                sp = helper.make_sparse_tensor(numpy_helper.from_array(flat[idx], init.name),
                                               numpy_helper.from_array(idx, init.name + "_indices"),
                                               list(a.shape))
                g.sparse_initializer.append(sp)
                moved.append(init.name)
                continue
        keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    return proto, moved


def _hash(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def load_proto(model):
    """An ``onnx.ModelProto`` as given, or loaded from a path."""
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(os.fspath(getattr(model, "path", model)))   # a path, or an ExportResult


def sparse_kernel_of(path) -> str | None:
    """The sparse-kernel rewrite :func:`export` wrote with the file at ``path`` (its metadata says; for files
    from before that record, ``<stem>.sparse.onnx`` if it exists), or ``None``."""
    for p in load_proto(path).metadata_props:
        if p.key == META_SPARSE_KERNEL:
            return os.path.join(os.path.dirname(os.path.abspath(str(path))), p.value) if p.value else None
    cand = sparse_kernel_file(path)
    return cand if os.path.exists(cand) else None


def param_map_of(model) -> dict:
    """The ``initializer -> [parameter, transposed]`` map :func:`export` wrote into a file's metadata."""
    for p in load_proto(model).metadata_props:
        if p.key == META_PARAM_MAP:
            return json.loads(p.value)
    return {}
