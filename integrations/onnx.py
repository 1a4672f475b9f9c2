"""ONNX export and verification: does the pruned model survive export, and is it actually faster?

    res = export(model, example_inputs, "model.onnx", sparse_kernel="auto")   # masks baked on a copy
    rep = verify(res, model, inputs, batch_sizes=(1, 32), baseline=dense_model)
    print(rep.to_markdown()); rep.save("report")                              # report.md / report.json
    plot([rep], "latency.png")

What ONNX Runtime (CPU) does with pruned weights, measured and re-checked per model by :func:`verify`:

* masks in PyTorch change nothing at run time; a dense MatMul that holds 90% zeros costs the same as dense;
* ONNX ``sparse_initializer`` (COO) shrinks the *file*, but ORT densifies it at load (no speed change);
* ``com.microsoft:SparseToDenseMatMul`` (CSR) is a single-threaded kernel: it pays at batch 1 and very high
  sparsity only.  We rewrite ``MatMul(X, W)``/``Gemm`` into ``(W_csr · Xᵀ)ᵀ`` (``transB=1``, the fast layout).
  ORT does not accept a sparse tensor from an initializer, so the CSR arrays are stored in the file as plain
  initializers (``<w>__csr_values`` / ``__csr_indices`` / ``__csr_indptr`` / ``__csr_shape``) and fed as sparse graph inputs by
  :class:`OrtRunner`; a plain ``InferenceSession`` cannot run such a file on its own;
* structured pruning (channels/heads removed) is the route that is fast at every batch size.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from obs_plugins.errors import PruningInputError

MS_DOMAIN = "com.microsoft"
CSR_SUFFIXES = ("__csr_values", "__csr_indices", "__csr_indptr", "__csr_shape")
META_PARAM_MAP = "obs_plugins.param_map"
META_SPARSE = "obs_plugins.sparse_kernel"


class VerificationError(AssertionError):
    """The ONNX file does not reproduce the model (outputs or sparsity); the message says what and where."""


# ----------------------------------------------------------------------------------------------- masks


def _prune_hooks(module: nn.Module):
    return [h for h in module._forward_pre_hooks.values()
            if isinstance(h, prune.BasePruningMethod)]


def _hook_names(h) -> list[str]:
    return [h._tensor_name]     # a PruningContainer carries the same attribute as a single method


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every torch.nn.utils.prune mask baked in; ``model`` is not touched.

    After a forward pass in grad mode a pruned module's ``weight`` is a non-leaf tensor that ``deepcopy``
    refuses; we hand ``deepcopy`` detached stand-ins for those attributes through its memo (they are
    recomputed from ``<name>_orig * <name>_mask`` by ``prune.remove`` anyway).
    """
    memo = {}
    for m in model.modules():
        for h in _prune_hooks(m):
            for name in _hook_names(h):
                t = m.__dict__.get(name)
                if isinstance(t, torch.Tensor):
                    memo[id(t)] = t.detach().clone()
    with torch.no_grad():
        cp = copy.deepcopy(model, memo)
    for m in cp.modules():
        for h in _prune_hooks(m):
            for name in _hook_names(h):
                prune.remove(m, name)
    try:  # parametrizations (e.g. learned masks written as torch.nn.utils.parametrize)
        from torch.nn.utils import parametrize
        for m in cp.modules():
            if parametrize.is_parametrized(m):
                for name in list(m.parametrizations.keys()):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    except ImportError:  # pragma: no cover
        pass
    cp.eval()
    for p in cp.parameters():
        p.requires_grad_(False)
    return cp


