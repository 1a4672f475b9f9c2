"""Checks shared by the learned methods (Continuous Sparsification, BiP): configs and saved states."""
from __future__ import annotations

import dataclasses

from ..errors import PruningInputError


def check_saved_state(state, *, owner: str, noun: str, version: int, keys: list[str], config) -> None:
    """``state`` was saved by an ``owner`` of this ``version`` for the same parameters and config."""
    if not isinstance(state, dict) or state.get("version") != version:
        raise PruningInputError(f"state: not a {owner} state (version {version})")
    if list(state["keys"]) != keys:
        raise PruningInputError(f"state: saved for parameters {state['keys']}, this {noun} has {keys}")
    mine = dataclasses.asdict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}  # fields added later: saved as defaults
    differ = sorted(k for k in mine if k != "progress" and state["config"].get(k, defaults[k]) != mine[k])
    if differ:
        raise PruningInputError(f"state: saved with a different config ({differ}); build the {noun} with the "
                                "saved config")


def resolve_config(config, cls, overrides: dict, *, owner: str):
    """``config`` (an instance of ``cls`` or None for the defaults) with keyword ``overrides``, validated."""
    if config is None:
        config = cls()
    elif not isinstance(config, cls):
        raise PruningInputError(f"config: expected a {cls.__name__}, got {type(config).__name__}")
    if overrides:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise PruningInputError(f"{owner}: unknown argument(s) {unknown}; {cls.__name__} fields: "
                                    f"{sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    config.validate()
    return config
