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
    if not isinstance(data, dict):
        raise TypeError(f"config_from_dict: expected a dict, got {type(data).__name__}")
    version = data.get("format_version")
    if version != CONFIG_FORMAT_VERSION:
        raise ValueError(f"config_from_dict: unsupported format_version {version!r} "
                         f"(this obs-plugins reads {CONFIG_FORMAT_VERSION})")
    spec = get_method(data.get("method"))
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    values = dict(data.get("config", {}))
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"config_from_dict: unknown field(s) {unknown} for method {spec.name!r}; "
                         f"allowed: {sorted(fields)}")
    for f in dataclasses.fields(spec.config_cls):  # JSON turns tuples into lists
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return spec.config_cls(**values)