def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as the model computes with them (``<name>_orig * <name>_mask`` for pruned ones); read-only."""
    sd = model.state_dict()
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


def _sparsity(a) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return float((a == 0).sum()) / max(a.size, 1)


def _hash(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- inputs


def _as_args(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        return (), {k: v for k, v in dict(inputs).items() if v is not None}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise PruningInputError(f"example_inputs: expected a tensor, a tuple of tensors or a dict, got {type(inputs)}")


def _auto_dynamic_shapes(args, kwargs):
    def spec(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        d = {0: "batch"}
        if t.dim() == 2 and not t.is_floating_point():  # token ids / masks: (batch, seq)
            d[1] = "seq"
        return d
    if kwargs:
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def _flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    res = []
    for o in out:
        res += _flatten_outputs(o) if not isinstance(o, torch.Tensor) else [o]
    return res


def _batched(inputs, b: int):
    """``inputs`` resized along dim 0 to ``b`` rows (rows repeated cyclically)."""
    def rs(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        idx = torch.arange(b) % t.shape[0]
        return t[idx].contiguous()
    args, kwargs = _as_args(inputs)
    if kwargs:
        return {k: rs(v) for k, v in kwargs.items()}
    return tuple(rs(a) for a in args)


def _feeds(runner: "OrtRunner", inputs) -> dict[str, np.ndarray]:
    args, kwargs = _as_args(inputs)
    names = runner.input_names
    if kwargs:
        missing = [n for n in names if n not in kwargs]
        if missing:
            raise PruningInputError(f"inputs: the ONNX model needs {missing}, got {sorted(kwargs)}")
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    if len(args) != len(names):
        raise PruningInputError(f"inputs: the ONNX model takes {len(names)} inputs {names}, got {len(args)}")
    return {n: a.detach().cpu().numpy() for n, a in zip(names, args)}


# ---------------------------------------------------------------------------------------------- export


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


def export(model: nn.Module, example_inputs, path, *, dynamic_shapes="auto", sparse_storage: bool = False,
           sparse_kernel: str = "auto", sparse_threshold: float = 0.8, opset: int | None = None,
           strip_value_info: bool = False, verbose: bool = False) -> ExportResult:
    """Bake masks on a copy of ``model`` and export it with ``torch.onnx.export(..., dynamo=True)``.

    ``example_inputs``: a tensor, a tuple of positional tensors, or a dict of keyword tensors (Hugging Face
    style; use a batch of at least 2 so the batch dimension stays dynamic).  ``dynamic_shapes="auto"`` makes
    dim 0 of every input dynamic (and dim 1 of integer 2-D inputs: token ids); ``None`` exports static shapes.
    ``sparse_storage``: write weights as ONNX ``sparse_initializer`` (COO) where that makes the file smaller
    (ORT densifies them at load: size only, no speed).  ``sparse_kernel``: ``"off"``, ``"auto"`` (rewrite
    MatMul/Gemm whose weight is at least ``sparse_threshold`` zeros into ``com.microsoft:SparseToDenseMatMul``,
    written beside ``path`` as ``<stem>.sparse.onnx``) or ``"on"`` (every weight with any zeros).
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
    t0 = time.perf_counter()
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    args, kwargs = _as_args(example_inputs)
    first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise PruningInputError("example_inputs: no tensor given")
    if dynamic_shapes == "auto" and first.dim() > 0 and first.shape[0] == 1:
        # torch.export specialises size-1 dims: trace with 2 rows so the batch dim stays dynamic
        args, kwargs = _as_args(_batched(example_inputs, 2))
    cp = baked_copy(model)
    if hasattr(getattr(cp, "config", None), "use_cache"):
        cp.config.use_cache = False
    ds = _auto_dynamic_shapes(args, kwargs) if dynamic_shapes == "auto" else dynamic_shapes
    kw = {} if opset is None else {"opset_version": opset}
    import warnings
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(cp, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=ds,
                                 verbose=verbose, external_data=False, **kw)
    proto = prog.model_proto
    if strip_value_info:
        del proto.graph.value_info[:]
    pmap = _param_map(proto, effective_weights(cp))
    proto.metadata_props.add(key=META_PARAM_MAP, value=json.dumps(pmap))
    kernel_path, rewritten = None, []
    if sparse_kernel != "off":
        thr = sparse_threshold if sparse_kernel == "auto" else 1e-9
        sp_proto, rewritten = rewrite_sparse_kernel(proto, threshold=thr)
        if rewritten:
            kernel_path = str(Path(path).with_suffix("")) + ".sparse.onnx"
            onnx.save(sp_proto, kernel_path)
    stored = []
    if sparse_storage:
        proto, stored = to_sparse_storage(proto)
    onnx.save(proto, path)
    del cp
    return ExportResult(path, kernel_path, rewritten, pmap, stored, os.path.getsize(path),
                        time.perf_counter() - t0)


def _param_map(proto, weights: dict[str, torch.Tensor]) -> dict[str, list]:
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
        if init.data_type != 1 or len(init.dims) == 0:
            continue
        a = numpy_helper.to_array(init)
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
            if _sparsity(a) > min_sparsity:
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


def _csr(a: np.ndarray):
    rows, cols = np.nonzero(a)
    values = a[rows, cols].astype(np.float32)
    indptr = np.zeros(a.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=a.shape[0]), out=indptr[1:])
    return values, cols.astype(np.int64), indptr


