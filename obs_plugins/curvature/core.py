"""The :class:`Curvature` object: one problem (model, pruned tensors, calibration data, loss) and the curvature
collected for it.  Every method reads it; nothing here prunes."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import PruningInputError
from ..targets import Target, check_targets, check_tied, gated, layer_kind, out_dim, resolve_targets, to_2d
from .batching import NamedForward, OnDevice, batch_loss, default_forward, move
from .linalg import full_fp32
from .distributed import all_reduce_sums, process_group, raise_together, together
from .collect import (GramAccumulator, add_gram_hooks, block_stack, capture_block_inputs, chain_inputs_over,
                      collect_sequential, eval_mode, feed, input_stages, no_kv_cache, run_batches, run_block,
                      run_block_until)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _leading_dim(out) -> int:
    """Batch size of a model output (a tensor, a tuple, a dict, or a Hugging Face ``ModelOutput``: its ``logits``,
    else its first tensor)."""
    t = out if torch.is_tensor(out) else getattr(out, "logits", None)
    if t is None and isinstance(out, Mapping):   # a dict / ModelOutput without logits: its first tensor
        t = next((v for v in out.values() if torch.is_tensor(v)), None)   # (BertModel: last_hidden_state)
    if t is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        t = out[0]
    return int(t.shape[0]) if torch.is_tensor(t) and t.dim() else 1


def _double_backward_attention():
    """``scaled_dot_product_attention`` on its math kernel: the fused CPU kernels (what Hugging Face's default
    ``sdpa`` attention runs) have no double backward, which a Hessian-vector product needs."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


_ABSENT = object()


def _pruned_attributes(model: nn.Module) -> list[tuple[nn.Module, str, object]]:
    """``(module, name, tensor)`` for every torch.nn.utils.prune-pruned tensor in ``model`` (``<name>_orig``
    parameter plus ``<name>_mask`` buffer): the plain ``<name>`` attribute its forward pre-hook maintains."""
    out = []
    for module in model.modules():
        for pname, _ in module.named_parameters(recurse=False):
            if pname.endswith("_orig") and pname[:-5] + "_mask" in module._buffers:
                name = pname[:-5]
                out.append((module, name, module.__dict__.get(name, _ABSENT)))
    return out


def _rows(batches) -> list[float]:
    """Each batch's sample count (1 per batch where it cannot be read): the weights of a mean over samples."""
    from .fisher import batch_rows
    try:
        return [float(batch_rows(b)) for b in batches]
    except PruningInputError:
        return [1.0] * len(batches)


def _mean_over_processes(sums: list[torch.Tensor], rows: list[float]) -> list[torch.Tensor]:
    """``sums`` (this process's row-weighted sums) summed over every process and divided by all processes' rows."""
    *summed, count = all_reduce_sums(list(sums) + [torch.tensor([sum(rows)], dtype=torch.float64)])
    count = float(count) or 1.0
    return [t / count for t in summed]


def _batch_weights(batches) -> list[float] | None:
    """Per-batch weights that make a mean of per-batch mean losses the mean over samples (``rows_i * n / sum
    rows``), or ``None`` when every batch has as many rows (the plain mean over batches is then that already)."""
    from .fisher import batch_rows
    try:
        rows = [batch_rows(b) for b in batches]
    except PruningInputError:
        return None
    if len(set(rows)) <= 1:
        return None
    return [r * len(rows) / sum(rows) for r in rows]


