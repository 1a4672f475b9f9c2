"""Step 5 of the flow: does the file reproduce the model (outputs, sparsity), and is any route faster?"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from torch import nn

from obs_plugins.curvature.batching import move, named_failure
from obs_plugins.curvature.collect import eval_mode
from obs_plugins.errors import PruningInputError
from obs_plugins.timing import latency_stats, speedup

from .bake import effective_weights, zero_fraction
from .export import FLOAT_TYPES, ExportResult, _hash, export, load_proto, param_map_of, sparse_kernel_of
from .inputs import as_args, first_tensor, flatten_outputs, repeat_to_batch
from .report import Report, route_verdict
from .rewrite import CSR_SUFFIXES, sparse_input_stem
from .runtime import OrtRunner, time_runners


class VerificationError(AssertionError):
    """The ONNX file does not reproduce the model (outputs or sparsity); the message says what and where."""


def onnx_weight_sparsity(model) -> dict[str, dict]:
    """Per-initializer zeros in an ONNX file or ModelProto (dense, COO ``sparse_initializer`` and our CSR
    triplets)."""
    from onnx import numpy_helper
    m = load_proto(model)
    out = {}
    inits = {i.name: i for i in m.graph.initializer}
    for i in m.graph.initializer:
        if i.name.endswith(CSR_SUFFIXES):
            continue
        if i.data_type in FLOAT_TYPES and len(i.dims) >= 1:
            a = numpy_helper.to_array(i).astype(np.float32)
            out[i.name] = {"shape": list(a.shape), "sparsity": zero_fraction(a), "storage": "dense"}
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


def check_outputs(route, got, ref, atol, rtol, token_mask=None, per_token=None) -> list[dict]:
    """Each output of ``got`` (ONNX) against ``ref`` (PyTorch), elementwise ``|g - r| <= atol + rtol·|r|``.
    ``token_mask`` (batch, tokens) bool: an output whose leading dims are those is compared at the real tokens
    only (a padded query row attends to nothing, and what a kernel writes there differs between runtimes);
    ``per_token`` (one bool per output, from the ONNX dim names): only those outputs, so a (batch, hidden)
    output whose hidden size equals the token count is still compared everywhere."""
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
        sel = None
        if token_mask is not None and r.ndim >= 2 and tuple(r.shape[:2]) == token_mask.shape \
                and not token_mask.all() and (per_token is None or (k < len(per_token) and per_token[k])):
            sel = np.broadcast_to(token_mask.reshape(token_mask.shape + (1,) * (r.ndim - 2)), r.shape)
            g, r = np.where(sel, g, 0.0), np.where(sel, r, 0.0)
        err = np.abs(g - r)
        rel = err / np.maximum(np.abs(r), 1e-6)
        bad = err > atol + rtol * np.abs(r)
        ok = bool(not bad.any() and np.isfinite(g).all())
        row = {"route": route, "index": k, "shape": list(r.shape), "max_abs": float(err.max(initial=0)),
               "max_rel": float(np.where(np.abs(r) > atol, rel, 0).max(initial=0)), "ok": ok}
        if sel is not None:
            row["padded_positions_ignored"] = int(np.count_nonzero(~token_mask))
        if not ok:
            j = np.unravel_index(int(np.argmax(np.where(np.isfinite(err), err, np.inf))), err.shape)
            row["worst"] = {"index": [int(x) for x in j], "onnx": float(g[j]), "torch": float(r[j]),
                            "bad_fraction": float(bad.mean())}
        rows.append(row)
    return rows


def layer_weight_names(model: nn.Module) -> set[str]:
    """State-dict names of the weights pruning acts on (Linear, Conv2d, Hugging Face Conv1D): what the report
    calls the pruned weights (an embedding's zero padding row is not pruning)."""
    from torch.nn.utils import parametrize, prune

    from obs_plugins.targets import is_hf_conv1d
    names = {f"{n}.weight" if n else "weight" for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_hf_conv1d(m)}
    for n, m in model.named_modules():   # whatever else carries a pruning mask (MultiheadAttention.in_proj_weight)
        p = f"{n}." if n else ""
        names |= {p + h._tensor_name for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)}
        if parametrize.is_parametrized(m):
            names |= {p + k for k in m.parametrizations.keys()}
    return names