def rewrite_sparse_kernel(proto, threshold: float = 0.8):
    """``MatMul(X, W)`` / ``Gemm(X, W, b)`` with a constant 2-D weight at least ``threshold`` zeros ->
    ``Transpose(SparseToDenseMatMul(Wᵀ_csr, X2d, transB=1))`` (reshaped back for N-D ``X``).

    com.microsoft SparseToDenseMatMul computes ``op(A)·op(B)`` with ``A`` sparse; with ``A = Wᵀ`` (out×in,
    CSR) and ``B = X`` under ``transB=1`` it gives ``(X·W)ᵀ``: the layout that is fast in ORT 1.32.
    Returns ``(new_proto, rewritten_initializer_names)`` (``new_proto`` is the input itself when nothing
    qualifies); the original is not modified.
    """
    from onnx import TensorProto, helper, numpy_helper
    g = proto.graph                     # read only until something qualifies; then a copy is edited
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    new_nodes, rewritten, new_inputs, new_inits = [], [], [], []
    done = {}
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm") or n.domain not in ("", "ai.onnx"):
            new_nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gemm" and attrs.get("transA", 0):
            new_nodes.append(n)
            continue
        wname = n.input[1]
        trans = bool(attrs.get("transB", 0)) if n.op_type == "Gemm" else False
        src = wname
        if wname not in inits and wname in producers and producers[wname].op_type == "Transpose":
            tp = producers[wname]
            perm = [helper.get_attribute_value(a) for a in tp.attribute if a.name == "perm"]
            if tp.input[0] in inits and (not perm or list(perm[0]) == [1, 0]):
                src, trans = tp.input[0], not trans
        if src not in inits or len(inits[src].dims) != 2 or inits[src].data_type != TensorProto.FLOAT:
            new_nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[src])
        a = w if trans else w.T          # A = op(B)ᵀ: out × in
        if _sparsity(a) < threshold or _sparsity(a) == 0.0 or not a.any():   # ORT rejects an empty CSR
            new_nodes.append(n)
            continue
        key = (src, trans)
        if key not in done:
            sname = f"{src}{'_T' if not trans else ''}__sparse"
            vals, idx, ptr = _csr(np.ascontiguousarray(a))
            shape = np.array(a.shape, dtype=np.int64)
            for suf, arr in zip(CSR_SUFFIXES, (vals, idx, ptr, shape)):
                new_inits.append(numpy_helper.from_array(arr, sname + suf))
            # symbolic dims: ORT's shape inference for this op ignores transB and would derive wrong concrete
            # shapes from concrete ones (the real shape is in the CSR arrays and checked by the kernel)
            new_inputs.append(helper.make_sparse_tensor_value_info(sname, TensorProto.FLOAT,
                                                                   [sname + "_rows", sname + "_cols"]))
            done[key] = sname
            rewritten.append(src)
        sname = done[key]
        out_f = a.shape[0]
        x, y = n.input[0], n.output[0]
        p = f"{y}__sp"
        alpha = float(attrs.get("alpha", 1.0)) if n.op_type == "Gemm" else 1.0
        in_f = a.shape[1]
        out_last = numpy_helper.from_array(np.array([out_f], dtype=np.int64), p + "_outlast")
        new_inits += [out_last]
        # Flatten (not Reshape to [-1, in]): ORT's shape inference for SparseToDenseMatMul ignores transB and
        # would turn a known element count into wrong concrete shapes downstream
        new_nodes += [
            helper.make_node("Flatten", [x], [p + "_x2d"], axis=-1),
            helper.make_node("SparseToDenseMatMul", [sname, p + "_x2d"], [p + "_yt"], name=p + "_spmm", domain=MS_DOMAIN,
                             transB=1, alpha=alpha),
            helper.make_node("Transpose", [p + "_yt"], [p + "_y2d"], perm=[1, 0]),
        ]
        cur = p + "_y2d"
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
            c = n.input[2]
            beta = float(attrs.get("beta", 1.0))
            if beta != 1.0:
                bt = numpy_helper.from_array(np.array(beta, dtype=np.float32), p + "_beta")
                new_inits.append(bt)
                new_nodes.append(helper.make_node("Mul", [c, bt.name], [p + "_c"]))
                c = p + "_c"
            new_nodes.append(helper.make_node("Add", [cur, c], [p + "_yb"]))
            cur = p + "_yb"
        new_nodes += [
            helper.make_node("Shape", [x], [p + "_lead"], end=-1),
            helper.make_node("Concat", [p + "_lead", out_last.name], [p + "_oshape"], axis=0),
            helper.make_node("Reshape", [cur, p + "_oshape"], [y]),
        ]
    if not rewritten:
        return proto, []
    proto = copy.deepcopy(proto)        # new_nodes still refer to the original's nodes: extend() copies them
    g = proto.graph
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    # drop Transpose producers and initializers nobody reads any more
    changed = True
    while changed:
        changed = False
        keep = []
        for n in g.node:
            if n.op_type == "Transpose" and all(o not in used and o not in {v.name for v in g.output}
                                                 for o in n.output):
                changed = True
                continue
            keep.append(n)
        if changed:
            del g.node[:]
            g.node.extend(keep)
            used = {i for n in g.node for i in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits + new_inits)
    g.input.extend(new_inputs)
    del g.value_info[:]     # stale intermediate shapes; ORT re-infers
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    proto.metadata_props.add(key=META_SPARSE, value=json.dumps(rewritten))
    return proto, rewritten


