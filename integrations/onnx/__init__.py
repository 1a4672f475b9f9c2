"""ONNX export and verification: does the pruned model survive export, and is it actually faster?

    res = export(model, example_inputs, "model.onnx", sparse_kernel="auto")   # masks baked on a copy
    rep = verify(res, model, inputs, batch_sizes=(1, 32), baseline=dense_model)
    print(rep.to_markdown()); rep.save("report")                              # report.md / report.json
    plot([rep], "latency.png")

The flow, one module a step (each imports only the ones above it):

    inputs   (args, kwargs), dynamic shapes, outputs flattened, inputs repeated to a batch size
    bake     masks baked on a deep copy; the effective weights
    rewrite  MatMul/Gemm -> com.microsoft:SparseToDenseMatMul for mostly-zero weights (CSR as initializers)
    export   torch.onnx.export(dynamo=True), the initializer -> parameter map, COO sparse storage
    runtime  OrtRunner: an ORT CPU session with pinned threads that feeds the CSR weights; route timing
    report   Report (markdown / JSON), the verdict on which route is faster, the plot
    verify   outputs and sparsity against PyTorch (VerificationError), latency per route -> Report
    cli      `obs-prune export`

What ONNX Runtime (CPU) does with pruned weights, measured and re-checked per model by :func:`verify`:

* masks in PyTorch change nothing at run time; a dense MatMul that holds 90% zeros costs the same as dense;
* ONNX ``sparse_initializer`` (COO) shrinks the *file*, but ORT densifies it at load (no speed change);
* ``com.microsoft:SparseToDenseMatMul`` (CSR) is a single-threaded kernel: it pays at batch 1 and very high
  sparsity only.  We rewrite ``MatMul(X, W)``/``Gemm`` into ``(W_csr · Xᵀ)ᵀ`` (``transB=1``, the fast layout).
  ORT does not accept a sparse tensor from an initializer, so the CSR arrays are stored in the file as plain
  initializers (``<w>__csr_values`` / ``__csr_indices`` / ``__csr_indptr`` / ``__csr_shape``) and fed as sparse graph inputs by
  :class:`OrtRunner`; a plain ``InferenceSession`` cannot run such a file on its own;
* structured pruning (channels/heads removed) is the route that is fast at every batch size.

Host-independent timing (interleaved runs, median/IQR, the "is it faster" rule) lives in
:mod:`obs_plugins.timing`.
"""
from .bake import baked_copy, effective_weights, zero_fraction
from .cli import add_export_arguments, run_export_cli
from .export import META_PARAM_MAP, ExportResult, export, load_proto, param_map, param_map_of, to_sparse_storage
from .inputs import as_args, auto_dynamic_shapes, flatten_outputs, repeat_to_batch
from .report import Report, plot, route_verdict
from .rewrite import CSR_SUFFIXES, META_SPARSE, MS_DOMAIN, rewrite_sparse_kernel
from .runtime import OrtRunner, time_runners
from .verify import VerificationError, check_outputs, check_sparsity, onnx_weight_sparsity, verify

__all__ = ["export", "verify", "plot", "baked_copy", "effective_weights", "rewrite_sparse_kernel",
           "to_sparse_storage", "OrtRunner", "onnx_weight_sparsity", "ExportResult", "Report", "VerificationError",
           "add_export_arguments", "run_export_cli", "route_verdict", "time_runners", "as_args", "repeat_to_batch",
           "flatten_outputs", "auto_dynamic_shapes", "check_outputs", "check_sparsity", "param_map", "param_map_of",
           "load_proto", "zero_fraction", "CSR_SUFFIXES", "MS_DOMAIN", "META_PARAM_MAP", "META_SPARSE"]
