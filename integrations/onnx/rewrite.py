"""Step 3 (optional): the ``com.microsoft:SparseToDenseMatMul`` rewrite of MatMul/Gemm whose weight is mostly
zeros, written as its own file beside the plain export.

ORT does not accept a sparse tensor from an initializer, so the CSR arrays are stored as plain initializers
(``<w>__csr_values`` / ``__csr_indices`` / ``__csr_indptr`` / ``__csr_shape``) behind a sparse graph input of
the same stem; :class:`~obs_plugins.integrations.onnx.runtime.OrtRunner` feeds them.
"""
from __future__ import annotations

import copy
import json

import numpy as np

from .bake import zero_fraction

MS_DOMAIN = "com.microsoft"
CSR_SUFFIXES = ("__csr_values", "__csr_indices", "__csr_indptr", "__csr_shape")
META_SPARSE = "obs_plugins.sparse_kernel"


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
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 10:                      # Slice with tensor inputs (the older-opset route below) needs 10
        return proto, []
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
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] and (
                n.input[2] not in inits or len(inits[n.input[2]].dims) > 1):
            # a bias C of rank 2 (or unknown): ORT's shape inference of the rewritten product cannot add it
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
        if zero_fraction(a) < threshold or zero_fraction(a) == 0.0 or not a.any():   # ORT rejects an empty CSR
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
            helper.make_node("SparseToDenseMatMul", [sname, p + "_x2d"], [p + "_yt"], name=p + "_spmm",
                             domain=MS_DOMAIN, transB=1, alpha=alpha),
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
        if opset >= 15:                   # Shape's start/end attributes exist from opset 15
            new_nodes.append(helper.make_node("Shape", [x], [p + "_lead"], end=-1))
        else:
            lim = [numpy_helper.from_array(np.array([v], dtype=np.int64), p + suf)
                   for v, suf in ((0, "_s0"), (-1, "_e1"))]
            new_inits += lim
            new_nodes += [helper.make_node("Shape", [x], [p + "_shape"]),
                          helper.make_node("Slice", [p + "_shape", lim[0].name, lim[1].name], [p + "_lead"])]
        new_nodes += [
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


def sparse_input_stem(name: str) -> str:
    """The initializer a sparse graph input of the rewrite was made from (``W_T__sparse`` -> ``W``)."""
    return name[: -len("__sparse")].removesuffix("_T") if name.endswith("__sparse") else name