# ---------------------------------------------------------------------------------------------- runtime


class OrtRunner:
    """An ONNX Runtime CPU session with pinned threads; feeds the CSR weights of a sparse-kernel rewrite."""

    def __init__(self, path, threads: int = 1, optimize: bool = True, arena: bool = True):
        import onnx
        import onnxruntime as ort
        from onnx import numpy_helper
        self.path = str(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = arena      # False: give activation memory back after each run (big models)
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        m = onnx.load(self.path)
        inits = {i.name: i for i in m.graph.initializer}
        self._sparse, self._keep = {}, []
        dev = ort.OrtDevice.make("cpu", 0)
        for vi in m.graph.input:
            if vi.type.HasField("sparse_tensor_type"):
                parts = [numpy_helper.to_array(inits[vi.name + s]) for s in CSR_SUFFIXES]
                vals, idx, ptr, shape = (np.ascontiguousarray(p) for p in parts)
                self._keep += [vals, idx, ptr, shape]
                st = ort.SparseTensor.sparse_csr_from_numpy(shape, vals, idx, ptr, dev)
                self._sparse[vi.name] = ort.OrtValue.ort_value_from_sparse_tensor(st)
        self.input_names = [vi.name for vi in m.graph.input if vi.name not in self._sparse]
        self.output_names = [o.name for o in m.graph.output]
        del m, inits
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self._ort = ort

    @property
    def sparse_kernel(self) -> bool:
        return bool(self._sparse)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self._sparse:
            return self.session.run(None, feeds)
        vals = {k: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        vals.update(self._sparse)
        return [o.numpy() for o in self.session.run_with_ort_values(self.output_names, vals)]


def _load(model):
    """An ``onnx.ModelProto`` as given, or loaded from a path."""
    import onnx
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def onnx_weight_sparsity(model) -> dict[str, dict]:
    """Per-initializer zeros in an ONNX file or ModelProto (dense, COO ``sparse_initializer`` and our CSR
    triplets)."""
    import onnx
    from onnx import numpy_helper
    m = _load(model)
    out = {}
    inits = {i.name: i for i in m.graph.initializer}
    for i in m.graph.initializer:
        if i.name.endswith(CSR_SUFFIXES):
            continue
        if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 1:
            a = numpy_helper.to_array(i)
            out[i.name] = {"shape": list(a.shape), "sparsity": _sparsity(a), "storage": "dense"}
    for s in m.graph.sparse_initializer:
        size = int(np.prod(s.dims))
        nnz = int(np.count_nonzero(numpy_helper.to_array(s.values)))
        out[s.values.name] = {"shape": list(s.dims), "sparsity": 1 - nnz / size, "storage": "coo"}
    for vi in m.graph.input:
        if vi.type.HasField("sparse_tensor_type") and vi.name + CSR_SUFFIXES[0] in inits:
            shape = [int(d) for d in numpy_helper.to_array(inits[vi.name + CSR_SUFFIXES[3]])]
            vals = numpy_helper.to_array(inits[vi.name + CSR_SUFFIXES[0]])
            out[vi.name] = {"shape": shape, "sparsity": 1 - np.count_nonzero(vals) / int(np.prod(shape)),
                            "storage": "csr"}
    return out


def _param_map_of(model) -> dict:
    for p in _load(model).metadata_props:
        if p.key == META_PARAM_MAP:
            return json.loads(p.value)
    return {}


def _sparse_map_names(name: str) -> str:
    return name[: -len("__sparse")].removesuffix("_T") if name.endswith("__sparse") else name


# ---------------------------------------------------------------------------------------------- verify


def _time_routes(runners: dict, feeds: dict, runs: int, warmup: int,
                 budget_s: float | None = None) -> dict[str, list[float]]:
    """Interleaved A/B timing (order rotated each repetition) so shared-CPU contention hits every route alike.
    ``budget_s``: stop after this many seconds of timed repetitions (at least 3 are always run)."""
    names = list(runners)
    t_start = None
    for _ in range(warmup):
        for n in names:
            runners[n].run(feeds[n])
    times = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(runs):
        if budget_s is not None and r >= 3 and time.perf_counter() - t_start > budget_s:
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t = time.perf_counter()
            runners[n].run(feeds[n])
            times[n].append((time.perf_counter() - t) * 1e3)
    return times


def _stats(ts) -> dict:
    a = np.asarray(ts)
    return {"median_ms": float(np.median(a)), "q25_ms": float(np.percentile(a, 25)),
            "q75_ms": float(np.percentile(a, 75)), "runs": len(a)}


@dataclasses.dataclass
class Report:
    ok: bool
    outputs: list[dict]
    sparsity: list[dict]
    latency: dict          # batch -> route -> stats (+ speedup)
    best: dict             # batch -> {"route", "speedup", "verdict"}
    info: dict

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)

    def to_markdown(self) -> str:
        i = self.info
        lines = [f"## ONNX verification: {i.get('path')}", "",
                 f"Outputs {'match' if self.ok else 'DO NOT match'} PyTorch "
                 f"(atol {i['atol']:g}, rtol {i['rtol']:g}); ORT {i['ort_version']}, "
                 f"{i['threads']} intra-op thread(s), up to {i['runs']} interleaved runs after {i['warmup']} warm-up.", "",
                 "| route | output | max abs err | max rel err | ok |", "|---|---|---|---|---|"]
        for o in self.outputs:
            lines.append(f"| {o['route']} | {o['index']} {tuple(o['shape'])} | {o['max_abs']:.2e} | "
                         f"{o['max_rel']:.2e} | {'yes' if o['ok'] else 'NO'} |")
        sp = [s for s in self.sparsity if s["model_sparsity"] > 0.001]
        if sp:
            lines += ["", f"Sparsity of {len(sp)} pruned weights (model → ONNX): mean "
                      f"{np.mean([s['model_sparsity'] for s in sp]):.1%} → "
                      f"{np.mean([s['onnx_sparsity'] for s in sp if s['onnx_sparsity'] is not None] or [0]):.1%}; "
                      f"survived: {'yes' if all(s['ok'] for s in sp) else 'NO'}."]
        lines += ["", "| batch | route | median ms | IQR ms | speedup vs " + i["baseline_route"] + " |",
                  "|---|---|---|---|---|"]
        for b, routes in self.latency.items():
            for r, s in routes.items():
                lines.append(f"| {b} | {r} | {s['median_ms']:.2f} | {s['q25_ms']:.2f}–{s['q75_ms']:.2f} | "
                             f"{s['speedup']:.2f}× |")
        lines.append("")
        for b, v in self.best.items():
            lines.append(f"- batch {b}: {v['verdict']}")
        return "\n".join(lines) + "\n"

    def save(self, stem) -> tuple[str, str]:
        stem = str(stem)
        for suf in (".md", ".json"):
            stem = stem.removesuffix(suf)
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".md", "w") as f:
            f.write(self.to_markdown())
        with open(stem + ".json", "w") as f:
            f.write(self.to_json())
        return stem + ".md", stem + ".json"


