"""Checks shared by the learned methods' ``load_state_dict`` (Continuous Sparsification, BiP)."""
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
    differ = sorted(k for k in mine if k != "progress" and state["config"].get(k) != mine[k])
    if differ:
        raise PruningInputError(f"state: saved with a different config ({differ}); build the {noun} with the "
                                "saved config")
