"""Step 4 of the flow: run an exported file in ONNX Runtime (CPU, pinned threads), the sparse-kernel rewrite
included, and time its routes against each other."""
from __future__ import annotations

import numpy as np

from obs_plugins.errors import PruningInputError
from obs_plugins.timing import time_interleaved

from .inputs import as_args
from .rewrite import CSR_SUFFIXES


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

    def feeds(self, inputs) -> dict[str, np.ndarray]:
        """``inputs`` (a tensor, a tuple of tensors or a dict, as for the model) as this session's feeds."""
        args, kwargs = as_args(inputs)
        names = self.input_names
        if kwargs:
            missing = [n for n in names if n not in kwargs]
            if missing:
                raise PruningInputError(f"inputs: the ONNX model needs {missing}, got {sorted(kwargs)}")
            return {n: kwargs[n].detach().cpu().numpy() for n in names}
        if len(args) != len(names):
            raise PruningInputError(f"inputs: the ONNX model takes {len(names)} inputs {names}, got {len(args)}")
        return {n: a.detach().cpu().numpy() for n, a in zip(names, args)}


def time_runners(runners: dict[str, OrtRunner], feeds: dict[str, dict], runs: int, warmup: int,
                 budget_s: float | None = None) -> dict[str, list[float]]:
    """Milliseconds per run of each runner on its feeds, interleaved (see
    :func:`obs_plugins.timing.time_interleaved`)."""
    return time_interleaved({n: (lambda r=r, f=feeds[n]: r.run(f)) for n, r in runners.items()}, runs, warmup,
                            budget_s)