def _check_outputs(route, got, ref, atol, rtol) -> list[dict]:
    rows = []
    if len(got) < len(ref):
        raise VerificationError(f"{route}: the ONNX model returns {len(got)} outputs, PyTorch {len(ref)}; "
                                "the file was exported from a different model")
    for k, (g, r) in enumerate(zip(got, ref)):
        r = r.detach().cpu().float().numpy()
        g = np.asarray(g, dtype=np.float32)
        if g.shape != r.shape:
            raise VerificationError(f"{route}: output {k} has shape {g.shape} in ONNX but {r.shape} in PyTorch; "
                                    "the file was exported from a different model (or with other sizes)")
        err = np.abs(g - r)
        rel = err / np.maximum(np.abs(r), 1e-6)
        bad = err > atol + rtol * np.abs(r)
        ok = bool(not bad.any() and np.isfinite(g).all())
        row = {"route": route, "index": k, "shape": list(r.shape), "max_abs": float(err.max(initial=0)),
               "max_rel": float(np.where(np.abs(r) > atol, rel, 0).max(initial=0)), "ok": ok}
        if not ok:
            j = np.unravel_index(int(np.argmax(np.where(np.isfinite(err), err, np.inf))), err.shape)
            row["worst"] = {"index": [int(x) for x in j], "onnx": float(g[j]), "torch": float(r[j]),
                            "bad_fraction": float(bad.mean())}
        rows.append(row)
    return rows


