"""Torch-Pruning adapter: OBS, Continuous-Sparsification and BiP channel importances, OBS compensation, and
structurally pruned Hugging Face models that save and load back.

Used the ordinary Torch-Pruning way::

    curv = Curvature.layerwise(model, prunable_linear_targets(model, exclude=()), batches, loss_fn=F.cross_entropy)
    imp = OBSImportance(curv)                       # loss-scaled OBS channel saliency
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5,
                                  global_pruning=True, ignored_layers=[model.fc])
    imp.step(pruner)                                # = pruner.step(), plus the OBS update of every consumer

This module only translates: a dependency group becomes, for every layer that *consumes* the group's channels
(``prune_linear_in_channels`` / ``prune_conv_in_channels``), the column sets of those channels in its 2-D weight
view; :mod:`obs_plugins.methods.obs_iht.structured` does the maths.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize
from torch_pruning.pruner import function as tpf

from obs_plugins.errors import PruningInputError
from obs_plugins.methods.obs_iht.structured import (apply_removal, column_saliency, greedy_gate_removal,
                                                    greedy_removal, output_sensitivity, relinearized_gate_removal,
                                                    removal_operator, ridge_inverse)
from obs_plugins.targets import carries_mask, from_2d, to_2d

_IN = (tpf.prune_linear_in_channels, tpf.prune_conv_in_channels)
_OUT = (tpf.prune_linear_out_channels, tpf.prune_conv_out_channels)
CONFIG_KEY = "obs_pruned"  # where the per-layer shapes live in a saved config


def _is_in(handler) -> bool:
    return handler in _IN


def _is_out(handler) -> bool:
    return handler in _OUT


def _positions(group) -> dict[int, int]:
    """root channel index -> position in the importance vector (the root dependency's order)."""
    return {int(r): i for i, r in enumerate(group[0].root_idxs)}


def _columns_by_root(module: nn.Module, idxs, root_idxs) -> dict[int, list[int]]:
    """Columns of ``module``'s 2-D view fed by each root channel (a Conv2d input channel owns kh*kw columns; a
    Linear after a flatten gets one index per column from Torch-Pruning already)."""
    width = 1
    if isinstance(module, nn.Conv2d):
        width = module.kernel_size[0] * module.kernel_size[1]
    out: dict[int, list[int]] = {}
    for i, r in zip(idxs, root_idxs):
        out.setdefault(int(r), []).extend(range(int(i) * width, (int(i) + 1) * width))
    return out


def _strictly_increasing(x: torch.Tensor) -> torch.Tensor:
    """Break the plateaus of a running maximum by one float step each, so a threshold ``score <= t`` (Torch-
    Pruning's global rule) cuts exactly a prefix of the removal order and never a tie's worth more."""
    out = x.clone()
    inf = torch.tensor(float("inf"), dtype=x.dtype)
    for t in range(1, len(out)):
        if out[t] <= out[t - 1]:
            out[t] = torch.nextafter(out[t - 1], inf)
    return out


def _network_score_map(order, inc, gate_of: dict, n: int) -> dict:
    """``(id(consumer), input feature) -> score``: the running maximum of the increments along the removal order,
    made strictly increasing (so the pruner's threshold cuts a prefix of the order)."""
    score = torch.empty(n, dtype=torch.float32)
    score[torch.tensor(order)] = _strictly_increasing(torch.cummax(inc, 0).values.float())
    return {k: float(score[g]) for k, g in gate_of.items()}


def _group_name(group) -> str:
    dep = group[0].dep
    name = getattr(dep.target, "name", None) or type(dep.target.module).__name__
    return str(name)


class OBSImportance(tp.importance.Importance):
    """Channel importance = predicted model-loss increase of removing the channel, by Optimal Brain Surgeon.

    For every layer consuming a group's channels: ``1/2 sum_r s_r w_rP ([H^-1]_PP)^-1 w_rP^T`` over the channel's
    columns ``P`` (the layer loss left after the optimal update of the other columns), summed over consumers.

    Args:
        curvature: an :class:`obs_plugins.Curvature` from ``Curvature.layerwise`` over (at least) every layer
            that consumes prunable channels (``prunable_linear_targets(model, exclude=())`` covers all).
        compensate: score with the OBS update (``True``) or without it (``1/2 s_r w_rP H_PP w_rP^T``, the pure
            removal error: the ranking for channels that are only removed); :meth:`step` applies the update by
            default only when ``True`` (``step(pruner, update=True)`` applies it after either ranking).
        scale: ``"loss"`` (default) weights each consumer's output units by their loss sensitivity
            (:func:`~obs_plugins.methods.obs_iht.structured.output_sensitivity`, one gradient pass; needs the
            curvature's ``loss_fn``), which makes scores of different layers comparable under
            ``global_pruning=True``; ``None`` uses the bare layer errors (not comparable across layers: one layer
            then ranks lowest wholesale); or a dict ``key -> (out,)`` tensor.
        rel_damp: relative damping of each layer Gram (damping ladder, then a loud error).
        mode: ``"greedy"`` (the default with ``compensate``): channels are removed one at a time, each time the
            one adding the least loss given those already removed (kept columns updated, inverse downdated); a
            channel's score is the running maximum of those increments along the order, so a threshold keeps a
            prefix whose *joint* removal cost it measures.  With ``compensate=False`` it is the same greedy order
            on the removal error without the update (the cross terms of the channels already removed counted).
            ``"single"`` (the default without ``compensate``): each channel's saliency alone (these add up only
            while few channels go: removing many correlated channels costs far more than the sum).
        channel_blocks: ``{consumer module: b}`` -- score consecutive runs of ``b`` channels jointly (attention
            heads: the output projection with ``b = head_dim``); every channel of a block gets the block's score.
        scope: ``"layer"`` (default): the scores above, from each consumer's layer Gram.  ``"network"``: the
            removal cost in the *network* loss, ``1/2 1_S^T G 1_S`` with ``G`` the Gauss-Newton matrix of the
            softmax cross-entropy in channel-gate coordinates (:meth:`Curvature.gate_ggn`; the Fisher of the
            model's predictive distribution, through every later layer), ordered greedily and jointly over all the
            pruner's groups (cross terms between layers included); a channel's score is the running maximum of
            the increments along that order.  No update enters the score (``compensate`` only sets whether
            :meth:`step` applies the layer OBS update by default).  It is computed in :meth:`step` from the
            groups the pruner is about to prune, so prune through ``imp.step(pruner)``.  Needs classification
            logits: ``logits_fn(output, batch) -> (batch, classes)`` (default: the output or its ``.logits``).
        relinearize: ``scope="network"`` only: the rounds the removal is split into, the gate-space model taken
            again before each at the gates already removed (its Gauss-Newton matrix, and the gradient of the KL
            divergence from the dense model's predictions, which is no longer zero there).  The count each group
            loses is taken from a dry run of the pruner; under plain global pruning of single channels the rounds
            remove the count the ratio implies from any groups (never a whole group).  The plan is checked by a
            second dry run; where Torch-Pruning would not follow it (channel groups, head-dim pruning, another rule)
            the step warns and uses the dense-point ranking.  Default ``1``: one model at the dense point (one
            curvature pass instead of up to ``relinearize``).  ``8`` was chosen on the Fashion-MNIST CNN's
            validation splits (``benchmarks/structured_relinearize.py``: within 0.13 points of the best mean, 32
            rounds, at a third of its time) and gains there, but lost on MiniLM, the model no setting saw (docs/results/structured.md,
            issue 14), so it is an option, not the default.
    """

    def __init__(self, curvature, *, compensate: bool = True, scale="loss", rel_damp: float = 1e-2,
                 mode: str | None = None, channel_blocks: dict | None = None, scope: str = "layer",
                 logits_fn: Callable | None = None, relinearize: int = 1, progress: bool = False):
        if not hasattr(curvature, "hessians") or not curvature.hessians:
            raise PruningInputError("curvature: needs layer Grams; build it with Curvature.layerwise(...)")
        if scope not in ("layer", "network"):
            raise PruningInputError(f"scope: 'layer' or 'network', got {scope!r}")
        if scope == "network" and mode not in (None, "greedy"):
            raise PruningInputError(f"mode: scope='network' orders the channels greedily; got mode={mode!r}")
        if logits_fn is not None and not callable(logits_fn):
            raise PruningInputError(f"logits_fn: a callable (output, batch) -> logits, got {logits_fn!r}")
        if scope == "network" and not curvature.batches:
            raise PruningInputError("curvature: scope='network' needs the curvature's calibration batches")
        if not (isinstance(rel_damp, (int, float)) and not isinstance(rel_damp, bool) and rel_damp > 0):
            raise PruningInputError(f"rel_damp: must be a positive number, got {rel_damp!r}")
        if not (scale is None or scale == "loss" or isinstance(scale, dict)):
            raise PruningInputError(f"scale: 'loss', None or a dict key -> tensor, got {scale!r}")
        if scale == "loss" and scope == "layer":   # the network scope does not use the row weights
            curvature._need_loss("OBSImportance(scale='loss')")
        if mode not in (None, "greedy", "single"):
            raise PruningInputError(f"mode: 'greedy', 'single' or None, got {mode!r}")
        if not (isinstance(relinearize, int) and not isinstance(relinearize, bool) and relinearize >= 1):
            raise PruningInputError(f"relinearize: a positive number of rounds, got {relinearize!r}")
        if relinearize != 1 and scope != "network":
            raise PruningInputError(f"relinearize: rounds re-take the network-scope model; scope='layer' has none "
                                    f"(got relinearize={relinearize}; use scope='network')")
        self.mode = mode or ("greedy" if compensate else "single")
        self.curvature = curvature
        self.compensate = bool(compensate)
        self.rel_damp = float(rel_damp)
        self.channel_blocks = dict(channel_blocks or {})
        self.progress = progress
        self._scale_spec = scale
        self._key: dict[int, str] = {}
        self._module: dict[str, nn.Module] = {}
        for t in curvature.targets:
            if t.name == "weight" and t.key in curvature.hessians:
                self._key[id(t.module)] = t.key
                self._module[t.key] = t.module
        self._H = {k: curvature.hessians[k].to(curvature.device) for k in self._module}  # CPU under offload
        self._hinv: dict[str, torch.Tensor] = {}
        self._s: dict[str, torch.Tensor] | None = None
        self.history: list[dict] = []
        self.scope = scope
        self.logits_fn = logits_fn
        self.relinearize = relinearize
        self._net: dict | None = None    # scope="network": (id(consumer), input feature) -> channel score

    # ------------------------------------------------------------------ state
    def _row_weights(self, key: str, rows: int) -> torch.Tensor | None:
        if self._scale_spec is None:
            return None
        if self._s is None:
            if self._scale_spec == "loss":
                self._s = output_sensitivity(self.curvature, list(self._module), progress=self.progress)
            else:
                self._s = {k: torch.as_tensor(v).float().reshape(-1) for k, v in self._scale_spec.items()}
        if key not in self._s:
            raise PruningInputError(f"scale: no output sensitivity for {key}")
        s = self._s[key]
        if s.numel() != rows:
            raise PruningInputError(f"scale: {key} has {rows} output units now but {s.numel()} sensitivities; "
                                    "prune through OBSImportance.step(pruner) so the importance follows the model")
        return s

    def _layer(self, module: nn.Module):
        key = self._key.get(id(module))
        if key is None:
            return None, None, None
        W = to_2d(module, module.weight.detach())
        H = self._H[key]
        if H.shape[0] != W.shape[1]:
            raise PruningInputError(f"curvature: {key} has {W.shape[1]} input columns now but its Gram has "
                                    f"{H.shape[0]}; prune through OBSImportance.step(pruner) (it keeps the Grams in "
                                    "step with the model) or collect the curvature again")
        return key, W, H

    def _inverse(self, key: str) -> torch.Tensor:
        if key not in self._hinv:
            self._hinv[key] = ridge_inverse(self._H[key], self.rel_damp)
        return self._hinv[key]

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        if self.scope == "network":
            return self._network_scores(group)
        pos = _positions(group)
        consumers = []
        for item in group:
            dep = item.dep
            module = dep.target.module
            if not _is_in(dep.handler) or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            key, W, H = self._layer(module)
            if key is None:
                continue
            cols = {r: c for r, c in _columns_by_root(module, item.idxs, item.root_idxs).items() if r in pos}
            consumers.append((key, module, W, H, cols))
        if not consumers:
            grouped = [type(it.dep.target.module).__name__ for it in group
                       if isinstance(it.dep.target.module, nn.Conv2d) and it.dep.target.module.groups > 1]
            why = (f" (its consumer is a grouped convolution, groups > 1, which the curvature never covers: "
                   "add the producing layer to ignored_layers)" if grouped else "")
            raise PruningInputError(f"curvature: no layer consuming the channels of group {_group_name(group)} is "
                                    "among the curvature's targets; collect the curvature over every Linear/Conv2d "
                                    f"(prunable_linear_targets(model, exclude=())) or ignore that layer{why}")
        units = self._unit_roots(group, pos, [m for _, m, _, _, _ in consumers])
        scores = torch.zeros(len(pos), dtype=torch.float32)
        if self.mode == "greedy":
            layers = []
            for key, _m, W, H, cols in consumers:
                sets = [sorted(c for r in u for c in cols.get(r, ())) for u in units]
                layers.append((W, H, sets, self._row_weights(key, W.shape[0])))
            order, inc = greedy_removal(layers, len(units), rel_damp=self.rel_damp, compensate=self.compensate,
                                        progress=self.progress)
            running = _strictly_increasing(torch.cummax(inc, 0).values.float())
            for t, u in enumerate(order):
                for r in units[u]:
                    scores[pos[r]] = running[t]
        else:
            for key, _m, W, H, cols in consumers:
                live = [u for u in units if any(r in cols for r in u)]
                sets = [torch.tensor(sorted(c for r in u for c in cols.get(r, ()))) for u in live]
                sal = column_saliency(W, H, sets, row_weights=self._row_weights(key, W.shape[0]),
                                      compensate=self.compensate,
                                      hinv=self._inverse(key) if self.compensate else None)
                for u, v in zip(live, sal.tolist()):   # plain floats: the scores stay on the CPU
                    for r in u:
                        scores[pos[r]] += v
        if not torch.isfinite(scores).all():
            raise PruningInputError(f"curvature: non-finite OBS scores for group {_group_name(group)}")
        return scores

    def _unit_roots(self, group, pos: dict[int, int], consumers) -> list[list[int]]:
        """The units scored (and, in greedy orders, removed) together, as lists of root channels: single
        channels, or blocks of ``b`` channels where a consumer has ``channel_blocks`` ``b`` (heads)."""
        b = max([self.channel_blocks.get(m, 1) for m in consumers])
        if len(pos) % b:
            raise PruningInputError(f"channel_blocks: {len(pos)} channels of group {_group_name(group)} do not "
                                    f"split into blocks of {b}")
        by_pos = {p: r for r, p in pos.items()}
        return [[by_pos[p] for p in range(u * b, (u + 1) * b)] for u in range(len(pos) // b)]

    # ------------------------------------------------------------------ scope="network"
    def _units(self, group):
        """The group's consumers ``[(module, {root: [input features]})]`` and its units (lists of roots: single
        channels, or blocks of ``channel_blocks`` channels), as :meth:`__call__` scores them."""
        pos = _positions(group)
        consumers = []
        for item in group:
            module = item.dep.target.module
            if _is_in(item.dep.handler) and isinstance(module, (nn.Linear, nn.Conv2d)):
                feats: dict[int, list[int]] = {}
                for i, r in zip(item.idxs, item.root_idxs):
                    if int(r) in pos:
                        feats.setdefault(int(r), []).append(int(i))
                consumers.append((module, feats))
        if not consumers:
            raise PruningInputError(f"pruner: no Linear/Conv2d consumes the channels of group {_group_name(group)}")
        return pos, consumers, self._unit_roots(group, pos, [m for m, _ in consumers])

    def _prepare_network(self, pruner) -> None:
        """Gate every unit of the groups ``pruner`` will prune, factor the gate-space Gauss-Newton matrix on the
        current model, order the units greedily and store each channel's score (running max of increments).

        With ``relinearize > 1``: a dry run of the pruner on those scores (its state put back) tells how many
        units it removes from each group (per-layer ratios, heads) or in all (plain global pruning); that many are
        then removed in ``relinearize`` rounds (:func:`relinearized_gate_removal`), and the scores re-set so that
        the pruner removes exactly those units -- checked by a second dry run, the dense-point scores kept (with a
        warning) where it would not."""
        sites: dict[nn.Module, torch.Tensor] = {}
        gate_of: dict[tuple[int, int], int] = {}
        group_of: list[int] = []
        n, single, averaged = 0, True, False
        for gi, group in enumerate(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                            root_module_types=pruner.root_module_types)):
            if not pruner._check_pruning_ratio(group):
                continue
            attention = pruner._is_atten_group(group)[0]
            # Torch-Pruning averages scores over channel groups (whole heads only: head scores are not averaged)
            averaged = averaged or (pruner._get_channel_groups(group) > 1 and
                                    (pruner.prune_head_dims or not attention))
            if attention:   # as MetaPruner scores attention groups
                group = pruner._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            _pos, consumers, units = self._units(group)
            single = single and all(len(unit) == 1 for unit in units)
            for unit in units:
                for module, feats in consumers:
                    if module not in sites:
                        width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
                        sites[module] = torch.full((width,), -1, dtype=torch.long)
                    for r in unit:
                        for f in feats.get(r, ()):
                            sites[module][f] = n
                            gate_of[(id(module), f)] = n
                group_of.append(gi)
                n += 1
        if n == 0:
            raise PruningInputError("pruner: no group to prune (every layer ignored, or its ratio reached)")

        def take(at=None, reference=None):
            return self.curvature.gate_quadratic(sites, at=at, reference=reference, logits_fn=self.logits_fn,
                                                 n_gates=n, progress=self.progress)

        dense = take()
        self._net = _network_score_map(*greedy_gate_removal(dense.factor, progress=self.progress), gate_of, n)
        if self.relinearize == 1:
            return
        if averaged:
            warnings.warn("OBSImportance(relinearize=...): Torch-Pruning averages scores over channel groups "
                          "(grouped layers, head-dim pruning), which a per-unit plan cannot follow; this step uses "
                          "the dense-point ranking (relinearize=1)", stacklevel=3)
            return
        removed = self._removed_gates(_dry_run(pruner), gate_of)
        if not removed:
            return
        groups = torch.unique(torch.tensor(group_of), return_inverse=True)[1]
        sizes = torch.bincount(groups)
        count = _expected_global_removals(pruner) if single else None   # (it counts channels, not blocks)
        if count is not None and count <= int((sizes - 1).sum()):
            caps = sizes - 1   # one threshold: the rounds choose the groups too, and remove what the ratio implies
        else:                  # (no group whole: Torch-Pruning would skip it; if the ratio needs that, the dry run)
            caps = torch.bincount(groups[torch.tensor(sorted(removed))], minlength=len(sizes))
            count = len(removed)
        order, inc = relinearized_gate_removal(take, n, count, groups=groups, caps=caps, stages=self.relinearize,
                                               dense=dense, progress=self.progress)
        dense_scores, self._net = self._net, _network_score_map(order, inc, gate_of, n)
        if self._removed_gates(_dry_run(pruner), gate_of) != set(order[:count]):   # a rule the plan misses
            warnings.warn("OBSImportance(relinearize=...): Torch-Pruning would not remove the planned units (a "
                          "pruner option the plan does not model); this step uses the dense-point ranking "
                          "(relinearize=1)", stacklevel=3)
            self._net = dense_scores

    @staticmethod
    def _removed_gates(groups, gate_of) -> set:
        """The gate ids of the units a list of pruning groups removes (where their consumers read them)."""
        out = set()
        for g in groups:
            for item in g:
                module = item.dep.target.module
                if _is_in(item.dep.handler) and isinstance(module, (nn.Linear, nn.Conv2d)):
                    out.update(gate_of[k] for k in ((id(module), int(i)) for i in item.idxs) if k in gate_of)
        return out

    def _network_scores(self, group) -> torch.Tensor:
        if self._net is None:
            raise PruningInputError("scope: 'network' scores are computed inside OBSImportance.step(pruner) (this "
                                    "importance's, or a compensating OBSImportance's), not by pruner.step(); a "
                                    "pruner.step() that raised this has counted its step: build a new MetaPruner")
        pos, consumers, units = self._units(group)
        scores = torch.zeros(len(pos), dtype=torch.float32)
        for unit in units:
            found = [self._net.get((id(m), f)) for m, feats in consumers for r in unit for f in feats.get(r, ())]
            found = [v for v in found if v is not None]
            if not found:
                raise PruningInputError(f"scope: group {_group_name(group)} was not among the groups scored when "
                                        "this step began")
            for r in unit:
                scores[pos[r]] = found[0]
        return scores

    # ------------------------------------------------------------------ pruning with compensation
    def plan(self, group, *, update: bool | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """For one pruning group (the indices to remove), ``[(key, P, C)]`` for each consumer: the removed columns
        and the OBS update operator (``None`` without compensation).  Touches nothing."""
        out = []
        for item in group:
            dep, module = item.dep, item.dep.target.module
            if not _is_in(dep.handler) or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            key, W, H = self._layer(module)
            if key is None:
                continue
            cols = sorted(c for cs in _columns_by_root(module, item.idxs, item.idxs).values() for c in cs)
            if not cols:
                continue
            P = torch.tensor(cols)
            if self.compensate if update is None else update:
                P, C = removal_operator(H, P, hinv=self._inverse(key))
            else:
                C = None
            out.append((key, P, C))
        return out

    def step(self, pruner, *, update: bool | None = None, strict: bool = True) -> dict:
        """One ``pruner.step()`` with the OBS update: every group to prune is taken from
        ``pruner.step(interactive=True)``, every consumer's update operator is computed first (nothing changes
        if that fails), then per group the kept columns of each consumer are updated and ``group.prune()``
        removes the channels; the Grams and sensitivities follow the new shapes, so iterative steps work.

        The channels are chosen by the *pruner's* importance, so an ``OBSImportance`` can also add the OBS update
        to a built-in ranking (``MetaPruner(..., importance=tp.importance.MagnitudeImportance())``).  ``update``:
        apply the OBS update (default: ``self.compensate``); ``False`` only removes the channels.

        Under plain global pruning the number of channels Torch-Pruning is about to remove is checked against
        the count ``pruning_ratio`` implies *before* anything changes: fewer means a group was skipped whole (all
        its channels below the threshold), more means ties at the threshold (``score <= threshold``).  With
        ``strict`` (default) either raises; ``strict=False`` prunes and records both counts in the returned dict."""
        for arg, value in (("update", update), ("strict", strict)):
            if not (isinstance(value, bool) or (value is None and arg == "update")):
                raise PruningInputError(f"{arg}: True or False, got {value!r}")
        update = self.compensate if update is None else update
        _refuse_computed_weights(pruner.model, "pruner")
        expected = _expected_global_removals(pruner)
        if pruner.current_step >= pruner.iterative_steps:   # Torch-Pruning would only warn and prune nothing
            raise PruningInputError(f"pruner: its {pruner.iterative_steps} iterative step(s) are used up (a "
                                    "pruner.step() that raised still counts its step); build a new MetaPruner")
        ranking = getattr(pruner, "importance", None)   # the ranking may be another OBSImportance than self
        network = isinstance(ranking, OBSImportance) and ranking.scope == "network"
        try:
            if network:
                ranking._prepare_network(pruner)
            return self._step(pruner, expected, strict, update)
        finally:
            if network:
                ranking._net = None   # the scores belong to this step's model

    def _step(self, pruner, expected, strict, update) -> dict:
        # pruner.step() counts the step and updates head counts while it yields, before anything is pruned:
        # a refusal puts them back, so the pruner can be stepped again
        saved = _pruner_state(pruner)
        try:
            groups, plans = self._checked_groups(pruner, expected, strict, update)
        except BaseException:
            _restore(pruner, saved)
            raise
        # from the first write on, a failure (a Ctrl-C, an error inside Torch-Pruning's group.prune) puts the
        # model, the OBS importances, Torch-Pruning's dependency graph and the pruner's step back as they were
        ranking = getattr(pruner, "importance", None)
        transaction = _Transaction(pruner.model, [i for i in {id(self): self, id(ranking): ranking}.values()
                                                  if isinstance(i, OBSImportance)])
        graph = _graph_state(pruner.DG)
        try:
            removed = self._write_and_prune(pruner, groups, plans)
        except BaseException:
            transaction.rollback()
            _restore_graph(pruner.DG, graph)
            _restore(pruner, saved)
            raise
        rec = {"groups": len(groups), "root_channels_removed": removed, "implied_by_ratio": expected}
        self.history.append(rec)
        return rec

    def _write_and_prune(self, pruner, groups, plans) -> int:
        # every consumer's update first, one joint removal of all its columns this step (two groups feeding one
        # consumer, e.g. through a concatenation, share it: per-group operators would each see the other's
        # columns still there, and the second would no longer fit after the first group's prune)
        with torch.no_grad():
            for key, P, C in plans:
                m = self._module[key]
                W = to_2d(m, m.weight.detach())
                m.weight.copy_(from_2d(m, apply_removal(W, P, C), m.weight))
        removed = 0
        for g in groups:
            # the groups were all built before any was pruned; Torch-Pruning computes a concatenation's offsets
            # when it builds a group, so a branch pruned before this one left them stale: rebuild it from its
            # root, as pruner.step() does between groups
            root = g[0].dep
            g = pruner.DG.get_pruning_group(root.target.module, root.handler, list(g[0].idxs))
            drops = self._drops(g)
            g.prune()
            self._follow(drops)
            removed += len(g[0].idxs)
        return removed

    def _checked_groups(self, pruner, expected, strict, update):
        """The groups Torch-Pruning is about to prune and their update plans, after the count checks."""
        groups = list(pruner.step(interactive=True))
        got = sum(len(g[0].idxs) for g in groups)
        if strict and expected is not None and got < expected:
            raise PruningInputError(
                f"pruner: Torch-Pruning would remove {got} channels where pruning_ratio implies {expected}: a group "
                "whose channels all fell below the global threshold is skipped (it would lose every channel). "
                "Nothing was changed. Use scale='loss' (scores comparable across layers), max_pruning_ratio, or "
                "global_pruning=False (or strict=False to accept it)")
        if strict and expected is not None and got > expected:
            raise PruningInputError(
                f"pruner: Torch-Pruning would remove {got} channels where pruning_ratio implies {expected}: scores "
                "tie at the global threshold (it removes every channel <= threshold). Nothing was changed "
                "(strict=False accepts it)")
        return groups, self._joint_plan(groups, update)

    def _joint_plan(self, groups, update) -> list:
        """``(key, P, C)`` per consumer for all ``groups`` at once, in the consumers' current column order: the
        union of the columns the groups remove from it, and their joint OBS update operator (``None`` without
        the update)."""
        cols: dict[str, set[int]] = {}
        for g in groups:
            for key, P, _ in self.plan(g, update=False):
                cols.setdefault(key, set()).update(int(c) for c in P)
        out = []
        for key, cs in cols.items():
            P = torch.tensor(sorted(cs))
            if update:
                P, C = removal_operator(self._H[key], P, hinv=self._inverse(key))
            else:
                C = None
            out.append((key, P, C))
        return out

    def _drops(self, group):
        """What the group removes from layers this importance tracks: (key, 'in'|'out', indices)."""
        out = []
        for item in group:
            dep, module = item.dep, item.dep.target.module
            key = self._key.get(id(module))
            if key is None or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if _is_in(dep.handler):
                cols = sorted(c for cs in _columns_by_root(module, item.idxs, item.idxs).values() for c in cs)
                out.append((key, "in", cols))
            elif _is_out(dep.handler):
                out.append((key, "out", sorted(int(i) for i in item.idxs)))
        return out

    def _follow(self, drops):
        for key, kind, idx in drops:
            if kind == "in":
                d = self._H[key].shape[0]
                keep = torch.tensor(sorted(set(range(d)) - set(idx)), dtype=torch.long)
                self._H[key] = self._H[key][keep][:, keep]
                self._hinv.pop(key, None)
            elif self._s is not None and key in self._s:
                n = self._s[key].numel()
                keep = torch.tensor(sorted(set(range(n)) - set(idx)), dtype=torch.long)
                self._s[key] = self._s[key][keep]


def _pruner_state(pruner) -> dict:
    """What ``pruner.step()`` changes while it yields, before anything is pruned (step count, head counts)."""
    return {a: copy.copy(getattr(pruner, a)) for a in ("current_step", "num_heads", "out_channel_groups",
                                                       "_scope_initial_channels") if hasattr(pruner, a)}


def _graph_state(DG) -> tuple:
    """What pruning a group changes in Torch-Pruning's dependency graph: its history, and the maps keyed on a
    standalone parameter (a channel scale, a cls token), which a prune re-keys on the new, narrower one."""
    maps = {a: copy.copy(getattr(DG, a)) for a in ("_param_to_name", "module2node", "unwrapped_parameters",
                                                   "_pruning_history") if hasattr(DG, a)}
    return maps, [(n, n.module) for n in DG.module2node.values()]


def _restore_graph(DG, saved: tuple) -> None:
    maps, nodes = saved
    for a, v in maps.items():
        now = getattr(DG, a)
        if isinstance(now, dict) and isinstance(v, dict):
            now.clear()
            now.update(v)
        elif isinstance(now, list) and isinstance(v, list):
            now[:] = v
        else:
            setattr(DG, a, v)
    for node, module in nodes:
        node.module = module


def _restore(pruner, saved: dict) -> None:
    """Put the saved values back; dicts in place (the caller may hold ``num_heads``, Torch-Pruning shares its
    channel-group dicts)."""
    for a, v in saved.items():
        now = getattr(pruner, a, None)
        if isinstance(v, dict) and isinstance(now, dict):
            now.clear()
            now.update(v)
        else:
            setattr(pruner, a, v)


def _dry_run(pruner) -> list:
    """The groups ``pruner.step()`` would prune now, the pruner left as it was (nothing pruned)."""
    saved = _pruner_state(pruner)
    try:
        return list(pruner.step(interactive=True))
    finally:
        _restore(pruner, saved)


def _expected_global_removals(pruner) -> int | None:
    """Channels a plain global ``MetaPruner`` step must remove (``None`` where the count is not this simple:
    local pruning, heads, channel groups, user scopes, isomorphic or rounded pruning)."""
    if not pruner.global_pruning or pruner.pruning_ratio_dict or pruner.num_heads or pruner.isomorphic or \
            pruner.round_to or pruner.current_step >= pruner.iterative_steps:
        return None
    current = 0
    for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                      root_module_types=pruner.root_module_types):
        if not pruner._check_pruning_ratio(g):
            continue
        if pruner._get_channel_groups(g) != 1:
            return None
        current += pruner.DG.get_out_channels(g[0].dep.target.module)
    initial = pruner._scope_initial_channels.get("DEFAULT_SCOPE", current)
    target = pruner.per_step_pruning_ratio[pruner.current_step + 1]
    return max(current - int(initial * (1 - target)), 0)


class _ChannelScoreImportance(tp.importance.Importance):
    """Shared by :class:`CSImportance` and :class:`BiPImportance`: a finished channel-granularity search's learned
    score of each output channel (``source.scores[key]``, one per channel, shaped for broadcasting) of the group's
    *producing* layers, averaged over producers (a residual sum's branches, q/k/v of a head), higher = kept.

    ``arg`` is the argument errors name; ``finish`` how to end the search (for the error message)."""

    def __init__(self, source, *, arg: str, granularity: str, finish: str):
        if granularity != "channel":
            raise PruningInputError(f"{arg}: {type(self).__name__} needs granularity='channel' scores, got "
                                    f"granularity={granularity!r}")
        if not getattr(source, "finished", False):
            raise PruningInputError(f"{arg}: the search is still running (its gates are still on the model, where "
                                    f"Torch-Pruning would trace them); call {finish} first")
        self._source = source
        self._arg = arg
        self._finish = finish
        self._key = {id(t.module): t.key for t in source.targets if t.name == "weight"}

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        arg = self._arg
        pos = _positions(group)
        total = torch.zeros(len(pos), dtype=torch.float32)
        count = torch.zeros(len(pos), dtype=torch.float32)
        for item in group:
            dep, module = item.dep, item.dep.target.module
            key = self._key.get(id(module))
            if key is None or not _is_out(dep.handler):
                continue
            if parametrize.is_parametrized(module):
                raise PruningInputError(f"{arg}: {key} still carries a search gate; call {self._finish} first")
            s = self._source.scores[key].detach().reshape(-1).float().cpu()
            n = module.weight.shape[0]
            if s.numel() != n:
                raise PruningInputError(f"{arg}: {key} has {n} output channels but {s.numel()} scores (was the "
                                        "layer pruned after the search?)")
            for i, r in zip(item.idxs, item.root_idxs):
                if int(r) in pos:
                    total[pos[int(r)]] += s[int(i)]
                    count[pos[int(r)]] += 1
        if not bool((count > 0).any()):
            raise PruningInputError(f"{arg}: no layer producing the channels of group {_group_name(group)} has "
                                    f"learned channel scores; include it in the {arg}'s params")
        return total / count.clamp(min=1)


class CSImportance(_ChannelScoreImportance):
    """Channel importance from a finished Continuous Sparsification search with ``granularity="channel"``: the
    learned mask score ``s`` of each output channel of the group's producing layers (mean over producers).

    Args:
        sparsifier: an :class:`obs_plugins.ContinuousSparsifier` built with ``granularity="channel"`` whose search
            has finished (``cs.finish()``; the gates must be gone before Torch-Pruning traces the model).
    """

    def __init__(self, sparsifier):
        from obs_plugins.methods.continuous_sparsification import ContinuousSparsifier
        if not isinstance(sparsifier, ContinuousSparsifier):
            raise PruningInputError(f"sparsifier: expected a ContinuousSparsifier, got {type(sparsifier).__name__}")
        super().__init__(sparsifier, arg="sparsifier", granularity=sparsifier.config.granularity,
                         finish="cs.finish()")
        self.sparsifier = sparsifier


class BiPImportance(_ChannelScoreImportance):
    """Channel importance from a finished BiP search with ``granularity="channel"``: the learned upper-level score
    ``s`` of each output channel of the group's producing layers (mean over producers).  BiP keeps the top-k
    scores, so a higher score is a more important channel.

    Args:
        trainer: an :class:`obs_plugins.BiPTrainer` built with ``granularity="channel"`` whose search has finished
            (``bip.finish()``, or ``fit`` with ``finish=True``; the gates must be gone before Torch-Pruning traces
            the model).  ``finish()`` leaves the weights the search trained in the model; load other weights
            (e.g. the dense ones) first if only the ranking is wanted.

    The scores are not normalised across layers (they start as each channel's mean ``|w|``, so a wide-fan-in
    layer ranks low wholesale): under ``global_pruning=True`` Torch-Pruning skips a layer whose channels all fall
    below the threshold; :meth:`OBSImportance.step` refuses that (``strict``), or prune per layer.
    """

    def __init__(self, trainer):
        from obs_plugins.methods.bip import BiPTrainer
        if not isinstance(trainer, BiPTrainer):
            raise PruningInputError(f"trainer: expected a BiPTrainer, got {type(trainer).__name__}")
        super().__init__(trainer, arg="trainer", granularity=trainer.config.granularity, finish="bip.finish()")
        self.trainer = trainer


# ====================================================================================================== HF models
def _attention_blocks(model: nn.Module):
    """(BERT-style self-attention modules, Llama-style attention modules) in the model."""
    bert, llama = [], []
    for _, m in model.named_modules():
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")):
            bert.append(m)
        elif all(isinstance(getattr(m, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            llama.append(m)
    return bert, llama


def _ffn_blocks(model: nn.Module):
    """[(producer Linears, consumer Linear)] of every FFN: BERT intermediate.dense -> output.dense, Llama
    gate_proj/up_proj -> down_proj."""
    out = []
    for _, m in model.named_modules():
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            out.append(([m.gate_proj, m.up_proj], m.down_proj))
        inter, outp = getattr(m, "intermediate", None), getattr(m, "output", None)
        if inter is not None and isinstance(getattr(inter, "dense", None), nn.Linear) and \
                isinstance(getattr(outp, "dense", None), nn.Linear):
            out.append(([inter.dense], outp.dense))
    return out


def _bert_output_dense(model, sa):
    for _, m in model.named_modules():
        att = getattr(m, "self", None)
        if att is sa and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear):
            return m.output.dense
    return None


def _hf_output_transform(out):
    for name in ("logits", "last_hidden_state"):
        v = getattr(out, name, None)
        if v is not None:
            return v.sum()
    if isinstance(out, (tuple, list)):
        return out[0].sum()
    return out.sum()


def transformer_channel_blocks(model: nn.Module) -> dict:
    """``{attention output projection: head_dim}`` for :class:`OBSImportance`'s joint head scores."""
    bert, _ = _attention_blocks(model)
    blocks = {}
    for sa in bert:
        od = _bert_output_dense(model, sa)
        if od is not None:
            blocks[od] = int(sa.attention_head_size)
    return blocks


def _refuse_computed_weights(model: nn.Module, arg: str) -> None:
    """Torch-Pruning resizes ``module.weight`` in place of the module's own tensors: where the weight is computed
    (torch.nn.utils.prune's ``weight_orig * weight_mask`` hook, a torch.ao sparsifier's or a CS / BiP search's
    parametrization) it put a new ``weight`` beside them, returned without a word, and the model's next forward
    failed.  Refused before anything changes."""
    found = [name or type(m).__name__ for name, m in model.named_modules() if carries_mask(m)]
    if found:
        raise PruningInputError(
            f"{arg}: {len(found)} module(s) still carry unstructured masks or gates (torch.nn.utils.prune, a "
            f"torch.ao sparsifier, a CS / BiP search), e.g. {found[:3]}; structured pruning resizes their weights "
            "and would break them. Bake them first: prune.remove(module, 'weight') (sparsifier.squash_mask(), "
            "search.finish()); nothing was changed")


def prune_transformer(model: nn.Module, example_inputs, importance, ratio: float, *, heads: bool = True,
                      ffn: bool = True, head_ratio: float | None = None, global_pruning: bool = False,
                      forward_fn: Callable | None = None, compensation: "OBSImportance | None" = None,
                      update: bool | None = None, before_pass: Callable | None = None) -> dict:
    """Structured pruning of a Hugging Face BERT-style (MiniLM) or Llama-style (SmolLM2) model in place.

    The recipe: attention heads (BERT: whole heads of query/key/value with ``num_heads``, ``prune_num_heads=True``,
    ``prune_head_dims=False``; Llama attention is kept) and FFN channels (BERT ``intermediate.dense`` ->
    ``output.dense``; Llama ``gate_proj``/``up_proj`` -> ``down_proj``); the hidden size, embeddings, pooler and
    heads stay.  Heads and FFN channels are two Torch-Pruning passes, so ``global_pruning=True`` ranks heads against
    heads and channels against channels and removes exactly the implied counts.  ``importance`` is any
    Torch-Pruning importance; an :class:`OBSImportance` prunes through its :meth:`~OBSImportance.step` (with
    the OBS update).  Then the attention modules' head counts and the config are updated in place
    (:func:`update_config`).  Returns the per-layer shapes.

    ``compensation``: an :class:`OBSImportance` that adds the OBS update to another importance's ranking
    (default: ``importance`` itself when it is one); ``update`` as in :meth:`OBSImportance.step`.
    ``before_pass(model)`` runs before each Torch-Pruning pass (e.g. to fill the gradients Taylor/Hessian
    importances read).
    """
    for arg, value in (("ratio", ratio), ("head_ratio", head_ratio)):
        if value is None and arg == "head_ratio":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise PruningInputError(f"{arg}: a fraction in [0, 1), got {value!r}")
    bert, llama = _attention_blocks(model)
    ffns = _ffn_blocks(model)
    if not bert and not ffns:
        raise PruningInputError("model: no BERT-style attention or FFN blocks found")
    if getattr(model, "config", None) is None:
        raise PruningInputError("model: prune_transformer records the pruned shapes in a Hugging Face model's "
                                "config (model.config), and this model has none; prune it with a "
                                "tp.pruner.MetaPruner (and OBSImportance.step for the OBS update)")
    head_ratio = ratio if head_ratio is None else head_ratio
    do_heads = bool(heads and bert and head_ratio > 0)
    do_ffn = bool(ffn and ffns and ratio > 0)
    # everything that can refuse is checked before the first pass changes the model
    _refuse_computed_weights(model, "model")
    if not global_pruning:   # Torch-Pruning skips, without a word, a layer its rounding would empty
        for sa in (bert if do_heads else []):
            n = int(sa.num_attention_heads)
            if math.ceil(head_ratio * n) >= n:
                raise PruningInputError(f"head_ratio: {head_ratio} removes all {n} heads of a layer "
                                        f"(ceil({head_ratio} x {n})); keep at least one")
        for prods, _ in (ffns if do_ffn else []):
            w = prods[0].out_features
            if int(w * (1 - ratio)) < 1:
                raise PruningInputError(f"ratio: {ratio} removes all {w} FFN channels of a layer; keep at least one")
    for imp in (importance, compensation):
        if isinstance(imp, OBSImportance):
            need = ([_bert_output_dense(model, sa) for sa in bert] if do_heads else []) + \
                   ([cons for _, cons in ffns] if do_ffn else [])
            missing = [type(m).__name__ for m in need if m is not None and id(m) not in imp._key]
            if missing:
                raise PruningInputError(f"curvature: {len(missing)} layer(s) consuming the pruned heads/channels "
                                        "are not among the OBSImportance curvature's targets; collect it over every "
                                        "Linear (prunable_linear_targets(model, exclude=())). Nothing was changed")
    all_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embeds = [m for m in model.modules() if isinstance(m, nn.Embedding)]

    def run(keep_roots, extra, pass_ratio):
        keep_ids = {id(m) for m in keep_roots}
        ignored = [m for m in all_linear if id(m) not in keep_ids] + embeds
        if before_pass is not None:
            before_pass(model)
        pr = tp.pruner.MetaPruner(model, example_inputs, importance=importance, pruning_ratio=pass_ratio,
                                  ignored_layers=ignored, global_pruning=global_pruning, forward_fn=forward_fn,
                                  output_transform=_hf_output_transform, **extra)
        comp = compensation if compensation is not None else (importance if isinstance(importance, OBSImportance)
                                                              else None)
        if comp is not None:
            comp.step(pr, update=update)
        else:
            pr.step()

    def check_global(what, before, after, pass_ratio):
        # Torch-Pruning's global count (total - int(total * (1 - ratio))); it skips, without a word, a layer
        # whose units all fall below the threshold, and removes every tie at it
        implied = before - int(before * (1 - pass_ratio))
        if before - after != implied:
            raise PruningInputError(
                f"global_pruning: Torch-Pruning removed {before - after} {what} where ratio {pass_ratio} implies "
                f"{implied} ({'a layer whose units all ranked below the global threshold is skipped whole' if before - after < implied else 'scores tie at the global threshold'}); nothing was changed. Use "
                "scores comparable across layers (OBSImportance's scale='loss'), or global_pruning=False")

    # a failure in either pass (a refusal, a solve) puts the model and the OBS importances back as they were
    transaction = _Transaction(model, [i for i in (importance, compensation) if isinstance(i, OBSImportance)])
    try:
        for imp in (importance, compensation):  # joint head scores for OBS unless the caller chose blocks
            if isinstance(imp, OBSImportance) and not imp.channel_blocks:
                imp.channel_blocks.update(transformer_channel_blocks(model))
        if do_heads:
            nh = {}
            for sa in bert:
                for lin in (sa.query, sa.key, sa.value):
                    nh[lin] = int(sa.num_attention_heads)
            heads_before = sum(int(sa.num_attention_heads) for sa in bert)
            # the head pass's pruning_ratio only has to be > 0 (Torch-Pruning skips a pass whose ratio is 0)
            run(list(nh), dict(num_heads=nh, prune_num_heads=True, prune_head_dims=False,
                               head_pruning_ratio=head_ratio), head_ratio)
            for sa in bert:
                sa.num_attention_heads = sa.query.out_features // sa.attention_head_size
                sa.all_head_size = sa.query.out_features
            if global_pruning:
                check_global("heads", heads_before, sum(int(sa.num_attention_heads) for sa in bert), head_ratio)
        if do_ffn:
            width = sum(prods[0].out_features for prods, _ in ffns)
            run([p for prods, _ in ffns for p in prods], {}, ratio)
            if global_pruning:
                check_global("FFN channels", width, sum(prods[0].out_features for prods, _ in ffns), ratio)
        return update_config(model)
    except BaseException:
        transaction.rollback()
        raise


class _Transaction:
    """The state structural pruning changes, to put back on failure: every module's parameters and buffers (the
    objects, and their values: the OBS update writes in place before Torch-Pruning swaps in narrower tensors),
    its plain attributes (``out_features``, ``num_attention_heads``...), and the OBS importances' own state
    (Grams, sensitivities, factors, history, channel blocks).  One copy of the weights while it is held."""

    def __init__(self, model: nn.Module, importances) -> None:
        self.modules = []
        for m in model.modules():
            # the objects themselves (a shared config must stay one object); Torch-Pruning rebinds, not mutates
            plain = {k: v for k, v in m.__dict__.items() if not k.startswith("_")}
            tensors = {**{k: v for k, v in m._parameters.items() if v is not None},
                       **{k: v for k, v in m._buffers.items() if v is not None}}
            self.modules.append((m, plain, dict(m._parameters), dict(m._buffers),
                                 {k: v.detach().clone() for k, v in tensors.items()}))
        self.importances = [(imp, {k: (v, copy.copy(v)) for k, v in vars(imp).items() if isinstance(v, (dict, list))})
                            for imp in importances]

    def rollback(self) -> None:
        for m, plain, params, buffers, values in self.modules:
            for k in [k for k in m.__dict__ if not k.startswith("_") and k not in plain]:
                del m.__dict__[k]
            m.__dict__.update(plain)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            with torch.no_grad():
                for k, v in values.items():
                    (params.get(k) if k in params else buffers[k]).copy_(v)
        for imp, state in self.importances:   # the same dict / list objects, their contents put back
            for k, (obj, saved) in state.items():
                if isinstance(obj, dict):
                    obj.clear()
                    obj.update(saved)
                else:
                    obj[:] = saved
                setattr(imp, k, obj)


def update_config(model: nn.Module, original: dict | None = None) -> dict:
    """Record the pruned shapes in ``model.config`` *in place* (replacing the config object would drop private
    fields such as ``_attn_implementation``): ``num_attention_heads`` / ``intermediate_size`` when every layer
    agrees, and ``config.obs_pruned`` = the original sizes, every Linear whose shape changed and the attention
    modules' head counts, which :func:`load_pruned` uses to rebuild the model before loading its weights."""
    cfg = model.config
    prev = getattr(cfg, CONFIG_KEY, None) or {}
    orig = dict(prev.get("original") or original or {})
    for k in ("num_attention_heads", "intermediate_size"):
        if k not in orig and hasattr(cfg, k):
            orig[k] = getattr(cfg, k)
    ref = _reference_shapes(model, orig)
    modules, attrs = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ref.get(name) != (m.out_features, m.in_features):
            modules[name] = [m.out_features, m.in_features, m.bias is not None]
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")):
            attrs[name] = {"num_attention_heads": int(m.num_attention_heads), "all_head_size": int(m.all_head_size)}
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
            attrs[name] = {"intermediate_size": int(m.gate_proj.out_features)}
    heads = sorted({a["num_attention_heads"] for a in attrs.values() if "num_attention_heads" in a})
    inter = sorted({prods[0].out_features for prods, _ in _ffn_blocks(model)})
    info = {"original": orig, "modules": modules, "attributes": attrs,
            "attn_implementation": getattr(cfg, "_attn_implementation", None)}
    if len(heads) == 1 and hasattr(cfg, "num_attention_heads"):
        cfg.num_attention_heads = heads[0]
    if len(inter) == 1 and hasattr(cfg, "intermediate_size"):
        cfg.intermediate_size = inter[0]
    setattr(cfg, CONFIG_KEY, info)
    return info


def _reference_shapes(model: nn.Module, orig: dict) -> dict:
    """Linear shapes of the unpruned architecture (built on the meta device from the original sizes)."""
    cfg = copy.deepcopy(model.config)
    for k, v in orig.items():
        setattr(cfg, k, v)
    if hasattr(cfg, CONFIG_KEY):
        delattr(cfg, CONFIG_KEY)
    with torch.device("meta"):
        ref = type(model)(cfg)
    return {n: (m.out_features, m.in_features) for n, m in ref.named_modules() if isinstance(m, nn.Linear)}


def load_pruned(path, model_class=None, **config_kwargs) -> nn.Module:
    """Load a structurally pruned model saved with ``save_pretrained``: the architecture is built from the
    original sizes recorded in ``config.obs_pruned``, every pruned Linear is replaced by one of its saved shape,
    the attention modules get their head counts, then the saved weights are loaded (strictly: missing or
    unexpected keys other than tied weights are an error).  ``model_class`` defaults to the saved
    ``config.architectures[0]`` from ``transformers``."""
    import transformers
    from safetensors.torch import load_file

    cfg = transformers.AutoConfig.from_pretrained(path, **{k: v for k, v in config_kwargs.items()
                                                           if k not in ("attn_implementation", "dtype", "torch_dtype")})
    info = getattr(cfg, CONFIG_KEY, None)
    if not info:
        raise PruningInputError(f"path: {path} has no '{CONFIG_KEY}' entry in its config; it was not saved from a "
                                "model pruned with obs_plugins.integrations.torch_pruning (use from_pretrained)")
    if model_class is None:
        archs = getattr(cfg, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise PruningInputError("model_class: the config names no transformers architecture; pass model_class")
        model_class = getattr(transformers, archs[0])
    pruned_values = {k: getattr(cfg, k) for k in info["original"] if hasattr(cfg, k)}
    for k, v in info["original"].items():
        setattr(cfg, k, v)
    attn = config_kwargs.get("attn_implementation", info.get("attn_implementation"))
    if attn is not None:  # the saved model's own attention kernel: another one masks padded rows differently
        cfg._attn_implementation = attn
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise PruningInputError(f"path: no .safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    asked = config_kwargs.get("dtype", config_kwargs.get("torch_dtype"))
    dtype = asked
    if dtype is None or dtype == "auto":   # the saved weights' own floating dtype (as from_pretrained's "auto")
        dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
        if dtype is None:
            dtype = torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise PruningInputError(f"dtype: a floating torch dtype, its name or 'auto', got {asked!r}")
    cfg.dtype = dtype   # what from_pretrained records (a later save_pretrained writes it)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in that dtype, as from_pretrained does (fp32 buffers stay fp32)
    try:
        model = model_class(cfg)
    finally:
        torch.set_default_dtype(prev)
    for name, (out_f, in_f, bias) in info["modules"].items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, leaf)
        setattr(owner, leaf, nn.Linear(in_f, out_f, bias=bias, dtype=old.weight.dtype))
    for name, values in info["attributes"].items():
        m = model.get_submodule(name)
        for k, v in values.items():
            setattr(m, k, v)
    for k, v in pruned_values.items():  # the config object stays the model's own: fields updated in place
        setattr(cfg, k, v)
    res = model.load_state_dict(state, strict=False)
    tied = set()
    tw = getattr(model, "_tied_weights_keys", None) or []
    tied.update(tw if isinstance(tw, (list, tuple, set)) else list(tw))
    missing = [k for k in res.missing_keys if k not in tied]
    if missing or res.unexpected_keys:
        raise PruningInputError(f"path: weights do not match the recorded shapes (missing {missing[:5]}, "
                                f"unexpected {res.unexpected_keys[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


__all__ = ["OBSImportance", "CSImportance", "BiPImportance", "prune_transformer", "transformer_channel_blocks",
           "update_config", "load_pruned", "CONFIG_KEY"]