class Curvature:
    """Curvature of a pruning problem, keyed by ``Target.key`` in the order of ``params``.

    Attributes: ``targets`` (list of :class:`Target`), ``hessians`` (key -> layer Gram, fp32, (in, in)),
    ``counts`` (key -> rows seen), ``fisher`` (key -> Fisher blocks, when collected).  It keeps references to
    the model, the calibration batches and the loss, so methods can ask for gradients, HVPs and losses.
    """

    def __init__(self, model: nn.Module, params, batches: Iterable | None = None, *,
                 loss_fn: Callable | None = None, forward_fn: Callable | None = None):
        self.model = model
        self.targets: list[Target] = resolve_targets(model, params)
        self.batches = list(batches) if batches is not None else []
        self.loss_fn = loss_fn
        # a failure on a calibration batch names it (batches[i]) and the module that raised
        self.forward_fn = NamedForward(forward_fn or default_forward, self.batches)
        self._hessians: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self.fisher: dict = {}
        self.device = _device_of(model)
        self.sequential = False        # plans are computed block by block (see :meth:`blockwise`)
        self.stages = None             # sequential: "block" or "sublayer" (stage by stage inside each block)
        self._shared_inputs = True      # sequential: every block gets block 0's other inputs (else each its own)
        self.dtype = torch.float32
        self.progress = True
        self._grams_pending = False    # sequential: the one-pass Grams are only collected if someone asks
        self.offload: torch.device | None = None   # sequential: where block activations wait (None: model device)
        self._onepass_keys: set[str] = set()   # keys whose stored Gram is a one-pass one (not a sequential plan's)

    @property
    def hessians(self) -> dict[str, torch.Tensor]:
        """key -> layer Gram ``2 X X^T / n``.  Under sequential calibration this is filled by the last plan
        (the Grams that plan was solved on); asked for before any plan, the one-pass Grams of the model as it
        is are collected first, and so are those of targets the last plan left out (a plan of one tensor,
        ``OBSIHT.apply``, solves only that tensor's Gram)."""
        if self._grams_pending:
            self._collect_onepass()
        elif self.sequential:
            missing = [t for t in self.targets if t.key not in self._hessians]
            if missing:
                self._collect_onepass(missing)
        return self._hessians

    @property
    def store_device(self) -> torch.device:
        """Where per-layer results wait between uses: a finished stage's Grams, the plan's weights and masks and
        the solver's inverse factors.  CPU memory under ``offload`` (one layer at a time is moved to the model's
        device to be solved), else the model's device."""
        return self.offload if self.offload is not None else self.device

    @property
    def counts(self) -> dict[str, int]:
        """key -> input rows the Gram was averaged over (filled like :attr:`hessians`)."""
        self.hessians  # noqa: B018  (collects them if pending)
        return self._counts

    @hessians.setter
    def hessians(self, value) -> None:
        self._hessians = dict(value)
        self._onepass_keys = set(self._hessians)
        self._grams_pending = False

    def onepass_hessians(self, keys) -> dict[str, torch.Tensor]:
        """key -> the one-pass Gram of the model as it is, for ``keys``: what global allocation ranks on, so a
        plan does not depend on what ran on this curvature before.  Without sequential calibration these are
        :attr:`hessians`.  Under it, :attr:`hessians` holds the last plan's Grams after a plan; those keys are
        collected again in one pass (into a dict that is not stored: :attr:`hessians` keeps its meaning)."""
        hs = self.hessians
        keys = list(keys)
        if not self.sequential:
            return {k: hs[k] for k in keys}
        stale = [t for t in self.targets if t.key in keys and t.key not in self._onepass_keys]
        out = {k: hs[k] for k in keys if k in self._onepass_keys}
        if stale:
            out.update(self._collect_onepass(stale, store=False))
        return out

    # ------------------------------------------------------------------ collection
    @classmethod
    def layerwise(cls, model: nn.Module, params, batches: Iterable, *, loss_fn: Callable | None = None,
                  forward_fn: Callable | None = None, sequential: bool | str = "auto",
                  on_block: Callable | None = None, dtype: torch.dtype = torch.float32,
                  progress: bool = True, offload: bool | str = "auto") -> "Curvature":
        """Per-layer input Gram ``H = 2 X X^T / n`` of every target, from forward hooks.

        ``sequential``: ``"auto"`` (default) calibrates block by block whenever every target lives in one stack
        of blocks (an ``nn.ModuleList`` such as ``model.layers`` or ``encoder.layer``), else in one pass;
        ``True`` insists on it, ``False`` never does it.  Sequential calibration happens *inside each plan*
        (:meth:`blockwise`): block i's Grams are collected on the outputs of blocks < i with their *planned*
        weights, and nothing is written to the model until the whole plan exists (SparseGPT's and
        llm-compressor's order, but atomic).  So a sequential curvature collects nothing here.
        Inside a block: ``"block"`` collects all of the block's Grams on the block's dense weights (llm-compressor's
        order); ``"sublayer"`` goes stage by stage -- layers fed the very same input tensor form a stage (q/k/v,
        then o_proj, then gate/up, then down_proj), and a stage's Grams are collected with the stages before it
        already planned (GPTQ's "true sequential").  ``True`` and ``"auto"`` mean ``"block"`` (measured better on
        balance, docs/results/llm-compressor.md).  ``curv.stages`` records the order used (``None`` for one pass).
        ``on_block(i, block_targets) -> bool`` (implies sequential) is the older eager hook: it may change the
        block's weights before its outputs feed the next block, and the Grams are collected now.
        ``offload``: where sequential calibration keeps the calibration set's block activations between block
        runs.  ``"auto"`` (default) keeps them in CPU memory when the model is on an accelerator (CUDA) and moves
        one batch at a time to it, as SparseGPT and llm-compressor do, so the accelerator holds one batch's
        activations; ``True`` always (for a model on the CPU every move is a no-op); ``False`` keeps them on
        the model's device (faster where they fit).  ``curv.offload`` is the device used (``None``: no offload).
        Under offload the solvers keep their per-layer state there too (:attr:`store_device`): inverse factors,
        masks and new weights, moved to the model's device one layer at a time; with sequential calibration also
        each stage's Grams once solved and the one-pass Grams global / OWL allocation rank on (a one-pass
        curvature collects every Gram in one forward pass, on the device).
        ``loss_fn`` (torch's ``loss_fn(output, target)`` for ``(inputs, target)`` batches,
        ``loss_fn(output, batch)`` for dicts) is kept for methods that need gradients (OBS-IHT iterations,
        global allocation, HVPs).
        """
        if dtype not in (torch.float32, torch.float64):
            raise PruningInputError(f"dtype: accumulation must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(sequential, bool) and sequential not in ("auto", "block", "sublayer"):
            raise PruningInputError("sequential: True, False, 'auto', 'block' or 'sublayer', got "
                                    f"{sequential!r}")
        if not isinstance(offload, bool) and offload != "auto":
            raise PruningInputError(f"offload: True, False or 'auto', got {offload!r}")
        curv = cls(model, params, batches, loss_fn=loss_fn, forward_fn=forward_fn)
        curv.offload = (torch.device("cpu") if offload is True or (offload == "auto" and curv.device.type != "cpu")
                        else None)
        for i, t in enumerate(curv.targets):
            if t.name != "weight":
                raise PruningInputError(f"params[{i}]: {t.key} is not a layer weight; layer curvature (the input Gram) "
                                        "is for the weights of Linear / Conv2d / Conv1D layers (leave biases out; a "
                                        "tensor of another module, such as Mixture-of-Experts experts held as one 3-D "
                                        "tensor, has no layer input to collect: magnitude pruning takes it)")
        raise_together(PruningInputError("batches: no calibration batches given") if not curv.batches else None)
        check_targets(curv.targets)
        check_tied(model, curv.targets)
        curv.dtype, curv.progress = dtype, progress
        if on_block is not None:
            curv._collect_eager_sequential(on_block)
            return curv
        stack = block_stack(model, curv.targets)
        if sequential not in (False, "auto") and stack is None:
            raise PruningInputError(f"sequential={sequential!r}: the targets do not all live in one stack of blocks "
                                    "(an nn.ModuleList such as model.layers), each in one block (a layer shared "
                                    "by two blocks is not); use sequential=False")
        if sequential is not False and stack is not None:
            with curv._eval_mode(), together():
                chain, curv._shared_inputs = chain_inputs_over(model, stack, OnDevice(curv.batches, curv.device),
                                                               curv.forward_fn)
            if not chain and sequential == "auto":
                stack = None     # e.g. a residual added around the blocks: calibrate in one pass
            elif not chain:
                raise PruningInputError(f"sequential={sequential!r}: the blocks of the stack are not a chain (a "
                                        "forward pass does not feed each block exactly the previous block's output, "
                                        "e.g. a residual added outside the blocks); use sequential=False")
        curv.sequential = sequential is not False and stack is not None
        if curv.sequential:
            curv.stages = "block" if sequential in (True, "auto") else sequential
            curv._grams_pending = True
        else:
            curv._collect_onepass()
        return curv

    def _new_accumulators(self, targets) -> dict[str, GramAccumulator]:
        return {t.key: GramAccumulator(to_2d(t.module, t.current()).shape[1], t.current().device, self.dtype)
                for t in targets}

    def _store(self, accs: dict[str, GramAccumulator]) -> None:
        grams, counts = self._checked(accs)
        self._hessians.update(grams)
        self._counts.update(counts)

    def _checked(self, accs: dict[str, GramAccumulator]) -> tuple[dict, dict]:
        """The accumulators' Grams and row counts, refused if a layer saw no input or non-finite values."""
        grams, counts = {}, {}
        for k, a in accs.items():
            if a.n == 0:
                why = "is it used by the forward pass?"
                module = next(t.module for t in self.targets if t.key == k)
                if type(module).__name__ == "NonDynamicallyQuantizableLinear":
                    why = ("nn.MultiheadAttention reads out_proj's weight inside F.multi_head_attention_forward "
                           "without calling the layer, so no input reaches it; leave it out of params")
                raise PruningInputError(f"params: layer {k} saw no input during calibration ({why})")
            if not bool(torch.isfinite(a.H).all()):
                raise PruningInputError(f"batches: the calibration inputs of layer {k} hold NaN/Inf values (a batch "
                                        "with NaN/Inf, or an earlier layer overflowing); fix the data")
            grams[k], counts[k] = a.H, a.n
        return grams, counts

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode, and no key/value cache (HF models build one per forward pass by default; a loss, gradient
        or calibration pass over whole windows never reads it).  ``config.use_cache`` is restored on exit."""
        with eval_mode(self.model), no_kv_cache(self.model):
            yield

    def _collect(self, targets, run: Callable[[], object], store: bool = True):
        """Grams of ``targets`` from hooks while ``run()`` feeds the model (all-reduced, then stored; with
        ``store=False`` returned as ``(grams, counts)`` instead)."""
        accs = self._new_accumulators(targets)
        handles = add_gram_hooks(targets, accs)
        try:
            with together(), full_fp32():
                run()
        finally:
            for h in handles:
                h.remove()
        for a in accs.values():
            a.all_reduce()
        if not store:
            return self._checked(accs)
        self._store(accs)

    def _collect_onepass(self, targets: list[Target] | None = None, store: bool = True):
        """One pass over the calibration batches: the Grams of ``targets`` (default: all) stored as one-pass
        ones, or with ``store=False`` only returned (key -> Gram)."""
        targets = self.targets if targets is None else targets
        if self.sequential and self.offload is not None:   # the same Grams, one block's on the device at a time
            grams, counts = self._collect_by_blocks(targets)
            if not store:
                return grams
            self._hessians.update(grams)
            self._counts.update(counts)
        else:
            batches = OnDevice(self.batches, self.device)
            with self._eval_mode(), self._weights(None), self._mid_apply_attributes():
                got = self._collect(targets, lambda: run_batches(self.model, batches, self.forward_fn,
                                                                 desc="collecting layer curvature",
                                                                 progress=self.progress), store=store)
            if not store:
                return got[0]
        self._onepass_keys |= {t.key for t in targets}
        self._grams_pending = False

    def _by_block(self, targets) -> tuple[nn.ModuleList, list[list[Target]], int]:
        """The stack of blocks, each block's targets (in calibration order) and the last block holding one."""
        blocks = block_stack(self.model, targets)
        if blocks is None:
            raise PruningInputError("curvature: sequential calibration needs the targets in one stack of blocks")
        keys = {t.key for t in targets}
        by_block = [[t for t in self.targets if t.key in keys and any(t.module is m for m in blk.modules())]
                    for blk in blocks]
        return blocks, by_block, max(i for i, bt in enumerate(by_block) if bt)

    def _capture(self, blocks):
        """Block 0's inputs for every calibration batch, and every block's own other inputs (masks, rotary
        tables, position bias) where they are not block 0's; kept on the offload device when there is one."""
        with together():
            return capture_block_inputs(self.model, blocks[0], OnDevice(self.batches, self.device), self.forward_fn,
                                        blocks=None if self._shared_inputs else blocks, store=self.offload,
                                        compute=self.device)

    def _collect_by_blocks(self, targets) -> tuple[dict, dict]:
        """The one-pass Grams of ``targets`` (the model as it is), collected block by block for a sequential
        curvature under offload: block i runs on block i-1's outputs, as in the whole forward pass, and each
        block's Grams wait on :attr:`store_device` once collected, so the device holds one block's Grams and
        activations (what global / OWL allocation ranks on)."""
        from tqdm.auto import tqdm
        blocks, by_block, last = self._by_block(targets)
        grams, counts = {}, {}
        with self._eval_mode(), self._weights(None), self._mid_apply_attributes(), torch.no_grad():
            cached = self._capture(blocks)
            for i in tqdm(range(last + 1), desc="collecting layer curvature (blocks)", disable=not self.progress,
                          leave=False):
                outs = []
                run = lambda: outs.append(run_block(blocks[i], cached.at(i)))  # noqa: E731
                if by_block[i]:   # the Grams from the very run whose outputs feed the next block
                    g, c = self._collect(by_block[i], run, store=False)
                    grams.update({k: v.to(self.store_device) for k, v in g.items()})
                    counts.update(c)
                elif i < last:
                    with together(), full_fp32():
                        run()
                if i < last:
                    feed(cached, outs[0])
        return grams, counts

    def _collect_eager_sequential(self, on_block) -> None:
        accs = self._new_accumulators(self.targets)
        batches = OnDevice(self.batches, self.device)
        with self._eval_mode():
            collect_sequential(self.model, self.targets, batches, self.forward_fn, accs, on_block=on_block,
                               progress=self.progress, store=self.offload, compute=self.device)
        self._store(accs)

    def blockwise(self, targets: list[Target], solve_layers: Callable) -> None:
        """Drive a layer-wise solver over ``targets`` in calibration order (the solver keeps its own results).

        ``solve_layers(block_targets, grams) -> {key: new effective weight (param-shaped)}`` is called once
        with every target and its Gram when the curvature is not sequential.  When it is, it is called block by
        block: block i's Grams are collected on the outputs of blocks < i *run with the weights already
        planned* (temporarily swapped in, always restored), then the block is re-run with its own planned
        weights to feed block i+1 (with ``sublayer``, the block's stages are collected and solved one after
        another, each with the stages before it planned; each such run stops once the stage's layers have
        seen their inputs).  Peak extra memory: one block's activations for the calibration set (in CPU memory
        under ``offload``), and the block's planned weights (dropped once the block has fed the next); under
        ``offload`` a solved stage's Grams wait in CPU memory too (:attr:`store_device`), so the device holds one
        block's.  The model is left exactly as it was (also when ``solve_layers`` raises);
        ``hessians`` ends up holding the Grams the plan was solved on.  Inside ``solve_layers`` a pruned tensor
        runs with a unit mask (:meth:`_weights`), so read prior masks (``t.prior_mask()``) before calling this,
        as the solvers do.
        """
        if not self.sequential:
            hs = self.hessians
            solve_layers(targets, {t.key: hs[t.key] for t in targets})
            return
        blocks, by_block, last = self._by_block(targets)
        planned: dict[str, torch.Tensor] = {}
        # this plan may be applied and change any layer's inputs: allocation collects the one-pass Grams again
        # (and hessians holds this plan's Grams for its keys)
        self._onepass_keys.clear()
        from tqdm.auto import tqdm
        with self._eval_mode(), self._weights(None), self._mid_apply_attributes(), torch.no_grad():
            cached = self._capture(blocks)
            for i in tqdm(range(last + 1), desc="sequential plan (blocks)", disable=not self.progress,
                          leave=False):
                bt, blk = by_block[i], blocks[i]
                ours = lambda: {t.key: planned[t.key] for t in bt if t.key in planned}  # noqa: E731
                if not bt:
                    stages = []
                elif self.stages == "sublayer":
                    with together():   # runs the block on this process's first batch
                        stages = input_stages(blk, bt, cached.use(cached.at(i)[0]))
                else:
                    stages = [(bt, True)]
                for st, whole in stages:  # (targets, needs the whole block run)
                    with self._weights(ours()):
                        self._collect(st, (lambda: run_block(blk, cached.at(i))) if whole else
                                      (lambda: run_block_until(blk, cached.at(i), [t.module for t in st])))
                    planned.update(solve_layers(st, {t.key: self._hessians[t.key] for t in st}))
                    for t in st:   # solved: the Grams wait in CPU memory under offload
                        self._hessians[t.key] = self._hessians[t.key].to(self.store_device)
                if i < last:
                    with self._weights(ours()), together():
                        feed(cached, run_block(blk, cached.at(i)))
                for t in bt:       # the block's planned weights are not run again (the solver keeps its own)
                    planned.pop(t.key, None)
        self._grams_pending = False

    @classmethod
    def fisher_blocks(cls, model: nn.Module, params, batches: Iterable, loss_fn: Callable, **kwargs) -> "Curvature":
        """Block-diagonal empirical Fisher of the flattened weights (see :mod:`obs_plugins.curvature.fisher`)."""
        from .fisher import collect_fisher
        curv = cls(model, params, batches, loss_fn=loss_fn, forward_fn=kwargs.pop("forward_fn", None))
        collect_fisher(curv, **kwargs)
        return curv

    # ``Curvature.fisher(model, params, batches, loss_fn, block_size=...)`` builds one; on an instance,
    # ``curv.fisher`` is the dict key -> Fisher blocks (the instance attribute shadows this classmethod).
    fisher = fisher_blocks

    def collect_fisher(self, **kwargs) -> dict:
        """Add Fisher blocks to this curvature (e.g. one collected by :meth:`layerwise`); returns a report."""
        from .fisher import collect_fisher
        return collect_fisher(self, **kwargs)

    # ------------------------------------------------------------------ global operators (full loss)
    def hessian_trace(self, **kwargs):
        """Hutchinson ``(estimate, stderr)`` of tr(H) (see :func:`obs_plugins.curvature.operators.hessian_trace`)."""
        from .operators import hessian_trace
        return hessian_trace(self, **kwargs)

    def hessian_spectrum(self, **kwargs):
        """SLQ spectral density ``(nodes, weights)`` of the Hessian of the calibration loss."""
        from .operators import hessian_spectrum
        return hessian_spectrum(self, **kwargs)

    def hessian_top_eigenvalue(self, **kwargs):
        """Largest Hessian eigenvalue by Lanczos with full re-orthogonalisation."""
        from .operators import hessian_top_eigenvalue
        return hessian_top_eigenvalue(self, **kwargs)

    # ------------------------------------------------------------------ identity checks
    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.targets]

    def target_by_key(self, key: str) -> Target:
        for t in self.targets:
            if t.key == key:
                return t
        raise KeyError(f"curvature: no target {key!r}; targets: {self.keys[:5]}...")

    def target(self, module: nn.Module, name: str) -> Target:
        for t in self.targets:
            if t.module is module and t.name == name:
                return t
        raise PruningInputError(f"curvature: ({type(module).__name__}, {name!r}) is not among the parameters "
                                "this curvature was collected for")

    # ------------------------------------------------------------------ losses and gradients
    def _need_loss(self, what: str):
        error = None   # every process checks, and all refuse together (one alone would leave the others waiting)
        if self.loss_fn is None:
            error = PruningInputError(f"curvature: {what} needs a loss; collect the curvature with loss_fn=...")
        elif not self.batches:
            error = PruningInputError(f"curvature: {what} needs calibration batches")
        raise_together(error)

    @contextlib.contextmanager
    def _weights(self, overrides: Mapping[str, torch.Tensor] | None):
        """Temporarily run the model with the *effective* weights of some targets replaced (param-shaped).

        Pruned modules (torch.nn.utils.prune) get ``<name>_orig`` replaced and ``<name>_mask`` set to ones, so
        gradients are taken w.r.t. the whole effective weight.  Pruned targets without an override run with
        their current effective weight (``orig * mask``) in ``<name>_orig`` and a unit mask, for the same
        reason.  Everything is restored on exit, including the plain ``<name>`` tensor that torch.nn.utils.prune's
        forward pre-hook keeps on every pruned module of the model (each pass inside rebinds it to that pass's
        weights and autograd graph; the very tensor object the caller had is put back).
        """
        for t in self.targets:   # a CS / BiP gate recomputes w x gate on every read: a write there is lost
            if gated(t.module, t.name) and (t.pruned_before or (overrides is not None and t.key in overrides)):
                raise PruningInputError(f"params: {t.key} is gated by a running Continuous Sparsification / BiP "
                                        "search; call the search's finish() first")
        saved = []
        effective = _pruned_attributes(self.model)
        try:
            with torch.no_grad():
                for t in self.targets:
                    value = overrides.get(t.key) if overrides is not None else None
                    if value is None and not t.pruned_before:
                        continue
                    if value is None:
                        value = t.current()
                    orig = t.orig()
                    mask = t.mask_tensor()
                    # the originals wait where the plan's state does (CPU memory under offload)
                    saved.append((orig, orig.detach().to(self.store_device, copy=True), mask,
                                  None if mask is None else mask.clone()))
                    orig.copy_(value)
                    if mask is not None:
                        mask.fill_(1)
            yield
        finally:
            with torch.no_grad():
                for orig, w, mask, m in reversed(saved):
                    orig.copy_(w)
                    if mask is not None:
                        mask.copy_(m)
            for module, name, value in effective:
                if value is _ABSENT:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value

    @contextlib.contextmanager
    def _mid_apply_attributes(self):
        """While torch.nn.utils.prune's ``apply`` runs ``compute_mask`` the tensor lives at ``<name>_orig`` and
        ``<name>`` is missing (a first application) or stale (a second one: torch has taken the old method's
        forward pre-hook off, so nothing rebuilds ``<name>`` from ``<name>_orig``); expose ``<name>_orig``
        temporarily so a forward pass computes with it (``_weights`` runs such a tensor with a unit mask)."""
        from torch.nn.utils import prune
        patched = []
        try:
            for t in self.targets:
                if not hasattr(t.module, t.name):
                    patched.append((t, _ABSENT))
                elif hasattr(t.module, t.name + "_orig") and not any(
                        isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == t.name
                        for h in t.module._forward_pre_hooks.values()):
                    patched.append((t, t.module.__dict__.get(t.name, _ABSENT)))
                else:
                    continue
                t.module.__dict__[t.name] = t.orig()
            yield
        finally:
            for t, old in patched:
                if old is _ABSENT:
                    t.module.__dict__.pop(t.name, None)
                else:
                    t.module.__dict__[t.name] = old

    def loss(self, overrides: Mapping[str, torch.Tensor] | None = None, batches: Iterable | None = None, *,
             progress: bool = False) -> float:
        """Mean loss over ``batches`` (default: the calibration batches) with optional weight overrides; batches of
        different sizes are weighted by their rows (the mean over samples)."""
        from tqdm.auto import tqdm
        self._need_loss("loss")
        batches = self.batches if batches is None else list(batches)
        total = 0.0
        group = process_group()   # several processes: the mean over every process's samples
        rows = _rows(batches) if group is not None else None
        w = _batch_weights(batches)
        with self._eval_mode(), self._weights(overrides), self._mid_apply_attributes(), torch.no_grad():
            for i, b in enumerate(tqdm(batches, desc="loss", disable=not progress, leave=False)):
                b = move(b, self.device)
                v = float(batch_loss(self.loss_fn, self.forward_fn(self.model, b), b))
                total += v * rows[i] if rows is not None else (v if w is None else v * w[i])
        if rows is not None:
            return float(_mean_over_processes([torch.tensor(total, dtype=torch.float64)], rows)[0])
        return total / max(len(batches), 1)

    def _grad_params(self):
        """The tensors whose gradient is the effective weight's gradient (orig when pruned, mask = 1)."""
        return [t.orig() for t in self.targets]

    @contextlib.contextmanager
    def _only_targets_require_grad(self):
        """Only the targets' tensors require grad, and grad mode is on (a caller's ``torch.no_grad()`` must not
        turn a gradient / HVP pass into an autograd error); the flags are restored on exit."""
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for p in self._grad_params():
                p.requires_grad_(True)
            with torch.enable_grad():
                yield
        finally:
            for p, f in flags:
                p.requires_grad_(f)

    def loss_and_grad(self, overrides: Mapping[str, torch.Tensor] | None = None, batches: Iterable | None = None,
                      *, progress: bool = False, compute_dtype: torch.dtype | None = None
                      ) -> tuple[float, dict[str, torch.Tensor]]:
        """Mean loss and its gradient w.r.t. every target's effective weight (param-shaped; fp32, fp64 for an fp64
        model); batches of different sizes are weighted by their rows, so k batches give what one concatenated
        batch gives.

        ``compute_dtype`` (e.g. ``torch.bfloat16``): run the forward and backward passes under
        ``torch.autocast`` in that dtype (matrix products in it, accumulating in fp32; the weights are not
        cast); the per-batch gradients are still summed in at least fp32.  None: the model's own dtype."""
        from tqdm.auto import tqdm
        self._need_loss("loss_and_grad")
        batches = self.batches if batches is None else list(batches)
        grads: dict[str, torch.Tensor] = {}
        total = 0.0
        group = process_group()   # several processes: the mean over every process's samples
        rows = _rows(batches) if group is not None else None
        w = rows if rows is not None else _batch_weights(batches)
        def cast():
            return (torch.autocast(self.device.type, dtype=compute_dtype) if compute_dtype is not None
                    else contextlib.nullcontext())
        with self._eval_mode(), self._weights(overrides), self._mid_apply_attributes(), \
                self._only_targets_require_grad():
            params = self._grad_params()
            for i, b in enumerate(tqdm(batches, desc="gradient", disable=not progress, leave=False)):
                b = move(b, self.device)
                with cast():
                    loss = batch_loss(self.loss_fn, self.forward_fn(self.model, b), b)
                gs = torch.autograd.grad(loss, params)
                total += float(loss.detach()) * (1.0 if w is None else w[i])
                for t, g in zip(self.targets, gs):
                    # at least fp32, fp64 for an fp64 model (a fresh tensor from autograd, or a copy): in place
                    g = g.to(torch.promote_types(g.dtype, torch.float32))
                    if w is not None:
                        g = g * w[i]
                    if t.key in grads:
                        grads[t.key].add_(g)
                    else:
                        grads[t.key] = g
        if rows is not None:
            for t in self.targets:   # a process without batches still takes part in the sum
                cur = t.current()
                grads.setdefault(t.key, torch.zeros_like(cur, dtype=torch.promote_types(cur.dtype, torch.float32)))
            keys = [t.key for t in self.targets]
            *means, loss = _mean_over_processes([grads[k] for k in keys] + [torch.tensor(total, dtype=torch.float64)],
                                                rows)
            return float(loss), dict(zip(keys, means))
        n = max(len(batches), 1)
        if not grads:
            return 0.0, {t.key: torch.zeros_like(t.current(), dtype=torch.float32) for t in self.targets}
        return total / n, {k: g.div_(n) for k, g in grads.items()}

    def gate_ggn(self, sites: dict, *, logits_fn: Callable | None = None, n_gates: int | None = None,
                 progress: bool = False) -> torch.Tensor:
        """The gate-space Gauss-Newton factor of :func:`obs_plugins.curvature.gates.gate_ggn_factor` over this
        curvature's model and calibration batches (its ``forward_fn``; eval mode, no key/value cache): ``B`` with
        ``B^T B`` the softmax cross-entropy's Gauss-Newton matrix in unit-gate coordinates."""
        return self.gate_quadratic(sites, logits_fn=logits_fn, n_gates=n_gates, progress=progress).factor

    def gate_quadratic(self, sites: dict, *, at=None, reference=None, logits_fn: Callable | None = None,
                       n_gates: int | None = None, progress: bool = False):
        """:func:`obs_plugins.curvature.gates.gate_quadratic` over this curvature's model and calibration batches:
        the gate-space Gauss-Newton factor at gates ``at`` and the gradient of the KL divergence from
        ``reference`` (the ``probs`` of an earlier call)."""
        from .gates import gate_quadratic
        raise_together(PruningInputError("batches: the gate Gauss-Newton needs the curvature's calibration "
                                          "batches") if not self.batches else None)
        with self._eval_mode():
            return gate_quadratic(self.model, sites, self.batches, n_gates=n_gates, at=at, reference=reference,
                                  forward_fn=self.forward_fn, logits_fn=logits_fn, progress=progress)

    def output_sensitivity(self, batches: Iterable | None = None, *, keys=None, per_sample: bool = False,
                           progress: bool = False) -> dict[str, torch.Tensor]:
        """Per target, for each output ``i`` of the layer, the summed squared loss gradient ``sum_rows (dL/dy_i)^2``
        (rows: tokens / positions; ``y`` the layer output): the output factor of a Kronecker-factored empirical
        Fisher, at the model's current weights.  One forward/backward pass; float64 accumulation.

        ``per_sample=False``: ``L`` is each batch's loss, averaged over batches (what the global allocation
        ranks).  ``per_sample=True``: ``L`` is the per-sample loss ``loss_i`` -- the batch loss taken to be a mean
        over the batch's leading dimension, so each gradient is multiplied by the batch size -- averaged over
        samples; then ``1/2 sum_i s_i (1/2 dw_i H dw_i^T)`` estimates the loss increase of a change ``dW``
        (Gauss-Newton; what structured removal scores).  ``keys``: only these targets."""
        from tqdm.auto import tqdm
        self._need_loss("output sensitivity")
        use = self.batches if batches is None else list(batches)
        targets = [t for t in self.targets if keys is None or t.key in keys]
        if not targets:
            raise PruningInputError(f"keys: none of {list(keys)[:3]} is a target of this curvature")
        acc = {t.key: torch.zeros(t.current().shape[out_dim(t.module)], dtype=torch.float64, device=self.device)
               for t in targets}
        seen = {t.key: False for t in targets}

        def hook(module, _args, out, _key, _kind):
            if not (torch.is_tensor(out) and out.requires_grad):
                return
            if out._is_view():   # (HF Conv1D returns a view) an in-place op on a view rebases the view's own
                out = out.clone()  # node out of the graph; a copy keeps this hook's node reachable
            # the gradient edge of this very output: an in-place op afterwards (ReLU(inplace=True), ``out += x``)
            # gives ``out`` a new node, and asking for the tensor would stop there, before this hook's node
            outs.append(torch.autograd.graph.get_gradient_edge(out))
            def on_grad(g):
                # per sample: the batch size is the model output's leading dimension (as n_samples counts it),
                # not this layer's (a sequence-first layer's leading dimension is time)
                g = g.detach().double() * (rows_now[0] if per_sample else 1.0)
                if _kind == "conv2d" and g.dim() == 3:   # an unbatched (C, H, W) output
                    g = g.unsqueeze(0)
                g = g.transpose(1, -1).reshape(-1, g.shape[1]) if _kind == "conv2d" else g.reshape(-1, g.shape[-1])
                acc[_key].add_((g * g).sum(0))
                seen[_key] = True
            out.register_hook(on_grad)
            return out

        handles = [t.module.register_forward_hook(lambda m, a, o, _k=t.key, _c=layer_kind(t.module): hook(m, a, o, _k, _c))
                   for t in targets]
        n_samples = 0
        rows_now = [1.0]   # the running batch's size, read by the gradient hooks
        outs: list = []   # this batch's layer outputs (gradient edges): the gradient is asked for them only
        try:
            with self._eval_mode(), self._weights(None), self._mid_apply_attributes(), \
                    self._only_targets_require_grad(), torch.enable_grad():
                for b in tqdm(use, desc="output sensitivity", disable=not progress, leave=False):
                    b = move(b, self.device)
                    outs.clear()
                    out = self.forward_fn(self.model, b)
                    rows_now[0] = float(_leading_dim(out))
                    n_samples += _leading_dim(out)
                    # the loss first: a target may run inside loss_fn (a fused LM-head loss) and add its output
                    loss = batch_loss(self.loss_fn, out, b)
                    # w.r.t. the layer outputs, not the weights: autograd then skips every weight-gradient product
                    if outs and loss.requires_grad:
                        torch.autograd.grad(loss, outs, allow_unused=True)
                outs.clear()
        finally:
            for h in handles:
                h.remove()
        n = n_samples if per_sample else len(use)
        if process_group() is not None:   # several processes: sums and counts over all of them
            keys = list(acc)
            *summed, extra = all_reduce_sums([acc[k] for k in keys] + [torch.tensor(
                [float(n)] + [1.0 if seen[k] else 0.0 for k in keys], dtype=torch.float64)])
            acc = dict(zip(keys, summed))
            n = int(extra[0])
            seen = {k: bool(extra[1 + j] > 0) for j, k in enumerate(keys)}
        missing = [k for k, v in seen.items() if not v]
        if missing:
            raise PruningInputError(f"curvature: layer {missing[0]} got no gradient from the loss (is it used by the "
                                    "forward pass and the loss?)")
        n = max(n, 1)
        return {k: (v / n).float() for k, v in acc.items()}

    def hvp(self, vec: Mapping[str, torch.Tensor], batches: Iterable | None = None) -> dict[str, torch.Tensor]:
        """Hessian-vector product of the mean loss w.r.t. the targets (double backward, averaged over batches,
        weighted by their rows when their sizes differ)."""
        self._need_loss("hvp")
        batches = self.batches if batches is None else list(batches)
        out = {t.key: torch.zeros_like(t.current(), dtype=torch.float32) for t in self.targets}
        missing = [t.key for t in self.targets if t.key not in vec]
        if missing:
            raise PruningInputError(f"vec: no direction for {missing[:3]}; give one tensor per target key")
        with self._eval_mode(), self._weights(None), self._mid_apply_attributes(), \
                self._only_targets_require_grad(), _double_backward_attention():
            params = self._grad_params()
            vs = [vec[t.key].to(device=p.device, dtype=p.dtype) for t, p in zip(self.targets, params)]
            rows = _rows(batches) if process_group() is not None else None
            w = rows if rows is not None else _batch_weights(batches)
            for i, b in enumerate(batches):
                b = move(b, self.device)
                loss = batch_loss(self.loss_fn, self.forward_fn(self.model, b), b)
                gs = torch.autograd.grad(loss, params, create_graph=True)
                dot = sum((g * v).sum() for g, v in zip(gs, vs))
                hv = torch.autograd.grad(dot, params)
                for t, h in zip(self.targets, hv):
                    out[t.key].add_(h.float() if w is None else h.float() * w[i])
        if rows is not None:   # several processes: the mean over every process's samples
            keys = [t.key for t in self.targets]
            return dict(zip(keys, _mean_over_processes([out[k] for k in keys], rows)))
        n = max(len(batches), 1)
        return {k: v / n for k, v in out.items()}

    # flat-vector helpers for the spectral operators
    def numel(self) -> int:
        return sum(t.current().numel() for t in self.targets)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[t.key].reshape(-1) for t in self.targets])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for t in self.targets:
            n = t.current().numel()
            out[t.key] = flat[i:i + n].reshape(t.current().shape)
            i += n
        return out

    def hvp_flat(self, v: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.hvp(self.unflatten(v.float())))

    def drop_data(self) -> None:
        """Forget the model, batches and loss (keep the statistics), e.g. to free the calibration data once the
        plan exists (a Curvature is never pickled: see ``__getstate__``)."""
        self.model, self.batches, self.loss_fn = None, [], None

    def __getstate__(self):
        raise TypeError("Curvature objects hold the model and calibration data and are not meant to be pickled; "
                        "pass them to a pruning call instead of storing them on a model")