def verify(onnx_path, model: nn.Module, inputs, *, batch_sizes=None, baseline=None, sparse_kernel_path="auto",
           atol: float = 1e-4, rtol: float = 1e-3, runs: int = 30, warmup: int = 3, threads: int = 1,
           min_speedup: float = 1.05, raise_on_fail: bool = True, bench: bool = True,
           budget_s: float | None = None) -> Report:
    """Check an exported file against ``model`` and time ONNX Runtime routes.

    * outputs: ORT vs PyTorch on ``inputs`` (every route), max abs/rel error; ``|onnx - torch| <= atol +
      rtol·|torch|`` elementwise or :class:`VerificationError` (when ``raise_on_fail``);
    * sparsity: zeros of every pruned model weight vs its ONNX initializer (must not drop);
    * latency at each of ``batch_sizes`` (default: the batch of ``inputs``; rows repeated to size): routes
      ``dense`` (``baseline``: the unpruned nn.Module or its ONNX file, if given), ``pruned`` (the file, dense
      kernels) and ``sparse-kernel`` (the SparseToDenseMatMul rewrite, if there is one); warm-up, ``runs``
      interleaved repetitions (fewer, but at least 3, once ``budget_s`` seconds per batch size are spent),
      median and IQR, ``threads`` intra-op threads.  The fastest route is named only
      if it beats the baseline by ``min_speedup`` with non-overlapping IQRs; otherwise the verdict says why not.
    """
    import onnxruntime as ort
    if isinstance(onnx_path, ExportResult):
        if sparse_kernel_path == "auto":
            sparse_kernel_path = onnx_path.sparse_kernel_path
        onnx_path = onnx_path.path
    onnx_path = str(onnx_path)
    if not os.path.exists(onnx_path):
        raise PruningInputError(f"onnx_path: {onnx_path} does not exist")
    if sparse_kernel_path == "auto":
        cand = str(Path(onnx_path).with_suffix("")) + ".sparse.onnx"
        sparse_kernel_path = cand if os.path.exists(cand) else None
    if runs < 1 or warmup < 0 or threads < 1:
        raise PruningInputError("runs/warmup/threads: need runs >= 1, warmup >= 0, threads >= 1")
    args, kwargs = _as_args(inputs)
    b0 = next(t.shape[0] for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor))
    batch_sizes = list(batch_sizes or [b0])
    runners = {"pruned": OrtRunner(onnx_path, threads)}
    if sparse_kernel_path:
        runners["sparse-kernel"] = OrtRunner(sparse_kernel_path, threads)

    # ---- outputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _flatten_outputs(model(*args, **kwargs))
    finally:
        model.train(was_training)
    outputs, failures = [], []
    for name, rn in runners.items():
        rows = _check_outputs(name, rn.run(_feeds(rn, inputs)), ref, atol, rtol)
        outputs += rows
        for r in rows:
            if not r["ok"]:
                w = r["worst"]
                failures.append(
                    f"{name}: output {r['index']} {tuple(r['shape'])} differs from PyTorch: max abs error "
                    f"{r['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|torch| ({w['bad_fraction']:.1%} of "
                    f"entries; worst at {tuple(w['index'])}: onnx {w['onnx']:.6g} vs torch {w['torch']:.6g})")
    # ---- sparsity
    eff = effective_weights(model)
    proto = _load(onnx_path)            # read once for the sparsity and the parameter map
    onnx_sp, pmap = onnx_weight_sparsity(proto), _param_map_of(proto)
    del proto
    if sparse_kernel_path:
        for k, v in onnx_weight_sparsity(sparse_kernel_path).items():
            if v["storage"] == "csr":
                onnx_sp.setdefault(_sparse_map_names(k), v)
    by_param = {}
    for oname, (pname, _tr) in pmap.items():
        if oname in onnx_sp:
            by_param.setdefault(pname, []).append((oname, onnx_sp[oname]["sparsity"]))
    sparsity = []
    for pname, w in eff.items():
        if w.dim() < 2:
            continue
        ms = _sparsity(w)
        hits = by_param.get(pname, [])
        if not hits and pname in onnx_sp:
            hits = [(pname, onnx_sp[pname]["sparsity"])]
        if not hits and ms <= 0.001:
            continue
        osp = min((h[1] for h in hits), default=None)
        ok = osp is not None and osp >= ms - 1e-6
        sparsity.append({"param": pname, "onnx": [h[0] for h in hits], "model_sparsity": ms, "onnx_sparsity": osp,
                         "ok": ok})
        if not ok:
            failures.append(
                f"sparsity did not survive for {pname!r}: {ms:.1%} zeros in the model, " +
                ("no ONNX initializer holds this weight (the file was exported from a different model, or the "
                 "model changed after export)" if osp is None else f"{osp:.1%} in ONNX initializer {hits[0][0]!r}"))
    # ---- latency
    routes = dict(runners)
    base_name = "pruned"
    tmp = None
    if baseline is not None:
        if isinstance(baseline, nn.Module):
            tmp = tempfile.TemporaryDirectory()
            bpath = os.path.join(tmp.name, "dense.onnx")
            export(baseline, _batched(inputs, max(b0, 2)), bpath, sparse_kernel="off")
        else:
            bpath = str(baseline)
        routes = {"dense": OrtRunner(bpath, threads), **runners}
        base_name = "dense"
    latency, best = {}, {}
    mean_sp = float(np.mean([s["model_sparsity"] for s in sparsity])) if sparsity else 0.0
    for b in (batch_sizes if bench else []):
        binp = _batched(inputs, b)
        feeds = {n: _feeds(r, binp) for n, r in routes.items()}
        times = _time_routes(routes, feeds, runs, warmup, budget_s)
        st = {n: _stats(t) for n, t in times.items()}
        for n in st:
            st[n]["speedup"] = st[base_name]["median_ms"] / st[n]["median_ms"]
        latency[b] = st
        best[b] = _verdict(b, st, base_name, min_speedup, mean_sp, bool(sparse_kernel_path), baseline is not None)
    if tmp is not None:
        tmp.cleanup()
    info = {"path": onnx_path, "sparse_kernel_path": sparse_kernel_path, "atol": atol, "rtol": rtol,
            "runs": runs, "warmup": warmup, "budget_s": budget_s, "threads": threads, "ort_version": ort.__version__,
            "baseline_route": base_name, "failures": failures, "mean_pruned_sparsity": mean_sp,
            "file_bytes": os.path.getsize(onnx_path)}
    rep = Report(not failures, outputs, sparsity, latency, best, info)
    if failures and raise_on_fail:
        raise VerificationError("ONNX verification failed:\n  " + "\n  ".join(failures))
    return rep


