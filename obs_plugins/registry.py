"""Method registry: a public ``@dataclass`` config per method mapped to its handler (torchao style).

Adapters (torch.nn.utils.prune, Torch-Pruning, Optimum, the CLI) look methods up here by name, so a new
method is one ``register_method`` call away from every host.  Config (de)serialization is versioned and
allow-listed: only registered method names and the config's own fields are accepted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

CONFIG_FORMAT_VERSION = 1


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    handler: Callable[..., Any]
    kind: str  # "one-shot" (a solver: tensors + curvature -> PrunePlan) or "learned" (a trainer)
    description: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, handler: Callable[..., Any], *, kind: str,
                    description: str = "") -> MethodSpec:
    if not isinstance(name, str) or not name:
        raise ValueError("register_method: name must be a non-empty string")
    if name in _REGISTRY:
        raise ValueError(f"register_method: a method named {name!r} is already registered")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_method: config_cls for {name!r} must be a dataclass, got {config_cls!r}")
    if kind not in ("one-shot", "learned"):
        raise ValueError(f"register_method: kind must be 'one-shot' or 'learned', got {kind!r}")
    spec = MethodSpec(name, config_cls, handler, kind, description)
    _REGISTRY[name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method (for tests and plug-in reloading)."""
    get_method(name)
    del _REGISTRY[name]


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown pruning method {name!r}; registered methods: {known}") from None


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_of_config(config: Any) -> MethodSpec:
    for spec in _REGISTRY.values():
        if type(config) is spec.config_cls:
            return spec
    raise TypeError(f"{type(config).__name__} is not the config of any registered method "
                    f"({', '.join(list_methods())})")


def config_to_dict(config: Any) -> dict:
    spec = method_of_config(config)
    return {"format_version": CONFIG_FORMAT_VERSION, "method": spec.name,
            "config": dataclasses.asdict(config)}


def config_from_dict(data: dict) -> Any:
    """The config ``config_to_dict`` wrote: ``{"format_version": 1, "method": <registered name>, "config": {field:
    value}}``.  Only the method's own fields are accepted, and their values pass the config's ``validate()`` (where
    it has one); bad input, an unknown top-level key included, raises :class:`PruningInputError` naming the key or
    field (``KeyError`` for a method name that is not registered)."""
    from .errors import PruningInputError
    if not isinstance(data, dict):
        raise TypeError(f"config_from_dict: expected a dict, got {type(data).__name__}")
    for key in ("format_version", "method", "config"):
        if key not in data:
            raise PruningInputError(f"{key}: missing; config_from_dict reads {{'format_version': "
                                    f"{CONFIG_FORMAT_VERSION}, 'method': <name>, 'config': {{field: value}}}}")
    extra = sorted(map(str, set(data) - {"format_version", "method", "config"}))
    if extra:
        raise PruningInputError(f"{extra[0]}: unknown top-level key(s) {extra}; config_from_dict reads only "
                                f"'format_version', 'method' and 'config'")
    version = data["format_version"]
    if type(version) is not int or version != CONFIG_FORMAT_VERSION:  # not True, not 1.0
        raise PruningInputError(f"format_version: unsupported {version!r} (this obs-plugins reads the int "
                                f"{CONFIG_FORMAT_VERSION})")
    if not isinstance(data["method"], str):
        raise PruningInputError(f"method: a registered method name ({', '.join(list_methods())}), got "
                                f"{data['method']!r}")
    spec = get_method(data["method"])
    if not isinstance(data["config"], dict):
        raise PruningInputError(f"config: expected a dict of {spec.config_cls.__name__} fields, got "
                                f"{type(data['config']).__name__}")
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    values = dict(data["config"])
    unknown = sorted(set(values) - fields)
    if unknown:
        raise PruningInputError(f"config: unknown field(s) {unknown} for method {spec.name!r}; "
                                f"allowed: {sorted(fields)}")
    for f in dataclasses.fields(spec.config_cls):  # JSON turns tuples into lists
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    config = spec.config_cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()  # PruningInputError naming the field
    return config