def check_sparsity(model: nn.Module, onnx_path, sparse_kernel_path=None) -> tuple[list[dict], list[str]]:
    """Zeros of every pruned (2-D) weight of ``model`` vs the ONNX initializer that holds it (through the
    parameter map :func:`export` wrote; the CSR arrays of the sparse-kernel file count too): one row per weight,
    and a message for every weight whose zeros did not survive."""
    failures = []
    eff = effective_weights(model)
    proto = load_proto(onnx_path)            # read once for the sparsity and the parameter map
    onnx_sp, pmap = onnx_weight_sparsity(proto), param_map_of(proto)
    del proto
    csr = {}
    if sparse_kernel_path:
        for k, v in onnx_weight_sparsity(sparse_kernel_path).items():
            if v["storage"] == "csr":
                csr[sparse_input_stem(k)] = v
    by_param = {}
    for oname, (pname, _tr) in pmap.items():
        if oname in onnx_sp:
            by_param.setdefault(pname, []).append((oname, onnx_sp[oname]["sparsity"]))
        if oname in csr:   # the sparse-kernel file's CSR arrays must keep the zeros too
            by_param.setdefault(pname, []).append((f"{oname} (CSR, {os.path.basename(str(sparse_kernel_path))})",
                                                   csr[oname]["sparsity"]))
    # the parameter map keeps one name per value: a weight shared by two modules (or equal to another) is held
    # by the initializer its twin maps to
    value = {pname: _hash(w.detach().cpu().float().numpy()) for pname, w in eff.items() if w.dim() >= 2}
    by_value = {}
    for pname, hits in by_param.items():
        if pname in value:
            by_value.setdefault(value[pname], hits)
    layers = layer_weight_names(model)
    sparsity = []
    for pname, w in eff.items():
        if w.dim() < 2:
            continue
        ms = zero_fraction(w)
        hits = by_param.get(pname, [])
        if not hits and pname in onnx_sp:
            hits = [(pname, onnx_sp[pname]["sparsity"])]
        if not hits:
            hits = by_value.get(value[pname], [])
        if not hits and ms <= 0.001:
            continue
        osp = min((h[1] for h in hits), default=None)
        ok = osp is not None and osp >= ms - 1e-6
        sparsity.append({"param": pname, "onnx": [h[0] for h in hits], "model_sparsity": ms, "onnx_sparsity": osp,
                         "ok": ok, "layer": pname in layers, "numel": w.numel()})
        if not ok:
            failures.append(
                f"sparsity did not survive for {pname!r}: {ms:.1%} zeros in the model, " +
                ("no ONNX initializer holds this weight as it is, so its zeros cannot be checked (the exporter may "
                 "have folded it into another constant, e.g. W * scale; or the file comes from a different model, "
                 "or the model changed after export)" if osp is None
                 else f"{osp:.1%} in ONNX initializer {min(hits, key=lambda h: h[1])[0]!r}"))
    return sparsity, failures


def check_runtime_dtype(model: nn.Module, arg: str = "model") -> None:
    """Refuse, naming ``arg``, a model ONNX Runtime's CPU provider cannot run: with bfloat16 weights it has no
    kernel for the graph's MatMul / Mul nodes (the file exports, the session fails)."""
    bf16 = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    if bf16:
        raise PruningInputError(
            f"{arg}: {len(bf16)} bfloat16 weights ({bf16[0]!r}, ...): ONNX Runtime's CPU provider has no bfloat16 "
            "kernels, so the exported file cannot be run, verified or timed there; export and verify a float32 "
            "copy (copy.deepcopy(model).float()) -- float16 and float32 files run")