def _verdict(b, st, base, min_speedup, mean_sp, has_kernel, has_baseline) -> dict:
    bs = st[base]
    if min(s["runs"] for s in st.values()) < 3:
        return {"route": base, "speedup": 1.0,
                "verdict": f"too few timed runs ({min(s['runs'] for s in st.values())}) to call any route faster "
                           f"than {base}; use runs >= 3."}
    wins = [n for n in st if n != base and st[n]["speedup"] >= min_speedup and st[n]["q75_ms"] < bs["q25_ms"]]
    if wins:
        n = max(wins, key=lambda k: st[k]["speedup"])
        return {"route": n, "speedup": st[n]["speedup"],
                "verdict": f"fastest route: {n}, {st[n]['speedup']:.2f}× faster than {base} "
                           f"({st[n]['median_ms']:.2f} vs {bs['median_ms']:.2f} ms median)."}
    fastest = min(st, key=lambda k: st[k]["median_ms"])
    if mean_sp > 0.001:
        why = (f"unstructured sparsity ({mean_sp:.0%} of the pruned weights) at batch {b}: ORT has no fast kernel "
               "for it (a dense MatMul holding zeros costs the same; SparseToDenseMatMul is a single-threaded CSR "
               "kernel that pays only for few input rows and very high sparsity); use structured pruning"
               + (" or batch 1" if b > 1 else ""))
        if not has_kernel:
            why += " (no weight reached the sparse-kernel threshold, so that route was not tried)"
    elif has_baseline:
        why = "the pruned model does no less work in ORT than the dense one (too little was removed, or the " \
              "removed part is not on the critical path)"
    else:
        why = "no dense baseline given and no sparse-kernel route: nothing to compare (pass baseline=)"
    extra = "" if fastest == base else (f" ({fastest} measured {st[fastest]['speedup']:.2f}×, within noise: "
                                        f"IQRs overlap or < {min_speedup:.2f}×)")
    return {"route": base, "speedup": 1.0, "verdict": f"no route is faster than {base}{extra}: {why}."}


# ---------------------------------------------------------------------------------------------- plot


