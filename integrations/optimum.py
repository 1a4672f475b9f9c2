"""Hugging Face / Optimum adapter: a pruning config, a one-shot ``Pruner`` and a gradual ``PruningCallback``.

Optimum 2.3 ships no pruning (the old routes through optimum-intel were removed), so this follows its own
patterns: :class:`PruningConfig` subclasses ``optimum.configuration_utils.BaseConfig`` (``pruning_config.json``
beside the model, ``save_pretrained``/``from_pretrained``), and :class:`Pruner` has the shape of
``optimum.quantization_base.OptimumQuantizer`` (``from_pretrained`` then an action that writes ``save_dir``)::

    config = PruningConfig(method="obs_iht", sparsity=0.5, num_samples=64, seq_len=256)
    pruner = Pruner.from_pretrained("path/to/model")          # or an nn.Module (+ tokenizer=)
    pruner.prune(config, calibration_dataset=texts, save_dir="out", export="onnx")
    AutoModelForCausalLM.from_pretrained("out")               # plain weights, zeros baked in

    trainer = Trainer(..., callbacks=[PruningCallback(PruningConfig(method="cs", sparsity=0.7))])

Everything here translates: targets, calibration batches and schedules are handed to the public core API
(``Curvature.layerwise`` + ``api.prune``, ``ContinuousSparsifier``, ``PrunePlan``).  Bad input raises
``PruningInputError`` naming the field, before any weight changes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from optimum.configuration_utils import BaseConfig
from optimum.quantization_base import OptimumQuantizer
from torch import nn
from transformers import TrainerCallback

import obs_plugins
from obs_plugins import api
from obs_plugins.curvature import Curvature
from obs_plugins.errors import PruningInputError, check_writable
from obs_plugins.lm import save_plain  # noqa: F401  (re-exported: it lived here)
from obs_plugins.masks import bake, count_to_reach, parse_nm
from obs_plugins.registry import CONFIG_FORMAT_VERSION, config_from_dict, config_to_dict, get_method, list_methods
from obs_plugins.targets import check_tied, is_hf_conv1d, resolve_targets, warn_unpruned

PRUNING_CONFIG_VERSION = 1


# ---------------------------------------------------------------- which method goes which way
@dataclass(frozen=True)
class MethodRoute:
    """How the Hugging Face adapter drives a registered method.

    one_shot: ``Pruner.prune`` can run it (a solver on layer curvature / weights);
    gradual:  the ``PruningCallback`` schedule: "cubic" (Zhu & Gupta, one-shot plans at growing sparsity),
              "cs" (Continuous Sparsification's temperature schedule), "bip" (BiP's alternating weight / mask
              updates at the target sparsity) or None (not available in training);
    nm:       it takes an "N:M" pattern (through its config's ``nm`` field);
    curvature: it needs layer curvature (calibration batches).
    """
    one_shot: bool
    gradual: str | None
    nm: bool
    curvature: bool


ROUTES: dict[str, MethodRoute] = {
    "obs_iht": MethodRoute(one_shot=True, gradual="cubic", nm=True, curvature=True),
    "magnitude": MethodRoute(one_shot=True, gradual="cubic", nm=True, curvature=False),
    "wanda": MethodRoute(one_shot=True, gradual="cubic", nm=True, curvature=True),
    "continuous_sparsification": MethodRoute(one_shot=False, gradual="cs", nm=False, curvature=False),
    "bip": MethodRoute(one_shot=False, gradual="bip", nm=False, curvature=False),
}
ALIASES = {"cs": "continuous_sparsification", "continuous-sparsification": "continuous_sparsification",
           "obs-iht": "obs_iht", "obsiht": "obs_iht"}

DEFAULT_EXCLUDE = (r"embed", r"(^|\.)lm_head$", r"pooler", r"classifier", r"(^|\.)score$", r"qa_outputs",
                   r"norm", r"(^|\.)wpe$", r"(^|\.)wte$", r"(^|\.)lora_")   # PEFT adapters: low rank, B starts at 0
PATTERNS_STRUCTURED = ("heads", "channels")


def normalize_method(method) -> str:
    """The registry name of ``method`` (aliases such as "cs" resolved); PruningInputError if unknown."""
    if not isinstance(method, str) or not method:
        raise PruningInputError(f"method: expected a method name, got {method!r}")
    name = ALIASES.get(method.strip().lower(), method.strip().lower())
    known = list_methods()
    if name not in known:
        raise PruningInputError(f"method: unknown pruning method {method!r}; registered: {', '.join(known)} "
                                f"(aliases: {', '.join(sorted(ALIASES))})")
    if name not in ROUTES:
        raise PruningInputError(f"method: {name!r} is registered but the Hugging Face adapter has no route for it "
                                f"yet (add it to obs_plugins.integrations.optimum.ROUTES)")
    return name


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# ---------------------------------------------------------------- the config
class PruningConfig(BaseConfig):
    """What to prune, how, and with which calibration data (``pruning_config.json``).

    method:        a registered method name (``obs_plugins.list_methods()``) or an alias ("cs").
    sparsity:      fraction of the selected weights to remove, in [0, 1); exact (torch's rounding); weights a
                   torch.nn.utils.prune mask already removes count as removed.  For an "N:M" pattern it must be
                   None or N/M.
    pattern:       "unstructured" or "N:M" (e.g. "2:4").  "heads"/"channels" go through the Torch-Pruning adapter.
    include, exclude: regular expressions (``re.search``) on qualified module names; a Linear/Conv1D/Conv2d is
                   pruned when it matches some ``include`` (None: every one) and no ``exclude``.  The default
                   ``exclude`` keeps embeddings, norms, the LM head, poolers, classifier/score heads and PEFT
                   LoRA adapters (``lora_A`` / ``lora_B``) dense.
    num_samples, seq_len, batch_size: calibration (windows of ``seq_len`` tokens; ``num_samples`` in total).
    method_config: the method's own dataclass config (an instance, or the dict of
                   ``obs_plugins.config_to_dict``); stored versioned and allow-listed.  None: its defaults.
    begin_step, end_step, frequency, initial_sparsity, curvature_batches: the ``PruningCallback`` schedule —
                   cubic (Zhu & Gupta) from ``initial_sparsity`` at ``begin_step`` to ``sparsity`` at
                   ``end_step`` (None: 75% of the training steps), a pruning step every ``frequency`` optimizer
                   steps (None: ~10 steps in the ramp); OBS-IHT/Wanda re-collect layer curvature from
                   ``curvature_batches`` fresh training batches at every pruning step.  For CS the ramp holds
                   its rounds x epochs temperature schedule.
    """

    CONFIG_NAME = "pruning_config.json"
    FULL_CONFIGURATION_FILE = "pruning_config.json"
    FIELDS = ("method", "sparsity", "pattern", "include", "exclude", "num_samples", "seq_len", "batch_size",
              "method_config", "begin_step", "end_step", "frequency", "initial_sparsity", "curvature_batches")
    STAMPS = ("pruning_config_version", "obs_plugins_version", "optimum_version", "transformers_version")
    # what transformers' config loading passes along besides the fields (handed to PretrainedConfig, not stored)
    HF_INTERNAL = ("_commit_hash", "_name_or_path", "_from_auto", "_from_pipeline", "_auto_class",
                   "_configuration_file", "_attn_implementation_autoset")

    def __init__(self, method: str = "obs_iht", sparsity: float | None = 0.5, pattern: str = "unstructured",
                 include=None, exclude=DEFAULT_EXCLUDE, num_samples: int = 64, seq_len: int = 256,
                 batch_size: int = 4, method_config=None, begin_step: int = 0, end_step: int | None = None,
                 frequency: int | None = None, initial_sparsity: float = 0.0, curvature_batches: int = 4,
                 **kwargs):
        version = kwargs.pop("pruning_config_version", PRUNING_CONFIG_VERSION)
        if type(version) is not int or version != PRUNING_CONFIG_VERSION:
            raise PruningInputError(f"pruning_config_version: this obs-plugins reads version "
                                    f"{PRUNING_CONFIG_VERSION} (an int), got {version!r}")
        for stamp in self.STAMPS[1:]:
            kwargs.pop(stamp, None)
        unknown = sorted(k for k in kwargs if k not in self.HF_INTERNAL)
        if unknown:
            raise PruningInputError(f"{unknown[0]}: not a PruningConfig field (unknown: {unknown}); "
                                    f"fields: {', '.join(self.FIELDS)}")
        for field, value in (("include", include), ("exclude", exclude)):
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, (list, tuple)) and all(isinstance(r, str) for r in value)):
                raise PruningInputError(f"{field}: a regular expression or a list of them, got {value!r}")
        self.method = normalize_method(method)
        route = ROUTES[self.method]
        self.sparsity = sparsity
        self.pattern = pattern
        self.include = None if include is None else list(include) if not isinstance(include, str) else [include]
        self.exclude = [] if exclude is None else list(exclude) if not isinstance(exclude, str) else [exclude]
        self.num_samples, self.seq_len, self.batch_size = num_samples, seq_len, batch_size
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.initial_sparsity, self.curvature_batches = initial_sparsity, curvature_batches

        if not isinstance(pattern, str):
            raise PruningInputError(f"pattern: 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
        if pattern in PATTERNS_STRUCTURED:
            raise PruningInputError(f"pattern: {pattern!r} is structured pruning, which goes through the "
                                    "Torch-Pruning adapter (obs_plugins.integrations.torch_pruning); this config "
                                    "takes 'unstructured' or 'N:M'")
        nm = None
        if pattern != "unstructured":
            try:
                nm = parse_nm(pattern)
            except PruningInputError:
                raise PruningInputError(f"pattern: 'unstructured', 'N:M' (e.g. '2:4'), got {pattern!r}") from None
            if not route.nm:
                raise PruningInputError(f"pattern: {self.method} supports only 'unstructured', got {pattern!r}")
        if nm is not None:
            if sparsity is not None and (not _number(sparsity) or abs(sparsity - nm[0] / nm[1]) > 1e-9):
                raise PruningInputError(f"sparsity: the {pattern} pattern prunes exactly {nm[0] / nm[1]}; give "
                                        f"sparsity=None or {nm[0] / nm[1]}, got {sparsity!r}")
            self.sparsity = nm[0] / nm[1]
        elif not _number(sparsity) or not 0.0 <= sparsity < 1.0:
            raise PruningInputError(f"sparsity: a fraction in [0, 1), got {sparsity!r}")
        for field in ("include", "exclude"):
            for rx in getattr(self, field) or []:
                try:
                    re.compile(rx)
                except (re.error, TypeError) as e:
                    raise PruningInputError(f"{field}: {rx!r} is not a regular expression ({e})") from None
        for field in ("num_samples", "seq_len", "batch_size", "curvature_batches"):
            if not _pos_int(getattr(self, field)):
                raise PruningInputError(f"{field}: a positive int, got {getattr(self, field)!r}")
        if isinstance(begin_step, bool) or not isinstance(begin_step, int) or begin_step < 0:
            raise PruningInputError(f"begin_step: an int >= 0, got {begin_step!r}")
        if end_step is not None and (not _pos_int(end_step) or end_step <= begin_step):
            raise PruningInputError(f"end_step: None or an int > begin_step ({begin_step}), got {end_step!r}")
        if frequency is not None and not _pos_int(frequency):
            raise PruningInputError(f"frequency: None or a positive int, got {frequency!r}")
        if not _number(initial_sparsity) or not 0.0 <= initial_sparsity <= self.sparsity:
            raise PruningInputError(f"initial_sparsity: a fraction in [0, sparsity={self.sparsity}], "
                                    f"got {initial_sparsity!r}")
        self.method_config = self._method_config_dict(method_config, nm)
        super().__init__(**kwargs)

    def _method_config_dict(self, method_config, nm) -> dict:
        spec = get_method(self.method)
        explicit = set()   # fields the caller set in method_config (a dict's keys, a dataclass's non-defaults)
        if method_config is None:
            obj = spec.config_cls()
        elif isinstance(method_config, dict):
            data = method_config
            if "format_version" not in data:  # a bare field dict: wrap it
                data = {"format_version": CONFIG_FORMAT_VERSION, "method": self.method, "config": data}
            if isinstance(data.get("config"), dict):
                explicit = set(data["config"])
            name = data.get("method")
            try:
                name = normalize_method(name)
            except PruningInputError:
                raise PruningInputError(f"method_config: names method {name!r}, not a registered one") from None
            if name != self.method:
                raise PruningInputError(f"method_config: is for {name!r} but method is {self.method!r}")
            try:
                obj = config_from_dict({**data, "method": name})
            except (ValueError, TypeError, KeyError) as e:
                raise PruningInputError(f"method_config: {e}") from None
        elif dataclasses.is_dataclass(method_config) and not isinstance(method_config, type):
            if type(method_config) is not spec.config_cls:
                raise PruningInputError(f"method_config: a {type(method_config).__name__}, but method "
                                        f"{self.method!r} takes a {spec.config_cls.__name__}")
            obj = method_config
            explicit = {f.name for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING
                        and getattr(obj, f.name) != f.default}
        else:
            raise PruningInputError(f"method_config: a {spec.config_cls.__name__}, its dict, or None; got "
                                    f"{type(method_config).__name__}")
        if nm is not None:
            own = getattr(obj, "nm", None)
            if own is not None and parse_nm(own) != nm:
                raise PruningInputError(f"method_config: nm={own!r} contradicts pattern={self.pattern!r}")
            obj = dataclasses.replace(obj, nm=f"{nm[0]}:{nm[1]}")
        elif getattr(obj, "nm", None) is not None:
            raise PruningInputError(f"method_config: nm={obj.nm!r} but pattern='unstructured'; set the pattern "
                                    "in PruningConfig.pattern")
        if any(f.name == "sparsity" for f in dataclasses.fields(obj)):   # BiP: one sparsity, the top-level one
            own = obj.sparsity
            if "sparsity" in explicit and not (_number(own) and abs(own - self.sparsity) <= 1e-12):
                raise PruningInputError(f"method_config: sparsity={own!r} contradicts sparsity={self.sparsity!r}; "
                                        "PruningConfig.sparsity is the one used (leave it out of method_config)")
            obj = dataclasses.replace(obj, sparsity=self.sparsity)
        if hasattr(obj, "validate"):
            obj.validate()
        return config_to_dict(obj)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """As transformers' ``from_dict`` (and so ``from_pretrained``), but pruning fields given as keyword
        arguments go through ``__init__``'s checks with the rest (transformers would ``setattr`` them unchecked).
        A new ``method`` without a ``method_config`` starts from that method's defaults."""
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.FIELDS}
        if not kwargs.get("return_unused_kwargs", False):
            # transformers drops a keyword it cannot place; a misspelt pruning field would then be lost silently
            known = set(cls.HF_INTERNAL) | set(cls.STAMPS) | {
                "num_labels", "attn_implementation", "experts_implementation", "output_attentions", "torch_dtype",
                "dtype", "name_or_path", "return_unused_kwargs"}
            unknown = sorted(k for k in kwargs if k not in known)
            if unknown:
                import difflib
                near = difflib.get_close_matches(unknown[0], cls.FIELDS, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise PruningInputError(f"{unknown[0]}: not a PruningConfig field{hint}; the fields are "
                                        f"{', '.join(cls.FIELDS)}")
        if fields:
            stored = config_dict
            config_dict = {**config_dict, **fields}
            mc = stored.get("method_config")
            if "method_config" not in fields and mc is not None:
                same = "method" not in fields or (
                    normalize_method(fields["method"]) == normalize_method(stored.get("method", "obs_iht")))
                if not same:     # another method starts from its own defaults
                    config_dict.pop("method_config")
                elif isinstance(mc, dict) and ("pattern" in fields or "sparsity" in fields):
                    # the stored method_config mirrors the old pattern (nm) / sparsity (BiP): re-derive them
                    mc = json.loads(json.dumps(mc))
                    inner = mc.get("config") if "format_version" in mc else mc
                    if isinstance(inner, dict):
                        if "pattern" in fields:
                            inner.pop("nm", None)
                        if "sparsity" in fields:
                            inner.pop("sparsity", None)
                    config_dict["method_config"] = mc
        return super().from_dict(config_dict, **kwargs)

    # ---- the method's dataclass, serialization
    def method_config_object(self, **overrides):
        """The method's dataclass config (a fresh instance; ``overrides`` replace fields)."""
        obj = config_from_dict(self.method_config)
        return dataclasses.replace(obj, **overrides) if overrides else obj

    @property
    def route(self) -> MethodRoute:
        return ROUTES[self.method]

    def pruning_dict(self) -> dict:
        """The pruning fields only (no version stamps): compare configs with this."""
        return {f: json.loads(json.dumps(getattr(self, f))) for f in self.FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.pruning_dict(), "pruning_config_version": PRUNING_CONFIG_VERSION,
                "obs_plugins_version": obs_plugins.__version__, **{
                    k: v for k, v in super().to_dict().items() if k in ("optimum_version", "transformers_version")}}

    def to_diff_dict(self) -> dict[str, Any]:  # every field is written: the file is self-describing
        return self.to_dict()

    def __eq__(self, other):
        return isinstance(other, PruningConfig) and self.pruning_dict() == other.pruning_dict()

    __hash__ = None

    def __repr__(self):
        return f"PruningConfig({json.dumps(self.pruning_dict())})"


def _checked(config) -> "PruningConfig":
    """A validated copy of ``config``: its fields may have been set after construction (``cfg.sparsity = ...``),
    which ``__init__``'s checks never saw; the copy goes through them again, errors naming the field."""
    if not isinstance(config, PruningConfig):
        raise PruningInputError(f"config: a PruningConfig, got {type(config).__name__}")
    return PruningConfig(**config.pruning_dict())


# ---------------------------------------------------------------- targets and calibration data
def select_targets(model: nn.Module, config: PruningConfig):
    """The (module, "weight") pairs the config selects, as core ``Target``s (PruningInputError if none)."""
    inc = [re.compile(r) for r in config.include] if config.include is not None else None
    exc = [re.compile(r) for r in config.exclude]
    names = []
    for qn, m in model.named_modules():
        if not (isinstance(m, nn.Linear) or is_hf_conv1d(m) or (isinstance(m, nn.Conv2d) and m.groups == 1)):
            continue
        if inc is not None and not any(r.search(qn) for r in inc):
            continue
        if any(r.search(qn) for r in exc):
            continue
        names.append(qn)
    if not names:
        raise PruningInputError(f"include: no Linear/Conv1D/Conv2d module matches include={config.include} "
                                f"minus exclude={config.exclude}")
    targets = resolve_targets(model, names)
    if inc is None:   # the default selection: say what it cannot take (MoE experts held as 3-D tensors)
        warn_unpruned(model, targets, skip=lambda n: any(r.search(n) for r in exc), stacklevel=3)
    return targets


def _model_device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def calibration_batches(calibration_dataset, config: PruningConfig, tokenizer=None, *, causal_lm: bool = False):
    """Calibration batches (dicts of tensors) from a list of strings, a list of dicts, or a DataLoader.

    Strings are tokenized with ``tokenizer`` (special tokens included), concatenated and cut into
    ``num_samples`` windows of ``seq_len`` tokens (fewer if the text is short), ``batch_size`` per batch, so no
    padding enters the layer statistics; causal LMs get ``labels = input_ids``.  Dicts of 1-D tensors are
    samples (stacked ``batch_size`` at a time), dicts of 2-D tensors are batches; a DataLoader is read until
    ``num_samples`` samples.
    """
    if calibration_dataset is None:
        raise PruningInputError("calibration_dataset: this method needs calibration data (a list of strings, a "
                                "list of dicts of tensors, or a DataLoader)")
    n, bs = config.num_samples, config.batch_size
    if isinstance(calibration_dataset, torch.utils.data.DataLoader):
        out, seen = [], 0
        for b in calibration_dataset:
            b = dict(b) if hasattr(b, "keys") else b
            out.append(b)
            first = next(iter(b.values())) if isinstance(b, dict) else b[0]
            seen += int(first.shape[0])
            if seen >= n:
                break
        if not out:
            raise PruningInputError("calibration_dataset: the DataLoader produced no batches")
        return out
    if not isinstance(calibration_dataset, (list, tuple)) or not calibration_dataset:
        raise PruningInputError(f"calibration_dataset: a non-empty list of strings or dicts, or a DataLoader; got "
                                f"{type(calibration_dataset).__name__}")
    items = list(calibration_dataset)
    if all(isinstance(x, str) for x in items):
        if tokenizer is None:
            raise PruningInputError("calibration_dataset: strings need a tokenizer (Pruner.from_pretrained(..., "
                                    "tokenizer=...))")
        ids = []
        for text in items:
            ids.extend(tokenizer(text)["input_ids"])
            if len(ids) >= n * config.seq_len:
                break
        ids = torch.tensor(ids, dtype=torch.long)
        n_win = min(n, ids.numel() // config.seq_len)
        if n_win == 0:
            raise PruningInputError(f"calibration_dataset: {ids.numel()} tokens, fewer than seq_len="
                                    f"{config.seq_len}")
        windows = ids[:n_win * config.seq_len].reshape(n_win, config.seq_len)
        out = []
        for i in range(0, n_win, bs):
            w = windows[i:i + bs]
            b = {"input_ids": w, "attention_mask": torch.ones_like(w)}
            if causal_lm:
                b["labels"] = w
            out.append(b)
        return out
    if all(isinstance(x, dict) or hasattr(x, "keys") for x in items):
        items = [dict(x) for x in items]
        for i, x in enumerate(items):
            if not x or not all(torch.is_tensor(v) for v in x.values()):
                raise PruningInputError(f"calibration_dataset[{i}]: a dict of tensors, got "
                                        f"{ {k: type(v).__name__ for k, v in x.items()} }")
        dims = {v.dim() for x in items for v in x.values()}
        if 1 in dims and dims <= {0, 1}:  # samples: 1-D token tensors, 0-D values such as a class label
            items = items[:n]
            out = []
            for i in range(0, len(items), bs):
                group = items[i:i + bs]
                try:
                    out.append({k: torch.stack([g[k] for g in group]) for k in group[0]})
                except RuntimeError as e:
                    raise PruningInputError(f"calibration_dataset: samples {i}..{i + len(group) - 1} cannot be "
                                            f"stacked into a batch ({e}); pad them or give batches") from None
            return out
        out, seen = [], 0
        for x in items:
            out.append(x)
            seen += int(next(iter(x.values())).shape[0])
            if seen >= n:
                break
        return out
    raise PruningInputError("calibration_dataset: give strings, dicts of tensors (all of one kind), or a DataLoader")


def default_loss(output, batch):
    """The model's own loss (labels in the batch), else next-token cross-entropy for causal-LM logits."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    if isinstance(batch, dict) and "input_ids" in batch and hasattr(output, "logits") \
            and output.logits.dim() == 3 and output.logits.shape[:2] == batch["input_ids"].shape:
        from obs_plugins.lm import causal_lm_loss
        return causal_lm_loss(output, batch)
    raise PruningInputError("loss_fn: the model returned no loss for this batch (no labels?); give labels in the "
                            "calibration batches or loss_fn=")


def _is_causal_lm(model) -> bool:
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or type(model).__name__.endswith("ForCausalLM")


# ---------------------------------------------------------------- one-shot
def _check_writable_dir(save_dir) -> None:
    """``save_dir`` is, or can become, a writable folder (checked before anything is pruned)."""
    check_writable(save_dir, "save_dir", folder=True)


@dataclass
class PruneResult:
    """What ``Pruner.prune`` did: the plan's report, exact counts, where files went."""
    method: str
    sparsity: float            # zeros / weights over the selected tensors, after pruning
    pruned: int
    weights: int
    targets: list
    seconds: float
    save_dir: str | None = None
    onnx_path: str | None = None
    onnx_report: str | None = None
    report: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _check_onnx_options(onnx_options, verify_options) -> None:
    """``onnx_options`` / ``verify_options``: keyword arguments of ``export`` / ``verify`` that the Pruner does
    not set itself, checked before anything is pruned or written (a typo would otherwise fail after both)."""
    import inspect

    from obs_plugins.integrations import onnx as ox
    from obs_plugins.integrations.onnx.verify import check_tolerances
    for arg, opts, fn, own in (("onnx_options", onnx_options, ox.export, {"model", "example_inputs", "path"}),
                               ("verify_options", verify_options, ox.verify, {"onnx_path", "model", "inputs"})):
        if opts is None:
            continue
        if not isinstance(opts, dict):
            raise PruningInputError(f"{arg}: a dict of keyword arguments, got {type(opts).__name__}")
        allowed = set(inspect.signature(fn).parameters) - own
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise PruningInputError(f"{arg}: unknown {unknown}; {fn.__name__} takes {sorted(allowed)}")
    opts = verify_options or {}
    check_tolerances(opts.get("atol"), opts.get("rtol"), "verify_options: ")


class Pruner(OptimumQuantizer):
    """One-shot pruning of a Transformers model, in the shape of Optimum's quantizers.

    ``Pruner.from_pretrained(model_or_path)`` then ``prune(config, calibration_dataset=..., save_dir=...)``.
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        if not isinstance(model, nn.Module):
            raise PruningInputError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path, file_name: str | None = None, *, tokenizer=None, auto_class=None,
                        **load_kwargs) -> "Pruner":
        """A Pruner for an ``nn.Module`` or a saved model folder (``auto_class`` if given, else the class its
        ``config.architectures`` names, else ``AutoModel``; the tokenizer from the same folder when it has one)."""
        if file_name is not None:
            raise PruningInputError("file_name: Transformers folders are loaded whole; pass the folder")
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, tokenizer)
        import transformers
        path = str(model_or_path)
        if not os.path.isdir(path):
            raise PruningInputError(f"model_or_path: {path!r} is not a model folder (no hub access here)")
        config = transformers.AutoConfig.from_pretrained(path)
        klass = auto_class
        if klass is None:
            for arch in config.architectures or []:
                klass = getattr(transformers, arch, None)
                if klass is not None:
                    break
        klass = klass or transformers.AutoModel
        model = klass.from_pretrained(path, **load_kwargs).eval()
        if tokenizer is None:
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError, TypeError):
                tokenizer = None
        return cls(model, tokenizer)

    def quantize(self, save_dir, file_prefix=None, **kwargs):
        raise NotImplementedError("Pruner prunes, it does not quantize: call prune(config, calibration_dataset=..., "
                                  "save_dir=...)")

    def prune(self, config: PruningConfig, calibration_dataset=None, save_dir=None, export: str | None = None, *,
              loss_fn: Callable | None = None, progress: bool = True, onnx_options: dict | None = None,
              verify_options: dict | None = None) -> PruneResult:
        """Prune ``config.sparsity`` of the selected weights with a one-shot method, bake the masks and (with
        ``save_dir``) save the model, its tokenizer, ``pruning_config.json`` and ``prune_report.json``; with
        ``export="onnx"`` also export ``model.onnx`` and save the verification report beside it."""
        import time
        t0 = time.perf_counter()
        config = _checked(config)
        if export not in (None, "onnx"):
            raise PruningInputError(f"export: None or 'onnx', got {export!r}")
        if export == "onnx" and save_dir is None:
            raise PruningInputError("save_dir: export='onnx' writes model.onnx into save_dir; give one")
        if export == "onnx":   # before any weight changes: a bf16 file would be written but never run
            from obs_plugins.integrations.onnx.verify import check_runtime_dtype
            check_runtime_dtype(self.model, "export")
            _check_onnx_options(onnx_options, verify_options)
        if save_dir is not None:
            _check_writable_dir(save_dir)
        if not config.route.one_shot:
            raise PruningInputError(f"method: {config.method} learns its masks during training; use "
                                    "PruningCallback(config) with a transformers Trainer")
        model = self.model
        targets = select_targets(model, config)
        method_cfg = config.method_config_object()
        if config.method == "obs_iht" and not progress:
            method_cfg = dataclasses.replace(method_cfg, progress=False)
        curv = None
        if config.route.curvature:
            batches = calibration_batches(calibration_dataset, config, self.tokenizer,
                                          causal_lm=_is_causal_lm(model))
            curv = Curvature.layerwise(model, [(t.module, t.name) for t in targets], batches,
                                       loss_fn=loss_fn or default_loss, progress=progress)
            targets = curv.targets
        else:   # Curvature.layerwise warns about tied weights on the other routes
            check_tied(model, targets)
        weights = sum(t.orig().numel() for t in targets)
        amount = config.sparsity
        if config.pattern == "unstructured":   # sparsity is of all the selected weights, torch masks included
            amount = count_to_reach(config.sparsity, targets)
            if amount < 0:
                raise PruningInputError(f"sparsity: the selected weights already carry torch.nn.utils.prune masks "
                                        f"removing more than sparsity={config.sparsity} of them")
        plan = api.prune(method_cfg, curvature=curv, targets=None if curv is not None else targets,
                         amount=amount, reparametrize=False)
        bake(targets)   # masks the model carried before: plain weights for save_pretrained
        zeros = sum(int((t.orig() == 0).sum()) for t in targets)
        pruned = sum(int((~e.mask).sum()) for e in plan.entries.values())
        report = {k: v for k, v in plan.report.items() if k not in ("predicted_layer_loss",)}
        res = PruneResult(config.method, zeros / max(weights, 1), pruned, weights, [t.key for t in targets],
                          time.perf_counter() - t0, report=report)
        if save_dir is not None:
            save_dir = str(save_dir)
            os.makedirs(save_dir, exist_ok=True)
            save_plain(model, save_dir)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(save_dir)
            config.save_pretrained(save_dir)
            res.save_dir = save_dir
        def write_report():
            if save_dir is not None:
                with open(os.path.join(save_dir, "prune_report.json"), "w") as f:
                    json.dump(res.to_dict(), f, indent=1)
        write_report()   # before the export: a failed verification still leaves the pruning's report
        if export == "onnx":
            self._export_onnx(res, calibration_dataset, config, onnx_options or {}, verify_options or {})
            write_report()
        return res

    def _export_onnx(self, res: PruneResult, calibration_dataset, config, onnx_options, verify_options):
        from obs_plugins.integrations import onnx as ox
        model = self.model   # export traces a copy without the KV cache, verify runs its reference pass without it
        g = torch.Generator().manual_seed(0)
        vocab = getattr(model.config, "vocab_size", 1000)
        n_pos = getattr(model.config, "max_position_embeddings", None) or 32
        ids = torch.randint(0, vocab, (2, min(config.seq_len, 32, n_pos)), generator=g).to(_model_device(model))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        path = os.path.join(res.save_dir, "model.onnx")
        ex = ox.export(model, inputs, path, **{"sparse_kernel": "off", **onnx_options})
        rep = ox.verify(ex, model, inputs, **{"bench": False, **verify_options})
        md, _ = rep.save(os.path.join(res.save_dir, "onnx_report"))
        res.onnx_path, res.onnx_report = ex.path, md
        res.report["onnx_ok"] = bool(rep.ok)


# ---------------------------------------------------------------- gradual, in a Trainer
def cubic_sparsity(step: int, begin: int, end: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3``, clamped to [t0, t1]."""
    frac = min(max((step - begin) / max(end - begin, 1), 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


class PruningCallback(TrainerCallback):
    """Gradual pruning during ``Trainer.train()``, masks kept through optimizer steps, baked at the end.

    cubic route (magnitude, OBS-IHT, Wanda): at ``begin_step + j*frequency`` the selected weights are pruned to
    the cubic schedule's sparsity with the method's one-shot plan (OBS-IHT/Wanda re-collect layer curvature from
    ``curvature_batches`` fresh training batches first); masks are torch.nn.utils.prune masks, so pruned
    weights get no gradient and stay zero whatever the optimizer does.  CS route: a ``ContinuousSparsifier`` is
    installed at ``begin_step`` -- with ``score_init="auto"`` (the default) its scores start ranked like ``|w|``
    (``score_init="magnitude"``, natural threshold at the target sparsity unless ``score_init_quantile`` is set,
    gates scaled "tempered" so that kept ones tend to 1; ``score_init="constant"`` is the paper's start from ties,
    which a short fine-tune cannot resolve: issue 15) --, its scores join the optimizer (no weight decay; the
    scheduler's factor), its
    penalty's gradient is added before every optimizer step, and its rounds x epochs temperature schedule is
    spread over ``begin_step..end_step``; then the ticket is cut at exactly ``sparsity`` and fine-tuned with
    fixed masks; the kept weights keep their gated values ``w * gate`` at the cut (no rewinding: this is
    fine-tuning, not a ticket search), so the network changes only where weights are removed.  BiP route: a
    ``BiPTrainer`` gates the weights at ``begin_step`` with a mask of exactly ``sparsity`` (top-k of scores
    initialised from ``|w|``); every Trainer optimizer step is the lower level (the weights, mask fixed) and after
    every ``lower_steps`` of them the callback takes one upper-level step on the scores (the paper's implicit
    gradient, on a fresh training batch, with its own SGD(``mask_lr``, momentum 0.9)); at ``end_step`` the mask the
    last step trained with is cut (exactly ``sparsity``; the network is unchanged by the cut) and fine-tuned with fixed masks.
    ``on_train_end`` bakes every mask (plain weights for ``save_pretrained``).  Checkpoints saved during training
    hold the prune parametrizations (a warning says so); a run resumed from one is refused.
    ``calibration_batches``: batches for the curvature, or BiP's upper level (cycled); default: drawn from the
    Trainer's training data (shuffled with ``seed``).
    """

    def __init__(self, config: PruningConfig, *, calibration_batches=None, loss_fn: Callable | None = None,
                 seed: int = 0):
        config = _checked(config)
        if config.route.gradual is None:
            raise PruningInputError(f"method: {config.method} has no gradual schedule in PruningCallback")
        if config.pattern != "unstructured":
            raise PruningInputError(f"pattern: PruningCallback prunes gradually, so only 'unstructured'; use "
                                    f"Pruner for {config.pattern!r}")
        if config.route.gradual == "bip" and config.method_config_object().granularity != "weight":
            raise PruningInputError("method_config: PruningCallback runs BiP with granularity='weight'; channel "
                                    "scores go through Torch-Pruning (obs_plugins.integrations.torch_pruning)")
        if calibration_batches is not None:
            try:
                one_pass = iter(calibration_batches) is calibration_batches
            except TypeError:
                raise PruningInputError(f"calibration_batches: a list of batches or a DataLoader, got "
                                        f"{type(calibration_batches).__name__}") from None
            if one_pass:   # a generator / iterator can be read only once: keep its batches
                calibration_batches = list(calibration_batches)
            if isinstance(calibration_batches, (list, tuple)) and not calibration_batches:
                raise PruningInputError("calibration_batches: empty")
        self.config = config
        self.calibration = calibration_batches
        self.loss_fn = loss_fn or default_loss
        self.seed = seed
        self.targets = None
        self.sparsifier = None
        self.bip = None
        self.history: list[dict] = []
        self._batches = None
        self._given = None
        self._warned_save = False

    # ---- schedule
    def _setup_schedule(self, max_steps: int):
        c = self.config
        self.begin = c.begin_step
        if self.begin >= max_steps:
            raise PruningInputError(f"begin_step: {self.begin} is not before the end of the {max_steps} training "
                                    "steps")
        self.end = c.end_step if c.end_step is not None else max(self.begin + 1, int(0.75 * max_steps))
        if self.end > max_steps:
            raise PruningInputError(f"end_step: {self.end} is beyond the {max_steps} training steps")
        if self.config.route.gradual == "cs":
            cs = c.method_config_object()
            self._cs_epochs = cs.rounds * cs.epochs
            span = self.end - self.begin
            if span < self._cs_epochs:
                raise PruningInputError(f"end_step: CS needs at least rounds x epochs = {self._cs_epochs} steps "
                                        f"between begin_step and end_step, got {span}")
            self._epoch_ends = [self.begin + round(span * (i + 1) / self._cs_epochs) for i in range(self._cs_epochs)]
        elif self.config.route.gradual == "bip":
            if self.end <= self.begin:
                raise PruningInputError(f"end_step: BiP needs end_step > begin_step, got {self.end} <= {self.begin}")
        else:
            f = c.frequency or max(1, (self.end - self.begin) // 10)
            # initial_sparsity > 0 is cut at begin_step itself (step 0: in on_train_begin, before any step)
            first = [self.begin] if c.initial_sparsity > 0 and self.begin > 0 else []
            self.prune_steps = sorted(set(first + list(range(self.begin + f, self.end, f)) + [self.end]))

    def _given_batches(self) -> list:
        """``calibration_batches`` read once and kept (a DataLoader, even a shuffling one, is iterated once:
        every pruning step sees the same batches); the curvature routes keep only the ``curvature_batches``
        first ones, BiP's upper level all of them."""
        if self._given is None:
            import itertools
            n = self.config.curvature_batches
            whole = self.config.route.gradual == "bip" or not n
            self._given = list(self.calibration) if whole else list(itertools.islice(self.calibration, n))
        return self._given

    def _next_calibration(self, n):
        if self.calibration is not None:
            batches = self._given_batches()
            if self.config.route.gradual == "bip":  # the upper level: a fresh batch each time, cycling
                out = [batches[(self._cycle + i) % len(batches)] for i in range(n)]
                self._cycle += n
                return out
            return batches[:n] if n else list(batches)
        out = []
        for _ in range(n):
            try:
                out.append(next(self._batches))
            except StopIteration:
                self._batches = iter(self._loader)
                out.append(next(self._batches))
        return out

    # ---- events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None,
                       train_dataloader=None, **kwargs):
        for prev in (self.sparsifier, self.bip):   # a second trainer.train(): start afresh after a finished search
            if prev is not None and not prev.finished:
                raise PruningInputError("config: an earlier train() left its CS / BiP search unfinished on the model; "
                                        "use a new PruningCallback (and model) for another run")
        if state.global_step > 0:
            raise PruningInputError(
                f"resume_from_checkpoint: PruningCallback cannot resume a run (this one starts at step "
                f"{state.global_step}); checkpoints written during training hold torch.nn.utils.prune "
                "parametrizations (<name>_orig, <name>_mask) and the search state is not saved, so the resumed "
                "model would not be the one that was pruned. Train from the start (save_strategy='no'), or prune "
                "the saved final model again")
        if getattr(args, "load_best_model_at_end", False):
            raise PruningInputError(
                "load_best_model_at_end: not with PruningCallback; the best checkpoint may predate the pruning, and "
                "Trainer would load it over the pruned layers' <name>_orig/<name>_mask parametrizations, leaving "
                "a mix of the two models. Set load_best_model_at_end=False (evaluate the final, pruned model)")
        if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no" and not self._warned_save:
            import warnings
            warnings.warn("PruningCallback: checkpoints saved during training hold torch.nn.utils.prune "
                          "parametrizations (<name>_orig, <name>_mask): from_pretrained does not load them and the "
                          "callback cannot resume from them; the model is plain again after train() (set "
                          "save_strategy='no' to silence this)", UserWarning, stacklevel=2)
            self._warned_save = True
        self.sparsifier, self.bip, self._cs_epoch, self._since_upper = None, None, 0, 0
        self.model = model
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._setup_schedule(state.max_steps)
        self.targets = select_targets(model, self.config)
        if not self.config.route.curvature:   # the curvature routes warn in Curvature.layerwise
            check_tied(model, self.targets)
        self.params = [(t.module, t.name) for t in self.targets]
        self.weights = sum(t.orig().numel() for t in self.targets)
        if self.config.pattern == "unstructured" and count_to_reach(self.config.sparsity, self.targets) < 0:
            raise PruningInputError(f"sparsity: the selected weights already carry torch.nn.utils.prune masks "
                                    f"removing more than sparsity={self.config.sparsity} of them")   # as Pruner
        self._samples_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps
                                  * max(1, getattr(args, "world_size", 1)))
        self._cycle = 0
        if self.calibration is not None and self.config.route.gradual == "bip" and not self._given_batches():
            raise PruningInputError("calibration_batches: empty; BiP's upper level needs batches")
        if (self.config.route.curvature or self.config.route.gradual == "bip") and self.calibration is None:
            if train_dataloader is None:
                raise PruningInputError("calibration_batches: no training dataloader to draw curvature batches "
                                        "from; give calibration_batches=")
            g = torch.Generator().manual_seed(self.seed)
            # a streamed (iterable) dataset cannot be shuffled by a DataLoader: its batches come in stream order
            order = ({} if isinstance(train_dataloader.dataset, torch.utils.data.IterableDataset)
                     else {"shuffle": True, "generator": g})
            self._loader = torch.utils.data.DataLoader(train_dataloader.dataset, **order,
                                                       batch_size=args.per_device_train_batch_size,
                                                       collate_fn=train_dataloader.collate_fn)
            self._batches = iter(self._loader)
        if self.begin == 0:
            self._start(state)

    def _start(self, state):
        if self.config.route.gradual == "cubic":
            if self.config.initial_sparsity > 0:   # the schedule's value at begin_step
                self._prune_to(self.config.initial_sparsity, state)
        elif self.config.route.gradual == "cs":
            from obs_plugins.methods.continuous_sparsification import ContinuousSparsifier
            cfg = self.config.method_config_object(progress=False)
            self.sparsifier = ContinuousSparsifier.for_fine_tuning(self.model, self.params, cfg,
                                                                   self.config.sparsity)
            base = self.optimizer.param_groups[0]
            lr = cfg.mask_lr if cfg.mask_lr is not None else base.get("initial_lr", base["lr"])
            self.optimizer.add_param_group({"params": list(self.sparsifier.parameters()), "weight_decay": 0.0,
                                            "lr": lr, "initial_lr": lr})
            sched = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate wraps it
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):  # the scores follow the same schedule
                sched.base_lrs.append(lr)
                sched.lr_lambdas.append(sched.lr_lambdas[0])
                # from the first score step on (begin_step > 0: the schedule is already under way)
                self.optimizer.param_groups[-1]["lr"] = lr * sched.lr_lambdas[0](sched.last_epoch)
            self._cs_epoch = 0
        elif self.config.route.gradual == "bip":
            from obs_plugins.methods.bip import BiPTrainer
            cfg = self.config.method_config_object(progress=False)
            self.bip = BiPTrainer(self.model, self.params, sparsity=self.config.sparsity, config=cfg)
            self.bip.straight_through = False  # the Trainer's steps are the lower level: no score gradient there
            self.mask_optimizer = torch.optim.SGD(self.bip.score_groups(), lr=cfg.mask_lr, momentum=0.9)
            self._since_upper = 0

    def _prune_to(self, sparsity, state):
        k = count_to_reach(sparsity, self.targets)
        if k <= 0:
            return
        curv = None
        cfg = self.config.method_config_object()
        if hasattr(cfg, "progress"):
            cfg = dataclasses.replace(cfg, progress=False)
        if self.config.route.curvature:
            curv = Curvature.layerwise(self.model, self.params, self._next_calibration(self.config.curvature_batches),
                                       loss_fn=self.loss_fn, progress=False)
        was = self.model.training
        try:
            api.prune(cfg, curvature=curv, targets=None if curv else self.targets, amount=int(k),
                      reparametrize=True)
        finally:
            self.model.train(was)
        self.history.append({"step": state.global_step, "target_sparsity": sparsity, "sparsity": self.sparsity()})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        cs = self.sparsifier
        if cs is not None and not cs.finished:
            cs.penalty().backward()  # d(loss + penalty): the penalty only touches the scores

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.targets is None:
            return
        if self.config.route.gradual == "cs":
            if self.sparsifier is None and step >= self.begin:
                self._start(state)
                return
            cs = self.sparsifier
            if cs is None or cs.finished:
                return
            for s in cs.parameters():  # the Trainer zeroes only the model's gradients
                s.grad = None
            cs.step()
            while self._cs_epoch < len(self._epoch_ends) and step >= self._epoch_ends[self._cs_epoch]:
                cs.step_epoch()
                self._cs_epoch += 1
            if cs.done:
                self._cut_ticket(state)
        elif self.config.route.gradual == "bip":
            if self.bip is None and step >= self.begin:
                self._start(state)
                return
            bip = self.bip
            if bip is None or bip.finished:
                return
            bip.count_lower_step(self._samples_per_step)
            self._since_upper += 1
            if step >= self.end:  # cut the mask this step trained with (a score step now would go unused)
                self._cut_bip(state)
                return
            if self._since_upper >= bip.config.lower_steps:
                was = self.model.training
                self.model.train()
                try:
                    loss = bip.upper_step(self._next_calibration(1)[0], self.mask_optimizer, self.loss_fn)
                finally:
                    self.model.train(was)
                self._since_upper = 0
                self.history.append({"step": state.global_step, "upper_loss": loss})
        elif step in self.prune_steps:
            self._prune_to(cubic_sparsity(step, self.begin, self.end, self.config.sparsity,
                                          self.config.initial_sparsity), state)

    def _cut_ticket(self, state):
        cs = self.sparsifier
        with torch.no_grad():  # the gated weights w * gate the network was trained with
            gated = {t.key: getattr(t.module, t.name).detach().clone() for t in cs.targets}
        cs.finish(rewind=False)
        # ``sparsity`` of every weight, masks already on the model counted (a float amount would take that
        # fraction of the weights still unmasked: 0.72 for 0.6 over 30% masked)
        plan = cs.make_plan(k=count_to_reach(self.config.sparsity, self.targets))
        for key, e in plan.entries.items():  # keep them, so the function only changes where weights are cut
            e.new_weight = gated[key]
        plan.apply(reparametrize=True)
        self.history.append({"step": state.global_step, "target_sparsity": self.config.sparsity,
                             "sparsity": self.sparsity(), "natural_sparsity": plan.report.get("natural_sparsity")})

    def _cut_bip(self, state):
        bip = self.bip
        with torch.no_grad():  # the weights theta the gates multiplied (kept entries unchanged by the cut)
            theta = {t.key: t.orig().detach().clone() for t in bip.targets}
        bip.finish()
        plan = bip.make_plan(k=count_to_reach(self.config.sparsity, self.targets))
        for key, e in plan.entries.items():
            e.new_weight = theta[key]
        plan.apply(reparametrize=True)
        self.history.append({"step": state.global_step, "target_sparsity": self.config.sparsity,
                             "sparsity": self.sparsity(), "upper_steps": bip.upper_steps,
                             "training_mask_overlap": plan.report.get("training_mask_overlap"),
                             "samples_forward_backward": bip.samples_forward_backward})

    def on_train_end(self, args, state, control, **kwargs):
        if self.targets is None:
            return
        if self.config.route.gradual == "bip":
            if self.bip is None:
                self._start(state)
            if not self.bip.finished:  # training stopped before end_step: cut the training mask now
                self._cut_bip(state)
        elif self.config.route.gradual == "cs":
            if self.sparsifier is None:
                self._start(state)
            if not self.sparsifier.finished:  # training stopped before the schedule ended: cut it now
                self._cut_ticket(state)
        else:   # training stopped before end_step: the rest of the schedule now (nothing if it was reached)
            self._prune_to(self.config.sparsity, state)
        bake(self.targets)

    def sparsity(self) -> float:
        """Fraction of the selected weights masked (or zero once baked)."""
        if not self.targets:
            return 0.0
        return sum(int((t.current() == 0).sum()) for t in self.targets) / self.weights


__all__ = ["PruningConfig", "Pruner", "PruneResult", "PruningCallback", "MethodRoute", "ROUTES", "ALIASES",
           "DEFAULT_EXCLUDE", "normalize_method", "select_targets", "calibration_batches", "default_loss",
           "cubic_sparsity"]