def check_tolerances(atol, rtol, where: str = "") -> None:
    """``atol`` / ``rtol``: numbers >= 0, or None for the output dtype's default; refused naming ``where`` + the
    argument."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise PruningInputError(f"{where}{name}: a tolerance >= 0 (or None for the dtype's default), got {v!r}")


LOW_PRECISION_TOLERANCES = (1e-3, 1e-2)   # float16 outputs: one float16 step is 4.9e-4 at 0.5 (rel 9.8e-4)
DEFAULT_TOLERANCES = (1e-4, 1e-3)


def verify(onnx_path, model: nn.Module, inputs, *, batch_sizes=None, baseline=None, sparse_kernel_path="auto",
           atol: float | None = None, rtol: float | None = None, runs: int = 30, warmup: int = 3, threads: int = 1,
           min_speedup: float = 1.05, raise_on_fail: bool = True, bench: bool = True,
           budget_s: float | None = None) -> Report:
    """Check an exported file against ``model`` and time ONNX Runtime routes.

    * outputs: ORT vs PyTorch on ``inputs`` (every route), max abs/rel error; ``|onnx - torch| <= atol +
      rtol·|torch|`` elementwise or :class:`VerificationError` (when ``raise_on_fail``); ``atol`` / ``rtol``
      default to 1e-4 / 1e-3, and to 1e-3 / 1e-2 where PyTorch's outputs are float16; with a 2-D
      ``attention_mask`` among ``inputs``, per-token outputs are compared at the real tokens only;
    * sparsity: zeros of every pruned model weight vs its ONNX initializer (must not drop);
    * latency at each of ``batch_sizes`` (default: the batch of ``inputs``; rows repeated to size): routes
      ``dense`` (``baseline``: the unpruned nn.Module or its ONNX file, if given), ``pruned`` (the file, dense
      kernels) and ``sparse-kernel`` (the SparseToDenseMatMul rewrite, if there is one); warm-up, ``runs``
      interleaved repetitions (fewer, but at least 10, once ``budget_s`` seconds per batch size are spent),
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
        sparse_kernel_path = sparse_kernel_of(onnx_path)
    check_runtime_dtype(model)
    if baseline is not None and isinstance(baseline, nn.Module):
        check_runtime_dtype(baseline, "baseline")
    check_tolerances(atol, rtol)
    if runs < 1 or warmup < 0 or threads < 1:
        raise PruningInputError("runs/warmup/threads: need runs >= 1, warmup >= 0, threads >= 1")
    if batch_sizes is not None and not isinstance(batch_sizes, (list, tuple)):
        raise PruningInputError(f"batch_sizes: a list of batch sizes, got {batch_sizes!r}")
    if batch_sizes is not None and not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                           for b in batch_sizes):
        raise PruningInputError(f"batch_sizes: positive whole numbers, got {list(batch_sizes)!r}")
    args, kwargs = as_args(inputs)
    first = first_tensor(args, kwargs)
    if first is None:
        raise PruningInputError("inputs: no tensor given")
    b0 = first.shape[0]
    batch_sizes = list(batch_sizes or [b0])
    runners = {"pruned": OrtRunner(onnx_path, threads)}
    if sparse_kernel_path:
        runners["sparse-kernel"] = OrtRunner(sparse_kernel_path, threads)

    # ---- outputs
    cfg = getattr(model, "config", None)
    was_cache = getattr(cfg, "use_cache", None)   # export traced without the cache: compare like with like
    try:
        if was_cache is not None:
            cfg.use_cache = False
        # eval mode, every submodule's own flag back afterwards (a frozen BatchNorm stays frozen)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        m_args, m_kwargs = move((args, kwargs), dev)   # the reference pass where the model is (a GPU too)
        with eval_mode(model), torch.no_grad():
            ref = flatten_outputs(named_failure("inputs", model, lambda: model(*m_args, **m_kwargs), inputs))
    finally:
        if was_cache is not None:
            cfg.use_cache = was_cache
    low = any(torch.is_tensor(r) and r.dtype == torch.float16 for r in ref)
    atol_d, rtol_d = LOW_PRECISION_TOLERANCES if low else DEFAULT_TOLERANCES
    atol, rtol = atol_d if atol is None else atol, rtol_d if rtol is None else rtol
    outputs, failures = [], []
    am = kwargs.get("attention_mask") if isinstance(kwargs, dict) else None
    token_mask = am.detach().cpu().numpy().astype(bool) if torch.is_tensor(am) and am.dim() == 2 else None
    for name, rn in runners.items():
        per_token = None
        if token_mask is not None:   # the outputs whose second dim is the mask's token dim (by its ONNX name)
            seq = {str(i.shape[1]) for i in rn.session.get_inputs() if i.name == "attention_mask"
                   and len(i.shape) == 2 and isinstance(i.shape[1], str)}
            per_token = [len(o.shape) >= 2 and str(o.shape[1]) in seq for o in rn.session.get_outputs()] \
                if seq else None
            if per_token is not None and not any(per_token):   # names that do not line up (another exporter):
                per_token = None                                # the shape rule alone
        rows = check_outputs(name, rn.run(rn.feeds(inputs)), ref, atol, rtol, token_mask, per_token)
        outputs += rows
        for r in rows:
            if not r["ok"]:
                w = r["worst"]
                failures.append(
                    f"{name}: output {r['index']} {tuple(r['shape'])} differs from PyTorch: max abs error "
                    f"{r['max_abs']:.3g} > atol {atol:g} + rtol {rtol:g}·|torch| ({w['bad_fraction']:.1%} of "
                    f"entries; worst at {tuple(w['index'])}: onnx {w['onnx']:.6g} vs torch {w['torch']:.6g})")
    # ---- sparsity
    sparsity, sp_failures = check_sparsity(model, onnx_path, sparse_kernel_path)
    failures += sp_failures
    # ---- latency
    routes = dict(runners)
    base_name = "pruned"
    tmp = None
    if baseline is not None:
        if isinstance(baseline, nn.Module):
            tmp = tempfile.TemporaryDirectory()
            bpath = os.path.join(tmp.name, "dense.onnx")
            export(baseline, repeat_to_batch(inputs, max(b0, 2)), bpath, sparse_kernel="off")
        else:
            bpath = os.fspath(getattr(baseline, "path", baseline))   # a path, or an ExportResult
        routes = {"dense": OrtRunner(bpath, threads), **runners}
        base_name = "dense"
    latency, best = {}, {}
    pruned = [s["model_sparsity"] for s in sparsity if s["model_sparsity"] > 0.001 and s["layer"]]  # as the report
    mean_sp = float(np.mean(pruned)) if pruned else 0.0
    for b in (batch_sizes if bench else []):
        binp = repeat_to_batch(inputs, b)
        feeds = {n: r.feeds(binp) for n, r in routes.items()}
        times = time_runners(routes, feeds, runs, warmup, budget_s)
        st = {n: latency_stats(t) for n, t in times.items()}
        for n in st:
            st[n]["speedup"] = speedup(st[n], st[base_name])
        latency[b] = st
        best[b] = route_verdict(b, st, base_name, min_speedup, mean_sp, bool(sparse_kernel_path), baseline is not None)
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