def plot(reports, path, *, labels=None, title: str = "ONNX Runtime latency vs sparsity") -> str:
    """Latency (median, IQR bars) vs mean pruned sparsity, one line per route and batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    reports = list(reports)
    pts = {}
    for rep in reports:
        d = rep.to_dict() if isinstance(rep, Report) else rep
        x = d.get("info", {}).get("x", d["info"].get("mean_pruned_sparsity", 0.0))
        for b, routes in d["latency"].items():
            for r, s in routes.items():
                pts.setdefault((str(b), r), []).append((x, s["median_ms"], s["q25_ms"], s["q75_ms"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (b, r), p in sorted(pts.items()):
        p.sort()
        xs, m, lo, hi = map(np.array, zip(*p))
        ax.errorbar(xs, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=f"{r}, batch {b}")
    ax.set_xlabel("sparsity of the pruned weights")
    ax.set_ylabel("latency, median ms (IQR bars)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------- CLI


def add_export_arguments(p) -> None:
    p.add_argument("output", nargs="?", default="obs_export/model.onnx", help="ONNX file to write")
    p.add_argument("--model", default="minilm", choices=["minilm", "smollm2"], help="packaged model (default minilm)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of Linear weights to prune (default 0.5)")
    p.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "obs_iht"],
                   help="pruning method (wanda / obs_iht calibrate on Shakespeare windows; obs_iht runs one "
                        "iteration; default magnitude)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="batch sizes to time (default 1 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--sparse-kernel", default="auto", choices=["auto", "on", "off"],
                   help="rewrite sparse MatMuls to com.microsoft SparseToDenseMatMul (auto: weights >= 80%% zeros)")
    p.add_argument("--sparse-storage", action="store_true", help="store sparse weights as COO (smaller file)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per route and batch (default 20)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timing per batch size; fewer runs (>= 3) once spent (default 60)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--atol", type=float, default=5e-3,
                   help="output tolerance, abs (default 5e-3: fp32 through 30 SmolLM2 blocks drifts ~2e-3)")
    p.add_argument("--report", help="write the report here (.md and .json beside it)")


def _calib_batches(tok, n=8, seq_len=128):
    from obs_plugins.data import load_shakespeare, token_windows
    ids = token_windows(tok, load_shakespeare()[:400_000], n, seq_len)
    return [ids[i:i + 2] for i in range(0, n, 2)]


def run_export_cli(args) -> int:
    import obs_plugins
    from obs_plugins import api
    from obs_plugins.data import load_minilm, load_smollm2
    from obs_plugins.registry import get_method
    try:
        if not 0.0 <= args.sparsity < 1.0:
            raise PruningInputError(f"--sparsity: expected a fraction in [0, 1), got {args.sparsity}")
        if any(b < 1 for b in args.batch_sizes):
            raise PruningInputError(f"--batch-sizes: must be positive, got {args.batch_sizes}")
        if args.seq_len < 2:
            raise PruningInputError(f"--seq-len: must be >= 2, got {args.seq_len}")
        torch.manual_seed(0)
        model, tok = load_minilm() if args.model == "minilm" else load_smollm2()
        model.eval()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        dense = copy.deepcopy(model)
        targets = obs_plugins.prunable_linear_targets(model)
        if args.sparsity > 0:
            spec = get_method(args.method)   # the registry: the same names as `obs-prune prune --method`
            # OBS-IHT's further iterations need a task loss; the export CLI calibrates on plain forwards
            cfg = spec.config_cls(iterations=1, progress=False) if spec.name == "obs_iht" else spec.config_cls()
            curv = None
            if spec.name != "magnitude":
                from obs_plugins.curvature import Curvature
                curv = Curvature.layerwise(model, [(t.module, t.name) for t in targets],
                                           _calib_batches(tok, seq_len=args.seq_len),
                                           forward_fn=lambda m, b: m(input_ids=b), progress=False)
            api.prune(cfg, curvature=curv, targets=targets, amount=args.sparsity, reparametrize=True)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, min(tok.vocab_size, 20000), (2, args.seq_len), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        res = export(model, inputs, args.output, sparse_kernel=args.sparse_kernel,
                     sparse_storage=args.sparse_storage)
        print(f"exported {res.path} ({res.file_bytes / 1e6:.1f} MB, {res.seconds:.0f} s)"
              + (f"; sparse-kernel rewrite of {len(res.rewritten)} weights: {res.sparse_kernel_path}"
                 if res.sparse_kernel_path else ""))
        rep = verify(res, model, inputs, batch_sizes=args.batch_sizes, baseline=dense, runs=args.runs,
                     threads=args.threads, raise_on_fail=False, budget_s=args.budget, atol=args.atol)
    except PruningInputError as e:
        print(f"obs-prune export: {e}", file=_stderr())
        return 2
    print(rep.to_markdown())
    if args.report:
        md, js = rep.save(args.report)
        print(f"report: {md}, {js}")
    if not rep.ok:
        print("obs-prune export: VERIFICATION FAILED:\n  " + "\n  ".join(rep.info["failures"]), file=_stderr())
        return 1
    return 0


def _stderr():
    import sys
    return sys.stderr


__all__ = ["export", "verify", "plot", "baked_copy", "rewrite_sparse_kernel", "to_sparse_storage", "OrtRunner",
           "onnx_weight_sparsity", "ExportResult", "Report", "VerificationError", "add_export_arguments",
           "run_export_cli"]
